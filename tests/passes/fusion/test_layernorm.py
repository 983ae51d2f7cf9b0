import numpy as np


def ln_text(opset=17, sq="p = Pow(d, two)", axes_attr=True, extra_out="", affine=True, xshape="2,5,8"):
    if opset >= 18:
        rm1, rm2 = "m = ReduceMean(x, ax)", "vv = ReduceMean(p, ax)"
    else:
        rm1, rm2 = "m = ReduceMean<axes = [-1]>(x)", "vv = ReduceMean<axes = [-1]>(p)"
    tail = "n = Div(d, s)\n  t = Mul(n, gamma)\n  y = Add(t, beta)" if affine else "y = Div(d, s)"
    return f"""<ir_version: 8, opset_import: ["" : {opset}]>
g (float[{xshape}] x) => (float[{xshape}] y{extra_out}) {{
  {rm1}
  d = Sub(x, m)
  {sq}
  {rm2}
  e = Add(vv, eps)
  s = Sqrt(e)
  {tail}
}}"""


def weights(fusion, opset=17, gshape=(8,)):
    w = dict(two=np.array(2.0, np.float32), eps=np.array(1e-5, np.float32),
             gamma=fusion.rnd(*gshape, seed=1), beta=fusion.rnd(*gshape, seed=2))
    if opset >= 18:
        w["ax"] = np.array([-1], np.int64)
    return w


def test_fuses_opset17_and_18(fusion):
    for opset in (17, 18):
        out = fusion.run(fusion.build(ln_text(opset), **weights(fusion, opset)), "fuse-layernorm")
        assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["LayerNormalization"]


def test_mul_square_no_affine_and_broadcast_gamma(fusion):
    w = weights(fusion)
    w.pop("gamma"), w.pop("beta"), w.pop("two")
    out = fusion.run(fusion.build(ln_text(sq="p = Mul(d, d)", affine=False), **w), "fuse-layernorm")
    assert out.ops == ["LayerNormalization"]
    out = fusion.run(fusion.build(ln_text(), **weights(fusion, gshape=(1, 1, 8))), "fuse-layernorm")
    assert out.ops == ["LayerNormalization"]


def test_refuses_old_opset_and_leaks_and_wrong_axes(fusion):
    w = weights(fusion)
    out = fusion.run(fusion.build(ln_text(opset=16), **w), "fuse-layernorm")
    assert out.stats == {"matched": 1, "rewritten": 0} and "opset 17" in out.result.skipped[0]
    out = fusion.run(fusion.build(ln_text(extra_out=", float[2,5,1] vv"), **w), "fuse-layernorm")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]
    text = ln_text().replace("ReduceMean<axes = [-1]>(x)", "ReduceMean<axes = [1]>(x)").replace("ReduceMean<axes = [-1]>(p)", "ReduceMean<axes = [1]>(p)")
    out = fusion.run(fusion.build(text, **w), "fuse-layernorm")
    assert out.stats["rewritten"] == 0 and "trailing" in out.result.skipped[0]
    out = fusion.run(fusion.build(ln_text(), **weights(fusion, gshape=(5, 1))), "fuse-layernorm")
    assert out.stats["rewritten"] == 0  # gamma varies along a non-normalized axis: matched without it, refused


def test_reciprocal_variant(fusion):
    text = ln_text().replace("n = Div(d, s)", "rs = Reciprocal(s)\n  n = Mul(rs, d)")
    out = fusion.run(fusion.build(text, **weights(fusion)), "fuse-layernorm")
    assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["LayerNormalization"]
