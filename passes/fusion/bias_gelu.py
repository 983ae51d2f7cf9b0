"""``fuse-bias-gelu``: GELU (+ the bias before it) -> onnxruntime ``BiasGelu`` / ``FastGelu`` / ``Gelu``.

Target-specific (-O3, domain com.microsoft).  Recognised forms of ``gelu(x)``:

- erf:  ``0.5 * x * (1 + erf(x / sqrt(2)))`` (``/ sqrt 2`` or ``* 1/sqrt 2``; the products in any order),
  and the standard ``Gelu`` op (opset 20, approximate="none");
- tanh: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` (``Pow(x, 3)`` or ``x * x * x``), its
  sigmoid form ``x * Sigmoid(x * (a + b * x * x))`` (what -O2's ``fuse-gelu-sigmoid`` leaves at opset < 20),
  and ``Gelu`` with approximate="tanh".

If ``x = Add(MatMul(..), b)`` with b a constant [H] read only there, the bias moves into the fused op:
erf -> ``BiasGelu(matmul, b)``, tanh -> ``FastGelu(matmul, b)``.  The 2-D detour exporters emit for
Conv1D / addmm layers, ``x = Reshape(Gemm(Reshape(u), W, b))``, becomes ``MatMul(u, W)`` feeding the same
fused op with b: the two Reshapes go, and the GEMM no longer broadcasts its bias into the output before
accumulating (onnxruntime's Gemm does), which the fused op adds for free while it reads the tensor.  Without a bias: erf -> com.microsoft
``Gelu(x)``, tanh -> ``FastGelu(x)``; a standard ``Gelu`` op without a bias is left alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass

from ._common import is_std, node_alive, other_input, run_fusion, scalar
from graphopt.rewrite import derived_name, weight_used_only_by

from ._ort import Linear, escapes, is_float32, match_linear, near, new_const, op_of, replace_with_ms_op, static_shape

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass
class GeluMatch:
    kind: str  # "erf" | "tanh"
    x: gs.Tensor
    out: gs.Tensor
    nodes: list[gs.Node]
    anchor: gs.Node
    bias: gs.Constant | None = None
    pre_bias: gs.Tensor | None = None  # x without the bias
    bias_add: gs.Node | None = None
    detour: Linear | None = None  # Reshape -> Gemm(W, b) -> Reshape producing x, replaced by MatMul(u, W)


def _times_half_x(x: gs.Tensor, f: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """``0.5 * x * f`` in any association, starting from f: (output, nodes)."""
    u = _consumer(f, "Mul")
    if u is None:
        return None
    o = other_input(u, f)
    if o is x or scalar(o) == 0.5:
        want_half = o is x
        v = _consumer(u.outputs[0], "Mul")
        if v is None:
            return None
        o2 = other_input(v, u.outputs[0])
        if (want_half and scalar(o2) == 0.5) or (not want_half and o2 is x):
            return v.outputs[0], [u, v]
        return None
    h = op_of(o, "Mul")
    if h is not None and ((h.inputs[0] is x and scalar(h.inputs[1]) == 0.5) or (h.inputs[1] is x and scalar(h.inputs[0]) == 0.5)):
        return u.outputs[0], [h, u]
    return None


def _consumer(t: gs.Tensor, op: str, value: float | None = None) -> gs.Node | None:
    """The first ``op`` node reading ``t`` (with a scalar ``value`` as its other input, if given).

    Other readers are allowed here: ``check`` refuses the match with a reason if they exist."""
    for u in t.outputs:
        if u.op == op and is_std(u) and other_input(u, t) is not None:
            if value is None or scalar(other_input(u, t)) == value:
                return u
    return None


def _one_plus(t: gs.Tensor) -> gs.Node | None:
    return _consumer(t, "Add", 1.0)


def _const_mul(t: gs.Tensor, value: float) -> gs.Tensor | None:
    """If ``t = Mul(y, c)`` (either order) with c ~= value: y."""
    m = op_of(t, "Mul")
    if m is None:
        return None
    for i in (0, 1):
        if near(scalar(m.inputs[1 - i]), value):
            return m.inputs[i]
    return None


def match_erf(erf: gs.Node) -> GeluMatch | None:
    inp = erf.inputs[0]
    d = op_of(inp, "Div")
    if d is not None and near(scalar(d.inputs[1]), SQRT2):
        x, first = d.inputs[0], d
    else:
        x = _const_mul(inp, 1.0 / SQRT2)
        if x is None:
            return None
        first = op_of(inp, "Mul")
    one = _one_plus(erf.outputs[0])
    if one is None:
        return None
    tail = _times_half_x(x, one.outputs[0])
    if tail is None:
        return None
    out, nodes = tail
    return GeluMatch("erf", x, out, [first, erf, one] + nodes, erf)


def match_tanh(tanh: gs.Node) -> GeluMatch | None:
    inner = _const_mul(tanh.inputs[0], SQRT_2_OVER_PI)
    if inner is None:
        return None
    scale_node = op_of(tanh.inputs[0], "Mul")
    add = op_of(inner, "Add")
    if add is None:
        return None
    for i in (0, 1):
        x, cubic = add.inputs[i], add.inputs[1 - i]
        c_mul = op_of(cubic, "Mul")
        cube = _const_mul(cubic, 0.044715)
        if cube is None or c_mul is None:
            continue
        pw = op_of(cube, "Pow")
        cube_nodes: list[gs.Node]
        if pw is not None and pw.inputs[0] is x and scalar(pw.inputs[1]) == 3.0:
            cube_nodes = [pw]
        else:  # x * x * x as Mul(x, Mul(x, x)) or Mul(Mul(x, x), x)
            m1 = op_of(cube, "Mul")
            if m1 is None:
                continue
            sq = next((op_of(t, "Mul") for t in m1.inputs if op_of(t, "Mul") is not None
                       and all(j is x for j in op_of(t, "Mul").inputs)), None)
            if sq is None or x not in m1.inputs:
                continue
            cube_nodes = [sq, m1]
        one = _one_plus(tanh.outputs[0])
        if one is None:
            return None
        tail = _times_half_x(x, one.outputs[0])
        if tail is None:
            return None
        out, nodes = tail
        return GeluMatch("tanh", x, out, cube_nodes + [c_mul, add, scale_node, tanh, one] + nodes, tanh)
    return None


def match_sigmoid(sig: gs.Node) -> GeluMatch | None:
    """``x * Sigmoid(x * (a + b * (x * x)))`` with a = 2 sqrt(2/pi), b = a * 0.044715 (fuse-gelu-sigmoid's form)."""
    from .gelu_sigmoid import A, B

    arg = op_of(sig.inputs[0], "Mul")
    if arg is None:
        return None
    for i in (0, 1):
        x, poly_t = arg.inputs[i], arg.inputs[1 - i]
        poly = op_of(poly_t, "Add")
        if poly is None:
            continue
        for j in (0, 1):
            if not near(scalar(poly.inputs[1 - j]), A):
                continue
            sq = _const_mul(poly.inputs[j], B)
            sq_node = op_of(sq, "Mul") if sq is not None else None
            if sq_node is None or not all(t is x for t in sq_node.inputs):
                continue
            gate = next((u for u in sig.outputs[0].outputs if u.op == "Mul" and is_std(u) and other_input(u, sig.outputs[0]) is x), None)
            if gate is None:
                return None
            nodes = [sq_node, op_of(poly.inputs[j], "Mul"), poly, arg, sig, gate]
            return GeluMatch("tanh", x, gate.outputs[0], nodes, sig)
    return None


def match_gelu_op(g: gs.Node) -> GeluMatch | None:
    approx = g.attrs.get("approximate", "none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    if approx not in ("none", "tanh"):
        return None
    return GeluMatch("erf" if approx == "none" else "tanh", g.inputs[0], g.outputs[0], [g], g)


def attach_bias(graph: gs.Graph, m: GeluMatch) -> None:
    """Move ``x = Add(u, b)`` (b constant [H], x read only by the GELU) into the match."""
    add = op_of(m.x, "Add")
    if add is None:
        _attach_detour_bias(graph, m)
        return
    xs = static_shape(m.x)
    if xs is None or not xs or not isinstance(xs[-1], int):
        return
    for i in (0, 1):
        u, b = add.inputs[i], add.inputs[1 - i]
        if isinstance(b, gs.Constant) and not isinstance(u, gs.Constant) and tuple(b.shape) == (xs[-1],) and static_shape(u) == xs:
            if escapes(graph, [add] + m.nodes, keep=[m.out]) is None:
                m.bias, m.pre_bias, m.bias_add = b, u, add
            return


def _attach_detour_bias(graph: gs.Graph, m: GeluMatch) -> None:
    """``x = Reshape(Gemm(Reshape(u), W, b))`` with private constant W and b: take the whole linear layer."""
    lin = match_linear(m.x)
    if lin is None or len(lin.nodes) != 3 or lin.bias is None or lin.matmul.op != "Gemm":
        return
    if not (weight_used_only_by(lin.w, [lin.matmul]) and weight_used_only_by(lin.bias, [lin.matmul])):
        return
    if tuple(lin.bias.shape) != (lin.weight().shape[1],) or not is_float32(lin.x):
        return
    if escapes(graph, lin.nodes + m.nodes, keep=[m.out]) is None:
        m.bias, m.detour = lin.bias, lin


def check(graph: gs.Graph, m: GeluMatch) -> str | None:
    name = m.anchor.name or m.anchor.op
    if not is_float32(m.x):
        return f"{name}: only float32 GELU is fused"
    why = escapes(graph, m.nodes, keep=[m.out])
    return f"{name}: {why}" if why else None


def rewrite(graph: gs.Graph, m: GeluMatch) -> tuple[gs.Node, str]:
    if m.detour is not None:
        op = "BiasGelu" if m.kind == "erf" else "FastGelu"
        lin = m.detour
        w = lin.w if not lin.w_transposed else new_const(graph, lin.w.name, "T", lin.weight())
        mm_out = gs.Variable(derived_name(graph, m.x.name, "matmul"), dtype=m.x.dtype, shape=m.x.shape)
        graph.nodes.append(gs.Node("MatMul", name=derived_name(graph, lin.matmul.name or "linear", "MatMul"),
                                   inputs=[lin.x, w], outputs=[mm_out]))
        inputs = [mm_out, lin.bias]
        nodes = m.nodes + lin.nodes
    elif m.bias is not None:
        op = "BiasGelu" if m.kind == "erf" else "FastGelu"
        inputs = [m.pre_bias, m.bias]
        nodes = m.nodes + [m.bias_add]
    else:
        op = "Gelu" if m.kind == "erf" else "FastGelu"
        inputs = [m.x]
        nodes = m.nodes
    return replace_with_ms_op(graph, nodes, op, m.anchor.name or "gelu", op, inputs, [m.out]), op


@register_pass
class FuseBiasGelu(Pass):
    name = "fuse-bias-gelu"
    description = "GELU (erf or tanh form, + preceding bias) -> com.microsoft BiasGelu / FastGelu / Gelu (onnxruntime only)"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"matched": 0, "rewritten": 0, "BiasGelu": 0, "FastGelu": 0, "Gelu": 0}
        anchors = [n for n in graph.nodes if is_std(n) and n.op in ("Erf", "Tanh", "Sigmoid", "Gelu")]

        def match(g: gs.Graph, n: gs.Node) -> tuple[GeluMatch | None, None]:
            m = {"Erf": match_erf, "Tanh": match_tanh, "Sigmoid": match_sigmoid, "Gelu": match_gelu_op}[n.op](n)
            if m is None:
                return None, None
            attach_bias(g, m)
            if n.op == "Gelu" and m.bias is None:
                return None, None  # already one op; nothing to gain
            return m, None

        def rewrite_counted(g: gs.Graph, m: GeluMatch) -> None:
            _, op = rewrite(g, m)
            stats[op] += 1

        return run_fusion(graph, ctx, anchors, stats, alive=node_alive, match=match, check=check,
                          rewrite=rewrite_counted, describe=lambda n, m: f"GELU at {n.name}")
