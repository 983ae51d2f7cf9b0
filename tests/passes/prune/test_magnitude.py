"""prune-magnitude and prune-nm: exact sparsity, OBS reconstruction, reports, refusals, digits accuracy."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt import ir

from tests.passes.prune.prune_helpers import cosine, init, make_model, run, run_pipeline

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,16] x) => (float[N,4] y) {
    h = Gemm <transB=1> (x, w1, b1)
    r = Relu (h)
    c = MatMul (r, w2)
    y = Add (c, b2)
}
"""

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8,6,6] x) => (float[N,4,6,6] y) {
    a = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, wa, ba)
    r = Relu (a)
    y = Conv (r, wb)
}
"""


def mlp(seed=0):
    rng = np.random.default_rng(seed)
    return make_model(MLP, w1=rng.standard_normal((32, 16)), b1=rng.standard_normal(32) * 0.1,
                      w2=rng.standard_normal((32, 4)), b2=rng.standard_normal(4) * 0.1)


def conv(seed=0):
    rng = np.random.default_rng(seed)
    return make_model(CONV, wa=rng.standard_normal((8, 8, 3, 3)) * 0.3, ba=rng.standard_normal(8) * 0.1,
                      wb=rng.standard_normal((4, 8, 1, 1)))


def correlated(rng, n, d):
    """Inputs with structure (low-rank plus noise), as real activations have."""
    basis = rng.standard_normal((4, d))
    return (rng.standard_normal((n, 4)) @ basis + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


def test_layer_sparsity_is_exact_and_reported():
    m = mlp()
    out, recs = run_pipeline(m, "prune-magnitude{sparsity=0.75}")
    rec = recs[0]
    assert rec.changed and rec.stats["layers_pruned"] == 2
    assert np.count_nonzero(init(out, "w1")) == 32 * 16 // 4
    assert np.count_nonzero(init(out, "w2")) == 32 * 4 // 4
    assert rec.stats["compressed_bytes_after"] < rec.stats["compressed_bytes_before"]
    assert rec.stats["flops_after"] == rec.stats["flops_before"]
    assert any("not the latency" in n for n in rec.notes)
    assert any(n.startswith("latency (onnxruntime") for n in rec.notes) and "latency_ratio_permille" in rec.stats
    # without calibration: plain magnitude (the largest weights survive unchanged)
    w1 = init(m, "w1")
    kept = init(out, "w1") != 0
    assert np.abs(w1[kept]).min() >= np.abs(w1[~kept]).max()
    np.testing.assert_array_equal(init(out, "w1")[kept], w1[kept])


def test_idempotent_second_run_changes_nothing():
    out, _ = run_pipeline(mlp(), "prune-magnitude{sparsity=0.5}")
    out2, recs = run_pipeline(out, "prune-magnitude{sparsity=0.5}")
    assert not recs[0].changed
    np.testing.assert_array_equal(init(out2, "w1"), init(out, "w1"))


def test_global_scope_spreads_by_magnitude():
    rng = np.random.default_rng(1)
    m = make_model(MLP, w1=rng.standard_normal((32, 16)) * 0.1, b1=np.zeros(32), w2=rng.standard_normal((32, 4)) * 3, b2=np.zeros(4))
    out, recs = run_pipeline(m, "prune-magnitude{sparsity=0.5,scope=global}")
    total = np.count_nonzero(init(out, "w1")) + np.count_nonzero(init(out, "w2"))
    assert total == (32 * 16 + 32 * 4) // 2
    assert np.count_nonzero(init(out, "w2")) > 0.9 * 32 * 4  # the large layer keeps almost everything


def test_reconstruction_beats_plain_magnitude():
    rng = np.random.default_rng(2)
    m = conv()
    calib = {"x": correlated(rng, 64 * 8, 36).reshape(64, 8, 6, 6)}
    test = {"x": correlated(rng, 4 * 8, 36).reshape(4, 8, 6, 6)}
    ref = run(m, test)["y"]
    plain, _ = run_pipeline(m, "prune-magnitude{sparsity=0.7}")
    rec_m, recs = run_pipeline(m, "prune-magnitude{sparsity=0.7}", calib=calib, batch=16)
    c0, c1 = cosine(ref, run(plain, test)["y"]), cosine(ref, run(rec_m, test)["y"])
    assert c1 > c0 + 0.02 and c1 > 0.85, (c0, c1)  # seed 2: 0.861 -> 0.896
    assert np.count_nonzero(init(rec_m, "wa")) == round(8 * 8 * 9 * 0.3)
    assert any("OBS" in n for n in recs[0].notes)


def test_exclude_shared_and_input_weights_are_left_dense():
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,16] x, float[16,16] wi) => (float[N,16] y) {
    a = MatMul (x, ws)
    b = MatMul (a, ws)
    c = MatMul (b, wi)
    y = MatMul (c, we)
}
"""
    rng = np.random.default_rng(3)
    m = make_model(text, ws=rng.standard_normal((16, 16)), we=rng.standard_normal((16, 16)))
    out, recs = run_pipeline(m, "prune-magnitude{sparsity=0.5,exclude=we}")
    rec = recs[0]
    assert not rec.changed
    reasons = " ".join(rec.skipped)
    assert "shared" in reasons and "not an initializer" in reasons and "excluded" in reasons


