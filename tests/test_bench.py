"""graphopt bench: the CLI on the tiny fixture (few rounds) and the measuring core. No timing assertions."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.bench import BenchConfig, LatencyStats, bench_models, interleaved_latency, percentile
from graphopt.cli import main
from graphopt.errors import InputError


@pytest.fixture
def tiny(fixtures_dir):
    return str(fixtures_dir / "tiny_cnn.onnx")


def test_bench_json_two_models(tiny, tmp_path):
    r = CliRunner().invoke(main, ["bench", tiny, tiny, "--rounds", "3", "--warmup", "1", "--json", "--batch", "4"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["config"]["level"] == "all" and d["config"]["threads"] == 1
    a, b = d["models"]
    for m in (a, b):
        assert m["nodes"] == 17
        assert m["latency"]["rounds"] == 3 and len(m["latency"]["samples_ms"]) == 3
        assert m["latency"]["p10_ms"] <= m["latency"]["median_ms"] <= m["latency"]["p90_ms"]
        assert m["throughput"]["batch"] == 4 and m["throughput"]["per_s"] > 0  # tiny_cnn has a dynamic batch
        assert m["session_s"] > 0
        assert "error" not in m["probe"], m["probe"]
        assert m["probe"]["peak_rss"] >= m["probe"]["baseline_rss"] > 0
    assert a["ratios"]["latency"] == 1.0 and a["ratios"]["size"] == 1.0
    assert b["ratios"]["size"] == 1.0 and b["ratios"]["latency"] > 0


def test_bench_table_and_options(tiny, fixtures_dir):
    r = CliRunner().invoke(main, ["bench", tiny, "--rounds", "2", "--ort-level", "disable", "--threads", "1",
                                  "--inputs", str(fixtures_dir / "tiny_cnn_inputs.npz"), "--no-memory"])
    assert r.exit_code == 0, r.output
    assert "level=disable" in r.output and "tiny_cnn.onnx" in r.output and "1.00x" in r.output


def test_bench_bad_path_one_line_exit_2(tmp_path):
    missing = tmp_path / "missing.onnx"
    p = subprocess.run([sys.executable, "-m", "graphopt.cli", "bench", str(missing)], capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such file" in lines[0] and "Traceback" not in p.stderr


def test_bench_not_a_model_exit_2(tiny, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    r = CliRunner().invoke(main, ["bench", tiny, str(bad), "--rounds", "1"])
    assert r.exit_code == 2
    assert "not an ONNX model" in r.output


def test_bench_bad_input_shape_exit_2(tiny):
    r = CliRunner().invoke(main, ["bench", tiny, "--input-shape", "nosuch:1x2", "--rounds", "1", "--no-memory"])
    assert r.exit_code == 2 and "names no model input" in r.output


def test_interleaved_order_and_stats():
    order = []
    runners = [lambda: order.append("A"), lambda: order.append("B"), lambda: order.append("C")]
    stats = interleaved_latency(runners, rounds=4, warmup=1, min_sample_s=0.0, rewarm_below_s=0.0)
    assert [s.rounds for s in stats] == [4, 4, 4]
    assert order[:3] == ["A", "B", "C"]  # warm-up
    assert order[3:] == ["A", "B", "C"] * 4  # one call per sample, interleaved
    order.clear()
    interleaved_latency(runners, rounds=2, warmup=1, min_sample_s=0.0, rewarm_below_s=1.0)
    assert order[3:] == ["A", "A", "B", "B", "C", "C"] * 2  # fast runners: an untimed call re-warms the caches
    with pytest.raises(InputError):
        interleaved_latency(runners, rounds=0)


def test_time_budget_runs_more_rounds():
    stats = interleaved_latency([lambda: None, lambda: None], rounds=2, warmup=1, time_budget_s=0.05, max_rounds=40)
    assert stats[0].rounds == stats[1].rounds
    assert 2 <= stats[0].rounds <= 40


def test_latency_stats_percentiles():
    s = LatencyStats.from_samples([0.001 * i for i in range(1, 11)], calls=1)
    assert s.median_ms == pytest.approx(5.5)
    assert s.p10_ms == pytest.approx(percentile([float(i) for i in range(1, 11)], 10))
    assert s.p10_ms < s.median_ms < s.p90_ms


def test_bench_models_api_rejects_bad_level(tiny):
    with pytest.raises(InputError):
        bench_models([tiny], BenchConfig(level="fast"))
