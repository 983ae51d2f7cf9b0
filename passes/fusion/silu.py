"""``fuse-silu``: x * Sigmoid(x) -> ``Swish`` (alpha=1), the standard SiLU, which exists only from opset 24.

There is no SiLU op in earlier opsets, so in those models a match is refused with that reason (the
onnxruntime-specific form is -O3's business).  Refuses too when the Sigmoid output is a graph output
or read elsewhere, and when dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass

from ._common import FusionPass, Match, float_dtype_reason, opset_reason, prod, remove_nodes
from .hardsigmoid import intermediates_reason


@register_pass
class FuseSiLU(FusionPass):
    name = "fuse-silu"
    description = "x * Sigmoid(x) -> Swish (opset >= 24; refused with a reason before)"
    anchor_ops = ("Mul",)

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
            return None
        for i in (0, 1):
            sig = prod(node.inputs[1 - i], "Sigmoid")
            if sig is not None and sig.inputs[0] is node.inputs[i]:
                return Match(node, [sig, node], {"x": node.inputs[i]})
        return None

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        return (intermediates_reason(graph, m.nodes) or float_dtype_reason(m["x"], m.anchor.outputs[0])
                or opset_reason("Swish", graph, ctx))

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        out, name = m.anchor.outputs[0], m.anchor.name
        remove_nodes(m.nodes)
        graph.nodes.append(gs.Node("Swish", name=name or None, attrs={"alpha": 1.0}, inputs=[m["x"]], outputs=[out]))
