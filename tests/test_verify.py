"""Verification: metrics, the exact tolerance rule, shapes/dtypes, fallback and not-verified."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.pass_base import Budget
from graphopt.verify import Runner, compare_arrays, verify_models
from tests.helpers import parse

RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 10] x) => (float[N, 10] y) { y = Relu(x) }
"""


def test_exact_rule_scales_with_magnitude():
    ref = np.array([[1000.0, -2000.0, 5.0]], np.float32)
    ok = compare_arrays("y", ref, ref + np.float32(0.1))  # 1e-4 * 2000 = 0.2
    assert ok.ok and ok.tolerance == pytest.approx(0.2)
    bad = compare_arrays("y", ref, ref + np.float32(0.5))
    assert not bad.ok and "tolerance" in bad.reason


def test_shape_dtype_nan_and_ints():
    a = np.zeros((2, 3), np.float32)
    assert "shape" in compare_arrays("y", a, a.reshape(3, 2)).reason
    assert "dtype" in compare_arrays("y", a, a.astype(np.float64)).reason
    n = a.copy()
    n[0, 0] = np.nan
    assert "NaN" in compare_arrays("y", a, n).reason
    assert compare_arrays("y", n, n.copy()).ok
    i = np.arange(6).reshape(2, 3)
    assert compare_arrays("y", i, i.copy()).ok
    j = i.copy()
    j[1, 1] += 1
    assert "1 of 6 values differ" in compare_arrays("y", i, j).reason
    s = np.array(["a", "b"], dtype=object)
    assert compare_arrays("y", s, s.copy()).ok


def test_metrics():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 10)).astype(np.float32)
    got = ref + 0.01 * rng.standard_normal((8, 10)).astype(np.float32)
    m = compare_arrays("y", ref, got, exact=False)
    assert 0.99 < m.cosine < 1.0
    assert 0 < m.rel_l2 < 0.05
    assert m.top1_agreement is not None and m.top1_agreement >= 0.75


def test_verify_models_passes_and_fails():
    m = parse(RELU)
    v = verify_models(m, m)
    assert v.ok and v.samples == 1 and v.outputs[0].max_abs == 0
    other = parse(RELU.replace("Relu", "Neg"))
    v = verify_models(m, other)
    assert v.status == "failed" and "output 'y'" in v.reason


def test_changed_output_shape_fails_even_if_values_match():
    a = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }""")
    b = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[6] y) { r = Relu(x)  s = Constant<value = int64[1] {6}>()  y = Reshape(r, s) }""")
    v = verify_models(a, b)
    assert v.status == "failed" and "shape" in v.reason


def test_lossy_budget():
    m = parse(RELU)
    scaled = parse(RELU.replace("y = Relu(x)", "r = Relu(x)  c = Constant<value = float {1.01}>()  y = Mul(r, c)"))
    assert verify_models(m, scaled).status == "failed"  # exact: 1% is far too much
    assert verify_models(m, scaled, exact=False).ok  # default lossy budget: same top-1, cosine
    assert verify_models(m, scaled, exact=False, budget=Budget(min_cosine=0.999)).ok


def test_reference_fallback_and_not_verified():
    # onnxruntime has no kernel for this custom op; the reference evaluator cannot run it either
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
    g (float[2] x) => (float[2] y) { y = my.ops.Unknown(x) }""")
    v = verify_models(m, m)
    assert v.status == "not-verified" and "cannot be run" in v.reason


def test_runner_intermediate_outputs():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) { t = Neg(x)  y = Relu(t) }""")
    r = Runner(m, extra_outputs=["t"])
    out = r.run({"x": np.array([1.0, -2.0], np.float32)})
    np.testing.assert_array_equal(out["t"], [-1.0, 2.0])
    np.testing.assert_array_equal(out["y"], [0.0, 2.0])


def test_optimized_model_that_only_the_reference_evaluator_runs_fails():
    """onnxruntime runs the original; if only onnx.reference runs the result (an op/type without an
    onnxruntime kernel: Pow with a uint32 exponent in 1.32), that is a regression even when the values agree."""
    a = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) { c = Constant<value = float {2.0}>()  y = Pow(x, c) }""")
    b = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) { c = Constant<value = uint32 {2}>()  y = Pow(x, c) }""")
    try:
        Runner(b, allow_reference=False).run({"x": np.ones((2, 3), np.float32)})
        pytest.skip("this onnxruntime runs Pow with a uint32 exponent")
    except Exception:
        pass
    v = verify_models(a, b)
    assert v.status == "failed" and "onnxruntime runs the original but not the optimized model" in v.reason


