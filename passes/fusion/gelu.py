"""``fuse-gelu``: the decomposed GELU forms -> the standard ``Gelu`` op (opset 20).

    erf form:   0.5 * x * (1 + Erf(x / sqrt(2)))                        -> Gelu(x)
    tanh form:  0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  -> Gelu(x, approximate="tanh")

The products may be associated in any order (x * 0.5 first, or the 0.5 last); x / sqrt(2) may be
x * (1/sqrt(2)) and x^3 may be Pow(x, 3) or x * x * x.  A match in a model whose opset has no Gelu
(before 20) is refused with that reason (onnxruntime's com.microsoft Gelu is -O3's business).
Refuses too when an intermediate is a graph output or read outside the match, or dtypes disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass

from ._common import (FusionPass, Match, float_dtype_reason, is_scalar, mul_chain_from, only_feeds, opset_reason,
                      other_input, prod, product_leaves, remove_nodes, sole_consumer)

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _scaled_by(t: gs.Tensor, k: float) -> tuple[gs.Tensor, gs.Node] | None:
    """t = x * k or x / (1/k): return (x, node)."""
    p = prod(t, ("Mul", "Div"))
    if p is None:
        return None
    if p.op == "Mul":
        for i in (0, 1):
            if is_scalar(p.inputs[1 - i], k):
                return p.inputs[i], p
        return None
    if is_scalar(p.inputs[1], 1.0 / k):
        return p.inputs[0], p
    return None


def _cube_of(t: gs.Tensor, graph: gs.Graph) -> tuple[gs.Tensor, list[gs.Node]] | None:
    p = prod(t, "Pow")
    if p is not None:
        return (p.inputs[0], [p]) if is_scalar(p.inputs[1], 3.0) else None
    r = product_leaves(t, graph, set(), max_nodes=2)
    if r is not None and len(r[0]) == 3 and r[0][0] is r[0][1] is r[0][2]:
        return r[0][0], r[1]
    return None


@register_pass
class FuseGelu(FusionPass):
    name = "fuse-gelu"
    description = "erf / tanh GELU subgraphs -> Gelu (opset >= 20)"
    anchor_ops = ("Erf", "Tanh")

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        inner: list[gs.Node] = []
        if node.op == "Erf":
            r = _scaled_by(node.inputs[0], 1.0 / SQRT2)
            if r is None:
                return None
            x, scale = r
            inner = [scale]
            approx = "none"
        else:
            r = _scaled_by(node.inputs[0], SQRT_2_OVER_PI)
            if r is None:
                return None
            s, scale = r
            add = prod(s, "Add")
            if add is None:
                return None
            x = None
            for i in (0, 1):
                r2 = _scaled_by(add.inputs[1 - i], 0.044715)
                if r2 is None:
                    continue
                cube = _cube_of(r2[0], graph)
                if cube is not None and cube[0] is add.inputs[i]:
                    x = add.inputs[i]
                    inner = [scale, add, r2[1]] + cube[1]
                    break
            if x is None:
                return None
            approx = "tanh"
        one = sole_consumer(node.outputs[0], "Add")
        if one is None or not is_scalar(other_input(one, node.outputs[0]), 1.0):
            return None
        t = one.outputs[0]

        def want(leaves):
            rest = [l for l in leaves if l is not t and l is not x]
            return (sum(l is t for l in leaves) == 1 and sum(l is x for l in leaves) == 1
                    and len(rest) == 1 and is_scalar(rest[0], 0.5))

        chain = mul_chain_from(t, graph, want, keep={id(x), id(t)})
        if chain is None:
            return None
        top, _, muls = chain
        nodes = inner + [node, one] + muls
        return Match(top, nodes, {"x": x, "approx": approx, "top": top})

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        top = m["top"]
        for n in m.nodes:
            if n is top:
                continue
            for o in n.outputs:
                if not only_feeds(graph, o, m.nodes):
                    return f"intermediate {n.op} output is a graph output or read outside the pattern"
        r = float_dtype_reason(m["x"], top.outputs[0])
        if r:
            return r
        return opset_reason("Gelu", graph, ctx)

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        top, x = m["top"], m["x"]
        out = top.outputs[0]
        remove_nodes(m.nodes)
        attrs = {"approximate": "tanh"} if m["approx"] == "tanh" else {}
        graph.nodes.append(gs.Node("Gelu", name=top.name or None, attrs=attrs, inputs=[x], outputs=[out]))
