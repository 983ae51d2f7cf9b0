"""``fuse-pad-conv``: fold a constant zero Pad into the following Conv's ``pads``.

    Conv(Pad(x, pads, 0), W)  ->  Conv(x, W, pads = conv_pads + spatial pads)

Only mode="constant" with value 0 (or no value), non-negative pads, no padding on the batch and
channel axes, and a Conv without ``auto_pad``.  Refuses otherwise, and when the Pad output is a graph
output or read by other nodes.  (Works for any Conv weight: nothing but attributes changes.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import PassContext, register_pass
from graphopt.rewrite import const_value

from ._common import FusionPass, Match, only_feeds, present, prod, rank_of, remove_nodes


def pad_amounts(pad: gs.Node, rank: int) -> tuple[list[int] | None, str | None]:
    """Pad's [x0_begin, ..., x{r-1}_begin, x0_end, ...] over all ``rank`` axes, or (None, reason)."""
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return None, f"Pad mode is {mode!r}, not 'constant'"
    if "pads" in pad.attrs:  # opset < 11
        pads = [int(p) for p in pad.attrs["pads"]]
        value = float(pad.attrs.get("value", 0.0))
        axes = None
    else:
        pv = const_value(present(pad, 1))
        if pv is None:
            return None, "Pad amounts are not constant"
        pads = [int(p) for p in pv.reshape(-1)]
        cv_t = present(pad, 2)
        cv = const_value(cv_t) if cv_t is not None else np.zeros(1)
        if cv is None:
            return None, "Pad value is not constant"
        value = float(cv.reshape(-1)[0]) if cv.size else 0.0
        av_t = present(pad, 3)
        axes = None
        if av_t is not None:
            av = const_value(av_t)
            if av is None:
                return None, "Pad axes are not constant"
            axes = [int(a) % rank for a in av.reshape(-1)]
    if value != 0.0:
        return None, f"Pad value is {value:g}, not 0"
    if axes is not None:
        full = [0] * (2 * rank)
        k = len(axes)
        for j, a in enumerate(axes):
            full[a], full[rank + a] = pads[j], pads[k + j]
        pads = full
    if len(pads) != 2 * rank:
        return None, f"Pad has {len(pads)} amounts for rank {rank}"
    if any(p < 0 for p in pads):
        return None, "Pad crops (negative amounts)"
    if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return None, "Pad pads the batch or channel axis"
    return pads, None


@register_pass
class FusePadConv(FusionPass):
    name = "fuse-pad-conv"
    description = "fold a constant-zero Pad of the spatial axes into the following Conv's pads"
    anchor_ops = ("Conv",)

    @dataclass(frozen=True)
    class Options:
        pass

    def match(self, node: gs.Node, graph: gs.Graph, ctx: PassContext) -> Match | None:
        pad = prod(node.inputs[0], "Pad")
        if pad is None:
            return None
        return Match(node, [pad, node], {"pad": pad})

    def check(self, m: Match, graph: gs.Graph, ctx: PassContext) -> str | None:
        pad, conv = m["pad"], m.anchor
        if not only_feeds(graph, pad.outputs[0], [conv]):
            return "Pad output is a graph output or read by other nodes"
        ap = conv.attrs.get("auto_pad", "NOTSET")
        ap = ap.decode() if isinstance(ap, bytes) else ap
        if ap not in ("NOTSET", ""):
            return f"Conv uses auto_pad={ap}"
        w = present(conv, 1)
        rank = rank_of(w) if w is not None else None
        if rank is None:
            kshape = conv.attrs.get("kernel_shape")
            rank = len(kshape) + 2 if kshape is not None else None
        if rank is None:
            return "rank of the Conv input is unknown"
        pads, reason = pad_amounts(pad, rank)
        if reason:
            return reason
        m.data.update(pads=pads, rank=rank)
        return None

    def rewrite(self, m: Match, graph: gs.Graph, ctx: PassContext) -> None:
        pad, conv, pads, rank = m["pad"], m.anchor, m["pads"], m["rank"]
        sp = rank - 2
        old = [int(p) for p in conv.attrs.get("pads", [0] * (2 * sp))]
        new = [old[i] + pads[2 + i] for i in range(sp)] + [old[sp + i] + pads[rank + 2 + i] for i in range(sp)]
        conv.attrs["pads"] = new
        conv.attrs.pop("auto_pad", None)
        conv.inputs[0] = pad.inputs[0]
        remove_nodes([pad])
