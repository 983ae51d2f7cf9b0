"""graphopt bench: the CLI on the tiny fixture (few rounds) and the measuring core. No timing assertions."""
from __future__ import annotations

import json
import subprocess
import sys

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
    stats = interleaved_latency(runners, rounds=4, warmup=1, min_sample_s=0.0, rewarm_below_s=0.0, shuffle=False)
    assert [s.rounds for s in stats] == [4, 4, 4]
    assert order[:3] == ["A", "B", "C"]  # warm-up
    assert order[3:] == ["A", "B", "C"] * 4  # one call per sample, interleaved
    order.clear()
    interleaved_latency(runners, rounds=2, warmup=1, min_sample_s=0.0, rewarm_below_s=1.0, shuffle=False)
    assert order[3:] == ["A", "A", "B", "B", "C", "C"] * 2  # fast runners: an untimed call re-warms the caches
    order.clear()
    interleaved_latency(runners, rounds=30, warmup=1, min_sample_s=0.0, rewarm_below_s=0.0)
    rounds = [tuple(order[k:k + 3]) for k in range(3, len(order), 3)]
    assert all(sorted(r) == ["A", "B", "C"] for r in rounds)  # every runner once per round
    assert len(set(rounds)) > 1  # in a shuffled order
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


# ---------------------------------------------------------------------------------------------------
# benchmarks/compare.py: the worker, the graph reading and the markdown (the full run is slow-marked)
# ---------------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPARE = REPO / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    import importlib.util

    spec = importlib.util.spec_from_file_location("graphopt_bench_compare", COMPARE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_compare_worker_floor_and_crash(compare, tiny, tmp_path):
    ok = compare.run_tool("floor", Path(tiny), tmp_path / "floor.onnx", {}, timeout=120)
    assert "error" not in ok, ok
    assert ok["seconds"] >= 0 and ok["peak_rss"] > 0 and (tmp_path / "floor.onnx").is_file()
    bad = compare.run_tool("graphopt", Path(tiny), tmp_path / "x.onnx", {"pipeline": "no-such-pass"}, timeout=120)
    assert "no-such-pass" in bad["error"] and "\n" not in bad["error"]  # one line, the run goes on


def test_attention_dims(compare):
    import onnx
    import onnx.parser

    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[1,8] input_ids) => (float[1,8,8] y) <float[32,16] emb = {0.0}, float scale = {0.25}> {
            ids2 = Reshape(input_ids, shp)
            x = Gather(emb, ids2)
            xt = Transpose<perm=[0,2,1]>(x)
            s = MatMul(x, xt)
            y = Mul(s, scale)
        }
    """.replace("Reshape(input_ids, shp)", "Identity(input_ids)"))
    assert compare.attention_dims(m) == (1, 16)  # hidden 16 from the table, head_dim 1/0.25^2 = 16


def test_compare_markdown_tables(compare):
    tools = {
        "original": {"nodes": 10, "bytes": 2**20, "latency_disable": {"median_ms": 2.0, "p10_ms": 1.5, "ratio_median": 1.0, "ratio_p10": 1.0}},
        "control": {"latency_disable": {"median_ms": 2.1, "p10_ms": 1.5, "ratio_median": 1.05, "ratio_p10": 1.0}},
        "floor": {"seconds": 0.01, "peak_rss": 50 * 2**20},
        "graphopt-O2": {"nodes": 8, "bytes": 2**20, "seconds": 0.5, "peak_rss": 90 * 2**20,
                        "deviation": {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "shapes_equal": True},
                        "latency_disable": {"median_ms": 1.8, "p10_ms": 1.4, "ratio_median": 0.9, "ratio_p10": 0.93}},
        "onnxsim": {"error": "RuntimeError: boom"},
    }
    data = {"environment": {"date": "d", "python": "3", "versions": {"onnx": "1"}, "cpu": "c", "cores": 2, "loadavg_start": [1.0, 1.0, 1.0],
                            "presets": {"O2": "O1"}, "passes": ["dce"]},
            "config": {"quick": True, "rounds": 3, "latency_budget_s": 1, "min_sample_s": 0.002, "timeout_s": 10},
            "elapsed_s": 60, "complete": True, "models": [{"model": "m", "kind": "image", "tools": tools}]}
    data["noise"] = compare.noise_summary(data["models"])
    compare.floor_ratios(tools)
    assert tools["graphopt-O2"]["x_floor"] == 50 and "x_floor" not in tools["original"]
    md = compare.markdown(data)
    assert "## Node count" in md and "| m | 10 |  | 8 | fail |" in md  # floor has no node count here
    assert "## Latency ratio vs original, ORT_DISABLE_ALL, median" in md and "| 0.900 |" in md
    assert "## Optimizer wall time / floor" in md and "| m | 50.0 | fail |" in md
    assert "optimizer wall time: one run per tool" in md
    assert "**noise**" in md and "1.050" in md
    assert "m / onnxsim: RuntimeError: boom" in md


@pytest.mark.slow
def test_compare_end_to_end_on_tiny(tmp_path, fixtures_dir, compare):
    out = tmp_path / "res"
    p = subprocess.run([sys.executable, str(COMPARE), "--models", str(fixtures_dir / "tiny_cnn.onnx"), "--rounds", "2",
                        "--latency-budget", "0.2", "--int8", "--time-runs", "2", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(out.with_suffix(".json").read_text())
    tools = d["models"][0]["tools"]
    assert {"floor", "graphopt-O1", compare.NOVERIFY, "onnxsim", "onnxslim", "onnxoptimizer", "ort-basic", "ort-all", "control"} <= set(tools)
    assert tools["control"]["latency_all"]["ratio_median"] > 0
    assert tools[compare.NOVERIFY]["verification"] == "off" and tools[compare.NOVERIFY]["x_floor"] > 0
    runs = tools["floor"]["seconds_runs"]  # --time-runs 2: the median of both runs
    assert len(runs) == 2 and tools["floor"]["seconds"] == pytest.approx(sum(runs) / 2)
    assert "latency_all" not in tools[compare.NOVERIFY]  # the verified -O1's model: not timed twice
    assert "## Node count" in out.with_suffix(".md").read_text()
