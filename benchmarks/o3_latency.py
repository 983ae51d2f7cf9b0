"""-O3 latency under ORT_ENABLE_ALL (how users run): optimized / original, interleaved rounds, 1 thread.

Each round runs every session once in turn (original, control, candidates...) for ``--iters`` calls and
records the median call time; the ratio per round is candidate / original, and the table shows the median
over rounds.  ``control`` is a second session of the unmodified original: its ratio is the noise floor.

    python benchmarks/o3_latency.py /work/shared/corpus/bert_mini.onnx opt.onnx [more.onnx] --rounds 15
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def _session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feeds(sess, sample: Path | None):
    if sample is not None and sample.exists():
        d = np.load(sample)
        return {i.name: d[i.name] for i in sess.get_inputs()}
    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        out[i.name] = (rng.integers(0, 2, shape) if "int" in i.type else rng.standard_normal(shape)).astype(
            np.int64 if "int64" in i.type else np.float32)
    return out


CLOCK = time.perf_counter
STAT = statistics.median


def _median_call(sess, feeds, iters: int, clock=None, stat=None) -> float:
    """The per-round figure of one session: median (default) or minimum of ``iters`` calls."""
    clock, stat = clock or CLOCK, stat or STAT
    ts = []
    for _ in range(iters):
        t0 = clock()
        sess.run(None, feeds)
        ts.append(clock() - t0)
    return stat(ts)


def measure(original: str, candidates: list[str], rounds: int = 15, iters: int = 20, warmup: int = 5,
            clock: str | None = None, stat: str | None = None) -> dict:
    """Ratios candidate / original per round (and control / original), medians over rounds."""
    ck = None if clock is None else (time.perf_counter if clock == "wall" else time.thread_time)
    st = None if stat is None else (statistics.median if stat == "median" else min)
    paths = [original, original] + candidates  # [reference, control, ...]
    sessions = [_session(p) for p in paths]
    feeds = _feeds(sessions[0], Path(original).with_suffix(".npz"))
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    per = [[] for _ in paths]
    for r in range(rounds):
        order = list(range(len(sessions)))
        order = order[r % len(order):] + order[:r % len(order)]  # rotate: no session always runs first
        for i in order:
            per[i].append(_median_call(sessions[i], feeds, iters, ck, st))
    ratios = [[c / r for c, r in zip(per[i], per[0])] for i in range(len(paths))]
    return {
        "original_ms": statistics.median(per[0]) * 1e3,
        "control": statistics.median(ratios[1]),
        "control_spread": (min(ratios[1]), max(ratios[1])),
        "candidates": {c: (statistics.median(ratios[i + 2]), min(ratios[i + 2]), max(ratios[i + 2]), statistics.median(per[i + 2]) * 1e3)
                       for i, c in enumerate(candidates)},
    }


def kernel_sums(paths: list[str], calls: int = 200) -> list[float]:
    """Sum over nodes of each node's fastest kernel time (onnxruntime profiler), sessions run interleaved.

    Per-node minima drop most of the interference a shared machine adds; the sum leaves out the
    executor's per-node overhead (which favours graphs with fewer nodes), so it is a conservative figure.
    """
    import json
    import os
    import tempfile

    import onnxruntime as ort

    out = []
    with tempfile.TemporaryDirectory() as d:
        sessions = []
        for i, p in enumerate(paths):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(d, f"s{i}")
            sessions.append(ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]))
        feeds = _feeds(sessions[0], Path(paths[0]).with_suffix(".npz"))
        for _ in range(calls):
            for s in sessions:
                s.run(None, feeds)
        for s in sessions:
            best: dict[str, float] = {}
            for e in json.load(open(s.end_profiling())):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    best[e["name"]] = min(best.get(e["name"], float("inf")), e["dur"])
            out.append(sum(best.values()) / 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("candidates", nargs="+")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: thread CPU time of the calling thread (1 intra-op thread runs "
                         "kernels on it), far less sensitive to other processes on a shared machine")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="per-round figure of each session over its --iters calls (min resists interference best)")
    a = ap.parse_args()
    global CLOCK, STAT
    STAT = statistics.median if a.stat == "median" else min
    CLOCK = time.perf_counter if a.clock == "wall" else time.thread_time
    r = measure(a.original, a.candidates, a.rounds, a.iters)
    print(f"{Path(a.original).name}: original {r['original_ms']:.3f} ms/call (median), ORT_ENABLE_ALL, 1 thread, "
          f"{a.rounds} interleaved rounds x {a.iters} calls, {a.clock} clock, per-round {a.stat}")
    lo, hi = r["control_spread"]
    print(f"  control (identical model)  {r['control']:.3f}x  [round min {lo:.3f}, max {hi:.3f}]")
    for c, (med, lo, hi, ms) in r["candidates"].items():
        print(f"  {Path(c).name:<26} {med:.3f}x  [round min {lo:.3f}, max {hi:.3f}]  {ms:.3f} ms")


if __name__ == "__main__":
    main()
