"""quantize-int8{format=qop}: QOperator output, verified like QDQ (checker, onnxruntime, numerics)."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import pytest

import graphopt
from graphopt.verify import Runner, make_session
from tests.passes.quant.test_int8 import _vals, conv_model, cosine, feeds_for, matmul_model, run_pass


def _both(model, calib, **opts):
    out = {}
    for fmt in ("qdq", "qop"):
        graph, ctx, res, _ = run_pass(model, calib, latency_check=False, format=fmt, **opts)
        out[fmt] = (ctx.to_model(graph), res, graph)
    return out


def test_conv_model_becomes_qlinear_ops_and_matches_qdq():
    model = conv_model()
    calib = feeds_for(model, 8, 1)
    both = _both(model, calib)
    qop, res, graph = both["qop"]
    onnx.checker.check_model(qop, full_check=True)
    ops = collections.Counter(n.op for n in graph.nodes)
    # every unit is one operator: no DequantizeLinear left (the last Gemm has a float output: QGemm without y_scale)
    assert ops == {"QuantizeLinear": 1, "QLinearConv": 2, "QLinearAdd": 1, "QLinearGlobalAveragePool": 1, "Flatten": 1, "QGemm": 1}
    assert res.stats["qop_nodes"] == 6 and res.stats["qop_left_qdq"] == 0
    assert any(o.domain == "com.microsoft" for o in qop.opset_import)
    # the same kernels onnxruntime fuses the QDQ form into, so the same numbers
    feeds = feeds_for(model, 3, 7)
    qdq_all = make_session(both["qdq"][0], "all")
    qop_off, qop_all = make_session(qop, "disable"), make_session(qop, "all")
    ref = Runner(model)
    for f in feeds:
        a = qdq_all.run(None, f)[0]
        b = qop_off.run(None, f)[0]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(qop_all.run(None, f)[0], b, rtol=1e-5, atol=1e-5)
        assert cosine(ref.run(f)["y"], b) > 0.995
    # idempotent: a QOperator model counts as quantized
    _, _, res2, _ = run_pass(qop, calib, latency_check=False, format="qop")
    assert not res2.changed


def test_static_matmul_qlinearmatmul_and_float_output():
    model = matmul_model()
    both = _both(model, feeds_for(model, 8, 1), mode="static")
    qop, _, graph = both["qop"]
    onnx.checker.check_model(qop, full_check=True)
    ops = collections.Counter(n.op for n in graph.nodes)
    assert ops["QLinearMatMul"] == 1 and ops["MatMulIntegerToFloat"] == 1 and ops["MatMul"] == 0
    for f in feeds_for(model, 2, 3):
        a = make_session(both["qdq"][0], "all").run(None, f)[0]
        b = make_session(qop, "disable").run(None, f)[0]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_dynamic_units_are_already_operator_form():
    model = matmul_model()
    graph, ctx, res, _ = run_pass(model, None, latency_check=False, format="qop")  # no calibration: dynamic
    ops = collections.Counter(n.op for n in graph.nodes)
    assert ops["MatMulInteger"] == 2 and ops["DynamicQuantizeLinear"] == 2 and res.stats["qop_nodes"] == 0
    onnx.checker.check_model(ctx.to_model(graph), full_check=True)


def test_relu_kept_when_q_range_does_not_clip_at_zero():
    """A Clip(-1, 1) cannot be dropped into a Q whose range starts below zero: the unit stays QDQ."""
    rng = np.random.default_rng(0)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8,8] x) => (float[1,4,8,8] y) <float[4,4,3,3] w = {W}, float[4,4,3,3] w2 = {W2}, float lo = {-1.0}, float hi = {1.0}> {
        c = Conv <pads = [1,1,1,1]> (x, w)
        r = Clip (c, lo, hi)
        y = Conv <pads = [1,1,1,1]> (r, w2)
    }
    """.replace("{W}", "{" + _vals(rng, (4, 4, 3, 3), 0.3) + "}").replace("{W2}", "{" + _vals(rng, (4, 4, 3, 3), 0.3) + "}")
    model = onnx.parser.parse_model(text)
    graph, ctx, res, _ = run_pass(model, feeds_for(model, 4, 1), latency_check=False, format="qop")
    ops = collections.Counter(n.op for n in graph.nodes)
    assert ops["Clip"] == 1 and ops["QLinearConv"] == 0 and res.stats["qop_left_qdq"] == 2
    out = ctx.to_model(graph)
    onnx.checker.check_model(out, full_check=True)
    f = feeds_for(model, 1, 2)[0]
    assert cosine(Runner(model).run(f)["y"], Runner(out).run(f)["y"]) > 0.99


def test_digits_qop(shared_dir, tmp_path):
    d = np.load(shared_dir / "digits" / "digits_data.npz")
    calib, ev = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, input=d["x_calib"])
    np.savez(ev, input=d["x_test"], labels=d["y_test"])
    out = tmp_path / "cnn.qop.onnx"
    res = graphopt.optimize(str(shared_dir / "digits" / "digits_cnn.onnx"), "O2,quantize-int8{latency-check=false,format=qop}",
                            output=str(out), calibration=str(calib), eval_data=str(ev), max_accuracy_drop=0.002)
    assert res.verification.ok and res.verification.accuracy["accuracy_drop"] <= 0.002 + 1e-9
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 2 and ops["DequantizeLinear"] == 0


@pytest.mark.slow
@pytest.mark.corpus
def test_resnet18_qop(shared_dir):
    from graphopt.data import generate_feeds

    model = onnx.load(str(shared_dir / "corpus" / "resnet18.onnx"))
    res = graphopt.optimize(model, "O2,quantize-int8{latency-check=false,format=qop}", calibration=generate_feeds(model, seed=1, count=4))
    assert res.verification.ok, res.verification.reason
    ops = collections.Counter(n.op_type for n in res.model.graph.node)
    assert ops["QLinearConv"] == 20 and ops["QLinearAdd"] == 8 and ops["Conv"] == 0
    onnx.checker.check_model(res.model, full_check=True)
