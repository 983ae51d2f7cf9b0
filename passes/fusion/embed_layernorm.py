"""``fuse-embed-layernorm``: token + position (+ segment) embeddings + LayerNorm -> onnxruntime
``com.microsoft.EmbedLayerNormalization``.

Target-specific (-O3).  Matches ``LayerNorm(word[ids] + position + segment[segment_ids])`` (the sum in any
order, segment optional) where:

- ``word[ids]`` / ``segment[segment_ids]`` are ``Gather(constant [V, H] table, 2-D [B, S] integer ids)``
  (the larger table is the word table);
- ``position`` is a constant [1, S, H] or [S, H] (position ids folded away), or
  ``Gather(table, constant arange(S))``, so positions are 0..S-1, which is what the op does without
  ``position_ids``; S must be static and equal to the ids' sequence length.

The ids are cast to int32 (the op's type).  When the embedding sum is read elsewhere (GPT-2's first
residual), it comes out of the op's ``embedding_sum`` output.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass
from graphopt.rewrite import const_value, derived_name

from ._common import run_fusion, tensor_alive
from ._ort import LayerNorm, escapes, is_float32, match_layernorm, op_of, replace_with_ms_op, static_shape
from .skip_layernorm import ln_candidates


@dataclass
class EmbedMatch:
    ln: LayerNorm
    word: gs.Node  # Gather
    segment: gs.Node | None
    position: np.ndarray  # [S, H]
    position_src: gs.Tensor
    adds: list[gs.Node]
    nodes: list[gs.Node]
    sum_used: bool


def _sum_terms(t: gs.Tensor, adds: list[gs.Node], depth: int = 0) -> list[gs.Tensor]:
    """Leaves of the Add tree producing ``t`` (inner sums must be read only by the tree)."""
    add = op_of(t, "Add")
    if add is None or depth > 2 or (depth > 0 and len(t.outputs) != 1):
        return [t]
    adds.append(add)
    return [leaf for i in add.inputs for leaf in _sum_terms(i, adds, depth + 1)]


def _gather_ids(t: gs.Tensor) -> gs.Node | None:
    g = op_of(t, "Gather")
    if g is None or int(g.attrs.get("axis", 0)) != 0:
        return None
    table, ids = g.inputs
    if not isinstance(table, gs.Constant) or len(table.shape) != 2 or isinstance(ids, gs.Constant):
        return None
    return g


def match(graph: gs.Graph, t: gs.Tensor) -> tuple[EmbedMatch | None, str | None]:
    ln = match_layernorm(t)
    if ln is None:
        return None, None
    adds: list[gs.Node] = []
    terms = _sum_terms(ln.x, adds)
    if len(terms) not in (2, 3) or not adds:
        return None, None
    gathers = [g for g in (_gather_ids(x) for x in terms) if g is not None]
    if not gathers:
        return None, None
    name = ln.nodes[-1].name or "LayerNorm"
    others = [x for x in terms if _gather_ids(x) is None]
    if len(others) != 1:
        return None, f"{name}: embedding sum has {len(gathers)} lookups and {len(others)} other terms (need one position term)"
    if len(gathers) > 2:
        return None, None
    gathers.sort(key=lambda g: -g.inputs[0].shape[0])
    word = gathers[0]
    segment = gathers[1] if len(gathers) > 1 else None
    ids_shape = static_shape(word.inputs[1])
    if ids_shape is None or len(ids_shape) != 2 or not isinstance(ids_shape[1], int):
        return None, f"{name}: token ids are not 2-D [B, S] with a static S (shape {ids_shape})"
    seq = ids_shape[1]
    if segment is not None and static_shape(segment.inputs[1]) != ids_shape:
        return None, f"{name}: segment ids shape differs from the token ids"
    hidden = word.inputs[0].shape[1]
    for g in gathers:
        if g.inputs[0].shape[1] != hidden or not is_float32(g.inputs[0]):
            return None, f"{name}: embedding tables differ in width or are not float32"
        if np.dtype(g.inputs[1].dtype or np.int64).kind not in "iu":
            return None, f"{name}: ids are not integers"
    pos_t = others[0]
    pos = const_value(pos_t)
    if pos is not None:
        if pos.shape not in ((1, seq, hidden), (seq, hidden)):
            return None, f"{name}: position term {list(pos.shape)} is not [1, {seq}, {hidden}]"
        pos = pos.reshape(seq, hidden)
    else:
        pg = op_of(pos_t, "Gather")
        idx = const_value(pg.inputs[1]) if pg is not None else None
        table = pg.inputs[0] if pg is not None else None
        if idx is None or not isinstance(table, gs.Constant) or int(pg.attrs.get("axis", 0)) != 0:
            return None, f"{name}: the third embedding term is neither constant nor a lookup by constant positions"
        if idx.reshape(-1).tolist() != list(range(seq)) or idx.shape not in ((1, seq), (seq,)):
            return None, f"{name}: position ids are not 0..{seq - 1}"
        pos = np.asarray(table.values)[:seq]
        adds.append(pg)
    if pos.dtype != np.float32:
        return None, f"{name}: position embeddings are not float32"
    nodes = adds + gathers + ln.nodes
    inside = {id(n) for n in nodes}
    sum_used = ln.x in graph.outputs or any(id(u) not in inside for u in ln.x.outputs)
    return EmbedMatch(ln, word, segment, pos, pos_t, adds, nodes, sum_used), None


def check(graph: gs.Graph, m: EmbedMatch) -> str | None:
    name = m.ln.nodes[-1].name or "LayerNorm"
    why = escapes(graph, m.nodes, keep=[m.ln.out, m.ln.x])
    if why:
        return f"{name}: {why}"
    if m.ln.beta is None:
        return f"{name}: layer norm without beta (the op needs one)"
    return None


def _as_int32(graph: gs.Graph, ids: gs.Tensor, cache: dict) -> gs.Tensor:
    if ids.dtype is not None and np.dtype(ids.dtype) == np.int32:
        return ids
    if id(ids) in cache:
        return cache[id(ids)]
    out = gs.Variable(derived_name(graph, ids.name, "int32"), dtype=np.int32, shape=ids.shape)
    graph.nodes.append(gs.Node("Cast", name=derived_name(graph, ids.name, "Cast_int32"), attrs={"to": onnx.TensorProto.INT32},
                               inputs=[ids], outputs=[out]))
    cache[id(ids)] = out
    return out


def rewrite(graph: gs.Graph, m: EmbedMatch, cast_cache: dict) -> gs.Node:
    anchor = m.ln.nodes[-1].name or "LayerNorm"
    ids = _as_int32(graph, m.word.inputs[1], cast_cache)
    seg_ids = _as_int32(graph, m.segment.inputs[1], cast_cache) if m.segment is not None else gs.Variable.empty()
    seg_table = m.segment.inputs[0] if m.segment is not None else gs.Variable.empty()
    pos = gs.Constant(derived_name(graph, m.position_src.name or anchor, "pos_table"), np.ascontiguousarray(m.position))
    inputs = [ids, seg_ids, m.word.inputs[0], pos, seg_table, m.ln.gamma, m.ln.beta]
    # onnxruntime's type inference writes output 1 (mask_index) unconditionally: it must exist
    mask_index = gs.Variable(derived_name(graph, anchor, "mask_index"), dtype=np.int32)
    outputs = [m.ln.out, mask_index] + ([m.ln.x] if m.sum_used else [])
    return replace_with_ms_op(graph, m.nodes, "EmbedLayerNormalization", anchor, "EmbedLayerNorm", inputs, outputs,
                              {"epsilon": float(m.ln.epsilon)})


@register_pass
class FuseEmbedLayerNorm(Pass):
    name = "fuse-embed-layernorm"
    description = "word + position (+ segment) embedding lookups + LayerNorm -> com.microsoft.EmbedLayerNormalization (onnxruntime only)"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cands = ln_candidates(graph) if any(n.op == "Gather" for n in graph.nodes) else []
        cast_cache: dict = {}
        return run_fusion(graph, ctx, cands, {"matched": 0, "rewritten": 0}, alive=tensor_alive, match=match, check=check,
                          rewrite=lambda g, m: rewrite(g, m, cast_cache),
                          describe=lambda t, m: f"EmbedLayerNormalization at {t.name}")
