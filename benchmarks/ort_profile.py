"""Where onnxruntime spends the time: per op type, the sum over nodes of each node's fastest kernel time.

    python benchmarks/ort_profile.py --level all ../shared/corpus/bert_mini.onnx bert_mini.O3.onnx [--calls 150] [--nodes 20]

SessionOptions.enable_profiling, 1 thread, the sessions run interleaved on the model's sample (.npz beside
the first model).  Per-node minima drop most of the interference of a shared machine; the profiler adds a
few microseconds to every node, so small nodes (Reshape) look more expensive than they are.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--level", choices=["disable", "extended", "all"], default="all")
    ap.add_argument("--calls", type=int, default=150)
    ap.add_argument("--nodes", type=int, default=0, help="also list the N slowest nodes")
    a = ap.parse_args()
    level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
             "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[a.level]
    d = np.load(Path(a.models[0]).with_suffix(".npz"))
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, p in enumerate(a.models):
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            so.log_severity_level = 3
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, f"s{i}")
            sessions.append(ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]))
        feeds = {i.name: d[i.name] for i in sessions[0].get_inputs()}
        for _ in range(a.calls):
            for s in sessions:
                s.run(None, feeds)
        for p, s in zip(a.models, sessions):
            best: dict[str, float] = {}
            op: dict[str, str] = {}
            for e in json.load(open(s.end_profiling())):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    best[e["name"]] = min(best.get(e["name"], float("inf")), e["dur"])
                    op[e["name"]] = e["args"]["op_name"]
            by_op: dict[str, float] = collections.defaultdict(float)
            count: collections.Counter = collections.Counter()
            for n, us in best.items():
                by_op[op[n]] += us
                count[op[n]] += 1
            print(f"== {Path(p).name} ({a.level}): {sum(best.values()) / 1e3:.3f} ms over {len(best)} nodes")
            for k, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
                print(f"   {k:<28} {count[k]:4d} {us / 1e3:8.3f} ms")
            for n, us in sorted(best.items(), key=lambda kv: -kv[1])[:a.nodes]:
                print(f"      {us:8.1f} us  {op[n]:<22} {n[:-len('_kernel_time')]}")


if __name__ == "__main__":
    main()
