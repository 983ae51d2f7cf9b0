"""``fuse-matmul-add``: MatMul followed by Add of a bias -> Gemm, only where that is a net win.

    Add(MatMul(A, B), C)  ->  Gemm(A, B, C)
    Add(Gemm(A, B), C)    ->  Gemm(A, B, C)       (a Gemm without bias)

Only when A and B are 2-D (Gemm is 2-D; wrapping a 3-D MatMul in Reshapes costs more than it saves)
and C is unidirectionally broadcastable to the [M, N] product without changing its shape.  Refuses
otherwise, and when the MatMul output is a graph output or read by other nodes, or dtypes are not a
shared float type.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass

from ._common import FusionPass, Match, float_dtype_reason, only_feeds, other_input, prod, rank_of, remove_nodes


def broadcasts_to(shape: list, mn: list) -> bool:
    """Gemm's C must broadcast (unidirectionally) to [M, N]."""
    if shape is None or len(shape) > 2:
        return False
    s = [1] * (2 - len(shape)) + list(shape)
    for d, full in zip(s, mn):
        if d == 1:
            continue
        if not isinstance(d, int) or not isinstance(full, int) or d != full:
            if not (isinstance(d, str) and d == full):
                return False
    return True


@register_pass
class FuseMatMulAdd(FusionPass):
    name = "fuse-matmul-add"
    description = "MatMul (or bias-less Gemm) + bias Add -> Gemm where both operands are 2-D (no Reshapes added)"
    anchor_ops = ("Add",)

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        for t in node.inputs:
            mm = prod(t, ("MatMul", "Gemm"))
            if mm is not None and mm.op == "Gemm" and len([i for i in mm.inputs if not (isinstance(i, gs.Variable) and i.is_empty())]) > 2:
                continue  # a Gemm that already has a bias
            if mm is not None and len(mm.outputs) == 1:
                c = other_input(node, t)
                if c is None or c is t:
                    return None
                return Match(node, [mm, node], {"mm": mm, "c": c})
        return None

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        mm = m["mm"]
        if not only_feeds(graph, mm.outputs[0], [m.anchor]):
            return f"{mm.op} output is a graph output or read by other nodes"
        if mm.op == "Gemm":
            return self._check_common(m)
        ra, rb = rank_of(mm.inputs[0]), rank_of(mm.inputs[1])
        if ra is None or rb is None:
            return "MatMul operand ranks are unknown"
        if (ra, rb) != (2, 2):
            return f"MatMul operands have ranks {ra} and {rb}; Gemm is 2-D only (would need Reshapes)"
        return self._check_common(m)

    def _check_common(self, m: Match) -> str | None:
        mm, c = m["mm"], m["c"]
        out = mm.outputs[0]
        if c.shape is None or out.shape is None or not broadcasts_to(list(c.shape), list(out.shape)):
            return f"bias of shape {None if c.shape is None else list(c.shape)} does not broadcast to the product {None if out.shape is None else list(out.shape)}"
        return float_dtype_reason(mm.inputs[0], mm.inputs[1], c, m.anchor.outputs[0])

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        mm, add, c = m["mm"], m.anchor, m["c"]
        out = add.outputs[0]
        remove_nodes([add])
        if mm.op == "MatMul":
            mm.op = "Gemm"
            mm.attrs.clear()
        else:
            mm.attrs["beta"] = 1.0
            while len(mm.inputs) > 2:
                mm.inputs.pop()
        mm.inputs.append(c)
        mm.outputs[0] = out
