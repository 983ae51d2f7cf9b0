"""cse: identical nodes on identical inputs, identical initializers by content."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.testing import PassRunner

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


@pytest.fixture
def passes() -> PassRunner:
    return PassRunner()


def test_identical_nodes_and_initializers_merge(passes):
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    m = passes.parse(HEAD + """
g (float[N,4] x) => (float[N,4] y) {
  a = MatMul(x, w1)
  b = MatMul(x, w2)
  s = Add(a, b)
  r1 = Relu(s)
  r2 = Relu(s)
  y = Mul(r1, r2)
}""", {"w1": w, "w2": w.copy()})
    out = passes.run(m, "cse")
    assert out.stats == {"initializers_merged": 1, "nodes_merged": 2}
    out = passes.run(out.model, "dce")
    assert out.ops == ["MatMul", "Add", "Relu", "Mul"] and len(out.model.graph.initializer) == 1
    passes.check(m, out.model, [{"x": np.random.default_rng(n).standard_normal((n, 4)).astype(np.float32)} for n in (1, 3)])
    passes.idempotent(out.model, "cse")


def test_near_duplicates_stay_apart(passes):
    w = np.zeros((3,), np.float32)
    w_neg = w.copy()
    w_neg[1] = -0.0  # equal under ==, not bit for bit
    nan1 = np.array([np.nan, 1.0], np.float32)
    m = passes.parse(HEAD + """
g (float[3] x, float[2] v) => (float[3] y, float[2] z, float[3] y2) {
  a = Add(x, w1)
  b = Add(x, w2)
  y = Mul(a, b)
  t1 = Softmax<axis=0>(x)
  t2 = Softmax<axis=-1>(x)
  y2 = Add(t1, t2)
  p = Add(v, n1)
  q = Add(v, n2)
  z = Add(p, q)
}""", {"w1": w, "w2": w_neg, "n1": nan1, "n2": np.array([np.nan, 1.0000001], np.float32)})
    out = passes.run(m, "cse")
    assert not out.changed, out.stats  # different attrs (axis 0 vs -1) are not compared by meaning
    passes.check(m, out.model)


def test_duplicate_graph_outputs_are_kept(passes):
    m = passes.parse(HEAD + """
g (float[3] x) => (float[3] y, float[3] z) {
  y = Relu(x)
  z = Relu(x)
}""")
    out = passes.run(m, "cse")
    assert not out.changed and any("graph output" in s for s in out.skipped)


def test_random_ops_are_never_merged(passes):
    m = passes.parse(HEAD + """
g (float[3] x) => (float[3] y) {
  a = RandomUniformLike(x)
  b = RandomUniformLike(x)
  y = Sub(a, b)
}""")
    out = passes.run(m, "cse")
    assert not out.changed


def test_weight_that_is_a_graph_input_is_not_merged(passes):
    w = np.ones((3,), np.float32)
    m = passes.parse(HEAD + """
g (float[3] x, float[3] w1) => (float[3] y) {
  a = Add(x, w1)
  b = Add(x, w2)
  y = Mul(a, b)
}""", {"w1": w, "w2": w.copy()})
    out = passes.run(m, "cse")
    assert not out.changed
    feeds = [{"x": np.arange(3, dtype=np.float32), "w1": np.full(3, 5, np.float32)}]  # the user overrides w1
    passes.check(m, out.model, feeds)


def test_duplicates_inside_a_loop_body(passes):
    m = passes.parse(HEAD + """
g (int64 n, float[2] x) => (float[2] y) {
  t = Constant<value = bool {1}>()
  y = Loop(n, t, x) <body = b (int64 i, bool c, float[2] v) => (bool co, float[2] vo) {
      co = Identity(c)
      a = Sin(v)
      b = Sin(v)
      vo = Add(a, b)
  }>
}""")
    out = passes.run(m, "cse")
    assert out.stats["nodes_merged"] == 1
    feeds = [{"n": np.array(3, np.int64), "x": np.array([0.5, 2.0], np.float32)}]
    passes.check(m, out.model, feeds)


def _two_weight_graph(w1: np.ndarray, w2: np.ndarray):
    import onnx_graphsurgeon as gs

    x = gs.Variable("x", np.float32, list(w1.shape))
    c1, c2 = gs.Constant("w1", w1), gs.Constant("w2", w2)
    a, b, y = (gs.Variable(n, np.float32, list(w1.shape)) for n in ("a", "b", "y"))
    nodes = [gs.Node("Add", inputs=[x, c1], outputs=[a]), gs.Node("Add", inputs=[x, c2], outputs=[b]),
             gs.Node("Mul", inputs=[a, b], outputs=[y])]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17), c1, c2


@pytest.mark.parametrize("size", [8, 1000])  # all of it in the fingerprint / only its ends
def test_constant_given_new_values_is_compared_again(size):
    """cse remembers what it learnt of a constant's values between runs; a constant given new values
    (a new values object) must be compared on those."""
    from graphopt import PassContext
    from graphopt.passes.cleanup.cse import CommonSubexpressionElimination

    w = np.zeros(size, np.float32)
    other = w.copy()
    other[size // 2] = 1.0  # same ends, different middle
    graph, c1, c2 = _two_weight_graph(w, other)
    cse = CommonSubexpressionElimination()
    assert not cse.run(graph, PassContext()).changed
    c2.values = w.copy()  # now equal to w1
    r = cse.run(graph, PassContext())
    assert r.changed and r.stats["initializers_merged"] == 1
    assert not c2.outputs and all(n.inputs[1] is c1 for n in c1.outputs)

    graph, c1, c2 = _two_weight_graph(w, w.copy())
    assert not cse.run(graph, PassContext(rewrite_limit=0)).changed  # looked at, but not merged
    c2.values = other
    assert not cse.run(graph, PassContext()).changed
