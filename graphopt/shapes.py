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


_SMALL = 4096  # initializers up to this many bytes keep their values (shape arithmetic needs them)


def _light_model(graph: gs.Graph, template: onnx.ModelProto | None) -> onnx.ModelProto:
    """What shape inference needs, without copying weights: nodes, signature, known value_info, small
    or integer initializers with their values, large ones as typed inputs (shape only)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx

    m = onnx.ModelProto()
    m.ir_version = max(template.ir_version if template is not None else onnx.IR_VERSION, 4)
    opsets = {o.domain: o.version for o in (template.opset_import if template is not None else [])}
    opsets.setdefault("", int(graph.opset))
    for d, v in opsets.items():
        m.opset_import.append(onnx.helper.make_opsetid(d, v))
    if template is not None:
        m.functions.extend(template.functions)
    g = m.graph
    g.name = graph.name or "g"
    g.node.extend(ir.export_nodes(graph))  # untouched nodes: their imported protos
    io = set()
    for t in graph.inputs:
        g.input.append(OnnxExporter.export_value_info_proto(t, False))
        io.add(t.name)
    for t in graph.outputs:
        g.output.append(OnnxExporter.export_value_info_proto(t, False))
        io.add(t.name)
    for name, t in graph.tensors().items():
        if name in io:
            continue
        if isinstance(t, gs.Constant):
            v = t._values
            nbytes = getattr(v, "nbytes", None)
            if nbytes is None:
                nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize if t.shape is not None else 0
            is_int = np.dtype(t.dtype).kind in "iu" if not isinstance(t.dtype, int) else False
            if is_int or nbytes <= _SMALL:
                g.initializer.append(OnnxExporter.export_tensor_proto(t))
            else:
                g.input.append(onnx.helper.make_tensor_value_info(name, dtype_to_onnx(t.export_dtype), list(t.shape)))
        elif t.dtype is not None or t.shape is not None:
            g.value_info.append(OnnxExporter.export_value_info_proto(t, False))
    return m


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
        inferred = onnx.shape_inference.infer_shapes(light if light is not None else _light_model(graph, tmpl),
                                                     strict_mode=False, data_prop=True)
    except Exception:
        return 0
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    n = 0
    tensors = graph.tensors()
    io = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    for name, vi in infos.items():
        t = tensors.get(name)
        if not isinstance(t, gs.Variable) or not vi.type.HasField("tensor_type") or id(t) in io:
            continue  # the model's declared signature is not inference's to change
        tt = vi.type.tensor_type
        if tt.elem_type and t.dtype is None:
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            if t.shape != shape:
                t.shape = shape
                n += 1
    if ctx is not None:
        ctx.cache["shapes_inferred"] = graph
    return n
