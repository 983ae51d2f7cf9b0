"""Helpers for testing passes (graphopt's own and plugins'): run one pass on an inline model, compare
with onnxruntime (optimizations off), full onnx.checker, idempotence.

    from graphopt.testing import PassRunner
    passes = PassRunner()
    m = passes.parse(text)              # onnx.parser text, checked with full_check
    out = passes.run(m, "cse")          # Outcome(model, changed, stats, skipped), out.ops
    passes.check(m, out.model)          # checker + same signature + same numbers (rtol 1e-5)
    passes.idempotent(out.model, "cse")
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt import ir
from graphopt.data import generate_feeds
from graphopt.pass_base import PassContext, get_pass
from graphopt.verify import make_session


@dataclass
class Outcome:
    model: onnx.ModelProto
    changed: bool
    stats: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)

    @property
    def ops(self) -> list[str]:
        return [n.op_type for n in self.model.graph.node]


class PassRunner:
    def parse(self, text: str, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
        m = onnx.parser.parse_model(text)
        for name, value in (initializers or {}).items():
            m.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        onnx.checker.check_model(m, full_check=True)
        return m

    def run(self, model: onnx.ModelProto, name: str, input_shapes=None, **options) -> Outcome:
        p = get_pass(name)(**options)
        # as graphopt reads a file: weights are read-only views of the file's bytes until a pass
        # asks for Constant.values (a pass that writes into const_view's arrays fails here)
        model, source = ir.load_with_source(model.SerializeToString(), check=False)
        graph = ir.import_model(model, source)
        ctx = PassContext(opset=ir.graph_opset(graph), input_shapes=input_shapes)
        ctx.model_template = model
        r = p.run(graph, ctx)
        graph.toposort()
        out = ir.export_graph(graph, model)
        return Outcome(out, r.changed, dict(r.stats), list(r.skipped))

    def outputs(self, model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
        return make_session(model).run(None, feeds)

    def check(self, before: onnx.ModelProto, after: onnx.ModelProto, feeds: list[dict] | None = None, rtol: float = 1e-5,
              input_shapes=None) -> None:
        """full checker; same output names/types/shapes; same numbers under onnxruntime ORT_DISABLE_ALL."""
        onnx.checker.check_model(after, full_check=True)
        assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
        assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]
        if not input_shapes:
            assert [o.type for o in after.graph.output] == [o.type for o in before.graph.output]
            assert [i.type for i in after.graph.input] == [i.type for i in before.graph.input]
        if feeds is None:
            feeds = generate_feeds(before, seed=0, input_shapes=input_shapes)
        for f in feeds:
            ref = self.outputs(before, f)
            got = self.outputs(after, f)
            for r, g in zip(ref, got):
                assert r.dtype == g.dtype and r.shape == g.shape
                if r.dtype.kind == "f":
                    np.testing.assert_allclose(g, r, rtol=rtol, atol=1e-6)
                else:
                    np.testing.assert_array_equal(g, r)

    def idempotent(self, model: onnx.ModelProto, name: str, input_shapes=None, **options) -> None:
        again = self.run(model, name, input_shapes=input_shapes, **options)
        assert not again.changed, f"second run of {name} changed the graph: {again.stats}"
