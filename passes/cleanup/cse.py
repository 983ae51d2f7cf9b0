"""``cse``: common-subexpression elimination.

* Identical initializers (same dtype, shape and bytes, compared bit for bit so NaN and -0.0 count) are
  merged into one, per graph scope.  Candidates are grouped by a cheap key first (dtype, shape, a
  sample of the bytes); only colliding tensors are read and compared in full.
* Identical nodes (same op, domain, attributes and the very same input tensors) are merged: readers of
  the duplicate read the first one's outputs.  Random ops and nodes with subgraphs are never merged.

Graph inputs and outputs are never merged away (a duplicate whose output is a graph output stays).
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass
from graphopt import ir
from graphopt.rewrite import replace_uses

from .. import _common as C

NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
                    "Dropout"}


_NUMERIC = {np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                  np.uint64, np.float16, np.float32, np.float64)}


_IS_NUMERIC: dict = {}  # dtype (as a Constant holds it) -> in _NUMERIC


def _mergeable(t: gs.Constant) -> bool:
    """Plain numeric values that export back exactly (no strings, no bfloat16/float8 re-typing)."""
    if t._export_dtype is not None:
        return False
    dtype = t._values.dtype
    try:
        return _IS_NUMERIC[dtype]
    except KeyError:
        try:
            ok = np.dtype(dtype) in _NUMERIC
        except TypeError:
            ok = False
        _IS_NUMERIC[dtype] = ok
        return ok
    except TypeError:  # (an unhashable dtype)
        return False


_SAMPLE = 256  # bytes from each end of a constant in its fingerprint


class _Facts:
    """What cse knows of one constant's values, kept on the constant across passes (and fixpoint
    iterations) for as long as it holds the very same values object: passes give a constant new
    values by assigning a new object, never by writing into the old one."""

    __slots__ = ("values", "meta", "sample", "digest")

    def __init__(self, values, meta: tuple):
        self.values = values  # holding the values object keeps its id from being reused
        self.meta = meta
        self.sample: bytes | None = None
        self.digest: bytes | None = None


def _meta(t: gs.Constant) -> tuple:
    v = t._values
    return (v.dtype, tuple(v.shape), t._export_dtype)


def _facts(t: gs.Constant) -> _Facts:
    f = t.__dict__.get("_graphopt_cse")
    if f is None or f.values is not t._values or f.meta[2] is not t._export_dtype:
        f = _Facts(t._values, _meta(t))
        t.__dict__["_graphopt_cse"] = f
    return f


def _read(t: gs.Constant, f: _Facts) -> None:
    """After reading ``t``'s values, which may have loaded them: the same values in a new object."""
    if f.values is not t._values:
        f.values = t._values
        f.meta = _meta(t)


def _sample(t: gs.Constant, f: _Facts) -> bytes:
    if f.sample is None:
        f.sample = _sample_uncached(t)
        _read(t, f)
    return f.sample


def _sample_uncached(t: gs.Constant) -> bytes:
    """A cheap fingerprint (``_SAMPLE`` bytes from both ends) that does not decode lazy weights; for a
    constant of at most ``2 * _SAMPLE`` bytes it holds every byte, so equal samples mean equal values."""
    v = t._values
    raw = getattr(v, "raw", None)  # the weight's bytes in the file (no copy)
    if raw is not None:
        return bytes(raw[:_SAMPLE]) + bytes(raw[-_SAMPLE:])
    proto = getattr(v, "tensor", None)
    if proto is not None and proto.HasField("raw_data"):
        raw = proto.raw_data
        return raw[:_SAMPLE] + raw[-_SAMPLE:]
    a = np.ascontiguousarray(np.asarray(t.values)).view(np.uint8).reshape(-1)
    return a[:_SAMPLE].tobytes() + a[-_SAMPLE:].tobytes()


def _content_digest(t: gs.Constant, f: _Facts) -> bytes:
    if f.digest is None:
        f.digest = _digest(ir.const_view(t))
        _read(t, f)
    return f.digest


def _nbytes(meta: tuple) -> int:
    n = np.dtype(meta[0]).itemsize
    for d in meta[1]:
        n *= d
    return n


def _digest(arr: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data, digest_size=16).digest()


def _attr_key(v) -> object:
    """A hashable key equal for equal attribute values: typed (1, 1.0 and True differ), floats by their
    bits (NaN equals NaN, -0.0 differs from 0.0), tensors by their bytes."""
    tv = type(v)
    if tv is int or tv is str:
        return (tv.__name__, v)
    if tv is float:
        return ("float", struct.pack("<d", v))
    if tv is list or tv is tuple:
        if all(type(x) is int for x in v):  # pads, strides, perm, axes...: the common case
            return ("ints", tuple(v))
        if all(type(x) is float for x in v):
            return ("floats", struct.pack(f"<{len(v)}d", *v))
    if isinstance(v, gs.Constant):
        proto = getattr(v._values, "tensor", None)
        if proto is not None:  # lazily loaded: key on the stored bytes, do not decode (strings stay strings)
            return ("tensor-proto", proto.SerializeToString(), str(v._export_dtype))
        a = np.asarray(v.values)
        return ("tensor", str(a.dtype), a.shape, str(v._export_dtype), _digest(a))
    if isinstance(v, gs.Tensor):
        return ("ref", id(v))
    if isinstance(v, np.ndarray):
        return ("array", str(v.dtype), v.shape, _digest(v))
    if isinstance(v, (list, tuple)):
        return tuple(_attr_key(x) for x in v)
    if isinstance(v, float):
        return ("float", np.float64(v).tobytes())
    if isinstance(v, (str, bytes, int, bool)) or v is None:
        return (type(v).__name__, v)
    return ("repr", type(v).__name__, repr(v))


