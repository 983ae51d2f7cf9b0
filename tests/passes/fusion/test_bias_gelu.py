"""fuse-bias-gelu: erf GELU -> BiasGelu / Gelu, tanh GELU -> FastGelu (com.microsoft)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tests.passes.fusion._ort_testlib import assert_same, build, full_check, ops, run_pass, weights  # noqa: E402

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
W = weights(0, w=(16, 32), b=(32,))
ERF = "<float rt2 = {1.4142135}, float one = {1.0}, float half = {0.5}>"
TANH = "<float half = {0.5}, float three = {3.0}, float c = {0.044715}, float k = {0.7978846}, float one = {1.0}>"


def model(body, consts, ins="float[1,8,16] x", outs="float[1,8,32] y", **extra):
    return build(f"{HEADER}\ng ({ins}) => ({outs}) {consts} {{{body}}}", **{**W, **extra})


def feeds(shape=(1, 8, 16)):
    return {"x": (np.random.default_rng(0).standard_normal(shape) * 2).astype(np.float32)}


BERT_ERF = "m = MatMul(x, w)\n a = Add(b, m)\n d = Div(a, rt2)\n e = Erf(d)\n p = Add(e, one)\n q = Mul(a, p)\n y = Mul(q, half)"
GPT2_TANH = ("h = Mul(a, half)\n c3 = Pow(a, three)\n cc = Mul(c3, c)\n i = Add(a, cc)\n s = Mul(i, k)\n t = Tanh(s)\n"
             " p = Add(t, one)\n y = Mul(h, p)")


def test_erf_gelu_with_bias_becomes_biasgelu():
    m = model(BERT_ERF, ERF)
    m2, r = run_pass(m, "fuse-bias-gelu")
    assert r.stats["rewritten"] == 1 and r.stats["BiasGelu"] == 1
    assert ops(m2) == {"MatMul": 1, "BiasGelu": 1}
    full_check(m2)
    assert_same(m, m2, feeds())
    assert not run_pass(m2, "fuse-bias-gelu")[1].changed


def test_tanh_gelu_with_bias_becomes_fastgelu_with_bias():
    m = model("m = MatMul(x, w)\n a = Add(m, b)\n" + GPT2_TANH, TANH)
    m2, r = run_pass(m, "fuse-bias-gelu")
    assert r.stats["FastGelu"] == 1 and ops(m2) == {"MatMul": 1, "FastGelu": 1}
    assert len(next(n for n in m2.graph.node if n.op_type == "FastGelu").input) == 2
    full_check(m2)
    assert_same(m, m2, feeds(), rtol=1e-5, atol=1e-5)


def test_tanh_gelu_after_gemm_detour_takes_the_bias_and_drops_the_reshapes():
    body = "x2 = Reshape(x, s2)\n g = Gemm(x2, w, b)\n a = Reshape(g, s3)\n" + GPT2_TANH
    m = model(body, TANH[:-1] + ", int64[2] s2 = {-1,16}, int64[3] s3 = {1,8,32}>")
    m2, r = run_pass(m, "fuse-bias-gelu")
    assert r.stats["FastGelu"] == 1 and ops(m2) == {"MatMul": 1, "FastGelu": 1}
    assert len(next(n for n in m2.graph.node if n.op_type == "FastGelu").input) == 2
    full_check(m2)
    assert_same(m, m2, feeds(), rtol=1e-5, atol=1e-5)
    assert not run_pass(m2, "fuse-bias-gelu")[1].changed


def test_gemm_detour_with_transposed_weight_and_erf():
    body = ("x2 = Reshape(x, s2)\n g = Gemm <transB = 1> (x2, wt, b)\n a = Reshape(g, s3)\n"
            "d = Div(a, rt2)\n e = Erf(d)\n p = Add(e, one)\n q = Mul(a, p)\n y = Mul(q, half)")
    m = model(body, ERF[:-1] + ", int64[2] s2 = {-1,16}, int64[3] s3 = {1,8,32}>", wt=np.ascontiguousarray(W["w"].T))
    m2, r = run_pass(m, "fuse-bias-gelu")
    assert r.stats["BiasGelu"] == 1 and ops(m2) == {"MatMul": 1, "BiasGelu": 1}
    assert_same(m, m2, feeds(), rtol=1e-5, atol=1e-5)


def test_gemm_detour_whose_bias_is_shared_keeps_the_gemm():
    body = ("x2 = Reshape(x, s2)\n g = Gemm(x2, w, b)\n a = Reshape(g, s3)\n" + GPT2_TANH.replace("y = Mul(h, p)", "y0 = Mul(h, p)")
            + "\n y = Add(y0, b)")
    m = model(body, TANH[:-1] + ", int64[2] s2 = {-1,16}, int64[3] s3 = {1,8,32}>")
    m2, r = run_pass(m, "fuse-bias-gelu")
    assert r.stats["FastGelu"] == 1 and ops(m2)["Gemm"] == 1 and ops(m2)["Reshape"] == 2
    assert_same(m, m2, feeds(), rtol=1e-5, atol=1e-5)


def test_sigmoid_form_from_o2_becomes_fastgelu_with_bias():
    from graphopt.passes.fusion.gelu_sigmoid import A, B

    body = ("m = MatMul(x, w)\n a = Add(m, b)\n q = Mul(a, a)\n qb = Mul(q, cb)\n pa = Add(qb, ca)\n z = Mul(pa, a)\n"
            " s = Sigmoid(z)\n y = Mul(a, s)")
    m = model(body, f"<float ca = {{{A!r}}}, float cb = {{{B!r}}}>")
    m2, r = run_pass(m, "fuse-bias-gelu")
    assert r.stats["FastGelu"] == 1 and ops(m2) == {"MatMul": 1, "FastGelu": 1}
    assert_same(m, m2, feeds(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("body", [
    "d = Mul(a, inv)\n e = Erf(d)\n p = Add(one, e)\n q = Mul(half, a)\n y = Mul(q, p)",   # x/sqrt2 as a product
    "d = Div(a, rt2)\n e = Erf(d)\n p = Add(e, one)\n q = Mul(p, half)\n y = Mul(a, q)",   # 0.5 on the erf side
])
def test_erf_variants_without_bias_become_gelu(body):
    m = model(body, "<float rt2 = {1.4142135}, float inv = {0.70710677}, float one = {1.0}, float half = {0.5}>",
              ins="float[1,8,32] a")
    m2, r = run_pass(m, "fuse-bias-gelu")
    assert r.stats["Gelu"] == 1 and ops(m2) == {"Gelu": 1}
    assert m2.graph.node[0].domain == "com.microsoft"
    full_check(m2)
    assert_same(m, m2, {"a": feeds((1, 8, 32))["x"]})


def test_refuses_when_an_intermediate_is_read_elsewhere():
    m = model(BERT_ERF + "\n z = Add(e, one)", ERF, outs="float[1,8,32] y, float[1,8,32] z")
    m2, r = run_pass(m, "fuse-bias-gelu")
    assert not r.changed and r.stats["matched"] == 1 and "also read by" in r.skipped[0]


def test_bias_shared_with_another_reader_is_not_folded():
    m = model(BERT_ERF + "\n z = Add(a, a)", ERF, outs="float[1,8,32] y, float[1,8,32] z")
    m2, r = run_pass(m, "fuse-bias-gelu")
    assert r.stats["Gelu"] == 1 and r.stats["BiasGelu"] == 0  # gelu(x) still fuses, the Add stays
    assert_same(m, m2, feeds())


def test_wrong_constant_is_not_gelu():
    m = model(BERT_ERF, "<float rt2 = {1.5}, float one = {1.0}, float half = {0.5}>")
    _, r = run_pass(m, "fuse-bias-gelu")
    assert not r.changed and r.stats["matched"] == 0
