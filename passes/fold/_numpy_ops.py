"""Exact numpy kernels for the small ops that constant folding meets most (shape arithmetic, casts,
layout ops, integer/float elementwise).  Each kernel follows the ONNX operator spec for the opsets it
claims; anything it does not cover exactly raises :class:`Unsupported`, and the caller falls back to
``onnx.reference`` / onnxruntime.  Building a one-node model per fold costs milliseconds; these cost
microseconds, which is what keeps -O1 close to load+save time.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs


class Unsupported(Exception):
    """The fast path does not cover this case exactly: use the reference evaluator."""


_NUMERIC = {np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                  np.uint64, np.float16, np.float32, np.float64)}
_INT = {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)}


def _numeric(*arrays: np.ndarray | None) -> None:
    for a in arrays:
        if a is not None and a.dtype not in _NUMERIC:
            raise Unsupported(f"dtype {a.dtype}")


def _ints(a: np.ndarray | None) -> list[int]:
    if a is None:
        raise Unsupported("missing input")
    return [int(v) for v in np.asarray(a).reshape(-1)]


def _axes(node: gs.Node, ins: list, opset: int, idx: int = 1) -> list[int] | None:
    if opset >= 13 and node.op in ("Squeeze", "Unsqueeze", "ReduceSum") or opset >= 18 and node.op.startswith("Reduce"):
        a = ins[idx] if len(ins) > idx else None
        return None if a is None else _ints(a)
    v = node.attrs.get("axes")
    return None if v is None else [int(x) for x in v]


def _norm(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise Unsupported("axis out of range")
    return axis + rank if axis < 0 else axis


def k_identity(node, ins, opset):
    return [ins[0]]


def k_shape(node, ins, opset):
    s = np.array(ins[0].shape, dtype=np.int64)
    r = len(s)
    start = attr(node, "start", 0)
    end = node.attrs.get("end")
    start = min(max(start + r if start < 0 else start, 0), r)
    end = r if end is None else int(end)
    end = min(max(end + r if end < 0 else end, 0), r)
    return [s[start:end].copy()]


def k_size(node, ins, opset):
    return [np.array(ins[0].size, dtype=np.int64)]


def k_gather(node, ins, opset):
    data, idx = ins[0], ins[1]
    axis = _norm(attr(node, "axis", 0), data.ndim)
    if idx.dtype not in (np.dtype(np.int64), np.dtype(np.int32)):
        raise Unsupported("index dtype")
    dim = data.shape[axis]
    if idx.size and (idx.min() < -dim or idx.max() >= dim):
        raise Unsupported("index out of range")
    return [np.take(data, idx.astype(np.int64), axis=axis)]


def k_unsqueeze(node, ins, opset):
    x = ins[0]
    axes = _axes(node, ins, opset)
    if axes is None:
        raise Unsupported("Unsqueeze without axes")
    r = x.ndim + len(axes)
    axes = sorted(_norm(a, r) for a in axes)
    if len(set(axes)) != len(axes):
        raise Unsupported("repeated axes")
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return [x.reshape(shape)]


def k_squeeze(node, ins, opset):
    x = ins[0]
    axes = _axes(node, ins, opset)
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    axes = [_norm(a, x.ndim) for a in axes]
    if any(x.shape[a] != 1 for a in axes):
        raise Unsupported("squeezing a dim that is not 1")
    return [x.reshape([d for i, d in enumerate(x.shape) if i not in set(axes)])]


def k_concat(node, ins, opset):
    arrays = [a for a in ins if a is not None]
    if not arrays:
        raise Unsupported("no inputs")
    axis = _norm(attr(node, "axis", 0), arrays[0].ndim)
    if len({a.dtype for a in arrays}) != 1:
        raise Unsupported("mixed dtypes")
    return [np.concatenate(arrays, axis=axis)]


_CAST_OK = _NUMERIC


def k_cast(node, ins, opset):
    x = ins[0]
    to = attr(node, "to", 0)
    try:
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
    except Exception:
        raise Unsupported("cast target") from None
    if x.dtype not in _CAST_OK or dt not in _CAST_OK:
        raise Unsupported(f"cast {x.dtype}->{dt}")
    if x.dtype.kind == "f" and dt.kind in "iub" and dt != np.dtype(np.bool_):
        if not np.isfinite(x).all():
            raise Unsupported("non-finite float to int")
        info = np.iinfo(dt)
        t = np.trunc(x.astype(np.float64))
        if t.size and (t.min() < info.min or t.max() > info.max):
            raise Unsupported("float out of the integer range")
        return [t.astype(dt)]
    if x.dtype.kind in "iu" and dt.kind in "iu":
        return [x.astype(dt)]  # two's complement wrap, like a C cast
    return [x.astype(dt)]


def _slice_params(node, ins, opset, x):
    if opset < 10:
        starts = [int(v) for v in node.attrs.get("starts", [])]
        ends = [int(v) for v in node.attrs.get("ends", [])]
        axes = node.attrs.get("axes")
        axes = list(range(len(starts))) if axes is None else [int(v) for v in axes]
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        raise Unsupported("Slice parameter lengths differ")
    axes = [_norm(a, x.ndim) for a in axes]
    if len(set(axes)) != len(axes) or any(s == 0 for s in steps):
        raise Unsupported("bad Slice parameters")
    return starts, ends, axes, steps


def slice_index(dim: int, start: int, end: int, step: int) -> slice:
    """The Python slice equal to ONNX Slice on one axis of length ``dim`` (clamping per the spec)."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start = min(max(start, 0), dim)
        end = min(max(end, 0), dim)
        return slice(start, end, step)
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    return slice(start, None if end == -1 else end, step)


