HDR = '<ir_version: 8, opset_import: ["" : 17]>'


def test_constant_weight_transpose_2d_becomes_gemm_transb(fusion):
    text = f"""{HDR}
g (float[3,5] x) => (float[3,6] y) {{
  wt = Transpose<perm = [1,0]>(w)
  y = MatMul(x, wt)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(6, 5)), "fuse-transpose-matmul")
    assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["Gemm"]
    attrs = {a.name: a.i for a in out.model.graph.node[0].attribute}
    assert attrs == {"transB": 1}


def test_3d_activation_folds_weight(fusion):
    text = f"""{HDR}
g (float[2,3,5] x) => (float[2,3,6] y) {{
  wt = Transpose<perm = [1,0]>(w)
  y = MatMul(x, wt)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(6, 5)), "fuse-transpose-matmul")
    assert out.ops == ["MatMul"] and list(out.model.graph.initializer[0].dims) == [5, 6]


def test_gemm_toggles_transa(fusion):
    text = f"""{HDR}
g (float[5,3] x) => (float[3,6] y) {{
  xt = Transpose<perm = [1,0]>(x)
  y = Gemm<transB = 1>(xt, w, c)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(6, 5), c=fusion.rnd(6)), "fuse-transpose-matmul")
    assert out.ops == ["Gemm"]
    assert {a.name: a.i for a in out.model.graph.node[0].attribute if a.name.startswith("trans")} == {"transA": 1, "transB": 1}


def test_refusals(fusion):
    text = f"""{HDR}
g (float[2,4,3,5] x, float[2,4,6,5] k) => (float[2,4,3,6] y) {{
  kt = Transpose<perm = [0,1,3,2]>(k)
  y = MatMul(x, kt)
}}"""
    out = fusion.run(fusion.build(text), "fuse-transpose-matmul")
    assert out.stats == {"matched": 1, "rewritten": 0} and "not a constant weight" in out.result.skipped[0]
    text = f"""{HDR}
g (float[3,5] x) => (float[3,6] y, float[5,6] wt) {{
  wt = Transpose<perm = [1,0]>(w)
  y = MatMul(x, wt)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(6, 5)), "fuse-transpose-matmul")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]
    text = f"""{HDR}
g (float[2,3,5] x) => (float[2,3,6] y, float[6,5] z) {{
  wt = Transpose<perm = [1,0]>(w)
  y = MatMul(x, wt)
  z = Neg(w)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(6, 5)), "fuse-transpose-matmul")
    assert out.stats["rewritten"] == 0 and "shared" in out.result.skipped[0]
