"""``fold-constants``: evaluate nodes whose inputs are constant, and shape arithmetic whose needed dims
are static.

Two kinds of folding:

* **Constant inputs.** A node whose inputs are all constant is evaluated: exact numpy kernels for the
  small ops that dominate exported graphs (``_numpy_ops``), ``onnx.reference`` then onnxruntime for the
  rest.  ``Constant`` nodes become initializers.
* **Shape-aware.** ``Shape``/``Size`` of a tensor with known dims, and the ops exported models build on
  them (Gather, Slice, Concat, Unsqueeze, Squeeze, Cast, Reshape, arithmetic, comparisons, Where), are
  propagated as *partially known* int vectors: ``Shape(x)[1]`` folds to 3 when x is ``[N, 3, H, W]``,
  while anything that needs ``N`` stays computed at run time.  Dims are known only from shape
  inference (``graphopt.shapes``), so symbolic dims stay symbolic unless the user fixed them with
  ``--input-shape``.

Size limit (``size-limit``, default 1 MiB per produced tensor): a result is kept if it is no larger
than the limit or than the largest constant input it was computed from (so a Transpose of a weight
folds).  Generators (ConstantOfShape, Range, Expand, Tile) fold only within the limit, checked before
anything is allocated.  Nodes left dead (a Shape whose readers all folded) are for ``dce``.  Q/DQ and random ops are never folded; nothing that produces a graph output is
replaced (the output must stay produced by a node).  A node that fails to evaluate is left alone, with
the reason in the report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass
from graphopt import ir

from .. import _common as C
from . import _numpy_ops as K

NEVER_FOLD = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan",
}
GENERATORS = {"ConstantOfShape", "Range", "Expand", "Tile"}
_FOLDABLE_DTYPES = K._NUMERIC
_SHAPE_OPS = {"Shape", "Size"}
_LAYOUT_OPS = ("Gather", "Slice", "Unsqueeze", "Squeeze", "Reshape", "Concat", "Flatten", "Transpose")
_ELEMENTWISE_OPS = ("Add", "Sub", "Mul", "Div", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Min", "Max",
                    "And", "Or", "Not", "Neg", "Abs")
# what _eval_partial propagates partially known int vectors through (besides Shape and Size)
_PARTIAL_OPS = frozenset(("Identity", "Cast", "Where") + _LAYOUT_OPS + _ELEMENTWISE_OPS)


def _is_const(t) -> bool:
    return isinstance(t, gs.Constant) or C.is_omitted(t)


def _plain_constant(t: gs.Constant) -> bool:
    """A constant whose numpy values are exactly what gets exported (no bfloat16/float8 re-typing)."""
    try:
        dt = np.dtype(t.dtype)
    except TypeError:
        return False
    ed = t._export_dtype
    if ed is not None:
        try:
            ed = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ed)) if isinstance(ed, int) else np.dtype(ed)
        except Exception:
            return False
        if ed != dt:
            return False
    return dt in _FOLDABLE_DTYPES


def evaluate_node(node: gs.Node, opset: int) -> list[np.ndarray]:
    """Run one node on constant inputs (onnx.reference first, onnxruntime as the fallback)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    proto = OnnxExporter.export_node(node)
    inits = [onnx.numpy_helper.from_array(np.asarray(t.values), t.name) for t in node.inputs if isinstance(t, gs.Constant)]
    outs = [onnx.helper.make_empty_tensor_value_info(t.name) for t in node.outputs if t.name]
    g = onnx.helper.make_graph([proto], "fold", [], outs, initializer=inits)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        from onnx.reference import ReferenceEvaluator

        res = ReferenceEvaluator(model).run(None, {})
    except Exception as ref_err:
        try:
            from graphopt.verify import make_session

            res = make_session(model).run(None, {})
        except Exception:
            raise ref_err from None
    for r in res:
        # a sequence (list), an optional (None) or a map (dict) cannot become a tensor constant:
        # np.asarray would silently turn a sequence of tensors into one stacked tensor
        if not isinstance(r, (np.ndarray, np.generic)):
            kind = {list: "sequence", tuple: "sequence", dict: "map", type(None): "empty optional"}.get(type(r), type(r).__name__)
            raise ValueError(f"{node.op} produces a {kind}, not a tensor: only tensors fold into constants")
    return [np.asarray(r) for r in res]


