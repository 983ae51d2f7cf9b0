"""Wall-time cost of ``--verify each`` over ``--verify end`` (issue 8), interleaved rounds in one run.

    python benchmarks/trust_verify_each.py MODEL [--rounds 5] [--passes O2] [--extra-changes N]

Each round runs, in order: end, each, end (a control: the same command as the first, so the spread
between the two "end" runs is the noise of this machine).  ``--extra-changes N`` appends N runs of a
stand-in exact pass that rewrites every Conv/Gemm/MatMul weight (so every run reports a change and is
verified): that is the per-changed-pass cost a fusion-heavy -O2 would pay.  Reports medians.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STANDIN = '''
from dataclasses import dataclass
import numpy as np
import onnx_graphsurgeon as gs
from graphopt import Pass, PassResult, register_pass

@register_pass
class BenchRewriteWeights(Pass):
    name = "bench-rewrite-weights"
    description = "benchmark stand-in: replace every Conv/Gemm/MatMul weight by an equal fresh constant"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph, ctx):
        n = 0
        for node in list(graph.nodes):
            if node.op in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                if not ctx.allow_rewrite(f"rewrite weight of {node.name}"):
                    break
                w = node.inputs[1]
                node.inputs[1] = gs.Constant(w.name.split("~")[0] + f"~{id(node) % 997}{n}", np.array(w.values))
                n += 1
        return PassResult(n > 0, {"rewritten": n})
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--passes", default="O2")
    ap.add_argument("--extra-changes", type=int, default=0)
    a = ap.parse_args()
    exe = str(Path(sys.executable).with_name("graphopt"))
    with tempfile.TemporaryDirectory() as d:
        plugin = Path(d) / "standin.py"
        plugin.write_text(STANDIN)
        passes = a.passes + ",bench-rewrite-weights" * a.extra_changes
        base = [exe, "optimize", a.model, "-o", str(Path(d) / "out.onnx"), "--passes", passes, "-q",
                "--load-plugin", str(plugin)]
        times: dict[str, list[float]] = {"end": [], "each": [], "end (control)": []}
        for _ in range(a.rounds):
            for label, mode in (("end", "end"), ("each", "each"), ("end (control)", "end")):
                t0 = time.perf_counter()
                subprocess.run(base + ["--verify", mode], check=True)
                times[label].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"model {a.model}, pipeline '{passes}', {a.rounds} interleaved rounds (wall time of the whole command)")
        for k, v in times.items():
            print(f"  {k:14s} median {med[k]:6.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
        print(f"  each / end          = {med['each'] / med['end']:.2f}x")
        print(f"  control / end (noise) = {med['end (control)'] / med['end']:.2f}x")


if __name__ == "__main__":
    main()
