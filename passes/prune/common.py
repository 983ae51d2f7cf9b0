"""Shared helpers of the pruning passes: layer discovery, name filters, calibration streams, reports.

Not a pass (no pipeline name): ``prune-magnitude``, ``prune-nm`` and ``prune-channels`` build on it.
"""
from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.analysis import flops, param_count
from graphopt.rewrite import weight_used_only_by

UNSTRUCTURED_NOTE = (
    "unstructured sparsity shrinks the compressed (zip/gzip) file, not the latency: dense kernels "
    "multiply the zeros just as fast as any other value"
)


def matches(patterns: Iterable[str], *names: str) -> bool:
    """True if any of ``names`` (node or weight names) matches any glob pattern."""
    pats = [p for p in patterns if p]
    return any(fnmatch.fnmatchcase(n, p) or p == n for p in pats for n in names if n)


@dataclass
class Layer:
    """A Conv / Gemm / MatMul with a constant weight we may rewrite.

    ``rows`` / ``cols``: the weight viewed as [outputs, reduction features] (see :meth:`matrix`).
    """

    node: gs.Node
    weight: gs.Constant
    kind: str  # conv | gemm | matmul

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name

    def matrix(self, w: np.ndarray | None = None) -> np.ndarray:
        """The weight as [out, in] (Conv: [O, C/g*kh*kw]; Gemm transB=0 and MatMul: transposed)."""
        w = np.asarray(self.weight.values) if w is None else w
        if self.kind == "conv":
            return w.reshape(w.shape[0], -1)
        if self.kind == "gemm" and self.node.attrs.get("transB", 0):
            return w
        return w.T

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        shape = tuple(self.weight.shape)
        if self.kind == "conv":
            return m.reshape(shape)
        if self.kind == "gemm" and self.node.attrs.get("transB", 0):
            return m
        return np.ascontiguousarray(m.T)


def find_layers(graph: gs.Graph, exclude: Iterable[str] = (), skipped: list[str] | None = None) -> list[Layer]:
    """Prunable layers in topological order; refusals go to ``skipped`` as "node: reason"."""
    out = []
    skipped = skipped if skipped is not None else []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        label = node.name or node.op
        if not isinstance(w, gs.Constant):
            skipped.append(f"{label}: weight is not an initializer")
            continue
        if w.dtype is None or np.dtype(w.dtype).kind != "f":
            skipped.append(f"{label}: weight is not floating point")
            continue
        if node.op == "MatMul" and len(w.shape) != 2:
            skipped.append(f"{label}: MatMul weight is not 2-D")
            continue
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            skipped.append(f"{label}: Gemm with transA")
            continue
        if not weight_used_only_by(w, [node]):
            skipped.append(f"{label}: weight {w.name} is shared with other nodes")
            continue
        if matches(exclude, node.name, w.name):
            skipped.append(f"{label}: excluded")
            continue
        out.append(Layer(node, w, {"Conv": "conv", "Gemm": "gemm", "MatMul": "matmul"}[node.op]))
    return out


def calibration_activations(ctx, graph: gs.Graph, names: list[str], *, model=None) -> Iterator[dict[str, np.ndarray]]:
    """Stream {tensor: activation} per calibration batch, one batch alive at a time."""
    model = model if model is not None else ctx.to_model(graph)
    runner = ctx.session(model, extra_outputs=list(names))
    for feeds in ctx.calibration_batches():
        yield runner.run(feeds, list(names))


def compressed_size(model) -> int:
    """zlib (gzip/zip deflate, level 6) size of the serialized model, or of its weights past 2 GB."""
    try:
        if ir.approx_size(model) < 2**31 - 2**26:
            return len(zlib.compress(model.SerializeToString(), 6))
    except Exception:
        pass
    c = zlib.compressobj(6)
    n = 0
    for t in model.graph.initializer:
        n += len(c.compress(t.raw_data))
    return n + len(c.flush())


def size_stats(graph: gs.Graph) -> dict[str, int]:
    return {"flops": flops(graph), "params": param_count(graph), "params_nonzero": param_count(graph, nonzero=True)}


def set_constant(const: gs.Constant, values: np.ndarray) -> None:
    """Replace a weight's values in place (dtype kept)."""
    const.values = np.ascontiguousarray(values.astype(const.dtype if const.dtype is not None else values.dtype))


