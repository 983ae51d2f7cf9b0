"""Trust tooling: --verify each with rollback, bisect, reproducers and replay, --intermediates, lineage.

The scenario is a deliberately wrong pass loaded with --load-plugin: it copies each Conv/MatMul weight
into a fresh constant (an exact rewrite, asking ctx.allow_rewrite each time) but negates the weight in
its third rewrite (``bad=N`` picks another one).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import graphopt
from graphopt import ir, lineage, trust
from graphopt.cli import main
from graphopt.manager import PassManager
from graphopt.pass_base import PassContext, load_plugin

BAD_PASS = '''
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Pass, PassResult, register_pass


@register_pass
class CopyWeightsBuggy(Pass):
    name = "copy-weights-buggy"
    description = "copy Conv/MatMul weights into fresh constants; rewrite number `bad` negates one (a bug)"

    @dataclass(frozen=True)
    class Options:
        bad: int = 3

    def run(self, graph, ctx):
        done = 0
        for node in list(graph.nodes):
            if node.op not in ("Conv", "MatMul") or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            if not isinstance(w, gs.Constant) or w.name.endswith(".copy"):
                continue
            if not ctx.allow_rewrite(f"copy weight {w.name} of {node.name}"):
                break
            done += 1
            values = np.array(w.values, copy=True)
            if done == self.options.bad:
                values = -values
            node.inputs[1] = gs.Constant(w.name + ".copy", values)
        return PassResult(done > 0, {"copied": done})


@register_pass
class PerturbWeights(Pass):
    name = "perturb-weights"
    exact = False
    description = "lossy: add noise of `scale` x std to every Conv weight"

    @dataclass(frozen=True)
    class Options:
        scale: float = 0.001

    def run(self, graph, ctx):
        rng = np.random.default_rng(0)
        n = 0
        for node in list(graph.nodes):
            if node.op == "Conv" and isinstance(node.inputs[1], gs.Constant):
                if not ctx.allow_rewrite(f"perturb {node.name}"):
                    break
                w = np.array(node.inputs[1].values)
                noisy = (w + self.options.scale * w.std() * rng.standard_normal(w.shape)).astype(w.dtype)
                node.inputs[1] = gs.Constant(node.inputs[1].name + f".p{n}", noisy)
                n += 1
        return PassResult(n > 0, {"perturbed": n})


@register_pass
class CrashAfterMutating(Pass):
    name = "crash-after-mutating"
    description = "turns the first Relu into a Sigmoid, then raises (a crashing pass that left a half-done graph)"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph, ctx):
        for node in graph.nodes:
            if node.op == "Relu":
                ctx.allow_rewrite(f"mutate {node.name}")
                node.op = "Sigmoid"
                raise ValueError(f"boom at {node.name}")
        return PassResult(False)
'''

PIPE = "fold-constants,dce,copy-weights-buggy"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> str:
    # one file for the whole module: the registry refuses the same pass name from two modules
    p = tmp_path_factory.mktemp("plugin") / "bad_pass.py"
    p.write_text(BAD_PASS)
    load_plugin(str(p))
    return str(p)


@pytest.fixture()
def tiny(fixtures_dir) -> str:
    return str(fixtures_dir / "tiny_cnn.onnx")


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _outputs_equal(a: str | onnx.ModelProto, b: str | onnx.ModelProto) -> None:
    v = graphopt.verify(a, b)
    assert v.status == "passed", v.summary()


# ---------------------------------------------------------------------------------------------
# --verify each
# ---------------------------------------------------------------------------------------------


def test_verify_each_rolls_back_the_bad_pass(tiny, plugin, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli("optimize", tiny, "-o", str(out), "--passes", PIPE, "--load-plugin", plugin, "--verify", "each", "--report", str(rep))
    assert r.exit_code == 0, r.output
    assert "rolled-back: copy-weights-buggy: output 'logits'" in r.output
    assert "1 rolled back" in r.output
    report = json.loads(rep.read_text())
    recs = {x["name"]: x for x in report["passes"]}
    bad = recs["copy-weights-buggy"]
    assert bad["status"] == "rolled-back" and bad["changed"] is True
    assert "logits" in bad["detail"] and "max_abs" in bad["detail"] and "tolerance" in bad["detail"]
    assert bad["nodes_after"] == bad["nodes_before"] and bad["op_delta"] == {}
    assert recs["fold-constants"]["status"] == "ok" and recs["fold-constants"]["detail"].startswith("verified")
    assert report["reproducer"] == str(tmp_path / "o.repro")
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert not any(t.name.endswith(".copy") for t in m.graph.initializer)  # the whole pass is undone
    assert "copy-weights-buggy" not in lineage.of_model(m).values()
    _outputs_equal(tiny, str(out))
    # without --verify each the same run fails verification and writes no model
    r = cli("optimize", tiny, "-o", str(tmp_path / "o2.onnx"), "--passes", PIPE, "--load-plugin", plugin)
    assert r.exit_code == 1 and not (tmp_path / "o2.onnx").exists()


def test_verify_each_keeps_good_passes_and_snapshots_on_disk(tiny, plugin, tmp_path, monkeypatch):
    monkeypatch.setattr(trust, "SNAPSHOT_RAM_LIMIT", 0)  # every snapshot goes to a file
    seen = []
    orig_init = trust.Snapshot.__init__

    def spy(self, model, folder=None, *, to_disk=None):
        orig_init(self, model, folder, to_disk=to_disk)
        seen.append((self.path, self.model is None))

    monkeypatch.setattr(trust.Snapshot, "__init__", spy)
    res = graphopt.optimize(tiny, "fold-constants,copy-weights-buggy{bad=1}", verify="each", output=tmp_path / "o.onnx")
    statuses = [(r.name, r.status) for r in res.report.passes]
    assert statuses == [("fold-constants", "ok"), ("copy-weights-buggy{bad=1}", "rolled-back")]
    disk = [p for p, on_disk in seen if on_disk]
    assert len(disk) == 1 and disk[0].parent.name.startswith("graphopt-snapshots-")  # after fold-constants
    assert not disk[0].parent.exists()  # the temporary snapshot folder is removed at the end
    # the graph restored from the file is the one after fold-constants
    assert len(res.model.graph.node) == 15
    assert not any(t.name.endswith(".copy") for t in res.model.graph.initializer)
    _outputs_equal(tiny, res.model)
    # the reproducer's model is that snapshot: the model before the failing pass
    assert (tmp_path / "o.repro" / "model.onnx.data").exists()  # external data copied with the snapshot
    rm = ir.load(tmp_path / "o.repro" / "model.onnx")
    assert len(rm.graph.node) == 15 and lineage.of_model(rm)
    r = cli("optimize", "--replay", str(tmp_path / "o.repro"))
    assert r.exit_code == 1 and "reproduced" in r.output


def test_verify_each_rolls_back_a_crash_and_end_mode_reports_it(tiny, plugin, tmp_path):
    pipe = "fold-constants,crash-after-mutating,dce"
    r = cli("optimize", tiny, "-o", str(tmp_path / "e.onnx"), "--passes", pipe, "--load-plugin", plugin, "--verify", "each")
    assert r.exit_code == 0, r.output
    assert "crashed: crash-after-mutating: ValueError: boom" in r.output and "(rolled back)" in r.output
    m = onnx.load(str(tmp_path / "e.onnx"))
    assert "Sigmoid" not in {n.op_type for n in m.graph.node}  # the half-done mutation is undone
    _outputs_equal(tiny, m)
    r = cli("optimize", tiny, "-o", str(tmp_path / "x.onnx"), "--passes", pipe, "--load-plugin", plugin)
    assert r.exit_code == 3 and "crashed" in r.output and "x.repro" in r.output
    man = json.loads((tmp_path / "x.repro" / "repro.json").read_text())
    assert man["kind"] == "crash" and man["pipeline"] == "fold-constants,crash-after-mutating"
    assert man["model_is"] == "the input model"
    r = cli("optimize", "--replay", str(tmp_path / "x.repro"))
    assert r.exit_code == 3 and "reproduced: pass 'crash-after-mutating' crashed: ValueError: boom" in r.output
    # without verification the input is read as a skeleton (weights left in the file's bytes): the
    # reproducer still gets the whole input model
    r = cli("optimize", tiny, "-o", str(tmp_path / "y.onnx"), "--passes", pipe, "--load-plugin", plugin, "--verify", "off")
    assert r.exit_code == 3 and "y.repro" in r.output
    assert onnx.load(str(tmp_path / "y.repro" / "model.onnx")) == onnx.load(tiny)


def test_lossy_passes_are_held_to_their_share_of_the_budget(tiny, plugin):
    # two lossy passes share min-cosine 0.98: each may use 0.01 of cosine against the model before it
    res = graphopt.optimize(tiny, "fold-constants,perturb-weights{scale=0.001},perturb-weights{scale=3}",
                            verify="each", min_cosine=0.98)
    recs = {r.name: r for r in res.report.passes}
    assert recs["perturb-weights{scale=0.001}"].status == "ok"
    assert "budget share" in recs["perturb-weights{scale=0.001}"].detail
    bad = recs["perturb-weights{scale=3}"]
    assert bad.status == "rolled-back" and "< 0.990000" in bad.detail, bad.detail
    assert res.verification.status == "passed" and res.verification.outputs[0].cosine > 0.99


def test_budget_share_splits_the_deficit():
    from graphopt import Budget

    assert trust.budget_share(Budget(min_cosine=0.98), 2) == (pytest.approx(0.99), None)
    assert trust.budget_share(Budget(min_top1_agreement=0.9), 4)[1] == pytest.approx(0.975)
    assert trust.budget_share(Budget(), 1) == (pytest.approx(0.99), pytest.approx(0.99))  # the verify default


# ---------------------------------------------------------------------------------------------
# Reproducers
# ---------------------------------------------------------------------------------------------


def test_reproducer_replays_the_rolled_back_pass(tiny, plugin, tmp_path):
    repro = tmp_path / "here"
    r = cli("optimize", tiny, "-o", str(tmp_path / "o.onnx"), "--passes", PIPE, "--load-plugin", plugin,
            "--verify", "each", "--repro-dir", str(repro))
    assert r.exit_code == 0
    files = sorted(p.name for p in repro.iterdir())
    assert files == ["inputs.npz", "model.onnx", "pipeline.txt", "report.json", "repro.json"]
    assert (repro / "pipeline.txt").read_text().strip() == "copy-weights-buggy"
    man = json.loads((repro / "repro.json").read_text())
    assert man["kind"] == "verification" and man["exact"] is True and man["rewrites_before"] == 2
    assert str(Path(plugin).resolve()) in man["plugins"]  # every plugin this process loaded
    # the model in the folder is the one before the failing pass: it verifies against the input
    _outputs_equal(tiny, str(repro / "model.onnx"))
    r = cli("optimize", "--replay", str(repro))
    assert r.exit_code == 1, r.output
    assert "reproduced: output 'logits': max_abs" in r.output
    rep = trust.replay(repro)
    assert rep.reproduced and rep.metrics[0].cosine < 0


def test_reproducer_of_a_failed_final_verification(tiny, plugin, tmp_path):
    r = cli("optimize", tiny, "-o", str(tmp_path / "m.onnx"), "--passes", PIPE, "--load-plugin", plugin)
    assert r.exit_code == 1 and "reproducer: " in r.output
    repro = tmp_path / "m.repro"
    assert (repro / "pipeline.txt").read_text().strip() == PIPE
    r = cli("optimize", "--replay", str(repro))
    assert r.exit_code == 1 and "reproduced" in r.output
    # a fixed pass no longer reproduces: replay says so and exits 0
    man = json.loads((repro / "repro.json").read_text())
    man["pipeline"] = "fold-constants,dce,copy-weights-buggy{bad=99}"
    (repro / "repro.json").write_text(json.dumps(man))
    r = cli("optimize", "--replay", str(repro))
    assert r.exit_code == 0 and "not reproduced" in r.output


def test_replay_rejects_a_folder_that_is_not_a_reproducer(tmp_path):
    r = cli("optimize", "--replay", str(tmp_path))
    assert r.exit_code == 2 and "not a graphopt reproducer" in r.output


# ---------------------------------------------------------------------------------------------
# Bisect and the rewrite budget
# ---------------------------------------------------------------------------------------------


def test_bisect_names_the_pass_and_the_rewrite(tiny, plugin):
    r = cli("bisect", tiny, "--passes", PIPE, "--load-plugin", plugin, "--json")
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert d["status"] == "found"
    total = d["total_rewrites"]
    assert total == 5  # 2 folds + 3 copies (dce finds nothing dead after fold-constants' own cleanup)
    assert d["first_bad"] == {"index": 5, "pass": "copy-weights-buggy", "description": "copy weight /fc/Transpose_output_0 of /fc/MatMul"}
    assert d["changes"]["changed"] == ["/fc/MatMul (MatMul)"]
    assert d["verifications"] <= math.ceil(math.log2(total)) + 2
    r = cli("bisect", tiny, "--passes", "fold-constants,copy-weights-buggy{bad=1}", "--load-plugin", plugin)
    assert "first bad rewrite: #3 of 5 (rewrite 1 of that run of the pass), pass copy-weights-buggy: copy weight conv1.weight of /conv1/Conv" in r.output
    assert "changed: /conv1/Conv (Conv)" in r.output and "logits: max_abs=" in r.output


def test_bisect_of_a_good_pipeline(tiny):
    r = cli("bisect", tiny, "-O", "1")
    assert r.exit_code == 0 and "nothing to bisect" in r.output


def test_rewrite_limit_is_honoured_and_logged(tiny, plugin):
    model = ir.load(tiny)
    full = None
    for limit in [None, 0, 1, 2, 3, 4]:
        g = ir.import_model(model)
        ctx = PassContext(opset=ir.graph_opset(g), rewrite_limit=limit)
        ctx.model_template = model
        PassManager("fixpoint(fold-constants,dce),copy-weights-buggy{bad=99},dce").run(g, ctx)
        if full is None:
            full = list(ctx.rewrite_log)
            assert [i for i, _, _ in full] == list(range(1, len(full) + 1))
            assert {p for _, p, _ in full} == {"fold-constants", "copy-weights-buggy"}
            continue
        assert ctx.rewrites == min(limit, len(full))
        assert ctx.rewrite_log == full[:limit]  # the same rewrites in the same order: bisectable


def test_dce_counts_one_rewrite_and_stops_at_the_limit():
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) { d = Neg(x)  y = Relu(x) }""")
    for limit, nodes, rewrites in [(None, 1, 1), (0, 2, 0)]:
        g = ir.import_model(m)
        ctx = PassContext(rewrite_limit=limit)
        PassManager("dce").run(g, ctx)
        assert (len(g.nodes), ctx.rewrites) == (nodes, rewrites)


