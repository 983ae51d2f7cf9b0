"""``fuse-residual-gemm``: a post-LN residual block's bias and residual Add go into one Gemm.

    z = (a @ W + b) + r,   r = LayerNorm(h) (gamma, beta)        (BERT: attention output and FFN output)
 -> z = Gemm(a, W, C = r'),  r' = LayerNorm(h) with beta' = beta + b

Moving the bias b into the normalization that produced r makes r' = r + b, so the block needs neither the
bias Add nor the residual Add: Gemm copies C into its output and accumulates a @ W on top (the same work
onnxruntime's Gemm does for a bias vector).  Every other reader of r must then see r' - b, which is
compensated in its own bias, exactly in real arithmetic:

- ``MatMul(r, W2)`` followed by ``Add(., b2)`` / com.microsoft ``BiasGelu(., b2)`` / ``FastGelu(., b2)``:
  b2' = b2 - b @ W2;
- com.microsoft ``Attention(r, Wqkv, bqkv, ...)``: bqkv' = bqkv - b @ Wqkv.

In float32 the result differs from the original by rounding only (b @ W2 is computed in float64, then
rounded once).  onnxruntime (1.32, CPU) would fuse ``Add + LayerNormalization`` into
SkipLayerNormalization at ORT_ENABLE_ALL, which is slower there (see ``unfuse-skip-layernorm``): after
this rewrite there is no Add left to fuse.

``r`` may reach the residual Add through Reshapes (each read only by the next); the normalization is
``LayerNormalization`` (constant beta) or com.microsoft ``EmbedLayerNormalization`` (beta is input 6).
Refuses, with a reason, when r is not such a normalization's output (pre-LN models such as GPT-2, where r
is the residual stream itself), when r or an intermediate is a graph output, when beta / a compensated
bias / W is shared or not constant, when r has a reader that cannot be compensated, or when shapes are
not static.  The Gemm is 2-D: the operands are reshaped to [M, K] / [M, N] and the result back to z's
shape (Reshape pairs this leaves collapse in ``merge-chains``/``eliminate-noops``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass
from graphopt.rewrite import const_value, derived_name, is_graph_output, weight_used_only_by

from ._common import is_std, node_alive, other_input, prod, remove_nodes, run_fusion
from ._ort import MS_DOMAIN, is_float32, new_const, static_shape


@dataclass
class ResidualMatch:
    add: gs.Node  # z = Add(y, r)
    bias_add: gs.Node  # y = Add(mm, b)
    mm: gs.Node  # MatMul(a, W)
    b: gs.Constant
    r: gs.Tensor
    norm: gs.Node | None = None
    beta_index: int = 2
    chain: list[gs.Node] | None = None
    compensate: list[tuple[gs.Node, int, np.ndarray]] | None = None  # (node, bias input index, weight [N, X])


def _const2d(t: gs.Tensor) -> np.ndarray | None:
    v = const_value(t)
    return v if v is not None and v.ndim == 2 else None


def match(graph: gs.Graph, add: gs.Node) -> tuple[ResidualMatch | None, str | None]:
    if len(add.inputs) != 2 or any(const_value(t) is not None for t in add.inputs):
        return None, None
    for i in (0, 1):
        y, r = add.inputs[i], add.inputs[1 - i]
        bias_add = prod(y, "Add")
        if bias_add is None:
            continue
        for j in (0, 1):
            mm = prod(bias_add.inputs[j], "MatMul")
            b = bias_add.inputs[1 - j]
            w = _const2d(mm.inputs[1]) if mm is not None else None
            bv = const_value(b)
            if w is None or bv is None or bv.size != w.shape[1] or bv.ndim != 1:
                continue
            return ResidualMatch(add, bias_add, mm, b, r), None
    return None, None


def _source_norm(graph: gs.Graph, r: gs.Tensor) -> tuple[gs.Node | None, int, list[gs.Node], str | None]:
    """The normalization producing r (through private Reshapes): (node, beta input index, reshapes, reason)."""
    chain: list[gs.Node] = []
    t = r
    while True:
        p = t.inputs[0] if len(t.inputs) == 1 else None
        if p is None:
            return None, 0, chain, "the residual is a graph input"
        if p.op == "Reshape" and is_std(p):
            chain.append(p)
            t = p.inputs[0]
            if is_graph_output(graph, t) or len(t.outputs) != 1:
                return None, 0, chain, f"'{t.name}' before the residual's Reshape is a graph output or read elsewhere"
            continue
        break
    if p.op == "LayerNormalization" and is_std(p) and p.outputs[0] is t:
        rank = len(p.inputs[0].shape) if p.inputs[0].shape is not None else None
        axis = int(p.attrs.get("axis", -1))
        if not (axis == -1 or (rank is not None and axis == rank - 1)):
            return None, 0, chain, "the LayerNormalization is not over the last axis"
        return p, 2, chain, None
    if p.op == "EmbedLayerNormalization" and p.domain == MS_DOMAIN and p.outputs[0] is t:
        return p, 6, chain, None
    return None, 0, chain, f"the residual comes from {p.op}, not from a LayerNormalization (pre-LN models keep their Adds)"


def _compensation(graph: gs.Graph, user: gs.Node, r: gs.Tensor, n: int) -> tuple[tuple[gs.Node, int, np.ndarray] | None, str]:
    """How ``user`` (a reader of r) absorbs r' = r + b: (node, bias index, W) or (None, reason)."""
    if user.op == "Attention" and user.domain == MS_DOMAIN and user.inputs[0] is r and sum(i is r for i in user.inputs) == 1:
        w = _const2d(user.inputs[1])
        bias = user.inputs[2] if len(user.inputs) > 2 else None
        if w is None or w.shape[0] != n or bias is None or const_value(bias) is None:
            return None, "Attention weight/bias is not constant"
        if not weight_used_only_by(bias, [user]):
            return None, "Attention bias is shared"
        return (user, 2, w), ""
    if user.op == "MatMul" and is_std(user) and user.inputs[0] is r and user.inputs[1] is not r:
        w = _const2d(user.inputs[1])
        if w is None or w.shape[0] != n:
            return None, "a MatMul reading the residual has no constant 2-D weight"
        out = user.outputs[0]
        if is_graph_output(graph, out) or len(out.outputs) != 1:
            return None, "a MatMul reading the residual has no single bias reader"
        c = out.outputs[0]
        if c.op == "Add" and is_std(c):
            bias = other_input(c, out)
            idx = list(c.inputs).index(bias) if bias is not None else -1
        elif c.op in ("BiasGelu", "FastGelu") and c.domain == MS_DOMAIN and len(c.inputs) > 1 and c.inputs[0] is out:
            bias, idx = c.inputs[1], 1
        else:
            return None, f"a MatMul reading the residual feeds {c.op}, not a bias"
        bv = const_value(bias) if bias is not None else None
        if bv is None or bv.size != w.shape[1] or bv.ndim != 1:
            return None, "the bias after a MatMul reading the residual is not a constant vector"
        if not weight_used_only_by(bias, [c]):
            return None, "the bias after a MatMul reading the residual is shared"
        return (c, idx, w), ""
    return None, f"the residual is also read by {user.op} '{user.name}', which cannot absorb the moved bias"


