"""Hardware evidence: how fast are onnxruntime's int8 kernels on THIS machine, one op at a time?

    python benchmarks/int8_kernels.py [--seconds 4] [--out results.json]

The int8 issue quotes, for an AVX-512 VNNI / AMX CPU, a single 3x3 Conv in int8 QDQ form at
0.31-0.38x of fp32 and int8 MatMul at 0.15-0.41x.  This script measures the same single ops here, so
the latency targets (resnet18 <= 0.5x, transformers <= 0.4x) can be judged against what the kernels
can give at all:

- Conv 3x3, C -> C channels, pads 1: (64, 56x56), (128, 28x28), (256, 14x14), (512, 7x7), batch 1;
  and resnet18's 7x7/2 stem (3 -> 64 channels, 224x224) and a 1x1/2 downsample (64 -> 128, 56x56).
  ``qdq``: float in/out, ``Q -> DQ -> Conv(DQ w int8 per-channel, DQ b int32) -> Q -> DQ`` (onnxruntime
  fuses it into QuantizeLinear -> QLinearConv -> DequantizeLinear); ``kernel``: uint8 in/out, one
  QLinearConv (the int8 kernel alone, no boundary conversions).
- MatMul [M, K] x [K, N] with the bert_mini (M=128) and gpt2_mini (M=64) weight shapes.  ``dynamic``:
  ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul`` (fused into DynamicQuantizeMatMul);
  ``static``: ``Q -> DQ -> MatMul(DQ w) `` float output (fused into MatMulIntegerToFloat);
  ``kernel``: uint8 in/out QLinearMatMul.

Every ratio is int8 median / fp32 median, measured in interleaved rounds (ORT_ENABLE_ALL, 1 thread)
with an identical fp32 copy as the control pair: ``control`` is the noise of that run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt import latency

F, U8, I8, I32 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32


def _model(nodes, inputs, outputs, inits, ms=False):
    g = helper.make_graph(nodes, "k", inputs, outputs, inits)
    ops = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    return helper.make_model(g, opset_imports=ops)


def _t(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def conv_models(c: int, hw: int, rng, cin: int | None = None, k: int = 3, stride: int = 1):
    cin = cin or c
    w = (rng.standard_normal((c, cin, k, k)) * np.sqrt(2.0 / (k * k * cin))).astype(np.float32)
    b = (rng.standard_normal(c) * 0.1).astype(np.float32)
    p = k // 2
    attrs = {"pads": [p, p, p, p], "kernel_shape": [k, k], "strides": [stride, stride]}
    ohw = (hw + 2 * p - k) // stride + 1
    x_vi = helper.make_tensor_value_info("x", F, [1, cin, hw, hw])
    y_vi = helper.make_tensor_value_info("y", F, [1, c, ohw, ohw])
    fp32 = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], [x_vi], [y_vi], [_t("w", w), _t("b", b)])
    ws = (np.abs(w).reshape(c, -1).max(1) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / ws[:, None, None, None]), -127, 127).astype(np.int8)
    xs, ys = np.float32(8 / 255), np.float32(8 / 255)
    bq = np.rint(b / (xs * ws)).astype(np.int32)
    inits = [_t("wq", wq), _t("ws", ws), _t("bq", bq), _t("bs", (xs * ws).astype(np.float32)), _t("xs", xs), _t("xz", np.uint8(128)),
             _t("ys", ys), _t("yz", np.uint8(128)), _t("wz", np.zeros(c, np.int8))]
    qdq = _model([
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["yc"], **attrs),
        helper.make_node("QuantizeLinear", ["yc", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ], [x_vi], [y_vi], inits)
    kern = _model([helper.make_node("QLinearConv", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz", "bq"], ["yq"], **attrs)],
                  [helper.make_tensor_value_info("xq", U8, [1, cin, hw, hw])], [helper.make_tensor_value_info("yq", U8, [1, c, ohw, ohw])],
                  [i for i in inits if i.name not in ("bs",)])
    x = rng.standard_normal((1, cin, hw, hw)).astype(np.float32)
    return {"fp32": fp32, "fp32_control": fp32, "qdq": qdq, "kernel": kern}, {"x": x, "xq": np.clip(np.rint(x / xs) + 128, 0, 255).astype(np.uint8)}


def matmul_models(m: int, k: int, n: int, rng):
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x_vi = helper.make_tensor_value_info("x", F, [1, m, k])
    y_vi = helper.make_tensor_value_info("y", F, [1, m, n])
    fp32 = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x_vi], [y_vi], [_t("w", w)])
    ws = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / ws), -127, 127).astype(np.int8)
    wz = np.zeros(n, np.int8)
    xs, ys = np.float32(8 / 255), np.float32(8 / 255)
    inits = [_t("wq", wq), _t("ws", ws), _t("wz", wz)]
    dyn = _model([
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xsc", "xzp"]),
        helper.make_node("MatMulInteger", ["xq", "wq", "xzp", "wz"], ["yi"]),
        helper.make_node("Cast", ["yi"], ["yf"], to=F),
        helper.make_node("Mul", ["xsc", "ws"], ["sc"]),
        helper.make_node("Mul", ["yf", "sc"], ["y"]),
    ], [x_vi], [y_vi], inits)
    q_inits = inits + [_t("xs", xs), _t("xz", np.uint8(128)), _t("ys", ys), _t("yz", np.uint8(128))]
    static = _model([
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ], [x_vi], [y_vi], q_inits)
    kern = _model([helper.make_node("QLinearMatMul", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"], ["yq"])],
                  [helper.make_tensor_value_info("xq", U8, [1, m, k])], [helper.make_tensor_value_info("yq", U8, [1, m, n])], q_inits)
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    return ({"fp32": fp32, "fp32_control": fp32, "dynamic": dyn, "static": static, "kernel": kern},
            {"x": x, "xq": np.clip(np.rint(x / xs) + 128, 0, 255).astype(np.uint8)})


def fused_ops(model: onnx.ModelProto) -> list[str]:
    import tempfile

    from graphopt.verify import session_options
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = session_options("all")
        so.optimized_model_filepath = os.path.join(d, "o.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def run_case(label: str, models: dict, feeds: dict, seconds: float) -> dict:
    names = list(models)
    med = latency.compare([models[k] for k in names], feeds, budget_seconds=seconds, min_rounds=20, max_rounds=2000)
    row = {"case": label, "fp32_us": round(med[0] * 1e6, 1)}
    for k, t in zip(names[1:], med[1:]):
        row[k if k == "fp32_control" else f"{k}/fp32"] = round(t / med[0], 3)
    row["runs"] = {k: "+".join(o for o in fused_ops(models[k]) if o not in ("Transpose", "ReorderInput", "ReorderOutput")) for k in names[2:]}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0, help="time budget per case")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    from graphopt.latency import u8s8_saturates

    rng = np.random.default_rng(0)
    flags = ""
    try:
        flags = " ".join(f for f in open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
                         if f.startswith(("avx512", "avx2", "amx", "avx_vnni")))
    except Exception:
        pass
    meta = {"cpu": platform.processor() or platform.machine(), "isa_flags": flags, "onnxruntime": ort.__version__,
            "u8s8_saturates_int16": u8s8_saturates(), "level": "ORT_ENABLE_ALL", "threads": 1}
    print(json.dumps(meta), flush=True)
    rows = []
    for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
        models, feeds = conv_models(c, hw, rng)
        rows.append(run_case(f"conv3x3 C={c} {hw}x{hw}", models, feeds, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    models, feeds = conv_models(64, 224, rng, cin=3, k=7, stride=2)  # the resnet stem: 3 input channels
    rows.append(run_case("conv7x7/2 3->64 224x224 (resnet stem)", models, feeds, args.seconds))
    print(json.dumps(rows[-1]), flush=True)
    models, feeds = conv_models(128, 56, rng, cin=64, k=1, stride=2)  # a resnet downsample
    rows.append(run_case("conv1x1/2 64->128 56x56 (downsample)", models, feeds, args.seconds))
    print(json.dumps(rows[-1]), flush=True)
    shapes = [("bert_mini qkv/out", 128, 256, 256), ("bert_mini ffn1", 128, 256, 1024), ("bert_mini ffn2", 128, 1024, 256),
              ("gpt2_mini c_attn", 64, 256, 768), ("gpt2_mini c_proj", 64, 256, 256), ("gpt2_mini mlp fc", 64, 256, 1024),
              ("gpt2_mini mlp proj", 64, 1024, 256)]
    for label, m, k, n in shapes:
        models, feeds = matmul_models(m, k, n, rng)
        rows.append(run_case(f"matmul {label} [{m},{k}]x[{k},{n}]", models, feeds, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
