HDR = '<ir_version: 8, opset_import: ["" : 17]>'


def text(ops: str, out_extra: str = "") -> str:
    return f"""{HDR}
g (float[1,3,5,5] x) => (float[1,4,5,5] y{out_extra}) {{
  c = Conv<pads = [1,1,1,1]>(x, w, b)
  {ops}
}}"""


def test_mul_then_add_fold(fusion):
    r = fusion.rnd
    m = fusion.build(text("t = Mul(c, k)\n  y = Add(a, t)"), w=r(4, 3, 3, 3), b=r(4), k=r(4, 1, 1, seed=5), a=r(1, 4, 1, 1, seed=6))
    out = fusion.run(m, "fuse-conv-scale")
    assert out.stats == {"matched": 2, "rewritten": 2}  # the chain folds in one run
    assert out.ops == ["Conv"]


def test_div_and_sub_and_scalar(fusion):
    r = fusion.rnd
    m = fusion.build(text("y = Div(c, k)").replace("(x, w, b)", "(x, w)"), w=r(4, 3, 3, 3), k=r(1, seed=3, lo=0.5))
    assert fusion.run(m, "fuse-conv-scale").ops == ["Conv"]
    m = fusion.build(text("y = Sub(c, k)"), w=r(4, 3, 3, 3), b=r(4), k=r(4, 1, 1))
    assert fusion.run(m, "fuse-conv-scale").ops == ["Conv"]


def test_refuses_non_channel_constant_and_reversed_sub(fusion):
    r = fusion.rnd
    m = fusion.build(text("y = Mul(c, k)"), w=r(4, 3, 3, 3), b=r(4), k=r(1, 4, 5, 1))
    out = fusion.run(m, "fuse-conv-scale")
    assert out.stats["rewritten"] == 0 and "not per output channel" in out.result.skipped[0]
    m = fusion.build(text("y = Sub(k, c)"), w=r(4, 3, 3, 3), b=r(4), k=r(4, 1, 1))
    assert fusion.run(m, "fuse-conv-scale").stats["matched"] == 0


def test_refuses_intermediate_graph_output(fusion):
    r = fusion.rnd
    text2 = f"""{HDR}
g (float[1,3,5,5] x) => (float[1,4,5,5] y, float[1,4,5,5] c) {{
  c = Conv<pads = [1,1,1,1]>(x, w, b)
  y = Mul(c, k)
}}"""
    out = fusion.run(fusion.build(text2, w=r(4, 3, 3, 3), b=r(4), k=r(4, 1, 1)), "fuse-conv-scale")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]
