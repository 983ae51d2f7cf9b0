"""``merge-chains``: collapse two consecutive layout/type ops into one (or none).

* ``Transpose(Transpose(x, p1), p2)`` -> ``Transpose(x, p1[p2])``, or nothing when that is the identity.
* ``Reshape(R(x), s)`` with R one of Reshape / Flatten / Squeeze / Unsqueeze -> ``Reshape(x, s)`` when
  ``s`` is constant and has no 0 entry that would copy a dim of the intermediate (or ``allowzero=1``).
* ``Squeeze(Unsqueeze(x, a), a)`` and ``Unsqueeze(Squeeze(x, a), a)`` -> ``x``.
* ``Cast(Cast(x, T1), T2)`` -> ``Cast(x, T2)`` when T1 represents every value of x's type exactly
  (a widening first cast), so the result cannot differ.

The second node is rewired to read ``x``; the first stays while anything else reads it (dce removes it
otherwise).  A chain that cancels out becomes an Identity, which eliminate-noops removes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass

from .. import _common as C

_D = np.dtype
_EXACT_INTO: dict[np.dtype, set[np.dtype]] = {
    _D(np.bool_): {_D(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
                                   np.float16, np.float32, np.float64)},
    _D(np.int8): {_D(t) for t in (np.int16, np.int32, np.int64, np.float16, np.float32, np.float64)},
    _D(np.uint8): {_D(t) for t in (np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float16, np.float32, np.float64)},
    _D(np.int16): {_D(t) for t in (np.int32, np.int64, np.float32, np.float64)},
    _D(np.uint16): {_D(t) for t in (np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64)},
    _D(np.int32): {_D(t) for t in (np.int64, np.float64)},
    _D(np.uint32): {_D(t) for t in (np.int64, np.uint64, np.float64)},
    _D(np.float16): {_D(t) for t in (np.float32, np.float64)},
    _D(np.float32): {_D(np.float64)},
}
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def _cast_to(node: gs.Node) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs.get("to", 0))))
    except Exception:
        return None


def _perm(node: gs.Node, rank: int | None) -> list[int] | None:
    p = node.attrs.get("perm")
    if p is not None:
        return [int(v) for v in p]
    return None if rank is None else list(range(rank))[::-1]


def _rank(t: gs.Tensor) -> int | None:
    s = C.shape_of(t)
    return None if s is None else len(s)


@register_pass
class MergeChains(Pass):
    name = "merge-chains"
    description = "Transpose∘Transpose, Reshape∘Reshape, Squeeze/Unsqueeze pairs, widening Cast∘Cast"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {"merged": 0, "cancelled": 0}
        skipped: list[str] = []
        graphs = list(C.all_graphs(graph))
        pairs = [(n, n.inputs[0].inputs[0]) for g in graphs for n in g.nodes
                 if n.op in ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast") and n.inputs and n.inputs[0].inputs
                 and (n.domain or "") in ("", "ai.onnx")]
        derived = C.shapes_derived(graph)
        if C.input_shapes_pending(graph, ctx) or \
                any(n.op == "Cast" and f.op == "Cast" and (not derived or C.np_dtype(f.inputs[0]) is None) for n, f in pairs if f.inputs) or \
                any({n.op, f.op} == {"Squeeze", "Unsqueeze"} and (not derived or C.shape_of(f.outputs[0]) is None) for n, f in pairs):
            C.ensure_shapes(graph, ctx)
        opset = int(graph.opset)
        changed = False
        for g in graphs:
            for node in list(g.nodes):
                if node.op not in ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast") or (node.domain or "") not in ("", "ai.onnx"):
                    continue
                if not node.inputs or C.is_omitted(node.inputs[0]) or not node.inputs[0].inputs:
                    continue
                first = node.inputs[0].inputs[0]
                if (first.domain or "") not in ("", "ai.onnx") or not first.inputs or C.is_omitted(first.inputs[0]):
                    continue
                r = self._match(node, first, opset)
                if r is None:
                    continue
                kind, apply = r
                pair = f"{first.op}+{node.op}"
                if not ctx.allow_rewrite(f"merge {pair} {node.name}"):
                    return self._finish(graph, changed, stats, skipped)
                apply()
                stats[kind] += 1
                stats[pair] = stats.get(pair, 0) + 1
                changed = True
        return self._finish(graph, changed, stats, skipped)

    @staticmethod
    def _finish(graph, changed, stats, skipped) -> PassResult:
        if changed:
            C.drop_detached(graph)
        return PassResult(changed, stats, skipped)

    def _match(self, node: gs.Node, first: gs.Node, opset: int):
        x = first.inputs[0]
        if node.op == "Transpose" and first.op == "Transpose":
            p1 = first.attrs.get("perm")
            p2 = node.attrs.get("perm")
            if p1 is None and p2 is None:
                return "cancelled", lambda: C.to_identity(node, x)  # reverse twice
            rank = len(p1) if p1 is not None else len(p2)
            p1, p2 = _perm(first, rank), _perm(node, rank)
            if len(p1) != len(p2) or sorted(p1) != list(range(rank)) or sorted(p2) != list(range(rank)):
                return None
            comp = [p1[i] for i in p2]
            if comp == list(range(rank)):
                return "cancelled", lambda: C.to_identity(node, x)

            def apply():
                node.inputs[0] = x
                node.attrs["perm"] = comp

            return "merged", apply
        if node.op == "Reshape" and first.op in _RESHAPES:
            if len(node.inputs) < 2:
                return None
            shape = C.small_const(node.inputs[1])
            if shape is None or shape.dtype.kind not in "iu":
                return None
            if not int(node.attrs.get("allowzero", 0)) and bool(np.any(shape == 0)):
                return None  # a 0 copies a dim of the intermediate tensor

            def apply():
                node.inputs[0] = x

            return "merged", apply
        if {node.op, first.op} == {"Squeeze", "Unsqueeze"} and node.op != first.op:
            a1, a2 = C.squeeze_axes(first, opset), C.squeeze_axes(node, opset)
            if a1 is None or a2 is None or not a1:
                return None
            if any(a < 0 for a in a1 + a2):
                # both are normalised against the rank of the wider tensor (the Unsqueeze output)
                wide = first.outputs[0] if first.op == "Unsqueeze" else x
                rank = _rank(wide)
                if rank is None:
                    return None
                a1 = [a + rank if a < 0 else a for a in a1]
                a2 = [a + rank if a < 0 else a for a in a2]
            if sorted(set(a1)) != sorted(a1) or sorted(a1) != sorted(set(a2)) or len(a2) != len(a1):
                return None
            return "cancelled", lambda: C.to_identity(node, x)
        if node.op == "Cast" and first.op == "Cast":
            t0 = C.np_dtype(x)
            t1 = _cast_to(first)
            if t0 is None or t1 is None:
                return None
            if t1 != t0 and t1 not in _EXACT_INTO.get(t0, set()):
                return None

            def apply():
                node.inputs[0] = x

            return "merged", apply
        return None
