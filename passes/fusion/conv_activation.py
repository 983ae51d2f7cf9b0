"""``fuse-conv-activation``: ``Conv -> Relu | LeakyRelu | Sigmoid | Tanh | Clip | HardSigmoid`` ->
onnxruntime ``com.microsoft.FusedConv(activation=..., activation_params=...)``.

Target-specific (-O3): the fusion onnxruntime's EXTENDED level makes at session start, done offline,
so a model run with fewer session-time optimizations (ORT_DISABLE_ALL or BASIC, e.g. for a quicker
cold start) keeps it.  onnxruntime's CPU kernel applies the activation to the convolution's output in
place with the same MLAS routines as the standalone ops.  float32 Conv only (the kernel's type); Clip
needs constant bounds; the Conv output must feed only the activation and not be a graph output.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass

from ._common import is_std, node_alive, present, run_fusion, scalar
from ._ort import escapes, is_float32, only_consumer, replace_with_ms_op

# activation op -> (FusedConv activation name, default activation_params)
ACTIVATIONS = {
    "Relu": ("Relu", None),
    "Tanh": ("Tanh", None),
    "Sigmoid": ("Sigmoid", None),
    "LeakyRelu": ("LeakyRelu", {"alpha": 0.01}),
    "HardSigmoid": ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}),
    "Clip": ("Clip", None),
}


@dataclass
class ConvActMatch:
    conv: gs.Node
    act: gs.Node
    activation: str
    params: list[float] | None


def _params(act: gs.Node) -> tuple[list[float] | None, str | None]:
    """FusedConv's activation_params for ``act``, or (None, why not)."""
    name, defaults = ACTIVATIONS[act.op]
    if act.op == "Clip":
        if "min" in act.attrs or "max" in act.attrs:  # opset < 11: bounds are attributes
            return [float(act.attrs.get("min", -3.4028234663852886e38)),
                    float(act.attrs.get("max", 3.4028234663852886e38))], None
        lo, hi = present(act, 1), present(act, 2)
        vals = []
        for t, inf in ((lo, -3.4028234663852886e38), (hi, 3.4028234663852886e38)):
            if t is None:
                vals.append(inf)
                continue
            v = scalar(t)
            if v is None or not isinstance(t, gs.Constant):
                return None, "Clip bounds are not constants"
            vals.append(v)
        return vals, None
    if defaults is None:
        return None, None
    return [float(act.attrs.get(k, d)) for k, d in defaults.items()], None


def match(conv: gs.Node) -> tuple[ConvActMatch | None, str | None]:
    if len(conv.outputs) != 1:
        return None, None
    act = only_consumer(conv.outputs[0])
    if act is None or act.op not in ACTIVATIONS or not is_std(act) or act.inputs[0] is not conv.outputs[0]:
        return None, None
    params, why = _params(act)
    if why:
        return None, f"{act.name or act.op}: {why}"
    return ConvActMatch(conv, act, ACTIVATIONS[act.op][0], params), None


def check(graph: gs.Graph, m: ConvActMatch) -> str | None:
    name = m.conv.name or "Conv"
    x = m.conv.inputs[0]
    if not is_float32(x) or not is_float32(m.act.outputs[0]):
        return f"{name}: FusedConv runs float32 only"
    why = escapes(graph, [m.conv, m.act], keep=[m.act.outputs[0]])
    return f"{name}: {why}" if why else None


def rewrite(graph: gs.Graph, m: ConvActMatch) -> gs.Node:
    attrs = dict(m.conv.attrs)
    attrs["activation"] = m.activation
    if m.params is not None:
        attrs["activation_params"] = [float(p) for p in m.params]
    return replace_with_ms_op(graph, [m.conv, m.act], "FusedConv", m.conv.name or "conv", "FusedConv",
                              list(m.conv.inputs), [m.act.outputs[0]], attrs)


@register_pass
class FuseConvActivation(Pass):
    name = "fuse-conv-activation"
    description = ("Conv -> Relu/LeakyRelu/Sigmoid/Tanh/Clip/HardSigmoid -> com.microsoft.FusedConv "
                   "(onnxruntime only; what its EXTENDED level does at session start)")

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        convs = [n for n in graph.nodes if n.op == "Conv" and is_std(n)]
        return run_fusion(graph, ctx, convs, {"matched": 0, "rewritten": 0}, alive=node_alive,
                          match=lambda g, c: match(c), check=check, rewrite=rewrite,
                          describe=lambda c, m: f"FusedConv({m.activation}) at {c.name}")
