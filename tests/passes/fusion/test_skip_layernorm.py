"""fuse-skip-layernorm: residual Add (+ bias) + LayerNorm -> com.microsoft.SkipLayerNormalization."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tests.passes.fusion._ort_testlib import assert_same, build, full_check, ops, run_pass, weights  # noqa: E402

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
W = weights(0, w=(16, 16), b=(16,), gamma=(16,), beta=(16,))


def model(body: str, outs: str = "float[1,8,16] y", ins: str = "float[1,8,16] x, float[1,8,16] r", consts: str = "", **extra):
    return build(f"{HEADER}\ng ({ins}) => ({outs}) {consts} {{{body}}}", **{**W, **extra})


def feeds(**shapes):
    rng = np.random.default_rng(0)
    shapes = shapes or {"x": (1, 8, 16), "r": (1, 8, 16)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_bias_moves_into_the_op():
    m = model("m = MatMul(x, w)\n a = Add(m, b)\n s = Add(a, r)\n y = LayerNormalization<axis=-1, epsilon=1e-5>(s, gamma, beta)")
    m2, r = run_pass(m, "fuse-skip-layernorm")
    assert r.stats["rewritten"] == 1 and r.stats["bias_folded"] == 1 and r.stats["sum_output"] == 0
    assert ops(m2) == {"MatMul": 1, "SkipLayerNormalization": 1}
    sln = next(n for n in m2.graph.node if n.op_type == "SkipLayerNormalization")
    assert list(sln.input) == ["m", "r", "gamma", "beta", "b"]
    full_check(m2)
    assert_same(m, m2, feeds())
    assert not run_pass(m2, "fuse-skip-layernorm")[1].changed


def test_sum_read_elsewhere_comes_out_of_output_3():
    m = model("s = Add(x, r)\n y = LayerNormalization<axis=-1, epsilon=1e-5>(s, gamma, beta)\n z = Add(s, y)",
              outs="float[1,8,16] z")
    m2, r = run_pass(m, "fuse-skip-layernorm")
    assert r.stats["rewritten"] == 1 and r.stats["sum_output"] == 1
    sln = next(n for n in m2.graph.node if n.op_type == "SkipLayerNormalization")
    assert len(sln.output) == 4 and sln.output[3] == "s"
    full_check(m2)
    assert_same(m, m2, feeds())


def test_decomposed_layernorm_is_matched():
    body = """
      s = Add(x, r)
      mu = ReduceMean<axes=[-1]>(s)
      d = Sub(s, mu)
      p = Pow(d, two)
      var = ReduceMean<axes=[-1]>(p)
      ve = Add(var, eps)
      sd = Sqrt(ve)
      n = Div(d, sd)
      g = Mul(n, gamma)
      y = Add(g, beta)
    """
    m = model(body, consts="<float two = {2.0}, float eps = {1e-5}>")
    m2, r = run_pass(m, "fuse-skip-layernorm")
    assert r.stats["rewritten"] == 1 and ops(m2) == {"SkipLayerNormalization": 1}
    full_check(m2)
    assert_same(m, m2, feeds())


def test_refuses_bias_add_read_elsewhere_but_still_fuses_the_residual():
    m = model("m = MatMul(x, w)\n a = Add(m, b)\n s = Add(a, r)\n y0 = LayerNormalization<axis=-1>(s, gamma, beta)\n y = Add(y0, a)")
    m2, r = run_pass(m, "fuse-skip-layernorm")
    assert r.stats["rewritten"] == 1 and r.stats["bias_folded"] == 0
    assert_same(m, m2, feeds())


def test_refuses_broadcast_residual_and_dynamic_hidden():
    m = model("s = Add(x, r)\n y = LayerNormalization<axis=-1>(s, gamma, beta)", ins="float[1,8,16] x, float[1,1,16] r")
    m2, r = run_pass(m, "fuse-skip-layernorm")
    assert not r.changed and r.stats["matched"] == 1 and "not both [B, S, H]" in r.skipped[0]
    m = build(f"{HEADER}\ng (float[1,8,H] x, float[1,8,H] r, float[H] gamma, float[H] beta) => (float[1,8,H] y) "
              "{ s = Add(x, r)\n y = LayerNormalization<axis=-1>(s, gamma, beta) }")
    _, r = run_pass(m, "fuse-skip-layernorm")
    assert not r.changed  # gamma is a graph input, not a constant: not a layer norm we take


def test_refuses_layernorm_over_another_axis():
    m = model("s = Add(x, r)\n y = LayerNormalization<axis=1>(s, g8, b8)", g8=np.ones(8, np.float32) * 1.5, b8=np.zeros((8,), np.float32))
    _, r = run_pass(m, "fuse-skip-layernorm")
    assert not r.changed and r.stats["matched"] == 0
