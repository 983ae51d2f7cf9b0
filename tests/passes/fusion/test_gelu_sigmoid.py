import numpy as np

from tests.passes.fusion.test_gelu import ERF, TANH, gelu_model


def test_tanh_form_becomes_sigmoid_form_at_opset_17(fusion):
    x = (np.random.default_rng(1).standard_normal((2, 16)) * 4).astype(np.float32)  # the tails matter too
    out = fusion.run(gelu_model(fusion, TANH, opset=17), "fuse-gelu-sigmoid", feeds={"x": x})
    assert out.stats == {"matched": 1, "rewritten": 1}
    assert sorted(out.ops) == ["Add", "Mul", "Mul", "Mul", "Mul", "Sigmoid"]


def test_cube_as_products(fusion):
    body = TANH.replace("c = Pow(x, three)", "c0 = Mul(x, x)\n  c = Mul(c0, x)")
    out = fusion.run(gelu_model(fusion, body, opset=17), "fuse-gelu-sigmoid")
    assert out.stats["rewritten"] == 1 and "Tanh" not in out.ops


def test_refusals(fusion):
    # the opset has Gelu: fuse-gelu's business
    out = fusion.run(gelu_model(fusion, TANH, opset=20), "fuse-gelu-sigmoid")
    assert out.stats == {"matched": 1, "rewritten": 0} and "has Gelu" in out.result.skipped[0]
    # an intermediate is a graph output
    out = fusion.run(gelu_model(fusion, TANH, opset=17, extra_out=", float[2,16] th"), "fuse-gelu-sigmoid")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]
    # the erf form is not this pass's
    out = fusion.run(gelu_model(fusion, ERF, opset=17), "fuse-gelu-sigmoid")
    assert out.stats["matched"] == 0
    # a wrong constant: not a GELU
    out = fusion.run(gelu_model(fusion, TANH.replace("Mul(c, k)", "Mul(c, half)"), opset=17), "fuse-gelu-sigmoid")
    assert out.stats["matched"] == 0
