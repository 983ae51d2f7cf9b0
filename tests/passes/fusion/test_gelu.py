import math

import numpy as np

ERF = """
  a = Div(x, sq2)
  e = Erf(a)
  t = Add(e, one)
  u = Mul(x, t)
  y = Mul(u, half)"""

TANH = """
  h = Mul(x, half)
  c = Pow(x, three)
  c2 = Mul(c, k)
  s = Add(x, c2)
  s2 = Mul(s, r)
  th = Tanh(s2)
  t = Add(th, one)
  y = Mul(h, t)"""


def gelu_model(fusion, body, opset=20, extra_out=""):
    text = f"""<ir_version: 9, opset_import: ["" : {opset}]>
g (float[2,16] x) => (float[2,16] y{extra_out}) {{{body}
}}"""
    w = dict(sq2=np.array(math.sqrt(2), np.float32), one=np.array(1.0, np.float32), half=np.array(0.5, np.float32),
             three=np.array(3.0, np.float32), k=np.array(0.044715, np.float32), r=np.array(math.sqrt(2 / math.pi), np.float32))
    used = {k: v for k, v in w.items() if k in body}
    return fusion.build(text, **used)


def test_erf_and_tanh_forms(fusion):
    out = fusion.run(gelu_model(fusion, ERF), "fuse-gelu")
    assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["Gelu"]
    out = fusion.run(gelu_model(fusion, TANH), "fuse-gelu")
    assert out.ops == ["Gelu"]
    assert out.model.graph.node[0].attribute[0].s == b"tanh"


def test_refused_before_opset_20(fusion):
    out = fusion.run(gelu_model(fusion, ERF, opset=17), "fuse-gelu")
    assert out.stats == {"matched": 1, "rewritten": 0} and "Gelu needs opset 20" in out.result.skipped[0]


def test_refuses_leaked_intermediate_and_wrong_constant(fusion):
    out = fusion.run(gelu_model(fusion, ERF, extra_out=", float[2,16] t"), "fuse-gelu")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]
    out = fusion.run(gelu_model(fusion, ERF.replace("Mul(u, half)", "Mul(u, one)")), "fuse-gelu")
    assert out.stats["matched"] == 0
