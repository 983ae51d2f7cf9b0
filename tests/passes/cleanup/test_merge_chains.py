"""merge-chains: Transpose/Reshape/Squeeze-Unsqueeze/Cast pairs."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.testing import PassRunner

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


@pytest.fixture
def passes() -> PassRunner:
    return PassRunner()


def _x(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_transpose_pairs_cancel_or_compose(passes):
    m = passes.parse(HEAD + """
g (float[N,3,4] x) => (float[N,3,4] y, float[4,N,3] z) {
  a = Transpose<perm=[0,2,1]>(x)
  y = Transpose<perm=[0,2,1]>(a)
  b = Transpose<perm=[1,0,2]>(x)
  z = Transpose<perm=[2,1,0]>(b)
}""")
    out = passes.run(m, "merge-chains")
    assert out.stats["cancelled"] == 1 and out.stats["merged"] == 1
    out2 = passes.run(passes.run(out.model, "eliminate-noops").model, "dce")
    assert sorted(out2.ops) == ["Identity", "Transpose"]  # y = Identity(x): graph input straight to output
    feeds = [{"x": _x((n, 3, 4), seed=n)} for n in (1, 2)]
    passes.check(m, out2.model, feeds)
    passes.idempotent(out2.model, "merge-chains")


def test_default_perms_reverse_twice(passes):
    m = passes.parse(HEAD + """
g (float[2,3,4] x) => (float[2,3,4] y) {
  a = Transpose(x)
  r = Relu(a)
  b = Transpose(x)
  c = Transpose(b)
  y = Add(c, c)
}""")
    out = passes.run(m, "merge-chains")
    assert out.stats["cancelled"] == 1
    passes.check(m, out.model)


def test_reshape_chain_merges_unless_the_second_copies_a_dim(passes):
    m = passes.parse(HEAD + """
g (float[N,6] x) => (float[N,3,2] y, float[2,N,3] z) {
  s1 = Constant<value = int64[3] {0, 2, 3}>()
  a = Reshape(x, s1)
  s2 = Constant<value = int64[3] {-1, 3, 2}>()
  y = Reshape(a, s2)
  s3 = Constant<value = int64[1] {-1}>()
  f = Reshape(x, s3)
  s4 = Constant<value = int64[3] {2, 0, 3}>()
  z = Reshape(a, s4)
}""")
    out = passes.run(m, "merge-chains")
    assert out.stats["merged"] == 1  # y reads x; z's 0 copies a dim of a, so it stays on a
    feeds = [{"x": _x((2, 6))}]
    passes.check(m, out.model, feeds)


def test_unsqueeze_squeeze_cancel_with_negative_axes(passes):
    m = passes.parse(HEAD + """
g (float[N,3] x) => (float[N,3] y, float[1,N,3] z) {
  ax = Constant<value = int64[1] {-1}>()
  u = Unsqueeze(x, ax)
  y = Squeeze(u, ax)
  a1 = Constant<value = int64[2] {0, 1}>()
  a2 = Constant<value = int64[1] {0}>()
  u2 = Unsqueeze(x, a1)
  z = Squeeze(u2, a2)
}""")
    out = passes.run(m, "merge-chains")
    assert out.stats["cancelled"] == 1  # {0, 1} vs {0}: z is not the identity and stays
    ops = out.ops
    assert ops.count("Squeeze") == 1 and ops.count("Identity") == 1
    passes.check(m, out.model, [{"x": _x((n, 3))} for n in (1, 4)])


def test_cast_chain_merges_only_when_the_first_cast_widens(passes):
    m = passes.parse(HEAD + """
g (float16[4] x, float[4] f) => (double[4] y, float[4] z) {
  a = Cast<to=1>(x)
  y = Cast<to=11>(a)
  b = Cast<to=10>(f)
  z = Cast<to=1>(b)
}""")
    out = passes.run(m, "merge-chains")
    assert out.stats["merged"] == 1  # f16 -> f32 -> f64 is f16 -> f64; f32 -> f16 -> f32 rounds: kept
    feeds = [{"x": np.array([1.5, -2.25, 65504, 1e-4], np.float16), "f": np.array([1.0001, 3.3, -7.1, 1e-8], np.float32)}]
    passes.check(m, out.model, feeds, rtol=0)
    passes.idempotent(out.model, "merge-chains")


def test_first_node_stays_when_its_output_is_also_used_elsewhere(passes):
    m = passes.parse(HEAD + """
g (float[2,3] x) => (float[3,2] a, float[2,3] y) {
  a = Transpose<perm=[1,0]>(x)
  y = Transpose<perm=[1,0]>(a)
}""")
    out = passes.run(m, "merge-chains")
    out = passes.run(passes.run(out.model, "eliminate-noops").model, "dce")
    assert out.ops.count("Transpose") == 1
    passes.check(m, out.model)


def test_chain_inside_if_branch(passes):
    m = passes.parse(HEAD + """
g (bool c, float[2,3] x) => (float[2,3] y) {
  y = If(c) <
    then_branch = t () => (float[2,3] ty) {
      a = Transpose<perm=[1,0]>(x)
      ty = Transpose<perm=[1,0]>(a)
    },
    else_branch = e () => (float[2,3] ey) {
      ey = Neg(x)
    }
  >
}""")
    out = passes.run(m, "merge-chains")
    assert out.stats["cancelled"] == 1
    feeds = [{"c": np.array(v), "x": _x((2, 3))} for v in (True, False)]
    passes.check(m, out.model, feeds)
