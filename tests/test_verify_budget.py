"""The default budget of lossy passes (graphopt.verify.verify_models without a user budget)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper as h, numpy_helper as nh, TensorProto as T

from graphopt.pass_base import Budget
from graphopt.verify import verify_models


def _linear(w: np.ndarray) -> onnx.ModelProto:
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 10])], [nh.from_array(w, "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def _pair(noise: float, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 10)).astype(np.float32)
    w2 = (w + noise * rng.standard_normal(w.shape)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((rows, 8)).astype(np.float32)}]
    return _linear(w), _linear(w2), feeds


def test_default_budget_ignores_top1_on_few_rows_but_holds_cosine():
    a, b, feeds = _pair(0.05, 4)
    v = verify_models(a, b, feeds, exact=False)
    assert v.ok, v.reason  # cosine ~0.999; a top-1 flip among 4 rows alone does not fail
    a, b, feeds = _pair(1.0, 4)
    v = verify_models(a, b, feeds, exact=False)
    assert not v.ok and "cosine" in v.reason


def test_default_budget_counts_top1_over_many_rows():
    a, b, feeds = _pair(0.3, 400)
    v = verify_models(a, b, feeds, exact=False)
    top1 = v.outputs[0].top1_agreement
    assert top1 is not None and top1 < 0.99
    assert not v.ok and "top-1 agreement" in v.reason


def test_user_budget_is_used_as_given():
    a, b, feeds = _pair(0.05, 4)
    v = verify_models(a, b, feeds, exact=False, budget=Budget(min_top1_agreement=1.0))
    assert v.ok == (v.outputs[0].top1_agreement == 1.0)
