"""fuse-conv-activation: Conv -> activation -> com.microsoft.FusedConv."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tests.passes.fusion._ort_testlib import assert_same, build, full_check, ops, run_pass, weights  # noqa: E402

X = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
W = weights(1, w=(4, 3, 3, 3), b=(4,))


def model(act: str, outs: str = "float[1,4,8,8] y", extra: str = "", opset: int = 17):
    return build(f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
                 f"g (float[1,3,8,8] x) => ({outs}) {{ c = Conv <pads = [1, 1, 1, 1]> (x, w, b)\n {act}\n {extra} }}", **W)


@pytest.mark.parametrize("act,activation,params", [
    ("y = Relu(c)", "Relu", None),
    ("y = Tanh(c)", "Tanh", None),
    ("y = Sigmoid(c)", "Sigmoid", None),
    ("y = LeakyRelu <alpha = 0.2> (c)", "LeakyRelu", [0.2]),
    ("y = HardSigmoid <alpha = 0.3> (c)", "HardSigmoid", [0.3, 0.5]),
])
def test_activations_fuse_and_match_numerically(act, activation, params):
    m = model(act)
    m2, r = run_pass(m, "fuse-conv-activation")
    assert r.stats == {"matched": 1, "rewritten": 1} and ops(m2) == {"FusedConv": 1}
    node = m2.graph.node[0]
    assert node.domain == "com.microsoft"
    attrs = {a.name: a for a in node.attribute}
    assert attrs["activation"].s.decode() == activation and list(attrs["pads"].ints) == [1, 1, 1, 1]
    if params is None:
        assert "activation_params" not in attrs
    else:
        np.testing.assert_allclose(list(attrs["activation_params"].floats), params, rtol=1e-6)
    full_check(m2)
    assert_same(m, m2, X)
    assert not run_pass(m2, "fuse-conv-activation")[1].changed


def test_clip_with_constant_bounds_and_with_one_bound():
    m = build('<ir_version: 8, opset_import: ["" : 17]>\n'
              "g (float[1,3,8,8] x) => (float[1,4,8,8] y) <float lo = {0.0}, float hi = {6.0}> "
              "{ c = Conv <pads = [1, 1, 1, 1]> (x, w, b)\n y = Clip(c, lo, hi) }", **W)
    m2, r = run_pass(m, "fuse-conv-activation")
    assert r.stats["rewritten"] == 1
    p = next(a for a in m2.graph.node[0].attribute if a.name == "activation_params")
    assert list(p.floats) == [0.0, 6.0]
    assert_same(m, m2, X)
    m = build('<ir_version: 8, opset_import: ["" : 17]>\n'
              "g (float[1,3,8,8] x) => (float[1,4,8,8] y) <float hi = {0.5}> "
              "{ c = Conv <pads = [1, 1, 1, 1]> (x, w, b)\n y = Clip(c, , hi) }", **W)
    m2, r = run_pass(m, "fuse-conv-activation")
    assert r.stats["rewritten"] == 1
    assert_same(m, m2, X)


def test_refusals():
    # the Conv output is also read elsewhere
    m = model("y = Relu(c)", outs="float[1,4,8,8] y, float[1,4,8,8] z", extra="z = Neg(c)")
    _, r = run_pass(m, "fuse-conv-activation")
    assert not r.changed and r.stats["matched"] == 0
    # the Conv output is a graph output
    m = model("y = Relu(c)", outs="float[1,4,8,8] y, float[1,4,8,8] c")
    _, r = run_pass(m, "fuse-conv-activation")
    assert not r.changed
    # Clip bounds computed at run time
    m = build('<ir_version: 8, opset_import: ["" : 17]>\n'
              "g (float[1,3,8,8] x, float hi) => (float[1,4,8,8] y) "
              "{ c = Conv <pads = [1, 1, 1, 1]> (x, w, b)\n y = Clip(c, , hi) }", **W)
    _, r = run_pass(m, "fuse-conv-activation")
    assert not r.changed and r.stats["matched"] == 1 and "not constants" in r.skipped[0]
    # float16 Conv: FusedConv is float32 only
    m = build('<ir_version: 8, opset_import: ["" : 17]>\n'
              "g (float16[1,3,8,8] x) => (float16[1,4,8,8] y) "
              "{ c = Conv <pads = [1, 1, 1, 1]> (x, w, b)\n y = Relu(c) }",
              w=W["w"].astype(np.float16), b=W["b"].astype(np.float16))
    _, r = run_pass(m, "fuse-conv-activation")
    assert not r.changed and "float32 only" in r.skipped[0]


@pytest.mark.corpus
@pytest.mark.slow
def test_squeezenet_every_conv_relu(shared_dir):
    import graphopt

    path = shared_dir / "corpus" / "squeezenet1_1.onnx"
    res = graphopt.optimize(path, "O3", inputs=shared_dir / "corpus" / "squeezenet1_1.npz")
    assert res.verification.ok
    got = ops(res.model)
    assert got["FusedConv"] == 26 and got["Relu"] == 0  # what onnxruntime's EXTENDED level makes
