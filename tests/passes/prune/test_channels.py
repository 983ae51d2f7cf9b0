"""prune-channels: dependency groups, every consumer kind sliced, recovery from calibration data."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt import ir
from graphopt.analysis import channel_groups, flops
from graphopt.shapes import infer_shapes

from tests.passes.prune.prune_helpers import cosine, init, make_model, run, run_pipeline

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws its weights from the same seed, whatever runs before it."""
    global RNG
    RNG = np.random.default_rng(0)


def w(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def dead_channels(weight: np.ndarray, idx, axis=0) -> np.ndarray:
    """Zero the given output channels: pruning them must not change the outputs at all."""
    weight = weight.copy()
    sl = [slice(None)] * weight.ndim
    sl[axis] = list(idx)
    weight[tuple(sl)] = 0
    return weight


CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4,8,8] x) => (float[2,6,8,8] y) {
    c1 = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, w1, b1)
    n1 = BatchNormalization (c1, s1, t1, m1, v1)
    r1 = Relu (n1)
    y = Conv (r1, w2, b2)
}
"""


def chain_model(dead=(1, 4, 5, 6)):
    b1 = w(8)
    b1[list(dead)] = 0
    t1 = w(8)
    t1[list(dead)] = 0
    m1 = w(8)
    m1[list(dead)] = 0
    return make_model(CHAIN, w1=dead_channels(w(8, 4, 3, 3), dead), b1=b1, s1=w(8) + 1, t1=t1, m1=m1,
                      v1=np.abs(w(8)) + 0.5, w2=w(6, 8, 1, 1), b2=w(6))


def test_chain_exact_when_pruned_channels_are_dead():
    m = chain_model()
    out, recs = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1,criterion=l1}")
    rec = recs[0]
    assert rec.changed and rec.stats["channels_removed"] == 4 and rec.stats["groups_pruned"] == 1
    assert init(out, "w1").shape == (4, 4, 3, 3)
    assert init(out, "s1").shape == (4,) and init(out, "v1").shape == (4,)
    assert init(out, "w2").shape == (6, 4, 1, 1)
    assert rec.stats["flops_after"] < rec.stats["flops_before"]
    assert rec.stats["params_after"] < rec.stats["params_before"]
    x = {"x": RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(out, x)["y"], run(m, x)["y"], rtol=1e-5, atol=1e-5)
    assert any("graph output" in s for s in rec.skipped)  # y's channels are never pruned


def test_recovery_from_calibration_beats_plain_removal():
    m = make_model(CHAIN, w1=w(8, 4, 3, 3), b1=w(8), s1=w(8) + 1, t1=w(8), m1=w(8), v1=np.abs(w(8)) + 0.5,
                   w2=w(6, 8, 1, 1), b2=w(6))
    # correlated input channels make the removed activations predictable from the kept ones
    base = RNG.standard_normal((64, 2, 8, 8)).astype(np.float32)
    calib = {"x": np.concatenate([base, base + 0.1 * RNG.standard_normal(base.shape).astype(np.float32)], 1)}
    test = {"x": calib["x"][:2]}
    ref = run(m, test)["y"]
    plain, _ = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1,recover=false}")
    fitted, recs = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1}", calib={"x": calib["x"]}, batch=2)
    c_plain, c_fit = cosine(ref, run(plain, test)["y"]), cosine(ref, run(fitted, test)["y"])
    assert c_fit > c_plain + 0.1 and c_fit > 0.85, (c_plain, c_fit)  # seed 0: 0.717 -> 0.881
    assert any("least squares" in n for n in recs[0].notes)
    assert recs[0].stats["consumers_refitted"] == 1  # 128 x 64 rows for 4 features: well determined


RESIDUAL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,6,6] x) => (float[1,3,6,6] y) {
    a = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, wa)
    ra = Relu (a)
    b = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (ra, wb)
    s = Add (a, b)
    rs = Relu (s)
    c = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (rs, wc)
    s2 = Add (s, c)
    r2 = Relu (s2)
    y = Conv (r2, wy)
}
"""


def residual_model(dead=(0, 3, 6)):
    return make_model(RESIDUAL, wa=dead_channels(w(8, 4, 3, 3), dead), wb=dead_channels(w(8, 8, 3, 3), dead),
                      wc=dead_channels(w(8, 8, 3, 3), dead), wy=w(3, 8, 1, 1))


def test_residual_dependency_group():
    m = residual_model()
    g = ir.import_model(m)
    g.toposort()
    infer_shapes(g, template=m)
    groups = [x for x in channel_groups(g) if not x.blocked]
    assert len(groups) == 1
    grp = groups[0]
    assert len(grp.of("producer")) == 3 and len(grp.spaces) == 3 and grp.size == 8
    assert len(grp.of("consumer")) == 3  # b and c read the group; y reads it too
    out, recs = run_pipeline(m, "prune-channels{ratio=0.375,round-to=1,criterion=l1}")
    for name in ("wa", "wb", "wc"):
        assert init(out, name).shape[0] == 5
    assert init(out, "wb").shape[1] == 5 and init(out, "wc").shape[1] == 5 and init(out, "wy").shape[1] == 5
    x = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(out, x)["y"], run(m, x)["y"], rtol=1e-5, atol=1e-5)