# --------------------------------------------------------------------------------------------------
# Partially known int vectors (shape arithmetic)
# --------------------------------------------------------------------------------------------------


class Partial:
    """An int/bool tensor (rank <= 1 in practice) of which some elements are known."""

    __slots__ = ("values", "known")

    def __init__(self, values: np.ndarray, known: np.ndarray):
        self.values = values
        self.known = known

    @property
    def full(self) -> bool:
        return bool(self.known.all())


def _generator_bytes(node: gs.Node, ins: list) -> int | None:
    """Bytes a generator would produce, computed before allocating anything (None: cannot tell)."""
    try:
        if node.op == "ConstantOfShape":
            v = K.constant_of_shape_value(node)
            return int(np.prod([int(d) for d in ins[0].reshape(-1)], dtype=np.float64)) * v.dtype.itemsize
        if node.op == "Range":
            return K.range_count(ins[0], ins[1], ins[2]) * ins[0].dtype.itemsize
        if node.op == "Expand":
            out = np.broadcast_shapes(ins[0].shape, tuple(int(d) for d in ins[1].reshape(-1)))
            return int(np.prod(out, dtype=np.float64)) * ins[0].dtype.itemsize
        if node.op == "Tile":
            return int(ins[0].nbytes * np.prod([int(r) for r in ins[1].reshape(-1)], dtype=np.float64))
    except Exception:
        return None
    return None


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    description = ("evaluate nodes whose inputs are constant, and Shape/Size arithmetic whose needed dims are "
                   "static (size-limited; never Q/DQ or random ops)")

    @dataclass(frozen=True)
    class Options:
        size_limit: int = 1 << 20

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"folded": 0, "shape_folded": 0, "constant_nodes": 0, "failed": 0, "too_large": 0, "fast": 0, "fallback": 0}
        skipped: list[str] = []
        self._ctx = ctx
        self._stats = stats
        self._skipped = skipped
        self._partial: dict[int, Partial] = {}
        self._stop = False
        C.toposort(graph, ctx)
        self._all_outputs = {id(t) for g in C.all_graphs(graph) for t in g.outputs}
        if self._needs_shapes(graph) or C.input_shapes_pending(graph, ctx) or self._shapes_cheap_and_likely(graph):
            C.ensure_shapes(graph, ctx)
        self._fold(graph, int(graph.opset))
        changed = stats["folded"] + stats["shape_folded"] + stats["constant_nodes"] > 0
        if changed:
            C.drop_detached(graph)
        return PassResult(changed, {k: v for k, v in stats.items()}, skipped)

    @staticmethod
    def _shapes_cheap_and_likely(graph: gs.Graph) -> bool:
        """Shapes are cheapest now, while the graph is still the model it was imported from (inferred
        on that model, with no export); infer them now if a later cleanup pass will likely ask (a
        Reshape/Flatten/Squeeze/Expand/Slice/Cast to check for a no-op) and this pass may change the
        graph first."""
        if C.shapes_derived(graph) or ir.pristine_source(graph) is None:
            return False
        return any(n.op in C.SHAPE_CHECKED_NOOPS or n.op == "Cast" for n in graph.nodes)

    @staticmethod
    def _needs_shapes(graph: gs.Graph) -> bool:
        for g in C.all_graphs(graph):
            for n in g.nodes:
                if n.op in _SHAPE_OPS and n.inputs and not _is_const(n.inputs[0]) and \
                        (C.shape_of(n.inputs[0]) is None or not C.shapes_derived(graph)):
                    return True
        return False

    # ----------------------------------------------------------------------------------------------
    def _fold(self, graph: gs.Graph, opset: int) -> None:
        outputs = self._all_outputs  # outputs of this graph or of any nested one
        for node in list(graph.nodes):
            if self._stop:
                return
            subs = C.subgraphs_of(node)
            for sg in subs:
                self._fold(sg, opset)
            if subs or node.op in NEVER_FOLD or (node.domain or "") not in ("", "ai.onnx"):
                continue
            if not node.outputs or any(id(t) in outputs for t in node.outputs):
                continue  # a graph output must stay produced by a node
            if node.op == "Constant":
                self._fold_constant_node(node)
            elif all(_is_const(t) for t in node.inputs):
                self._fold_node(node, opset)
            elif len(node.outputs) == 1:
                self._fold_partial(node, opset)

    def _replace(self, node: gs.Node, values: list[np.ndarray], what: str) -> bool:
        if not self._ctx.allow_rewrite(f"{what} {node.op} {node.name}"):
            self._stop = True
            return False
        for t, v in zip(node.outputs, values):
            if t.name:
                v = C.contiguous(v)
                # a kernel may hand back (a view of) a read-only input (Reshape, Squeeze...): a
                # constant's values must be its own to edit
                t.to_constant(v if v.flags.writeable else v.copy())
        node.outputs.clear()
        node.inputs.clear()
        return True

    def _fold_constant_node(self, node: gs.Node) -> None:
        v = node.attrs.get("value")
        out = node.outputs[0]
        if isinstance(v, gs.Constant):
            if not self._ctx.allow_rewrite(f"constant node {node.name}"):
                self._stop = True
                return
            out.to_constant(v._values, export_dtype=v._export_dtype)
            node.outputs.clear()
            node.inputs.clear()
            self._stats["constant_nodes"] += 1
            return
        arr = C.constant_node_value(node)
        if arr is None:
            self._skipped.append(f"{node.name or node.op}: Constant in a form that is not folded ({', '.join(node.attrs)})")
            return
        if self._replace(node, [arr], "constant node"):
            self._stats["constant_nodes"] += 1

    def _fold_node(self, node: gs.Node, opset: int) -> None:
        ins: list[np.ndarray | None] = []
        for t in node.inputs:
            if C.is_omitted(t):
                ins.append(None)
            elif not _plain_constant(t):
                self._skipped.append(f"{node.name or node.op}: input '{t.name}' has a type folding does not handle")
                return
            else:
                ins.append(ir.const_view(t))  # read-only; kernels never write into their inputs
        limit = self.options.size_limit
        if node.op in GENERATORS:
            nbytes = _generator_bytes(node, ins)
            if nbytes is None or nbytes > limit:
                self._stats["too_large"] += 1
                self._skipped.append(f"{node.name or node.op}: {node.op} would produce "
                                     f"{'an unknown number of' if nbytes is None else nbytes} bytes (size-limit {limit})")
                return
        else:
            limit = max(limit, max((a.nbytes for a in ins if a is not None), default=0))
        values = K.run_kernel(node, ins, opset)  # one value per output
        if values is not None:
            self._stats["fast"] += 1
        else:
            try:
                named_values = evaluate_node(node, opset)  # one value per *named* output
                self._stats["fallback"] += 1
                it = iter(named_values)
                values = [next(it, None) if t.name else np.zeros(0, np.float32) for t in node.outputs]
                if any(v is None for v in values):
                    raise ValueError(f"evaluation returned {len(named_values)} values")
            except Exception as e:
                self._stats["failed"] += 1
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self._skipped.append(f"{node.name or node.op}: cannot evaluate {node.op}: {msg[:200]}")
                return
        for t, v in zip(node.outputs, values):
            if not t.name:
                continue
            if v.dtype not in _FOLDABLE_DTYPES:
                self._skipped.append(f"{node.name or node.op}: result of type {v.dtype} is not folded")
                return
            want = C.np_dtype(t)
            if want is not None and want != v.dtype:
                self._stats["failed"] += 1
                self._skipped.append(f"{node.name or node.op}: evaluated to {v.dtype} but the graph says {want}")
                return
        if any(v.nbytes > limit for v, t in zip(values, node.outputs) if t.name):
            self._stats["too_large"] += 1
            self._skipped.append(f"{node.name or node.op}: {node.op} result of {max(v.nbytes for v in values)} bytes is over the size limit")
            return
        if self._replace(node, values, "fold"):
            self._stats["folded"] += 1

    # ----------------------------------------------------------------------------------------------
    def _partial_of(self, t: gs.Tensor) -> Partial | None:
        p = self._partial.get(id(t))
        if p is not None:
            return p
        if isinstance(t, gs.Constant) and _plain_constant(t) and np.dtype(t.dtype).kind in "iub" \
                and math.prod(t.shape) <= 64:
            v = np.asarray(t.values)
            return Partial(v, np.ones(v.shape, dtype=bool))
        return None

    def _fold_partial(self, node: gs.Node, opset: int) -> None:
        try:
            p = self._eval_partial(node, opset)
        except (K.Unsupported, IndexError, ValueError, TypeError, OverflowError):
            return
        if p is None:
            return
        out = node.outputs[0]
        want = C.np_dtype(out)
        if want is not None and want != p.values.dtype:
            return
        if p.full:
            if self._replace(node, [p.values.copy()], "fold shape"):
                self._stats["shape_folded"] += 1
        else:
            self._partial[id(out)] = p

    def _eval_partial(self, node: gs.Node, opset: int) -> Partial | None:
        op = node.op
        ins = node.inputs
        if op == "Shape":
            shape = C.shape_of(ins[0])
            if shape is None:
                return None
            r = len(shape)
            start = K.attr(node, "start", 0)
            end = node.attrs.get("end")
            start = min(max(start + r if start < 0 else start, 0), r)
            end = r if end is None else int(end)
            end = min(max(end + r if end < 0 else end, 0), r)
            dims = shape[start:end]
            vals = np.array([d if d is not None else 0 for d in dims], dtype=np.int64)
            return Partial(vals, np.array([d is not None for d in dims], dtype=bool))
        if op == "Size":
            s = C.static_shape(ins[0])
            return None if s is None else Partial(np.array(int(np.prod(s, dtype=np.int64)), dtype=np.int64), np.array(True))
        if op not in _PARTIAL_OPS or not ins:
            return None
        if op != "Where" and (C.is_omitted(ins[0]) or self._partial_of(ins[0]) is None):
            return None  # (most nodes: their first input is no int vector; the rest need not be looked at)
        parts = [None if C.is_omitted(t) else self._partial_of(t) for t in ins]
        if parts[0] is None and (op != "Where" or len(parts) < 3):
            return None
        if op == "Identity":
            return parts[0]
        if op in ("Cast",):
            to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(K.attr(node, "to", 0)))
            if to.kind not in "iu" or parts[0].values.dtype.kind not in "iu":
                return None
            return Partial(parts[0].values.astype(to), parts[0].known)
        if op in _LAYOUT_OPS:
            # layout ops move elements around: apply the same kernel to values and to the known mask
            const_ins = []
            for i, (t, p) in enumerate(zip(ins, parts)):
                if i == 0 or op == "Concat":
                    const_ins.append(p)
                elif C.is_omitted(t):
                    const_ins.append(None)
                elif p is not None and p.full:
                    const_ins.append(p.values)
                else:
                    return None
            if any(x is None for x in const_ins[: (len(const_ins) if op == "Concat" else 1)]):
                return None
            if op == "Concat":
                if len({p.values.dtype for p in const_ins}) != 1:
                    return None
                v = K.run_kernel(node, [p.values for p in const_ins], opset)
                k = K.run_kernel(node, [p.known for p in const_ins], opset)
            else:
                v = K.run_kernel(node, [parts[0].values] + const_ins[1:], opset)
                k = K.run_kernel(node, [parts[0].known] + const_ins[1:], opset)
            if v is None or k is None:
                return None
            return Partial(v[0], k[0].astype(bool))
        if op in _ELEMENTWISE_OPS:
            if any(p is None for p in parts):
                return None
            filled = [np.where(p.known, p.values, np.ones_like(p.values)) for p in parts]
            v = K.run_kernel(node, filled, opset)
            if v is None:
                return None
            known = parts[0].known
            for p in parts[1:]:
                known = known & p.known
            # an absorbing element decides the result whatever the other operand is: x * 0 (integers only,
            # no NaN/inf), x AND false, x OR true
            absorbing = {"Mul": 0, "And": False, "Or": True}.get(op)
            if absorbing is not None and len(parts) == 2 and (op != "Mul" or parts[0].values.dtype.kind in "iu"):
                for p in parts:
                    known = known | (p.known & (p.values == absorbing))
            known = np.broadcast_to(known, v[0].shape).copy()
            return Partial(v[0], known)
        if op == "Where":
            if any(p is None for p in parts):
                return None
            c, a, b = parts
            if c.values.dtype != np.bool_:
                return None
            v = K.run_kernel(node, [c.values, a.values, b.values], opset)
            if v is None:
                return None
            known = c.known & np.where(c.values, a.known, b.known)
            return Partial(v[0], np.broadcast_to(known, v[0].shape).copy())
        return None
