"""Building blocks of int8 quantization: quantization parameters, weight quantization, Conv+BN
folding, and the rewrite that turns a float graph plus a :class:`Plan` into the QDQ / dynamic form.

The layout follows what onnxruntime (CPU, ORT_ENABLE_ALL) fuses:

- static node (Conv, Gemm, MatMul): ``DQ(x) -> op(DQ(w int8 per-channel), DQ(b int32)) -> Q``; a
  Relu/Clip right after the op sits before the Q (onnxruntime drops it into the Q's range), so the
  whole thing becomes QLinearConv / QGemm / QLinearMatMul;
- int8-capable neighbours (Add, MaxPool, AveragePool, GlobalAveragePool, Concat, Flatten, Reshape,
  Transpose, Squeeze, Unsqueeze) stay in int8 when all their inputs are already quantized, so a region
  is entered and left once instead of a Q/DQ pair around every op;
- Q/DQ pairs only ever border a quantized node: no lone pairs around float ops;
- dynamic node (MatMul / Gemm with a constant weight): ``DynamicQuantizeLinear -> MatMulInteger ->
  Cast -> Mul(x_scale * w_scale)`` (onnxruntime fuses it to DynamicQuantizeMatMul, bias Add included);
- embedding table (Gather on a constant table): the table is stored int8, ``Gather -> DQ``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir, rewrite

# int8-capable ops: output keeps the input's quantization parameters (onnxruntime drops the Q/DQ)
DROP_OPS = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}
# int8-capable ops with their own output parameters (QLinearAdd, QLinearAveragePool, ...)
OWN_OPS = {"Add", "AveragePool", "GlobalAveragePool", "Concat"}
STATIC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
ACT_OPS = {"Relu", "Clip"}  # absorbed into the following Q's range


@dataclass
class Plan:
    """Which nodes (by name) are quantized and how."""

    static: set[str] = field(default_factory=set)
    dynamic: set[str] = field(default_factory=set)
    embed: set[str] = field(default_factory=set)

    def copy(self) -> "Plan":
        return Plan(set(self.static), set(self.dynamic), set(self.embed))

    def without(self, names) -> "Plan":
        names = set(names)
        return Plan(self.static - names, self.dynamic - names, self.embed - names)

    def only(self, names) -> "Plan":
        names = set(names)
        return Plan(self.static & names, self.dynamic & names, self.embed & names)

    def units(self) -> list[str]:
        return sorted(self.static | self.dynamic | self.embed)

    def __len__(self) -> int:
        return len(self.static) + len(self.dynamic) + len(self.embed)


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------


def act_params(lo: float, hi: float, symmetric: bool) -> tuple[np.float32, np.ndarray]:
    """(scale, zero point) of an activation with range [lo, hi] (lo <= 0 <= hi).

    Default uint8 asymmetric.  ``symmetric``: int8 with zero point 0, except for non-negative
    tensors (after Relu), which use the full int8 range with zero point -128.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not symmetric:
        scale = (hi - lo) / 255.0
        if scale <= 0 or not np.isfinite(scale):
            return np.float32(1.0), np.array(0, dtype=np.uint8)
        zp = int(np.clip(round(-lo / scale), 0, 255))
        return np.float32(scale), np.array(zp, dtype=np.uint8)
    if lo >= 0:
        scale = hi / 255.0
        return (np.float32(scale) if scale > 0 else np.float32(1.0)), np.array(-128, dtype=np.int8)
    scale = max(-lo, hi) / 127.0
    return (np.float32(scale) if scale > 0 else np.float32(1.0)), np.array(0, dtype=np.int8)