def test_verify_runs_the_bytes_it_is_given():
    """original_bytes / optimized_bytes are what onnxruntime runs (the api hands over the input
    file's bytes and the output's): bytes of another model decide the result."""
    relu = parse(RELU)
    neg = parse(RELU.replace("Relu", "Neg"))
    assert verify_models(relu, relu).status == "passed"
    assert verify_models(relu, relu, original_bytes=neg.SerializeToString()).status == "failed"
    assert verify_models(relu, relu, optimized_bytes=neg.SerializeToString()).status == "failed"
    assert verify_models(relu, relu, original_bytes=relu.SerializeToString(),
                         optimized_bytes=relu.SerializeToString()).status == "passed"


def test_optimize_verifies_against_the_file_as_read(tmp_path, fixtures_dir):
    import graphopt

    res = graphopt.optimize(fixtures_dir / "tiny_cnn.onnx", "O1", output=tmp_path / "o.onnx")
    assert res.verification.status == "passed"
    written = onnx.load(tmp_path / "o.onnx")
    assert written.SerializeToString() == res.model.SerializeToString()  # (the file's fields may come in another order)


def test_the_file_put_in_place_is_the_file_onnxruntime_ran(tmp_path, fixtures_dir, monkeypatch):
    """Verified and written: the output goes to a temporary file first, onnxruntime runs the input file
    and that one, and it is renamed into place only once verified; a failed verification leaves
    neither it nor anything else behind."""
    import importlib

    import graphopt

    verify = importlib.import_module("graphopt.verify")
    loaded: list[object] = []
    make = verify.make_session

    def spy(model, *a, **k):
        loaded.append(model if not isinstance(model, str) else ("file", model, Path(model).read_bytes()))
        return make(model, *a, **k)

    monkeypatch.setattr(verify, "make_session", spy)
    src = fixtures_dir / "tiny_cnn.onnx"
    out = tmp_path / "o.onnx"
    res = graphopt.optimize(src, "O2", output=out)
    assert res.verification.status == "passed"
    files = {path: data for kind, path, data in (x for x in loaded if isinstance(x, tuple))}
    assert set(files) == {str(src), next(p for p in files if p != str(src))}  # both models ran from files
    staged = next(p for p in files if p != str(src))
    assert os.path.dirname(staged) == str(tmp_path) and os.path.basename(staged).startswith(".o.onnx.")
    assert files[staged] == out.read_bytes() and not os.path.exists(staged)
    assert os.listdir(tmp_path) == ["o.onnx"]

    # a verification that fails: nothing is written, the temporary file is gone
    real = verify.compare_outputs

    def wrong(ref, got, **k):
        return real(ref, {n: v + 1 for n, v in got.items()}, **k)

    monkeypatch.setattr(verify, "compare_outputs", wrong)
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(graphopt.VerificationError):
        graphopt.optimize(src, "O2", output=bad / "o.onnx", repro_dir=tmp_path / "repro")
    assert os.listdir(bad) == []
    # the reproducer holds the input model, whole
    assert onnx.load(tmp_path / "repro" / "model.onnx").SerializeToString() == onnx.load(src).SerializeToString()


@pytest.mark.parametrize("parallel", [True, False])
def test_the_two_models_load_and_run_side_by_side_on_two_cores(monkeypatch, parallel):
    """With two cores the original's side runs in a worker thread while the optimized one runs here;
    the result is the same either way, and so is which failure wins (the original's)."""
    import importlib
    import threading

    verify = importlib.import_module("graphopt.verify")  # (graphopt.verify the attribute is the api function)
    monkeypatch.setattr(verify, "cores", lambda: 2)
    threads: dict[str, set[str]] = {}
    run = Runner.run

    def spy(self, feeds, outputs=None):
        threads.setdefault(self.model.graph.node[0].op_type, set()).add(threading.current_thread().name)
        return run(self, feeds, outputs)

    monkeypatch.setattr(Runner, "run", spy)
    relu, neg = parse(RELU), parse(RELU.replace("Relu", "Neg"))
    feeds = [{"x": np.random.default_rng(i).standard_normal((3, 10)).astype(np.float32)} for i in range(3)]
    v = verify_models(relu, relu, feeds, parallel=parallel)
    assert v.ok and v.samples == 3 and v.outputs[0].max_abs == 0
    bad = verify_models(relu, neg, feeds, parallel=parallel)
    assert bad.status == "failed" and "output 'y'" in bad.reason
    main = threading.current_thread().name
    assert threads["Neg"] == {main}  # the optimized side: always here
    if parallel:
        assert len(threads["Relu"]) == 2 and any(t.startswith("graphopt-verify") for t in threads["Relu"])
    else:
        assert threads["Relu"] == {main}
    unknown = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
    g (float[N, 10] x) => (float[N, 10] y) { y = my.ops.Unknown(x) }""")
    v = verify_models(unknown, unknown, feeds, parallel=parallel)  # neither runs: the original's failure decides
    assert v.status == "not-verified" and "original model cannot be run" in v.reason
    v = verify_models(relu, unknown, feeds, parallel=parallel)
    assert v.status == "failed" and "optimized model cannot be run" in v.reason