_UNKEYED = object()  # a node's attribute key not computed yet


def _attrs_key(n: gs.Node) -> tuple | None:
    """A hashable key of ``n``'s attributes, equal for equal attributes; None if there is none."""
    try:
        key = tuple(sorted((k, _attr_key(v)) for k, v in n.attrs.items()))
        hash(key)
    except TypeError:
        return None
    return key


@register_pass
class CommonSubexpressionElimination(Pass):
    name = "cse"
    idempotent = True  # merges run in topological order, so a second run meets no new duplicates
    description = "merge identical initializers (by content) and identical nodes on identical inputs"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"initializers_merged": 0, "nodes_merged": 0}
        skipped: list[str] = []
        self._stop = False
        graphs = list(C.all_graphs(graph))
        all_io = {id(t) for g in graphs for t in list(g.inputs) + list(g.outputs)}
        changed = False
        for g in graphs:
            changed |= self._initializers(g, graphs, all_io, ctx, stats)
            if self._stop:
                break
        if not self._stop:
            for g in graphs:
                changed |= self._nodes(g, all_io, ctx, stats, skipped)
                if self._stop:
                    break
        if changed:
            C.drop_detached(graph)
        return PassResult(changed, stats, skipped)

    # ----------------------------------------------------------------------------------------------
    def _initializers(self, g: gs.Graph, graphs: list[gs.Graph], all_io: set[int], ctx: PassContext, stats: dict) -> bool:
        """Merge equal constants read only by nodes of ``g`` (so no name crosses a scope boundary)."""
        own = {id(n) for n in g.nodes}
        seen: dict[int, gs.Constant] = {}
        for n in g.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant) and id(t) not in all_io and id(t) not in seen \
                        and _mergeable(t) and all(id(c) in own for c in t.outputs):
                    seen[id(t)] = t
        groups: dict[tuple, list[tuple[gs.Constant, _Facts]]] = {}
        for t in seen.values():
            f = _facts(t)
            groups.setdefault(f.meta, []).append((t, f))
        for meta in [m for m, ts in groups.items() if len(ts) > 1]:
            for t, f in groups.pop(meta):
                groups.setdefault(meta + (_sample(t, f),), []).append((t, f))
        changed = False
        for meta, ts in groups.items():
            if len(ts) < 2:
                continue
            whole = _nbytes(meta) <= 2 * _SAMPLE  # the sample is the values: the group is all equal
            by_digest: dict[bytes, gs.Constant] = {}
            for t, f in ts:
                d = b"" if whole else _content_digest(t, f)
                keep = by_digest.get(d)
                if keep is None:
                    by_digest[d] = t
                    continue
                if not whole and not np.array_equal(np.ascontiguousarray(ir.const_view(t)).view(np.uint8),
                                                    np.ascontiguousarray(ir.const_view(keep)).view(np.uint8)):
                    continue
                if not ctx.allow_rewrite(f"merge initializer {t.name} into {keep.name}"):
                    self._stop = True
                    return changed
                for c in list(t.outputs):
                    for i, inp in enumerate(c.inputs):
                        if inp is t:
                            c.inputs[i] = keep
                stats["initializers_merged"] += 1
                changed = True
        return changed

    # ----------------------------------------------------------------------------------------------
    def _nodes(self, g: gs.Graph, all_io: set[int], ctx: PassContext, stats: dict, skipped: list[str]) -> bool:
        C.toposort(g, ctx, recurse=False)  # (merging initializers above keeps the order)
        # Two levels: duplicates read the very same inputs, so nodes are bucketed by op and input
        # identities first, and attributes (the costly part of the key) are compared only within a
        # bucket of two or more (rare).
        table: dict[tuple, list[tuple[object, gs.Node]]] = {}
        changed = False
        for n in list(g.nodes):
            if n.op in NONDETERMINISTIC or C.subgraphs_of(n) or not n.outputs:
                continue
            cheap = (n.op, n.domain or "", len(n.outputs), tuple(id(t) if not C.is_omitted(t) else None for t in n.inputs))
            bucket = table.get(cheap)
            if bucket is None:
                table[cheap] = [(_UNKEYED, n)]
                continue
            key = _attrs_key(n)
            if key is None:
                continue
            first = None
            for i, (k, other) in enumerate(bucket):
                if k is _UNKEYED:
                    k = _attrs_key(other)
                    bucket[i] = (k, other)
                if k is not None and k == key:
                    first = other
                    break
            if first is None:
                bucket.append((key, n))
                continue
            if any(id(o) in all_io for o in n.outputs):
                skipped.append(f"{n.name or n.op}: duplicates {first.name or first.op} but produces a graph output; kept")
                continue
            if any(C.is_omitted(a) != C.is_omitted(b) for a, b in zip(n.outputs, first.outputs)):
                continue
            if not ctx.allow_rewrite(f"merge {n.op} {n.name} into {first.name}"):
                self._stop = True
                return changed
            for dup, orig in zip(n.outputs, first.outputs):
                if not C.is_omitted(dup):
                    replace_uses(dup, orig, g)
            n.outputs.clear()
            n.inputs.clear()
            stats["nodes_merged"] += 1
            changed = True
        return changed
