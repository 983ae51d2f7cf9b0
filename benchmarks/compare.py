"""graphopt side by side with onnxsim, onnxslim, onnxoptimizer and onnxruntime's own optimizer and quantizer.

    python benchmarks/compare.py                 # every model of ../shared/corpus and ../shared/digits
    python benchmarks/compare.py --quick         # small models, fewer rounds (results/quick.*)
    python benchmarks/compare.py --int8          # also graphopt quantize-int8 vs ORT quantize_dynamic/static
    python benchmarks/compare.py --models a.onnx b.onnx --pipeline fuse=O1,fuse-conv-bn

Needs the ``bench`` extra (``pip install -e '.[bench]'``).  For each model every tool runs in its own
subprocess (``compare.py --worker``) with a timeout; its wall time (load -> optimize -> save, imports
excluded) and peak RSS are recorded, and a crash or a timeout is recorded with its first error line
instead of stopping the run.  Then, in this process: node count, file size, output deviation from the
original (onnxruntime at ORT_DISABLE_ALL on the model's sample inputs) and latency ratios vs the
original under ORT_DISABLE_ALL and ORT_ENABLE_ALL, measured in interleaved rounds with 1 thread
(graphopt.bench.interleaved_latency).  The original is measured twice, as "original" and "control": the
control's ratio is the noise of the run.  The floor is ``onnx.load`` + ``onnx.save`` of the model.

graphopt's candidates are read from the registry at run time: every preset of graphopt.presets.PRESETS
(except O0), the pipelines given with ``--pipeline NAME=TEXT``, and with ``--int8`` the pipeline
``O2,quantize-int8`` when the ``quantize-int8`` pass is registered ("not available" otherwise).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _find_shared() -> Path:
    """``$GRAPHOPT_SHARED``, else ``../shared`` next to the checkout (or next to its parent, for git worktrees)."""
    if os.environ.get("GRAPHOPT_SHARED"):
        return Path(os.environ["GRAPHOPT_SHARED"])
    for cand in (REPO.parent / "shared", REPO.parent.parent / "shared"):
        if (cand / "corpus").is_dir() or (cand / "digits").is_dir():
            return cand
    return REPO.parent / "shared"


SHARED = _find_shared()

QUICK_MAX_BYTES = 12 * 2**20  # --quick keeps models below this size
CALIB_SAMPLES = 16  # generated calibration samples for the corpus models (digits use its x_calib)
DIGITS_LATENCY_BATCH = 32


# ==================================================================================================
# The worker side: one tool, one model, one subprocess
# ==================================================================================================


def _first_error_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    msg = lines[0] if lines else ""
    return f"{type(e).__name__}: {msg}"[:300] if msg else type(e).__name__


def _calibration_feeds(calib_npz: str, model_path: str) -> list[dict[str, np.ndarray]]:
    """The calibration batches graphopt itself would make from this .npz (same function, same batches)."""
    import onnx

    from graphopt.data import feeds_batches

    model = onnx.load(model_path, load_external_data=False)
    with np.load(calib_npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return list(feeds_batches(arrays, model))


def attention_dims(model) -> tuple[int, int]:
    """(num_heads, hidden_size) of a transformer export, or (0, 0) when unsure (optimize_model then guesses).

    hidden: the width of the table that ``input_ids`` indexes; head_dim: the softmax scale, a scalar constant
    multiplying (1/sqrt(d)) or dividing (sqrt(d)) a MatMul's output.
    """
    from onnx import numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    producer = {o: n for n in model.graph.node for o in n.output}
    hidden = 0
    ids = {"input_ids"}  # input_ids and what it becomes through reshapes and casts
    for n in model.graph.node:  # nodes are in topological order
        if n.op_type in ("Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten", "Identity") and n.input and n.input[0] in ids:
            ids.update(n.output)
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in ids and n.input[0] in consts:
            dims = list(consts[n.input[0]].dims)
            if len(dims) == 2:
                hidden = int(dims[1])
                break
    head_dims = []
    for n in model.graph.node:
        if n.op_type not in ("Mul", "Div") or len(n.input) != 2:
            continue
        for x, c in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            p = producer.get(x)
            if c in consts and p is not None and p.op_type == "MatMul":
                v = numpy_helper.to_array(consts[c])
                if v.size != 1 or v.dtype.kind != "f" or float(v.reshape(-1)[0]) <= 0:
                    continue
                v = float(v.reshape(-1)[0])
                d = 1.0 / (v * v) if n.op_type == "Mul" else v * v
                if abs(d - round(d)) < 1e-3 * d and round(d) > 1:
                    head_dims.append(int(round(d)))
    if hidden and head_dims:
        d = max(set(head_dims), key=head_dims.count)
        if hidden % d == 0:
            return hidden // d, hidden
    return 0, 0


def _tool_fn(tool: str, src: str, dst: str, opts: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """Import what ``tool`` needs now (outside the timed region) and return the timed work."""
    if tool == "floor":
        import onnx

        def run():
            onnx.save(onnx.load(src), dst)
            return {}
        return run
    if tool.startswith("graphopt"):
        import graphopt
        from graphopt.pass_base import load_builtin_passes

        load_builtin_passes()

        def run():
            res = graphopt.optimize(src, opts["pipeline"], output=dst, inputs=opts.get("inputs"),
                                    calibration=opts.get("calib"), seed=0, verify=opts.get("verify", "end"))
            v = res.verification.status if res.verification else "off"
            return {"verification": v, "passes_s": res.report.seconds.get("passes")}
        return run
    if tool == "onnxsim":
        import onnx
        import onnxsim

        def run():
            m, ok = onnxsim.simplify(onnx.load(src))
            onnx.save(m, dst)
            return {"check": bool(ok)}
        return run
    if tool == "onnxslim":
        import onnx
        import onnxslim

        def run():
            m = onnxslim.slim(onnx.load(src))
            onnx.save(m, dst)
            return {}
        return run
    if tool == "onnxoptimizer":
        import onnx
        import onnxoptimizer

        def run():
            onnx.save(onnxoptimizer.optimize(onnx.load(src)), dst)
            return {}
        return run
    if tool.startswith("ort-") and tool in ("ort-basic", "ort-extended", "ort-all"):
        import onnxruntime as ort

        level = {"ort-basic": "ORT_ENABLE_BASIC", "ort-extended": "ORT_ENABLE_EXTENDED", "ort-all": "ORT_ENABLE_ALL"}[tool]

        def run():
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            so.optimized_model_filepath = dst
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
            return {}
        return run
    if tool == "ort-transformers":
        import logging

        import onnx

        from onnxruntime.transformers.optimizer import optimize_model

        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)

        def run():
            # opt_level=0: the transformer fusions themselves.  The default (1) first runs onnxruntime's basic
            # level through optimize_by_onnxruntime, which imports torch for a version check (not installed).
            heads, hidden = attention_dims(onnx.load(src, load_external_data=False))
            m = optimize_model(src, model_type=opts["model_type"], num_heads=heads, hidden_size=hidden, opt_level=0)
            m.save_model_to_file(dst)
            return {"fused": {k: v for k, v in (m.get_fused_operator_statistics() or {}).items() if v}}
        return run
    if tool == "ort-quant-dynamic":
        from onnxruntime.quantization import quantize_dynamic

        def run():
            quantize_dynamic(src, dst)
            return {}
        return run
    if tool == "ort-quant-static":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        batches = _calibration_feeds(opts["calib"], src)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(batches)

            def get_next(self):
                return next(self._it, None)

        def run():
            pre = dst + ".pre.onnx"
            quant_pre_process(src, pre)
            quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ)
            os.remove(pre)
            return {"calibration_batches": len(batches)}
        return run
    raise ValueError(f"unknown tool {tool}")


def worker_main(argv: list[str]) -> int:
    """``compare.py --worker TOOL SRC DST OPTS_JSON``: prints one JSON line with seconds and peak RSS."""
    import warnings

    import psutil

    from graphopt.bench import peak_rss_bytes

    warnings.filterwarnings("ignore")
    tool, src, dst, opts = argv[0], argv[1], argv[2], json.loads(argv[3])
    out: dict[str, Any] = {}
    try:
        fn = _tool_fn(tool, src, dst, opts)
        out["baseline_rss"] = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        extra = fn()
        out["seconds"] = time.perf_counter() - t0
        out.update(extra or {})
        if not Path(dst).is_file():
            raise RuntimeError("the tool wrote no model")
    except BaseException as e:  # noqa: BLE001 - every failure is a result here
        out["error"] = _first_error_line(e)
        out["traceback"] = traceback.format_exc()[-2000:]
    out["peak_rss"] = peak_rss_bytes()
    print("\n" + json.dumps(out, default=str), flush=True)
    return 0 if "error" not in out else 1


def run_tool(tool: str, src: Path, dst: Path, opts: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(src), str(dst), json.dumps(opts)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "process_s": time.perf_counter() - t0}
    res: dict[str, Any] = {}
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if lines:
        try:
            res = json.loads(lines[-1])
        except json.JSONDecodeError:
            res = {}
    if not res:
        err = [l.strip() for l in p.stderr.splitlines() if l.strip()]
        first = next((l for l in err if "Error" in l or "error" in l), err[-1] if err else "")
        res = {"error": f"crashed (exit {p.returncode}){': ' + first[:250] if first else ''}"}
    res["process_s"] = time.perf_counter() - t0
    return res


# ==================================================================================================
# The driver
# ==================================================================================================


@dataclass
class ModelCase:
    name: str
    path: Path
    kind: str  # "image" | "transformer" | "digits"
    feeds: dict[str, np.ndarray]  # deviation inputs
    latency_feeds: dict[str, np.ndarray]
    calib: dict[str, np.ndarray]  # samples on the first axis (graphopt --calibration format)
    model_type: str | None = None  # for onnxruntime.transformers
    labels: np.ndarray | None = None


def _model_type(path: Path, model) -> str | None:
    stem = path.stem.lower()
    if "gpt2" in stem or "gpt" in stem:
        return "gpt2"
    if "bert" in stem:
        return "bert"
    names = {i.name for i in model.graph.input}
    return "bert" if "input_ids" in names else None


def load_case(path: Path, seed: int = 0) -> ModelCase:
    import onnx

    from graphopt.data import generate_feeds, index_ranges, input_specs

    model = onnx.load(str(path), load_external_data=False)
    specs = input_specs(model)
    names = [s.name for s in specs]
    mt = _model_type(path, model)
    if path.parent.name == "digits" and (path.parent / "digits_data.npz").is_file():
        with np.load(path.parent / "digits_data.npz") as z:
            x_test, y_test, x_calib = z["x_test"], z["y_test"], z["x_calib"]
        n = names[0]
        return ModelCase(path.stem, path, "digits", {n: x_test}, {n: x_test[:DIGITS_LATENCY_BATCH]}, {n: x_calib},
                         None, y_test)
    sample = path.with_suffix(".npz")
    if sample.is_file():
        with np.load(sample) as z:
            feeds = {k: z[k] for k in names if k in z.files}
        if len(feeds) != len(names):
            feeds = generate_feeds(model, seed=seed)[0]
    else:
        feeds = generate_feeds(model, seed=seed)[0]
    # calibration: N(0,1) images (how the corpus was calibrated), random token ids in the table's range,
    # and the sample's own masks / segment ids (random integers would not be a valid mask)
    rng = np.random.default_rng(seed + 1)
    ranges = index_ranges(model)
    calib: dict[str, np.ndarray] = {}
    for k, v in feeds.items():
        if v.dtype.kind == "f":
            calib[k] = rng.standard_normal((CALIB_SAMPLES * v.shape[0],) + v.shape[1:]).astype(v.dtype)
        elif k in ranges:
            lo, hi = ranges[k]
            calib[k] = rng.integers(lo, hi, size=(CALIB_SAMPLES * v.shape[0],) + v.shape[1:]).astype(v.dtype)
        else:
            calib[k] = np.concatenate([v] * CALIB_SAMPLES, axis=0)
    kind = "transformer" if mt else "image"
    return ModelCase(path.stem, path, kind, feeds, feeds, calib, mt)


# Issue 4's speed line: -O1 without verification against the floor (onnx.load + onnx.save).  Its model is
# the verified graphopt-O1's, so it is timed and checked but left out of the latency rounds.
NOVERIFY = "graphopt-O1-noverify"


def tool_plan(case: ModelCase, args) -> list[tuple[str, str, dict[str, Any]]]:
    """(column, worker tool, options) for this model, read from the registry at run time."""
    from graphopt.pass_base import registered_passes
    from graphopt.presets import PRESETS

    plan: list[tuple[str, str, dict[str, Any]]] = [("floor", "floor", {})]
    for name in PRESETS:
        if name == "O0":
            continue
        plan.append((f"graphopt-{name}", "graphopt", {"pipeline": name}))
    plan.append((NOVERIFY, "graphopt", {"pipeline": "O1", "verify": "off"}))
    for spec in args.pipeline or []:
        label, _, text = spec.partition("=")
        plan.append((f"graphopt-{label}", "graphopt", {"pipeline": text}))
    plan += [("onnxsim", "onnxsim", {}), ("onnxslim", "onnxslim", {}), ("onnxoptimizer", "onnxoptimizer", {}),
             ("ort-basic", "ort-basic", {}), ("ort-extended", "ort-extended", {}), ("ort-all", "ort-all", {})]
    plan.append(("ort-transformers", "ort-transformers", {"model_type": case.model_type}))
    if args.int8:
        if "quantize-int8" in registered_passes():
            plan.append(("graphopt-int8", "graphopt", {"pipeline": "O2,quantize-int8", "int8": True}))
        else:
            plan.append(("graphopt-int8", "unavailable", {"reason": "not available: the quantize-int8 pass is not registered"}))
        plan += [("ort-quant-dynamic", "ort-quant-dynamic", {}), ("ort-quant-static", "ort-quant-static", {})]
    return plan


def _count_nodes(path: Path) -> int:
    import onnx

    from graphopt.bench import _count_nodes as count_in_model

    return count_in_model(onnx.load(str(path), load_external_data=False))


def deviation(ref: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray | None) -> dict[str, Any]:
    """Worst figures over the outputs (matched by position: tools may rename nothing, but be safe)."""
    from graphopt.verify import compare_arrays

    d: dict[str, Any] = {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "shapes_equal": len(ref) == len(got)}
    for i, (r, g) in enumerate(zip(ref, got)):
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape:
            d["shapes_equal"] = False
            continue
        m = compare_arrays(f"out{i}", r, g.astype(r.dtype) if g.dtype != r.dtype else g, exact=False)
        d["max_abs"] = max(d["max_abs"], m.max_abs)
        d["rel_l2"] = max(d["rel_l2"], m.rel_l2)
        d["cosine"] = min(d["cosine"], m.cosine)
        if m.top1_agreement is not None and i == 0:
            d["top1_agreement"] = m.top1_agreement
    if labels is not None and got and np.asarray(got[0]).ndim == 2:
        d["accuracy"] = float((np.asarray(got[0]).argmax(-1) == labels).mean())
    return d


def measure_model(case: ModelCase, args, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:

    from graphopt.bench import interleaved_latency, ort_session

    ws = workdir / case.name
    ws.mkdir(parents=True, exist_ok=True)
    feeds_npz = ws / "inputs.npz"
    np.savez(feeds_npz, **case.feeds)
    calib_npz = ws / "calib.npz"
    np.savez(calib_npz, **case.calib)
    # tools read a private copy: some write side files next to their input (onnxruntime's quantizers write
    # "<model>-inferred.onnx"), and the shared folder must stay untouched
    src = ws / f"{case.name}.onnx"
    shutil.copyfile(case.path, src)
    rec: dict[str, Any] = {"model": case.name, "path": str(case.path), "kind": case.kind, "tools": {}}
    orig = {"nodes": _count_nodes(case.path), "bytes": case.path.stat().st_size}
    rec["tools"]["original"] = orig

    # 1. every tool in its own subprocess
    outputs: dict[str, Path] = {}
    timed: list[tuple[str, str, dict[str, Any]]] = []  # the runs that worked, to time again
    for col, tool, opts in tool_plan(case, args):
        if tool == "unavailable":
            rec["tools"][col] = {"error": opts["reason"], "unavailable": True}
            log(f"  {col:18s} {opts['reason']}")
            continue
        if tool == "ort-transformers" and not case.model_type:
            rec["tools"][col] = {"na": "not a transformer model"}
            continue
        o = dict(opts)
        if tool == "graphopt":
            o["inputs"] = str(feeds_npz)
            if o.pop("int8", False):
                o["calib"] = str(calib_npz)
        if tool == "ort-quant-static":
            o["calib"] = str(calib_npz)
        dst = ws / f"{col}.onnx"
        r = run_tool(tool, src, dst, o, args.timeout)
        if "error" not in r:
            r.pop("traceback", None)
        if "error" not in r and dst.is_file():
            r["nodes"] = _count_nodes(dst)
            r["bytes"] = dst.stat().st_size + sum(p.stat().st_size for p in ws.glob(f"{col}.onnx.data"))
            if col != "floor":
                outputs[col] = dst
        rec["tools"][col] = r
        if "error" not in r:
            timed.append((col, tool, o))
        status = f"error: {r['error']}" if "error" in r else f"{r.get('seconds', 0):6.2f} s, {r.get('nodes')} nodes"
        log(f"  {col:18s} {status}")
    # --time-runs N: N-1 more rounds, every tool once per round (interleaved), its wall time the median
    for _ in range(args.time_runs - 1):
        for col, tool, o in timed:
            scratch = ws / f"{col}.again.onnx"
            again = run_tool(tool, src, scratch, o, args.timeout)
            scratch.unlink(missing_ok=True)  # (a timing run: its model is the first run's, kept or not)
            t = rec["tools"][col]
            if "seconds" in again:
                t.setdefault("seconds_runs", [t["seconds"]]).append(again["seconds"])
    for t in rec["tools"].values():
        if "seconds_runs" in t:
            t["seconds"] = float(np.median(t["seconds_runs"]))
    if args.time_runs > 1:
        log(f"  wall times: medians of {args.time_runs} interleaved runs")

    floor_ratios(rec["tools"])

    # 2. deviation from the original (ORT_DISABLE_ALL, the model's sample inputs)
    def _sess(p: Path, level: str):
        return ort_session(p, level, 1)

    ref_sess = _sess(case.path, "disable")
    ref_out = ref_sess.run(None, case.feeds)
    if case.labels is not None:
        orig["deviation"] = deviation(ref_out, ref_out, case.labels)
    runnable: dict[str, Path] = {}
    for col, p in outputs.items():
        r = rec["tools"][col]
        try:
            s = _sess(p, "disable")
            got = s.run(None, case.feeds)
            r["deviation"] = deviation(ref_out, got, case.labels)
            runnable[col] = p
        except Exception as e:  # noqa: BLE001
            r["deviation"] = {"error": _first_error_line(e)}
            r["run_error"] = _first_error_line(e)
    del ref_sess

    # 3. latency ratios vs the original: original, control (the original again), every runnable output
    cands = [("original", case.path), ("control", case.path)] + [(c, p) for c, p in runnable.items() if c != NOVERIFY]
    for level in ("disable", "all"):
        sessions, names = [], []
        for col, p in cands:
            try:
                s = _sess(p, level)
                s.run(None, case.latency_feeds)
                sessions.append(s)
                names.append(col)
            except Exception as e:  # noqa: BLE001
                rec["tools"].setdefault(col, {})[f"latency_{level}_error"] = _first_error_line(e)
        t0 = time.perf_counter()
        stats = interleaved_latency([lambda s=s: s.run(None, case.latency_feeds) for s in sessions],
                                    rounds=args.rounds, warmup=args.warmup, min_sample_s=args.min_sample,
                                    time_budget_s=args.latency_budget,
                                    clock=time.thread_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter)
        base = stats[0]
        for col, st in zip(names, stats):
            tgt = rec["tools"].setdefault(col, {})
            tgt[f"latency_{level}"] = {
                "median_ms": st.median_ms, "p10_ms": st.p10_ms, "p90_ms": st.p90_ms, "calls_per_sample": st.calls_per_sample,
                "ratio_median": st.median_ms / base.median_ms, "ratio_p10": st.p10_ms / base.p10_ms,
            }
        rec.setdefault("latency_rounds", {})[level] = base.rounds
        log(f"  latency {level:8s} {len(sessions)} candidates x {base.rounds} rounds in {time.perf_counter() - t0:.1f} s;"
            f" original {base.median_ms:.3f} ms, control ratio {stats[1].median_ms / base.median_ms:.3f}")
        del sessions
    return rec


def floor_ratios(tools: dict[str, dict[str, Any]]) -> None:
    """Each tool's wall time over the floor's (onnx.load + onnx.save), as ``x_floor``."""
    floor_s = tools.get("floor", {}).get("seconds")
    for t in tools.values():
        if floor_s and t.get("seconds") is not None:
            t["x_floor"] = t["seconds"] / floor_s


# ==================================================================================================
# Results: JSON + markdown (one table per metric, models as rows, tools as columns)
# ==================================================================================================


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    vers = {}
    for pkg in ("graphopt", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxsim", "onnxslim", "onnxoptimizer", "numpy"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        vers["graphopt"] += f" ({commit}{'+dirty' if dirty else ''})"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from graphopt.pass_base import registered_passes
    from graphopt.presets import PRESETS

    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "versions": vers, "cpu": cpu, "cores": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
            "presets": dict(PRESETS), "passes": sorted(registered_passes())}


def _cols(results: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in results:
        for c in r["tools"]:
            if c not in cols:
                cols.append(c)
    return cols


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return ""
    if kind == "int":
        return str(int(v))
    if kind == "mib":
        return f"{v / 2**20:.2f}"
    if kind in ("s", "x"):  # seconds, or a ratio of them
        return f"{v:.2f}" if v < 10 else f"{v:.1f}"
    if kind == "ratio":
        return f"{v:.3f}"
    if kind == "sci":
        return "0" if v == 0 else f"{v:.2e}"
    if kind == "cos":
        return "1" if v == 1 else f"{v:.6f}"
    if kind == "bool":
        return "yes" if v else "**no**"
    if kind == "acc":
        return f"{v:.3f}"
    return str(v)


METRICS: list[tuple[str, str, Callable[[dict], Any], str, set[str]]] = [
    # (title, format, getter, note, columns left out)
    ("Node count", "int", lambda t: t.get("nodes"), "nodes in the graph (subgraphs included)", {"control"}),
    ("File size (MiB)", "mib", lambda t: t.get("bytes"), "", {"control"}),
    ("Optimizer wall time (s)", "s", lambda t: t.get("seconds"), "load -> optimize -> save in the tool's own process, imports excluded; "
     "graphopt includes its verification (not in " + NOVERIFY + "); floor = onnx.load + onnx.save", {"original", "control"}),
    ("Optimizer wall time / floor", "x", lambda t: t.get("x_floor"), "the wall times above over the floor's (the header says how many runs "
     "each is; one run has the noise of a single timing)", {"original", "control", "floor"}),
    ("Optimizer peak RSS (MiB)", "mib", lambda t: t.get("peak_rss"), "whole subprocess, Python and imports included", {"original", "control"}),
    ("Output deviation: max abs", "sci", lambda t: (t.get("deviation") or {}).get("max_abs"), "vs the original at ORT_DISABLE_ALL, worst output", {"original", "control", "floor"}),
    ("Output deviation: relative L2", "sci", lambda t: (t.get("deviation") or {}).get("rel_l2"), "", {"original", "control", "floor"}),
    ("Output deviation: cosine", "cos", lambda t: (t.get("deviation") or {}).get("cosine"), "", {"original", "control", "floor"}),
    ("Output shapes equal", "bool", lambda t: (t.get("deviation") or {}).get("shapes_equal"), "", {"original", "control", "floor"}),
    ("Top-1 accuracy (digits test set, 500 images)", "acc", lambda t: (t.get("deviation") or {}).get("accuracy"), "", {"control", "floor"}),
    ("Latency ratio vs original, ORT_DISABLE_ALL, p10", "ratio", lambda t: (t.get("latency_disable") or {}).get("ratio_p10"),
     "< 1 is faster; the control column is the original measured again (noise). p10 first: on a loaded machine a call is either "
     "undisturbed or preempted, and when about half the calls are preempted the median jumps between the two modes; "
     "the p10 stays with the undisturbed calls", {"floor"}),
    ("Latency ratio vs original, ORT_ENABLE_ALL, p10", "ratio", lambda t: (t.get("latency_all") or {}).get("ratio_p10"), "", {"floor"}),
    ("Latency ratio vs original, ORT_DISABLE_ALL, median", "ratio", lambda t: (t.get("latency_disable") or {}).get("ratio_median"), "", {"floor"}),
    ("Latency ratio vs original, ORT_ENABLE_ALL, median", "ratio", lambda t: (t.get("latency_all") or {}).get("ratio_median"), "", {"floor"}),
    ("Original latency (ms, 1 thread)", "s", None, "absolute figures of the original, for scale", set()),
]


def noise_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for level in ("disable", "all"):
        for stat in ("ratio_median", "ratio_p10"):
            vals = [r["tools"].get("control", {}).get(f"latency_{level}", {}).get(stat) for r in results]
            vals = [v for v in vals if v is not None]
            if vals:
                dev = [abs(v - 1) for v in vals]
                out[f"{level}_{stat}"] = {"min": min(vals), "max": max(vals), "median_abs_dev": float(np.median(dev)), "max_abs_dev": max(dev)}
    return out


def write_results(results: list[dict[str, Any]], env: dict[str, Any], args, out: Path, elapsed: float, done: bool) -> None:
    noise = noise_summary(results)
    data = {"environment": env, "config": {"rounds": args.rounds, "latency_budget_s": args.latency_budget, "warmup": args.warmup,
            "min_sample_s": args.min_sample, "clock": getattr(args, "clock", "wall"), "time_runs": getattr(args, "time_runs", 1),
            "timeout_s": args.timeout, "quick": args.quick, "int8": args.int8, "threads": 1},
            "elapsed_s": elapsed, "complete": done, "noise": noise, "models": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(data))


def markdown(data: dict[str, Any]) -> str:
    env, results, noise = data["environment"], data["models"], data["noise"]
    cols = _cols(results)
    lines = [f"# graphopt vs peers ({'quick' if data['config']['quick'] else 'full'} run)", ""]
    lines.append(f"- date: {env['date']}; run time {data['elapsed_s'] / 60:.1f} min{'' if data['complete'] else ' (INCOMPLETE)'}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f", python {env['python']}")
    lines.append(f"- CPU: {env['cpu']}, {env['cores']} cores, shared with other jobs (load average at start "
                 f"{', '.join(f'{x:.1f}' for x in env['loadavg_start'])}); onnxruntime CPU, 1 thread")
    c = data["config"]
    rounds = sorted({r.get("latency_rounds", {}).get(lv) for r in results for lv in ("disable", "all")} - {None})
    lines.append(f"- latency: interleaved rounds (every candidate once per round, in a fresh seeded order each round): at least {c['rounds']}, "
                 f"more until {c['latency_budget_s']:.0f} s per model and level are spent "
                 f"({'-'.join(str(x) for x in (rounds[:1] + rounds[-1:])) if rounds else '?'} rounds here); a sample is >= "
                 f"{c['min_sample_s'] * 1000:g} ms of calls, timed by {'thread CPU time' if c.get('clock') == 'cpu' else 'wall clock'}; "
                 f"ratio = tool / original; tool timeout {c['timeout_s']:.0f} s")
    runs = c.get("time_runs", 1)
    lines.append(f"- optimizer wall time: {'median of ' + str(runs) + ' interleaved runs' if runs > 1 else 'one run'} per tool "
                 "(`--time-runs`; benchmarks/simplify.py repeats the floor and -O1 timings in rounds of its own)")
    lines.append("- graphopt presets at run time: " + "; ".join(f"{k} = `{v or '(nothing)'}`" for k, v in env["presets"].items()))
    lines.append("- registered passes: " + ", ".join(env["passes"]))
    if noise:
        parts = []
        for key, label in (("disable_ratio_median", "ORT_DISABLE_ALL median"), ("all_ratio_median", "ORT_ENABLE_ALL median"),
                           ("disable_ratio_p10", "ORT_DISABLE_ALL p10"), ("all_ratio_p10", "ORT_ENABLE_ALL p10")):
            if key in noise:
                n = noise[key]
                parts.append(f"{label} {n['min']:.3f}..{n['max']:.3f} (median |1-r| {n['median_abs_dev'] * 100:.1f}%)")
        w10 = max((noise[k]["max_abs_dev"] for k in ("disable_ratio_p10", "all_ratio_p10") if k in noise), default=float("nan"))
        w50 = max((noise[k]["max_abs_dev"] for k in ("disable_ratio_median", "all_ratio_median") if k in noise), default=float("nan"))
        lines.append(f"- **noise** (the control: the original measured twice as two candidates): {'; '.join(parts)}. "
                     f"In this run, p10 ratios within about ±{w10 * 100:.0f}% of 1 and median ratios within about "
                     f"±{w50 * 100:.0f}% of 1 are not distinguishable from noise.")
    la = env.get("loadavg_end") or env["loadavg_start"]
    if max(la[0], env["loadavg_start"][0]) > (env.get("cores") or 1):
        lines.append(f"- the machine was oversubscribed (load average {env['loadavg_start'][0]:.1f} at start, {la[0]:.1f} at the end, "
                     f"{env['cores']} cores): absolute latencies are inflated, read the ratios, p10 first.")
    lines.append("")
    for title, kind, get, note, skip in METRICS:
        if get is None:
            lines += [f"## {title}", "", "| model | ORT_DISABLE_ALL median | p10 | ORT_ENABLE_ALL median | p10 |", "|---|---|---|---|---|"]
            for r in results:
                o = r["tools"]["original"]
                d, a = o.get("latency_disable") or {}, o.get("latency_all") or {}
                lines.append(f"| {r['model']} | {_fmt(d.get('median_ms'), 's')} | {_fmt(d.get('p10_ms'), 's')} | "
                             f"{_fmt(a.get('median_ms'), 's')} | {_fmt(a.get('p10_ms'), 's')} |")
            lines.append("")
            continue
        if kind == "acc" and not any(r["kind"] == "digits" for r in results):
            continue
        use = [c for c in cols if c not in skip]
        lines += [f"## {title}", ""] + ([f"{note}", ""] if note else [])
        lines.append("| model | " + " | ".join(use) + " |")
        lines.append("|---" * (len(use) + 1) + "|")
        for r in results:
            if kind == "acc" and r["kind"] != "digits":
                continue
            cells = []
            for cname in use:
                t = r["tools"].get(cname)
                if t is None:
                    cells.append("")
                elif "na" in t:
                    cells.append("n/a")
                elif "error" in t:
                    cells.append("n/a" if t.get("unavailable") else "fail")
                else:
                    cells.append(_fmt(get(t), kind))
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
        lines.append("")
    fails = [(r["model"], c, t["error"]) for r in results for c, t in r["tools"].items() if "error" in t]
    runerr = [(r["model"], c, t["run_error"]) for r in results for c, t in r["tools"].items() if "run_error" in t]
    if fails or runerr:
        lines += ["## Failures (first error line)", ""]
        for m, c, e in fails:
            lines.append(f"- {m} / {c}: {e}")
        for m, c, e in runerr:
            lines.append(f"- {m} / {c}: the output model does not run: {e}")
        lines.append("")
    fused = [(r["model"], t["fused"]) for r in results for c, t in r["tools"].items() if c == "ort-transformers" and t.get("fused")]
    if fused:
        lines += ["## ort-transformers fusions", ""]
        lines += [f"- {m}: " + ", ".join(f"{k} {v}" for k, v in f.items()) for m, f in fused]
        lines.append("")
    na = sorted({(r["model"], c) for r in results for c, t in r["tools"].items() if "na" in t})
    if na:
        lines.append("n/a: ort-transformers (onnxruntime.transformers.optimizer.optimize_model, opt_level=0: its fusions "
                     "without the onnxruntime pre-pass, which needs torch) only runs on the transformer models (bert, gpt2).")
        lines.append("")
    return "\n".join(lines)


# ==================================================================================================


def default_models(quick: bool) -> list[Path]:
    paths = sorted((SHARED / "corpus").glob("*.onnx")) + sorted((SHARED / "digits").glob("*.onnx"))
    # leave out side files other programs may be writing there right now (onnxruntime's "-inferred.onnx")
    paths = [p for p in paths if p.is_file() and not p.stem.endswith(("-inferred", ".opt", "-opt")) and "tmp" not in p.stem]
    if quick:
        paths = [p for p in paths if p.stat().st_size < QUICK_MAX_BYTES]
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, help="ONNX files (default: ../shared/corpus and ../shared/digits)")
    ap.add_argument("--quick", action="store_true", help="small models only, fewer rounds")
    ap.add_argument("--int8", action="store_true", help="also int8: graphopt quantize-int8, ORT quantize_dynamic / quantize_static (QDQ)")
    ap.add_argument("--pipeline", action="append", metavar="NAME=TEXT", help="an extra graphopt pipeline to compare (repeatable)")
    ap.add_argument("--rounds", type=int, default=None, help="minimum interleaved latency rounds per level (default 15, quick 7)")
    ap.add_argument("--latency-budget", type=float, default=None,
                    help="seconds of latency measurement per model and level; rounds go on until it is spent (default 20, quick 8)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time samples by the calling thread's CPU time (onnxruntime runs every kernel there with 1 "
                         "thread), so time preempted by other processes on a shared machine drops out")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-sample", type=float, default=None, help="seconds per latency sample (default 0.002)")
    ap.add_argument("--time-runs", type=int, default=1, metavar="N",
                    help="run every tool N times, interleaved, and report the median wall time (default 1)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per tool run (default 600, quick 180)")
    ap.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/results/latest, quick: results/quick)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the optimized models in this folder")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 7 if args.quick else 15
    if args.latency_budget is None:
        args.latency_budget = 8.0 if args.quick else 20.0
    if args.min_sample is None:
        args.min_sample = 0.002
    if args.timeout is None:
        args.timeout = 180.0 if args.quick else 600.0
    out = args.out or (HERE / "results" / ("quick" if args.quick else "latest"))
    models = args.models or default_models(args.quick)
    if not models:
        print(f"compare.py: no models (looked in {SHARED}); give --models", file=sys.stderr)
        return 2
    for p in models:
        if not p.is_file():
            print(f"compare.py: {p}: no such file", file=sys.stderr)
            return 2
    for spec in args.pipeline or []:
        if "=" not in spec:
            print(f"compare.py: --pipeline {spec!r}: expected NAME=TEXT", file=sys.stderr)
            return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    env = environment()
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="graphopt-compare-")) if args.keep is None else args.keep
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    try:
        for i, p in enumerate(models, 1):
            t0 = time.perf_counter()
            log(f"[{i}/{len(models)}] {p.stem}")
            case = load_case(p)
            try:
                results.append(measure_model(case, args, workdir, log))
            except Exception as e:  # noqa: BLE001 - one model's trouble must not stop the run
                results.append({"model": case.name, "path": str(p), "kind": case.kind, "tools": {"original": {"error": _first_error_line(e)}}})
                log(f"  failed: {_first_error_line(e)}")
            log(f"  done in {time.perf_counter() - t0:.0f} s (total {(time.perf_counter() - t_start) / 60:.1f} min)")
            env["loadavg_end"] = list(os.getloadavg())
            write_results(results, env, args, out, time.perf_counter() - t_start, done=False)
        write_results(results, env, args, out, time.perf_counter() - t_start, done=True)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')} in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main())
