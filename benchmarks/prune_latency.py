"""Latency ratio of a pruned model against its original, measured the noise-aware way.

onnxruntime at ORT_ENABLE_ALL, 1 thread, interleaved rounds (A, A', B, A, A', B, ...) in one process,
medians per model; A' is an identical copy of A (a control pair whose ratio shows the noise).

    python benchmarks/prune_latency.py original.onnx pruned.onnx [--rounds 15] [--runs 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def session(path: str):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feeds_for(sess, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("original")
    ap.add_argument("pruned")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=10, help="inferences per round (the round's mean is one sample)")
    a = ap.parse_args()
    sessions = {"original": session(a.original), "control": session(a.original), "pruned": session(a.pruned)}
    feeds = feeds_for(sessions["original"])
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(a.rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(a.runs):
                s.run(None, feeds)
            times[name].append((time.perf_counter() - t0) / a.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:9s} median {v * 1e3:8.2f} ms  (min {min(times[k]) * 1e3:.2f}, max {max(times[k]) * 1e3:.2f})")
    print(f"control/original ratio (noise): {med['control'] / med['original']:.3f}")
    print(f"pruned/original latency ratio: {med['pruned'] / med['original']:.3f}")
    print(f"pruned/control  latency ratio: {med['pruned'] / med['control']:.3f}")


if __name__ == "__main__":
    main()
