"""How fast could a transformer get without faster GEMMs?  A graph made of only the model's GEMMs, timed
against the original and the candidates (ORT_ENABLE_ALL, 1 thread, thread CPU time, interleaved rounds).

    python benchmarks/gemm_floor.py ../shared/corpus/bert_mini.onnx --seq 128 O3=bert_mini.O3.onnx
    python benchmarks/gemm_floor.py ../shared/corpus/gpt2_mini.onnx --seq 64 O3=gpt2_mini.O3.onnx

The floor graph has, per layer, the four projections (QKV packed [H, 3H], attention output [H, H], FFN
[H, F] and [F, H]) as MatMuls with constant weights (onnxruntime pre-packs them, as in the real model) and
the two attention GEMMs per layer (Q K^T and P V, batched over heads), each reading a graph input and
writing a graph output: exactly the model's GEMM FLOPs, nothing else (no bias, softmax, normalization,
GELU, embedding, layout).  Its ratio to the original is the latency an exact graph rewrite cannot go
below with onnxruntime's GEMM kernels.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def floor_model(seq: int, layers: int, hidden: int, ffn: int, heads: int):
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    hs = hidden // heads
    nodes, inits, outs = [], [], []
    for layer in range(layers):
        for nm, (k, n, src) in {"qkv": (hidden, 3 * hidden, "x"), "o": (hidden, hidden, "x"), "fc": (hidden, ffn, "x"),
                                "proj": (ffn, hidden, "x4")}.items():
            w = f"{nm}{layer}"
            inits.append(nh.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), w))
            nodes.append(h.make_node("MatMul", [src, w], [f"{w}_y"]))
            outs.append(f"{w}_y")
        nodes += [h.make_node("MatMul", ["q", "kt"], [f"s{layer}"]), h.make_node("MatMul", ["p", "v"], [f"pv{layer}"])]
        outs += [f"s{layer}", f"pv{layer}"]
    ins = [h.make_tensor_value_info("x", T.FLOAT, [1, seq, hidden]), h.make_tensor_value_info("x4", T.FLOAT, [1, seq, ffn]),
           h.make_tensor_value_info("q", T.FLOAT, [1, heads, seq, hs]), h.make_tensor_value_info("kt", T.FLOAT, [1, heads, hs, seq]),
           h.make_tensor_value_info("p", T.FLOAT, [1, heads, seq, seq]), h.make_tensor_value_info("v", T.FLOAT, [1, heads, seq, hs])]
    g = h.make_graph(nodes, "gemm_floor", ins, [h.make_tensor_value_info(o, T.FLOAT, None) for o in outs], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("candidates", nargs="*", help="label=path")
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_intermixed_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    paths = {"original": a.original, "control": a.original, **dict(c.split("=", 1) for c in a.candidates)}
    sess = {k: ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    fm = floor_model(a.seq, a.layers, a.hidden, a.ffn, a.heads)
    sess["gemm_floor"] = ort.InferenceSession(fm.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    d = np.load(Path(a.original).with_suffix(".npz"))
    feeds = {k: {i.name: d[i.name] for i in s.get_inputs()} for k, s in sess.items() if k != "gemm_floor"}
    feeds["gemm_floor"] = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in sess["gemm_floor"].get_inputs()}
    per = {k: [] for k in sess}
    order = list(sess)
    for r in range(a.rounds):
        rng.shuffle(order)
        for k in order:
            ts = []
            for _ in range(a.iters):
                t0 = time.thread_time()
                sess[k].run(None, feeds[k])
                ts.append(time.thread_time() - t0)
            per[k].append(min(ts))
    print(f"{Path(a.original).name}: ORT_ENABLE_ALL, 1 thread, {a.rounds} interleaved rounds x {a.iters} calls, thread CPU time, "
          f"per-round min; ratio = median over rounds of (candidate / original in that round)")
    for k, v in per.items():
        ratios = [x / y for x, y in zip(v, per["original"])]
        print(f"  {k:<12} {statistics.median(v) * 1e3:8.3f} ms  ratio {statistics.median(ratios):.3f}  "
              f"[p10 {np.percentile(ratios, 10):.3f}, p90 {np.percentile(ratios, 90):.3f}]")


if __name__ == "__main__":
    main()
