"""The pass manager's fixpoints: which runs they skip, and that skipping never changes the result."""
from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt import Pass, PassResult, api, ir, register_pass
from graphopt.manager import Instrument, PassManager
from graphopt.pass_base import PassContext, get_pass
from graphopt.rewrite import replace_uses
from tests.conftest import DIGITS_MODELS
from tests.helpers import parse

RUNS: list[str] = []


@register_pass
class StripIdentities(Pass):
    """Bypasses every Identity: idempotent (none is left for a second run)."""

    name = "test-strip-identities"
    idempotent = True
    description = "bypass every Identity (idempotent)"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph, ctx):
        RUNS.append(self.name)
        ids = [n for n in graph.nodes if n.op == "Identity" and not any(o is n.outputs[0] for o in graph.outputs)]
        for n in ids:
            replace_uses(n.outputs[0], n.inputs[0], graph)
            n.inputs.clear()
            n.outputs.clear()
        graph.nodes = [n for n in graph.nodes if n.inputs or n.outputs]
        return PassResult(bool(ids), {"removed": len(ids)})


@register_pass
class StripIdentitiesUndeclared(StripIdentities):
    name = "test-strip-identities-undeclared"
    idempotent = False
    description = "bypass every Identity (not declared idempotent)"


@register_pass
class AddIdentityOnce(Pass):
    """Puts an Identity after the first node, on its first run only (another pass's change)."""

    name = "test-add-identity-once"
    description = "add an Identity after the first node, on the first run only"

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, **options):
        super().__init__(**options)
        self.done = False

    def run(self, graph, ctx):
        RUNS.append(self.name)
        if self.done:
            return PassResult(False)
        self.done = True
        first = graph.nodes[0]
        mid = gs.Variable(first.outputs[0].name + "_id", dtype=first.outputs[0].dtype)
        replace_uses(first.outputs[0], mid, graph)
        graph.nodes.insert(1, gs.Node("Identity", inputs=[first.outputs[0]], outputs=[mid]))
        return PassResult(True)


MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
  a = Relu(x)
  b = Identity(a)
  c = Neg(b)
  y = Abs(c)
}"""


def _run(pipeline: str, instruments=()):
    RUNS.clear()
    model = parse(MODEL)
    graph = ir.import_model(model)
    ctx = PassContext(opset=17)
    ctx.model_template = model
    pm = PassManager(pipeline, instruments)
    graph = pm.run(graph, ctx)
    return graph, pm.report, list(RUNS)


def test_an_idempotent_pass_is_not_run_again_on_the_graph_it_left():
    graph, report, runs = _run("fixpoint(test-strip-identities,dce)")
    assert runs == ["test-strip-identities"]  # iteration 2 would meet the graph it left
    # the report lists the runs that happened, and only those
    assert [(r.name, r.iteration, r.changed) for r in report.passes] == [
        ("test-strip-identities", 1, True), ("dce", 1, False)]
    assert report.pass_summary()["test-strip-identities"]["runs"] == 1
    assert [n.op for n in graph.nodes] == ["Relu", "Neg", "Abs"]


def test_a_pass_not_declared_idempotent_runs_again_after_its_own_change():
    graph, report, runs = _run("fixpoint(test-strip-identities-undeclared,dce)")
    assert runs == ["test-strip-identities-undeclared"] * 2
    assert [(r.iteration, r.changed) for r in report.passes] == [(1, True), (1, False), (2, False)]
    assert [n.op for n in graph.nodes] == ["Relu", "Neg", "Abs"]


def test_an_idempotent_pass_runs_again_once_another_pass_changed_the_graph():
    graph, report, runs = _run("fixpoint(test-strip-identities,test-add-identity-once)")
    assert runs == ["test-strip-identities", "test-add-identity-once"] * 2
    assert [(r.name, r.iteration, r.changed) for r in report.passes] == [
        ("test-strip-identities", 1, True), ("test-add-identity-once", 1, True),
        ("test-strip-identities", 2, True), ("test-add-identity-once", 2, False)]
    assert "Identity" not in [n.op for n in graph.nodes]


class _ReplaceGraph(Instrument):
    """Hands back a fresh copy of the graph after the first run of ``name`` (as a rollback would)."""

    def __init__(self, name, model):
        self.name, self.model, self.done = name, model, False

    def after_pass(self, p, graph, ctx, record):
        if p.name == self.name and not self.done:
            self.done = True
            return ir.import_model(self.model)
        return None


def test_an_idempotent_pass_runs_again_on_a_graph_an_instrument_handed_back():
    # its change was replaced by the instrument's graph, which it has never seen
    graph, report, runs = _run("fixpoint(test-strip-identities)", [_ReplaceGraph("test-strip-identities", parse(MODEL))])
    assert runs == ["test-strip-identities"] * 2
    assert "Identity" not in [n.op for n in graph.nodes]


def test_only_passes_that_are_idempotent_say_so():
    assert get_pass("dce").idempotent and get_pass("cse").idempotent
    assert not get_pass("fold-constants").idempotent


def _run_pass_twice(name: str, model: onnx.ModelProto, gs_import: bool = False) -> list[bool]:
    graph = gs.import_onnx(model) if gs_import else ir.import_model(model)
    ctx = PassContext(opset=17)
    ctx.model_template = model
    pm = PassManager(f"{name},{name}")
    pm.run(graph, ctx)
    return [r.changed for r in pm.report.passes]


def test_eliminate_noops_is_not_idempotent():
    # the dead Identity goes first; only then may the live one hand its output name to Relu
    m = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
      r = Relu(x)
      y = Identity(r)
      d = Identity(r)
    }""")
    assert _run_pass_twice("eliminate-noops", m) == [True, True]
    assert not get_pass("eliminate-noops").idempotent


def test_merge_chains_is_not_idempotent():
    # on a node list out of topological order, the first run merges a pair into a new pair
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,2,3] x) => (float[3,1,2] y) {
      a = Transpose<perm=[0,2,1]>(x)
      y = Transpose<perm=[1,0,2]>(b)
      b = Transpose<perm=[2,0,1]>(a)
    }""")
    assert _run_pass_twice("merge-chains", m, gs_import=True) == [True, True]
    assert not get_pass("merge-chains").idempotent


@pytest.mark.parametrize("level", ["O1", "O2"])
@pytest.mark.parametrize("path", DIGITS_MODELS, ids=lambda p: p.stem)
def test_skipping_idempotent_passes_gives_the_same_model(path, level, monkeypatch):
    fast = api.optimize(path, level, verify="off")
    for name in ("dce", "cse"):
        monkeypatch.setattr(get_pass(name), "idempotent", False)
    slow = api.optimize(path, level, verify="off")
    assert fast.model.SerializeToString() == slow.model.SerializeToString()
    assert len(fast.report.passes) <= len(slow.report.passes)
    # the fixpoints end in the same iteration
    assert max(r.iteration or 0 for r in fast.report.passes) == max(r.iteration or 0 for r in slow.report.passes)
