"""``fuse-conv-scale``: fold a per-channel constant Mul / Add / Sub / Div after a Conv into its weights.

    Mul(Conv(x, W, b), s)  ->  Conv(x, W * s, b * s)          (also Div by s: 1/s)
    Add(Conv(x, W, b), a)  ->  Conv(x, W, b + a)              (also Sub: b - a; not a - Conv)

``s`` / ``a`` must be constants whose broadcast varies only along the channel axis (shape [C,1,1],
[1,C,1,1], [1] or a scalar) and must not change the output's shape.  Refuses otherwise, and when the
Conv weight/bias is shared, when the Conv output is used elsewhere or is a graph output, and when
dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass
from graphopt.rewrite import const_value

from ._common import (conv_out_channels, conv_weight_check, float_dtype_reason, FusionPass, Match, new_const,
                      present, prod, remove_nodes, scale_conv_weight)


def per_channel(v: np.ndarray, out_rank: int, channels: int) -> np.ndarray | None:
    """``v`` as a vector of ``channels`` values if it broadcasts over a [N, C, ...] output per channel."""
    if v.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - v.ndim) + tuple(v.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1).astype(np.float64), (channels,))


@register_pass
class FuseConvScale(FusionPass):
    name = "fuse-conv-scale"
    description = "fold a per-channel constant Mul/Div/Add/Sub after Conv into the Conv weight and bias"
    anchor_ops = ("Mul", "Add", "Sub", "Div")

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        for i in (0, 1):
            if node.op in ("Sub", "Div") and i == 1:
                break  # c - Conv and c / Conv are not affine in the Conv output
            conv = prod(node.inputs[i], ("Conv", "ConvTranspose"))
            if conv is not None and len(conv.outputs) == 1 and const_value(node.inputs[1 - i]) is not None:
                return Match(node, [conv, node], {"conv": conv, "k": node.inputs[1 - i]})
        return None

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        conv, op = m["conv"], m.anchor
        w, r = conv_weight_check(graph, conv, op)
        if r:
            return r
        k = per_channel(const_value(m["k"]), w.ndim, conv_out_channels(conv, w))
        if k is None:
            return f"{op.op} constant of shape {list(const_value(m['k']).shape)} is not per output channel"
        if op.op == "Div" and not np.all(k != 0):
            return "Div by a constant with zeros"
        m.data.update(w=w, kv=k)
        return float_dtype_reason(present(conv, 1), present(conv, 2), m["k"], op.outputs[0])

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        conv, op, w, k = m["conv"], m.anchor, m["w"], m["kv"]
        b_t = present(conv, 2)
        b = const_value(b_t).astype(np.float64).reshape(-1) if b_t is not None else np.zeros_like(k)
        dt = w.dtype
        w_base = conv.inputs[1].name
        if op.op in ("Mul", "Div"):
            s = k if op.op == "Mul" else 1.0 / k
            conv.inputs[1] = new_const(graph, w_base, "scaled", scale_conv_weight(conv, w, s).astype(dt))
            b = b * s
        else:
            b = b + k if op.op == "Add" else b - k
        if b_t is not None or op.op in ("Add", "Sub"):
            b_c = new_const(graph, b_t.name if b_t is not None else w_base, "scaled" if b_t is not None else "bias_scaled", b.astype(dt))
            if len(conv.inputs) > 2:
                conv.inputs[2] = b_c
            else:
                conv.inputs.append(b_c)
        out = op.outputs[0]
        remove_nodes([op])
        conv.outputs[0] = out
