"""``fuse-attention``: scaled dot-product attention -> the standard ONNX ``Attention`` op (opset 23).

    P = Softmax(MatMul(Q, Kt) [* c | / c] [+ mask], axis=-1) [-> Cast to the same type]
    Y = MatMul(P, V)                                   ->  Attention(Q, K, V, mask, scale=c)

with Q [B, H, Sq, D], Kt = Transpose(.., p) a [B, H, D, Skv] view of K (the Transpose is kept with
the last two axes of ``p`` swapped, or dropped when that makes it the identity), V [B, H, Skv, Dv] and
an additive float mask whose last two dims are exactly [Sq, Skv] (onnxruntime's CPU kernel does not
broadcast the query axis).  Below opset 23 a match is refused with that reason: the onnxruntime
contrib ``Attention`` is -O3's business.  Refuses too when an intermediate is a graph output or read
outside the match, when the scale is not a constant scalar, when shapes are unknown or disagree, and
when dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass

from ._common import (FusionPass, Match, float_dtype_reason, new_var, only_feeds, opset_reason, other_input, prod, rank_of,
                      remove_nodes, scalar, sole_consumer)


def _same_dim(a, b) -> bool:
    return a == b and a is not None and not (isinstance(a, int) and a < 0)


@register_pass
class FuseAttention(FusionPass):
    name = "fuse-attention"
    description = "MatMul/scale/mask/Softmax/MatMul attention -> ONNX Attention (opset >= 23; refused before)"
    anchor_ops = ("Softmax",)
    needs_shapes = True

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        nodes = [node]
        t = node.inputs[0]
        mask = None
        add = prod(t, "Add")
        if add is not None:
            for i in (0, 1):
                if prod(add.inputs[i], ("Mul", "Div", "MatMul")) is not None:
                    mask = add.inputs[1 - i]
                    t = add.inputs[i]
                    break
            else:
                return None
            nodes.insert(0, add)
        scale_node = prod(t, ("Mul", "Div"))
        scale = 1.0
        if scale_node is not None:
            k = scalar(scale_node.inputs[1])
            x = scale_node.inputs[0]
            if k is None and scale_node.op == "Mul":
                k, x = scalar(scale_node.inputs[0]), scale_node.inputs[1]
            if k is None or k == 0:
                return None
            scale = k if scale_node.op == "Mul" else 1.0 / k
            nodes.insert(0, scale_node)
            t = x
        qk = prod(t, "MatMul")
        if qk is None:
            return None
        nodes.insert(0, qk)
        p = node.outputs[0]
        cast = sole_consumer(p, "Cast")
        if cast is not None:
            nodes.append(cast)
            p = cast.outputs[0]
        pv = sole_consumer(p, "MatMul")
        if pv is None or pv.inputs[0] is not p:
            return None
        nodes.append(pv)
        kt = prod(qk.inputs[1], "Transpose")
        return Match(pv, nodes, {"softmax": node, "qk": qk, "pv": pv, "mask": mask, "scale": scale, "kt": kt, "cast": cast})

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        for n in m.nodes[:-1]:
            if not only_feeds(graph, n.outputs[0], m.nodes):
                return f"intermediate {n.op} output is a graph output or read outside the pattern"
        sm, qk, pv, kt, cast, mask = m["softmax"], m["qk"], m["pv"], m["kt"], m["cast"], m["mask"]
        q, kview, v = qk.inputs[0], qk.inputs[1], pv.inputs[1]
        rank = rank_of(q)
        if rank != 4 or rank_of(kview) != 4 or rank_of(v) != 4:
            return f"Q/K/V ranks are {rank_of(q)}/{rank_of(kview)}/{rank_of(v)}, not 4 ([batch, heads, seq, head_size])"
        if int(sm.attrs.get("axis", -1)) not in (-1, 3):
            return f"Softmax axis {sm.attrs.get('axis')} is not the last axis"
        if cast is not None and (cast.outputs[0].dtype is None or sm.outputs[0].dtype is None
                                 or np.dtype(cast.outputs[0].dtype) != np.dtype(sm.outputs[0].dtype)):
            return "Cast after Softmax changes the dtype"
        qs, ks, vs = list(q.shape), list(kview.shape), list(v.shape)
        # kview is [B, H, D, Skv]
        if not (_same_dim(qs[1], ks[1]) and _same_dim(qs[1], vs[1])):
            return f"head counts differ or are unknown (Q {qs}, K^T {ks}, V {vs})"
        if not (_same_dim(qs[3], ks[2]) and _same_dim(ks[3], vs[2])):
            return f"Q/K/V shapes do not line up (Q {qs}, K^T {ks}, V {vs})"
        if mask is not None:
            ms = list(mask.shape) if mask.shape is not None else None
            if ms is None or len(ms) < 2:
                return "mask shape is unknown"
            if not (_same_dim(ms[-2], qs[2]) and _same_dim(ms[-1], ks[3])):
                return f"mask of shape {ms} is not [.., Sq={qs[2]}, Skv={ks[3]}] (the query axis would broadcast)"
        if kt is not None and not only_feeds(graph, kt.outputs[0], [qk]):
            return "K transpose output is read outside the pattern"
        if kt is not None and rank_of(kt.inputs[0]) != 4:
            return "K transpose input is not 4-D"
        r = float_dtype_reason(q, kview, v, mask, pv.outputs[0])
        if r:
            return r
        return opset_reason("Attention", graph, ctx)

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        qk, pv, kt, mask = m["qk"], m["pv"], m["kt"], m["mask"]
        q, v = qk.inputs[0], pv.inputs[1]
        extra: list[gs.Node] = []
        if kt is not None:
            perm = [int(x) for x in kt.attrs.get("perm", [3, 2, 1, 0])]
            perm = perm[:2] + [perm[3], perm[2]]
            src = kt.inputs[0]
            if perm == [0, 1, 2, 3]:
                k = src
            else:
                k = new_var(graph, kt.outputs[0].name, "K", like=kt.outputs[0])
                extra.append(gs.Node("Transpose", name=kt.name or None, attrs={"perm": perm}, inputs=[src], outputs=[k]))
            remove_nodes([kt])
        else:
            k = new_var(graph, qk.inputs[1].name, "K", like=qk.inputs[1])
            extra.append(gs.Node("Transpose", attrs={"perm": [0, 1, 3, 2]}, inputs=[qk.inputs[1]], outputs=[k]))
        out, name = pv.outputs[0], pv.name
        remove_nodes(m.nodes)
        inputs = [q, k, v] + ([mask] if mask is not None else [])
        graph.nodes.extend(extra)
        graph.nodes.append(gs.Node("Attention", name=name or None, attrs={"scale": float(m["scale"])}, inputs=inputs, outputs=[out]))
