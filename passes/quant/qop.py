"""QOperator form: the QDQ graph that :func:`passes.quant.qdq.apply_plan` writes, rewritten so that each
quantized node is one int8 operator instead of ``DQ -> float op -> Q``.

``format=qop`` of ``quantize-int8``.  The node units are the ones onnxruntime itself fuses at
ORT_ENABLE_ALL, written out explicitly, so the file runs int8 kernels at every optimization level
(and on runtimes without a QDQ fuser):

- ``DQ(x), DQ(w), DQ(b) -> Conv [-> Relu/Clip] -> Q``  ->  ``QLinearConv`` (ONNX);
- ``DQ(a), DQ(w) -> MatMul -> Q``                       ->  ``QLinearMatMul`` (ONNX, per-column weight scale);
  without a Q (float output)                            ->  ``com.microsoft.MatMulIntegerToFloat``;
- ``DQ(a), DQ(w), DQ(c) -> Gemm [-> Q]``                ->  ``com.microsoft.QGemm`` (float output without a Q);
- ``DQ(a), DQ(b) -> Add -> Q``                           ->  ``com.microsoft.QLinearAdd``;
- ``DQ(x) -> GlobalAveragePool / AveragePool -> Q``     ->  ``com.microsoft.QLinearGlobalAveragePool / QLinearAveragePool``;
- ``DQ(x_i) -> Concat -> Q``                             ->  ``com.microsoft.QLinearConcat``;
- ``DQ(x) -> MaxPool / Flatten / Reshape / Transpose / Squeeze / Unsqueeze -> Q`` (same parameters)
  ->  the op on the int8 tensor itself.

A Relu/Clip between the op and its Q is dropped only where the Q range already clips exactly there
(zero point at the lowest code, upper end inside the Clip).  Dynamic units
(``DynamicQuantizeLinear -> MatMulInteger``) and int8 embedding tables are operator form already.  A
unit that does not match (e.g. a Conv whose output is a graph output, so it has no Q) stays QDQ and is
counted in ``qop_left_qdq``.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import rewrite

MS = "com.microsoft"
_DROP = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}
_UNITS = {"Conv", "MatMul", "Gemm", "Add", "GlobalAveragePool", "AveragePool", "Concat"} | _DROP


def _producer(t) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def _const(t) -> np.ndarray | None:
    return t.values if isinstance(t, gs.Constant) else None


def _act_in(t):
    """(q tensor, scale, zero point) if ``t`` is a per-tensor DequantizeLinear of a variable, else None."""
    dq = _producer(t)
    if dq is None or dq.op != "DequantizeLinear" or len(dq.inputs) < 3:
        return None
    q, s, z = dq.inputs[:3]
    sv, zv = _const(s), _const(z)
    if not isinstance(q, gs.Variable) or sv is None or zv is None or sv.size != 1:
        return None
    return q, s, z


def _weight_in(t, dtype=np.int8):
    """(q const, scale const, zero point, axis) if ``t`` is a DequantizeLinear of a constant."""
    dq = _producer(t)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q, s = dq.inputs[0], dq.inputs[1]
    qv, sv = _const(q), _const(s)
    if qv is None or sv is None or qv.dtype != dtype:
        return None
    z = dq.inputs[2] if len(dq.inputs) > 2 and not dq.inputs[2].is_empty() else None
    return q, s, z, int(dq.attrs.get("axis", 1))


def _qrange(zv: np.ndarray) -> tuple[int, int]:
    return (0, 255) if zv.dtype == np.uint8 else (-128, 127)


def _act_drop_ok(act: gs.Node, s: float, zv: np.ndarray) -> bool:
    """Does the Q after ``act`` clip exactly as the Relu/Clip would (so the act can go)?"""
    qmin, qmax = _qrange(zv)
    z = int(zv.reshape(-1)[0])
    lo, hi = (qmin - z) * s, (qmax - z) * s
    if act.op == "Relu":
        return z == qmin
    cmin = _const(act.inputs[1]) if len(act.inputs) > 1 and not act.inputs[1].is_empty() else None
    cmax = _const(act.inputs[2]) if len(act.inputs) > 2 and not act.inputs[2].is_empty() else None
    cmin = float(cmin) if cmin is not None else float(act.attrs.get("min", -np.inf))
    cmax = float(cmax) if cmax is not None else float(act.attrs.get("max", np.inf))
    return z == qmin and cmin <= lo + 1e-12 and hi <= cmax + s / 2


def _out_q(n: gs.Node, graph_outputs: set[int]):
    """(Q node, the act between, if any) reading ``n``'s output alone, or (None, None)."""
    t = n.outputs[0]
    if id(t) in graph_outputs or len(t.outputs) != 1:
        return None, None
    c = t.outputs[0]
    act = None
    if c.op in ("Relu", "Clip") and c.inputs[0] is t:
        act, t = c, c.outputs[0]
        if id(t) in graph_outputs or len(t.outputs) != 1:
            return None, None
        c = t.outputs[0]
    if c.op != "QuantizeLinear" or c.inputs[0] is not t or len(c.inputs) < 3:
        return None, None
    sv, zv = _const(c.inputs[1]), _const(c.inputs[2])
    if sv is None or zv is None or sv.size != 1:
        return None, None
    if act is not None and not _act_drop_ok(act, float(sv.reshape(-1)[0]), zv):
        return None, None
    return c, act


def _zeros_like_scale(graph, base: str, s: gs.Constant) -> gs.Constant:
    return gs.Constant(rewrite.derived_name(graph, base, "zp"), np.zeros(np.shape(s.values), np.int8))


