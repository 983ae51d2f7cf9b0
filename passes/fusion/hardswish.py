"""``fuse-hardswish``: x * hardsigmoid(x) with alpha=1/6, beta=0.5 -> ``HardSwish`` (opset 14).

    x * HardSigmoid(x, 1/6, 0.5),  x * (Clip(x + 3, 0, 6) / 6),  x * Clip(x + 3, 0, 6) / 6   -> HardSwish(x)

Refuses below opset 14 (HardSwish does not exist there), when an intermediate is a graph output or
read outside the match, and when dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass

from ._common import FusionPass, Match, float_dtype_reason, opset_reason, other_input, prod, remove_nodes, scalar
from .hardsigmoid import _linear, clip_bounds, intermediates_reason, match_hard_sigmoid

SIXTH = 1.0 / 6.0


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(abs(b), 1e-6)


def _relu6_plus3(t: gs.Tensor, x: gs.Tensor) -> list[gs.Node] | None:
    """t = Clip(x + 3, 0, 6): the nodes."""
    clip = prod(t, "Clip")
    if clip is None:
        return None
    b = clip_bounds(clip)
    if b is None or b[0] != 0.0 or b[1] is None or not _close(b[1], 6.0):
        return None
    lin = _linear(clip.inputs[0])
    if lin is None or lin[0] is not x or lin[1] != 1.0 or not _close(lin[2], 3.0):
        return None
    return lin[3] + [clip]


@register_pass
class FuseHardSwish(FusionPass):
    name = "fuse-hardswish"
    description = "x * hardsigmoid(x) (alpha 1/6, beta 0.5; decomposed or not) -> HardSwish"
    anchor_ops = ("Mul", "Div")

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        if node.op == "Mul" and node.inputs[0] is not node.inputs[1]:
            for i in (0, 1):
                x, h = node.inputs[i], node.inputs[1 - i]
                r = match_hard_sigmoid(h)
                if r is not None and r[0] is x and _close(r[1], SIXTH) and _close(r[2], 0.5):
                    return Match(node, r[3] + [node], {"x": x})
        # (x * Clip(x + 3, 0, 6)) / 6   or   * (1/6)
        if len(node.inputs) != 2:
            return None
        for i in ((0,) if node.op == "Div" else (0, 1)):
            k = scalar(node.inputs[1 - i])
            if k is None or not _close(k if node.op == "Div" else 1.0 / k if k else 0.0, 6.0):
                continue
            inner = prod(node.inputs[i], "Mul")
            if inner is None:
                continue
            for j in (0, 1):
                x = inner.inputs[j]
                nodes = _relu6_plus3(other_input(inner, x), x) if other_input(inner, x) is not None else None
                if nodes is not None:
                    return Match(node, nodes + [inner, node], {"x": x})
        return None

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        return (intermediates_reason(graph, m.nodes) or float_dtype_reason(m["x"], m.anchor.outputs[0])
                or opset_reason("HardSwish", graph, ctx))

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        out, name = m.anchor.outputs[0], m.anchor.name
        remove_nodes(m.nodes)
        graph.nodes.append(gs.Node("HardSwish", name=name or None, inputs=[m["x"]], outputs=[out]))
