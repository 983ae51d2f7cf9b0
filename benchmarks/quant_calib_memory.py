"""Peak RSS of int8 calibration (activation statistics of every quantized tensor), by sample count.

    python benchmarks/quant_calib_memory.py MODEL.onnx calib16.npz calib256.npz

Each run is a fresh process that loads the model, folds BN, and streams the calibration file through
``graphopt.calibrate.collect_stats`` (minmax + per-channel means, as quantize-int8 does); it prints
the process's peak RSS before and after calibration.
"""
from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import graphopt
from graphopt import ir
from graphopt.data import calibration_source
from graphopt.pass_base import PassContext, get_pass
from graphopt.calibrate import collect_stats
from graphopt.passes.quant.qdq import fold_conv_bn, derive_layout
model = ir.load(sys.argv[1])
graph = ir.import_model(model)
ctx = PassContext(opset=17, calibration=calibration_source(sys.argv[2], model))
ctx.model_template = model
fold_conv_bn(graph, ctx, [])
static = {n.name for n in graph.nodes if n.op in ("Conv", "Gemm")}
lay = derive_layout(graph, static)
axes = {n.inputs[0].name: 1 for n in graph.nodes if n.name in static}
names = sorted(set(lay.qt.values()) | set(axes))
fm = ctx.to_model(graph)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
st = collect_stats(ctx, fm, names, channel_axes=axes)
dt = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"batches": max(s.count for s in st.values()), "tensors": len(names), "peak_rss_before_mb": before / 1024,
                  "peak_rss_mb": after / 1024, "seconds": dt}))
"""


def main():
    model, *calibs = sys.argv[1:]
    rows = []
    for c in calibs:
        out = subprocess.run([sys.executable, "-c", CHILD, model, c], capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["calibration"] = c
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) >= 2:
        print(f"peak RSS ratio {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x "
              f"({rows[-1]['batches']} vs {rows[0]['batches']} batches)")


if __name__ == "__main__":
    main()
