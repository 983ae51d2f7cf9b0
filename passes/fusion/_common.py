"""Shared machinery of the -O2 fusions: a match / check / rewrite driver and small pattern helpers.

Every fusion is a :class:`FusionPass`: ``match(node)`` looks at op types, attributes and tensor objects
(never names) and returns a :class:`Match` or None; ``check(m)`` returns a refusal reason (a string
that goes into the report) or None; ``rewrite(m)`` applies the change.  The driver counts ``matched``
and ``rewritten``, asks ``ctx.allow_rewrite`` before each rewrite and runs a ``cleanup`` at the end.

Fusions work on the main graph; nodes inside ``If``/``Loop``/``Scan`` bodies are not matched (a tensor
read inside a body counts as a use outside the match, so such matches are refused).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult
from graphopt.rewrite import const_value, derived_name, is_graph_output, name_index, producer, weight_used_only_by

FLOAT_TYPES = (np.float16, np.float32, np.float64)


@lru_cache(maxsize=None)
def op_since(op: str, opset: int, domain: str = "") -> int | None:
    """The opset version that introduced ``op`` as seen from ``opset``, or None if it does not exist."""
    try:
        return onnx.defs.get_schema(op, opset, domain).since_version
    except Exception:
        return None


def model_opset(graph: gs.Graph, ctx: PassContext) -> int:
    return int(ctx.opset or graph.opset or 0)


def opset_reason(op: str, graph: gs.Graph, ctx: PassContext) -> str | None:
    """A refusal reason if the model's opset has no standard ``op``."""
    opset = model_opset(graph, ctx)
    if op_since(op, opset) is None:
        first = _first_opset(op)
        when = f"opset {first}" if first else "no opset"
        return f"{op} needs {when}; the model imports opset {opset}"
    return None


@lru_cache(maxsize=None)
def _first_opset(op: str) -> int | None:
    for v in range(1, onnx.defs.onnx_opset_version() + 1):
        if op_since(op, v) is not None:
            return v
    return None


# ------------------------------------------------------------------------------------------------
# Tensor / node predicates
# ------------------------------------------------------------------------------------------------


def uses(t: gs.Tensor) -> int:
    """How many node inputs read ``t`` (a node reading it twice counts twice)."""
    return sum(sum(1 for i in n.inputs if i is t) for n in t.outputs)


def only_feeds(graph: gs.Graph, t: gs.Tensor, nodes: list[gs.Node]) -> bool:
    """``t`` is an intermediate of the match: not a graph output and read only by ``nodes``."""
    return not is_graph_output(graph, t) and bool(t.outputs) and weight_used_only_by(t, nodes)


def sole_consumer(t: gs.Tensor, op: str | tuple[str, ...] | None = None) -> gs.Node | None:
    """The one node reading ``t`` (optionally of type ``op``), else None."""
    if len(t.outputs) != 1:
        return None
    n = t.outputs[0]
    if op is not None and n.op not in ((op,) if isinstance(op, str) else op):
        return None
    return n


def prod(t: gs.Tensor | None, op: str | tuple[str, ...]) -> gs.Node | None:
    """The producer of ``t`` if it is a standard-domain node of type ``op``."""
    if t is None:
        return None
    p = producer(t)
    ops = (op,) if isinstance(op, str) else op
    if p is None or p.op not in ops or not is_std(p):
        return None
    return p