# ---------------------------------------------------------------------------------------------
# Divergence localisation
# ---------------------------------------------------------------------------------------------


def test_intermediates_name_the_first_diverging_node(tiny, plugin, tmp_path):
    broken = tmp_path / "broken.onnx"
    graphopt.optimize(tiny, "fold-constants,copy-weights-buggy{bad=2}", verify="off", output=broken)
    r = cli("verify", tiny, str(broken), "--intermediates", "--json")
    assert r.exit_code == 1
    d = json.loads(r.output)["intermediates"]
    first = d["first_divergence"]
    assert (first["node"], first["op"], first["tensor"]) == ("/conv2/Conv", "Conv", "/conv2/Conv_output_0")
    assert first["cosine"] < 0 and first["max_abs"] > first["tolerance"]
    assert [(i["tensor"], i["ok"]) for i in d["inputs_of_first"]] == [("/relu1/Relu_output_0", True)]
    assert "made by pass 'copy-weights-buggy'" in d["b_producer"]
    r = cli("verify", tiny, str(broken), "--intermediates")
    assert "first divergence: node '/conv2/Conv' (Conv)" in r.output
    good = tmp_path / "good.onnx"
    graphopt.optimize(tiny, "O1", output=good)
    r = cli("verify", tiny, str(good), "--intermediates")
    assert r.exit_code == 0 and "no shared tensor diverges" in r.output


