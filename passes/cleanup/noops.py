"""``eliminate-noops``: remove nodes that pass their input through unchanged.

Identity, Dropout at inference (mask unused), Cast to the input's own type, Reshape / Flatten /
Squeeze / Unsqueeze / Expand that keep the shape, Transpose with the identity permutation, Slice that
takes everything, Pad by zero, single-input Concat / Sum / Max / Min / Mean, Split into one, and
``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` where broadcasting leaves x's shape and type unchanged.

Shape questions use static dims only (from shape inference): a symbolic dim counts as unknown, so a
Reshape is removed only when it provably changes nothing for every value of the dynamic dims.  A
no-op whose output is a graph output is removed only when its producer can write the output directly
(the model's outputs keep their names, types and shapes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass
from graphopt.rewrite import bypass

from .. import _common as C

_BIG = 2**62  # an end index at least this large means "to the end" for any real dim


def _const_ints(t: gs.Tensor | None) -> list[int] | None:
    v = C.small_const(t)
    if v is None or v.dtype.kind not in "iu":
        return None
    return [int(x) for x in v.reshape(-1)]


def _same_dims(a: list | None, b: list | None) -> bool:
    """Two shapes equal for every value of the symbolic dims (static dims only; unknowns never match)."""
    return a is not None and b is not None and len(a) == len(b) and all(x is not None and x == y for x, y in zip(a, b))


def _neutral_broadcast(x: gs.Tensor, c: np.ndarray) -> bool:
    """``x op c`` has x's shape for every value of x's dynamic dims."""
    xs = C.shape_of(x)
    if xs is None or c.ndim > len(xs):
        return False
    for cd, xd in zip(reversed(c.shape), reversed(xs)):
        if cd != 1 and cd != xd:
            return False
    return True


class _Checks:
    """One check per op: returns None when the node is a no-op (to bypass), else the reason it is not."""

    def __init__(self, opset: int):
        self.opset = opset

    def check(self, node: gs.Node) -> str | None:
        fn = getattr(self, "c_" + node.op, None)
        if fn is None:
            return "not a no-op kind"
        return fn(node)

    def c_Identity(self, node):
        return None

    def c_Dropout(self, node):
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            return "the mask output is used"
        if len(node.inputs) > 2 and not C.is_omitted(node.inputs[2]):
            tm = C.const_array(node.inputs[2])
            if tm is None or bool(tm.reshape(-1)[0]):
                return "training_mode is not constant false"
        if self.opset < 7 and not node.attrs.get("is_test", 0):
            return "is_test is off"
        return None

    def c_Cast(self, node):
        src = C.np_dtype(node.inputs[0])
        try:
            dst = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs.get("to", 0))))
        except Exception:
            return "unknown target type"
        if src is None:
            return "input type unknown"
        return None if src == dst and dst.kind not in "OSU" else "changes the type"

    def c_Reshape(self, node):
        x = node.inputs[0]
        xs = C.shape_of(x)
        target = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if xs is None or target is None or len(target) != len(xs):
            return "shape unknown or rank changes"
        allowzero = int(node.attrs.get("allowzero", 0))
        minus = 0
        for t, d in zip(target, xs):
            if t == 0 and not allowzero:
                continue
            if t == -1:
                minus += 1
                continue
            if d is None or t != d:
                return "changes a dim"
        return None if minus <= 1 else "more than one -1"

    def c_Flatten(self, node):
        xs = C.shape_of(node.inputs[0])
        axis = int(node.attrs.get("axis", 1))
        if xs is None or len(xs) != 2:
            return "input is not known to be 2-D"
        return None if axis in (1, -1) else "changes the shape"

    def c_Squeeze(self, node):
        axes = C.squeeze_axes(node, self.opset)
        if axes is not None and len(axes) == 0:
            return None
        if axes is None:
            xs = C.shape_of(node.inputs[0])
            if xs is not None and all(d is not None and d != 1 for d in xs):
                return None
        return "removes dims"

    def c_Unsqueeze(self, node):
        axes = C.squeeze_axes(node, self.opset)
        return None if axes is not None and len(axes) == 0 else "adds dims"

    def c_Expand(self, node):
        x = node.inputs[0]
        shape = _const_ints(node.inputs[1])
        xs = C.shape_of(x)
        if shape is None or xs is None or len(shape) > len(xs):
            return "shape unknown or rank grows"
        for s, d in zip(reversed(shape), reversed(xs)):
            if s != 1 and s != d:
                return "broadcasts"
        return None

    def c_Transpose(self, node):
        perm = node.attrs.get("perm")
        if perm is None:
            xs = C.shape_of(node.inputs[0])
            return None if xs is not None and len(xs) <= 1 else "default permutation reverses the dims"
        return None if list(perm) == list(range(len(perm))) else "permutes"

    def c_Slice(self, node):
        x = node.inputs[0]
        if self.opset < 10:
            starts = [int(v) for v in node.attrs.get("starts", [])]
            ends = [int(v) for v in node.attrs.get("ends", [])]
            axes = node.attrs.get("axes")
            axes = None if axes is None else [int(a) for a in axes]
            steps = [1] * len(starts)
        else:
            starts, ends = _const_ints(node.inputs[1]), _const_ints(node.inputs[2])
            axes = _const_ints(node.inputs[3]) if len(node.inputs) > 3 and not C.is_omitted(node.inputs[3]) else None
            steps = _const_ints(node.inputs[4]) if len(node.inputs) > 4 and not C.is_omitted(node.inputs[4]) else None
            if starts is None or ends is None or (len(node.inputs) > 3 and not C.is_omitted(node.inputs[3]) and axes is None) \
                    or (len(node.inputs) > 4 and not C.is_omitted(node.inputs[4]) and steps is None):
                return "parameters not constant"
            steps = steps if steps is not None else [1] * len(starts)
        xs = C.shape_of(x)
        if axes is None:
            axes = list(range(len(starts)))
        if any(a < 0 for a in axes):
            if xs is None:
                return "negative axes with unknown rank"
            axes = [a + len(xs) if a < 0 else a for a in axes]
        for s, e, a, st in zip(starts, ends, axes, steps):
            if st != 1 or s not in (0,) and not (xs is not None and a < len(xs) and xs[a] is not None and s <= -xs[a]):
                return "does not start at 0 with step 1"
            d = xs[a] if xs is not None and a < len(xs) else None
            if not (e >= _BIG or (d is not None and e >= d)):
                return "does not take everything"
        return None

    def c_Pad(self, node):
        if self.opset < 11:
            pads = [int(p) for p in node.attrs.get("pads", [])]
        else:
            pads = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
            if pads is None:
                return "pads not constant"
        return None if pads is not None and all(p == 0 for p in pads) else "pads"

    def c_Concat(self, node):
        return None if len(node.inputs) == 1 else "several inputs"

    c_Sum = c_Max = c_Min = c_Mean = c_Concat

    def c_Split(self, node):
        return None if len(node.outputs) == 1 else "several outputs"

    def _neutral(self, node, value: float, commutative: bool) -> tuple[str | None, int]:
        a, b = node.inputs[0], node.inputs[1]
        for keep, other in ((0, b), (1, a)) if commutative else ((0, b),):
            c = C.small_const(other)
            x = node.inputs[keep]
            if c is None or c.dtype.kind not in "iuf" or C.np_dtype(x) != c.dtype:
                continue
            if c.size > 4096 or not bool(np.all(c == value)):
                continue
            if node.op == "Add" and c.dtype.kind == "f" and bool(np.any(np.signbit(c))) is False:
                pass  # x + (+0.0) turns -0.0 into +0.0: equal values, accepted as exact
            if _neutral_broadcast(x, c):
                return None, keep
        return "no neutral constant operand that keeps the shape", 0

    def neutral(self, node) -> tuple[str | None, int]:
        op = node.op
        if op == "Add":
            return self._neutral(node, 0, True)
        if op == "Sub":
            return self._neutral(node, 0, False)
        if op == "Mul":
            return self._neutral(node, 1, True)
        if op == "Div":
            return self._neutral(node, 1, False)
        return "not a no-op kind", 0


_KINDS = {"Identity", "Dropout", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Transpose", "Slice",
          "Pad", "Concat", "Sum", "Max", "Min", "Mean", "Split", "Add", "Sub", "Mul", "Div"}


@register_pass
class EliminateNoops(Pass):
    name = "eliminate-noops"
    description = "remove Identity, inference Dropout, same-type Cast, shape-keeping Reshape/Expand/..., x+0, x*1"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {"removed": 0}
        skipped: list[str] = []
        graphs = list(C.all_graphs(graph))
        derived = C.shapes_derived(graph)
        if C.input_shapes_pending(graph, ctx) or any(_needs_shapes(n, derived) for g in graphs for n in g.nodes):
            C.ensure_shapes(graph, ctx)
        self._all_outputs = {id(t) for g in graphs for t in g.outputs}
        self._stop = False
        opset = int(graph.opset)
        changed = False
        for g in graphs:
            if self._run_graph(g, ctx, opset, stats, skipped):
                changed = True
            if self._stop:
                break
        if changed:
            C.drop_detached(graph)
        return PassResult(changed, stats, skipped)

    def _why_not_bypass(self, node: gs.Node, g: gs.Graph, keep: int) -> str | None:
        src, dst = node.inputs[keep], node.outputs[0]
        if id(dst) in self._all_outputs and not any(o is dst for o in g.outputs):
            return "its output is an output of a nested graph"
        if any(o is dst for o in g.outputs):
            p = src.inputs[0] if src.inputs else None
            if p is None or isinstance(src, gs.Constant) or any(o is src for o in g.outputs) or len(src.outputs) != 1 \
                    or id(src) in self._all_outputs or not any(n is p for n in g.nodes):
                return "its output is a graph output and its input cannot take the output's name"
        return None

    def _run_graph(self, g: gs.Graph, ctx: PassContext, opset: int, stats: dict, skipped: list[str]) -> bool:
        checks = _Checks(opset)
        changed = False
        for node in list(g.nodes):
            if node.op not in _KINDS or (node.domain or "") not in ("", "ai.onnx") or not node.inputs or not node.outputs:
                continue
            if C.is_omitted(node.inputs[0]):
                continue
            keep = 0
            if node.op in ("Add", "Sub", "Mul", "Div"):
                if len(node.inputs) != 2:
                    continue
                reason, keep = checks.neutral(node)
            else:
                reason = checks.check(node)
            if reason is not None:
                continue
            if node.op == "Dropout" and len(node.outputs) > 1 and id(node.outputs[1]) in self._all_outputs:
                continue  # the mask is a graph output
            why = self._why_not_bypass(node, g, keep)
            if why is not None:
                skipped.append(f"{node.name or node.op}: {node.op} is a no-op but {why}; kept")
                continue
            if not ctx.allow_rewrite(f"remove {node.op} {node.name}"):
                self._stop = True
                return changed
            extra = list(node.outputs[1:])
            bypass(node, g, keep=keep)
            for o in extra:  # Dropout's unused mask
                o.inputs.clear()
            stats["removed"] += 1
            stats[node.op] = stats.get(node.op, 0) + 1
            changed = True
        return changed


def _needs_shapes(node: gs.Node, derived: bool) -> bool:
    """Does a check on this node depend on shapes/dtypes that are unknown, or not yet derived from the
    inputs (imported value_info may be stale)?"""
    op = node.op
    if not node.inputs or C.is_omitted(node.inputs[0]):
        return False
    if op == "Cast":
        return not derived or C.np_dtype(node.inputs[0]) is None
    if op in C.SHAPE_CHECKED_NOOPS or (op == "Transpose" and "perm" not in node.attrs):
        return not derived or C.shape_of(node.inputs[0]) is None
    if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
        neutral = 0 if op in ("Add", "Sub") else 1
        for x, c in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            if isinstance(c, gs.Constant) and math.prod(c.shape) <= 16 and \
                    (not derived or C.shape_of(x) is None or C.np_dtype(x) is None):
                if bool(np.all(np.asarray(c.values) == neutral)):
                    return True
    return False
