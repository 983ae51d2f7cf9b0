"""``fuse-skip-layernorm``: residual Add + LayerNorm -> onnxruntime ``com.microsoft.SkipLayerNormalization``.

Target-specific (-O3).  ``LayerNorm(a + b)`` over the last axis, where a and b are 3-D activations of the
same shape (or b is [1, S, H] / [S, H]), becomes ``SkipLayerNormalization(a, b, gamma, beta)``.  The
layer norm may be the ``LayerNormalization`` op or its decomposed ReduceMean/Sub/Pow/... form.

- A constant 1-D bias added to one side just before (``Add(MatMul(..), bias)``, read only there) moves
  into the op's ``bias`` input.
- When the sum ``a + b`` is read elsewhere too (the next residual connection, as in GPT-2), it comes out of
  the op's fourth output ``input_skip_bias_sum``, so the Add disappears anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass

from ._common import is_std, run_fusion, tensor_alive
from ._ort import LayerNorm, escapes, is_float32, match_layernorm, op_of, replace_with_ms_op, static_shape


@dataclass
class SkipLNMatch:
    ln: LayerNorm
    add: gs.Node
    input: gs.Tensor
    skip: gs.Tensor
    bias: gs.Constant | None
    bias_add: gs.Node | None
    nodes: list[gs.Node]
    sum_used: bool  # a + b is read outside the match: emit output 3


def _bias_split(t: gs.Tensor, h) -> tuple[gs.Tensor, gs.Constant, gs.Node] | None:
    """``t = Add(u, c)`` with c a constant [H] and u a non-constant of t's shape: (u, c, add)."""
    add = op_of(t, "Add")
    if add is None:
        return None
    for i in (0, 1):
        u, c = add.inputs[i], add.inputs[1 - i]
        if isinstance(c, gs.Constant) and not isinstance(u, gs.Constant) and tuple(c.shape) == (h,):
            if static_shape(u) == static_shape(t):
                return u, c, add
    return None


def ln_candidates(graph: gs.Graph) -> list[gs.Tensor]:
    """Tensors that may end a layer norm: LayerNormalization outputs and Add/Mul outputs ending the
    decomposed form (cheap pre-filter; ``match_layernorm`` decides)."""
    out = []
    for n in graph.nodes:
        if not is_std(n) or not n.outputs:
            continue
        if n.op == "LayerNormalization":
            out.append(n.outputs[0])
        elif n.op in ("Add", "Mul") and any(op_of(i, "Mul", "Div") is not None for i in n.inputs):
            out.append(n.outputs[0])
    return out


def match(graph: gs.Graph, t: gs.Tensor) -> tuple[SkipLNMatch | None, str | None]:
    ln = match_layernorm(t)
    if ln is None:
        return None, None
    add = op_of(ln.x, "Add")
    if add is None or len(add.inputs) != 2:
        return None, None
    name = ln.nodes[-1].name or "LayerNorm"
    xs = static_shape(ln.x)
    if xs is None or len(xs) != 3:
        return None, f"{name}: residual sum is not 3-D (shape {xs})"
    if not is_float32(ln.x):
        return None, f"{name}: only float32 is fused"
    h = xs[-1]
    if not isinstance(h, int) or tuple(ln.gamma.shape) != (h,):
        return None, f"{name}: gamma does not cover the hidden size {h}"
    a, b = add.inputs
    sa, sb = static_shape(a), static_shape(b)
    if isinstance(a, gs.Constant) and isinstance(b, gs.Constant):
        return None, None
    # the full-shaped side is the input, the other the skip (same shape, or broadcast over the batch)
    if sa == xs and (sb == xs or sb in ([1] + xs[1:], xs[1:])):
        inp, skip = a, b
    elif sb == xs and sa in ([1] + xs[1:], xs[1:]):
        inp, skip = b, a
    else:
        return None, f"{name}: residual operands {sa} and {sb} are not both [B, S, H] (or skip [1, S, H])"
    bias = bias_add = None
    nodes = [add] + ln.nodes
    for first, second in ((inp, skip), (skip, inp)):
        if static_shape(first) != xs or isinstance(first, gs.Constant):
            continue
        found = _bias_split(first, h)
        if found is not None and escapes(graph, [found[2], add], keep=[add.outputs[0]]) is None:
            u, bias, bias_add = found
            inp, skip = u, second
            nodes.append(bias_add)
            break
    uses_outside = ln.x in graph.outputs or any(id(u) not in {id(n) for n in nodes} for u in ln.x.outputs)
    return SkipLNMatch(ln, add, inp, skip, bias, bias_add, nodes, uses_outside), None


def check(graph: gs.Graph, m: SkipLNMatch) -> str | None:
    why = escapes(graph, m.nodes, keep=[m.ln.out, m.ln.x])
    if why:
        return f"{m.ln.nodes[-1].name or 'LayerNorm'}: {why}"
    return None


def rewrite(graph: gs.Graph, m: SkipLNMatch) -> gs.Node:
    gamma, beta = m.ln.gamma, m.ln.beta
    inputs = [m.input, m.skip, gamma]
    if beta is not None or m.bias is not None:
        inputs.append(beta if beta is not None else gs.Variable.empty())
    if m.bias is not None:
        inputs.append(m.bias)
    outputs = [m.ln.out]
    if m.sum_used:
        outputs += [gs.Variable.empty(), gs.Variable.empty(), m.ln.x]
    anchor = m.ln.nodes[-1].name or "LayerNorm"
    return replace_with_ms_op(graph, m.nodes, "SkipLayerNormalization", anchor, "SkipLayerNorm", inputs, outputs,
                              {"epsilon": float(m.ln.epsilon)})


@register_pass
class FuseSkipLayerNorm(Pass):
    name = "fuse-skip-layernorm"
    description = "residual Add (+ bias) + LayerNorm -> com.microsoft.SkipLayerNormalization (onnxruntime only)"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"matched": 0, "rewritten": 0, "bias_folded": 0, "sum_output": 0}

        def rewrite_counted(g: gs.Graph, m: SkipLNMatch) -> None:
            rewrite(g, m)
            stats["bias_folded"] += m.bias is not None
            stats["sum_output"] += m.sum_used

        return run_fusion(graph, ctx, ln_candidates(graph), stats, alive=tensor_alive, match=match, check=check,
                          rewrite=rewrite_counted, describe=lambda t, m: f"SkipLayerNormalization at {t.name}")