def k_slice(node, ins, opset):
    x = ins[0]
    starts, ends, axes, steps = _slice_params(node, ins, opset, x)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice_index(x.shape[a], s, e, st)
    return [x[tuple(index)].copy()]


def reshape_target(in_shape: list[int], shape: list[int], allowzero: int) -> list[int]:
    out = []
    for i, d in enumerate(shape):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                raise Unsupported("Reshape copies a dim that does not exist")
            out.append(in_shape[i])
        else:
            out.append(d)
    if out.count(-1) > 1 or any(d < -1 for d in out):
        raise Unsupported("bad Reshape target")
    total = int(np.prod(in_shape, dtype=np.int64))
    if -1 in out:
        rest = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        if rest == 0 or total % rest:
            raise Unsupported("Reshape size mismatch")
        out[out.index(-1)] = total // rest
    if int(np.prod(out, dtype=np.int64)) != total:
        raise Unsupported("Reshape size mismatch")
    return out


def k_reshape(node, ins, opset):
    x = ins[0]
    if opset < 5:
        shape = [int(v) for v in node.attrs.get("shape", [])]
    else:
        shape = _ints(ins[1])
    return [x.reshape(reshape_target(list(x.shape), shape, attr(node, "allowzero", 0)))]


def k_flatten(node, ins, opset):
    x = ins[0]
    axis = attr(node, "axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    if not 0 <= axis <= x.ndim:
        raise Unsupported("axis")
    a = int(np.prod(x.shape[:axis], dtype=np.int64))
    return [x.reshape(a, -1 if x.size else int(np.prod(x.shape[axis:], dtype=np.int64)))]


def k_transpose(node, ins, opset):
    x = ins[0]
    perm = node.attrs.get("perm")
    perm = list(range(x.ndim))[::-1] if perm is None else [int(p) for p in perm]
    if sorted(perm) != list(range(x.ndim)):
        raise Unsupported("bad perm")
    return [np.transpose(x, perm).copy(order="C")]


def _same_type(ins):
    _numeric(*ins)
    if len({a.dtype for a in ins}) != 1:
        raise Unsupported("mixed dtypes")


def _binary(fn: Callable, *, int_only: bool = False, float_ok: bool = True):
    def k(node, ins, opset):
        a, b = ins[0], ins[1]
        _same_type([a, b])
        if a.dtype == np.bool_:
            raise Unsupported("bool arithmetic")
        if not float_ok and a.dtype.kind == "f":
            raise Unsupported("float")
        with np.errstate(all="ignore"):
            r = fn(a, b)
        return [np.asarray(r, dtype=a.dtype)]

    return k


def _int_div(a, b):
    if a.dtype.kind in "iu":
        if (b == 0).any():
            raise Unsupported("integer division by zero")
        q = np.abs(a.astype(np.int64) if a.dtype.kind == "i" else a) // np.abs(b.astype(np.int64) if b.dtype.kind == "i" else b)
        if a.dtype.kind == "i":
            q = np.where((a < 0) != (b < 0), -q, q)
        return q.astype(a.dtype)
    return np.divide(a, b)


def _compare(fn: Callable):
    def k(node, ins, opset):
        a, b = ins[0], ins[1]
        _same_type([a, b])
        return [np.asarray(fn(a, b), dtype=np.bool_)]

    return k


def _logic(fn: Callable):
    def k(node, ins, opset):
        if any(a.dtype != np.bool_ for a in ins):
            raise Unsupported("logic on non-bool")
        return [np.asarray(fn(*ins), dtype=np.bool_)]

    return k


def k_neg(node, ins, opset):
    _numeric(ins[0])
    if ins[0].dtype.kind == "u" or ins[0].dtype == np.bool_:
        raise Unsupported("Neg of unsigned")
    return [np.negative(ins[0])]


def k_abs(node, ins, opset):
    _numeric(ins[0])
    return [np.abs(ins[0])]


def k_where(node, ins, opset):
    c, a, b = ins
    if c.dtype != np.bool_ or a.dtype != b.dtype:
        raise Unsupported("Where types")
    return [np.where(c, a, b).astype(a.dtype)]


def k_minmax(fn):
    def k(node, ins, opset):
        arrays = [a for a in ins if a is not None]
        _same_type(arrays)
        if arrays[0].dtype.kind == "f":
            raise Unsupported("float Min/Max (NaN rules)")
        r = arrays[0]
        for a in arrays[1:]:
            r = fn(r, a)
        return [np.asarray(r, dtype=arrays[0].dtype)]

    return k


def constant_of_shape_value(node) -> np.ndarray:
    v = node.attrs.get("value")
    if v is None:
        return np.zeros(1, dtype=np.float32)
    arr = np.asarray(v.values) if isinstance(v, gs.Constant) else np.asarray(v)
    return arr.reshape(-1)[:1]


def k_constant_of_shape(node, ins, opset):
    shape = _ints(ins[0])
    if any(d < 0 for d in shape):
        raise Unsupported("negative dim")
    v = constant_of_shape_value(node)
    return [np.full(shape, v[0], dtype=v.dtype)]


def range_count(start, limit, delta) -> int:
    if delta == 0:
        raise Unsupported("Range with delta 0")
    return max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)