def test_nm_pattern_along_input_channels():
    from graphopt.passes.prune.nm import is_nm

    rng = np.random.default_rng(4)
    m = conv()
    calib = {"x": correlated(rng, 32 * 8, 36).reshape(32, 8, 6, 6)}
    out, recs = run_pipeline(m, "prune-nm{n=2,m=4}", calib=calib, batch=16)
    wa = init(out, "wa")  # [O, C, kh, kw]: groups of 4 input channels per tap
    assert is_nm(np.moveaxis(wa, 1, -1), 2, 4)
    assert is_nm(init(out, "wb")[:, :, 0, 0], 2, 4)
    assert recs[0].stats["sparsity_permille"] == 500
    out2, recs2 = run_pipeline(out, "prune-nm{n=2,m=4}")
    assert not recs2[0].changed


def test_nm_refuses_indivisible_reduction():
    rng = np.random.default_rng(5)
    text = MLP.replace("float[N,16] x", "float[N,6] x")
    m = make_model(text, w1=rng.standard_normal((32, 6)), b1=np.zeros(32), w2=rng.standard_normal((32, 4)), b2=np.zeros(4))
    out, recs = run_pipeline(m, "prune-nm")
    assert any("not a multiple of 4" in s for s in recs[0].skipped)
    assert np.count_nonzero(init(out, "w1")) == 32 * 6


# -- digits ------------------------------------------------------------------------------------------


def _digits(shared_dir):
    d = np.load(shared_dir / "digits" / "digits_data.npz")
    m = ir.load(shared_dir / "digits" / "digits_cnn.onnx")
    return d, m


def _top1(model, d):
    return float((run(model, {"input": d["x_test"]})["logits"].argmax(1) == d["y_test"]).mean())


@pytest.mark.parametrize("pipeline, floor", [
    ("prune-magnitude{sparsity=0.7}", 0.98),
    ("prune-magnitude{sparsity=0.9,scope=global}", 0.98),
    ("prune-nm{n=2,m=4}", 0.98),
])
def test_digits_cnn_sparsity_keeps_accuracy(shared_dir, pipeline, floor):
    d, m = _digits(shared_dir)
    out, recs = run_pipeline(m, pipeline, calib={"input": d["x_calib"]}, batch=50)
    assert _top1(out, d) >= floor
    rec = recs[0]
    assert rec.stats["compressed_bytes_after"] < rec.stats["compressed_bytes_before"]


def test_budget_backoff_lowers_sparsity_until_min_cosine_holds():
    from graphopt.pass_base import Budget

    m = mlp()
    out, recs = run_pipeline(m, "prune-magnitude{sparsity=0.9}", budget=Budget(min_cosine=0.97))
    rec = recs[0]
    assert rec.changed and rec.stats["budget_backoffs"] >= 1
    assert any("fails at sparsity=0.9" in n for n in rec.notes)
    held = [n for n in rec.notes if " holds at sparsity=" in n]
    assert held
    s = 1.0 - np.count_nonzero(init(out, "w1")) / init(out, "w1").size
    assert 0.05 < s < 0.85
    x = {"x": np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)}
    assert cosine(run(out, x)["y"], run(m, x)["y"]) > 0.9
    # backoff=false: the full sparsity, the final verification decides
    out2, _ = run_pipeline(m, "prune-magnitude{sparsity=0.9,backoff=false}", budget=Budget(min_cosine=0.97))
    assert np.count_nonzero(init(out2, "w1")) == round(32 * 16 * 0.1)
