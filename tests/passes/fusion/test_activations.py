"""fuse-hardsigmoid, fuse-hardswish, fuse-silu."""
import numpy as np

C = dict(three=np.array(3.0, np.float32), zero=np.array(0.0, np.float32), six=np.array(6.0, np.float32),
         onef=np.array(1.0, np.float32), a=np.array(0.2, np.float32), b=np.array(0.5, np.float32))


def model(fusion, body, opset=17, extra_out=""):
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
g (float[2,8] x) => (float[2,8] y{extra_out}) {{{body}
}}"""
    return fusion.build(text, **{k: v for k, v in C.items() if k in body})


RELU6_DIV = """
  p = Add(x, three)
  c = Clip(p, zero, six)
  y = Div(c, six)"""
LINEAR_CLIP = """
  m = Mul(x, a)
  p = Add(m, b)
  y = Clip(p, zero, onef)"""
HSWISH_TORCH = """
  p = Add(x, three)
  c = Clip(p, zero, six)
  m = Mul(x, c)
  y = Div(m, six)"""
HSWISH_OF_HSIG = """
  p = Add(x, three)
  c = Clip(p, zero, six)
  h = Div(c, six)
  y = Mul(x, h)"""
SILU = """
  s = Sigmoid(x)
  y = Mul(s, x)"""


def test_hardsigmoid(fusion):
    out = fusion.run(model(fusion, RELU6_DIV), "fuse-hardsigmoid")
    assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["HardSigmoid"]
    out = fusion.run(model(fusion, LINEAR_CLIP), "fuse-hardsigmoid")
    assert out.ops == ["HardSigmoid"]
    out = fusion.run(model(fusion, RELU6_DIV, extra_out=", float[2,8] c"), "fuse-hardsigmoid")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]


def test_hardswish(fusion):
    for body in (HSWISH_TORCH, HSWISH_OF_HSIG):
        out = fusion.run(model(fusion, body), "fuse-hardswish")
        assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["HardSwish"], body
    out = fusion.run(model(fusion, HSWISH_TORCH, opset=13), "fuse-hardswish")
    assert out.stats["rewritten"] == 0 and "HardSwish needs opset 14" in out.result.skipped[0]
    # x * hardsigmoid(x) with the default alpha 0.2 is not a HardSwish
    out = fusion.run(model(fusion, LINEAR_CLIP.replace("y = Clip", "h = Clip") + "\n  y = Mul(x, h)"), "fuse-hardswish")
    assert out.stats["matched"] == 0


def test_silu(fusion):
    out = fusion.run(model(fusion, SILU, opset=24), "fuse-silu")
    assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["Swish"]
    out = fusion.run(model(fusion, SILU, opset=17), "fuse-silu")
    assert out.stats == {"matched": 1, "rewritten": 0} and "Swish needs opset 24" in out.result.skipped[0]
    out = fusion.run(model(fusion, SILU, opset=24, extra_out=", float[2,8] s"), "fuse-silu")
    assert out.stats["rewritten"] == 0
