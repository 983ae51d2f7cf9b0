"""eliminate-noops: every no-op kind goes, look-alikes that change something stay."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.testing import PassRunner

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


@pytest.fixture
def passes() -> PassRunner:
    return PassRunner()

NOOPS = HEAD + """
g (float[N,3,4] x) => (float[N,3,4] y) {
  a = Identity(x)
  b = Dropout(a)
  c = Cast<to=1>(b)
  s0 = Constant<value = int64[3] {0, 3, -1}>()
  d = Reshape(c, s0)
  e = Transpose<perm=[0,1,2]>(d)
  st = Constant<value = int64[1] {0}>()
  en = Constant<value = int64[1] {9223372036854775807}>()
  ax = Constant<value = int64[1] {1}>()
  f = Slice(e, st, en, ax)
  pz = Constant<value = int64[6] {0, 0, 0, 0, 0, 0}>()
  g1 = Pad(f, pz)
  h = Concat<axis=1>(g1)
  z = Constant<value = float[1,4] {0, 0, 0, 0}>()
  i = Add(z, h)
  one = Constant<value = float {1}>()
  j = Mul(i, one)
  k = Div(j, one)
  ex = Constant<value = int64[2] {3, 1}>()
  l = Expand(k, ex)
  sq = Constant<value = int64[0] {}>()
  m = Unsqueeze(l, sq)
  y = Sum(m)
}
"""


def test_removes_every_noop_kind_and_keeps_the_dynamic_dim(passes):
    m = passes.parse(NOOPS)
    out = passes.run(m, "eliminate-noops")
    out = passes.run(out.model, "dce")
    # the last no-op would connect the graph input to the graph output directly: it stays
    assert out.ops == ["Sum"], out.ops
    assert out.model.graph.output[0].name == "y"
    feeds = [{"x": np.random.default_rng(n).standard_normal((n, 3, 4)).astype(np.float32)} for n in (1, 3)]
    passes.check(m, out.model, feeds)


def test_removes_noops_between_real_ops(passes):
    m = passes.parse(NOOPS.replace("a = Identity(x)", "a = Relu(x)").replace("y = Sum(m)", "y = Relu(m)"))
    out = passes.run(m, "eliminate-noops")
    assert out.stats["removed"] == 12
    out = passes.run(out.model, "dce")
    assert out.ops == ["Relu", "Relu"]
    feeds = [{"x": np.random.default_rng(n).standard_normal((n, 3, 4)).astype(np.float32)} for n in (1, 3)]
    passes.check(m, out.model, feeds)
    assert out.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    passes.idempotent(out.model, "eliminate-noops")


def test_lookalikes_that_change_something_stay(passes):
    m = passes.parse(HEAD + """
g (float[N,3] x) => (float[2,N,3] y, float[3,2] y2, int32[N,3] y3, float[N,3] y4, bool[N,3] mask) {
  z = Constant<value = float[2,1,3] {0, 0, 0, 0, 0, 0}>()
  y = Add(x, z)
  s = Constant<value = int64[2] {2, 3}>()
  r = Reshape(x, s)
  s2 = Constant<value = int64[2] {3, -1}>()
  y2 = Reshape(r, s2)
  y3 = Cast<to=6>(x)
  tr = Transpose<perm=[1,0]>(x)
  y4 = Transpose<perm=[1,0]>(tr)
  dr, mask = Dropout(x)
}""")
    out = passes.run(m, "eliminate-noops")
    assert not out.changed, out.stats
    feeds = [{"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}]
    passes.check(m, out.model, feeds)


def test_graph_input_to_graph_output_identity_is_kept_with_a_reason(passes):
    m = passes.parse(HEAD + """
g (float[3] x) => (float[3] y) {
  y = Identity(x)
}""")
    out = passes.run(m, "eliminate-noops")
    assert not out.changed and out.ops == ["Identity"]
    assert any("graph output" in s for s in out.skipped)


def test_noop_in_front_of_a_graph_output_renames_the_producer(passes):
    m = passes.parse(HEAD + """
g (float[3] x) => (float[3] y) {
  r = Relu(x)
  y = Identity(r)
}""")
    out = passes.run(m, "eliminate-noops")
    assert out.ops == ["Relu"] and out.model.graph.node[0].output[0] == "y"
    passes.check(m, out.model)


def test_shared_input_and_graph_output_in_between(passes):
    """The no-op's input is itself a graph output: readers move to it, both outputs stay."""
    m = passes.parse(HEAD + """
g (float[3] x) => (float[3] r, float[3] y) {
  r = Relu(x)
  i = Identity(r)
  y = Neg(i)
}""")
    out = passes.run(m, "eliminate-noops")
    assert out.ops == ["Relu", "Neg"]
    passes.check(m, out.model)


def test_noops_inside_loop_body(passes):
    m = passes.parse(HEAD + """
g (int64 n, float[2] x) => (float[2] y) {
  t = Constant<value = bool {1}>()
  y = Loop(n, t, x) <body = b (int64 i, bool c, float[2] v) => (bool co, float[2] vo) {
      co = Identity(c)
      w = Identity(v)
      one = Constant<value = float {1}>()
      vo = Add(w, one)
  }>
}""")
    out = passes.run(m, "eliminate-noops")
    assert out.changed
    body = out.model.graph.node[-1].attribute[0].g
    assert [n.op_type for n in body.node].count("Identity") == 1  # co = Identity(c): body input -> body output
    feeds = [{"n": np.array(3, np.int64), "x": np.array([1.0, 2.0], np.float32)}]
    passes.check(m, out.model, feeds)
