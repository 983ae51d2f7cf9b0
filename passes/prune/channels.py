"""``prune-channels``: structured pruning that removes output channels, so the model gets smaller and faster.

Channels are removed per *dependency group* (:func:`graphopt.analysis.channel_groups`): the output
channels of a Conv / Gemm / MatMul together with every place they flow to: BatchNormalization
parameters, biases, depthwise Conv filters (and their ``group``), per-channel constants of elementwise
ops, the input channels of the next Conv / Gemm / MatMul, Flatten -> Gemm blocks and Concat offsets.
Channels joined by a residual ``Add`` (or a gating ``Mul``) belong to one group, pruned with one
shared choice of channels; a group the analysis cannot follow (Reshape, graph output, ...) is left alone
and the reason goes into the report.

Which channels: the L1 / L2 norm of each producer's output filter, scaled by the BatchNormalization
that follows it (gamma / sqrt(var + eps)), normalised per producer and summed over the group
(``criterion=act`` instead weighs each channel by its calibration activation energy times the norm of
the consumer weights that read it).

Accuracy recovery without training (with calibration data): for every tensor that a consumer reads,
the removed channels are regressed on the kept ones over the calibration activations (least squares
with a small ridge, one Gram matrix per tensor, streamed batch by batch); the consumer's weights for
the kept channels absorb the regression and its bias absorbs the intercept.  For a Conv consumer this is
exact algebra (a convolution is linear in its input channels); only the intercept at padded borders is
approximate.

Options: ``ratio`` removes that share of every prunable group; ``target-flops=0.7`` instead allocates
ratios per group by measured sensitivity (output cosine with the group pruned alone, on calibration
data) until the model's FLOPs reach 0.7x.  ``round-to=8`` rounds each kept width down to a multiple of 8
(onnxruntime's NCHWc kernels; ``round-to=1`` for exact ratios).  ``include`` / ``exclude`` are glob
patterns on producer node or weight names (``;``-separated): an excluded layer keeps its output
channels, though its input channels still follow the layers before it.  ``recover=false`` skips the
regression, ``refit=false`` the dense re-fit of the consumers.  Not idempotent by design: the ratio is
relative to the current width.

``target-latency=0.75`` steps the global ratio and times each pruned trial against the original
(graphopt.latency.compare, ORT_ENABLE_ALL, 1 thread, with a control copy) until the target is met.
With a user budget (``--max-accuracy-drop`` + ``--eval``, ``--min-cosine``) the pass checks it itself
against the pipeline's original and lowers the ratio until it holds (``backoff=false``: not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, ir, register_pass
from graphopt.analysis import ChannelGroup, Member, channel_groups, flops, param_count
from graphopt.rewrite import weight_used_only_by
from graphopt.shapes import infer_shapes

from .common import BudgetCheck, adopt_graph as _adopt, budget_notes, calibration_activations, matches, set_constant


class _Refuse(Exception):
    pass


@dataclass
class _Plan:
    """Edits for one run: new values per constant, positions to delete per (constant, axis)."""

    values: dict[int, np.ndarray]
    consts: dict[int, gs.Constant]
    deletes: dict[tuple[int, int], set[int]]
    group_attr: dict[int, int]  # node index -> channels removed (depthwise Conv groups)
    new_bias: dict[int, gs.Constant]
    prod_drop: dict[int, np.ndarray] = None  # id(producer node) -> output channels removed
    consumer_ids: set = None  # id() of consumer nodes whose input channels were removed

    def __post_init__(self):
        if self.prod_drop is None:
            self.prod_drop = {}
        if self.consumer_ids is None:
            self.consumer_ids = set()

    def get(self, c: gs.Constant) -> np.ndarray:
        k = id(c)
        if k not in self.values:
            self.consts[k] = c
            self.values[k] = np.array(c.values, dtype=np.float64 if np.dtype(c.dtype).kind == "f" else c.dtype)
        return self.values[k]

    def delete(self, c: gs.Constant, axis: int, positions) -> None:
        self.get(c)
        self.deletes.setdefault((id(c), axis), set()).update(int(p) for p in positions)


def _consumer_axis(node: gs.Node) -> int:
    return -1 if node.op == "MatMul" else 1


def _bn_scale(node: gs.Node) -> np.ndarray:
    gamma = np.asarray(node.inputs[1].values, np.float64)
    var = np.asarray(node.inputs[4].values, np.float64)
    return np.abs(gamma) / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))


@register_pass
class PruneChannels(Pass):
    name = "prune-channels"
    exact = False
    description = "remove output channels of Conv/Gemm/MatMul (dependency groups), re-fit consumers from calibration data"

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.3
        criterion: Literal["auto", "obs", "l1", "l2", "act"] = "auto"
        exclude: tuple[str, ...] = ()
        include: tuple[str, ...] = ()
        target_flops: Optional[float] = None
        target_latency: Optional[float] = None  # measured ORT_ENABLE_ALL latency, fraction of the original
        backoff: bool = True  # with a user budget: lower the ratio until the budget holds
        round_to: int = 8
        recover: bool = True
        refit: bool = True
        refit_ridge: float = 0.01
        ridge: float = 1e-3

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        from graphopt.errors import PipelineError

        if not 0.0 <= o.ratio < 1.0:
            raise PipelineError(f"prune-channels: ratio must be in [0, 1), got {o.ratio}")
        if o.target_flops is not None and not 0.0 < o.target_flops <= 1.0:
            raise PipelineError(f"prune-channels: target-flops must be in (0, 1], got {o.target_flops}")
        if o.target_latency is not None and not 0.0 < o.target_latency <= 1.0:
            raise PipelineError(f"prune-channels: target-latency must be in (0, 1], got {o.target_latency}")
        if o.round_to < 1:
            raise PipelineError("prune-channels: round-to must be >= 1")

    # -- match / check ----------------------------------------------------------------------------
    def _check(self, g: ChannelGroup, nodes: list[gs.Node], graph: gs.Graph) -> str | None:
        if g.blocked:
            return g.blocked
        prods = [nodes[m.node] for m in g.of("producer")]
        names = [n for p in prods for n in (p.name, p.inputs[1].name)]
        if self.options.include and not matches(self.options.include, *names):
            return "not included"
        if matches(self.options.exclude, *names):
            return "excluded"
        for m in g.members:
            node = nodes[m.node]
            for t in self._touched(m, node):
                if not isinstance(t, gs.Constant):
                    return f"{node.name or node.op}: {t.name} is not an initializer"
                if not weight_used_only_by(t, [node]):
                    return f"{node.name or node.op}: {t.name} is shared with other nodes"
                if np.dtype(t.dtype).kind != "f":
                    return f"{node.name or node.op}: {t.name} is not floating point"
        if g.size < 2:
            return "a single channel"
        return None

    @staticmethod
    def _touched(m: Member, node: gs.Node) -> list[gs.Tensor]:
        ins = [t for t in node.inputs]
        if m.kind in ("producer", "dwconv"):
            return [t for t in ins[1:3] if t.name]
        if m.kind == "consumer":
            return [ins[1]] + ([ins[2]] if len(ins) > 2 and ins[2].name and node.op != "MatMul" else [])
        if m.kind == "bn":
            return ins[1:5]
        if m.kind == "const":
            return [ins[m.input_index]]
        return []

    # -- scoring ------------------------------------------------------------------------------------
    def _scores(self, g: ChannelGroup, nodes: list[gs.Node], grams: dict) -> np.ndarray:
        total = np.zeros(g.size)
        if self.options.criterion in ("act", "auto") and grams:
            for m in g.of("consumer"):
                node = nodes[m.node]
                key = (m.tensor, m.offset, g.size, m.block)
                if key not in grams:
                    continue
                energy = np.diag(grams[key][0])[: g.size] / max(grams[key][1], 1)
                w = self._consumer_columns(node, m, g.size)  # [C, out * block * k]
                s = energy * (w**2).sum(1)
                total += s / max(s.mean(), 1e-30)
            if total.any():
                return total
        for m in g.of("producer"):
            node = nodes[m.node]
            w = np.asarray(node.inputs[1].values, np.float64)
            if node.op == "Conv":
                rows = w.reshape(w.shape[0], -1)
            elif node.op == "Gemm" and node.attrs.get("transB", 0):
                rows = w
            else:
                rows = w.T
            s = np.abs(rows).sum(1) if self.options.criterion == "l1" else np.sqrt((rows**2).sum(1))
            out = node.outputs[0]
            if len(out.outputs) == 1 and out.outputs[0].op == "BatchNormalization" and out.outputs[0].inputs[0] is out:
                try:
                    s = s * _bn_scale(out.outputs[0])
                except Exception:
                    pass
            total += s / max(s.mean(), 1e-30)
        return total

    @staticmethod
    def _consumer_columns(node: gs.Node, m: Member, size: int) -> np.ndarray:
        w = np.asarray(node.inputs[1].values, np.float64)
        if node.op == "Conv":
            cols = np.moveaxis(w, 1, 0)[m.offset : m.offset + size]
            return cols.reshape(size, -1)
        if node.op == "Gemm" and node.attrs.get("transB", 0):
            w = w.T
        # w: [in_features, out]
        w3 = w.reshape(-1, m.block, w.shape[1])[m.offset : m.offset + size]
        return w3.reshape(size, -1)

    def _select(self, g, nodes, score, grams, keep_n) -> tuple[np.ndarray, np.ndarray]:
        if self.options.criterion == "obs" and grams:
            sel = self._obs_select(g, nodes, grams, keep_n)
            if sel is not None:
                return sel
        order = np.argsort(-score, kind="stable")
        return np.sort(order[:keep_n]), np.sort(order[keep_n:])

    def _obs_select(self, g: ChannelGroup, nodes: list[gs.Node], grams: dict, keep_n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Greedy optimal-brain-surgeon choice over whole input channels of the consumers.

        Removing channel r from a consumer whose input has (intercept-augmented) second moment G and
        whose weights read r through rows W[r] costs ||W[r]||^2 / [G^-1]_rr in output error once the
        kept channels are re-fitted; each step removes the channel with the least cost summed over the
        group's consumers (each normalised by its output energy), then updates W and G^-1 the OBS way.
        """
        states = []
        for m in g.of("consumer"):
            gram = grams.get((m.tensor, m.offset, g.size, m.block))
            if gram is None:
                continue
            G = gram[0] / max(gram[1], 1)
            G = G.copy()
            d = np.diag(G)[:-1]
            G[np.arange(g.size), np.arange(g.size)] += self.options.ridge * max(float(d.mean()), 1e-12)
            W = np.zeros((g.size + 1, 0))
            cols = self._consumer_columns(nodes[m.node], m, g.size)
            W = np.vstack([cols, np.zeros((1, cols.shape[1]))])
            energy = float(np.einsum("if,ij,jf->", W, G, W))
            states.append([W, np.linalg.inv(G), max(energy, 1e-30)])
        if not states:
            return None
        alive = np.ones(g.size, bool)
        for _ in range(g.size - keep_n):
            cost = np.zeros(g.size)
            for W, Ginv, e in states:
                cost += (W[: g.size] ** 2).sum(1) / np.maximum(np.diag(Ginv)[: g.size], 1e-30) / e
            cost[~alive] = np.inf
            r = int(np.argmin(cost))
            alive[r] = False
            for st in states:
                W, Ginv, _ = st
                col = Ginv[:, r] / Ginv[r, r]
                W -= np.outer(col, W[r])
                Ginv -= np.outer(col, Ginv[r])
                W[r] = 0.0
        return np.flatnonzero(alive), np.flatnonzero(~alive)

    def _keep_count(self, size: int, ratio: float) -> int:
        keep = size - int(round(ratio * size))
        r = self.options.round_to
        if r > 1 and keep < size:  # hardware-friendly widths: round the kept count down (remove at least ratio)
            keep = max(r, (keep // r) * r) if size > r else keep
        return max(1, keep)

    # -- calibration statistics ---------------------------------------------------------------------
    def _grams(self, graph: gs.Graph, ctx: PassContext, groups: list[ChannelGroup], nodes: list[gs.Node]) -> dict:
        """(tensor, offset, size, block) -> (Gram of [a; 1] over samples, sample count)."""
        keys: dict[str, list[tuple]] = {}
        for g in groups:
            for m in g.of("consumer"):
                keys.setdefault(m.tensor, [])
                k = (m.tensor, m.offset, g.size, m.block, _consumer_axis(nodes[m.node]))
                if k not in keys[m.tensor]:
                    keys[m.tensor].append(k)
        if not keys:
            return {}
        model = ctx.to_model(graph)
        acc: dict[tuple, list] = {}
        for chunk in self._chunks(graph, ctx, list(keys)):
            for batch in calibration_activations(ctx, graph, chunk, model=model):
                for name in chunk:
                    a = np.asarray(batch[name], np.float64)
                    for (t, off, size, block, axis) in keys[name]:
                        x = np.moveaxis(a, axis, -1) if block == 1 else a.reshape(a.shape[0], -1, block).transpose(0, 2, 1)
                        x = x.reshape(-1, x.shape[-1])[:, off : off + size]
                        x1 = np.concatenate([x, np.ones((x.shape[0], 1))], 1)
                        k4 = (t, off, size, block)
                        if k4 not in acc:
                            acc[k4] = [np.zeros((size + 1, size + 1)), 0]
                        acc[k4][0] += x1.T @ x1
                        acc[k4][1] += x.shape[0]
                    del a
        return {k: (v[0], v[1]) for k, v in acc.items()}

    @staticmethod
    def _chunks(graph: gs.Graph, ctx: PassContext, names: list[str], limit: int = 256 << 20) -> list[list[str]]:
        """Split the tensors to fetch so that one calibration batch of a chunk stays under ``limit``
        bytes (sizes from the inferred shapes; symbolic dims count as the batch size)."""
        first = next(iter(ctx.calibration_batches()), None)
        batch = max((int(v.shape[0]) for v in (first or {}).values() if getattr(v, "ndim", 0)), default=1)
        tensors = ir.tensor_map(graph)
        chunks: list[list[str]] = [[]]
        used = 0
        for n in names:
            shp = getattr(tensors.get(n), "shape", None) or []
            size = 4 * int(np.prod([d if isinstance(d, (int, np.integer)) and d > 0 else batch for d in shp])) if shp else 0
            if chunks[-1] and used + size > limit:
                chunks.append([])
                used = 0
            chunks[-1].append(n)
            used += size
        return chunks

    def _regression(self, gram: np.ndarray, keep: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """B [drop, keep] and beta [drop] with a_drop ~= B a_keep + beta (ridge on the kept channels)."""
        size = gram.shape[0] - 1
        kp = np.concatenate([keep, [size]])
        gkk = gram[np.ix_(kp, kp)].copy()
        d = np.diag(gkk)[:-1]
        lam = self.options.ridge * max(float(d.mean()), 1e-12)
        gkk[np.arange(len(keep)), np.arange(len(keep))] += lam
        grk = gram[np.ix_(drop, kp)]
        sol = np.linalg.solve(gkk, grk.T).T  # [drop, keep+1]
        return sol[:, :-1], sol[:, -1]

    # -- rewrite ------------------------------------------------------------------------------------
    def _apply_group(self, g: ChannelGroup, nodes: list[gs.Node], keep: np.ndarray, drop: np.ndarray, plan: _Plan, grams: dict, graph: gs.Graph) -> None:
        # 1. recovery: consumers absorb the removed channels (original coordinates, before deleting)
        for m in g.of("consumer"):
            node = nodes[m.node]
            gram = grams.get((m.tensor, m.offset, g.size, m.block))
            if gram is None or not len(drop):
                continue
            B, beta = self._regression(gram[0], keep, drop)
            self._compensate(node, m, B, beta, keep, drop, plan, graph)
        # 2. deletions
        for m in g.members:
            node = nodes[m.node]
            pos = m.offset + drop
            if m.kind == "producer":
                plan.prod_drop[id(node)] = drop
                w = node.inputs[1]
                if node.op == "Conv":
                    plan.delete(w, 0, drop)
                elif node.op == "Gemm":
                    plan.delete(w, 0 if node.attrs.get("transB", 0) else 1, drop)
                else:
                    plan.delete(w, 1, drop)
                if len(node.inputs) > 2 and node.inputs[2].name:
                    b = node.inputs[2]
                    if int(np.prod(b.shape)) == g.size:
                        plan.delete(b, len(b.shape) - 1, drop)
            elif m.kind == "dwconv":
                plan.delete(node.inputs[1], 0, pos)
                if len(node.inputs) > 2 and node.inputs[2].name:
                    plan.delete(node.inputs[2], 0, pos)
                plan.group_attr[m.node] = plan.group_attr.get(m.node, 0) + len(drop)
            elif m.kind == "bn":
                for t in node.inputs[1:5]:
                    plan.delete(t, 0, pos)
            elif m.kind == "const":
                plan.delete(node.inputs[m.input_index], m.axis, pos)
            elif m.kind == "consumer":
                plan.consumer_ids.add(id(node))
                w = node.inputs[1]
                fpos = (pos[:, None] * m.block + np.arange(m.block)[None, :]).ravel()
                if node.op == "Conv":
                    plan.delete(w, 1, pos)
                elif node.op == "Gemm":
                    plan.delete(w, 1 if node.attrs.get("transB", 0) else 0, fpos)
                else:
                    plan.delete(w, 0, fpos)

    def _compensate(self, node: gs.Node, m: Member, B, beta, keep, drop, plan: _Plan, graph: gs.Graph) -> None:
        o = m.offset
        w = plan.get(node.inputs[1])
        if node.op == "Conv":
            wd = w[:, o + drop]
            w[:, o + keep] += np.einsum("rk,or...->ok...", B, wd)
            delta_b = np.einsum("r,or->o", beta, wd.reshape(w.shape[0], len(drop), -1).sum(-1))
        elif node.op == "Gemm" and node.attrs.get("transB", 0):
            n_out = w.shape[0]
            w3 = w.reshape(n_out, -1, m.block)  # a view: writes reach the plan's array
            wd = w3[:, o + drop]
            w3[:, o + keep] += np.einsum("rk,nrj->nkj", B, wd)
            delta_b = np.einsum("r,nrj->n", beta, wd)
        else:
            n_out = w.shape[1]
            w3 = w.reshape(-1, m.block, n_out)
            wd = w3[o + drop]
            w3[o + keep] += np.einsum("rk,rjn->kjn", B, wd)
            delta_b = np.einsum("r,rjn->n", beta, wd)
            if node.op == "MatMul":
                return  # no bias input to absorb the intercept
        n_out = w.shape[0] if node.op != "MatMul" and not (node.op == "Gemm" and not node.attrs.get("transB", 0)) else w.shape[1]
        if not np.any(delta_b):
            return
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = plan.get(node.inputs[2])
            if node.op == "Gemm":
                beta_attr = float(node.attrs.get("beta", 1.0))
                if b.size != n_out:  # a broadcast scalar bias: leave the intercept out
                    return
                b.reshape(-1)[:] += delta_b / (beta_attr if beta_attr else 1.0)
            else:
                b += delta_b
        else:
            from graphopt.rewrite import derived_name

            dt = node.inputs[1].dtype
            beta_attr = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
            if beta_attr == 0.0:
                return
            c = gs.Constant(derived_name(graph, node.inputs[1].name, "bias"), np.asarray(delta_b / beta_attr, dtype=dt))
            while len(node.inputs) < 2:
                node.inputs.append(gs.Variable.empty())
            if len(node.inputs) == 2:
                node.inputs.append(c)
            else:
                node.inputs[2] = c
            plan.get(c)
            plan.new_bias[id(c)] = c
            if id(node) in plan.prod_drop:  # the node's own output channels were pruned already
                plan.delete(c, 0, plan.prod_drop[id(node)])

    def _commit(self, plan: _Plan, nodes: list[gs.Node]) -> None:
        for k, arr in plan.values.items():
            for (ck, axis), pos in plan.deletes.items():
                if ck == k and pos:
                    arr = np.delete(arr, sorted(pos), axis=axis)
            set_constant(plan.consts[k], arr)
        for i, n_removed in plan.group_attr.items():
            nodes[i].attrs["group"] = int(nodes[i].attrs["group"]) - n_removed

    # -- run ----------------------------------------------------------------------------------------
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        ratio, target_flops = o.ratio, o.target_flops
        pre_notes: list[str] = []
        if o.target_latency is not None:
            ratio, target_flops = self._ratio_for_latency(graph, ctx, pre_notes), None
            if ratio is None:
                return PassResult(False, {"groups_pruned": 0}, [], pre_notes)
        check = BudgetCheck.for_ctx(ctx, graph) if o.backoff else None
        if check is None:
            res = self._prune(graph, ctx, ratio, target_flops)
            res.notes[:0] = pre_notes
            return res
        # budget back-off: prune a copy, check the user's budget, lower the ratio until it holds
        level = 1.0
        while True:
            trial = graph.copy()
            r, f = ratio * level, (None if target_flops is None else 1.0 - (1.0 - target_flops) * level)
            res = self._prune(trial, ctx, r, f)
            if not res.changed:
                if level < 1.0:
                    pre_notes.append(f"budget not reached: at ratio={r:.3g} nothing is left to prune; nothing pruned")
                return PassResult(False, res.stats, res.skipped, pre_notes + res.notes)
            ok, figure = check(ctx.to_model(trial))
            what = f"ratio={r:.3g}" if f is None else f"target-flops={f:.3g}"
            if ok:
                pre_notes.append(f"budget ({check.rule}) holds at {what}: {figure}")
                _adopt(graph, trial)
                res.notes[:0] = pre_notes
                res.stats["budget_backoffs"] = len([n for n in pre_notes if "fails at" in n])
                return res
            pre_notes.append(f"budget ({check.rule}) fails at {what}: {figure}; lowering")
            level *= 0.75
            if (r if f is None else 1.0 - f) * 0.75 < 0.02:
                pre_notes.append("budget not reached at any ratio >= 0.02: nothing pruned")
                return PassResult(False, {"groups_pruned": 0}, res.skipped, pre_notes)

    def _ratio_for_latency(self, graph: gs.Graph, ctx: PassContext, notes: list[str]) -> float | None:
        """The smallest global ratio (steps of 0.1) whose pruned model's measured onnxruntime latency
        (ORT_ENABLE_ALL, 1 thread, medians of interleaved rounds, graphopt.latency.compare) is at most
        ``target-latency`` of the original's; each step also times a second copy of the original, whose
        ratio is the noise.  Trials are pruned without recovery (it changes no shape, so no latency)."""
        import copy
        import dataclasses

        from graphopt import latency
        from graphopt.data import generate_feeds
        from graphopt.pass_base import PassContext as _Ctx

        o = self.options
        base = ctx.to_model(graph)
        feeds = next(iter(ctx.calibration_batches()), None) or (ctx.verify_feeds[0] if ctx.verify_feeds else None)
        if feeds is None:
            feeds = generate_feeds(base, seed=ctx.seed, input_shapes=ctx.input_shapes)[0]
        fast = copy.copy(self)
        fast.options = dataclasses.replace(o, target_latency=None, target_flops=None, recover=False, refit=False,
                                           criterion="l1", backoff=False)
        sub = _Ctx(opset=ctx.opset, input_shapes=ctx.input_shapes, seed=ctx.seed)  # trials spend no rewrite budget
        sub.model_template = ctx.model_template
        tried: list[tuple[float, float, float]] = []  # (ratio, latency ratio, control ratio)
        last_removed = None
        for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
            trial = graph.copy()
            res = fast._prune(trial, sub, r, None)
            if not res.changed or res.stats.get("channels_removed") == last_removed:
                continue  # nothing prunable, or the same widths as the previous step (round-to)
            last_removed = res.stats.get("channels_removed")
            t_a, t_c, t_p = latency.compare([base, base, sub.to_model(trial)], feeds, budget_seconds=1.5)
            tried.append((r, t_p / t_a, t_c / t_a))
            if t_p / t_a <= o.target_latency:
                break
        if not tried:
            notes.append(f"target-latency {o.target_latency}: no prunable group")
            return None
        fmt = ", ".join(f"{r:.1f}: {x:.3f}x (control {c:.3f})" for r, x, c in tried)
        r, x, c = tried[-1] if tried[-1][1] <= o.target_latency else min(tried, key=lambda t: t[1])
        reached = x <= o.target_latency
        notes.append(f"target-latency {o.target_latency}: measured onnxruntime latency (ORT_ENABLE_ALL, 1 thread, medians of "
                     f"interleaved rounds, batch {next(iter(feeds.values())).shape[0]}) vs the original per ratio: {fmt}; "
                     + (f"chose ratio={r:.1f} ({x:.3f}x)" if reached else f"target not reached: chose the fastest, ratio={r:.1f} ({x:.3f}x)"))
        return r

    def _prune(self, graph: gs.Graph, ctx: PassContext, ratio: float, target_flops: float | None) -> PassResult:
        o = self.options
        graph.toposort()
        infer_shapes(graph, ctx)
        groups = channel_groups(graph, ctx)
        nodes = list(graph.nodes)
        skipped: list[str] = []
        candidates: list[ChannelGroup] = []
        for g in groups:
            why = self._check(g, nodes, graph)
            if why is None:
                candidates.append(g)
            elif why not in ("not included",):
                label = next((nodes[m.node].name for m in g.of("producer")), f"group {g.id}")
                skipped.append(f"{label}: {why}")
        stats = {"groups": len(groups), "groups_prunable": len(candidates), "groups_pruned": 0,
                 "channels_before": sum(g.size for g in candidates), "channels_removed": 0}
        if not candidates or (ratio <= 0 and target_flops is None):
            return PassResult(False, stats, skipped)
        flops0, params0 = flops(graph), param_count(graph)
        original = ctx.to_model(graph) if ctx.has_calibration or ctx.eval_data is not None else None

        recover = o.recover and ctx.has_calibration
        want_stats = recover or o.criterion in ("act", "obs", "auto")
        grams = self._grams(graph, ctx, candidates, nodes) if want_stats and ctx.has_calibration else {}
        if not recover:
            grams_fit = {}
        else:
            grams_fit = grams
        notes: list[str] = []
        if o.recover and not ctx.has_calibration:
            notes.append("no calibration data: channels removed without re-fitting the consumers")
        scores = {g.id: self._scores(g, nodes, grams) for g in candidates}
        if target_flops is not None:
            ratios = self._allocate(graph, ctx, candidates, nodes, scores, grams_fit, flops0, notes, target_flops)
        else:
            ratios = {g.id: ratio for g in candidates}

        plan = _Plan({}, {}, {}, {}, {})
        pruned = 0
        removed = 0
        for g in candidates:
            keep_n = self._keep_count(g.size, ratios.get(g.id, 0.0))
            if keep_n >= g.size:
                continue
            if not ctx.allow_rewrite(f"prune {g.size - keep_n} of {g.size} channels in group {g.id}"):
                break
            keep, drop = self._select(g, nodes, scores[g.id], grams, keep_n)
            self._apply_group(g, nodes, keep, drop, plan, grams_fit, graph)
            pruned += 1
            removed += len(drop)
        if not pruned:
            return PassResult(False, stats, skipped, notes)
        refits = self._consumers_before(plan, nodes) if recover and o.refit else []
        self._commit(plan, nodes)
        _refresh_shapes(graph, ctx)
        if refits:
            n_refit = self._refit(graph, ctx, original, refits)
            stats["consumers_refitted"] = n_refit
        flops1, params1 = flops(graph), param_count(graph)
        stats.update({"groups_pruned": pruned, "channels_removed": removed, "flops_before": flops0, "flops_after": flops1,
                      "params_before": params0, "params_after": params1})
        notes.append(f"FLOPs {flops0:,} -> {flops1:,} ({flops1 / max(flops0, 1):.3f}x); params {params0:,} -> {params1:,} "
                     f"({params1 / max(params0, 1):.3f}x); {removed} of {stats['channels_before']} channels in {pruned} groups")
        if recover:
            notes.append(f"consumers re-fitted by least squares on calibration activations ({len(grams_fit)} tensors)")
        if original is not None:
            n2, _ = budget_notes(ctx, original, graph)
            notes.extend(n2)
        return PassResult(True, stats, skipped, notes)

    def _consumers_before(self, plan: _Plan, nodes: list[gs.Node]) -> list[tuple]:
        """(layer, W [out, features], effective bias, weight shape) of every consumer of a pruned
        channel, before the edits: the targets of the least-squares re-fit."""
        from .common import Layer

        out, seen = [], set()
        consumer_nodes = [n for n in nodes if id(n) in plan.consumer_ids]
        for node in consumer_nodes:
            if id(node) in seen:
                continue
            seen.add(id(node))
            kind = {"Conv": "conv", "Gemm": "gemm", "MatMul": "matmul"}[node.op]
            layer = Layer(node, node.inputs[1], kind)
            W = layer.matrix(np.asarray(node.inputs[1].values, np.float64))
            b = None
            if len(node.inputs) > 2 and node.inputs[2].name and kind != "matmul" and id(node.inputs[2]) not in plan.new_bias:
                b = np.asarray(node.inputs[2].values, np.float64).reshape(-1)
                if kind == "gemm":
                    b = b * float(node.attrs.get("beta", 1.0))
                if b.size != W.shape[0]:
                    b = np.full(W.shape[0], float(b.ravel()[0])) if b.size == 1 else None
            drop = plan.prod_drop.get(id(node))
            if drop is not None and len(drop):  # its own outputs were pruned too: match the kept ones
                W = np.delete(W, drop, axis=0)
                b = None if b is None else np.delete(b, drop)
            out.append((layer, W, b, tuple(node.inputs[1].shape)))
        return out

    def _refit(self, graph: gs.Graph, ctx: PassContext, original, refits: list[tuple]) -> int:
        """Re-fit each consumer (in graph order) so its outputs on the pruned model's calibration
        activations match the unpruned model's outputs."""
        from .reconstruct import refit_layer

        names = sorted({layer.node.inputs[0].name for layer, *_ in refits})
        orig = ctx.session(original, extra_outputs=names)
        n = 0
        order = {id(nd): i for i, nd in enumerate(graph.nodes)}
        for layer, W, b, kshape in sorted(refits, key=lambda r: order.get(id(r[0].node), 0)):
            if refit_layer(ctx, graph, layer, orig, W, b, kshape, ridge=self.options.refit_ridge, seed=ctx.seed):
                n += 1
        return n

    # -- target-flops: per-group ratios from measured sensitivity --------------------------------------
    def _allocate(self, graph, ctx, groups, nodes, scores, grams, flops0, notes, target_flops: float) -> dict[int, float]:
        """Greedy: repeatedly raise the ratio of the group whose next step costs the least output
        error per FLOP saved, until the FLOPs (computed exactly for the combination) reach the target.
        Error of a step = measured sensitivity (1 - output cosine with that group alone pruned at that
        ratio, on calibration data), or without calibration the share of the group's importance removed."""
        steps = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
        target = target_flops * flops0
        flops_of = self._flops_model(groups, nodes)
        removed_at = {g.id: [g.size - self._keep_count(g.size, r) for r in steps] for g in groups}
        feeds = [f for _, f in zip(range(2), ctx.calibration_batches())]
        refs = []
        if feeds:
            ref_runner = ctx.session(ctx.to_model(graph))
            refs = [ref_runner.run(f) for f in feeds]
        cost: dict[int, list[float]] = {}
        for g in groups:
            s_sorted = np.sort(scores[g.id])
            c = [0.0]
            for k in range(1, len(steps)):
                n_rm = removed_at[g.id][k]
                if n_rm == removed_at[g.id][k - 1]:
                    c.append(c[-1])
                elif feeds:
                    trial = _trial(self, graph, ctx, g, nodes, scores[g.id], g.size - n_rm, grams)
                    runner = ctx.session(ctx.to_model(trial))
                    cs = []
                    for f, ref in zip(feeds, refs):
                        out = runner.run(f)
                        for key in ref:
                            a, b = np.asarray(ref[key], np.float64).ravel(), np.asarray(out[key], np.float64).ravel()
                            cs.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
                    c.append(max(1.0 - min(cs), c[-1]))
                else:
                    c.append(float(s_sorted[:n_rm].sum() / max(s_sorted.sum(), 1e-30)))
            cost[g.id] = c
        level = {g.id: 0 for g in groups}
        current = flops_of({})
        while current > target:
            best, best_val, best_flops = None, None, None
            for g in groups:
                i = level[g.id]
                j = i + 1
                while j < len(steps) and removed_at[g.id][j] == removed_at[g.id][i]:
                    j += 1  # steps that round to the same width save nothing
                if j >= len(steps):
                    continue
                trial_level = dict(level)
                trial_level[g.id] = j
                f = flops_of({gid: removed_at[gid][lv] for gid, lv in trial_level.items()})
                dsave = current - f
                if dsave <= 0:
                    continue
                val = max(cost[g.id][j] - cost[g.id][i], 0.0) / dsave
                if best_val is None or val < best_val:
                    best, best_val, best_flops = (g.id, j), val, f
            if best is None:
                notes.append(f"target-flops {target_flops} not reachable with ratios up to {steps[-1]}")
                break
            level[best[0]] = best[1]
            current = best_flops
        ratios = {gid: steps[i] for gid, i in level.items()}
        notes.append(f"target-flops {target_flops}: per-group ratios from {'measured sensitivity' if feeds else 'weight-norm sensitivity'}: " + ", ".join(
            f"{nodes[g.of('producer')[0].node].name or g.id} -{removed_at[g.id][level[g.id]]}/{g.size}" for g in groups if level[g.id] > 0))
        return ratios

    @staticmethod
    def _flops_model(groups: list[ChannelGroup], nodes: list[gs.Node]):
        """FLOPs of the model as a function of {group id: channels removed} (exact for Conv / Gemm /
        MatMul: each node's MACs scale with its kept output and input shares)."""
        from graphopt.analysis import node_macs

        base = {i: node_macs(n) or 0 for i, n in enumerate(nodes)}
        out_of: dict[int, ChannelGroup] = {}
        ins: dict[int, list[tuple[ChannelGroup, int]]] = {}
        dw: dict[int, list[ChannelGroup]] = {}
        for g in groups:
            for m in g.members:
                if m.kind == "producer":
                    out_of[m.node] = g
                elif m.kind == "consumer":
                    ins.setdefault(m.node, []).append((g, m.block))
                elif m.kind == "dwconv":
                    dw.setdefault(m.node, []).append(g)

        def in_total(i: int) -> int:
            n = nodes[i]
            shp = n.inputs[1].shape
            if n.op == "Conv":
                return int(shp[1])
            if n.op == "Gemm":
                return int(shp[1] if n.attrs.get("transB", 0) else shp[0])
            return int(shp[0])

        totals = {i: in_total(i) for i in ins}

        def f(removed: dict[int, int]) -> float:
            total = 0.0
            for i, macs in base.items():
                if not macs:
                    continue
                frac = 1.0
                if i in out_of:
                    frac *= 1 - removed.get(out_of[i].id, 0) / out_of[i].size
                if i in ins:
                    frac *= 1 - sum(removed.get(g.id, 0) * blk for g, blk in ins[i]) / max(totals[i], 1)
                if i in dw:
                    frac *= 1 - sum(removed.get(g.id, 0) for g in dw[i]) / max(int(nodes[i].inputs[1].shape[0]), 1)
                total += 2 * macs * frac
            return total

        return f


def _trial(p: PruneChannels, graph: gs.Graph, ctx: PassContext, g: ChannelGroup, nodes, score, keep_n, grams) -> gs.Graph:
    """A copy of ``graph`` with only group ``g`` pruned (for sensitivity measurements)."""
    copy = graph.copy()
    cnodes = list(copy.nodes)
    keep, drop = p._select(g, nodes, score, grams, keep_n)
    # graph.copy() copies tensors, so members index the copy's nodes identically
    plan = _Plan({}, {}, {}, {}, {})
    p._apply_group(g, cnodes, keep, drop, plan, grams, copy)
    # constants of the copy are distinct objects: commit into them
    p._commit(plan, cnodes)
    _refresh_shapes(copy, None)
    return copy


def _refresh_shapes(graph: gs.Graph, ctx) -> None:
    """Shapes changed along the pruned channels: drop the stale ones and infer again."""
    outs = {id(t) for t in graph.outputs} | {id(t) for t in graph.inputs}
    for t in ir.tensor_map(graph).values():
        if isinstance(t, gs.Variable) and id(t) not in outs:
            t.shape = None
    if ctx is not None:
        ctx.cache.pop("shapes_inferred", None)
    infer_shapes(graph, ctx)
