"""fold-constants: shape-aware folding, numpy fast path vs onnx.reference, size limit, subgraphs."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx.reference import ReferenceEvaluator

from graphopt.passes.fold import _numpy_ops as K
from graphopt.testing import PassRunner

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


@pytest.fixture
def passes() -> PassRunner:
    return PassRunner()

SHAPE_CHAIN = HEAD + """
g (float[N,3,4,4] x) => (float[N,3,16] y) {
  s = Shape(x)
  i0 = Constant<value = int64 {0}>()
  i1 = Constant<value = int64 {1}>()
  i2 = Constant<value = int64 {2}>()
  d0 = Gather<axis=0>(s, i0)
  d1 = Gather<axis=0>(s, i1)
  d2 = Gather<axis=0>(s, i2)
  ax = Constant<value = int64[1] {0}>()
  u0 = Unsqueeze(d0, ax)
  u1 = Unsqueeze(d1, ax)
  sq = Mul(d2, d2)
  u2 = Unsqueeze(sq, ax)
  shp = Concat<axis=0>(u0, u1, u2)
  y = Reshape(x, shp)
}
"""


def test_shape_chain_folds_static_dims_and_keeps_the_dynamic_batch(passes):
    m = passes.parse(SHAPE_CHAIN)
    out = passes.run(m, "fold-constants")
    assert out.changed
    assert out.stats["shape_folded"] == 2  # Gather of dims 1 and 2 (static); dim 0 is N
    assert out.stats["folded"] >= 3  # then Mul, Unsqueeze, Unsqueeze on constants
    ops = out.ops
    assert "Shape" in ops and ops.count("Gather") == 1 and "Mul" not in ops and "Constant" not in ops
    assert out.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    feeds = [{"x": np.random.default_rng(n).standard_normal((n, 3, 4, 4)).astype(np.float32)} for n in (1, 5)]
    passes.check(m, out.model, feeds)


def test_fully_static_shape_chain_folds_to_a_constant_reshape(passes):
    m = passes.parse(SHAPE_CHAIN.replace("float[N,3,4,4] x", "float[2,3,4,4] x").replace("float[N,3,16] y", "float[2,3,16] y"))
    out = passes.run(m, "fold-constants")
    after_dce = passes.run(out.model, "dce")
    assert after_dce.ops == ["Reshape"]
    passes.check(m, after_dce.model)
    passes.idempotent(after_dce.model, "fold-constants")


def test_input_shape_fixes_the_dynamic_dim_only_when_asked(passes):
    m = passes.parse(SHAPE_CHAIN)
    out = passes.run(m, "fold-constants", input_shapes={"x": [2, 3, 4, 4]})
    out = passes.run(out.model, "dce")
    assert out.ops == ["Reshape"]
    dims = [d.dim_value for d in out.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 4, 4]
    feeds = [{"x": np.ones((2, 3, 4, 4), np.float32)}]
    passes.check(m, out.model, feeds, input_shapes={"x": [2, 3, 4, 4]})


def test_shape_of_a_dynamic_tensor_is_not_folded(passes):
    m = passes.parse(HEAD + """
g (float[N,3] x) => (int64[2] y) {
  s = Shape(x)
  one = Constant<value = int64[1] {1}>()
  y = Add(s, one)
}""")
    out = passes.run(m, "fold-constants")
    assert out.ops == ["Shape", "Add"]
    feeds = [{"x": np.zeros((n, 3), np.float32)} for n in (1, 4)]
    passes.check(m, out.model, feeds)


def test_weight_transpose_folds_and_constant_nodes_become_initializers(passes):
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    m = passes.parse(HEAD + """
g (float[2,64] x) => (float[2,32] y) {
  wt = Transpose<perm=[1,0]>(w)
  wtt = Transpose<perm=[1,0]>(wt)
  y = MatMul(x, wtt)
}""", {"w": w})
    out = passes.run(m, "fold-constants")
    assert out.ops == ["MatMul"] and out.stats["folded"] == 2
    passes.check(m, out.model)
    passes.idempotent(out.model, "fold-constants")


def test_size_limit_stops_generators_before_allocating(passes):
    m = passes.parse(HEAD + """
