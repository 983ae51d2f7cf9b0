"""Shape inference for the IR: onnx's inference (strict off, symbolic dims kept), written back onto
the ``gs.Variable`` tensors.  gs does no shape inference itself, so shapes go stale after rewrites:
passes that depend on shapes call :func:`infer_shapes` first (cached per graph generation in the
context, so a run of shape-dependent passes with no change between them infers once).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ir


_NP_DTYPES: dict[int, np.dtype] = {}


def _np_dtype(elem_type: int) -> np.dtype:
    try:
        return _NP_DTYPES[elem_type]
    except KeyError:
        _NP_DTYPES[elem_type] = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        return _NP_DTYPES[elem_type]


def _light_model(graph: gs.Graph, template: onnx.ModelProto | None) -> onnx.ModelProto:
    """What shape inference needs, without copying weights: nodes, signature, known value_info, small
    or integer initializers with their values, large ones as typed inputs (shape only)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx

    m = onnx.ModelProto()
    m.ir_version = max(template.ir_version if template is not None else onnx.IR_VERSION, 4)
    opsets = {o.domain: o.version for o in (template.opset_import if template is not None else [])}
    opsets.setdefault("", int(graph.opset))
    for n in graph.nodes:  # a domain a pass brought in (com.microsoft at -O3): without its import, inference fails
        if n.domain and n.domain not in opsets and n.domain != "ai.onnx":
            opsets[n.domain] = 1
    for d, v in opsets.items():
        m.opset_import.append(onnx.helper.make_opsetid(d, v))
    if template is not None:
        m.functions.extend(template.functions)
    g = m.graph
    g.name = graph.name or "g"
    g.node.extend(ir.export_nodes(graph))  # untouched nodes: their imported protos
    io = set()
    for t in graph.inputs:
        ir.value_info_into(t, g.input.add())
        io.add(t.name)
    for t in graph.outputs:
        ir.value_info_into(t, g.output.add())
        io.add(t.name)
    for name, t in ir.tensor_map(graph).items():
        if name in io:
            continue
        if isinstance(t, gs.Constant):
            v = t._values
            nbytes = getattr(v, "nbytes", None)
            if nbytes is None:
                nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize if t.shape is not None else 0
            is_int = np.dtype(t.dtype).kind in "iu" if not isinstance(t.dtype, int) else False
            if is_int or nbytes <= ir.LIGHT_BYTES:  # shape arithmetic needs their values
                g.initializer.append(OnnxExporter.export_tensor_proto(t))
            else:
                g.input.append(onnx.helper.make_tensor_value_info(name, dtype_to_onnx(t.export_dtype), list(t.shape)))
        elif t.dtype is not None or t.shape is not None:
            ir.value_info_into(t, g.value_info.add())
    return m


# onnx has no shape inference for onnxruntime's contrib ops, so every tensor after a -O3 fusion would lose
# its shape.  For inference only, the light model gets a local function per contrib op it uses, whose body
# has the op's output shapes (not its values): onnx infers through model-local functions.
_CONTRIB_BODIES = {
    "FastGelu": ("(X) => (Y)", "Y = Identity(X)"),
    "Gelu": ("(X) => (Y)", "Y = Identity(X)"),
    "QuickGelu": ("(X) => (Y)", "Y = Identity(X)"),
    "BiasGelu": ("(A, B) => (C)", "C = Add(A, B)"),
    "SkipLayerNormalization": ("(input) => (output)", "output = Identity(input)"),
    "Attention": ("(input) => (output)", "output = Identity(input)"),
    "EmbedLayerNormalization": ("(input_ids, segment_ids, word_embedding) => (output, mask_index)",
                                "output = Gather(word_embedding, input_ids)\n"
                                "mask_index = Cast <to = 6> (sum)"),
    "FusedConv": ("<auto_pad, dilations, group, kernel_shape, pads, strides> (X, W) => (Y)",
                  "Y = Conv <auto_pad: string = @auto_pad, dilations: ints = @dilations, group: int = @group, "
                  "kernel_shape: ints = @kernel_shape, pads: ints = @pads, strides: ints = @strides> (X, W)"),
}


