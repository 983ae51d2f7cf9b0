"""int8 quantization, graphopt vs onnxruntime.quantization, on the shared corpus (ratios in one run).

    python benchmarks/quant_int8.py --calib-dir DIR --models resnet18,bert_mini [--samples 16]

For each model: graphopt ``-O2 + quantize-int8`` with the calibration file DIR/calib_<model>_<N>.npz,
onnxruntime's ``quantize_static`` (QDQ, per-channel, the same calibration inputs) and, for models
with MatMul, ``quantize_dynamic``.  Latency: ORT_ENABLE_ALL, 1 thread, interleaved rounds; the fp32
model is run twice (an identical control pair: its ratio is the noise floor).  Error: relative L2
of the outputs vs fp32 (ORT_DISABLE_ALL) on held-out inputs DIR/calib_<model>_8_s2.npz.  Missing
calibration files are generated (seed 1 for calibration, seed 2 for the held-out inputs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx

import graphopt
from graphopt import latency
from graphopt.verify import make_session


def rel_l2(model_path, ref_path, feeds_list, level="all"):
    """Worst relative L2 error over the held-out inputs, the int8 model run at ``level`` ("all": the
    fused kernels a user gets; "disable": what the QDQ graph means, as the verifier runs it)."""
    ref = make_session(ref_path, "disable")
    got = make_session(model_path, level)
    worst = 0.0
    for f in feeds_list:
        r = ref.run(None, f)
        g = got.run(None, f)
        for a, b in zip(r, g):
            worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)))
    return worst


def ensure_calib(path, model_path, count, seed):
    """Write ``count`` generated samples (graphopt.data.generate_feeds: N(0,1) images, random token ids)
    stacked on the first axis, unless the file exists."""
    if os.path.exists(path):
        return
    from graphopt.data import generate_feeds

    feeds = generate_feeds(onnx.load(model_path, load_external_data=False), seed=seed, count=count)
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})


def split(npz):
    z = np.load(npz)
    n = len(z[z.files[0]])
    return [{k: z[k][i:i + 1] for k in z.files} for i in range(n)]


class Reader:
    def __init__(self, feeds):
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=os.path.join(os.environ.get("GRAPHOPT_SHARED") or os.path.join(os.path.dirname(__file__), "..", "..", "shared"), "corpus"))
    ap.add_argument("--calib-dir", required=True)
    ap.add_argument("--models", default="squeezenet1_1,mobilenet_v3_small,mobilenet_v2,resnet18,efficientnet_b0,bert_mini,gpt2_mini,digits_cnn,digits_mlp")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0, help="latency budget per model")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-latency", action="store_true", help="errors and sizes only (no timing)")
    ap.add_argument("--ort-pre", action="store_true", help="also quant_pre_process + quantize_static defaults (as compare.py)")
    ap.add_argument("--pipeline", default="O2,quantize-int8", help="graphopt pipeline (several: separate with '|')")
    args = ap.parse_args()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    rows = []
    tmp = tempfile.mkdtemp(prefix="quant_bench_")
    digits_dir = os.path.join(os.path.dirname(os.path.abspath(args.corpus)), "digits")
    for name in args.models.split(","):
        sample = []
        if name.startswith("digits_"):  # calibrate on x_calib; held-out: x_test in batches of 32 (compare.py's latency batch)
            src = os.path.join(digits_dir, f"{name}.onnx")
            d = np.load(os.path.join(digits_dir, "digits_data.npz"))
            calib = os.path.join(args.calib_dir, f"calib_{name}_xcalib.npz")
            np.savez(calib, input=d["x_calib"])
            held = [{"input": d["x_test"][i:i + 32]} for i in range(0, 256, 32)]
        else:
            src = os.path.join(args.corpus, f"{name}.onnx")
            calib = os.path.join(args.calib_dir, f"calib_{name}_{args.samples}.npz")
            ensure_calib(calib, src, args.samples, 1)
            ensure_calib(os.path.join(args.calib_dir, f"calib_{name}_8_s2.npz"), src, 8, 2)
            held = split(os.path.join(args.calib_dir, f"calib_{name}_8_s2.npz"))
        if os.path.exists(os.path.join(args.corpus, f"{name}.npz")):
            z = np.load(os.path.join(args.corpus, f"{name}.npz"))
            sample = [{i.name: z[i.name] for i in onnx.load(src, load_external_data=False).graph.input if i.name in z.files}]
        models = {"fp32": src, "fp32_control": src}
        info = {}
        for i, pipe in enumerate(args.pipeline.split("|")):
            key = "graphopt" if i == 0 else f"graphopt{i + 1}"
            ours = os.path.join(tmp, f"{name}.{key}.onnx")
            t0 = time.perf_counter()
            res = graphopt.optimize(src, pipe, output=ours, calibration=calib)
            q = [p for p in res.report.passes if p.name.startswith("quantize-int8")][0]
            info[key] = {"pipeline": pipe, "seconds": round(time.perf_counter() - t0, 1), "stats": q.stats,
                         "verification": res.verification.summary() if res.verification else None}
            models[key] = ours
        if not args.no_ort:
            ort_s = os.path.join(tmp, f"{name}.ort_static.onnx")
            try:
                quantize_static(src, ort_s, Reader(split(calib)), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                models["ort_static"] = ort_s
            except Exception as e:
                print(f"{name}: quantize_static failed: {e}", file=sys.stderr)
            if args.ort_pre:  # as compare.py runs it: quant_pre_process, then quantize_static's defaults (per-tensor)
                from onnxruntime.quantization.shape_inference import quant_pre_process

                pre, ort_p = os.path.join(tmp, f"{name}.pre.onnx"), os.path.join(tmp, f"{name}.ort_static_pre.onnx")
                try:
                    quant_pre_process(src, pre)
                    quantize_static(pre, ort_p, Reader(split(calib)), quant_format=QuantFormat.QDQ)
                    models["ort_static_pre"] = ort_p
                except Exception as e:
                    print(f"{name}: quant_pre_process + quantize_static failed: {e}", file=sys.stderr)
            if name in ("bert_mini", "gpt2_mini"):
                ort_d = os.path.join(tmp, f"{name}.ort_dynamic.onnx")
                quantize_dynamic(src, ort_d, weight_type=QuantType.QInt8, per_channel=True)
                models["ort_dynamic"] = ort_d
        feeds = held[0]
        if args.no_latency:
            med = [1.0] * len(models)
        else:
            protos = [onnx.load(p) for p in models.values()]
            med = latency.compare(protos, feeds, budget_seconds=args.seconds, min_rounds=10, max_rounds=20000)
        base = med[0]
        row = {"model": name, "fp32_ms": None if args.no_latency else base * 1e3, "graphopt": info}
        for (k, p), m in zip(models.items(), med):
            if not args.no_latency:
                row[f"latency_{k}"] = m / base
            if k != "fp32_control":
                row[f"size_{k}"] = os.path.getsize(p) / os.path.getsize(src)
            if k not in ("fp32", "fp32_control"):
                row[f"rel_l2_{k}"] = rel_l2(p, src, held)
                row[f"rel_l2_disable_{k}"] = rel_l2(p, src, held, "disable")
                if sample:  # the corpus sample input at DISABLE_ALL: what compare.py's deviation row shows
                    row[f"rel_l2_sample_{k}"] = rel_l2(p, src, sample, "disable")
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
