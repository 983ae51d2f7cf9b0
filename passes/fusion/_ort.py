"""Shared matchers for the -O3 onnxruntime fusions (com.microsoft contrib ops).

Nothing here registers a pass.  The matchers look at op types, attributes, constants and inferred shapes,
never at names.  Each returns a small record of what it found (the nodes it covers, the tensors at its
edges) or ``None``; the passes decide whether a match may be rewritten (``escapes``) and say why not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.rewrite import const_value, derived_name, is_graph_output

from ._common import prod, remove_nodes, scalar

MS_DOMAIN = "com.microsoft"


# --------------------------------------------------------------------------------------------------
# small predicates
# --------------------------------------------------------------------------------------------------


def op_of(t: gs.Tensor | None, *ops: str) -> gs.Node | None:
    """The producer of ``t`` if it is a default-domain node of one of ``ops`` (:func:`prod`, varargs)."""
    return prod(t, ops)


def near(a: float | None, b: float, rel: float = 1e-4) -> bool:
    return a is not None and abs(a - b) <= rel * abs(b)


def only_consumer(t: gs.Tensor) -> gs.Node | None:
    """The single node reading ``t`` (read once), else None."""
    users = list(t.outputs)
    if len(users) != 1:
        return None
    if sum(1 for i in users[0].inputs if i is t) != 1:
        return None
    return users[0]


def static_shape(t: gs.Tensor | None) -> list | None:
    """The tensor's shape (ints, or str for symbolic dims) if its rank is known."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return list(t.shape)
    if t.shape is None:
        return None
    return list(t.shape)


def is_float32(t: gs.Tensor) -> bool:
    dt = t.dtype if not isinstance(t, gs.Constant) else t.values.dtype
    return dt is not None and np.dtype(dt) == np.float32


