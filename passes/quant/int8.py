"""``quantize-int8``: int8 quantization, static (QDQ) and dynamic, latency-aware, to an accuracy budget.

Steps:

1. fold Conv + BatchNormalization (exact; the BN must live in the Conv weights before quantizing);
2. choose a mode per node (``mode=auto``): Conv -> static QDQ; Gemm / MatMul with a constant weight
   and a token-shaped (rank >= 3) input -> dynamic (per-token activation ranges, onnxruntime's
   DynamicQuantizeMatMul); other Gemm / MatMul -> static when calibration data exists, dynamic
   otherwise; Gather on a constant table (embeddings) -> int8 table; everything else stays float;
3. calibrate: activation ranges and per-channel input means, streamed batch by batch;
4. latency: first each static node's int8 kernel alone (int8 in, int8 out) is timed against the
   float node (``kernel-check``): a node whose kernel is not faster (e.g. a 3-channel stem Conv) stays
   float.  Then each int8 region (connected quantized nodes, entered and left once) is cut out of the
   model and timed against its float version at ORT_ENABLE_ALL, 1 thread, interleaved rounds; a
   region that does not pay (<= ``latency-margin`` of its float time) stays float, unless it costs at
   most ``latency-floor-us`` more per run.  For a model of only MatMul/Gemm, ``mode=auto`` times the
   whole model with them static and dynamic and keeps the faster.  At the end the whole model is
   timed against two float copies (their ratio is the noise): the int8 model is kept only if it is
   faster beyond the noise, or not slower in a second, longer run (never slower: no floor here); else
   the most marginal regions go back to float and it is timed again;
5. accuracy: the candidate is checked with the verifier's own rule (``ctx.budget``, the ``--eval``
   accuracy, or the default budget); if it fails, nodes are ranked by sensitivity (quantized one at a
   time, output error measured) and the most sensitive go back to float until the budget holds;
6. rewrite: weights per-channel symmetric int8, activations uint8 asymmetric, bias int32 at the
   product scale, bias correction (the mean output shift of weight rounding, measured on the
   calibration data, folded into the bias).  ``reduce-range=auto`` uses 7-bit weights when this
   machine's int8 GEMM saturates u8 x s8 pair sums at int16 (AVX2 without VNNI): the fused kernels
   then compute exactly what the QDQ graph means, which is what the verifier checks.

Every quantizable node gets a line in the result: quantized (how) or kept float (why).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, ir, register_pass, rewrite
from graphopt.shapes import infer_shapes

from .qdq import Plan, QuantParams, apply_plan, derive_layout, fold_conv_bn, output_after_act
from .qop import to_qop


_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "MatMulInteger", "ConvInteger",
                  "QLinearMatMul", "QGemm", "QLinearAdd", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


@dataclass
class _Candidate:
    name: str
    op: str
    kind: str  # static | dynamic | embed


@register_pass
class QuantizeInt8(Pass):
    name = "quantize-int8"
    exact = False
    description = "int8 quantization: static QDQ (per-channel weights, calibrated activations) and dynamic, latency-aware, to the accuracy budget"

    @dataclass(frozen=True)
    class Options:
        mode: Literal["auto", "static", "dynamic"] = "auto"
        format: Literal["qdq", "qop"] = "qdq"  # qop: QLinearConv / QLinearMatMul / QGemm ... (qop.py)
        per_channel: bool = True
        calibration: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
        percentile: float = 99.99
        symmetric_activations: bool = False
        weight_scale: Literal["absmax", "mse"] = "mse"  # mse: per-channel clip ratio with the least weight error
        reduce_range: Literal["auto", "true", "false"] = "auto"  # 7-bit weights; auto: if the int8 GEMM saturates
        exclude: tuple[str, ...] = ()  # node names kept in float
        op_types: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
        embeddings: bool = True
        bias_correction: bool = True
        latency_check: bool = True
        latency_margin: float = 0.97  # a region must run in <= this fraction of its float time
        latency_floor_us: float = 50.0  # ...unless int8 costs at most this many microseconds more per run
        kernel_check: bool = True  # time each static node's int8 kernel alone first; slower ones stay float
        max_calibration_batches: int = 0  # 0: all
        ranking: Literal["on-failure", "always"] = "on-failure"  # sensitivity ranking in the report
        min_weight_elements: int = 0  # smaller weights stay float (the latency check decides otherwise)

    # ------------------------------------------------------------------------------------------
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        stats: dict[str, int] = {}
        skipped: list[str] = []
        notes: list[str] = []
        if (ctx.opset or graph.opset or 0) < 13:
            return PassResult(False, {"quantized": 0}, [f"model: opset {ctx.opset or graph.opset} < 13 has no per-channel QuantizeLinear; not quantized"])
        if any(n.op in _QUANTIZED_OPS for n in graph.nodes):
            return PassResult(False, {"quantized": 0}, ["model: already quantized"])

        changed = False
        folded = fold_conv_bn(graph, ctx, skipped)
        if folded:
            changed = True
            stats["bn_folded"] = folded
        self._name_nodes(graph)
        annotated = {name for name, t in ir.tensor_map(graph).items() if isinstance(t, gs.Variable) and (t.shape is not None or t.dtype is not None)}
        infer_shapes(graph, ctx)

        cands, why = self._candidates(graph, ctx)
        skipped.extend(why)
        if not cands:
            stats["quantized"] = 0
            return PassResult(changed, stats, skipped, notes)
        plan = Plan({c.name for c in cands if c.kind == "static"}, {c.name for c in cands if c.kind == "dynamic"},
                    {c.name for c in cands if c.kind == "embed"})
        by_name = {c.name: c for c in cands}

        # calibration -------------------------------------------------------------------------
        float_model = ctx.to_model(graph)
        qp = self._calibrate(graph, ctx, plan, float_model)

        # auto: static or dynamic for a model of only MatMul / Gemm (no Conv), by measurement ----
        reasons: dict[str, str] = {}
        if o.mode == "auto" and o.latency_check and plan.static and not any(by_name[n].op in ("Conv", "ConvTranspose") for n in plan.static):
            plan, note = self._static_or_dynamic(graph, ctx, plan, qp, by_name)
            notes.append(note)

        # latency -----------------------------------------------------------------------------
        if o.latency_check:
            plan, lat_notes = self._latency_filter(graph, ctx, plan, qp, reasons)
            notes.extend(lat_notes)

        # accuracy ----------------------------------------------------------------------------
        check = _BudgetCheck(ctx, float_model, graph)
        plan, acc_notes = self._budget_filter(graph, ctx, plan, qp, check, reasons)
        notes.extend(acc_notes)

        # the whole model, as a last guard: regions that pay alone must also pay together ----------
        if o.latency_check and (plan.static | plan.dynamic | getattr(self, "_kernel_dropped", set())):
            plan = self._whole_model_check(graph, ctx, plan, qp, float_model, reasons, notes, check.feeds, check)

        for c in cands:
            if c.name in (plan.static | plan.dynamic | plan.embed):
                continue
            skipped.append(f"{c.name}: {c.op} kept in float: {reasons.get(c.name, 'not selected')}")
        stats["kept_float"] = len(cands) - len(plan)
        if not len(plan):
            stats["quantized"] = 0
            return PassResult(changed, stats, skipped, notes)
        allowed = []  # one rewrite per quantized node, so opt-bisect can find a bad one
        for u in plan.units():
            if not ctx.allow_rewrite(f"quantize {u} to int8"):
                skipped.append(f"{u}: {by_name[u].op} kept in float: rewrite limit reached")
                break
            allowed.append(u)
        plan = plan.only(allowed)
        stats["kept_float"] = len(cands) - len(plan)
        if not len(plan):
            stats["quantized"] = 0
            return PassResult(changed, stats, skipped, notes)
        counts = apply_plan(graph, plan, qp)
        if o.format == "qop":
            counts.update(to_qop(graph, ctx.opset or graph.opset or 13))
        if qp.weight_qmax < 127:
            notes.append("weights use 7 bits (reduce-range): this machine's int8 GEMM saturates u8 x s8 pair sums at int16 "
                         "(AVX2 without VNNI), which the unfused reference run would not show")
        # the shapes inferred for planning are not written out (value_info would cost ~1% of the file)
        io = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
        for name, t in ir.tensor_map(graph).items():
            if isinstance(t, gs.Variable) and id(t) not in io and name not in annotated:
                t.shape, t.dtype = None, None
        form = "QOperator" if o.format == "qop" else "QDQ"
        for n in sorted(plan.static):
            notes.append(f"{n}: {by_name[n].op} static int8 ({form}, per-channel weights)")
        for n in sorted(plan.dynamic):
            notes.append(f"{n}: {by_name[n].op} dynamic int8 (weights int8, activations quantized per run)")
        for n in sorted(plan.embed):
            notes.append(f"{n}: Gather table stored int8 (dequantized after the lookup)")
        stats.update(counts)
        stats["quantized"] = len(plan)
        return PassResult(True, stats, skipped, notes)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _name_nodes(graph: gs.Graph) -> None:
        seen: set[str] = set()
        for i, n in enumerate(graph.nodes):
            if not n.name or n.name in seen:
                n.name = rewrite.derived_name(graph, n.name or n.op, str(i))
            seen.add(n.name)

    def _candidates(self, graph: gs.Graph, ctx: PassContext) -> tuple[list[_Candidate], list[str]]:
        o = self.options
        out: list[_Candidate] = []
        why: list[str] = []
        exclude = set(o.exclude)
        ops = set(o.op_types)
        calib = ctx.has_calibration
        for n in graph.nodes:
            if n.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather") or n.op not in ops:
                continue
            if n.name in exclude:
                why.append(f"{n.name}: {n.op} excluded by the user")
                continue
            reason, kind = self._check(graph, n, calib)
            if reason:
                if reason != "-":
                    why.append(f"{n.name}: {n.op} kept in float: {reason}")
                continue
            out.append(_Candidate(n.name, n.op, kind))
        return out, why

    def _check(self, graph: gs.Graph, n: gs.Node, calib: bool) -> tuple[str, str]:
        """('', kind) when ``n`` can be quantized, else (reason, ''); reason '-' = not a weight op."""
        o = self.options
        if n.op == "Gather":
            if not o.embeddings or not rewrite.is_const(n.inputs[0]) or rewrite.is_const(n.inputs[1]):
                return "-", ""
            t = rewrite.const_value(n.inputs[0])
            if t.dtype != np.float32 or t.ndim != 2 or int(n.attrs.get("axis", 0)) != 0:
                return "-", ""
            if t.size < 4096:
                return "table too small to matter", ""
            if not rewrite.weight_used_only_by(n.inputs[0], [n]):
                return "the table is shared with other nodes", ""
            return "", "embed"
        if len(n.inputs) < 2 or not rewrite.is_const(n.inputs[1]):
            return ("-", "") if n.op == "MatMul" else ("weight is not a constant", "")
        w = rewrite.const_value(n.inputs[1])
        a = n.inputs[0]
        if w.dtype != np.float32 or not isinstance(a, gs.Variable) or (a.dtype is not None and np.dtype(a.dtype) != np.float32):
            return "not float32", ""
        if not rewrite.weight_used_only_by(n.inputs[1], [n]):
            return "the weight is shared with other nodes", ""
        if w.size < o.min_weight_elements:
            return f"weight of {w.size} elements is too small to pay for a Q/DQ boundary", ""
        rank = len(a.shape) if a.shape is not None else None
        if n.op in ("Conv", "ConvTranspose"):
            if w.ndim not in (3, 4):
                return f"{w.ndim - 2}-D {n.op} has no int8 kernel here", ""
            if len(n.inputs) > 2 and not n.inputs[2].is_empty() and not rewrite.is_const(n.inputs[2]):
                return "bias is not a constant", ""
            if o.mode == "dynamic":
                return f"dynamic {n.op} (ConvInteger) is slower than float on onnxruntime CPU", ""
            if not calib:
                return f"static int8 {n.op} needs calibration data (--calibration)", ""
            return "", "static"
        if w.ndim != 2:
            return "weight is not 2-D", ""
        if n.op == "Gemm":
            if int(n.attrs.get("transA", 0)) or float(n.attrs.get("alpha", 1.0)) != 1.0:
                return "Gemm with transA or alpha != 1", ""
            if len(n.inputs) > 2 and not n.inputs[2].is_empty():
                c = rewrite.const_value(n.inputs[2])
                nout = w.shape[0] if int(n.attrs.get("transB", 0)) else w.shape[1]
                if c is None or c.size not in (1, nout):
                    return "bias is not a constant vector", ""
                if float(n.attrs.get("beta", 1.0)) != 1.0:
                    return "Gemm with beta != 1", ""
        if o.mode == "static":
            return ("", "static") if calib else ("static int8 needs calibration data (--calibration)", "")
        if o.mode == "dynamic":
            return "", "dynamic"
        if rank is not None and rank >= 3:
            return "", "dynamic"
        return "", ("static" if calib else "dynamic")

    # ------------------------------------------------------------------------------------------
    def _calibrate(self, graph: gs.Graph, ctx: PassContext, plan: Plan, model) -> QuantParams:
        from graphopt.calibrate import collect_stats

        o = self.options
        layout = derive_layout(graph, plan.static)
        names = set(layout.qt.values())
        axes: dict[str, int] = {}
        if o.bias_correction:
            for n in graph.nodes:
                if (n.name in plan.static or n.name in plan.dynamic) and n.op != "ConvTranspose":  # no uniform shift
                    axes[n.inputs[0].name] = 1 if n.op == "Conv" else -1
        names |= set(axes)
        st = collect_stats(ctx, model, sorted(names), channel_axes=axes, method=o.calibration,
                           max_batches=o.max_calibration_batches or None)
        ranges = {k: s.range(o.calibration, o.percentile) for k, s in st.items() if s.count}
        means = {k: st[k].channel_mean for k in axes if k in st and st[k].channel_mean is not None}
        if o.reduce_range == "auto":
            from graphopt.latency import u8s8_saturates

            reduce = u8s8_saturates()
        else:
            reduce = o.reduce_range == "true"
        self._reduce_range = reduce
        return QuantParams(ranges, means, symmetric=o.symmetric_activations, bias_correction=o.bias_correction,
                           per_channel=o.per_channel, weight_qmax=63 if reduce else 127, weight_search=o.weight_scale == "mse")

    # ------------------------------------------------------------------------------------------
    def _regions(self, graph: gs.Graph, plan: Plan) -> list[tuple[set[str], list[str]]]:
        """(node names of the region incl. absorbed activations, the planned units in it)."""
        layout = derive_layout(graph, plan.static)
        int8 = {n.name for n in layout.int8_nodes}
        parent: dict[str, str] = {k: k for k in int8 | layout.absorbed}

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        def union(a, b):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[ra] = rb

        for n in graph.nodes:
            if n.name in layout.absorbed:
                p = rewrite.producer(n.inputs[0])
                if p is not None and p.name in parent:
                    union(n.name, p.name)
        for n in graph.nodes:
            if n.name not in int8:
                continue
            for t in n.inputs:
                p = rewrite.producer(t)
                if p is not None and p.name in parent and t.name in layout.qt:
                    union(n.name, p.name)
        groups: dict[str, set[str]] = {}
        for k in parent:
            groups.setdefault(find(k), set()).add(k)
        regions = [(g, sorted(g & plan.static)) for g in groups.values() if g & plan.static]
        # dynamic nodes that share an input share one DynamicQuantizeLinear: one region
        dyn: dict[str, set[str]] = {}
        for n in graph.nodes:
            if n.name in plan.dynamic:
                dyn.setdefault(n.inputs[0].name, set()).add(n.name)
        for g in dyn.values():
            nodes = set(g)
            for n in graph.nodes:  # the bias Add is fused into the int8 kernel: time it with it
                if n.name in g and len(n.outputs[0].outputs) == 1:
                    c = n.outputs[0].outputs[0]
                    if c.op == "Add" and any(rewrite.is_const(t) for t in c.inputs):
                        nodes.add(c.name)
            regions.append((nodes, sorted(g)))
        return regions

    def _whole_model_check(self, graph, ctx, plan: Plan, qp: QuantParams, float_model, reasons, notes, feeds_list, check=None) -> Plan:
        """Time the whole model against two float copies (their ratio is the noise).  Not faster beyond
        the noise: the most marginal regions go back to float (region ratio above 0.9, then 0.8, ...)
        and the model is timed again, down to all-float."""
        from graphopt import latency

        if not feeds_list:
            notes.append("latency: whole model not measured (no inputs)")
            return plan
        feeds = feeds_list[0]
        region_ratio = getattr(self, "_region_ratio", {})
        dropped = set(getattr(self, "_kernel_dropped", {}))
        if dropped and check is not None:
            # a node whose kernel alone did not pay may still pay in place (it moves the Q to a smaller
            # tensor, or keeps a layout change away): time the model both ways and keep the faster
            alt = Plan(plan.static | dropped, set(plan.dynamic), set(plan.embed))
            g1, g2 = graph.copy(), graph.copy()
            apply_plan(g1, plan, qp)
            apply_plan(g2, alt, qp)
            m2 = ctx.to_model(g2)
            try:
                t_1, t_2 = latency.compare([ctx.to_model(g1), m2], feeds, budget_seconds=2.0, max_rounds=2000)
            except Exception:
                t_1, t_2 = 1.0, 2.0
            ok, _ = check(m2) if t_2 < t_1 else (False, "")
            if ok:
                for u in dropped:
                    reasons.pop(u, None)
                    region_ratio.setdefault(u, 0.95)
                notes.append(f"latency: the model with the {len(dropped)} node(s) whose kernel alone did not pay back in int8 "
                             f"runs in {t_2 / t_1:.2f}x the time without them -> int8 again")
                plan = alt
            else:
                notes.append(f"latency: the model with the {len(dropped)} node(s) whose kernel alone did not pay back in int8 "
                             f"runs in {t_2 / t_1:.2f}x the time without them -> they stay float")
        for cut in (None, 0.9, 0.8, 0.7, 0.0):
            if cut is not None:
                drop = [u for u in plan.static | plan.dynamic if region_ratio.get(u, 0.95) > cut]
                if not drop:
                    continue
                for u in drop:
                    reasons[u] = (f"its region ({region_ratio.get(u, float('nan')):.2f}x alone) was among the most marginal "
                                  f"when the whole int8 model was not faster than float")
                plan = plan.without(drop)
                if not (plan.static | plan.dynamic):
                    notes.append("latency: no int8 compute left; compute nodes stay float (int8 Gather tables kept)")
                    return plan
            g = graph.copy()
            apply_plan(g, plan, qp)
            q_model = ctx.to_model(g)
            try:  # the float model twice: the identical pair measures the noise of this machine right now
                t_f, t_c, t_q = latency.compare([float_model, float_model, q_model], feeds, budget_seconds=3.0, max_rounds=2000)
            except Exception as e:
                notes.append(f"latency: whole model not measured ({str(e).strip()[:100]})")
                return plan
            ratio = t_q / t_f if t_f > 0 else 1.0
            noise = abs(t_c / t_f - 1.0) if t_f > 0 else 0.0
            what = "all regions" if cut is None else f"regions <= {cut}x"
            fig = (f"whole model ({what}) int8/float = {ratio:.2f} ({t_f * 1e3:.2f} -> {t_q * 1e3:.2f} ms/run, control pair "
                   f"{t_c / t_f:.2f}; ORT_ENABLE_ALL, 1 thread, interleaved medians)")
            if ratio <= 1.0 - noise:
                notes.append(f"latency: {fig} -> kept")
                return plan
            if ratio <= 1.0:  # not slower, but within the noise: a second, longer run must agree
                try:
                    t_f2, t_q2 = latency.compare([float_model, q_model], feeds, budget_seconds=6.0, max_rounds=4000)
                except Exception:
                    t_f2, t_q2 = t_f, t_q
                if t_q2 <= t_f2:
                    notes.append(f"latency: {fig}; second run {t_q2 / t_f2:.2f} -> kept (not slower)")
                    return plan
                fig += f"; second run {t_q2 / t_f2:.2f}"
            notes.append(f"latency: {fig} -> slower, or not faster beyond the noise")
        return plan

    def _static_or_dynamic(self, graph, ctx, plan: Plan, qp: QuantParams, by_name) -> tuple[Plan, str]:
        """Time the whole model with its MatMul/Gemm static (QDQ) and dynamic; keep the faster."""
        from graphopt import latency

        movable = {n for n in plan.static if by_name[n].op in ("Gemm", "MatMul")}
        alt = Plan(plan.static - movable, plan.dynamic | movable, set(plan.embed))
        feeds = next(iter(ctx.calibration_batches()), None)
        if feeds is None:
            return plan, "mode: static (no feeds to time the dynamic alternative)"
        models = []
        for p in (plan, alt):
            g = graph.copy()
            apply_plan(g, p, qp)
            models.append(ctx.to_model(g))
        try:
            t_s, t_d = latency.compare(models, feeds, budget_seconds=1.0)
        except Exception as e:  # keep the static plan if the dynamic one cannot run
            return plan, f"mode: static (dynamic alternative failed to run: {str(e).strip()[:100]})"
        if t_d < t_s:
            for n in movable:
                by_name[n].kind = "dynamic"
            return alt, f"mode: dynamic for {len(movable)} MatMul/Gemm (whole model timed: dynamic {t_d / t_s:.2f}x the static QDQ time)"
        return plan, f"mode: static QDQ for {len(movable)} MatMul/Gemm (whole model timed: static {t_s / t_d:.2f}x the dynamic time)"

    def _kernel_filter(self, graph, ctx, plan: Plan, qp: QuantParams, reasons, symbols, notes) -> Plan:
        """Each static node alone: its int8 kernel (int8 in, int8 out: what runs inside a region) timed
        against the float node (with its Relu/Clip, as onnxruntime fuses both).  A node whose kernel is not
        faster stays float, so its region is cut there (e.g. a 3-channel stem Conv, where int8 has
        nothing to gain and the Q moves after it)."""
        from graphopt import latency

        o = self.options
        layout = derive_layout(graph, plan.static)
        graph_outputs = {t.name for t in graph.outputs}
        drop = []
        for n in graph.nodes:
            if n.name not in plan.static or n.op not in ("Conv", "Gemm", "MatMul"):
                continue
            _, act = output_after_act(n, graph_outputs)
            names = {n.name} | ({act.name} if act is not None and act.name in layout.absorbed else set())
            sub = _extract(graph, names, symbols)
            if sub is None:
                continue
            g_float, feeds = sub
            g_int8 = g_float.copy()
            apply_plan(g_int8, plan.only([n.name]), qp)
            k = _kernel_only(g_int8)
            if k is None:
                continue
            g_k, k_feeds = k
            try:
                t_f, t_q = latency.compare([ctx.to_model(g_float), ctx.to_model(g_k)], {**feeds, **k_feeds}, budget_seconds=0.4)
            except Exception:
                continue
            ratio = t_q / t_f if t_f > 0 else 1.0
            if ratio > o.latency_margin:
                drop.append(n.name)
                reasons[n.name] = f"its int8 kernel alone measured {ratio:.2f}x the float {n.op} (needs <= {o.latency_margin})"
                notes.append(f"latency: node {n.name} int8 kernel/float = {ratio:.2f} ({t_f * 1e6:.0f} -> {t_q * 1e6:.0f} us/run) -> float")
        self._kernel_dropped = set(drop)
        return plan.without(drop)

    def _latency_filter(self, graph, ctx, plan: Plan, qp: QuantParams, reasons) -> tuple[Plan, list[str]]:
        from graphopt import latency

        o = self.options
        notes: list[str] = []
        self._region_ratio: dict[str, float] = {}
        self._kernel_dropped: set[str] = set()
        symbols: dict[str, int] = {}  # symbolic dims (a dynamic batch) take their size from real data
        first = next(iter(ctx.calibration_batches()), None) or (ctx.verify_feeds[0] if ctx.verify_feeds else None)
        if first is None:
            from graphopt.data import generate_feeds

            try:
                first = generate_feeds(ctx.to_model(graph), seed=ctx.seed, input_shapes=ctx.input_shapes)[0]
            except Exception:
                first = None
        for t in graph.inputs:
            if first is not None and t.name in first and t.shape is not None:
                for d, v in zip(t.shape, np.shape(first[t.name])):
                    if isinstance(d, str):
                        symbols[d] = int(v)
        if o.kernel_check:
            plan = self._kernel_filter(graph, ctx, plan, qp, reasons, symbols, notes)
        kept = plan.copy()
        regions = self._regions(graph, plan)
        for nodes, units in regions:
            sub = _extract(graph, nodes, symbols)
            if sub is None:
                notes.append(f"latency: region {units[0]}.. ({len(units)} nodes) not measured (unknown input shapes); kept int8")
                continue
            g_float, feeds = sub
            g_int8 = g_float.copy()
            apply_plan(g_int8, plan.only(units), qp)
            try:
                t_f, t_q = latency.compare([ctx.to_model(g_float), ctx.to_model(g_int8)], feeds, budget_seconds=0.6)
            except Exception as e:  # a region onnxruntime cannot run alone: measure nothing, keep float
                msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
                for u in units:
                    reasons[u] = f"latency check failed to run ({msg})"
                kept = kept.without(units)
                continue
            ratio = t_q / t_f if t_f > 0 else 1.0
            for u in units:
                self._region_ratio[u] = ratio
            label = f"{units[0]}" + (f" +{len(units) - 1}" if len(units) > 1 else "")
            extra_us = (t_q - t_f) * 1e6
            if ratio > o.latency_margin and extra_us <= o.latency_floor_us:
                notes.append(f"latency: region [{label}] int8/float = {ratio:.2f} ({t_f * 1e6:.0f} -> {t_q * 1e6:.0f} us/run, "
                             f"under the {o.latency_floor_us:g} us floor) -> int8 (size wins where time is negligible)")
            elif ratio > o.latency_margin:
                kept = kept.without(units)
                for u in units:
                    reasons[u] = f"int8 region [{label}] measured {ratio:.2f}x its float time (needs <= {o.latency_margin}), so float is faster"
                notes.append(f"latency: region [{label}] int8/float = {ratio:.2f} ({t_f * 1e6:.0f} -> {t_q * 1e6:.0f} us/run) -> float")
            else:
                notes.append(f"latency: region [{label}] int8/float = {ratio:.2f} ({t_f * 1e6:.0f} -> {t_q * 1e6:.0f} us/run) -> int8")
        return kept, notes

    # ------------------------------------------------------------------------------------------
    def _budget_filter(self, graph, ctx, plan: Plan, qp: QuantParams, check: "_BudgetCheck", reasons) -> tuple[Plan, list[str]]:
        notes: list[str] = []
        if not len(plan) or check.feeds is None:
            return plan, notes

        def build(p: Plan):
            g = graph.copy()
            apply_plan(g, p, qp)
            return ctx.to_model(g)

        ok, figure = check(build(plan))
        notes.append(f"budget: {check.rule}; all {len(plan)} planned nodes int8: {figure} -> {'holds' if ok else 'fails'}")
        if ok and self.options.ranking != "always":
            return plan, notes
        # sensitivity: quantize one unit at a time
        ranking = []
        for u in plan.units():
            err = check.error(build(plan.only([u])))
            ranking.append((err, u))
        ranking.sort(reverse=True)
        notes.append("sensitivity ranking (output error with only that node int8): " + ", ".join(f"{u}={e:.3g}" for e, u in ranking))
        if ok:
            return plan, notes
        # keep the k most sensitive in float: the smallest k that holds, found by doubling then bisection
        order = [u for _, u in ranking]
        tried: dict[int, bool] = {}

        def holds(k: int) -> bool:
            if k not in tried:
                ok_k, fig = check(build(plan.without(order[:k])))
                tried[k] = ok_k
                notes.append(f"budget: {k} most sensitive in float: {fig} -> {'holds' if ok_k else 'fails'}")
            return tried[k]

        lo, hi = 0, 1
        while hi < len(order) and not holds(hi):
            lo, hi = hi, min(2 * hi, len(order))
        if hi < len(order):  # holds(hi); holds(lo) failed (lo = 0: the full plan failed)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if holds(mid):
                    hi = mid
                else:
                    lo = mid
            for i, (err, u) in enumerate(ranking[:hi]):
                reasons[u] = f"sensitivity rank #{i + 1} (output error {err:.3g} with only it in int8); kept float to hold the budget"
            return plan.without(order[:hi]), notes
        notes.append("budget: cannot be met with any node in int8; the model stays float")
        for _, u in ranking:
            reasons.setdefault(u, "the budget cannot be met in int8")
        return Plan(), notes


class _BudgetCheck:
    """The verifier's own rule, applied inside the pass: ``ctx.budget`` on ``ctx.eval_data`` and the
    verification feeds (the user's, else the first calibration batches, like the final check)."""

    def __init__(self, ctx: PassContext, float_model, graph: gs.Graph):
        from graphopt.data import generate_feeds
        from graphopt.verify import Runner, budget_reference

        self.ctx = ctx
        self.input_model = float_model  # this pass's input: the sensitivity ranking measures against it
        # the budget: against the pipeline's original (one budget for prune + quantize, as the final check)
        self.float_model = float_model = budget_reference(ctx, float_model)
        feeds = list(ctx.verify_feeds) if ctx.verify_feeds else [f for _, f in zip(range(4), ctx.calibration_batches())]
        if not feeds:
            try:
                feeds = generate_feeds(float_model, seed=ctx.seed, input_shapes=ctx.input_shapes)
            except Exception:
                feeds = None
        self.feeds = feeds
        self.ref = self.input_ref = None
        if feeds is not None:
            r = Runner(float_model)
            self.ref = [r.run(f) for f in feeds]
            self.input_ref = self.ref if self.input_model is float_model else [Runner(self.input_model).run(f) for f in feeds[:2]]
        b = ctx.budget
        if b.is_set():
            self.rule = b.describe()
        else:
            from graphopt.verify import DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1, DEFAULT_TOP1_MIN_ROWS

            self.rule = (f"default budget (cosine >= {DEFAULT_MIN_COSINE}; top-1 agreement >= {DEFAULT_MIN_TOP1} on classifier "
                         f"outputs over >= {DEFAULT_TOP1_MIN_ROWS} rows)")

    def __call__(self, model) -> tuple[bool, str]:
        from graphopt.verify import verify_models

        v = verify_models(self.float_model, model, self.feeds, exact=False, budget=self.ctx.budget,
                          eval_data=self.ctx.eval_data, reference_outputs=self.ref)
        return v.status == "passed", v.figures()

    def error(self, model) -> float:
        """Sensitivity: worst relative L2 error of the outputs, plus the accuracy drop if labelled."""
        from graphopt.verify import Runner, accuracy, compare_outputs

        r = Runner(model)
        worst = 0.0
        for f, ref in list(zip(self.feeds, self.input_ref))[:2]:  # two batches rank well enough, at half the cost
            for m in compare_outputs(ref, r.run(f), exact=False):
                worst = max(worst, m.rel_l2)
        if self.ctx.eval_data is not None and self.ctx.budget.max_accuracy_drop is not None:
            if not hasattr(self, "_acc_ref"):
                self._acc_ref = accuracy(self.input_model, self.ctx.eval_data)
            worst += max(0.0, self._acc_ref - accuracy(model, self.ctx.eval_data)) * 100
        return worst


def _kernel_only(g: gs.Graph):
    """``g`` (one quantized node with its entry Q and exit DQ) cut to the int8 kernel alone: the graph
    input becomes the quantized tensor, the graph output the quantized result (random uint8/int8
    feeds), so onnxruntime runs only QLinearConv / QGemm / QLinearMatMul.  None if it has another form."""
    qs = [n for n in g.nodes if n.op == "QuantizeLinear" and n.inputs[0] in g.inputs]
    if len(qs) != 1 or len(g.outputs) != 1:
        return None
    out_id = g.outputs[0].inputs[0] if g.outputs[0].inputs else None  # the Identity added by _extract
    if out_id is None or out_id.op != "Identity":
        return None
    dq = out_id.inputs[0].inputs[0] if out_id.inputs[0].inputs else None
    if dq is None or dq.op != "DequantizeLinear":
        return None  # a float output (no Q after the node): nothing to cut
    q = qs[0]
    src = q.inputs[0]
    qt = q.outputs[0]
    qt.shape, qt.dtype = src.shape, np.dtype(q.inputs[2].values.dtype)
    g.inputs = [qt]
    q.inputs.clear()
    q.outputs.clear()
    y = dq.inputs[0]
    y.shape, y.dtype = g.outputs[0].shape, np.dtype(dq.inputs[2].values.dtype) if len(dq.inputs) > 2 else np.uint8
    g.outputs = [y]
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    rng = np.random.default_rng(0)
    info = np.iinfo(qt.dtype)
    return g, {qt.name: rng.integers(info.min, info.max + 1, size=qt.shape).astype(qt.dtype)}


def _extract(graph: gs.Graph, names: set[str], symbols: dict[str, int] | None = None):
    """A standalone float copy of the nodes ``names`` (+ random feeds), or None if shapes are unknown.

    Tensors leaving the region go through an Identity so that, as in the full model, they are not
    graph outputs of the quantized node itself (its output Q/DQ stays, as it would in place).
    """
    g = graph.copy()
    keep = [n for n in g.nodes if n.name in names]
    keep_ids = {id(n) for n in keep}
    produced = {id(t) for n in keep for t in n.outputs}
    inputs, outputs = [], []
    seen = set()
    for n in keep:
        for t in n.inputs:
            if isinstance(t, gs.Variable) and not t.is_empty() and id(t) not in produced and id(t) not in seen:
                seen.add(id(t))
                inputs.append(t)
    graph_outs = {id(t) for t in g.outputs}
    for n in keep:
        for t in n.outputs:
            if id(t) in graph_outs or any(id(c) not in keep_ids for c in t.outputs):
                outputs.append(t)
    rng = np.random.default_rng(0)
    feeds = {}
    symbols = symbols or {}
    for t in inputs:
        if t.shape is None or t.dtype is None:
            return None
        t.shape = [symbols.get(d, d) if isinstance(d, str) else d for d in t.shape]
        if any(not isinstance(d, int) for d in t.shape):
            return None
        dt = np.dtype(t.dtype)
        if dt.kind != "f":
            return None
        feeds[t.name] = rng.standard_normal(t.shape).astype(dt)
    for n in g.nodes:
        if id(n) not in keep_ids:  # detach, so tensors forget their readers outside the region
            n.inputs.clear()
            n.outputs.clear()
    g.nodes = keep
    g.inputs = inputs
    outs = []
    for t in outputs:
        o = gs.Variable(t.name + "_region_out", dtype=t.dtype, shape=t.shape)
        g.nodes.append(gs.Node("Identity", t.name + "_region_identity", inputs=[t], outputs=[o]))
        outs.append(o)
    g.outputs = outs
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    return g, feeds
