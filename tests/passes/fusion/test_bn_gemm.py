import pytest

HDR = '<ir_version: 8, opset_import: ["" : 17]>'


@pytest.fixture
def bn(fusion):
    r = fusion.rnd
    return dict(s=r(6, seed=1), bb=r(6, seed=2), m=r(6, seed=3), v=r(6, seed=4, lo=0.1))


def test_gemm_transb_bn(fusion, bn):
    text = f"""{HDR}
g (float[3,5] x) => (float[3,6] y) {{
  h = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(x, w, c)
  y = BatchNormalization<epsilon = 0.01>(h, s, bb, m, v)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(6, 5), c=fusion.rnd(6), **bn), "fuse-bn-gemm")
    assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["Gemm"]


def test_matmul_bn_becomes_gemm(fusion, bn):
    text = f"""{HDR}
g (float[N,5] x) => (float[N,6] y) {{
  h = MatMul(x, w)
  y = BatchNormalization(h, s, bb, m, v)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(5, 6), **bn), "fuse-bn-gemm", feeds={"x": fusion.rnd(4, 5)})
    assert out.ops == ["Gemm"]


def test_refuses_3d(fusion):
    r = fusion.rnd
    text = f"""{HDR}
g (float[2,6,5] x) => (float[2,6,5] y) {{
  h = MatMul(x, w)
  y = BatchNormalization(h, s, bb, m, v)
}}"""
    m = fusion.build(text, w=r(5, 5), s=r(6), bb=r(6), m=r(6), v=r(6, lo=0.1))
    out = fusion.run(m, "fuse-bn-gemm")
    assert out.stats == {"matched": 1, "rewritten": 0} and "rank 3" in out.result.skipped[0]


def test_refuses_shared_weight_and_weight_input(fusion, bn):
    text = f"""{HDR}
g (float[3,5] x) => (float[3,6] y, float[3,6] z) {{
  h = MatMul(x, w)
  y = BatchNormalization(h, s, bb, m, v)
  z = MatMul(x, w)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(5, 6), **bn), "fuse-bn-gemm")
    assert out.stats["rewritten"] == 0 and "shared" in out.result.skipped[0]
    text2 = f"""{HDR}
g (float[3,5] x, float[5,6] w) => (float[3,6] y) {{
  h = MatMul(x, w)
  y = BatchNormalization(h, s, bb, m, v)
}}"""
    out = fusion.run(fusion.build(text2, **bn), "fuse-bn-gemm")
    assert out.stats["rewritten"] == 0 and "not a constant" in out.result.skipped[0]
