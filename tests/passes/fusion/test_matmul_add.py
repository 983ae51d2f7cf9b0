HDR = '<ir_version: 8, opset_import: ["" : 17]>'


def test_2d_matmul_add_becomes_gemm(fusion):
    text = f"""{HDR}
g (float[N,5] x) => (float[N,6] y) {{
  h = MatMul(x, w)
  y = Add(c, h)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(5, 6), c=fusion.rnd(6)), "fuse-matmul-add", feeds={"x": fusion.rnd(3, 5)})
    assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["Gemm"]


def test_biasless_gemm_add(fusion):
    text = f"""{HDR}
g (float[3,5] x) => (float[3,6] y) {{
  h = Gemm<transB = 1, alpha = 2.0>(x, w)
  y = Add(h, c)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(6, 5), c=fusion.rnd(1, 6)), "fuse-matmul-add")
    assert out.ops == ["Gemm"]


def test_refuses_3d_and_bad_broadcast_and_shared(fusion):
    text = f"""{HDR}
g (float[2,3,5] x) => (float[2,3,6] y) {{
  h = MatMul(x, w)
  y = Add(h, c)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(5, 6), c=fusion.rnd(6)), "fuse-matmul-add")
    assert out.stats == {"matched": 1, "rewritten": 0} and "Reshapes" in out.result.skipped[0]
    text = f"""{HDR}
g (float[3,5] x) => (float[2,3,6] y) {{
  h = MatMul(x, w)
  y = Add(h, c)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(5, 6), c=fusion.rnd(2, 3, 6)), "fuse-matmul-add")
    assert out.stats["rewritten"] == 0 and "broadcast" in out.result.skipped[0]
    text = f"""{HDR}
g (float[3,5] x) => (float[3,6] y, float[3,6] h) {{
  h = MatMul(x, w)
  y = Add(h, c)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(5, 6), c=fusion.rnd(6)), "fuse-matmul-add")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]


def test_integer_matmul_refused(fusion):
    import numpy as np

    text = f"""{HDR}
g (int32[3,5] x) => (int32[3,6] y) {{
  h = MatMul(x, w)
  y = Add(h, c)
}}"""
    m = fusion.build(text, w=np.ones((5, 6), np.int32), c=np.ones(6, np.int32))
    out = fusion.run(m, "fuse-matmul-add")
    assert out.stats["rewritten"] == 0 and "not a float" in out.result.skipped[0]
