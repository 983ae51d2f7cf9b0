"""unfuse-skip-layernorm: SkipLayerNormalization -> Add + LayerNormalization, and 2-D views that keep
onnxruntime from re-fusing them."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from tests.passes.fusion._ort_testlib import assert_same, build, full_check, ops, run_pass, weights  # noqa: E402

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
W = weights(0, w=(16, 16), b=(16,), gamma=(16,), beta=(16,))
F = {k: np.random.default_rng(i).standard_normal((1, 8, 16)).astype(np.float32) for i, k in enumerate("xr")}


def ort_all_ops(model: onnx.ModelProto) -> set[str]:
    """Op types after onnxruntime's own ORT_ENABLE_EXTENDED rewrites (where SkipLayerNormFusion runs)."""
    import tempfile, os
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(d, "o.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


def test_plain_residual_layernorm_gets_a_2d_view_and_ort_no_longer_fuses_it():
    m = build(f"{HEADER}\ng (float[1,8,16] x, float[1,8,16] r) => (float[1,8,16] y) "
              "{ s = Add(x, r)\n y = LayerNormalization<axis=-1, epsilon=1e-5>(s, gamma, beta) }", **W)
    assert "SkipLayerNormalization" in ort_all_ops(m)
    m2, r = run_pass(m, "unfuse-skip-layernorm")
    assert r.stats["viewed_2d"] == 1 and ops(m2) == {"Add": 1, "Reshape": 2, "LayerNormalization": 1}
    full_check(m2)
    assert_same(m, m2, F)
    assert "SkipLayerNormalization" not in ort_all_ops(m2)
    assert not run_pass(m2, "unfuse-skip-layernorm")[1].changed


def test_skip_layernorm_with_bias_and_sum_is_lowered():
    m = build(f"{HEADER}\ng (float[1,8,16] x, float[1,8,16] r) => (float[1,8,16] y) "
              "{ m = MatMul(x, w)\n a = Add(m, b)\n s = Add(a, r)\n n = LayerNormalization<axis=-1, epsilon=1e-5>(s, gamma, beta)\n"
              " y = Add(n, s) }", **W)
    fused, rf = run_pass(m, "fuse-skip-layernorm")
    assert rf.stats["rewritten"] == 1
    m2, r = run_pass(fused, "unfuse-skip-layernorm")
    assert r.stats["lowered"] == 1 and r.stats["viewed_2d"] == 0  # the sum has two readers: ORT would not fuse
    assert "SkipLayerNormalization" not in ops(m2)
    full_check(m2)
    assert_same(m, m2, F)


def test_broadcast_residual_is_left_alone():
    m = build(f"{HEADER}\ng (float[1,8,16] x) => (float[1,8,16] y) "
              "{ s = Add(x, b)\n y = LayerNormalization<axis=-1>(s, gamma, beta) }", **W)
    _, r = run_pass(m, "unfuse-skip-layernorm")
    assert not r.changed


def test_dynamic_batch_reshapes_back_through_shape():
    m = build(f"{HEADER}\ng (float[N,8,16] x, float[N,8,16] r) => (float[N,8,16] y) "
              "{ s = Add(x, r)\n y = LayerNormalization<axis=-1>(s, gamma, beta) }", **W)
    m2, r = run_pass(m, "unfuse-skip-layernorm")
    assert r.stats["viewed_2d"] == 1 and ops(m2)["Shape"] == 1
    full_check(m2)
    f = {k: np.random.default_rng(3).standard_normal((3, 8, 16)).astype(np.float32) for k in "xr"}
    assert_same(m, m2, f)