def k_range(node, ins, opset):
    start, limit, delta = ins
    _same_type([start, limit, delta])
    if start.dtype.kind not in "iu":
        raise Unsupported("float Range")
    s, l, d = int(start), int(limit), int(delta)
    if d == 0:
        raise Unsupported("delta 0")
    n = max(-((s - l) // d), 0)  # ceil((limit - start) / delta) in exact integer arithmetic
    return [(s + np.arange(n, dtype=np.int64) * d).astype(start.dtype)]


def k_expand(node, ins, opset):
    x, shape = ins[0], _ints(ins[1])
    try:
        out = np.broadcast_shapes(x.shape, tuple(shape))
    except ValueError:
        raise Unsupported("Expand shapes do not broadcast") from None
    return [np.broadcast_to(x, out).copy(order="C")]


def k_tile(node, ins, opset):
    x, reps = ins[0], _ints(ins[1])
    if len(reps) != x.ndim or any(r < 0 for r in reps):
        raise Unsupported("Tile repeats")
    return [np.tile(x, reps)]


def k_constant(node, ins, opset):
    from passes._common import constant_node_value

    v = constant_node_value(node)
    if v is None:
        raise Unsupported("Constant form")
    return [v]


def attr(node, name, default):
    v = node.attrs.get(name, default)
    return int(v) if v is not None else default


KERNELS: dict[str, Callable] = {
    "Identity": k_identity, "Shape": k_shape, "Size": k_size, "Gather": k_gather, "Unsqueeze": k_unsqueeze,
    "Squeeze": k_squeeze, "Concat": k_concat, "Cast": k_cast, "Slice": k_slice, "Reshape": k_reshape,
    "Flatten": k_flatten, "Transpose": k_transpose,
    "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply), "Div": _binary(_int_div),
    "Equal": _compare(np.equal), "Less": _compare(np.less), "Greater": _compare(np.greater),
    "LessOrEqual": _compare(np.less_equal), "GreaterOrEqual": _compare(np.greater_equal),
    "And": _logic(np.logical_and), "Or": _logic(np.logical_or), "Xor": _logic(np.logical_xor), "Not": _logic(np.logical_not),
    "Neg": k_neg, "Abs": k_abs, "Where": k_where, "Min": k_minmax(np.minimum), "Max": k_minmax(np.maximum),
    "ConstantOfShape": k_constant_of_shape, "Range": k_range, "Expand": k_expand, "Tile": k_tile,
    "Constant": k_constant,
}


def run_kernel(node: gs.Node, ins: list, opset: int) -> list[np.ndarray] | None:
    """Evaluate ``node`` with a numpy kernel, or None when no kernel covers it exactly."""
    k = KERNELS.get(node.op)
    if k is None:
        return None
    if node.op not in ("Constant", "Concat", "Min", "Max") and any(a is None for a in ins[:1]):
        return None
    try:
        out = k(node, ins, opset)
    except (Unsupported, IndexError, ValueError, TypeError, OverflowError):
        return None
    if len(out) != len([t for t in node.outputs]):
        return None
    return [np.asarray(o) for o in out]
