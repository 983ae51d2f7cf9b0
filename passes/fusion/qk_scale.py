"""``fuse-qk-scale``: fold the attention score scale into the query projection's weight and bias.

    scores = MatMul(Q, K) * s          (or MatMul(Q, K) / d, s = 1/d)
    Q      = layout(x @ Wq + bq)       layout: any chain of Reshape / Transpose; the projection may be
                                       Add(MatMul(x, Wq), bq), a Reshape -> Gemm -> Reshape detour, or
                                       output i of a Split of one packed Q/K/V projection
 ->  scores = MatMul(Q', K)  with  Wq' = s Wq, bq' = s bq  (only the Q columns of a packed weight)

(s (x W + b)) is s x W + s b; Reshape and Transpose only move values, so the product is the same tensor.
The scale is the one constant multiply left in every BERT / GPT-2 attention block after -O1 (ORT folds it
into its FusedMatMul); folding it removes one elementwise pass over the [B, N, S, S] scores.  With s a
power of two (1/sqrt(64) = 0.125 for head size 64, as in bert_mini and gpt2_mini) the new weights are
exact and the outputs bit-identical; otherwise the scaled weights round once more (about 1 ulp).

When Q's path is not a private chain, the K side is tried (same rule).  Refuses, with a reason, when
neither operand leads to a linear layer with constant weights read only on that path, when a value on
the path is a graph output or read elsewhere (scaling it would change the other reader), or when the
MatMul output is read by anything besides the scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass
from graphopt.rewrite import const_value, weight_used_only_by

from ._common import FusionPass, Match, new_const, only_feeds, other_input, present, prod, remove_nodes, scalar

LAYOUT_OPS = ("Reshape", "Transpose")


@dataclass
class Projection:
    weight: gs.Constant
    w_axis: int  # the weight's output-feature axis (1 for MatMul / Gemm, 0 for Gemm transB=1)
    bias: gs.Constant | None
    cols: slice  # the output features that belong to this operand
    nodes: list[gs.Node]  # the nodes whose values get scaled (their outputs must be private to the path)


def _gemm_axis(g: gs.Node) -> int | None:
    a = g.attrs
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
        return None
    return 0 if a.get("transB", 0) else 1


def _walk_layout(t: gs.Tensor, path: list[gs.Node]) -> tuple[gs.Tensor, str | None]:
    """Up through Reshape (constant shape) / Transpose producers; the nodes go on ``path``."""
    while True:
        p = prod(t, LAYOUT_OPS)
        if p is None:
            return t, None
        if p.op == "Reshape" and len(p.inputs) > 1 and const_value(p.inputs[1]) is None:
            return t, "a Reshape on the path has a computed shape"
        path.append(p)
        t = p.inputs[0]


def _projection(t: gs.Tensor) -> tuple[Projection | None, str | None]:
    """Walk from a MatMul operand up through layout ops to the linear layer that makes it."""
    path: list[gs.Node] = []
    t, why = _walk_layout(t, path)
    if why:
        return None, why
    sp = prod(t, "Split")
    cols = None
    if sp is not None:
        axis = int(sp.attrs.get("axis", 0))
        src = sp.inputs[0]
        rank = len(src.shape) if src.shape is not None else None
        if rank is None or axis not in (-1, rank - 1):
            return None, "the packed projection is not split along its last axis"
        sizes = const_value(present(sp, 1)) if present(sp, 1) is not None else None
        width = src.shape[-1]
        if sizes is None:
            if not isinstance(width, int) or width % len(sp.outputs):
                return None, "the Split sizes are unknown"
            sizes = np.full(len(sp.outputs), width // len(sp.outputs))
        i = next(k for k, o in enumerate(sp.outputs) if o is t)
        start = int(np.sum(sizes[:i]))
        cols = slice(start, start + int(sizes[i]))
        path.append(sp)
        below: list[gs.Node] = []
        t, why = _walk_layout(src, below)  # the 2-D detour of a packed projection: Split(Reshape(Gemm))
        if why:
            return None, why
        for n in below:  # the split columns are the weight's columns only if the last axis stays put
            i_s, o_s = n.inputs[0].shape, n.outputs[0].shape
            if n.op == "Transpose" or not i_s or not o_s or not isinstance(i_s[-1], int) or i_s[-1] != o_s[-1]:
                return None, f"a {n.op} between the packed projection and its Split moves the last axis"
        path += below
    add = prod(t, "Add")
    bias = None
    if add is not None:
        for j in (0, 1):
            mm = prod(add.inputs[j], "MatMul")
            b = add.inputs[1 - j]
            if mm is not None and const_value(b) is not None:
                bias, lin, axis = b, mm, 1
                break
        else:
            return None, "the projection's Add is not MatMul + constant bias"
        path.append(add)
    else:
        lin = prod(t, ("MatMul", "Gemm"))  # a Gemm detour's outer Reshape was walked as a layout op
        if lin is None:
            return None, "no linear layer (MatMul / Gemm with a constant weight) before the layout ops"
        if lin.op == "Gemm":
            axis = _gemm_axis(lin)
            if axis is None:
                return None, "the Gemm has alpha/beta != 1 or transA"
            bias = present(lin, 2)
            if bias is not None and const_value(bias) is None:
                return None, "the Gemm bias is not a constant"
        else:
            axis = 1
    w = lin.inputs[1]
    wv = const_value(w)
    if wv is None or wv.ndim != 2:
        return None, "the projection weight is not a constant 2-D tensor"
    n_out = wv.shape[axis]
    if bias is not None:
        bv = const_value(bias)
        if bv.size != n_out:
            return None, f"the bias has {bv.size} values for {n_out} outputs"
    cols = cols if cols is not None else slice(0, n_out)
    if cols.stop > n_out:
        return None, "the Split covers more columns than the weight has"
    path.append(lin)
    return Projection(w, axis, bias, cols, path), None


def _private(graph: gs.Graph, proj: Projection, reader: gs.Node) -> str | None:
    """Every value on the path is read only by the next node of the path (the Split excepted: its other
    outputs are K and V, which stay as they are)."""
    chain = [reader] + proj.nodes
    for nxt, n in zip(chain, chain[1:]):
        outs = [o for o in n.outputs if any(i is o for i in nxt.inputs)] if n.op == "Split" else n.outputs
        for o in outs:
            if not only_feeds(graph, o, [nxt]):
                return f"{n.op} output '{o.name}' on the projection path is a graph output or read elsewhere"
    owners = [n for n in proj.nodes if n.op in ("MatMul", "Gemm", "Add")]
    if not weight_used_only_by(proj.weight, owners):
        return f"weight '{proj.weight.name}' is shared outside the projection"
    if proj.bias is not None and not weight_used_only_by(proj.bias, owners):
        return f"bias '{proj.bias.name}' is shared outside the projection"
    return None


@register_pass
class FuseQkScale(FusionPass):
    name = "fuse-qk-scale"
    description = "attention score scale (MatMul(Q, K) * s) folded into the Q (or K) projection weight and bias"
    anchor_ops = ("Mul", "Div")

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        for t in node.inputs:
            mm = prod(t, "MatMul")
            if mm is None or (node.op == "Div" and t is not node.inputs[0]):
                continue
            s = scalar(other_input(node, t))
            if s is None or s == 0.0:
                continue
            if not all(len(i.shape or []) >= 3 for i in mm.inputs):  # attention scores: batched, no constant weight
                continue
            if any(const_value(i) is not None for i in mm.inputs):
                continue
            return Match(node, [mm, node], {"mm": mm, "s": s if node.op == "Mul" else 1.0 / s, "t": t})
        return None

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        mm = m["mm"]
        if not only_feeds(graph, mm.outputs[0], [m.anchor]):
            return "the scores MatMul output is a graph output or read by other nodes"
        if m.anchor.outputs[0].dtype is not None and np.dtype(m.anchor.outputs[0].dtype) != np.float32:
            return "only float32 scores are folded"
        reasons = []
        for i in (0, 1):
            proj, why = _projection(mm.inputs[i])
            why = why or _private(graph, proj, mm)
            if why is None:
                m.data["proj"] = proj
                return None
            reasons.append(("Q: " if i == 0 else "K: ") + why)
        return "; ".join(reasons)

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        proj, s, mm, mul = m["proj"], m["s"], m["mm"], m.anchor
        w = np.array(const_value(proj.weight), dtype=np.float64)
        idx = [slice(None), slice(None)]
        idx[proj.w_axis] = proj.cols
        w[tuple(idx)] *= s
        owner = next(n for n in proj.nodes if n.op in ("MatMul", "Gemm"))
        owner.inputs[1] = new_const(graph, proj.weight.name, "qk_scaled", w.astype(np.float32))
        if proj.bias is not None:
            b = np.array(const_value(proj.bias), dtype=np.float64)
            shape = b.shape
            b = b.reshape(-1)
            b[proj.cols] *= s
            nb = new_const(graph, proj.bias.name, "qk_scaled", b.reshape(shape).astype(np.float32))
            for n in proj.nodes:
                for k, i in enumerate(n.inputs):
                    if i is proj.bias:
                        n.inputs[k] = nb
        out = mul.outputs[0]
        remove_nodes([mul])
        mm.outputs[0] = out