CLIP_RATIOS = np.linspace(0.5, 1.0, 26)


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int = 127, search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (range [-qmax, qmax]) per channel along ``axis`` (per tensor if None).

    ``qmax=63`` (reduce-range) keeps u8 x s8 pair sums inside int16: the AVX2 kernels (vpmaddubsw)
    saturate otherwise, an error the unfused reference run never shows.  ``search``: each channel's
    scale is the one (clip ratio 0.5 .. 1.0 of its max |w|) with the least squared rounding + clipping
    error, instead of max |w| / qmax: a few large weights no longer coarsen the grid of all the others.
    """
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        wc = w.reshape(1, -1)
        shape = [1] * w.ndim
    else:
        axis = axis % w.ndim
        wc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        shape = [1] * w.ndim
        shape[axis] = -1
    amax = np.abs(wc).max(axis=1) if wc.size else np.zeros(wc.shape[0], np.float32)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    if search and wc.size:
        best_err = np.full(wc.shape[0], np.inf)
        best = scale.copy()
        for r in CLIP_RATIOS:
            s = np.where(amax > 0, amax * r / qmax, 1.0).astype(np.float32)
            err = ((np.clip(np.rint(wc / s[:, None]), -qmax, qmax) * s[:, None] - wc) ** 2).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, s, best)
        scale = best.astype(np.float32)
    if axis is None:
        q = np.clip(np.rint(w / scale[0]), -qmax, qmax).astype(np.int8)
        return q, scale.reshape(())
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None or scale.ndim == 0:
        return q.astype(np.float32) * scale
    shape = [1] * q.ndim
    shape[axis % q.ndim] = -1
    return q.astype(np.float32) * scale.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Conv + BatchNormalization folding (exact; quantization needs the BN inside the Conv weights)
# ------------------------------------------------------------------------------------------------


def fold_conv_bn(graph: gs.Graph, ctx, skipped: list[str]) -> int:
    """Fold every inference BatchNormalization that directly follows a Conv into the Conv."""
    folded = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or not bn.inputs:
            continue
        conv = rewrite.producer(bn.inputs[0])
        if conv is None or conv.op != "Conv":
            continue
        where = bn.name or "BatchNormalization"
        if len(bn.outputs) > 1 and any(o.outputs for o in bn.outputs[1:]):
            skipped.append(f"{where}: BatchNormalization in training mode; not folded, Conv left in float")
            continue
        params = [rewrite.const_value(t) for t in bn.inputs[1:5]]
        w = rewrite.const_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
        b = rewrite.const_value(conv.inputs[2]) if len(conv.inputs) > 2 else None
        if any(p is None for p in params) or w is None or (len(conv.inputs) > 2 and b is None):
            skipped.append(f"{where}: BatchNormalization parameters or Conv weight not constant; not folded")
            continue
        if not rewrite.single_use(graph, conv.outputs[0]):
            skipped.append(f"{where}: the Conv output has other readers; not folded")
            continue
        if not rewrite.weight_used_only_by(conv.inputs[1], [conv]) or (b is not None and not rewrite.weight_used_only_by(conv.inputs[2], [conv])):
            skipped.append(f"{where}: the Conv weight is shared; not folded")
            continue
        if not ctx.allow_rewrite(f"fold {where} into {conv.name}"):
            break
        scale, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
        eps = float(bn.attrs.get("epsilon", 1e-5))
        k = scale / np.sqrt(var + eps)
        w2 = (w.astype(np.float64) * k.reshape([-1] + [1] * (w.ndim - 1))).astype(np.float32)
        b0 = np.zeros(w.shape[0], np.float64) if b is None else b.astype(np.float64)
        b2 = ((b0 - mean) * k + beta).astype(np.float32)
        wname = conv.inputs[1].name
        conv.inputs[1] = gs.Constant(rewrite.derived_name(graph, wname, "bnfold"), w2)
        bias = gs.Constant(rewrite.derived_name(graph, wname, "bnfold_bias"), b2)
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias
        else:
            conv.inputs.append(bias)
        out = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        conv.outputs[0] = out
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return folded


# ------------------------------------------------------------------------------------------------
# layout: which tensors get a Q/DQ pair, which neighbours stay int8
# ------------------------------------------------------------------------------------------------


def _float_var(t) -> bool:
    return isinstance(t, gs.Variable) and not t.is_empty() and (t.dtype is None or np.dtype(t.dtype) == np.float32)


def output_after_act(node: gs.Node, graph_outputs: set[str]) -> tuple[gs.Tensor, gs.Node | None]:
    """The tensor to quantize after ``node``: the output of a Relu/Clip that alone reads it, if any."""
    out = node.outputs[0]
    if out.name in graph_outputs or len(out.outputs) != 1:
        return out, None
    c = out.outputs[0]
    if c.op in ACT_OPS and c.inputs[0] is out and (c.op == "Relu" or all(rewrite.is_const(t) for t in c.inputs[1:] if not t.is_empty())):
        return c.outputs[0], c
    return out, None


@dataclass
class Layout:
    qt: dict[str, str]  # tensor -> the tensor whose parameters it uses (itself, or a DROP_OPS input)
    int8_nodes: list[gs.Node]  # static + int8 neighbours, in order
    neighbours: set[str]  # names of the int8 neighbours
    absorbed: set[str]  # Relu/Clip names folded into a Q range
    uses: list[tuple[gs.Node, int, str]]  # (node, input slot, tensor) that read the DQ


def derive_layout(graph: gs.Graph, static: set[str], neighbours_allowed: bool = True) -> Layout:
    graph_outputs = {t.name for t in graph.outputs}
    qt: dict[str, str] = {}
    int8: list[gs.Node] = []
    neigh: set[str] = set()
    absorbed: set[str] = set()
    uses: list[tuple[gs.Node, int, str]] = []
    for n in graph.nodes:
        if n.name in static:
            a = n.inputs[0]
            qt.setdefault(a.name, a.name)
            uses.append((n, 0, a.name))
            out, act = output_after_act(n, graph_outputs)
            if out.name not in graph_outputs:
                qt[out.name] = out.name
                if act is not None:
                    absorbed.add(act.name)
            int8.append(n)
        elif neighbours_allowed and n.op in DROP_OPS | OWN_OPS and n.outputs and n.inputs:
            if n.op in ("Add", "Concat"):
                acts = [(i, t) for i, t in enumerate(n.inputs) if not rewrite.is_const(t)]
                if n.op == "Add" and len(acts) != 2:
                    continue
            else:
                acts = [(0, n.inputs[0])]
                if any(not rewrite.is_const(t) for t in n.inputs[1:] if not t.is_empty()):
                    continue  # e.g. a Reshape with a computed shape
            if not acts or not all(t.name in qt and _float_var(t) for _, t in acts):
                continue
            if n.op == "Concat" and len(acts) != len(n.inputs):
                continue
            if n.op in DROP_OPS:
                out, act = n.outputs[0], None
            else:
                out, act = output_after_act(n, graph_outputs)
            if out.name in graph_outputs:
                continue
            for i, t in acts:
                uses.append((n, i, t.name))
            qt[out.name] = qt[acts[0][1].name] if n.op in DROP_OPS else out.name
            if act is not None:
                absorbed.add(act.name)
            int8.append(n)
            neigh.add(n.name)
    return Layout(qt, int8, neigh, absorbed, uses)


# ------------------------------------------------------------------------------------------------
# the rewrite
# ------------------------------------------------------------------------------------------------


@dataclass
class QuantParams:
    """Everything the rewrite needs besides the plan."""

    ranges: dict[str, tuple[float, float]]  # tensor -> calibrated (lo, hi)
    channel_means: dict[str, np.ndarray]  # activation -> per-channel mean (bias correction)
    symmetric: bool = False
    bias_correction: bool = True
    per_channel: bool = True
    weight_qmax: int = 127  # 63 with reduce-range
    weight_search: bool = False  # per-channel MSE scale search (weight-scale=mse)


def weight_axis(node: gs.Node) -> int:
    """The output-channel axis of a static/dynamic node's weight."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1  # [C_in, C_out / group, k...]
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1  # MatMul [K, N]


