"""``infer-shapes``: onnx shape inference (strict off, data propagation on) written onto the IR.

Symbolic dims stay symbolic; the model's declared inputs and outputs keep their declared types and
shapes (only ``--input-shape`` fixes input dims).  Other passes that need shapes ask for them through
``passes._common.ensure_shapes`` (cached per graph generation), so this pass is only needed to get
value_info into the saved model or to refresh shapes before a plugin pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, ir, register_pass

from .. import _common as C


def _snapshot(graph: gs.Graph) -> list[tuple]:
    return [(id(t), str(t.dtype), None if t.shape is None else tuple(t.shape))
            for g in C.all_graphs(graph) for t in ir.tensor_map(g).values() if isinstance(t, gs.Variable)]


@register_pass
class InferShapes(Pass):
    name = "infer-shapes"
    description = "onnx shape inference onto the IR (symbolic dims kept; model inputs/outputs untouched)"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.rewrite_limit is not None and ctx.rewrites >= ctx.rewrite_limit:
            return PassResult(False, {"tensors_updated": 0}, ["rewrite limit reached"])
        before = _snapshot(graph)
        ctx.cache.pop("shapes_inferred", None)  # asked for explicitly: infer again
        C.ensure_shapes(graph, ctx)
        after = _snapshot(graph)
        changed = before != after
        n = sum(1 for a, b in zip(before, after) if a != b) if len(before) == len(after) else len(after)
        if changed:
            ctx.allow_rewrite("infer shapes")  # counted as one rewrite (the budget was checked above)
        return PassResult(changed, {"tensors_updated": n})
