"""Shape inference for the IR: onnx's inference (strict off, symbolic dims kept), written back onto
the ``gs.Variable`` tensors.  gs does no shape inference itself, so shapes go stale after rewrites:
passes that depend on shapes call :func:`infer_shapes` first (cached per graph generation in the
context, so a run of shape-dependent passes with no change between them infers once).
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from . import ir

_SMALL = 4096  # initializers up to this many bytes keep their values (shape arithmetic needs them)


def _stripped(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with large initializers turned into typed graph inputs (shape only, no bytes)."""
    m = onnx.ModelProto()
    m.ir_version = max(model.ir_version, 4)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = m.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    input_names = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        nbytes = len(t.raw_data) if t.HasField("raw_data") else 0
        if nbytes and nbytes > _SMALL and t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            if t.name not in input_names:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return m


def infer_shapes(graph: gs.Graph, ctx=None, *, template: onnx.ModelProto | None = None) -> int:
    """Infer dtypes and shapes and write them onto the graph's tensors; returns how many were set.

    Symbolic dims stay symbolic (strings).  Inference failures leave the graph as it is.
    """
    if ctx is not None and ctx.cache.get("shapes_inferred") is graph:
        return 0
    tmpl = template if template is not None else (ctx.model_template if ctx is not None else None)
    graph.toposort()
    model = ir.export_graph(graph, tmpl)
    try:
        inferred = onnx.shape_inference.infer_shapes(_stripped(model), strict_mode=False, data_prop=True)
    except Exception:
        return 0
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    n = 0
    tensors = graph.tensors()
    signature = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    for name, vi in infos.items():
        t = tensors.get(name)
        if not isinstance(t, gs.Variable) or not vi.type.HasField("tensor_type"):
            continue
        if id(t) in signature:
            continue  # the model's inputs and outputs keep the types and shapes the user declared
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
