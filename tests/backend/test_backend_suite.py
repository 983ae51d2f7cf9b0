"""The ONNX backend test data as a regression suite (issue 2's -O0 round trip, issue 4's bar).

Default run: a fixed, varied sample of 150 cases at -O0 and -O2.  ``-m slow``: every case (about
2,000; a few minutes on 2 cores).  ``python benchmarks/backend_suite.py -O2`` prints the counts.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

import harness

PIPELINES = ["O0", "O2"]


@pytest.fixture(scope="module")
def cases():
    return harness.load_cases()


def _check(results, min_reproduced):
    s = harness.summarize(results)
    # a harness regression that skips everything must not look like success
    assert s["reproduced_by_onnxruntime"] >= min_reproduced, s
    assert s["failed"] == 0, f"{s}\n" + harness.failures_text(results)
    return s


def test_case_inventory(cases):
    kinds = {k: sum(c.kind == k for c in cases) for k in harness.KINDS}
    assert kinds["node"] >= 1800 and sum(c.name.endswith("_expanded") for c in cases) >= 300, kinds
    assert kinds["simple"] >= 20 and kinds["pytorch-converted"] >= 80 and kinds["pytorch-operator"] >= 30, kinds
    assert kinds["light"] == 9, kinds
    ids = {c.id for c in cases}
    assert len(ids) == len(cases)
    assert [a for a in harness.ALWAYS if a not in ids] == []  # the sample's control-flow/sequence/... picks


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_fast_sample(cases, pipeline):
    sample = harness.fast_sample(cases, 150)
    assert len(sample) == 150
    results = harness.run_suite(sample, pipeline, workers=2)
    s = _check(results, min_reproduced=100)
    if pipeline == "O2":
        assert s["pass"] > 0  # some case must actually be rewritten, else the sample proves nothing


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_full_suite(cases, pipeline):
    results = harness.run_suite(cases, pipeline, workers=2)
    _check(results, min_reproduced=1600)


BREAK_ADD = textwrap.dedent('''
    from dataclasses import dataclass
    from graphopt import Pass, PassResult, register_pass

    @register_pass
    class BreakAdd(Pass):
        name = "test-break-add"
        description = "test only: turns Add into Sub"

        @dataclass(frozen=True)
        class Options:
            pass

        def run(self, graph, ctx):
            n = 0
            for node in graph.nodes:
                if node.op == "Add":
                    node.op = "Sub"
                    n += 1
            return PassResult(n > 0, {"broken": n})

    @register_pass
    class Crash(Pass):
        name = "test-crash"
        description = "test only: raises"

        @dataclass(frozen=True)
        class Options:
            pass

        def run(self, graph, ctx):
            raise RuntimeError("boom")
''')


def test_harness_reports_wrong_numbers_and_crashes(cases, tmp_path):
    """The suite must be able to fail: a pass that breaks numerics or crashes is caught and named."""
    plugin = tmp_path / "break_plugin.py"
    plugin.write_text(BREAK_ADD)
    chosen = [c for c in cases if c.id in ("node/test_add", "node/test_add_bcast", "node/test_relu")]
    assert len(chosen) == 3
    # forked workers: the test passes register in the children only, not in this process
    broken = {r.case: r for r in harness.run_suite(chosen, "test-break-add", workers=2, plugins=[str(plugin)])}
    assert broken["node/test_add"].status == "failed" and broken["node/test_add"].reason.startswith("wrong:")
    assert broken["node/test_add_bcast"].status == "failed"
    assert broken["node/test_relu"].status == "unchanged"
    crashed = harness.run_suite(chosen, "test-crash", workers=2, plugins=[str(plugin)])
    assert all(r.status == "failed" and "boom" in r.reason and r.reason.startswith("crash:") for r in crashed)


def test_compare_follows_the_backend_rule():
    f = np.array([1.0, np.nan, 3.0], np.float32)
    assert harness.compare_one(f, f.copy(), 1e-3, 1e-7, "y") is None  # NaN == NaN
    assert harness.compare_one(f, f * (1 + 5e-4), 1e-3, 1e-7, "y") is None
    assert "values differ" in harness.compare_one(f, f * (1 + 5e-3), 1e-3, 1e-7, "y")
    assert "shape" in harness.compare_one(f, f.reshape(1, 3), 1e-3, 1e-7, "y")
    assert "dtype" in harness.compare_one(f, f.astype(np.float64), 1e-3, 1e-7, "y")
    assert "sequence length" in harness.compare_one([f], [f, f], 1e-3, 1e-7, "y")
    assert harness.compare_one(None, None, 1e-3, 1e-7, "y") is None
    assert "optional" in harness.compare_one(None, f, 1e-3, 1e-7, "y")
    s = np.array(["a", "b"], dtype=object)
    assert "string" in harness.compare_one(s, np.array(["a", "c"], dtype=object), 1e-3, 1e-7, "y")
