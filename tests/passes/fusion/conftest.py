"""Helpers for the fusion tests: build a model from ONNX text plus numpy weights, run one pass, and
check it the STYLE.md way (checker full_check, numerics vs onnxruntime at ORT_DISABLE_ALL, idempotence)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx.parser
import pytest

from graphopt import ir
from graphopt.data import generate_feeds
from graphopt.pass_base import PassContext, PassResult, get_pass
from graphopt.verify import make_session


def build(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """Parse ONNX text and add ``weights`` as initializers (names as written in the text)."""
    m = onnx.parser.parse_model(text)
    for name, v in weights.items():
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(v), name))
    onnx.checker.check_model(m, full_check=True)
    return m


def rnd(*shape, seed: int = 0, lo: float | None = None) -> np.ndarray:
    r = np.random.default_rng(seed + sum(shape) * 7 + len(shape))
    v = r.standard_normal(shape).astype(np.float32)
    return np.abs(v) + lo if lo is not None else v


@dataclass
class Outcome:
    result: PassResult
    model: onnx.ModelProto

    @property
    def ops(self) -> list[str]:
        return [n.op_type for n in self.model.graph.node]

    @property
    def stats(self) -> dict:
        return self.result.stats


def run_pass(model: onnx.ModelProto, name: str, *, feeds: dict | None = None, rtol: float = 1e-5, check_numerics: bool = True) -> Outcome:
    """Run pass ``name`` once; assert checker, numerics (if it changed anything) and idempotence."""
    graph = ir.import_model(model)
    ctx = PassContext(opset=ir.graph_opset(graph))
    ctx.model_template = model
    p = get_pass(name)()
    res = p.run(graph, ctx)
    out = ir.export_graph(graph, model)
    onnx.checker.check_model(out, full_check=True)
    if res.changed and check_numerics:
        f = feeds or generate_feeds(model, seed=3)[0]
        ref = make_session(model).run(None, f)
        got = make_session(out).run(None, f)
        for r, g in zip(ref, got):
            assert r.shape == g.shape and r.dtype == g.dtype
            scale = float(np.abs(r).max()) if r.size else 0.0
            np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * max(scale, 1e-6))
    # idempotence: a second run finds nothing more to do
    g2 = ir.import_model(out)
    ctx2 = PassContext(opset=ir.graph_opset(g2))
    ctx2.model_template = out
    res2 = get_pass(name)().run(g2, ctx2)
    assert not res2.changed, f"second run of {name} changed the graph: {res2.stats}"
    assert res2.stats.get("rewritten", 0) == 0
    return Outcome(res, out)


@pytest.fixture
def fusion():
    class H:
        build = staticmethod(build)
        rnd = staticmethod(rnd)
        run = staticmethod(run_pass)

    return H


def _root_conftest():
    """tests/conftest.py under its own module name (this file shadows the name ``conftest``)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "_graphopt_tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


corpus_params = _root_conftest().corpus_params