def check(graph: gs.Graph, m: ResidualMatch) -> str | None:
    name = m.add.name or "Add"
    mm_out, y = m.mm.outputs[0], m.bias_add.outputs[0]
    for t, reader in ((mm_out, m.bias_add), (y, m.add)):
        if is_graph_output(graph, t) or len(t.outputs) != 1 or t.outputs[0] is not reader:
            return f"{name}: '{t.name}' is a graph output or read outside the block"
    if not weight_used_only_by(m.b, [m.bias_add]):
        return f"{name}: bias '{m.b.name}' is shared"
    a, z = m.mm.inputs[0], m.add.outputs[0]
    sa, sz, sr = static_shape(a), static_shape(z), static_shape(m.r)
    if not sa or not sz or not all(isinstance(d, int) for d in sa + sz) or sr != sz or len(sa) < 2:
        return f"{name}: shapes are not static ({sa}, {sr} -> {sz})"
    if not all(is_float32(t) for t in (a, m.r, z)):
        return f"{name}: only float32 is rewritten"
    norm, beta_index, chain, why = _source_norm(graph, m.r)
    if why:
        return f"{name}: {why}"
    if is_graph_output(graph, m.r):
        return f"{name}: the residual '{m.r.name}' is a graph output"
    beta = norm.inputs[beta_index] if len(norm.inputs) > beta_index else None
    n = int(np.asarray(const_value(m.b)).size)
    if beta is None or const_value(beta) is None or const_value(beta).size != n:
        return f"{name}: the normalization's beta is absent or not a constant [{n}]"
    if not weight_used_only_by(beta, [norm]):
        return f"{name}: the normalization's beta is shared"
    comps = []
    for user in m.r.outputs:
        if user is m.add:
            if sum(i is m.r for i in user.inputs) != 1:
                return f"{name}: the residual is read twice by the Add"
            continue
        if user is m.mm or user is m.bias_add:
            return f"{name}: the block reads its own residual (its bias could not be compensated)"
        comp, why = _compensation(graph, user, m.r, n)
        if comp is None:
            return f"{name}: {why}"
        comps.append(comp)
    m.norm, m.beta_index, m.chain, m.compensate = norm, beta_index, chain, comps
    return None