def _contrib_outputs_ok(op: str, n: onnx.NodeProto) -> bool:
    """True when the stand-in body's output shapes are the node's: its outputs are the ones the body
    defines, and (Attention) the value width is the input's."""
    declared = _CONTRIB_BODIES[op][0].split("=>")[1].count(",") + 1
    if len([o for o in n.output if o]) > declared or any(not o for o in n.output[:declared]):
        return False
    return not (op == "Attention" and any(a.name == "qkv_hidden_sizes" for a in n.attribute))


def contrib_functions(model: onnx.ModelProto) -> list[onnx.FunctionProto]:
    """Shape-only stand-ins (see ``_CONTRIB_BODIES``) for the com.microsoft ops of ``model``'s top graph
    whose every node they describe correctly, and that the model does not define itself."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not opset:
        return []
    defined = {(f.domain, f.name) for f in model.functions}
    nodes: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.domain == "com.microsoft" and n.op_type in _CONTRIB_BODIES:
            nodes.setdefault(n.op_type, []).append(n)
    out = []
    for op, ns in nodes.items():
        if ("com.microsoft", op) in defined or not all(_contrib_outputs_ok(op, n) for n in ns):
            continue
        sig, body = _CONTRIB_BODIES[op]
        if op == "EmbedLayerNormalization":
            body = (("ax = Constant <value_ints = [1]> ()\nsum = ReduceSum <keepdims = 0> (input_ids, ax)\n"
                     if opset >= 13 else "sum = ReduceSum <axes = [1], keepdims = 0> (input_ids)\n") + body)
        attrs, _, io = sig.rpartition("> ") if sig.startswith("<") else ("", "", sig)
        head = f"{op} {attrs}> {io}" if attrs else f"{op} {io}"
        text = f'<domain: "com.microsoft", opset_import: ["" : {opset}]>\n{head} {{\n{body}\n}}'
        out.append(onnx.parser.parse_function(text))
    return out


def _tensor_type(tp: onnx.TypeProto) -> tuple[int, list | None] | None:
    """(elem_type, dims or None when the rank is unknown) of a tensor type; None for other types."""
    if tp.WhichOneof("value") != "tensor_type":
        return None
    tt = tp.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    return tt.elem_type, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def infer_shapes(graph: gs.Graph, ctx=None, *, template: onnx.ModelProto | None = None,
                 light: onnx.ModelProto | None = None) -> int:
    """Infer dtypes and shapes and write them onto the graph's tensors; returns how many were set.

    Symbolic dims stay symbolic (strings).  Inference failures leave the graph as it is.  The graph's
    inputs and outputs keep their declared types (inference may invent names like ``unk__0`` for
    unknown dims, or know a dim the model leaves open).  ``light``: the graph as a light model
    (:func:`graphopt.ir.light_model`), when the caller has one cheaper than exporting the graph.
    """
    if ctx is not None and ctx.cache.get("shapes_inferred") is graph:
        return 0
    tmpl = template if template is not None else (ctx.model_template if ctx is not None else None)
    if light is None:
        ir.toposort(graph)
    try:
        light = light if light is not None else _light_model(graph, tmpl)
        stand_ins = contrib_functions(light)
        if stand_ins:
            light.functions.extend(stand_ins)
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:
        return 0
    n = 0
    tensors = ir.tensor_map(graph)
    io = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    Variable = gs.Variable
    decoded: dict[bytes, tuple | None] = {}  # many tensors share a type: decode each type once
    # (inference's graph.output entries are the graph outputs, whose declared types stay as they are)
    for vi in inferred.graph.value_info:
        t = tensors.get(vi.name)
        if type(t) is not Variable or id(t) in io:
            continue  # the model's declared signature is not inference's to change
        tp = vi.type
        key = tp.SerializeToString()
        try:
            found = decoded[key]
        except KeyError:
            found = decoded[key] = _tensor_type(tp)
        if found is None:
            continue
        elem_type, dims = found
        attrs = t.__dict__  # (gs's Tensor.__setattr__ costs a Python call per attribute)
        if elem_type and attrs["dtype"] is None:
            attrs["dtype"] = _np_dtype(elem_type)
        if dims is not None and attrs["shape"] != dims:
            attrs["shape"] = list(dims)
            n += 1
    if ctx is not None:
        ctx.cache["shapes_inferred"] = graph
    return n
