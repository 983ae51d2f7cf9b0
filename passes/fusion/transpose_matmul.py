"""``fuse-transpose-matmul``: fold a Transpose of the last two axes into MatMul / Gemm.

* Gemm(Transpose(A), ...) / Gemm(..., Transpose(B)): toggle ``transA`` / ``transB`` (no data moves).
* MatMul(A, Transpose(B)) with 2-D operands: Gemm with ``transA`` / ``transB`` (same for A).
* MatMul(X, Transpose(W)) with a constant W and X of rank > 2: the weight is stored transposed
  (a constant weight transpose folded away).

Refuses when the Transpose output is a graph output or read by other nodes, when the permutation is
not a swap of the last two axes, when a folded weight is shared, or when dtypes are not float.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass
from graphopt.rewrite import const_value

from ._common import FusionPass, Match, float_dtype_reason, new_const, only_feeds, private_weight_reason, prod, rank_of, remove_nodes


def swaps_last_two(perm, rank: int | None) -> bool:
    if rank is None or rank < 2:
        return False
    p = list(range(rank)) if perm is None else [int(x) for x in perm]
    return p == list(range(rank - 2)) + [rank - 1, rank - 2]


@register_pass
class FuseTransposeMatMul(FusionPass):
    name = "fuse-transpose-matmul"
    description = "fold last-two-axes Transposes into Gemm transA/transB, or into a constant MatMul weight"
    anchor_ops = ("MatMul", "Gemm")

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        for i in (0, 1):
            tr = prod(node.inputs[i], "Transpose")
            if tr is not None and not (node.inputs[0] is node.inputs[1]):
                return Match(node, [tr, node], {"tr": tr, "i": i})
        return None

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        tr, mm, i = m["tr"], m.anchor, m["i"]
        if not only_feeds(graph, tr.outputs[0], [mm]):
            return "Transpose output is a graph output or read by other nodes"
        src = tr.inputs[0]
        r = rank_of(src)
        if not swaps_last_two(tr.attrs.get("perm"), r):
            return f"Transpose perm {tr.attrs.get('perm')} (rank {r}) is not a swap of the last two axes"
        ra, rb = rank_of(mm.inputs[0]), rank_of(mm.inputs[1])
        if mm.op == "Gemm":
            m.data["mode"] = "toggle"
        elif (ra, rb) == (2, 2):
            m.data["mode"] = "gemm"
        elif i == 1 and const_value(src) is not None:
            reason = private_weight_reason(src, [tr], "transposed weight")
            if reason:
                return reason
            m.data["mode"] = "fold"
        else:
            return f"MatMul operands have ranks {ra} and {rb} and the transposed operand is not a constant weight"
        return float_dtype_reason(mm.inputs[0], mm.inputs[1], src)

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        tr, mm, i, mode = m["tr"], m.anchor, m["i"], m["mode"]
        src = tr.inputs[0]
        key = "transA" if i == 0 else "transB"
        if mode == "fold":
            v = const_value(src)
            mm.inputs[1] = new_const(graph, src.name, "T", np.swapaxes(v, -1, -2))
        else:
            if mode == "gemm":
                mm.op = "Gemm"
                mm.attrs.clear()
            mm.attrs[key] = 1 - int(mm.attrs.get(key, 0))
            mm.inputs[i] = src
        remove_nodes([tr])
