"""graphopt.analysis: use-def view, channel dependency groups, FLOPs, caching per graph generation."""
from __future__ import annotations

import numpy as np
import onnx.parser
from onnx import numpy_helper

from graphopt import ir
from graphopt.analysis import channel_groups, dataflow, flops, param_count
from graphopt.pass_base import PassContext
from graphopt.shapes import infer_shapes

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,5] y) {
    a = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, wa)
    b = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (a, wb)
    s = Add (a, b)
    r = Relu (s)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = Gemm <transB=1> (f, wf)
}
"""


def _graph():
    m = onnx.parser.parse_model(TEXT)
    rng = np.random.default_rng(0)
    for name, shape in (("wa", (4, 3, 3, 3)), ("wb", (4, 4, 3, 3)), ("wf", (5, 4))):
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    g = ir.import_model(m)
    g.toposort()
    infer_shapes(g, template=m)
    return g


def test_dataflow_view_is_cached_per_generation():
    g = _graph()
    ctx = PassContext()
    v1 = dataflow(g, ctx)
    assert dataflow(g, ctx) is v1
    assert v1.has_edge(("t", "a"), ("n", 1)) and v1.has_edge(("n", 0), ("t", "a"))
    ctx.cache.clear()  # what the pass manager does after a change
    assert dataflow(g, ctx) is not v1


def test_residual_add_joins_two_producers_into_one_group():
    g = _graph()
    groups = channel_groups(g)
    live = [x for x in groups if not x.blocked]
    assert len(live) == 1
    grp = live[0]
    assert grp.size == 4 and len(grp.of("producer")) == 2
    kinds = sorted(m.kind for m in grp.members)
    assert kinds == ["consumer", "consumer", "producer", "producer"]
    gemm = [m for m in grp.of("consumer") if g.nodes[m.node].op == "Gemm"][0]
    assert gemm.block == 1  # GlobalAveragePool -> Flatten: one feature per channel
    blocked = [x for x in groups if x.blocked]
    assert len(blocked) == 1 and "graph output" in blocked[0].blocked


def test_flops_and_params_count_symbolic_batch_as_one():
    g = _graph()
    assert flops(g) == 2 * (64 * 4 * 27 + 64 * 4 * 36 + 5 * 4)
    assert param_count(g) == 4 * 27 + 4 * 36 + 20