def test_residual_group_blocked_by_reshape_is_left_alone():
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,6,6] x) => (float[1,288] y) {
    a = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, wa)
    ra = Relu (a)
    b = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (ra, wb)
    s = Add (a, b)
    y = Reshape (s, shp)
}
"""
    m = make_model(text, wa=w(8, 4, 3, 3), wb=w(8, 8, 3, 3), shp=np.array([1, 288], np.int64))
    out, recs = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1}")
    rec = recs[0]
    # the Add group (a, b) is blocked by the Reshape; b's inner input channels are a's, so nothing goes
    assert init(out, "wa").shape == (8, 4, 3, 3) and init(out, "wb").shape == (8, 8, 3, 3)
    assert not rec.changed and any("Reshape" in s for s in rec.skipped)


CONCAT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,5,5] x) => (float[1,2,5,5] y) {
    a = Conv (x, wa, ba)
    b = Conv (x, wb)
    ra = Relu (a)
    cat = Concat <axis=1> (ra, b)
    k = Mul (cat, scale)
    y = Conv (k, wy)
}
"""


def test_concat_offsets_and_per_channel_constants():
    ba = w(4)
    ba[[1, 2]] = 0
    scale = w(1, 10, 1, 1) + 1
    m = make_model(CONCAT, wa=dead_channels(w(4, 3, 1, 1), [1, 2]), ba=ba, wb=dead_channels(w(6, 3, 1, 1), [0, 5]),
                   scale=scale, wy=w(2, 10, 1, 1))
    out, recs = run_pipeline(m, "prune-channels{ratio=0.34,round-to=1,criterion=l1}")
    assert init(out, "wa").shape[0] == 3 and init(out, "wb").shape[0] == 4
    assert init(out, "scale").shape == (1, 7, 1, 1) and init(out, "wy").shape == (2, 7, 1, 1)
    x = {"x": RNG.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(out, x)["y"], run(m, x)["y"], rtol=1e-5, atol=1e-5)


FLAT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,4,4] x) => (float[N,3] y) {
    a = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, wa, ba)
    r = Relu (a)
    p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)
    f = Flatten (p)
    h = Gemm <transB=1> (f, w1, b1)
    rh = Relu (h)
    y = Gemm (rh, w2, b2)
}
"""


def test_flatten_gemm_blocks_and_gemm_features():
    ba = w(6)
    ba[[0, 3]] = 0
    w1 = w(5, 24)
    b1 = w(5)
    w1[[1]] = 0
    b1[1] = -1.0  # hidden unit 1 is dead after Relu
    m = make_model(FLAT, wa=dead_channels(w(6, 2, 3, 3), [0, 3]), ba=ba, w1=w1, b1=b1, w2=w(5, 3), b2=w(3))
    out, recs = run_pipeline(m, "prune-channels{ratio=0.25,round-to=1,criterion=l1}")
    assert init(out, "wa").shape[0] == 4
    assert init(out, "w1").shape == (4, 16)  # 2 of 6 channels x 4 positions removed; 1 of 5 units
    assert init(out, "w2").shape == (4, 3)
    x = {"x": RNG.standard_normal((3, 2, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(out, x)["y"], run(m, x)["y"], rtol=1e-5, atol=1e-5)


DEPTHWISE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,6,6] x) => (float[1,2,6,6] y) {
    e = Conv (x, we)
    re = Relu (e)
    d = Conv <group=8, pads=[1,1,1,1], kernel_shape=[3,3]> (re, wd, bd)
    rd = Relu (d)
    y = Conv (rd, wp)
}
"""


def test_depthwise_conv_group_shrinks():
    bd = w(8)
    bd[[2, 7]] = 0
    m = make_model(DEPTHWISE, we=dead_channels(w(8, 3, 1, 1), [2, 7]), wd=w(8, 1, 3, 3), bd=bd, wp=w(2, 8, 1, 1))
    out, recs = run_pipeline(m, "prune-channels{ratio=0.25,round-to=1,criterion=l1}")
    assert init(out, "we").shape[0] == 6 and init(out, "wd").shape == (6, 1, 3, 3) and init(out, "bd").shape == (6,)
    dw = next(n for n in out.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert next(a.i for a in dw.attribute if a.name == "group") == 6
    x = {"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(out, x)["y"], run(m, x)["y"], rtol=1e-5, atol=1e-5)


def test_shared_weight_is_refused():
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,5,5] x) => (float[1,2,5,5] y, float[1,2,5,5] z) {
    a = Conv (x, ws)
    b = Conv (x, ws)
    ra = Relu (a)
    rb = Relu (b)
    y = Conv (ra, wy)
    z = Conv (rb, wz)
}
"""
    m = make_model(text, ws=w(8, 4, 1, 1), wy=w(2, 8, 1, 1), wz=w(2, 8, 1, 1))
    out, recs = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1}")
    assert not recs[0].changed
    assert sum("shared" in s for s in recs[0].skipped) == 2, recs[0].skipped
    assert init(out, "ws").shape == (8, 4, 1, 1)


def test_weight_as_graph_input_is_not_pruned():
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,5,5] x, float[8,4,1,1] wi) => (float[1,2,5,5] y) {
    c = Conv (x, wi)
    r = Relu (c)
    y = Conv (r, wy)
}
"""
    m = make_model(text, wy=w(2, 8, 1, 1))
    out, recs = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1}")
    assert not recs[0].changed and init(out, "wy").shape == (2, 8, 1, 1)


