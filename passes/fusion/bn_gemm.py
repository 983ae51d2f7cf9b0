"""``fuse-bn-gemm``: fold an inference-mode BatchNormalization that follows a Gemm or MatMul.

On a 2-D activation [N, C], BatchNormalization scales and shifts each column, which is each output
feature of the Gemm/MatMul weight:

    BN(Gemm(A, B, C))  ->  Gemm(A, B * s, s * (beta_g * C - mean) + beta)      (alpha kept)
    BN(MatMul(A, B))   ->  Gemm(A, B * s, beta - mean * s)

Refuses when the product is not 2-D (BatchNormalization's channel axis would not be the weight's
output axis), when the weight or Gemm bias is not a private constant, when the intermediate is used
elsewhere or is a graph output, when the BN is in training mode, and when dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass
from graphopt.rewrite import const_value

from ._common import FusionPass, Match, float_dtype_reason, new_const, only_feeds, present, private_weight_reason, prod, rank_of, remove_nodes
from .conv_bn import bn_reason, bn_scale_shift


@register_pass
class FuseBNGemm(FusionPass):
    name = "fuse-bn-gemm"
    description = "fold inference BatchNormalization after a 2-D Gemm/MatMul with a constant weight into the Gemm"
    anchor_ops = ("BatchNormalization",)

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        mm = prod(node.inputs[0], ("Gemm", "MatMul"))
        if mm is None or len(mm.outputs) != 1:
            return None
        return Match(node, [mm, node], {"mm": mm, "bn": node})

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        mm, bn = m["mm"], m["bn"]
        if not only_feeds(graph, mm.outputs[0], [bn]):
            return f"{mm.op} output is a graph output or read by other nodes"
        a, w_t = mm.inputs[0], mm.inputs[1]
        if rank_of(a) != 2 or rank_of(mm.outputs[0]) not in (2, None):
            return f"{mm.op} input has rank {rank_of(a)} (BatchNormalization channels match weight columns only in 2-D)"
        r = private_weight_reason(w_t, [mm], f"{mm.op} weight")
        if r:
            return r
        w = const_value(w_t)
        if w.ndim != 2:
            return f"{mm.op} weight has rank {w.ndim}"
        trans_b = mm.op == "Gemm" and int(mm.attrs.get("transB", 0)) == 1
        n_out = w.shape[0] if trans_b else w.shape[1]
        c_t = present(mm, 2) if mm.op == "Gemm" else None
        if c_t is not None:
            r = private_weight_reason(c_t, [mm], "Gemm bias")
            if r:
                return r
            c = const_value(c_t)
            if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or (c.ndim >= 1 and c.shape[-1] not in (1, n_out)):
                return f"Gemm bias of shape {list(c.shape)} is not per output column"
        r = bn_reason(bn, n_out)
        if r:
            return r
        m.data.update(w=w, trans_b=trans_b, c_t=c_t, n_out=n_out)
        return float_dtype_reason(a, w_t, c_t, bn.outputs[0], *[present(bn, i) for i in range(1, 5)])

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        mm, bn, w, trans_b, c_t, n_out = m["mm"], m["bn"], m["w"], m["trans_b"], m["c_t"], m["n_out"]
        s, t = bn_scale_shift(bn)  # type: ignore[misc]
        dt = w.dtype
        w64 = w.astype(np.float64)
        w_new = w64 * (s[:, None] if trans_b else s[None, :])
        if c_t is not None:
            beta_g = float(mm.attrs.get("beta", 1.0))
            c = np.broadcast_to(const_value(c_t).astype(np.float64).reshape(-1), (n_out,))
            bias = s * beta_g * c + t
        else:
            bias = t
        w_c = new_const(graph, mm.inputs[1].name, "bnfused", w_new.astype(dt))
        b_c = new_const(graph, c_t.name if c_t is not None else mm.inputs[1].name, "bnfused" if c_t is not None else "bias_bnfused",
                        bias.astype(dt))
        out = bn.outputs[0]
        remove_nodes([bn])
        if mm.op == "MatMul":
            mm.op = "Gemm"
            mm.attrs.clear()
            a = mm.inputs[0]
            mm.inputs.clear()
            mm.inputs.extend([a, w_c, b_c])
        else:
            mm.inputs[1] = w_c
            if len(mm.inputs) > 2:
                mm.inputs[2] = b_c
            else:
                mm.inputs.append(b_c)
            mm.attrs["beta"] = 1.0
        mm.outputs[0] = out