def is_std(node: gs.Node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def present(node: gs.Node, i: int) -> gs.Tensor | None:
    """Input ``i`` of ``node`` if given (not absent and not the empty-name placeholder)."""
    if i >= len(node.inputs):
        return None
    t = node.inputs[i]
    if isinstance(t, gs.Variable) and t.is_empty():
        return None
    return t


def scalar(t: gs.Tensor | None) -> float | None:
    """The value of a one-element constant, else None."""
    v = const_value(t)
    if v is None or v.size != 1 or v.dtype.kind not in "fiu":
        return None
    return float(v.reshape(-1)[0])


def is_scalar(t: gs.Tensor | None, value: float, rtol: float = 1e-4) -> bool:
    s = scalar(t)
    return s is not None and abs(s - value) <= rtol * max(abs(value), 1e-6)


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """For a binary node reading ``t`` on one side, the other input."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is t:
        return b
    if b is t:
        return a
    return None


def rank_of(t: gs.Tensor) -> int | None:
    if isinstance(t, gs.Constant):
        return len(t.shape)
    return len(t.shape) if t.shape is not None else None


def static_shape(t: gs.Tensor) -> list[int] | None:
    shape = list(t.shape) if t.shape is not None else None
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return shape


def new_const(graph: gs.Graph, base: str, suffix: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(derived_name(graph, base, suffix), np.array(value, order="C"))  # keeps 0-d arrays 0-d


def new_var(graph: gs.Graph, base: str, suffix: str, like: gs.Tensor | None = None) -> gs.Variable:
    return gs.Variable(derived_name(graph, base, suffix), dtype=like.dtype if like is not None else None)


def remove_nodes(nodes) -> None:
    """Detach matched nodes from the graph (cleanup drops them)."""
    for n in nodes:
        n.inputs.clear()
        n.outputs.clear()


def float_dtype_reason(*tensors: gs.Tensor) -> str | None:
    """A refusal reason unless the tensors with a known dtype (at least one) share one float dtype."""
    dts = {np.dtype(t.dtype) for t in tensors if t is not None and t.dtype is not None}
    if not dts:
        return "dtypes are unknown (shape inference could not type the tensors)"
    if len(dts) > 1:
        return "dtypes disagree (" + ", ".join(sorted(str(d) for d in dts)) + ")"
    if dts and next(iter(dts)).type not in FLOAT_TYPES:
        return f"dtype {next(iter(dts))} is not a float type"
    return None


def private_weight_reason(t: gs.Tensor | None, nodes: list[gs.Node], what: str) -> str | None:
    """A refusal reason unless ``t`` is a constant read only by ``nodes``."""
    if t is None:
        return None
    if const_value(t) is None:
        return f"{what} is not a constant (graph input or computed)"
    if not weight_used_only_by(t, nodes):
        return f"{what} is shared with nodes outside the match"
    return None


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


@dataclass
class Match:
    """One occurrence of a pattern: the anchor node (named in the report), all matched nodes, data."""

    anchor: gs.Node
    nodes: list[gs.Node]
    data: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, k: str) -> Any:
        return self.data[k]


class FusionPass(Pass):
    """Base of the pattern fusions: subclasses implement ``match`` / ``check`` / ``rewrite``."""

    anchor_ops: tuple[str, ...] = ()  # op types a match can start from (the driver filters on them)
    # run shape inference before matching (cached per graph generation): dtype checks need it, as
    # exporters rarely write value_info for intermediate tensors
    needs_shapes: bool = True

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        raise NotImplementedError

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        return None

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        raise NotImplementedError

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"matched": 0, "rewritten": 0}
        skipped: list[str] = []
        if self.needs_shapes:
            from graphopt.shapes import infer_shapes

            infer_shapes(graph, ctx)
        gs_toposort(graph, ctx)

        def check(g: gs.Graph, m: Match) -> str | None:
            reason = self.check(m, g, ctx)
            return f"{m.anchor.name or m.anchor.op}: {reason}" if reason else reason

        # Matching always looks at the current graph: nodes removed by an earlier rewrite have no outputs
        # and are skipped, nodes a rewrite kept (a Conv that absorbed a BN) may match again (chains).
        fuse_each(
            graph, ctx, list(graph.nodes), stats, skipped,
            match=lambda g, node: (self.match(node, g, ctx), None),
            check=check,
            rewrite=lambda g, m: self.rewrite(m, g, ctx),
            describe=lambda node, m: f"{self.name} at {m.anchor.name or m.anchor.op}",
            alive=lambda node: bool(node.outputs) and node.op in self.anchor_ops and is_std(node),
        )
        return finish_fusions(graph, stats, skipped)


def gs_toposort(graph: gs.Graph, ctx: PassContext) -> None:
    """onnx-graphsurgeon's topological order (by depth), in which the fusions visit candidates; skipped
    when the graph is in it already: sorted so by an earlier fusion and unchanged since (the pass
    manager clears ``ctx.cache`` after every change).  gs sorts even a sorted graph (5 ms for bert_mini
    at -O2, nineteen fusion passes) and leaves the order of its own output as it is."""
    if ctx.cache.get("gs_sorted") is not graph:
        graph.toposort()
        ctx.cache["gs_sorted"] = graph


def node_alive(n: gs.Node) -> bool:
    """A candidate node not taken by an earlier rewrite (rewrites detach the nodes they remove)."""
    return bool(n.inputs) and bool(n.outputs)


def tensor_alive(t: gs.Tensor) -> bool:
    """A candidate tensor whose producer was not taken by an earlier rewrite."""
    return bool(t.inputs)


def fuse_each(graph: gs.Graph, ctx: PassContext, candidates: Iterable, stats: dict[str, int], skipped: list[str], *,
              match: Callable, check: Callable, rewrite: Callable, describe: Callable,
              alive: Callable | None = None) -> None:
    """The match / check / rewrite loop shared by every fusion (-O2 :class:`FusionPass` and -O3 ort fusions).

    For each candidate still ``alive``: ``match(graph, c)`` returns ``(m, reason)`` -- ``(None, None)``
    means no match, a ``reason`` means matched but refused.  A match counts in ``stats["matched"]``;
    ``check(graph, m)`` gives a refusal reason (appended to ``skipped`` as is), otherwise
    ``ctx.allow_rewrite(describe(c, m))`` is asked (a refusal stops the loop) and ``rewrite(graph, m)``
    applied, counted in ``stats["rewritten"]``.
    """
    with name_index(graph):  # (a rewrite names what it adds with derived_name)
        for c in candidates:
            if alive is not None and not alive(c):
                continue
            m, reason = match(graph, c)
            if m is None and reason is None:
                continue
            stats["matched"] += 1
            reason = reason or check(graph, m)
            if reason:
                skipped.append(reason)
                continue
            if not ctx.allow_rewrite(describe(c, m)):
                break
            rewrite(graph, m)
            stats["rewritten"] += 1


def run_fusion(graph: gs.Graph, ctx: PassContext, candidates: list, stats: dict[str, int], **loop) -> PassResult:
    """A whole -O3 onnxruntime fusion pass: nothing to do without candidates (no shape inference either),
    else infer shapes and run :func:`fuse_each` (``loop`` is its keyword arguments) and :func:`finish_fusions`."""
    skipped: list[str] = []
    if not candidates:
        return PassResult(False, stats)
    from graphopt.shapes import infer_shapes

    infer_shapes(graph, ctx)
    fuse_each(graph, ctx, candidates, stats, skipped, **loop)
    return finish_fusions(graph, stats, skipped)


def finish_fusions(graph: gs.Graph, stats: dict[str, int], skipped: list[str]) -> PassResult:
    """Drop the detached nodes and re-sort if anything was rewritten; the pass result."""
    changed = stats["rewritten"] > 0
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return PassResult(changed, stats, skipped)


# ------------------------------------------------------------------------------------------------
# Conv helpers (shared by fuse-conv-bn and fuse-conv-scale)
# ------------------------------------------------------------------------------------------------


def conv_weight_check(graph: gs.Graph, conv: gs.Node, reader: gs.Node) -> tuple[np.ndarray | None, str | None]:
    """The checks every Conv-folding fusion makes before rewriting the Conv's weight: its output feeds only
    ``reader``, weight and bias are private constants, the weight has a channel layout. Returns (W, None)
    or (None, reason)."""
    if not only_feeds(graph, conv.outputs[0], [reader]):
        return None, f"{conv.op} output is a graph output or read by other nodes"
    w_t, b_t = present(conv, 1), present(conv, 2)
    r = private_weight_reason(w_t, [conv], f"{conv.op} weight") or private_weight_reason(b_t, [conv], f"{conv.op} bias")
    if r:
        return None, r
    w = const_value(w_t)
    if w.ndim < 3:
        return None, f"{conv.op} weight has rank {w.ndim}"
    return w, None


def conv_out_channels(conv: gs.Node, w: np.ndarray) -> int:
    """Output channels of a Conv (W is [M, C/g, k...]) or ConvTranspose (W is [C, M/g, k...])."""
    if conv.op == "ConvTranspose":
        return int(w.shape[1]) * int(conv.attrs.get("group", 1))
    return int(w.shape[0])


def scale_conv_weight(conv: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W scaled so that output channel ``o`` is multiplied by ``s[o]`` (computed in float64)."""
    w64 = w.astype(np.float64)
    if conv.op == "ConvTranspose":
        g = int(conv.attrs.get("group", 1))
        c, mg = w.shape[0], w.shape[1]
        ws = w64.reshape((g, c // g, mg) + w.shape[2:]) * s.reshape((g, 1, mg) + (1,) * (w.ndim - 2))
        return ws.reshape(w.shape)
    return w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))


def product_leaves(t: gs.Tensor, graph: gs.Graph, keep: set[int], max_nodes: int = 3) -> tuple[list[gs.Tensor], list[gs.Node]] | None:
    """Flatten the Mul tree producing ``t`` into its factors.

    Interior Mul outputs must be read only once (inside the tree) and not be graph outputs; tensors
    whose id is in ``keep`` are never expanded (they are the pattern's own leaves).  Returns (leaves,
    Mul nodes) or None if more than ``max_nodes`` Mul nodes would be needed.
    """
    leaves: list[gs.Tensor] = []
    nodes: list[gs.Node] = []

    def walk(x: gs.Tensor, top: bool) -> bool:
        p = prod(x, "Mul")
        expand = p is not None and id(x) not in keep and (top or (uses(x) == 1 and not is_graph_output(graph, x)))
        if not expand:
            leaves.append(x)
            return True
        nodes.append(p)
        if len(nodes) > max_nodes:
            return False
        return walk(p.inputs[0], False) and walk(p.inputs[1], False)

    if not walk(t, True):
        return None
    return leaves, nodes


def mul_chain_from(start: gs.Tensor, graph: gs.Graph, want, keep: set[int], steps: int = 2):
    """Follow single Mul consumers from ``start`` (up to ``steps``); at each step flatten the Mul tree
    and return (top Mul node, leaves, nodes) for the first tree whose leaves satisfy ``want``."""
    t = start
    for _ in range(steps):
        n = sole_consumer(t, "Mul")
        if n is None:
            return None
        r = product_leaves(n.outputs[0], graph, keep)
        if r is not None and want(r[0]):
            return n, r[0], r[1]
        t = n.outputs[0]
    return None
