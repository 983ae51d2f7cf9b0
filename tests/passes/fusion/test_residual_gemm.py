"""fuse-residual-gemm: post-LN residual bias moved into the LayerNorm beta, bias + residual Adds -> one Gemm."""
from __future__ import annotations

import numpy as np

from tests.passes.fusion._ort_testlib import assert_same, build, full_check, ops, run_pass, weights

HEADER = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'
W = weights(0, w1=(16, 32), b1=(32,), w2=(32, 16), b2=(16,), g=(16,), beta=(16,), g2=(16,), beta2=(16,))
FFN = ("r = LayerNormalization <axis = -1> (h, g, beta)\n m1 = MatMul(r, w1)\n a1 = Add(m1, b1)\n u = Relu(a1)\n"
       " m2 = MatMul(u, w2)\n a2 = Add(b2, m2)\n z = Add(a2, r)\n y = LayerNormalization <axis = -1> (z, g2, beta2)")


def model(body=FFN, outs="float[1,8,16] y", vi="", **extra):
    return build(f"{HEADER}\ng (float[1,8,16] h) => ({outs}) {vi} {{{body}}}", **{**W, **extra})


def feeds():
    return {"h": (np.random.default_rng(1).standard_normal((1, 8, 16)) * 2).astype(np.float32)}


def test_ffn_block_bias_and_residual_become_one_gemm():
    m = model()
    m2, r = run_pass(m, "fuse-residual-gemm")
    assert r.stats == {"matched": 1, "rewritten": 1}
    o = ops(m2)
    assert o["Gemm"] == 1 and o["Add"] == 1 and o["MatMul"] == 1  # the Add left is FFN1's bias, compensated
    full_check(m2)
    assert_same(m, m2, feeds(), rtol=1e-5, atol=1e-5)
    assert not run_pass(m2, "fuse-residual-gemm")[1].changed


def test_biasgelu_reader_is_compensated():
    body = FFN.replace("a1 = Add(m1, b1)\n u = Relu(a1)", "u = com.microsoft.BiasGelu(m1, b1)")
    m = model(body, vi="<float[1,8,32] u>")  # shape inference does not type contrib ops
    m2, r = run_pass(m, "fuse-residual-gemm")
    assert r.stats["rewritten"] == 1 and "Add" not in ops(m2)
    assert_same(m, m2, feeds(), rtol=1e-5, atol=1e-5)


def test_refusals():
    # pre-LN: the residual is the stream itself, not a LayerNorm output
    body = FFN.replace("r = LayerNormalization <axis = -1> (h, g, beta)", "r = Relu(h)")
    _, r = run_pass(model(body), "fuse-residual-gemm")
    assert r.stats == {"matched": 1, "rewritten": 0} and "not from a LayerNormalization" in r.skipped[0]
    # the residual is a graph output
    _, r = run_pass(model(outs="float[1,8,16] y, float[1,8,16] r"), "fuse-residual-gemm")
    assert r.stats["rewritten"] == 0 and "graph output" in r.skipped[0]
    # a reader that cannot absorb the moved bias
    body = FFN.replace("y = LayerNormalization <axis = -1> (z, g2, beta2)", "y0 = LayerNormalization <axis = -1> (z, g2, beta2)\n"
                       " q = Sigmoid(r)\n y = Add(y0, q)")
    _, r = run_pass(model(body), "fuse-residual-gemm")
    assert r.stats["rewritten"] == 0 and "Sigmoid" in r.skipped[0]
    # beta shared with the second LayerNorm
    body = FFN.replace("(z, g2, beta2)", "(z, g2, beta)")
    _, r = run_pass(model(body), "fuse-residual-gemm")
    assert r.stats["rewritten"] == 0 and "beta is shared" in r.skipped[0]
    # the block's own input is the residual: z = (r @ W + b) + r
    body = ("r = LayerNormalization <axis = -1> (h, g, beta)\n m2 = MatMul(r, wsq)\n a2 = Add(m2, b2)\n z = Add(a2, r)\n"
            " y = LayerNormalization <axis = -1> (z, g2, beta2)")
    _, r = run_pass(model(body, wsq=weights(3, wsq=(16, 16))["wsq"]), "fuse-residual-gemm")
    assert r.stats["rewritten"] == 0 and "its own residual" in r.skipped[0]
    # the projection weight is a graph input: not matched (no constant weight)
    m = build(f"{HEADER}\ng (float[1,8,16] h, float[32,16] w2) => (float[1,8,16] y) {{{FFN}}}",
              **{k: v for k, v in W.items() if k != "w2"})
    _, r = run_pass(m, "fuse-residual-gemm")
    assert r.stats["matched"] == 0