def budget_notes(ctx, original_model, graph: gs.Graph) -> tuple[list[str], dict[str, float]]:
    """Accuracy / agreement of the pruned graph against the original, for the report.

    With labelled eval data: top-1 of both; otherwise cosine and top-1 agreement on up to 4
    calibration batches.  The pipeline's own verification enforces the budget; this just states it.
    """
    from graphopt.verify import accuracy, budget_reference

    notes: list[str] = []
    figs: dict[str, float] = {}
    pruned = ctx.to_model(graph)
    original_model = budget_reference(ctx, original_model)  # the pipeline's original: one budget
    if ctx.eval_data is not None:
        a0 = accuracy(original_model, ctx.eval_data)
        a1 = accuracy(pruned, ctx.eval_data)
        figs.update({"top1_before": a0, "top1_after": a1})
        notes.append(f"eval top-1 {a0:.4f} -> {a1:.4f} (drop {a0 - a1:+.4f})")
    feeds = [f for _, f in zip(range(4), ctx.calibration_batches())] or list(ctx.verify_feeds)
    if feeds:
        r0, r1 = ctx.session(original_model), ctx.session(pruned)
        cos, agree = [], []
        for f in feeds:
            o0, o1 = r0.run(f), r1.run(f)
            for k in o0:
                a, b = np.asarray(o0[k], np.float64).ravel(), np.asarray(o1[k], np.float64).ravel()
                if a.size and np.issubdtype(a.dtype, np.floating):
                    cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
                x0, x1 = np.asarray(o0[k]), np.asarray(o1[k])
                if x0.ndim == 2 and x0.shape[-1] > 1:
                    agree.append(float((x0.argmax(-1) == x1.argmax(-1)).mean()))
        if cos:
            figs["cosine_min"] = min(cos)
            notes.append(f"output cosine vs the original on {len(feeds)} batch(es): min {min(cos):.5f}")
        if agree:
            figs["top1_agreement"] = float(np.mean(agree))
            notes.append(f"top-1 agreement with the original: {np.mean(agree):.4f}")
    return notes, figs


def adopt_graph(graph: gs.Graph, other: gs.Graph) -> None:
    """Make ``graph`` (the pass's graph, edited in place) the result ``other`` computed on a copy."""
    graph.nodes = other.nodes
    graph.inputs = other.inputs
    graph.outputs = other.outputs


class BudgetCheck:
    """The user's budget (``--max-accuracy-drop`` with ``--eval``, ``--min-cosine``) applied inside a
    pruning pass, with the verifier's own rule, against the pipeline's original model and on the
    verification inputs (the user's, else the first 4 calibration batches, as the final check)."""

    def __init__(self, ctx, reference, feeds):
        from graphopt.verify import Runner

        self.ctx, self.reference, self.feeds = ctx, reference, feeds
        r = Runner(reference)
        self.ref = [r.run(f) for f in feeds]
        self.rule = ctx.budget.describe(with_accuracy=ctx.eval_data is not None)

    @classmethod
    def for_ctx(cls, ctx, graph: gs.Graph) -> "BudgetCheck | None":
        """None unless the user set a budget this pass can check (and there are inputs to check on)."""
        from graphopt.verify import budget_reference

        b = ctx.budget
        if not ((b.max_accuracy_drop is not None and ctx.eval_data is not None) or b.min_cosine is not None
                or b.min_top1_agreement is not None):
            return None
        feeds = list(ctx.verify_feeds) or [f for _, f in zip(range(4), ctx.calibration_batches())]
        if not feeds:
            from graphopt.data import generate_feeds

            try:
                feeds = generate_feeds(ctx.to_model(graph), seed=ctx.seed, input_shapes=ctx.input_shapes)
            except Exception:
                return None
        return cls(ctx, budget_reference(ctx, ctx.to_model(graph)), feeds)

    def __call__(self, model) -> tuple[bool, str]:
        from graphopt.verify import verify_models

        v = verify_models(self.reference, model, self.feeds, exact=False, budget=self.ctx.budget,
                          eval_data=self.ctx.eval_data, reference_outputs=self.ref)
        return v.status == "passed", v.figures()
