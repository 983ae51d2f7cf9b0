"""Where does the time go?  onnxruntime's own per-node profile of two models, summed per op type.

    python benchmarks/ort_op_profile.py A.onnx B.onnx FEEDS.npz [--runs 20]

Both models run at ORT_ENABLE_ALL, 1 thread, on the first sample of FEEDS.npz (keys = input names);
the profile's node kernel times are averaged over ``--runs`` runs after a warm-up.  Used to show that
resnet18's int8 model spends ~97% of its time in QLinearConv, so its ratio to fp32 is the conv
kernels' ratio (see int8_kernels.py), not Q/DQ or layout overhead.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort


def profile(path: str, feeds: dict, runs: int) -> tuple[dict, dict]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "prof")
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(3):  # warm-up, in the same profile: dropped below by keeping only the last `runs` runs
        s.run(None, feeds)
    for _ in range(runs):
        s.run(None, feeds)
    with open(s.end_profiling()) as f:
        events = json.load(f)
    per_node = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["args"]["op_name"], e["name"][:-len("_kernel_time")])].append(e["dur"])
    by_op, by_node = collections.defaultdict(float), {}
    for (op, name), durs in per_node.items():
        us = float(np.mean(durs[-runs:]))
        by_op[op] += us
        by_node[name] = us
    return dict(by_op), by_node


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs=2)
    ap.add_argument("feeds")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    z = np.load(args.feeds)
    feeds = {k: z[k][:1] for k in z.files}
    for path in args.models:
        by_op, by_node = profile(path, feeds, args.runs)
        total = sum(by_op.values())
        print(f"{path}: {total:.0f} us/run in kernels")
        for op, us in sorted(by_op.items(), key=lambda x: -x[1]):
            print(f"  {op:28s} {us:9.0f} us  {us / total:6.1%}")
        print("  slowest nodes: " + ", ".join(f"{k[-36:]}={v:.0f}" for k, v in sorted(by_node.items(), key=lambda x: -x[1])[:5]))


if __name__ == "__main__":
    main()
