"""``fuse-attention``: scaled dot-product attention -> the standard ONNX ``Attention`` op (opset 23).

    P = Softmax(MatMul(Q, Kt) [* c | / c] [+ mask], axis=-1) [-> Cast to the same type]
    Y = MatMul(P, V)                                   ->  Attention(Q, K, V, mask, scale=c)

with Q [B, H, Sq, D], Kt = Transpose(.., p) a [B, H, D, Skv] view of K (the Transpose is kept with
the last two axes of ``p`` swapped, or dropped when that makes it the identity), V [B, H, Skv, Dv] and
an additive float mask whose last two dims are exactly [Sq, Skv] (onnxruntime's CPU kernel does not
broadcast the query axis).  Where Q, K and V are [B, S, H*D] tensors split into heads by
Reshape + Transpose and the output is merged back the same way (BERT / GPT-2 exports), the 3-D form
``Attention(q3, k3, v3, mask, q_num_heads=H, kv_num_heads=H)`` replaces those 8 nodes too
(``heads-3d=false`` keeps the 4-D form).  Below opset 23 a match is refused with that reason: the onnxruntime
contrib ``Attention`` is -O3's business.  Refuses too when an intermediate is a graph output or read
outside the match, when the scale is not a constant scalar, when shapes are unknown or disagree, and
when dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass
from graphopt.rewrite import const_value, derived_name

from ._common import (FusionPass, Match, float_dtype_reason, new_var, only_feeds, opset_reason, prod, rank_of,
                      remove_nodes, scalar, sole_consumer)


def _same_dim(a, b) -> bool:
    return a == b and a is not None and not (isinstance(a, int) and a < 0)


def _split_heads(graph: gs.Graph, t: gs.Tensor, perm: list[int]) -> tuple[gs.Tensor, list[gs.Node], int] | None:
    """t = Transpose(Reshape(x3, [B, S, H, D]), perm) with x3 [B, S, H*D]: (x3, [reshape, transpose], H)."""
    tr = prod(t, "Transpose")
    if tr is None or [int(p) for p in tr.attrs.get("perm", [])] != perm:
        return None
    rs = prod(tr.inputs[0], "Reshape")
    if rs is None or not only_feeds(graph, rs.outputs[0], [tr]):
        return None
    x3, s4 = rs.inputs[0], rs.outputs[0].shape
    s3 = x3.shape
    if s3 is None or s4 is None or len(s3) != 3 or len(s4) != 4:
        return None
    if not all(isinstance(d, int) and d > 0 for d in list(s4[2:]) + [s3[2]]) or s4[2] * s4[3] != s3[2]:
        return None
    if not (_same_dim(s3[0], s4[0]) and _same_dim(s3[1], s4[1])):
        return None
    return x3, [rs, tr], int(s4[2])


def _merge_heads(graph: gs.Graph, y: gs.Tensor) -> dict | None:
    """y [B, H, S, Dv] -> Transpose(0,2,1,3) -> Reshape(.., shape).

    The Transpose output [B, S, H, Dv] has the row-major order of the 3-D output [B, S, H*Dv], so the
    Reshape can read the 3-D output instead, unless its shape copies (0) dim 2 or 3.  When the Reshape
    gives exactly [B, S, H*Dv] it goes away too.  Returns {"transpose", "reshape", "drop_reshape"}.
    """
    tr = sole_consumer(y, "Transpose")
    if tr is None or [int(p) for p in tr.attrs.get("perm", [])] != [0, 2, 1, 3]:
        return None
    rs = sole_consumer(tr.outputs[0], "Reshape")
    if rs is None or rs.inputs[0] is not tr.outputs[0] or not only_feeds(graph, tr.outputs[0], [rs]):
        return None
    s4, s_out = tr.outputs[0].shape, rs.outputs[0].shape
    if s4 is None or len(s4) != 4 or not (isinstance(s4[2], int) and isinstance(s4[3], int)):
        return None
    target = const_value(rs.inputs[1])
    if target is not None:
        if int(rs.attrs.get("allowzero", 0)) == 0 and any(int(d) == 0 for d in target.reshape(-1)[2:]):
            return None
    elif s_out is None or any(not isinstance(d, int) or d < 0 for d in s_out):
        return None  # a computed shape we cannot see
    drop = (s_out is not None and len(s_out) == 3 and s_out[2] == s4[2] * s4[3]
            and _same_dim(s_out[0], s4[0]) and _same_dim(s_out[1], s4[1]))
    if target is None and not drop:
        return None  # a computed shape with dims copied from the 4-D input: keep the frame
    return {"transpose": tr, "reshape": rs, "drop_reshape": drop, "dims": (s4[0], s4[1], s4[2] * s4[3])}


@register_pass
class FuseAttention(FusionPass):
    name = "fuse-attention"
    description = "MatMul/scale/mask/Softmax/MatMul attention -> ONNX Attention (opset >= 23; refused before)"
    anchor_ops = ("Softmax",)

    @dataclass(frozen=True)
    class Options:
        # use Attention's 3-D form when Q/K/V come from [B, S, H*D] tensors through Reshape+Transpose and
        # the output goes back through Transpose+Reshape (those 8 nodes go away too)
        heads_3d: bool = True

    @staticmethod
    def _scores(t: gs.Tensor):
        """t = MatMul(Q, Kt) [* c | / c]: ([nodes], scale) or None."""
        scale_node = prod(t, ("Mul", "Div"))
        scale, nodes = 1.0, []
        if scale_node is not None:
            k = scalar(scale_node.inputs[1])
            x = scale_node.inputs[0]
            if k is None and scale_node.op == "Mul":
                k, x = scalar(scale_node.inputs[0]), scale_node.inputs[1]
            if k is None or k == 0:
                return None
            scale = k if scale_node.op == "Mul" else 1.0 / k
            nodes.append(scale_node)
            t = x
        qk = prod(t, "MatMul")
        if qk is None:
            return None
        return [qk] + nodes, scale

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        t = node.inputs[0]
        mask, found = None, self._scores(t)
        add = prod(t, "Add")
        if found is None and add is not None:
            for i in (0, 1):
                found = self._scores(add.inputs[i])
                if found is not None:
                    mask = add.inputs[1 - i]
                    found = (found[0] + [add], found[1])
                    break
        if found is None:
            return None
        nodes, scale = found[0] + [node], found[1]
        qk = nodes[0]
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
        if not (_same_dim(qs[0], ks[0]) and _same_dim(qs[0], vs[0])):
            return f"batch dims differ or are unknown (Q {qs}, K^T {ks}, V {vs}); MatMul would broadcast them"
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
        r = opset_reason("Attention", graph, ctx)
        if r:
            return r
        m.data["lift"] = self._lift(m, graph) if self.options.heads_3d else None
        return None

    def _lift(self, m: Match, graph: gs.Graph):
        """The 3-D form's inputs/output/extra nodes, or None if the Reshape/Transpose frame is not there."""
        qk, pv, kt = m["qk"], m["pv"], m["kt"]
        if kt is None:
            return None
        q = _split_heads(graph, qk.inputs[0], [0, 2, 1, 3])
        k = _split_heads(graph, qk.inputs[1], [0, 2, 3, 1])
        v = _split_heads(graph, pv.inputs[1], [0, 2, 1, 3])
        y = _merge_heads(graph, pv.outputs[0])
        if q is None or k is None or v is None or y is None:
            return None
        if not (q[2] == k[2] == v[2]) or not all(only_feeds(graph, t, [n]) for t, n in
                                                 ((qk.inputs[0], qk), (qk.inputs[1], qk), (pv.inputs[1], pv))):
            return None
        if not only_feeds(graph, pv.outputs[0], [y["transpose"]]):
            return None
        return {"q": q[0], "k": k[0], "v": v[0], "heads": q[2], "merge": y, "nodes": q[1] + k[1] + v[1]}

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        lift = m.data.get("lift")
        if lift is not None:
            inputs = [lift["q"], lift["k"], lift["v"]] + ([m["mask"]] if m["mask"] is not None else [])
            merge, name = lift["merge"], m["pv"].name
            rs = merge["reshape"]
            if merge["drop_reshape"]:
                out = rs.outputs[0]
                remove_nodes([rs])
            else:  # the Reshape stays and reads the 3-D output
                pv_out = m["pv"].outputs[0]
                out = gs.Variable(derived_name(graph, pv_out.name, "3d"), dtype=pv_out.dtype, shape=list(merge["dims"]))
                rs.inputs[0] = out
            remove_nodes(m.nodes + lift["nodes"] + [merge["transpose"]])
            h = int(lift["heads"])
            graph.nodes.append(gs.Node("Attention", name=name or None, inputs=inputs, outputs=[out],
                                       attrs={"scale": float(m["scale"]), "q_num_heads": h, "kv_num_heads": h}))
            return
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