g (float[1024,1024] x) => (float[1024,1024] y) {
  s = Constant<value = int64[2] {1024, 1024}>()
  z = ConstantOfShape<value = float[1] {1.0}>(s)
  y = Mul(x, z)
}""")
    out = passes.run(m, "fold-constants")
    assert out.stats["too_large"] == 1 and "ConstantOfShape" in out.ops
    assert any("size-limit" in s for s in out.skipped)
    big = passes.run(m, "fold-constants", size_limit=8 << 20)
    assert "ConstantOfShape" not in big.ops
    passes.check(m, big.model)


def test_never_folds_qdq_random_or_a_graph_output(passes):
    m = passes.parse(HEAD + """
g (float[4] x) => (float[4] y, float[3] c) {
  s = Constant<value = float {0.5}>()
  zp = Constant<value = uint8 {3}>()
  v = Constant<value = float[4] {1, 2, 3, 4}>()
  q = QuantizeLinear(v, s, zp)
  dq = DequantizeLinear(q, s, zp)
  y = Add(x, dq)
  c = Constant<value = float[3] {1, 2, 3}>()
}""")
    out = passes.run(m, "fold-constants")
    assert "QuantizeLinear" in out.ops and "DequantizeLinear" in out.ops
    assert out.ops.count("Constant") == 1  # the one producing graph output c stays a node
    passes.check(m, out.model)


def test_folds_inside_if_branches(passes):
    m = passes.parse(HEAD + """