def _const(graph: gs.Graph, base: str, suffix: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(rewrite.derived_name(graph, base, suffix), np.asarray(value))


def _var(graph: gs.Graph, base: str, suffix: str, dtype) -> gs.Variable:
    return gs.Variable(rewrite.derived_name(graph, base, suffix), dtype=dtype)


def apply_plan(graph: gs.Graph, plan: Plan, qp: QuantParams) -> dict[str, int]:
    """Rewrite ``graph`` (float, BN folded) in place into its quantized form; returns counts."""
    stats = {"static": 0, "dynamic": 0, "embed": 0, "int8_neighbours": 0, "qdq_pairs": 0, "bias_corrected": 0}
    layout = derive_layout(graph, plan.static)
    tensors = ir.tensor_map(graph)

    def params(tname: str):
        lo, hi = qp.ranges.get(layout.qt[tname], (0.0, 0.0))
        return act_params(lo, hi, qp.symmetric)

    # weights and biases of static nodes
    for n in layout.int8_nodes:
        if n.name not in plan.static:
            continue
        xs, _ = params(n.inputs[0].name)
        _quantize_static_node(graph, n, xs, qp, stats)
        stats["static"] += 1
    stats["int8_neighbours"] = len(layout.neighbours)

    # Q/DQ pairs on activations
    int8_names = {n.name for n in layout.int8_nodes}
    uses_by_tensor: dict[str, list[tuple[gs.Node, int]]] = {}
    for node, slot, tname in layout.uses:
        uses_by_tensor.setdefault(tname, []).append((node, slot))
    for tname in layout.qt:
        t = tensors[tname]
        scale, zp = params(tname)
        prod = rewrite.producer(t)
        produced_int8 = prod is not None and (prod.name in int8_names or prod.name in layout.absorbed)
        readers = list(uses_by_tensor.get(tname, []))
        if produced_int8:  # every reader goes through the DQ, or onnxruntime cannot fuse the producer
            seen = {(id(a), b) for a, b in readers}
            for c in list(t.outputs):
                for i, inp in enumerate(c.inputs):
                    if inp is t and (id(c), i) not in seen:
                        readers.append((c, i))
        if not readers:
            continue
        s_c = _const(graph, tname, "scale", scale)
        z_c = _const(graph, tname, "zp", zp)
        q_out = _var(graph, tname, "q", zp.dtype)
        graph.nodes.append(gs.Node("QuantizeLinear", rewrite.derived_name(graph, tname, "Q"), inputs=[t, s_c, z_c], outputs=[q_out]))
        # one DQ shared by the readers (onnxruntime gives each node unit its own copy when it loads)
        dq_out = _var(graph, tname, "dq", np.float32)
        graph.nodes.append(gs.Node("DequantizeLinear", rewrite.derived_name(graph, tname, "DQ"), inputs=[q_out, s_c, z_c], outputs=[dq_out]))
        for c, slot in readers:
            c.inputs[slot] = dq_out
        stats["qdq_pairs"] += 1

    # dynamic MatMul / Gemm
    dql_cache: dict[str, tuple[gs.Tensor, gs.Tensor, gs.Tensor]] = {}
    for n in list(graph.nodes):
        if n.name in plan.dynamic:
            _quantize_dynamic_node(graph, n, qp, dql_cache, stats)
            stats["dynamic"] += 1
        elif n.name in plan.embed:
            _quantize_embedding(graph, n)
            stats["embed"] += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return stats


def _bias_shift(n: gs.Node, w: np.ndarray, dw: np.ndarray, mean: np.ndarray | None) -> np.ndarray | None:
    """The mean output shift (W - Wq) . E[x] per output channel, or None without statistics."""
    if mean is None or n.op == "ConvTranspose":  # strided scatter: the shift is not uniform per channel
        return None
    if n.op == "Conv":
        group = int(n.attrs.get("group", 1))
        o, ig = w.shape[0], w.shape[1]
        if mean.shape[0] != ig * group:
            return None
        per = dw.reshape(o, ig, -1).sum(axis=2)  # [O, Ig]
        m = mean.reshape(group, ig)
        og = o // group
        return np.einsum("gki,gi->gk", per.reshape(group, og, ig), m).reshape(o).astype(np.float32)
    wkn = dw.T if (n.op == "Gemm" and int(n.attrs.get("transB", 0))) else dw  # [K, N]
    if mean.shape[0] != wkn.shape[0]:
        return None
    return (mean.astype(np.float64) @ wkn.astype(np.float64)).astype(np.float32)


def _quantize_static_node(graph, n: gs.Node, xs: np.float32, qp: QuantParams, stats) -> None:
    w = rewrite.const_value(n.inputs[1]).astype(np.float32)
    axis = weight_axis(n)
    q, ws = quantize_weight(w, axis if qp.per_channel else None, qp.weight_qmax, qp.weight_search)
    wname = n.inputs[1].name
    w_dq = _var(graph, wname, "dq", np.float32)
    dq_attrs = {"axis": axis} if ws.ndim else {}
    graph.nodes.append(gs.Node("DequantizeLinear", rewrite.derived_name(graph, wname, "DQ"),
                               attrs=dq_attrs, inputs=[_const(graph, wname, "q", q), _const(graph, wname, "scale", ws)]
                               + ([] if n.op in ("Conv", "ConvTranspose") else [_const(graph, wname, "zp", np.zeros(ws.shape, np.int8))]),
                               outputs=[w_dq]))  # Conv: zero point omitted (0; smaller file); QGemm fusion wants it
    n.inputs[1] = w_dq
    if n.op == "MatMul":
        return
    if n.op == "ConvTranspose":
        group = int(n.attrs.get("group", 1))
        nout = w.shape[1] * group
        if ws.ndim and group > 1:  # output channel g * (C_out / group) + j has weight scale ws[j]
            ws_out = np.tile(ws, group)
        else:
            ws_out = ws
    else:
        nout = w.shape[0] if axis == 0 else w.shape[1]
        ws_out = ws
    b = rewrite.const_value(n.inputs[2]) if len(n.inputs) > 2 and not n.inputs[2].is_empty() else None
    b = np.zeros(nout, np.float32) if b is None else np.asarray(b, np.float32).reshape(-1)
    if b.size == 1 and nout > 1:
        b = np.full(nout, b.item(), np.float32)
    if qp.bias_correction:
        shift = _bias_shift(n, w, w - dequantize_weight(q, ws, axis if qp.per_channel else None), qp.channel_means.get(n.inputs[0].name))
        if shift is not None:
            b = b + shift
            stats["bias_corrected"] += 1
    bs = (np.float32(xs) * (ws_out if ws_out.ndim else np.full(nout, ws_out, np.float32))).astype(np.float32)
    bq = np.clip(np.rint(b / bs), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    bname = n.inputs[2].name if len(n.inputs) > 2 and not n.inputs[2].is_empty() else n.name + "_bias"
    b_dq = _var(graph, bname, "dq", np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", rewrite.derived_name(graph, bname, "DQ"), attrs={"axis": 0},
                               inputs=[_const(graph, bname, "q", bq), _const(graph, bname, "scale", bs)], outputs=[b_dq]))
    if len(n.inputs) > 2:
        n.inputs[2] = b_dq
    else:
        n.inputs.append(b_dq)


def _quantize_dynamic_node(graph, n: gs.Node, qp: QuantParams, cache, stats) -> None:
    a = n.inputs[0]
    w = rewrite.const_value(n.inputs[1]).astype(np.float32)
    trans = n.op == "Gemm" and int(n.attrs.get("transB", 0))
    wkn = np.ascontiguousarray(w.T) if trans else w
    q, ws = quantize_weight(wkn, 1 if qp.per_channel else None, qp.weight_qmax, qp.weight_search)
    dw = wkn - dequantize_weight(q, ws, 1 if qp.per_channel else None)
    if a.name not in cache:
        aq = _var(graph, a.name, "q", np.uint8)
        asc = _var(graph, a.name, "scale", np.float32)
        azp = _var(graph, a.name, "zp", np.uint8)
        graph.nodes.append(gs.Node("DynamicQuantizeLinear", rewrite.derived_name(graph, a.name, "DQL"), inputs=[a], outputs=[aq, asc, azp]))
        cache[a.name] = (aq, asc, azp)
    aq, asc, azp = cache[a.name]
    base = n.name or n.outputs[0].name
    wname = n.inputs[1].name
    mm = _var(graph, base, "int32", np.int32)
    graph.nodes.append(gs.Node("MatMulInteger", rewrite.derived_name(graph, base, "MMI"),
                               inputs=[aq, _const(graph, wname, "q", q), azp], outputs=[mm]))
    mmf = _var(graph, base, "float", np.float32)
    graph.nodes.append(gs.Node("Cast", rewrite.derived_name(graph, base, "Cast"), attrs={"to": 1}, inputs=[mm], outputs=[mmf]))
    sc = _var(graph, base, "out_scale", np.float32)
    graph.nodes.append(gs.Node("Mul", rewrite.derived_name(graph, base, "scale_Mul"), inputs=[asc, _const(graph, wname, "scale", ws)], outputs=[sc]))
    out = n.outputs[0]
    shift = _bias_shift(n, w, dw.T if trans else dw, qp.channel_means.get(a.name)) if qp.bias_correction else None
    if n.op == "Gemm" and len(n.inputs) > 2 and not n.inputs[2].is_empty():
        c = rewrite.const_value(n.inputs[2]).astype(np.float32) * float(n.attrs.get("beta", 1.0))
        if shift is not None:
            c = c + shift
            stats["bias_corrected"] += 1
        y = _var(graph, base, "nobias", np.float32)
        graph.nodes.append(gs.Node("Mul", rewrite.derived_name(graph, base, "Mul"), inputs=[mmf, sc], outputs=[y]))
        graph.nodes.append(gs.Node("Add", rewrite.derived_name(graph, base, "bias_Add"), inputs=[y, _const(graph, n.inputs[2].name, "corrected", c)], outputs=[out]))
    else:
        graph.nodes.append(gs.Node("Mul", rewrite.derived_name(graph, base, "Mul"), inputs=[mmf, sc], outputs=[out]))
        if shift is not None and len(out.outputs) == 1:
            add = out.outputs[0]
            if add.op == "Add" and len(out.outputs) == 1:
                k = 1 if add.inputs[0] is out else 0
                c = rewrite.const_value(add.inputs[k])
                if c is not None and c.shape == shift.shape and rewrite.weight_used_only_by(add.inputs[k], [add]):
                    add.inputs[k] = _const(graph, add.inputs[k].name, "corrected", c.astype(np.float32) + shift)
                    stats["bias_corrected"] += 1
    n.outputs.clear()
    n.inputs.clear()


def _quantize_embedding(graph, n: gs.Node) -> None:
    table = rewrite.const_value(n.inputs[0]).astype(np.float32)
    q, s = quantize_weight(table, None)
    name = n.inputs[0].name
    out = n.outputs[0]
    g = _var(graph, out.name, "int8", np.int8)
    n.inputs[0] = _const(graph, name, "q", q)
    n.outputs[0] = g
    graph.nodes.append(gs.Node("DequantizeLinear", rewrite.derived_name(graph, name, "DQ"),
                               inputs=[g, _const(graph, name, "scale", s), _const(graph, name, "zp", np.array(0, np.int8))], outputs=[out]))
