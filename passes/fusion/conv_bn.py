"""``fuse-conv-bn``: fold an inference-mode BatchNormalization into the Conv / ConvTranspose before it.

    y = BN(Conv(x, W, b))  ->  Conv(x, W * s, (b - mean) * s + beta),  s = gamma / sqrt(var + eps)

per output channel (grouped ConvTranspose included).  Refuses when the BN is in training mode, when a
BN parameter or the Conv weight/bias is not a constant, when the Conv weight/bias is shared outside
the match, when the Conv output is a graph output or read elsewhere, and when dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass
from graphopt.rewrite import const_value

from ._common import (conv_out_channels, conv_weight_check, float_dtype_reason, FusionPass, Match, new_const,
                      present, prod, remove_nodes, scale_conv_weight)


def bn_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with BN(x) = x * s + t per channel, in float64; None if a parameter is not constant."""
    vals = [const_value(present(bn, i)) for i in range(1, 5)]
    if any(v is None for v in vals):
        return None
    gamma, beta, mean, var = (v.astype(np.float64).reshape(-1) for v in vals)  # type: ignore[union-attr]
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def bn_reason(bn: gs.Node, channels: int) -> str | None:
    """Why this BatchNormalization cannot be folded as a per-channel affine map, or None."""
    if int(bn.attrs.get("training_mode", 0)) != 0 or len([o for o in bn.outputs if o.name]) > 1:
        return "BatchNormalization is in training mode (running statistics are outputs)"
    for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")):
        t = present(bn, i)
        if t is None or const_value(t) is None:
            return f"BatchNormalization {what} is not a constant"
        if const_value(t).size != channels:
            return f"BatchNormalization {what} has {const_value(t).size} values for {channels} channels"
    return None


@register_pass
class FuseConvBN(FusionPass):
    name = "fuse-conv-bn"
    description = "fold inference BatchNormalization into the preceding Conv / ConvTranspose"
    anchor_ops = ("BatchNormalization",)

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        conv = prod(node.inputs[0], ("Conv", "ConvTranspose"))
        if conv is None or len(conv.outputs) != 1:
            return None
        return Match(node, [conv, node], {"conv": conv, "bn": node})

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        conv, bn = m["conv"], m["bn"]
        w, r = conv_weight_check(graph, conv, bn)
        if r:
            return r
        m.data["w"] = w
        r = bn_reason(bn, conv_out_channels(conv, w))
        if r:
            return r
        return float_dtype_reason(present(conv, 1), present(conv, 2), bn.outputs[0], *[present(bn, i) for i in range(1, 5)])

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        conv, bn, w = m["conv"], m["bn"], m["w"]
        s, t = bn_scale_shift(bn)  # type: ignore[misc]
        b_t = present(conv, 2)
        b = const_value(b_t).astype(np.float64).reshape(-1) if b_t is not None else np.zeros_like(s)
        dt = w.dtype
        w_new = new_const(graph, conv.inputs[1].name, "bnfused", scale_conv_weight(conv, w, s).astype(dt))
        b_new = new_const(graph, b_t.name if b_t is not None else conv.inputs[1].name, "bnfused" if b_t is not None else "bias_bnfused",
                          (b * s + t).astype(dt))
        out = bn.outputs[0]
        remove_nodes([bn])
        conv.inputs[1] = w_new
        if len(conv.inputs) > 2:
            conv.inputs[2] = b_new
        else:
            conv.inputs.append(b_new)
        conv.outputs[0] = out
