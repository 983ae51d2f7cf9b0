"""``fuse-hardsigmoid``: decomposed hard sigmoids -> ``HardSigmoid`` (opset 6).

    Clip(x * a + b, 0, 1)                 ->  HardSigmoid(x, alpha=a, beta=b)
    Clip(x + c, 0, h) / h   (or * 1/h)    ->  HardSigmoid(x, alpha=1/h, beta=c/h)   (torch: relu6(x+3)/6)

Refuses when an intermediate is a graph output or read outside the match, or dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass

from ._common import FusionPass, Match, float_dtype_reason, only_feeds, opset_reason, other_input, present, prod, remove_nodes, scalar


def clip_bounds(clip: gs.Node) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip with constant bounds (None for an absent bound); None if not constant."""
    if "min" in clip.attrs or "max" in clip.attrs:  # opset < 11
        return float(clip.attrs.get("min", float("-inf"))), float(clip.attrs.get("max", float("inf")))
    out = []
    for i in (1, 2):
        t = present(clip, i)
        if t is None:
            out.append(None)
            continue
        v = scalar(t)
        if v is None:
            return None
        out.append(v)
    return out[0], out[1]


def _linear(t: gs.Tensor) -> tuple[gs.Tensor, float, float, list[gs.Node]] | None:
    """t = x * a + b (or x + b, x * a + b in either operand order): (x, a, b, nodes)."""
    add = prod(t, ("Add", "Sub"))
    if add is None:
        return None
    for i in ((0, 1) if add.op == "Add" else (0,)):
        b = scalar(add.inputs[1 - i])
        if b is None:
            continue
        if add.op == "Sub":
            b = -b
        u = add.inputs[i]
        mul = prod(u, "Mul")
        if mul is not None:
            for j in (0, 1):
                a = scalar(mul.inputs[1 - j])
                if a is not None:
                    return mul.inputs[j], a, b, [mul, add]
        return u, 1.0, b, [add]
    return None


def match_hard_sigmoid(t: gs.Tensor) -> tuple[gs.Tensor, float, float, list[gs.Node]] | None:
    """Recognise t = hardsigmoid(x): (x, alpha, beta, nodes), the last node producing t."""
    p = prod(t, ("HardSigmoid", "Clip", "Div", "Mul"))
    if p is None:
        return None
    if p.op == "HardSigmoid":
        return p.inputs[0], float(p.attrs.get("alpha", 0.2)), float(p.attrs.get("beta", 0.5)), [p]
    if p.op == "Clip":
        b = clip_bounds(p)
        if b is None or b[0] != 0.0 or b[1] != 1.0:
            return None
        lin = _linear(p.inputs[0])
        if lin is None:
            return None
        x, a, c, nodes = lin
        return x, a, c, nodes + [p]
    # Div(Clip(x + c, 0, h), h) or Mul(Clip(x + c, 0, h), 1/h)
    for i in ((0,) if p.op == "Div" else (0, 1)):
        clip = prod(p.inputs[i], "Clip")
        k = scalar(other_input(p, p.inputs[i])) if p.inputs[0] is not p.inputs[1] else None
        if clip is None or k is None or k == 0:
            continue
        h = k if p.op == "Div" else 1.0 / k
        b = clip_bounds(clip)
        if b is None or b[0] != 0.0 or b[1] is None or abs(b[1] - h) > 1e-5 * abs(h):
            continue
        lin = _linear(clip.inputs[0])
        if lin is None or lin[1] != 1.0:
            continue
        x, _, c, nodes = lin
        return x, 1.0 / h, c / h, nodes + [clip, p]
    return None


def intermediates_reason(graph: gs.Graph, nodes: list[gs.Node]) -> str | None:
    """Every output but the last node's must be read only inside the match and not be a graph output."""
    for n in nodes[:-1]:
        for o in n.outputs:
            if not only_feeds(graph, o, nodes):
                return f"intermediate {n.op} output is a graph output or read outside the pattern"
    return None


@register_pass
class FuseHardSigmoid(FusionPass):
    name = "fuse-hardsigmoid"
    description = "Clip(x*a+b, 0, 1) and Clip(x+3, 0, 6)/6 -> HardSigmoid"
    anchor_ops = ("Clip", "Div", "Mul")

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        r = match_hard_sigmoid(node.outputs[0])
        if r is None or r[3][-1].op == "HardSigmoid":
            return None
        x, a, b, nodes = r
        # a Clip that a following Div/Mul completes is matched from that Div/Mul instead
        return Match(node, nodes, {"x": x, "alpha": a, "beta": b})

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        return (intermediates_reason(graph, m.nodes) or float_dtype_reason(m["x"], m.anchor.outputs[0])
                or opset_reason("HardSigmoid", graph, ctx))

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        out, name = m.anchor.outputs[0], m.anchor.name
        remove_nodes(m.nodes)
        graph.nodes.append(gs.Node("HardSigmoid", name=name or None, attrs={"alpha": float(m["alpha"]), "beta": float(m["beta"])},
                                   inputs=[m["x"]], outputs=[out]))