def to_qop(graph: gs.Graph, opset: int) -> dict[str, int]:
    """Rewrite the QDQ units of ``graph`` in place into QOperator nodes; returns counts."""
    stats = {"qop_nodes": 0, "qop_left_qdq": 0}
    graph_outputs = {id(t) for t in graph.outputs}
    graph.toposort()
    for n in list(graph.nodes):
        if n.op not in _UNITS or n.domain not in ("", "ai.onnx", None):
            continue
        has_dq_in = any(_producer(t) is not None and _producer(t).op == "DequantizeLinear" for t in n.inputs)
        if not has_dq_in:
            continue
        new = _convert(graph, n, graph_outputs, opset)
        if new is None:
            if n.op in ("Conv", "MatMul", "Gemm"):
                stats["qop_left_qdq"] += 1
            continue
        stats["qop_nodes"] += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return stats


def _convert(graph: gs.Graph, n: gs.Node, graph_outputs: set[int], opset: int) -> gs.Node | None:
    q, act = _out_q(n, graph_outputs)
    name = rewrite.derived_name(graph, n.name or n.op, "quant")
    attrs = dict(n.attrs)
    if n.op == "Gemm":
        a = _act_in(n.inputs[0])
        w = _weight_in(n.inputs[1])
        if a is None or w is None or int(attrs.get("transA", 0)):
            return None
        c = None
        if len(n.inputs) > 2 and not n.inputs[2].is_empty():
            cb = _weight_in(n.inputs[2], np.int32)
            if cb is None:
                return None
            c = cb[0]
        wz = w[2] if w[2] is not None else _zeros_like_scale(graph, w[0].name, w[1])
        inputs = [a[0], a[1], a[2], w[0], w[1], wz, c if c is not None else gs.Variable.empty()]
        if q is not None:
            inputs += [q.inputs[1], q.inputs[2]]
        out = q.outputs[0] if q is not None else n.outputs[0]
        node = gs.Node("QGemm", name, domain=MS, attrs={k: v for k, v in attrs.items() if k in ("transA", "transB", "alpha")},
                       inputs=inputs, outputs=[out])
        return _replace(graph, n, q, act, node)
    if q is None and n.op == "MatMul":  # float output (e.g. a graph output)
        a, w = _act_in(n.inputs[0]), _weight_in(n.inputs[1])
        if a is None or w is None or np.ndim(w[0].values) != 2:
            return None
        wz = w[2] if w[2] is not None else _zeros_like_scale(graph, w[0].name, w[1])
        node = gs.Node("MatMulIntegerToFloat", name, domain=MS, inputs=[a[0], w[0], a[1], w[1], a[2], wz], outputs=[n.outputs[0]])
        return _replace(graph, n, None, None, node)
    if q is None:
        return None
    ys, yz = q.inputs[1], q.inputs[2]
    out = q.outputs[0]
    if n.op == "Conv":
        x, w = _act_in(n.inputs[0]), _weight_in(n.inputs[1])
        if x is None or w is None or (np.size(w[1].values) > 1 and w[3] != 0):
            return None
        inputs = [x[0], x[1], x[2], w[0], w[1], w[2] if w[2] is not None else _zeros_like_scale(graph, w[0].name, w[1]), ys, yz]
        if len(n.inputs) > 2 and not n.inputs[2].is_empty():
            b = _weight_in(n.inputs[2], np.int32)
            if b is None:
                return None
            inputs.append(b[0])
        node = gs.Node("QLinearConv", name, attrs=attrs, inputs=inputs, outputs=[out])
    elif n.op == "MatMul":
        a, w = _act_in(n.inputs[0]), _weight_in(n.inputs[1])
        if a is None or w is None or np.ndim(w[0].values) != 2:
            return None
        wz = w[2] if w[2] is not None else _zeros_like_scale(graph, w[0].name, w[1])
        node = gs.Node("QLinearMatMul", name, inputs=[a[0], a[1], a[2], w[0], w[1], wz, ys, yz], outputs=[out])
    elif n.op == "Add":
        ins = [_act_in(t) for t in n.inputs]
        if len(ins) != 2 or any(i is None for i in ins):
            return None
        node = gs.Node("QLinearAdd", name, domain=MS, inputs=[*ins[0], *ins[1], ys, yz], outputs=[out])
    elif n.op in ("GlobalAveragePool", "AveragePool"):
        x = _act_in(n.inputs[0])
        if x is None:
            return None
        qop = "QLinear" + n.op
        node = gs.Node(qop, name, domain=MS, attrs={**attrs, "channels_last": 0}, inputs=[*x, ys, yz], outputs=[out])
    elif n.op == "Concat":
        ins = [_act_in(t) for t in n.inputs]
        if not ins or any(i is None for i in ins):
            return None
        flat = [t for i in ins for t in i]
        node = gs.Node("QLinearConcat", name, domain=MS, attrs=attrs, inputs=[ys, yz, *flat], outputs=[out])
    else:  # _DROP: the op runs on the int8 tensor itself; only where input and output parameters agree
        x = _act_in(n.inputs[0])
        if x is None or act is not None or (n.op == "MaxPool" and opset < 12):
            return None
        if n.op == "MaxPool" and len(n.outputs) > 1 and any(o.outputs for o in n.outputs[1:]):
            return None
        same = (np.allclose(_const(x[1]), _const(ys)) and np.array_equal(_const(x[2]), _const(yz))
                and _const(x[2]).dtype == _const(yz).dtype)
        if not same:
            return None
        node = gs.Node(n.op, name, attrs=attrs, inputs=[x[0], *n.inputs[1:]], outputs=[out])
    return _replace(graph, n, q, act, node)


def _replace(graph: gs.Graph, n: gs.Node, q: gs.Node | None, act: gs.Node | None, node: gs.Node) -> gs.Node:
    for old in (n, act, q):
        if old is not None:
            old.inputs.clear()
            old.outputs.clear()
    graph.nodes.append(node)
    return node
