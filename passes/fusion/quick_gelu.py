"""``fuse-quick-gelu``: ``x * Sigmoid(alpha * x)`` -> onnxruntime ``com.microsoft.QuickGelu(alpha)``.

Target-specific (-O3).  CLIP-style QuickGELU has alpha = 1.702; plain SiLU/Swish (``x * Sigmoid(x)``,
EfficientNet) is the same op with alpha = 1.0.  float32 only.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass

from ._common import is_std, node_alive, other_input, run_fusion, scalar
from ._ort import escapes, is_float32, only_consumer, op_of, replace_with_ms_op


@dataclass
class QuickGeluMatch:
    x: gs.Tensor
    alpha: float
    out: gs.Tensor
    nodes: list[gs.Node]
    anchor: gs.Node


def match(sig: gs.Node) -> QuickGeluMatch | None:
    inp = sig.inputs[0]
    x, alpha, nodes = inp, 1.0, [sig]
    m = op_of(inp, "Mul")
    if m is not None:
        for i in (0, 1):
            a = scalar(m.inputs[1 - i])
            if a is not None and not isinstance(m.inputs[i], gs.Constant):
                x, alpha, nodes = m.inputs[i], a, [m, sig]
                break
    u = only_consumer(sig.outputs[0])
    if u is None or u.op != "Mul" or other_input(u, sig.outputs[0]) is not x:
        if x is not inp:  # maybe the Mul is part of the gated input, not a QuickGELU scale: try alpha = 1
            x, alpha, nodes = inp, 1.0, [sig]
            if u is None or u.op != "Mul" or other_input(u, sig.outputs[0]) is not x:
                return None
        else:
            return None
    return QuickGeluMatch(x, alpha, u.outputs[0], nodes + [u], sig)


def check(graph: gs.Graph, m: QuickGeluMatch) -> str | None:
    name = m.anchor.name or "Sigmoid"
    if not is_float32(m.x):
        return f"{name}: only float32 is fused"
    why = escapes(graph, m.nodes, keep=[m.out])
    return f"{name}: {why}" if why else None


def rewrite(graph: gs.Graph, m: QuickGeluMatch) -> gs.Node:
    return replace_with_ms_op(graph, m.nodes, "QuickGelu", m.anchor.name or "quick_gelu", "QuickGelu", [m.x], [m.out],
                              {"alpha": float(m.alpha)})


@register_pass
class FuseQuickGelu(Pass):
    name = "fuse-quick-gelu"
    description = "x * Sigmoid(alpha * x) (QuickGELU, SiLU) -> com.microsoft.QuickGelu (onnxruntime only)"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        sigs = [n for n in graph.nodes if n.op == "Sigmoid" and is_std(n)]
        return run_fusion(graph, ctx, sigs, {"matched": 0, "rewritten": 0}, alive=node_alive,
                          match=lambda g, s: (match(s), None), check=check, rewrite=rewrite,
                          describe=lambda s, m: f"QuickGelu at {s.name}")
