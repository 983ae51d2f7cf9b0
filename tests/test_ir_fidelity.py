"""Round-trip fidelity of graphopt.ir for what onnx-graphsurgeon drops or cannot export.

Found by the ONNX backend suite (tests/backend): Optional's TYPE_PROTO attribute, optional / sequence
value types, and initializers listed as graph inputs (IR 3 requires them; IR >= 4 makes them part of
the signature).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser

from graphopt import ir
from graphopt.api import optimize
from graphopt.verify import make_session


def roundtrip(model: onnx.ModelProto) -> onnx.ModelProto:
    return ir.export_graph(ir.import_model(model), model)


def run(model, feeds):
    return make_session(model).run(None, feeds)


def test_optional_type_attribute_and_optional_outputs_survive():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["": 16]>
    g (bool cond) => (optional(seq(float[5])) out) {
        out = If (cond) <
            then_branch = t () => (optional(seq(float[5])) e) { e = Optional <type = seq(float[5])> () },
            else_branch = f () => (optional(seq(float[5])) o) {
                x = Constant <value = float[5] {1, 2, 3, 4, 5}> ()
                s = SequenceConstruct (x)
                o = Optional (s)
            }
        >
    }
    """)
    onnx.checker.check_model(m, full_check=True)
    out = roundtrip(m)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.output[0].type == m.graph.output[0].type
    opt_node = out.graph.node[0].attribute[0].g.node[0] if out.graph.node[0].attribute[0].name == "then_branch" else out.graph.node[0].attribute[1].g.node[0]
    assert opt_node.op_type == "Optional" and opt_node.attribute[0].type == onnx.AttributeProto.TYPE_PROTO
    for cond in (True, False):
        feeds = {"cond": np.array(cond)}
        a, b = run(m, feeds)[0], run(out, feeds)[0]
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a[0], b[0])


def test_sequence_element_shape_kept_on_inputs_outputs_and_value_info():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["": 17]>
    g (seq(float[N, 3]) xs) => (seq(float[N, 3]) ys) {
        mid = Identity (xs)
        ys = Identity (mid)
    }
    """)
    m.graph.value_info.append(onnx.helper.make_tensor_sequence_value_info("mid", onnx.TensorProto.FLOAT, ["N", 3]))
    out = roundtrip(m)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.input[0].type == m.graph.input[0].type
    assert out.graph.output[0].type == m.graph.output[0].type
    assert {vi.name: vi.type for vi in out.graph.value_info}["mid"] == m.graph.value_info[0].type


def _ir3_model() -> onnx.ModelProto:
    m = onnx.parser.parse_model("""
    <ir_version: 3, opset_import: ["": 8]>
    g (float[2] x, float[2] w, float[2] s) => (float[2] y) <float[2] w = {1, 2}, float[2] s = {3, 4}> {
        ws = Add (w, s)
        y = Mul (x, ws)
    }
    """)
    return m


def test_ir3_initializers_stay_graph_inputs():
    m = _ir3_model()
    onnx.checker.check_model(m, full_check=True)
    out = roundtrip(m)
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x", "w", "s"]


def test_ir3_constants_made_by_a_pass_are_listed_as_inputs():
    m = _ir3_model()
    res = optimize(m, "fold-constants,dce", verify="off")
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    inits = {t.name for t in out.graph.initializer}
    assert inits and inits <= {i.name for i in out.graph.input}
    assert "w" not in inits and "s" not in inits  # folded into ws, then removed: no stale input either
    assert [i.name for i in out.graph.input][0] == "x"
    x = np.array([1.0, -2.0], np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-6)


def test_unused_initializer_listed_as_input_is_kept_at_o0():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["": 17]>
    g (float[2] x, float[2] bias) => (float[2] y) <float[2] bias = {1, 2}, float[1] unused_w = {5}> {
        y = Relu (x)
    }
    """)
    out = roundtrip(m)
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x", "bias"]
    assert "bias" in {t.name for t in out.graph.initializer}


OVERRIDABLE = """
<ir_version: 8, opset_import: ["": 17]>
g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1, 2}> {
    two = Constant <value = float {2}> ()
    w2 = Mul (w, two)
    y = Add (x, w2)
}
"""


def test_overridable_initializer_input_is_not_folded_and_stays_feedable():
    m = onnx.parser.parse_model(OVERRIDABLE)
    res = optimize(m, "O2", verify="off")
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert [t.name for t in out.graph.initializer if t.name == "w"] == ["w"]
    assert "Mul" in [n.op_type for n in out.graph.node]  # w * 2 must not fold: w can be fed
    x = np.array([1.0, 1.0], np.float32)
    for feeds in ({"x": x}, {"x": x, "w": np.array([10.0, 20.0], np.float32)}):
        np.testing.assert_array_equal(run(out, feeds)[0], run(m, feeds)[0])


def test_ir3_initializers_still_fold():
    m = _ir3_model()
    out = optimize(m, "O2", verify="off").model
    assert "Add" not in [n.op_type for n in out.graph.node]


def test_toposort_keeps_a_valid_order_and_fixes_an_invalid_one():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["": 17]>
    g (float[2] x) => (float[2] y) {
        a = Relu (x)
        b = Neg (a)
        c = Abs (x)
        y = Add (b, c)
    }
    """)
    g = ir.import_model(m)
    assert ir.is_topologically_sorted(g)
    ir.toposort(g)
    assert [n.op for n in g.nodes] == ["Relu", "Neg", "Abs", "Add"]  # gs's toposort: Relu, Abs, Neg, Add
    assert [n.op_type for n in optimize(m, "O0", verify="off").model.graph.node] == ["Relu", "Neg", "Abs", "Add"]
    g.nodes.reverse()
    assert not ir.is_topologically_sorted(g)
    ir.toposort(g)
    assert ir.is_topologically_sorted(g)
