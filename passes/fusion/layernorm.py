"""``fuse-layernorm``: the decomposed layer normalization -> ``LayerNormalization`` (opset 17).

    m = ReduceMean(x, axes);  d = x - m;  v = ReduceMean(d^2, axes)
    y = d / Sqrt(v + eps) [* gamma] [+ beta]          ->  LayerNormalization(x, gamma, beta, axis, eps)

``d^2`` may be Pow(d, 2) or Mul(d, d); ``d / Sqrt(..)`` may be d * Reciprocal(Sqrt(..)).  ``axes`` must be the same trailing axes in both ReduceMeans
(keepdims=1); gamma / beta must be constants that broadcast over exactly the normalized axes.  Refuses
(with the reason) below opset 17, when an intermediate is a graph output or read outside the match,
when eps or the exponent is not constant, and when dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass
from graphopt.rewrite import const_value

from ._common import (FusionPass, Match, float_dtype_reason, is_scalar, new_const, only_feeds, opset_reason, other_input,
                      present, prod, rank_of, remove_nodes, scalar, sole_consumer)


def reduce_axes(node: gs.Node) -> list[int] | None:
    """ReduceMean's axes (attribute before opset 18, input from 18), None if unknown / not constant."""
    if int(node.attrs.get("keepdims", 1)) != 1:
        return None
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    t = present(node, 1)
    if t is None:
        return None  # all axes (noop_with_empty_axes aside): not a layer norm
    v = const_value(t)
    return None if v is None else [int(a) for a in v.reshape(-1)]


def _affine_param(node: gs.Node | None, t: gs.Tensor, op: str) -> tuple[gs.Node, gs.Tensor] | None:
    """If ``t``'s only consumer is ``op`` with a constant other input: (node, constant tensor)."""
    n = sole_consumer(t, op)
    if n is None:
        return None
    k = other_input(n, t)
    if k is None or const_value(k) is None:
        return None
    return n, k


@register_pass
class FuseLayerNorm(FusionPass):
    name = "fuse-layernorm"
    description = "ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, optional Mul/Add -> LayerNormalization (opset >= 17)"
    anchor_ops = ("ReduceMean",)

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        x = node.inputs[0]
        mean_t = node.outputs[0]
        sub = sole_consumer(mean_t, "Sub")
        if sub is None or sub.inputs[0] is not x or sub.inputs[1] is not mean_t:
            return None
        d = sub.outputs[0]
        sq = div = None
        readers = list({id(n): n for n in d.outputs}.values())
        for n in readers:
            if n.op == "Pow" and n.inputs[0] is d and is_scalar(n.inputs[1], 2.0):
                sq = n
            elif n.op == "Mul" and n.inputs[0] is d and n.inputs[1] is d:
                sq = n
            elif n.op == "Div" and n.inputs[0] is d:
                div = n
            elif n.op == "Mul" and prod(other_input(n, d), "Reciprocal") is not None:
                div = n  # d * Reciprocal(Sqrt(v + eps))
        if sq is None or div is None or len(readers) != 2:
            return None
        rm2 = sole_consumer(sq.outputs[0], "ReduceMean")
        if rm2 is None:
            return None
        add = sole_consumer(rm2.outputs[0], "Add")
        if add is None:
            return None
        eps_t = other_input(add, rm2.outputs[0])
        sqrt = sole_consumer(add.outputs[0], "Sqrt")
        if sqrt is None:
            return None
        recip = None
        if div.op == "Mul":
            recip = prod(other_input(div, d), "Reciprocal")
            if recip.inputs[0] is not sqrt.outputs[0]:
                return None
        elif div.inputs[1] is not sqrt.outputs[0]:
            return None
        nodes = [node, sub, sq, rm2, add, sqrt] + ([recip] if recip is not None else []) + [div]
        y = div.outputs[0]
        gamma = beta = None
        r = _affine_param(div, y, "Mul")
        if r is not None:
            nodes.append(r[0])
            gamma, y = r[1], r[0].outputs[0]
        r = _affine_param(None, y, "Add")
        if r is not None:
            nodes.append(r[0])
            beta, y = r[1], r[0].outputs[0]
        return Match(nodes[-1], nodes, {"x": x, "rm1": node, "rm2": rm2, "eps": eps_t, "gamma": gamma, "beta": beta})

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        last = m.nodes[-1]
        for n in m.nodes[:-1]:
            if not only_feeds(graph, n.outputs[0], m.nodes):
                return f"intermediate {n.op} output is a graph output or read outside the pattern"
        x = m["x"]
        rank = rank_of(x)
        if rank is None:
            return "rank of the input is unknown"
        a1, a2 = reduce_axes(m["rm1"]), reduce_axes(m["rm2"])
        if a1 is None or a2 is None:
            return "ReduceMean axes are not constant (or keepdims=0)"
        a1 = sorted(a % rank for a in a1)
        if a1 != sorted(a % rank for a in a2):
            return "the two ReduceMeans reduce different axes"
        if a1 != list(range(a1[0], rank)):
            return f"normalized axes {a1} are not the trailing axes of a rank-{rank} input"
        eps = scalar(m["eps"])
        if eps is None:
            return "epsilon is not a constant scalar"
        axis = a1[0]
        shape = x.shape[axis:]
        if any(not isinstance(s, int) for s in shape):
            return "normalized axes have dynamic sizes"
        for key in ("gamma", "beta"):
            t = m[key]
            if t is None:
                continue
            v = const_value(t)
            if v.ndim > rank or any(d != 1 for d in v.shape[: max(0, v.ndim - len(shape))]):
                return f"{key} of shape {list(v.shape)} is not over the normalized axes"
            try:
                np.broadcast_to(v.reshape(v.shape[max(0, v.ndim - len(shape)):]), shape)
            except ValueError:
                return f"{key} of shape {list(v.shape)} does not broadcast to {shape}"
        m.data.update(axis=axis, eps_v=eps, shape=shape)
        r = float_dtype_reason(x, last.outputs[0], m["gamma"], m["beta"])
        if r:
            return r
        return opset_reason("LayerNormalization", graph, ctx)

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        x, axis, shape, last = m["x"], m["axis"], m["shape"], m.nodes[-1]
        dt = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)

        def param(key: str, default: float | None):
            t = m[key]
            if t is None:
                return None if default is None else new_const(graph, m["rm1"].name or "layernorm", key, np.full(shape, default, dt))
            v = const_value(t)
            v = v.reshape(v.shape[max(0, v.ndim - len(shape)):])
            if list(v.shape) == list(shape):
                return t
            return new_const(graph, t.name, "expanded", np.broadcast_to(v, shape).astype(dt))

        inputs = [x, param("gamma", 1.0)]
        b = param("beta", None)
        if b is not None:
            inputs.append(b)
        out = last.outputs[0]
        name = last.name
        remove_nodes(m.nodes)
        graph.nodes.append(gs.Node("LayerNormalization", name=name or None, attrs={"axis": axis, "epsilon": float(m["eps_v"])},
                                   inputs=inputs, outputs=[out]))
