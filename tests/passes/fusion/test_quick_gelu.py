"""fuse-quick-gelu: x * Sigmoid(alpha * x) -> com.microsoft.QuickGelu(alpha)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tests.passes.fusion._ort_testlib import assert_same, build, full_check, ops, run_pass  # noqa: E402

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
X = {"x": np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32) * 3}


def model(body, outs="float[2,3,5] y", consts="<float a = {1.702}>"):
    return build(f"{HEADER}\ng (float[2,3,5] x) => ({outs}) {consts} {{{body}}}")


def test_clip_quick_gelu():
    m = model("s = Mul(x, a)\n g = Sigmoid(s)\n y = Mul(x, g)")
    m2, r = run_pass(m, "fuse-quick-gelu")
    assert r.stats == {"matched": 1, "rewritten": 1} and ops(m2) == {"QuickGelu": 1}
    assert abs(m2.graph.node[0].attribute[0].f - 1.702) < 1e-6
    full_check(m2)
    assert_same(m, m2, X)
    assert not run_pass(m2, "fuse-quick-gelu")[1].changed


def test_silu_is_quick_gelu_with_alpha_1():
    m = model("g = Sigmoid(x)\n y = Mul(g, x)", consts="")
    m2, r = run_pass(m, "fuse-quick-gelu")
    assert r.stats["rewritten"] == 1 and m2.graph.node[0].attribute[0].f == 1.0
    assert_same(m, m2, X)


def test_gate_of_another_tensor_is_not_quick_gelu():
    m = build(f"{HEADER}\ng (float[2,3,5] x, float[2,3,5] z) => (float[2,3,5] y) {{ g = Sigmoid(x)\n y = Mul(z, g) }}")
    _, r = run_pass(m, "fuse-quick-gelu")
    assert not r.changed and r.stats["matched"] == 0


def test_refuses_when_the_sigmoid_is_a_graph_output():
    m = model("g = Sigmoid(x)\n y = Mul(g, x)", outs="float[2,3,5] y, float[2,3,5] g", consts="")
    _, r = run_pass(m, "fuse-quick-gelu")
    assert not r.changed and "graph output" in r.skipped[0]


def test_subgraph_body_is_left_alone():
    m = build(f"{HEADER}\ng (float[2,3,5] x, bool c) => (float[2,3,5] y) {{\n"
              "  y = If(c) <then_branch = t () => (float[2,3,5] o) { g = Sigmoid(x)\n o = Mul(x, g) },"
              " else_branch = e () => (float[2,3,5] o) { o = Identity(x) }>\n}")
    _, r = run_pass(m, "fuse-quick-gelu")
    assert not r.changed