def is_last_axis(axis: int, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def escapes(graph: gs.Graph, nodes: list[gs.Node], keep: list[gs.Tensor] = ()) -> str | None:
    """Why the interior of a match cannot be removed, or None.

    Every output of ``nodes`` except those in ``keep`` must be read only inside the match and must not be
    a graph output; otherwise fusing would drop a value someone else needs.
    """
    inside = {id(n) for n in nodes}
    kept = {id(t) for t in keep}
    for n in nodes:
        for t in n.outputs:
            if id(t) in kept:
                continue
            if is_graph_output(graph, t):
                return f"intermediate '{t.name}' is a graph output"
            for u in t.outputs:
                if id(u) not in inside:
                    return f"intermediate '{t.name}' is also read by {u.op} '{u.name}'"
    return None


def replace_with_ms_op(graph: gs.Graph, nodes: list[gs.Node], op: str, base: str, suffix: str, inputs: list, outputs: list,
                       attrs: dict | None = None) -> gs.Node:
    """Detach the matched ``nodes`` and append a com.microsoft ``op`` node in their place.

    The new node is named (``derived_name(base, suffix)``) after the detach, so names the match held are free again.
    """
    remove_nodes(nodes)
    node = gs.Node(op, name=derived_name(graph, base, suffix), domain=MS_DOMAIN, attrs=attrs, inputs=inputs, outputs=outputs)
    graph.nodes.append(node)
    return node


def new_const(graph: gs.Graph, base: str, suffix: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(derived_name(graph, base, suffix), np.ascontiguousarray(values))


# --------------------------------------------------------------------------------------------------
# linear layers: y = x @ W + b
# --------------------------------------------------------------------------------------------------


@dataclass
class Linear:
    """``out = x @ weight + bias`` (weight [in, out], bias [out] or None), made of ``nodes``."""

    x: gs.Tensor
    w: gs.Constant
    w_transposed: bool  # the stored weight is [out, in] (Gemm transB=1)
    bias: gs.Constant | None
    nodes: list[gs.Node]
    out: gs.Tensor
    matmul: gs.Node  # the MatMul or Gemm node

    def weight(self) -> np.ndarray:
        w = np.asarray(self.w.values)
        return w.T if self.w_transposed else w

    def bias_values(self) -> np.ndarray | None:
        return None if self.bias is None else np.asarray(self.bias.values).reshape(-1)


def _const2d(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) and len(t.shape) == 2


def _bias_for(t: gs.Tensor, n_out: int) -> bool:
    return isinstance(t, gs.Constant) and int(np.prod(t.shape)) == n_out and len(t.shape) >= 1 and t.shape[-1] == n_out


def match_linear(t: gs.Tensor) -> Linear | None:
    """Recognise ``t`` as a linear layer of another tensor.

    Forms: ``Add(MatMul(x, W), b)`` (either operand order), ``MatMul(x, W)``, and the 2-D detour that
    exporters emit for 3-D activations, ``Reshape(Gemm(Reshape(x), W, b))`` with alpha = beta = 1, no
    transA, and the outer Reshape giving back x's leading dims (checked with inferred shapes).
    """
    add = op_of(t, "Add")
    if add is not None:
        for i in (0, 1):
            mm = op_of(add.inputs[i], "MatMul")
            b = add.inputs[1 - i]
            if mm is not None and _const2d(mm.inputs[1]) and _bias_for(b, mm.inputs[1].shape[1]):
                return Linear(mm.inputs[0], mm.inputs[1], False, b, [mm, add], t, mm)
        return None
    mm = op_of(t, "MatMul")
    if mm is not None:
        if _const2d(mm.inputs[1]):
            return Linear(mm.inputs[0], mm.inputs[1], False, None, [mm], t, mm)
        return None
    r_out = op_of(t, "Reshape")
    if r_out is None:
        return None
    gemm = op_of(r_out.inputs[0], "Gemm")
    if gemm is None:
        return None
    a = gemm.attrs
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
        return None
    w = gemm.inputs[1]
    if not _const2d(w):
        return None
    trans = bool(a.get("transB", 0))
    n_out = w.shape[0] if trans else w.shape[1]
    b = gemm.inputs[2] if len(gemm.inputs) > 2 and not gemm.inputs[2].is_empty() else None
    if b is not None and not _bias_for(b, n_out):
        return None
    r_in = op_of(gemm.inputs[0], "Reshape")
    if r_in is None:
        return None
    x = r_in.inputs[0]
    xs, ts = static_shape(x), static_shape(t)
    if xs is None or ts is None or len(xs) < 2 or len(ts) != len(xs):
        return None
    if ts[:-1] != xs[:-1] or ts[-1] != n_out:
        return None
    return Linear(x, w, trans, b, [r_in, gemm, r_out], t, gemm)


# --------------------------------------------------------------------------------------------------
# layer normalization
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerNorm:
    """``out = LayerNorm(x) * gamma + beta`` over the last axis, made of ``nodes``."""

    x: gs.Tensor
    gamma: gs.Constant
    beta: gs.Constant | None
    epsilon: float
    nodes: list[gs.Node]
    out: gs.Tensor
    decomposed: bool = False
    extra_reads_of_x: list[gs.Node] = field(default_factory=list)


def _reduce_axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1:
        v = const_value(node.inputs[1])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    return None


def _is_mean_last(node: gs.Node | None, rank: int | None) -> bool:
    if node is None:
        return False
    axes = _reduce_axes(node)
    return axes is not None and len(axes) == 1 and is_last_axis(axes[0], rank) and node.attrs.get("keepdims", 1) == 1


def match_layernorm(t: gs.Tensor) -> LayerNorm | None:
    """``t`` as a layer normalization over the last axis with constant 1-D gamma/beta.

    The ``LayerNormalization`` op (only output 0 read), and the decomposed TorchScript form
    ``Add(Mul(Div(Sub(x, ReduceMean(x)), Sqrt(Add(ReduceMean(Pow(Sub, 2)), eps))), gamma), beta)``.
    """
    ln = op_of(t, "LayerNormalization")
    if ln is not None:
        if ln.outputs[0] is not t or any(len(o.outputs) for o in ln.outputs[1:]):
            return None
        x = ln.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        if not is_last_axis(int(ln.attrs.get("axis", -1)), rank):
            return None
        gamma = ln.inputs[1]
        beta = ln.inputs[2] if len(ln.inputs) > 2 and not ln.inputs[2].is_empty() else None
        if not isinstance(gamma, gs.Constant) or len(gamma.shape) != 1:
            return None
        if beta is not None and (not isinstance(beta, gs.Constant) or tuple(beta.shape) != tuple(gamma.shape)):
            return None
        return LayerNorm(x, gamma, beta, float(ln.attrs.get("epsilon", 1e-5)), [ln], t)
    return _match_decomposed_layernorm(t)


def _match_decomposed_layernorm(t: gs.Tensor) -> LayerNorm | None:
    add_b = op_of(t, "Add")
    beta = None
    if add_b is not None:
        mul_g = None
        for i in (0, 1):
            m = op_of(add_b.inputs[i], "Mul")
            if m is not None and isinstance(add_b.inputs[1 - i], gs.Constant):
                mul_g, beta = m, add_b.inputs[1 - i]
        if mul_g is None:
            return None
    else:
        mul_g = op_of(t, "Mul")
        if mul_g is None:
            return None
        nxt = [u for u in t.outputs if u.op == "Add" and any(isinstance(i, gs.Constant) for i in u.inputs)]
        if len(t.outputs) == 1 and nxt:
            return None  # a beta follows: the match ending there is the one to take
    div = gamma = None
    for i in (0, 1):
        d = op_of(mul_g.inputs[i], "Div")
        if d is not None and isinstance(mul_g.inputs[1 - i], gs.Constant):
            div, gamma = d, mul_g.inputs[1 - i]
    if div is None:
        return None
    sub = op_of(div.inputs[0], "Sub")
    sqrt = op_of(div.inputs[1], "Sqrt")
    if sub is None or sqrt is None:
        return None
    x = sub.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    mean1 = op_of(sub.inputs[1], "ReduceMean")
    if not _is_mean_last(mean1, rank) or mean1.inputs[0] is not x:
        return None
    add_eps = op_of(sqrt.inputs[0], "Add")
    if add_eps is None:
        return None
    mean2 = eps = None
    for i in (0, 1):
        m = op_of(add_eps.inputs[i], "ReduceMean")
        e = scalar(add_eps.inputs[1 - i])
        if m is not None and e is not None:
            mean2, eps = m, e
    if not _is_mean_last(mean2, rank):
        return None
    pw = op_of(mean2.inputs[0], "Pow")
    if pw is not None:
        if pw.inputs[0] is not sub.outputs[0] or scalar(pw.inputs[1]) != 2.0:
            return None
    else:
        pw = op_of(mean2.inputs[0], "Mul")
        if pw is None or pw.inputs[0] is not sub.outputs[0] or pw.inputs[1] is not sub.outputs[0]:
            return None
    h = x.shape[-1] if x.shape else None
    for c in (gamma, beta):
        if c is not None and (len(c.shape) != 1 or (isinstance(h, int) and c.shape[0] != h)):
            return None
    nodes = [mean1, sub, pw, mean2, add_eps, sqrt, div, mul_g] + ([add_b] if add_b is not None else [])
    return LayerNorm(x, gamma, beta, float(eps), nodes, t, decomposed=True)
