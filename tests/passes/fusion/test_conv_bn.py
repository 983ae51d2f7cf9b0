import numpy as np
import pytest

HDR = '<ir_version: 8, opset_import: ["" : 17]>'


def conv_bn_text(extra_out: str = "", conv: str = "Conv", wshape="[8,4,3,3]", group: int = 1, winput: str = "", training: bool = False):
    outs = "float[1,8,6,6] y" + extra_out
    bn_out = "y, rm, rv" if training else "y"
    return f"""{HDR}
g (float[1,4,6,6] x{winput}) => ({outs}) {{
  c = {conv}<pads = [1,1,1,1], group = {group}>(x, w, b)
  {bn_out} = BatchNormalization<epsilon = 0.001{', training_mode = 1' if training else ''}>(c, s, bb, m, v)
}}"""


@pytest.fixture
def bn(fusion):
    def weights(c=8):
        r = fusion.rnd
        return dict(s=r(c, seed=1), bb=r(c, seed=2), m=r(c, seed=3), v=r(c, seed=4, lo=0.1))

    return weights


def test_conv_bn_fuses(fusion, bn):
    m = fusion.build(conv_bn_text(), w=fusion.rnd(8, 4, 3, 3), b=fusion.rnd(8), **bn())
    out = fusion.run(m, "fuse-conv-bn")
    assert out.stats == {"matched": 1, "rewritten": 1}
    assert out.ops == ["Conv"]
    assert [o.name for o in out.model.graph.output] == ["y"]


def test_conv_without_bias(fusion, bn):
    text = conv_bn_text().replace("(x, w, b)", "(x, w)")
    m = fusion.build(text, w=fusion.rnd(8, 4, 3, 3), **bn())
    out = fusion.run(m, "fuse-conv-bn")
    assert out.ops == ["Conv"] and len(out.model.graph.node[0].input) == 3


def test_grouped_conv_transpose(fusion, bn):
    # ConvTranspose W is [C_in, C_out/group, k, k]: 4 in, group 2, 8 out -> [4, 4, 3, 3]
    text = f"""{HDR}
g (float[1,4,5,5] x) => (float[1,8,5,5] y) {{
  c = ConvTranspose<pads = [1,1,1,1], group = 2>(x, w, b)
  y = BatchNormalization<epsilon = 0.001>(c, s, bb, m, v)
}}"""
    m = fusion.build(text, w=fusion.rnd(4, 4, 3, 3), b=fusion.rnd(8), **bn())
    out = fusion.run(m, "fuse-conv-bn")
    assert out.ops == ["ConvTranspose"]


def test_dynamic_batch(fusion, bn):
    text = conv_bn_text().replace("float[1,4,6,6] x", "float[N,4,6,6] x").replace("float[1,8,6,6] y", "float[N,8,6,6] y")
    m = fusion.build(text, w=fusion.rnd(8, 4, 3, 3), b=fusion.rnd(8), **bn())
    feeds = {"x": fusion.rnd(3, 4, 6, 6)}
    out = fusion.run(m, "fuse-conv-bn", feeds=feeds)
    assert out.ops == ["Conv"]


def test_refuses_shared_weight(fusion, bn):
    text = f"""{HDR}
g (float[1,4,6,6] x) => (float[1,8,6,6] y, float[1,8,6,6] z) {{
  c = Conv<pads = [1,1,1,1]>(x, w, b)
  y = BatchNormalization<epsilon = 0.001>(c, s, bb, m, v)
  z = Conv<pads = [1,1,1,1]>(x, w)
}}"""
    m = fusion.build(text, w=fusion.rnd(8, 4, 3, 3), b=fusion.rnd(8), **bn())
    out = fusion.run(m, "fuse-conv-bn")
    assert out.stats == {"matched": 1, "rewritten": 0}
    assert "shared" in out.result.skipped[0]
    assert not out.result.changed


def test_refuses_weight_graph_input(fusion, bn):
    m = fusion.build(conv_bn_text(winput=", float[8,4,3,3] w"), b=fusion.rnd(8), **bn())
    out = fusion.run(m, "fuse-conv-bn")
    assert out.stats["rewritten"] == 0 and "not a constant" in out.result.skipped[0]


def test_refuses_training_mode(fusion, bn):
    text = f"""{HDR}
g (float[1,4,6,6] x) => (float[1,8,6,6] y, float[8] rm, float[8] rv) {{
  c = Conv<pads = [1,1,1,1]>(x, w, b)
  y, rm, rv = BatchNormalization<epsilon = 0.001, training_mode = 1>(c, s, bb, m, v)
}}"""
    m = fusion.build(text, w=fusion.rnd(8, 4, 3, 3), b=fusion.rnd(8), **bn())
    out = fusion.run(m, "fuse-conv-bn", check_numerics=False)
    assert out.stats["rewritten"] == 0 and "training" in out.result.skipped[0]


def test_refuses_intermediate_graph_output(fusion, bn):
    text = conv_bn_text(extra_out=", float[1,8,6,6] c")
    m = fusion.build(text, w=fusion.rnd(8, 4, 3, 3), b=fusion.rnd(8), **bn())
    out = fusion.run(m, "fuse-conv-bn")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]


def test_refuses_intermediate_read_in_subgraph(fusion, bn):
    text = f"""{HDR}
g (float[1,4,6,6] x, bool cond) => (float[1,8,6,6] y, float[1,8,6,6] z) {{
  c = Conv<pads = [1,1,1,1]>(x, w, b)
  y = BatchNormalization<epsilon = 0.001>(c, s, bb, m, v)
  z = If(cond) <then_branch = t () => (float[1,8,6,6] o) {{ o = Relu(c) }},
               else_branch = e () => (float[1,8,6,6] o2) {{ o2 = Neg(c) }}>
}}"""
    m = fusion.build(text, w=fusion.rnd(8, 4, 3, 3), b=fusion.rnd(8), **bn())
    out = fusion.run(m, "fuse-conv-bn", feeds={"x": fusion.rnd(1, 4, 6, 6), "cond": np.array(True)})
    assert out.stats["rewritten"] == 0 and "read by other nodes" in out.result.skipped[0]


def test_refuses_computed_bn_param(fusion, bn):
    # BN mean is computed (not a constant)
    text = f"""{HDR}
g (float[1,4,6,6] x, float[8] m) => (float[1,8,6,6] y) {{
  c = Conv<pads = [1,1,1,1]>(x, w, b)
  y = BatchNormalization<epsilon = 0.001>(c, s, bb, m, v)
}}"""
    w = bn()
    w.pop("m")
    m = fusion.build(text, w=fusion.rnd(8, 4, 3, 3), b=fusion.rnd(8), **w)
    out = fusion.run(m, "fuse-conv-bn")
    assert out.stats["rewritten"] == 0 and "mean is not a constant" in out.result.skipped[0]


def test_float16_model(fusion, bn):
    text = conv_bn_text().replace("float[", "float16[")
    w = {k: v.astype(np.float16) for k, v in bn().items()}
    m = fusion.build(text, w=fusion.rnd(8, 4, 3, 3).astype(np.float16), b=fusion.rnd(8).astype(np.float16), **w)
    out = fusion.run(m, "fuse-conv-bn", rtol=1e-2)
    assert out.ops == ["Conv"]
    assert out.model.graph.initializer[-1].data_type == 10  # stays float16
