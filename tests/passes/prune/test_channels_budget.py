"""prune-channels: budget back-off (ratio lowered until the user's budget holds) and target-latency."""
from __future__ import annotations

import re

import numpy as np
import pytest

from graphopt import api
from graphopt.pass_base import Budget

from tests.passes.prune.prune_helpers import cosine, init, make_model, run, run_pipeline
from tests.passes.prune.test_channels import chain_model

RNG = np.random.default_rng(1)


def test_backoff_lowers_ratio_until_min_cosine_holds():
    m = chain_model()  # channels 1, 4, 5, 6 of the first conv are dead: removing 4 of 8 is exact
    out, recs = run_pipeline(m, "prune-channels{ratio=0.75,round-to=1,criterion=l1}", budget=Budget(min_cosine=0.9999))
    rec = recs[0]
    assert rec.changed and rec.stats["budget_backoffs"] == 1
    assert any("fails at ratio=0.75" in n for n in rec.notes)
    assert any("holds at ratio=0.562" in n for n in rec.notes)
    assert init(out, "w1").shape[0] == 4
    x = {"x": RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)}
    assert cosine(run(out, x)["y"], run(m, x)["y"]) >= 0.9999


def test_no_budget_no_backoff():
    m = chain_model()
    out, recs = run_pipeline(m, "prune-channels{ratio=0.75,round-to=1,criterion=l1}")
    assert init(out, "w1").shape[0] == 2 and "budget_backoffs" not in recs[0].stats


def test_backoff_gives_up_unchanged_when_nothing_holds():
    m = chain_model(dead=())
    out, recs = run_pipeline(m, "prune-channels{ratio=0.5,round-to=1,criterion=l1}", budget=Budget(min_cosine=0.999999))
    assert not recs[0].changed and init(out, "w1").shape[0] == 8
    assert any("budget not reached" in n for n in recs[0].notes)


def test_backoff_off_option_leaves_it_to_the_verifier():
    m = chain_model()
    out, recs = run_pipeline(m, "prune-channels{ratio=0.75,round-to=1,criterion=l1,backoff=false}", budget=Budget(min_cosine=0.9999))
    assert init(out, "w1").shape[0] == 2


def test_digits_cnn_backoff_to_accuracy_budget(shared_dir, tmp_path):
    d = np.load(shared_dir / "digits" / "digits_data.npz")
    np.savez(tmp_path / "calib.npz", input=d["x_calib"])
    np.savez(tmp_path / "eval.npz", input=d["x_test"], labels=d["y_test"])
    res = api.optimize(str(shared_dir / "digits" / "digits_cnn.onnx"), "O2,prune-channels{ratio=0.8,round-to=1}",
                       calibration=str(tmp_path / "calib.npz"), eval_data=str(tmp_path / "eval.npz"), max_accuracy_drop=0.005)
    rec = next(r for r in res.report.passes if r.name.startswith("prune-channels"))
    assert rec.changed and rec.stats["budget_backoffs"] >= 1
    held = [n for n in rec.notes if " holds at ratio=" in n]
    assert held and float(re.search(r"ratio=([0-9.]+)", held[0]).group(1)) < 0.8
    assert res.verification.status == "passed"
    assert res.verification.accuracy["accuracy_ref"] - res.verification.accuracy["accuracy"] <= 0.005


CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 32, 32, 32] x) => (float[1, 16, 32, 32] y) <float[64, 32, 3, 3] w1, float[64, 64, 3, 3] w2, float[16, 64, 1, 1] w3> {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    r = Relu (a)
    b = Conv <pads = [1, 1, 1, 1]> (r, w2)
    s = Relu (b)
    y = Conv (s, w3)
}
"""


def test_target_latency_measures_and_reports():
    m = make_model(CONVS, w1=RNG.standard_normal((64, 32, 3, 3)) * 0.1, w2=RNG.standard_normal((64, 64, 3, 3)) * 0.1,
                   w3=RNG.standard_normal((16, 64, 1, 1)) * 0.1)
    out, recs = run_pipeline(m, "prune-channels{target-latency=0.75,criterion=l1}")
    rec = recs[0]
    note = next(n for n in rec.notes if n.startswith("target-latency 0.75: measured"))
    chosen = re.search(r"ratio=([0-9.]+) \(([0-9.]+)x\)", note)
    assert chosen, note
    r, x = float(chosen.group(1)), float(chosen.group(2))
    assert rec.changed and rec.stats["groups_pruned"] == 2
    assert init(out, "w1").shape[0] < 64 and r > 0
    if "target not reached" not in note:
        assert x <= 0.75
    y = run(out, {"x": RNG.standard_normal((1, 32, 32, 32)).astype(np.float32)})["y"]
    assert y.shape == (1, 16, 32, 32)


def test_target_latency_bad_value():
    from graphopt.errors import PipelineError

    with pytest.raises(PipelineError):
        run_pipeline(chain_model(), "prune-channels{target-latency=0}")


@pytest.mark.slow
def test_resnet18_target_latency(shared_dir):
    from graphopt import ir

    m = ir.load(shared_dir / "corpus" / "resnet18.onnx")
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    out, recs = run_pipeline(m, "prune-channels{target-latency=0.75}", calib={"input": x}, batch=1,
                             budget=Budget(min_cosine=0.5))
    rec = recs[0]
    note = next(n for n in rec.notes if n.startswith("target-latency 0.75: measured"))
    x_ = float(re.search(r"chose .*ratio=[0-9.]+ \(([0-9.]+)x\)", note).group(1))
    assert rec.changed and rec.stats["groups_pruned"] == 12
    if "target not reached" not in note:
        assert x_ <= 0.75
    assert rec.stats["flops_after"] < 0.9 * rec.stats["flops_before"]
    y = run(out, {"input": x[:1]})["output"]
    assert y.shape == (1, 1000) and np.isfinite(y).all()
