"""Focused latency ratios for a few candidates of one model, one run, interleaved rounds, 1 thread.

    python benchmarks/transformer_latency.py ORIGINAL.onnx --level disable --rounds 30 \\
        O2=bert_O2.onnx onnxslim=bert_slim.onnx ort-extended=bert_ortext.onnx

Candidates are ``label=path``.  The original runs twice (``original`` and ``control``, two sessions of
the same file); every runner is timed with ``graphopt.bench.interleaved_latency`` (shuffled order per
round).  Per round, each candidate's sample is divided by the original's sample of the same round; the
table gives the median and p10 of those per-round ratios, and the median / p10 of the per-call times.
The control's ratio is the noise of the run.  Feeds are the model's sample (.npz beside it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _session(path: str, level: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def measure(original: str, candidates: dict[str, str], level: str, rounds: int, min_sample_s: float = 0.05,
            clock: str = "wall") -> dict:
    from graphopt.bench import interleaved_latency, percentile

    labels = ["original", "control"] + list(candidates)
    paths = [original, original] + list(candidates.values())
    sessions = [_session(p, level) for p in paths]
    d = np.load(Path(original).with_suffix(".npz"))
    feeds = {i.name: d[i.name] for i in sessions[0].get_inputs()}
    runners = [lambda s=s: s.run(None, feeds) for s in sessions]
    import time

    stats = interleaved_latency(runners, rounds=rounds, warmup=3, min_sample_s=min_sample_s,
                                clock=time.perf_counter if clock == "wall" else time.thread_time)
    ref = stats[0].samples_ms
    out = {}
    for lab, st in zip(labels, stats):
        ratios = [a / b for a, b in zip(st.samples_ms, ref)]
        out[lab] = {"median_ms": st.median_ms, "p10_ms": st.p10_ms, "ratio_median": percentile(ratios, 50),
                    "ratio_p10": percentile(ratios, 10), "ratio_p90": percentile(ratios, 90),
                    "ratio_of_medians": st.median_ms / stats[0].median_ms, "ratio_of_p10": st.p10_ms / stats[0].p10_ms,
                    "rounds": st.rounds, "calls_per_sample": st.calls_per_sample}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("candidates", nargs="+", help="label=path")
    ap.add_argument("--level", choices=["disable", "extended", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: CPU time of the calling thread (onnxruntime runs every kernel there with 1 thread): "
                         "time preempted by other processes drops out")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    cands = dict(c.split("=", 1) for c in a.candidates)
    r = measure(a.original, cands, a.level, a.rounds, clock=a.clock)
    print(f"{Path(a.original).name}: ORT level {a.level}, 1 thread, {a.rounds} interleaved rounds (shuffled), {a.clock} clock")
    print(f"  {'candidate':<16} {'median ms':>9} {'p10 ms':>8} {'ratio med':>9} {'ratio p10':>9} {'ratio p90':>9} {'med/med':>8} {'p10/p10':>8}")
    for lab, v in r.items():
        print(f"  {lab:<16} {v['median_ms']:9.3f} {v['p10_ms']:8.3f} {v['ratio_median']:9.3f} {v['ratio_p10']:9.3f} "
              f"{v['ratio_p90']:9.3f} {v['ratio_of_medians']:8.3f} {v['ratio_of_p10']:8.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