def _rows_view(t: gs.Tensor, shape: list[int]) -> gs.Tensor | None:
    """``t`` itself, or the input of the Reshape producing it, when that already has the 2-D ``shape``."""
    if static_shape(t) == shape:
        return t
    p = prod(t, "Reshape")
    if p is not None and static_shape(p.inputs[0]) == shape:
        return p.inputs[0]
    return None


def rewrite(graph: gs.Graph, m: ResidualMatch) -> None:
    b = np.asarray(const_value(m.b), dtype=np.float64).reshape(-1)
    beta = m.norm.inputs[m.beta_index]
    m.norm.inputs[m.beta_index] = new_const(graph, beta.name, "plus_bias",
                                            (np.asarray(const_value(beta), dtype=np.float64) + b).astype(np.float32))
    for node, idx, w in m.compensate:
        old = node.inputs[idx]
        shape = const_value(old).shape
        nb = np.asarray(const_value(old), dtype=np.float64).reshape(-1) - b @ np.asarray(w, dtype=np.float64)
        node.inputs[idx] = new_const(graph, old.name, "minus_moved_bias", nb.reshape(shape).astype(np.float32))
    a, w, z = m.mm.inputs[0], m.mm.inputs[1], m.add.outputs[0]
    sa, sz = static_shape(a), static_shape(z)
    rows = int(np.prod(sa[:-1]))
    base = m.mm.name or "residual"

    def reshape(x: gs.Tensor, shape: list[int], suffix: str, out: gs.Tensor | None = None) -> gs.Tensor:
        out = out or gs.Variable(derived_name(graph, base, suffix), dtype=np.float32, shape=shape)
        sh = gs.Constant(derived_name(graph, base, suffix + "_shape"), np.array(shape, dtype=np.int64))
        graph.nodes.append(gs.Node("Reshape", name=derived_name(graph, base, suffix + "_Reshape"), inputs=[x, sh], outputs=[out]))
        return out

    a2 = _rows_view(a, [rows, sa[-1]]) or reshape(a, [rows, sa[-1]], "rows")
    r2 = _rows_view(m.r, [rows, sz[-1]]) or reshape(m.r, [rows, sz[-1]], "residual_rows")
    remove_nodes([m.mm, m.bias_add, m.add])
    g = gs.Variable(derived_name(graph, base, "gemm"), dtype=np.float32, shape=[rows, sz[-1]])
    graph.nodes.append(gs.Node("Gemm", name=derived_name(graph, base, "ResidualGemm"), inputs=[a2, w, r2], outputs=[g]))
    reshape(g, list(sz), "unrows", out=z)


@register_pass
class FuseResidualGemm(Pass):
    name = "fuse-residual-gemm"
    description = "post-LN residual: (a @ W + b) + LayerNorm(h) -> Gemm(a, W, LayerNorm'(h)) with b moved into beta"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        adds = [n for n in graph.nodes if n.op == "Add" and is_std(n)]
        return run_fusion(graph, ctx, adds, {"matched": 0, "rewritten": 0}, alive=node_alive, match=match, check=check,
                          rewrite=rewrite, describe=lambda n, m: f"residual Gemm at {n.name}")
