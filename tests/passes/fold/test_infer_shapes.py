"""infer-shapes: symbolic dims kept, the model's signature untouched, --input-shape honoured."""
from __future__ import annotations

import numpy as np
import pytest
import onnx

from graphopt.testing import PassRunner

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


@pytest.fixture
def passes() -> PassRunner:
    return PassRunner()

MODEL = HEAD + """
g (float[N,3] x) => (float y) {
  r = Relu(x)
  t = Transpose(r)
  y = ReduceSum<keepdims=0>(t)
}"""


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_symbolic_dims_stay_and_the_signature_is_untouched(passes):
    m = passes.parse(MODEL)
    out = passes.run(m, "infer-shapes")
    assert out.changed and out.stats["tensors_updated"] >= 2
    vi = {v.name: v for v in out.model.graph.value_info}
    assert _dims(vi["r"]) == ["N", 3] and _dims(vi["t"]) == [3, "N"]
    assert out.model.graph.input[0] == m.graph.input[0] and out.model.graph.output[0] == m.graph.output[0]
    passes.check(m, out.model, [{"x": np.ones((n, 3), np.float32)} for n in (1, 2)])
    passes.idempotent(out.model, "infer-shapes")


def test_input_shape_fixes_dims(passes):
    m = passes.parse(MODEL)
    out = passes.run(m, "infer-shapes", input_shapes={"x": [5, 3]})
    vi = {v.name: v for v in out.model.graph.value_info}
    assert _dims(vi["t"]) == [3, 5] and _dims(out.model.graph.input[0]) == [5, 3]
    onnx.checker.check_model(out.model, full_check=True)


def test_failing_inference_leaves_the_graph_alone(passes):
    m = passes.parse(HEAD + """
g (float[N,3] x) => (float[N,3] y) {
  y = Relu(x)
}""")
    m.graph.node[0].domain = "custom.unknown"
    m.opset_import.append(onnx.helper.make_opsetid("custom.unknown", 1))
    out = passes.run(m, "infer-shapes")
    assert out.model.graph.output[0] == m.graph.output[0]