# ---------------------------------------------------------------------------------------------
# Lineage
# ---------------------------------------------------------------------------------------------


def test_lineage_tags_created_and_changed_nodes_only():
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,2] x) => (float[2,2] y) <float[2,2] w = {1,2,3,4}> { t = Transpose(w)  a = MatMul(x, t)  y = Relu(a) }""")
    res = graphopt.optimize(m, "fold-constants,dce")
    tags = lineage.of_model(res.model)
    assert tags == {next(n.name or n.output[0] for n in res.model.graph.node if n.op_type == "MatMul"): "fold-constants"}
    onnx.checker.check_model(res.model, full_check=True)
    # the tags survive import/export and a second run adds to the chain
    g = ir.import_model(res.model)
    mm = next(n for n in g.nodes if n.op == "MatMul")
    assert lineage.passes_of(mm) == ["fold-constants"]
    ctx = PassContext()
    before = lineage.snapshot(g)
    mm.attrs["dummy"] = 1
    assert lineage.mark(g, before, "other")[0] == 1
    out = ir.export_graph(g, res.model)
    meta = {e.key: e.value for e in next(n for n in out.graph.node if n.op_type == "MatMul").metadata_props}
    assert meta == {"graphopt.pass": "other", "graphopt.passes": "fold-constants,other"}
    del ctx


def test_lineage_reading_a_weight_is_no_change():
    # (w holds 4 floats as raw_data: imported lazily, loaded when a pass first reads it)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,2] x) => (float[2,2] y) <float[2,2] w = {1,2,3,4}, float[2,2] v = {1,2,3,4}> {
        a = MatMul(x, w)  b = MatMul(a, v)  y = Relu(b) }""")
    m = onnx.load_from_string(onnx.shape_inference.infer_shapes(m).SerializeToString())
    for t in m.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))  # raw_data
    g = ir.import_model(m)
    a, b = (n for n in g.nodes if n.op == "MatMul")
    w, v = a.inputs[1], b.inputs[1]
    before = lineage.snapshot(g)
    assert type(w._values).__name__ == "RawValues"
    assert isinstance(w.values, np.ndarray) and w.values is w._values  # loaded: the same values, a new object
    v.values = v.values * 2  # new values: a change of the node that reads them
    count, after = lineage.mark(g, before, "p")
    assert count == 1 and lineage.passes_of(b) == ["p"] and not lineage.passes_of(a)
    w.values = w.values + 1  # replacing loaded values is a change too
    assert lineage.mark(g, after, "q")[0] == 1 and lineage.passes_of(a) == ["q"]


def test_lineage_on_the_tiny_cnn_runs_in_onnxruntime(tiny, plugin):
    res = graphopt.optimize(tiny, "fold-constants,copy-weights-buggy{bad=99}")
    tags = lineage.of_model(res.model)
    assert tags["/conv1/Conv"] == "copy-weights-buggy" and "/relu1/Relu" not in tags
    assert res.verification.status == "passed"  # onnxruntime loads a model with node metadata_props


@pytest.mark.corpus
def test_verify_each_on_a_corpus_model(shared_dir, tmp_path):
    path = shared_dir / "corpus" / "squeezenet1_1.onnx"
    if not path.exists():
        pytest.skip("squeezenet1_1.onnx is not in the corpus")
    res = graphopt.optimize(str(path), "O2", verify="each", output=tmp_path / "o.onnx")
    assert all(r.status == "ok" for r in res.report.passes)
    assert res.verification.status == "passed"