def test_subgraph_use_blocks_the_group():
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,5,5] x, bool cond) => (float[1,8,5,5] y) {
    a = Conv (x, wa)
    r = Relu (a)
    y = If (cond) <then_branch = t () => (float[1,8,5,5] o) { o = Identity (r) },
                   else_branch = e () => (float[1,8,5,5] o2) { o2 = Neg (r) }>
}
"""
    m = make_model(text, wa=w(8, 4, 1, 1))
    out, recs = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1}")
    assert not recs[0].changed and init(out, "wa").shape == (8, 4, 1, 1)


def test_exclude_and_include_options():
    m = chain_model()
    out, recs = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1,exclude=w1}")
    assert not recs[0].changed and any("excluded" in s for s in recs[0].skipped)
    out, recs = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1,include=nothing*}")
    assert not recs[0].changed


def test_round_to_keeps_hardware_friendly_widths():
    m2 = make_model(RESIDUAL.replace("[1,4,6,6] x", "[1,4,6,6] x"), wa=w(16, 4, 3, 3), wb=w(16, 16, 3, 3),
                    wc=w(16, 16, 3, 3), wy=w(3, 16, 1, 1))
    out, _ = run_pipeline(m2, "prune-channels{ratio=0.3}")  # 16 * 0.7 = 11.2 -> 8 kept (round-to=8)
    assert init(out, "wa").shape[0] == 8


def test_target_flops_allocates_per_group_ratios():
    m = make_model(CHAIN, w1=w(8, 4, 3, 3), b1=w(8), s1=w(8) + 1, t1=w(8), m1=w(8), v1=np.abs(w(8)) + 0.5,
                   w2=w(6, 8, 1, 1), b2=w(6))
    calib = {"x": RNG.standard_normal((8, 4, 8, 8)).astype(np.float32)}
    out, recs = run_pipeline(m, "prune-channels{target-flops=0.7,round-to=1}", calib=calib, batch=2)
    rec = recs[0]
    assert rec.changed and rec.stats["flops_after"] <= 0.7 * rec.stats["flops_before"] + 1
    assert any("sensitivity" in n for n in rec.notes)


def test_bad_options():
    from graphopt.errors import PipelineError

    with pytest.raises(PipelineError):
        run_pipeline(chain_model(), "prune-channels{ratio=1.5}")


# -- real models ------------------------------------------------------------------------------------


def test_digits_cnn_conv2_half_channels_keeps_accuracy(shared_dir):
    d = np.load(shared_dir / "digits" / "digits_data.npz")
    m = ir.load(shared_dir / "digits" / "digits_cnn.onnx")
    out, recs = run_pipeline(m, "prune-channels{ratio=0.5,include=conv2*}", calib={"input": d["x_calib"]}, batch=50)
    assert recs[0].stats["channels_removed"] == 16
    assert init(out, "conv2.weight").shape[0] == 16 and init(out, "fc1.weight").shape == (64, 256)
    acc = float((run(out, {"input": d["x_test"]})["logits"].argmax(1) == d["y_test"]).mean())
    assert acc >= 0.99, acc


def test_resnet18_groups_and_pruned_model_runs(shared_dir):
    m = ir.load(shared_dir / "corpus" / "resnet18.onnx")
    g = ir.import_model(m)
    g.toposort()
    infer_shapes(g, template=m)
    groups = channel_groups(g)
    ok = [x for x in groups if not x.blocked]
    assert len(ok) == 12
    residual = [x for x in ok if len(x.of("producer")) == 3]
    assert sorted(x.size for x in residual) == [64, 128, 256, 512]  # stem + 2 blocks, then downsample + 2 blocks
    f0 = flops(g)
    out, recs = run_pipeline(m, "prune-channels{ratio=0.3}")  # no calibration: plain removal, fast
    rec = recs[0]
    assert rec.stats["groups_pruned"] == 12
    assert rec.stats["flops_after"] < 0.55 * f0
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    y = run(out, x)["output"]
    assert y.shape == (1, 1000) and np.isfinite(y).all()
