"""fuse-qk-scale: the attention score scale folded into the Q (or K) projection."""
from __future__ import annotations

import numpy as np
import onnx


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
SHAPES = "<int64[4] hs = {1,8,2,8}, float sc = {0.125}>"
HEAD = "q4 = Reshape(q, hs)\n qt = Transpose <perm = [0,2,1,3]> (q4)\n k4 = Reshape(k, hs)\n kt = Transpose <perm = [0,2,3,1]> (k4)\n"
TAIL = "s = MatMul(qt, kt)\n ss = Mul(s, sc)\n y = Softmax <axis = -1> (ss)"


def w(seed, *shape):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.5).astype(np.float32)


def bert_like(consts=SHAPES, extra_out="", tail=TAIL, **over):
    body = "mq = MatMul(x, wq)\n q = Add(mq, bq)\n mk = MatMul(x, wk)\n k = Add(mk, bk)\n" + HEAD + tail
    text = f"{HEADER}\ng (float[1,8,16] x) => (float[1,2,8,8] y{extra_out}) {consts} {{{body}}}"
    ws = dict(wq=w(1, 16, 16), bq=w(2, 16), wk=w(3, 16, 16), bk=w(4, 16))
    ws.update(over)
    m = onnx.parser.parse_model(text)
    for k, v in ws.items():
        m.graph.initializer.append(onnx.numpy_helper.from_array(v, k))
    onnx.checker.check_model(m, full_check=True)
    return m


def feeds():
    return {"x": w(9, 1, 8, 16)}


def test_scale_goes_into_the_query_weights_bit_exact(fusion):
    m = bert_like()
    out = fusion.run(m, "fuse-qk-scale", feeds=feeds(), rtol=1e-7)
    assert out.stats == {"matched": 1, "rewritten": 1}
    assert "Mul" not in out.ops
    wq = {i.name: onnx.numpy_helper.to_array(i) for i in out.model.graph.initializer}
    assert any(np.array_equal(v, w(1, 16, 16) * np.float32(0.125)) for v in wq.values())


def test_division_and_other_scale(fusion):
    tail = TAIL.replace("Mul(s, sc)", "Div(s, d)")
    out = fusion.run(bert_like(consts=SHAPES[:-1] + ", float d = {3.0}>", tail=tail), "fuse-qk-scale", feeds=feeds())
    assert out.stats["rewritten"] == 1 and "Div" not in out.ops


def test_packed_qkv_gemm_detour_scales_only_the_q_columns(fusion):
    body = ("x2 = Reshape(x, s2)\n g = Gemm(x2, w, b)\n p = Reshape(g, s3)\n q, k, v = Split <axis = -1> (p, sp)\n" + HEAD
            + TAIL.replace("y = Softmax <axis = -1> (ss)", "pr = Softmax <axis = -1> (ss)\n v4 = Reshape(v, hs)\n"
                           " vt = Transpose <perm = [0,2,1,3]> (v4)\n y = MatMul(pr, vt)"))
    consts = SHAPES[:-1] + ", int64[2] s2 = {8,16}, int64[3] s3 = {1,8,48}, int64[3] sp = {16,16,16}>"
    text = f"{HEADER}\ng (float[1,8,16] x) => (float[1,2,8,8] y) {consts} {{{body}}}"
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend([onnx.numpy_helper.from_array(w(5, 16, 48), "w"), onnx.numpy_helper.from_array(w(6, 48), "b")])
    out = fusion.run(m, "fuse-qk-scale", feeds=feeds(), rtol=1e-7)
    assert out.stats["rewritten"] == 1 and "Mul" not in out.ops
    new_w = next(onnx.numpy_helper.to_array(i) for i in out.model.graph.initializer if i.dims == [16, 48])
    np.testing.assert_array_equal(new_w[:, 16:], w(5, 16, 48)[:, 16:])


def test_falls_back_to_k_when_q_is_read_elsewhere(fusion):
    out = fusion.run(bert_like(extra_out=", float[1,8,16] q"), "fuse-qk-scale", feeds=feeds())
    assert out.stats["rewritten"] == 1 and "Mul" not in out.ops


def test_refusals():
    # both projections read elsewhere: nothing private to scale
    m = bert_like(extra_out=", float[1,8,16] q, float[1,2,8,8] kt")
    _, r = run_pass_plain(m)
    assert r.stats == {"matched": 1, "rewritten": 0}
    assert "Q: " in r.skipped[0] and "K: " in r.skipped[0]
    # Q and K share one weight: scaling it would scale both
    m = _shared_weight_model()
    _, r = run_pass_plain(m)
    assert r.stats["rewritten"] == 0 and "shared" in r.skipped[0]
    # the weight is a graph input
    m = _weight_input_model()
    _, r = run_pass_plain(m)
    assert r.stats["rewritten"] == 0 and "constant" in r.skipped[0]
    # the scores are read besides the scale
    _, r = run_pass_plain(bert_like(extra_out=", float[1,2,8,8] s"))
    assert r.stats["rewritten"] == 0 and "read by other nodes" in r.skipped[0]


def run_pass_plain(m):
    from tests.passes.fusion._ort_testlib import run_pass as rp

    return rp(m, "fuse-qk-scale")


def _shared_weight_model():
    body = "mq = MatMul(x, wq)\n q = Add(mq, bq)\n mk = MatMul(x, wq)\n k = Add(mk, bk)\n" + HEAD + TAIL
    text = f"{HEADER}\ng (float[1,8,16] x) => (float[1,2,8,8] y) {SHAPES} {{{body}}}"
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend([onnx.numpy_helper.from_array(w(1, 16, 16), "wq"), onnx.numpy_helper.from_array(w(2, 16), "bq"),
                                onnx.numpy_helper.from_array(w(4, 16), "bk")])
    return m


def _weight_input_model():
    body = "mq = MatMul(x, wq)\n q = Add(mq, bq)\n mk = MatMul(x, wk)\n k = Add(mk, bk)\n" + HEAD + TAIL
    text = f"{HEADER}\ng (float[1,8,16] x, float[16,16] wq, float[16,16] wk) => (float[1,2,8,8] y) {SHAPES} {{{body}}}"
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend([onnx.numpy_helper.from_array(w(2, 16), "bq"), onnx.numpy_helper.from_array(w(4, 16), "bk")])
    return m
