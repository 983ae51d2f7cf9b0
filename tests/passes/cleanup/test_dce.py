from __future__ import annotations

import numpy as np
import onnx

from graphopt import PassContext, ir
from graphopt.pass_base import get_pass
from tests.helpers import parse, run

DEAD = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x, float[2, 3] unused_input) => (float[2, 3] y, float[2, 3] z)
<float[3] w = {1.0, 2.0, 3.0}, float[3] dead_w = {4.0, 5.0, 6.0}> {
    a = Neg(x)
    dead1 = Mul(a, dead_w)
    dead2 = Relu(dead1)
    y = Add(a, w)
    z = Identity(x)
}
"""


def _run(text):
    m = parse(text)
    g = ir.import_model(m)
    res = get_pass("dce")().run(g, PassContext())
    return m, ir.export_graph(g, m), res


def test_removes_dead_nodes_and_initializers():
    m, out, res = _run(DEAD)
    assert res.changed and res.stats == {"nodes_removed": 2, "initializers_removed": 1}
    assert [n.op_type for n in out.graph.node] == ["Neg", "Add", "Identity"]
    assert [t.name for t in out.graph.initializer] == ["w"]
    assert [i.name for i in out.graph.input] == ["x", "unused_input"]  # graph inputs are never removed
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    feeds = {"x": x, "unused_input": x}
    for a, b in zip(run(m, feeds), run(out, feeds)):
        np.testing.assert_array_equal(a, b)


def test_idempotent_and_keeps_outputs():
    m = parse(DEAD)
    g = ir.import_model(m)
    p = get_pass("dce")()
    assert p.run(g, PassContext()).changed
    assert not p.run(g, PassContext()).changed
    assert [o.name for o in g.outputs] == ["y", "z"]


def test_dead_code_in_subgraph():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y) {
        y = If(c) <
            then_branch = t () => (float[2] a) { dead = Neg(x)  a = Relu(x) },
            else_branch = e () => (float[2] b) { b = Neg(x) }
        >
    }""")
    g = ir.import_model(m)
    res = get_pass("dce")().run(g, PassContext())
    assert res.changed and res.stats["nodes_removed"] == 1
    out = ir.export_graph(g, m)
    onnx.checker.check_model(out, full_check=True)


def test_a_plain_graph_loses_what_gs_cleanup_removes_and_its_tensors_forget_the_dead_nodes():
    m = parse(DEAD)
    ours, theirs = ir.import_model(m), ir.import_model(m)
    get_pass("dce")().run(ours, PassContext())
    theirs.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
    assert [n.name or n.op for n in ours.nodes] == [n.name or n.op for n in theirs.nodes]
    a = next(t for t in ours.tensors().values() if t.name == "a")
    assert [n.op for n in a.outputs] == ["Add"]  # the dead Mul no longer reads it
    assert "dead_w" not in ours.tensors()
    assert ir.export_graph(ours, m) == ir.export_graph(theirs, m)
