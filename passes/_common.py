"""Helpers shared by the -O1 simplification passes (not a pass: no ``@register_pass`` here).

Scope walking (every graph, If/Loop/Scan bodies included), constant access without name matching,
static-shape questions that treat symbolic dims as unknown, and the shape-inference entry point that
honours ``--input-shape`` and never touches the model's declared inputs and outputs.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.errors import InputError


_SUBGRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}


def subgraphs_of(node: gs.Node) -> list[gs.Graph]:
    if node.op not in _SUBGRAPH_OPS and not node.domain:
        return []
    out: list[gs.Graph] = []
    for a in node.attrs.values():
        if isinstance(a, gs.Graph):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(g for g in a if isinstance(g, gs.Graph))
    return out


def all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every subgraph body below it (outer graphs first)."""
    yield graph
    for n in graph.nodes:
        for sg in subgraphs_of(n):
            yield from all_graphs(sg)


def io_ids(graph: gs.Graph) -> set[int]:
    return {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}


def is_omitted(t: gs.Tensor | None) -> bool:
    return t is None or (isinstance(t, gs.Variable) and t.is_empty())


def const_array(t: gs.Tensor | None) -> np.ndarray | None:
    """Values of an initializer (``gs.Constant``) or of a ``Constant`` node's output, else None.

    Reads lazy weights: call it only where the values are really needed.
    """
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant":
        return constant_node_value(t.inputs[0])
    return None


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value of a ``Constant`` node (every attribute form except sparse and strings)."""
    a = node.attrs
    if "value" in a:
        v = a["value"]
        return np.asarray(v.values) if isinstance(v, gs.Constant) else np.asarray(v)
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(list(a["value_floats"]), dtype=np.float32).reshape(-1)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(list(a["value_ints"]), dtype=np.int64).reshape(-1)
    return None


def np_dtype(t: gs.Tensor) -> np.dtype | None:
    """The element type of ``t`` as a numpy dtype, or None when unknown (or not numpy-representable)."""
    if isinstance(t, gs.Constant):
        try:
            return np.dtype(t.dtype)
        except TypeError:
            return None
    d = t.dtype
    if d is None:
        return None
    if isinstance(d, int):
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(d))
        except Exception:
            return None
    try:
        return np.dtype(d)
    except TypeError:
        return None


def shape_of(t: gs.Tensor) -> list | None:
    """The shape of ``t`` with symbolic/unknown dims as None, or None when the rank is unknown."""
    if isinstance(t, gs.Constant):
        return list(t.shape)
    if t.shape is None:
        return None
    return [d if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 else None for d in t.shape]


def static_shape(t: gs.Tensor) -> list[int] | None:
    s = shape_of(t)
    if s is None or any(d is None for d in s):
        return None
    return [int(d) for d in s]


def attr_int(node: gs.Node, name: str, default: int) -> int:
    v = node.attrs.get(name, default)
    return int(v)


def apply_input_shapes(graph: gs.Graph, ctx) -> int:
    """Fix graph-input dims the user gave with ``--input-shape`` (the only way a dynamic dim becomes static).

    Returns how many inputs changed.  A rank mismatch or a conflicting static dim is a user mistake.
    """
    fixed = getattr(ctx, "input_shapes", None) or {}
    n = 0
    for t in graph.inputs:
        if t.name not in fixed or not isinstance(t, gs.Variable):
            continue
        want = [int(d) for d in fixed[t.name]]
        have = t.shape
        if have is not None:
            if len(have) != len(want):
                raise InputError(f"--input-shape {t.name}: rank {len(want)} but the model input has rank {len(have)}")
            for i, (h, w) in enumerate(zip(have, want)):
                if isinstance(h, (int, np.integer)) and h >= 0 and not isinstance(h, bool) and int(h) != w and h != 0:
                    raise InputError(f"--input-shape {t.name}: dim {i} is {h} in the model, not {w}")
        if have != want:
            t.shape = want
            n += 1
    return n


def input_shapes_pending(graph: gs.Graph, ctx) -> bool:
    """True while a ``--input-shape`` the user gave is not yet written onto the graph inputs."""
    fixed = getattr(ctx, "input_shapes", None) or {}
    return any(isinstance(t, gs.Variable) and t.name in fixed and t.shape != [int(d) for d in fixed[t.name]]
               for t in graph.inputs)


def shapes_derived(graph: gs.Graph) -> bool:
    """True once :func:`ensure_shapes` derived the shapes of ``graph`` from its inputs.

    Until then, shapes on intermediate tensors come from the model's value_info, which may be stale
    (an input made dynamic by editing the signature keeps its old static value_info): no pass may
    fold or remove anything on the strength of those.
    """
    return bool(graph.__dict__.get("_graphopt_shapes_derived"))


def ensure_shapes(graph: gs.Graph, ctx) -> None:
    """Shapes and dtypes on the tensors of ``graph``, derived from the declared inputs (cached per
    graph generation in ``ctx``).

    The first time, shapes and dtypes of intermediate tensors imported from value_info are dropped and
    inferred again from the inputs; passes keep the shapes of the tensors they keep valid, so later
    calls only fill in new tensors.  The declared inputs and outputs of every graph keep their
    declared types and shapes: inference may know more (a dim that is really static), but the
    interface of the model is not ours to change.
    """
    from graphopt.shapes import infer_shapes

    if ctx is not None and ctx.cache.get("shapes_inferred") is graph and shapes_derived(graph):
        return
    light = None
    changed_inputs = apply_input_shapes(graph, ctx)
    if changed_inputs or not shapes_derived(graph):
        src = ir.pristine_source(graph) if not changed_inputs else None
        if src is not None and not ir.has_subgraphs(src.graph):
            light = ir.light_model(src, value_info=False)  # the graph as imported, without exporting it
        io = {id(t) for g in all_graphs(graph) for t in list(g.inputs) + list(g.outputs)}
        for g in all_graphs(graph):
            for t in ir.tensor_map(g).values():
                if type(t) is gs.Variable and id(t) not in io:
                    d = t.__dict__  # (gs's Tensor.__setattr__ costs a Python call per attribute)
                    d["shape"] = None
                    d["dtype"] = None
    saved = [(t, t.dtype, None if t.shape is None else list(t.shape)) for t in list(graph.inputs) + list(graph.outputs)
             if isinstance(t, gs.Variable)]  # (IR 3 models list initializers, gs.Constant, as inputs)
    try:
        if ctx is not None:
            ctx.cache.pop("shapes_inferred", None)
        infer_shapes(graph, ctx, light=light)
    finally:
        for t, dt, sh in saved:
            t.dtype, t.shape = dt, sh
    graph.__dict__["_graphopt_shapes_derived"] = True


def squeeze_axes(node: gs.Node, opset: int) -> list[int] | None:
    """Squeeze/Unsqueeze axes (attribute before opset 13, input from 13); None if absent or not constant."""
    if opset >= 13:
        if len(node.inputs) < 2 or is_omitted(node.inputs[1]):
            return None
        v = const_array(node.inputs[1])
        return None if v is None or v.dtype.kind not in "iu" else [int(x) for x in v.reshape(-1)]
    a = node.attrs.get("axes")
    return None if a is None else [int(x) for x in a]


def to_identity(node: gs.Node, src: gs.Tensor) -> None:
    """Turn ``node`` into ``Identity(src)`` (eliminate-noops then removes it where it may)."""
    node.op = "Identity"
    node.domain = ""
    node.attrs.clear()
    extra = list(node.outputs[1:])
    node.inputs.clear()
    node.inputs.append(src)
    for o in extra:
        node.outputs.remove(o)


# Ops eliminate-noops can only judge a no-op with the input's shape known (and Cast with its dtype);
# fold-constants infers shapes early, while that is cheap, when the graph has any of them.
SHAPE_CHECKED_NOOPS = frozenset({"Reshape", "Flatten", "Squeeze", "Expand", "Slice"})


def toposort(graph: gs.Graph, ctx, *, recurse: bool = True) -> None:
    """:func:`graphopt.ir.toposort`, skipped for a graph found sorted since the last change (the
    context's cache is cleared whenever a pass changes the graph).  The check walks every edge, and
    every -O1 pass would make it."""
    seen = ctx.cache.setdefault("toposorted", {}) if ctx is not None else {}
    if id(graph) in seen and seen[id(graph)] is graph:
        return
    ir.toposort(graph, recurse=recurse)
    for g in (all_graphs(graph) if recurse else (graph,)):
        seen[id(g)] = g


def drop_detached(graph: gs.Graph) -> None:
    """Remove nodes a pass detached (no inputs and no outputs left), in every scope.

    Cheaper than ``graph.cleanup()``; nodes that merely became dead are left to ``dce``.
    """
    for g in all_graphs(graph):
        if any(not n.outputs and not n.inputs for n in g.nodes):
            g.nodes = [n for n in g.nodes if n.outputs or n.inputs]


def contiguous(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array of the same shape (``np.ascontiguousarray`` turns 0-d arrays into 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def small_const(t: gs.Tensor | None, max_elems: int = 4096) -> np.ndarray | None:
    """``const_array`` for constants of at most ``max_elems`` elements, checked before loading any bytes."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        try:
            n = math.prod(t.shape)
        except Exception:
            return None
        if n > max_elems:
            return None
    return const_array(t) if (isinstance(t, gs.Constant) or (t.inputs and t.inputs[0].op == "Constant")) else None