g (bool cond, float[2] x) => (float[2] y) {
  y = If(cond) <
    then_branch = t () => (float[2] ty) {
      a = Constant<value = float[2] {1, 2}>()
      b = Constant<value = float[2] {3, 4}>()
      ab = Add(a, b)
      ty = Mul(x, ab)
    },
    else_branch = e () => (float[2] ey) {
      ey = Identity(x)
    }
  >
}""")
    out = passes.run(m, "fold-constants")
    assert out.changed and out.stats["folded"] == 1
    then = out.model.graph.node[0].attribute[0].g
    assert [n.op_type for n in then.node] == ["Mul"]
    feeds = [{"cond": np.array(c), "x": np.array([1.0, -2.0], np.float32)} for c in (True, False)]
    passes.check(m, out.model, feeds)


# --- the numpy fast path must agree with onnx.reference exactly --------------------------------------

KERNEL_CASES = [
    ("Slice", [np.arange(10, dtype=np.int64), np.array([8]), np.array([-100]), np.array([0]), np.array([-3])], {}),
    ("Slice", [np.arange(24, dtype=np.float32).reshape(4, 6), np.array([1, -1]), np.array([1000, 0]), np.array([0, 1]), np.array([1, -2])], {}),
    ("Slice", [np.arange(10, dtype=np.int64), np.array([-1]), np.array([-11]), np.array([0]), np.array([-1])], {}),
    ("Gather", [np.arange(12, dtype=np.int64).reshape(3, 4), np.array([-1, 0])], {"axis": 1}),
    ("Gather", [np.array([5, 6, 7], np.int64), np.array(-3, np.int64)], {}),
    ("Div", [np.array([-7, 7, -7, 7, 0], np.int64), np.array([2, -2, -2, 2, 5], np.int64)], {}),
    ("Div", [np.array([-7.5, 1.0], np.float32), np.array([2.0, 3.0], np.float32)], {}),
    ("Cast", [np.array([-2.7, 2.7, 0.5, -0.5], np.float32)], {"to": onnx.TensorProto.INT64}),
    ("Cast", [np.array([300, -1], np.int64)], {"to": onnx.TensorProto.UINT8}),
    ("Cast", [np.array([0, 2, -1], np.int64)], {"to": onnx.TensorProto.BOOL}),
    ("Range", [np.array(10, np.int64), np.array(-3, np.int64), np.array(-4, np.int64)], {}),
    ("Range", [np.array(0, np.int32), np.array(7, np.int32), np.array(3, np.int32)], {}),
    ("Reshape", [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.array([0, -1], np.int64)], {}),
    ("Reshape", [np.zeros((0, 3), np.float32), np.array([0, 3], np.int64)], {"allowzero": 1}),
    ("Squeeze", [np.zeros((1, 3, 1), np.float32), np.array([-1], np.int64)], {}),
    ("Unsqueeze", [np.array(4, np.int64), np.array([0], np.int64)], {}),
    ("Unsqueeze", [np.zeros((2, 3), np.float32), np.array([-1, 0], np.int64)], {}),
    ("Concat", [np.array([1], np.int64), np.array([2, 3], np.int64)], {"axis": -1}),
    ("Transpose", [np.arange(24, dtype=np.float32).reshape(2, 3, 4)], {}),
    ("Transpose", [np.arange(24, dtype=np.float32).reshape(2, 3, 4)], {"perm": [1, 2, 0]}),
    ("Expand", [np.array([[1], [2]], np.int64), np.array([1, 3], np.int64)], {}),
    ("Tile", [np.array([[1, 2]], np.float32), np.array([2, 3], np.int64)], {}),
    ("ConstantOfShape", [np.array([2, 3], np.int64)], {"value": onnx.numpy_helper.from_array(np.array([7], np.int32))}),
    ("ConstantOfShape", [np.array([0], np.int64)], {}),
    ("Where", [np.array([True, False]), np.array([1, 2], np.int64), np.array([3, 4], np.int64)], {}),
    ("Equal", [np.array([1, 2], np.int64), np.array([1, 3], np.int64)], {}),
    ("Shape", [np.zeros((2, 3, 4), np.float32)], {"start": -2}),
    ("Shape", [np.zeros((2, 3, 4), np.float32)], {"start": 1, "end": -1}),
    ("Size", [np.zeros((2, 3, 4), np.float32)], {}),
    ("Flatten", [np.zeros((2, 3, 4), np.float32)], {"axis": 0}),
    ("Neg", [np.array([1, -2], np.int32)], {}),
    ("Max", [np.array([1, 5], np.int64), np.array([3, 2], np.int64)], {}),
    ("Sub", [np.array([1, 2], np.uint8), np.array([2, 1], np.uint8)], {}),
]


@pytest.mark.parametrize("op,inputs,attrs", KERNEL_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(KERNEL_CASES)])
def test_numpy_kernel_matches_onnx_reference(op, inputs, attrs):
    names = [f"i{k}" for k in range(len(inputs))]
    node = onnx.helper.make_node(op, names, ["out"], **attrs)
    graph = onnx.helper.make_graph([node], "k", [], [onnx.helper.make_empty_tensor_value_info("out")],
                                   initializer=[onnx.numpy_helper.from_array(np.asarray(a), n) for a, n in zip(inputs, names)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    ref = np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    gnode = gs.import_onnx(model).nodes[0]
    got = K.run_kernel(gnode, [np.asarray(a) for a in inputs], 17)
    assert got is not None, f"the fast path does not cover {op} here"
    assert got[0].dtype == ref.dtype and got[0].shape == ref.shape
    np.testing.assert_array_equal(got[0], ref)


def test_kernel_refuses_what_it_cannot_do_exactly():
    g = gs.import_onnx(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Div", ["a", "b"], ["c"])], "k", [], [onnx.helper.make_empty_tensor_value_info("c")]),
        opset_imports=[onnx.helper.make_opsetid("", 17)]))
    assert K.run_kernel(g.nodes[0], [np.array([1], np.int64), np.array([0], np.int64)], 17) is None
    cast = gs.Node("Cast", attrs={"to": onnx.TensorProto.INT32}, inputs=[gs.Variable("x")], outputs=[gs.Variable("y")])
    assert K.run_kernel(cast, [np.array([np.nan], np.float32)], 17) is None
    assert K.run_kernel(cast, [np.array([3e10], np.float32)], 17) is None


def test_ops_without_a_kernel_fold_through_the_reference_evaluator(passes):
    m = passes.parse(HEAD + """
