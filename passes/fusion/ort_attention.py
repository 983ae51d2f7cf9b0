"""``fuse-ort-attention``: multi-head self-attention -> onnxruntime ``com.microsoft.Attention``.

Target-specific (-O3): the result runs on onnxruntime only.

The pattern is found from each ``Softmax`` on the generic graph, no model type needed::

    q, k, v   = three linear layers of one input x (BERT, ViT), or a Split of one packed linear layer (GPT-2)
    Q, K, V   = Reshape(., [B, S, N, H]) -> Transpose   (K transposed to [B, N, H, S])
    scores    = MatMul(Q, K) [* or / scale] [+ bias]     (bias: the additive mask, e.g. padding or causal)
    out       = Reshape(Transpose(MatMul(Softmax(scores) [-> Cast float], V)), [B, S, N*H])

and rewritten to ``Attention(x, [Wq|Wk|Wv], [bq|bk|bv], attention_bias=bias)`` with ``num_heads = N`` and
``scale`` the constant the model uses.  The additive mask is passed as ``attention_bias`` exactly as the
model computes it, so padding masks, causal masks and both combined (GPT-2) keep their semantics bit for
bit; no mask (ViT) passes none.  The mask subgraph itself stays (it is shared by all layers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass
from graphopt.rewrite import const_value, derived_name, weight_used_only_by

from ._common import is_std, node_alive, remove_nodes, run_fusion, scalar
from ._ort import MS_DOMAIN, Linear, escapes, is_float32, match_linear, new_const, only_consumer, op_of, static_shape


@dataclass
class AttentionMatch:
    softmax: gs.Node
    x: gs.Tensor
    linears: list[Linear]  # [q, k, v], or [packed] when a Split divides one projection
    split: gs.Node | None
    num_heads: int
    head_size: int
    scale: float
    bias: gs.Tensor | None
    out: gs.Tensor
    nodes: list[gs.Node]
    keep_reshape: gs.Node | None = None  # a Reshape of the [B, S, hidden] result that stays (reads the new op)


def _perm(node: gs.Node | None) -> list[int] | None:
    return None if node is None else [int(p) for p in node.attrs.get("perm", [])]


def _scaled_qk(t: gs.Tensor):
    """``t`` = MatMul(Q, K) optionally scaled by a constant: (matmul, scale, nodes) or None."""
    for op in ("Mul", "Div"):
        m = op_of(t, op)
        if m is None:
            continue
        for i in ((0, 1) if op == "Mul" else (0,)):
            s = scalar(m.inputs[1 - i])
            mm = op_of(m.inputs[i], "MatMul")
            if s is not None and mm is not None and s != 0.0:
                return mm, (s if op == "Mul" else 1.0 / s), [mm, m]
        return None
    mm = op_of(t, "MatMul")
    return (mm, 1.0, [mm]) if mm is not None else None


def _heads(reshape: gs.Node | None) -> tuple[int, int] | None:
    """(N, H) from a Reshape to [B, S, N, H] with a constant shape."""
    if reshape is None or reshape.attrs.get("allowzero", 0):
        return None
    s = const_value(reshape.inputs[1])
    if s is None or s.size != 4:
        return None
    n, h = int(s.reshape(-1)[2]), int(s.reshape(-1)[3])
    if n <= 0 or h <= 0:  # -1 / 0 entries: take the dims from the inferred output shape
        os_ = static_shape(reshape.outputs[0])
        if os_ is None or len(os_) != 4 or not all(isinstance(d, int) for d in os_[2:]):
            return None
        if (n > 0 and n != os_[2]) or (h > 0 and h != os_[3]):
            return None
        n, h = os_[2], os_[3]
    return (n, h) if n > 0 and h > 0 else None


def match(graph: gs.Graph, softmax: gs.Node) -> tuple[AttentionMatch | None, str | None]:
    """(match, None), or (None, reason) for an attention core that cannot be fused, or (None, None)."""
    x_in = softmax.inputs[0]
    rank = len(x_in.shape) if x_in.shape is not None else None
    # -- the core: scores -> Softmax -> MatMul with V ------------------------------------------
    qk, bias, nodes = None, None, [softmax]
    add = op_of(x_in, "Add")
    if add is not None:
        for i in (0, 1):
            qk = _scaled_qk(add.inputs[i])
            if qk is not None:
                bias = add.inputs[1 - i]
                nodes.append(add)
                break
    else:
        qk = _scaled_qk(x_in)
    if qk is None:
        return None, None
    mm_qk, scale, qk_nodes = qk
    nodes += qk_nodes
    probs = softmax.outputs[0]

    def reader(t: gs.Tensor, op: str) -> gs.Node | None:  # other readers are refused later, with a reason
        return next((u for u in t.outputs if u.op == op and u.inputs and u.inputs[0] is t), None)

    user = reader(probs, "Cast")
    if user is not None and user.attrs.get("to") == onnx.TensorProto.FLOAT and is_float32(probs):
        nodes.append(user)
        probs = user.outputs[0]
    user = reader(probs, "MatMul")
    if user is None:
        return None, None
    mm_v = user
    nodes.append(mm_v)
    name = softmax.name or "Softmax"
    # from here on it is an attention block: refusals carry a reason
    if rank != 4 or int(softmax.attrs.get("axis", -1)) not in (-1, 3):
        return None, f"{name}: softmax is not over the last axis of a 4-D score tensor"
    t_out = only_consumer(mm_v.outputs[0])
    if t_out is None or t_out.op != "Transpose" or _perm(t_out) != [0, 2, 1, 3]:
        return None, f"{name}: attention output is not transposed back to [B, S, N, H]"
    r_out = only_consumer(t_out.outputs[0])
    if r_out is None or r_out.op != "Reshape":
        return None, f"{name}: attention output heads are not merged by a Reshape"
    nodes += [t_out, r_out]
    out = r_out.outputs[0]
    # -- Q, K, V head split ----------------------------------------------------------------------
    tq = op_of(mm_qk.inputs[0], "Transpose")
    tv = op_of(mm_v.inputs[1], "Transpose")
    tk = op_of(mm_qk.inputs[1], "Transpose")
    if _perm(tq) != [0, 2, 1, 3] or _perm(tv) != [0, 2, 1, 3]:
        return None, f"{name}: Q or V is not split into heads by Reshape + Transpose(0,2,1,3)"
    k_nodes = [tk]
    if _perm(tk) == [0, 2, 3, 1]:
        rk = op_of(tk.inputs[0], "Reshape")
    elif _perm(tk) == [0, 1, 3, 2] and _perm(op_of(tk.inputs[0], "Transpose")) == [0, 2, 1, 3]:
        tk2 = op_of(tk.inputs[0], "Transpose")
        k_nodes.append(tk2)
        rk = op_of(tk2.inputs[0], "Reshape")
    else:
        return None, f"{name}: K is not transposed to [B, N, H, S]"
    rq, rv = op_of(tq.inputs[0], "Reshape"), op_of(tv.inputs[0], "Reshape")
    heads = [_heads(r) for r in (rq, rk, rv)]
    if any(h is None for h in heads):
        return None, f"{name}: Q, K or V head split is not a Reshape to a constant [B, S, N, H]"
    if len(set(heads)) != 1:
        return None, f"{name}: Q, K and V have different head layouts {sorted(set(heads))}"
    num_heads, head_size = heads[0]
    hidden = num_heads * head_size
    nodes += [tq, tv, rq, rv, rk] + k_nodes
    q, k, v = rq.inputs[0], rk.inputs[0], rv.inputs[0]
    # -- projections -----------------------------------------------------------------------------
    split = None
    sp = op_of(q, "Split")
    if sp is not None and op_of(k, "Split") is sp and op_of(v, "Split") is sp:
        split = sp
        if [t for t in sp.outputs] != [q, k, v]:
            return None, f"{name}: packed Q/K/V split is not in Q, K, V order"
        sizes = const_value(sp.inputs[1]) if len(sp.inputs) > 1 else None
        xs = static_shape(sp.inputs[0])
        axis = int(sp.attrs.get("axis", 0))
        if xs is None or axis not in (-1, len(xs) - 1):
            return None, f"{name}: packed Q/K/V is not split along the last axis"
        if sizes is not None and [int(s) for s in sizes.reshape(-1)] != [hidden] * 3:
            return None, f"{name}: packed Q/K/V split sizes {sizes.tolist()} are not 3 x {hidden}"
        packed = match_linear(sp.inputs[0])
        if packed is None:
            return None, f"{name}: packed Q/K/V is not a linear layer with constant weights"
        if packed.weight().shape[1] != 3 * hidden:
            return None, f"{name}: packed projection width {packed.weight().shape[1]} != 3 x {hidden}"
        linears = [packed]
        nodes += [sp] + packed.nodes
    else:
        linears = [match_linear(t) for t in (q, k, v)]
        if any(l is None for l in linears):
            return None, f"{name}: Q, K or V is not a linear layer with constant weights"
        if not (linears[0].x is linears[1].x is linears[2].x):
            return None, f"{name}: Q, K and V are projections of different inputs (cross-attention is not fused)"
        if any(l.weight().shape[1] != hidden for l in linears):
            return None, f"{name}: a Q/K/V projection width differs from N x H = {hidden}"
        for l in linears:
            nodes += l.nodes
    x = linears[0].x
    # -- shapes, dtypes ----------------------------------------------------------------------------
    keep_reshape = None
    xs, os_ = static_shape(x), static_shape(out)
    if xs is None or len(xs) != 3:
        return None, f"{name}: the attention input is not a 3-D [B, S, hidden] tensor (shape {xs})"
    if not is_float32(x):
        return None, f"{name}: only float32 attention is fused"
    if os_ is None or os_ != xs[:2] + [hidden]:
        # heads merged straight into another layout (e.g. [B*S, hidden] after two Reshapes were merged):
        # keep that Reshape, fed by the fused [B, S, hidden] output
        if os_ is None or not os_ or os_[-1] != hidden or not all(isinstance(d, int) for d in os_ + xs[:2]) \
                or int(np.prod(os_)) != int(np.prod(xs[:2])) * hidden:
            return None, f"{name}: output shape {os_} is not [B, S, {hidden}] (or a static reshape of it) for input {xs}"
        nodes.remove(r_out)
        keep_reshape = r_out  # the only reader of the merged heads (only_consumer above)
    if bias is not None:
        bs = static_shape(bias)
        seq = xs[1]
        if not is_float32(bias):
            return None, f"{name}: the additive mask is not float32"
        if bs is None or len(bs) != 4:
            return None, f"{name}: the additive mask has shape {bs}, need 4-D [B|1, N|1, S, S]"
        if bs[3] != seq or bs[2] not in (1, seq) or bs[0] not in (1, xs[0]) or bs[1] not in (1, num_heads):
            return None, f"{name}: the additive mask shape {bs} does not fit [B|1, N|1, {seq}, {seq}]"
        if bs[2] == 1 and not (isinstance(seq, int) and isinstance(bs[0], int) and isinstance(bs[1], int)):
            return None, f"{name}: a key-only mask {bs} needs static dims to be expanded over the queries"
    return AttentionMatch(softmax, x, linears, split, num_heads, head_size, scale, bias, out, nodes, keep_reshape), None


def check(graph: gs.Graph, m: AttentionMatch) -> str | None:
    name = m.softmax.name or "Softmax"
    keep = [m.out] if m.keep_reshape is None else [m.keep_reshape.inputs[0]]
    why = escapes(graph, m.nodes, keep=keep)
    if why:
        return f"{name}: {why}"
    for l in m.linears:
        if not weight_used_only_by(l.w, l.nodes):
            return f"{name}: weight '{l.w.name}' is shared outside the attention block"
    return None


def _full_bias(graph: gs.Graph, m: AttentionMatch, expanded: dict) -> gs.Tensor:
    """The additive mask as [B|1, N|1, S, S]: a key-only [B|1, N|1, 1, S] mask (classic BERT) is expanded
    over the query positions once and shared by every layer that reads it."""
    bs = static_shape(m.bias)
    if bs[2] != 1:
        return m.bias
    if id(m.bias) not in expanded:
        seq = static_shape(m.x)[1]
        full = gs.Variable(derived_name(graph, m.bias.name, "per_query"), dtype=np.float32, shape=[bs[0], bs[1], seq, seq])
        shape = gs.Constant(derived_name(graph, m.bias.name, "per_query_shape"), np.array([bs[0], bs[1], seq, seq], dtype=np.int64))
        graph.nodes.append(gs.Node("Expand", name=derived_name(graph, m.bias.name, "Expand"), inputs=[m.bias, shape], outputs=[full]))
        expanded[id(m.bias)] = full
    return expanded[id(m.bias)]


def rewrite(graph: gs.Graph, m: AttentionMatch, expanded: dict | None = None) -> gs.Node:
    expanded = {} if expanded is None else expanded
    if m.split is not None:
        w = m.linears[0].weight()
        b = m.linears[0].bias_values()
        if b is None:
            b = np.zeros(w.shape[1], dtype=w.dtype)
    else:
        w = np.concatenate([l.weight() for l in m.linears], axis=1)
        b = np.concatenate([
            l.bias_values() if l.bias is not None else np.zeros(l.weight().shape[1], dtype=w.dtype) for l in m.linears
        ])
    base = m.linears[0].w.name
    w_c = new_const(graph, base, "qkv_weight", w.astype(np.float32))
    b_c = new_const(graph, base, "qkv_bias", b.astype(np.float32))
    inputs = [m.x, w_c, b_c]
    if m.bias is not None:
        inputs += [gs.Variable.empty(), gs.Variable.empty(), _full_bias(graph, m, expanded)]
    remove_nodes(m.nodes)
    if m.keep_reshape is None:
        out = m.out
    else:
        out = gs.Variable(derived_name(graph, m.out.name, "attention"), dtype=np.float32,
                          shape=list(static_shape(m.x)[:2]) + [m.num_heads * m.head_size])
        m.keep_reshape.inputs[0] = out
    node = gs.Node(
        "Attention", name=derived_name(graph, m.softmax.name or "attention", "Attention"), domain=MS_DOMAIN,
        attrs={"num_heads": int(m.num_heads), "scale": float(m.scale)}, inputs=inputs, outputs=[out],
    )
    graph.nodes.append(node)
    return node


@register_pass
class FuseOrtAttention(Pass):
    name = "fuse-ort-attention"
    description = "multi-head self-attention (BERT, GPT-2, ViT patterns) -> com.microsoft.Attention (onnxruntime only)"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        softmaxes = [n for n in graph.nodes if n.op == "Softmax" and is_std(n)]
        expanded: dict = {}
        return run_fusion(graph, ctx, softmaxes, {"matched": 0, "rewritten": 0}, alive=node_alive, match=match, check=check,
                          rewrite=lambda g, m: rewrite(g, m, expanded), describe=lambda sm, m: f"Attention at {sm.name}")
