"""``prune-magnitude``: unstructured sparsity of Conv / Gemm / MatMul weights.

``scope=layer`` gives every layer the same ``sparsity``; ``scope=global`` ranks all weights by magnitude
together, so each layer gets the share of weights below one global threshold.  With calibration data
each layer is then re-pruned to its share by layer-wise reconstruction (:mod:`.reconstruct`: OBS /
SparseGPT-like mask choice and weight updates, bias correction); without, the smallest weights are zeroed.

Unstructured zeros make the *compressed* file smaller (zip / gzip), not the model faster: dense kernels
multiply zeros as fast as anything else.  The report gives sparsity, nonzero parameters and the
compressed size before and after, and says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass
from graphopt.errors import PipelineError
from graphopt.shapes import infer_shapes

from .common import UNSTRUCTURED_NOTE, BudgetCheck, adopt_graph, budget_notes, compressed_size, find_layers, size_stats
from .reconstruct import Target, sparsify_graph


def layer_sparsity(layers, sparsity: float, scope: str) -> list[float]:
    """Per-layer shares: all equal (``layer``) or from one global magnitude threshold (``global``)."""
    if scope == "layer" or not layers:
        return [sparsity] * len(layers)
    mags = np.concatenate([np.abs(np.asarray(l.weight.values, np.float32)).ravel() for l in layers])
    k = int(round(mags.size * sparsity))
    if k == 0:
        return [0.0] * len(layers)
    thr = np.partition(mags, k - 1)[k - 1]
    out = []
    for l in layers:
        w = np.abs(np.asarray(l.weight.values, np.float32))
        out.append(float((w <= thr).sum()) / w.size)
    # ties at the threshold can overshoot a little: scale back to the exact global count
    total = sum(s * int(np.prod(l.weight.shape)) for s, l in zip(out, layers))
    if total > k:
        out = [s * k / total for s in out]
    return out


def _measured_latency(ctx: PassContext, dense, sparse) -> tuple[float, float] | None:
    """(sparse / dense, control / dense) medians: the report states the latency, not only that it is unchanged."""
    from graphopt import latency
    from graphopt.data import generate_feeds

    try:
        feeds = next(iter(ctx.calibration_batches()), None) or (ctx.verify_feeds[0] if ctx.verify_feeds else None)
        if feeds is None:
            feeds = generate_feeds(dense, seed=ctx.seed, input_shapes=ctx.input_shapes)[0]
        t_dense, t_sparse, t_control = latency.compare([dense, sparse, dense], feeds, budget_seconds=1.0)
    except Exception:  # a measurement is a report figure, never a reason to fail the pass
        return None
    return t_sparse / t_dense, t_control / t_dense


def run_unstructured(graph: gs.Graph, ctx: PassContext, targets: list[Target], skipped: list[str], stats: dict) -> PassResult:
    if not targets:
        return PassResult(False, stats, skipped)
    graph.toposort()
    infer_shapes(graph, ctx)
    before = size_stats(graph)
    model0 = ctx.to_model(graph)
    zip0 = compressed_size(model0)
    notes: list[str] = []
    done = sparsify_graph(graph, ctx, targets, notes, skipped)
    if not done:
        return PassResult(False, stats, skipped, notes)
    after = size_stats(graph)
    zip1 = compressed_size(ctx.to_model(graph))
    pruned_params = sum(int(np.prod(t.layer.weight.shape)) for t in targets[:done])
    pruned_nz = sum(int(np.count_nonzero(t.layer.weight.values)) for t in targets[:done])
    sparsity = 1.0 - pruned_nz / max(pruned_params, 1)
    stats.update({"layers_pruned": done, "params": after["params"], "params_nonzero_before": before["params_nonzero"],
                  "params_nonzero_after": after["params_nonzero"], "sparsity_permille": int(round(1000 * sparsity)),
                  "flops_before": before["flops"], "flops_after": after["flops"],
                  "compressed_bytes_before": zip0, "compressed_bytes_after": zip1})
    notes.append(f"sparsity {sparsity:.3f} over {done} layers ({pruned_params:,} weights); nonzero params "
                 f"{before['params_nonzero']:,} -> {after['params_nonzero']:,} of {after['params']:,}")
    notes.append(f"compressed (zlib/gzip) size {zip0:,} -> {zip1:,} bytes ({zip1 / max(zip0, 1):.3f}x); "
                 f"dense FLOPs unchanged ({after['flops']:,}); {UNSTRUCTURED_NOTE}")
    lat = _measured_latency(ctx, model0, ctx.to_model(graph))
    if lat is not None:
        ratio, control = lat
        stats["latency_ratio_permille"] = int(round(1000 * ratio))
        notes.append(f"latency (onnxruntime ORT_ENABLE_ALL, 1 thread, interleaved medians): {ratio:.3f}x of the dense "
                     f"model; an identical dense copy measured {control:.3f}x (the noise)")
    notes.append("layer-wise OBS reconstruction on calibration data" if ctx.has_calibration
                 else "no calibration data: plain magnitude pruning, no reconstruction")
    if ctx.has_calibration or ctx.eval_data is not None:
        n2, _ = budget_notes(ctx, model0, graph)
        notes.extend(n2)
    return PassResult(True, stats, skipped, notes)


@register_pass
class PruneMagnitude(Pass):
    name = "prune-magnitude"
    exact = False
    description = "unstructured weight sparsity (per layer or global), OBS reconstruction from calibration data"

    @dataclass(frozen=True)
    class Options:
        sparsity: float = 0.5
        scope: Literal["layer", "global"] = "layer"
        exclude: tuple[str, ...] = ()
        min_size: int = 0  # layers with fewer weights are left dense
        backoff: bool = True  # with a user budget: lower the sparsity (steps of 0.1) until the budget holds

    def __init__(self, **options):
        super().__init__(**options)
        if not 0.0 <= self.options.sparsity < 1.0:
            raise PipelineError(f"prune-magnitude: sparsity must be in [0, 1), got {self.options.sparsity}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        check = BudgetCheck.for_ctx(ctx, graph) if o.backoff and o.sparsity > 0 else None
        if check is None:
            return self._prune(graph, ctx, o.sparsity)
        # budget back-off: sparsify a copy, check the user's budget, lower the sparsity until it holds
        notes: list[str] = []
        sparsity, fails = o.sparsity, 0
        while sparsity > 1e-6:
            trial = graph.copy()
            res = self._prune(trial, ctx, sparsity)
            if not res.changed:
                if fails:
                    notes.append(f"budget not reached: at sparsity={sparsity:.3g} nothing is left to prune; nothing pruned")
                return PassResult(False, res.stats, res.skipped, notes + res.notes)
            ok, figure = check(ctx.to_model(trial))
            if ok:
                notes.append(f"budget ({check.rule}) holds at sparsity={sparsity:.3g}: {figure}")
                adopt_graph(graph, trial)
                res.stats["budget_backoffs"] = fails
                res.notes[:0] = notes
                return res
            notes.append(f"budget ({check.rule}) fails at sparsity={sparsity:.3g}: {figure}; lowering")
            fails += 1
            sparsity = round(sparsity - 0.1, 6)
        notes.append("budget not reached at any sparsity >= 0.1: nothing pruned")
        return PassResult(False, {"budget_backoffs": fails}, [], notes)

    def _prune(self, graph: gs.Graph, ctx: PassContext, sparsity: float) -> PassResult:
        o = self.options
        skipped: list[str] = []
        graph.toposort()
        layers = [l for l in find_layers(graph, o.exclude, skipped) if int(np.prod(l.weight.shape)) >= o.min_size]
        stats = {"layers": len(layers)}
        if sparsity <= 0 or not layers:
            return PassResult(False, stats, skipped)
        # idempotence: a layer already at (or above) its target is left as it is
        shares = layer_sparsity(layers, sparsity, o.scope)
        targets = []
        for l, s in zip(layers, shares):
            w = np.asarray(l.weight.values)
            have = 1.0 - np.count_nonzero(w) / max(w.size, 1)
            if s <= 0 or have >= s - 0.5 / max(w.size, 1):
                continue
            targets.append(Target(l, sparsity=s))
        if o.scope == "global":
            stats["global_threshold_layers"] = len(targets)
        return run_unstructured(graph, ctx, targets, skipped, stats)