g (float[3] x) => (float[3] y) {
  v = Constant<value = float[4] {3, 1, 4, 1.5}>()
  k = Constant<value = int64[1] {3}>()
  top, idx = TopK(v, k)
  s = Sqrt(top)
  y = Add(x, s)
}""")
    out = passes.run(m, "fold-constants")
    assert out.stats["fallback"] == 2 and out.stats["folded"] == 2  # TopK (2 outputs, idx unused), Sqrt
    assert passes.run(out.model, "dce").ops == ["Add"]
    passes.check(m, out.model)


def test_string_constants_are_moved_but_not_decoded(passes):
    m = passes.parse(HEAD + """
g (string[2] x) => (string[4] y) {
  c = Constant<value = string[2] {"a", "b"}>()
  d = Identity(c)
  y = Concat<axis=0>(d, x)
}""")
    out = passes.run(m, "fold-constants")
    assert out.stats["constant_nodes"] == 1 and "Identity" in out.ops
    assert any("type folding does not handle" in s for s in out.skipped)
    passes.check(m, out.model, [{"x": np.array(["p", "q"], dtype=object)}])


def test_integer_times_zero_is_known_even_when_the_other_operand_is_not(passes):
    m = passes.parse(HEAD + """
g (int64[B,S] ids) => (int64[1,1] y) {
  s = Shape(ids)
  i1 = Constant<value = int64 {1}>()
  seq = Gather<axis=0>(s, i1)
  z = Constant<value = int64[1,1] {0}>()
  zs = Mul(z, seq)
  c = Constant<value = int64[1,1] {7}>()
  y1 = Add(c, zs)
  y = Identity(y1)
}""")
    out = passes.run(passes.run(m, "fold-constants").model, "dce")
    assert out.ops == ["Identity"]
    passes.check(m, out.model, [{"ids": np.zeros((b, s), np.int64)} for b, s in ((1, 3), (2, 5))])


def test_stale_value_info_is_not_trusted(passes):
    """An input made dynamic by editing the signature keeps its old static value_info downstream."""
    m = passes.parse(HEAD + """
g (float[N,3] x) => (int64[2] y) {
  r = Relu(x)
  y = Shape(r)
}""")
    m.graph.value_info.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 3]))
    for name in ("fold-constants", "eliminate-noops"):
        out = passes.run(m, name)
        assert "Shape" in out.ops
    out = passes.run(m, "fold-constants")
    passes.check(m, out.model, [{"x": np.zeros((n, 3), np.float32)} for n in (1, 4)])


def test_weights_read_from_the_file_fold_into_constants_of_their_own():
    from graphopt import ir
    from graphopt.importer import SourcedValues
    from graphopt.pass_base import PassContext, get_pass

    m = onnx.parser.parse_model(HEAD + """
        g (float[2, 6] x) => (float[2, 6] y, float[6, 2] z) {
            shp = Constant<value = int64[2] {2, 6}>()
            r = Reshape(w, shp)
            y = Add(x, r)
            t = Transpose(w)
            z = Identity(t)
        }""")
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w"))
    model, source = ir.load_with_source(m.SerializeToString())
    graph = ir.import_model(model, source)
    w = ir.tensor_map(graph)["w"]
    assert isinstance(w._values, SourcedValues)
    get_pass("fold-constants")().run(graph, PassContext(opset=17))
    consts = {t.name: t for t in ir.tensor_map(graph).values() if isinstance(t, gs.Constant)}
    assert {"r", "t"} <= set(consts)
    for name in ("r", "t"):
        v = consts[name].values
        assert v.flags.writeable and not np.shares_memory(v, ir.const_view(w))
    np.testing.assert_array_equal(consts["r"].values, np.arange(12, dtype=np.float32).reshape(2, 6))
    assert isinstance(w._values, SourcedValues)  # reading the weight did not load it
