"""The command line: every bad input of issue 2 point 8 gives one line, exit 2, nothing written, input untouched."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper



def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path, fixtures_dir) -> Path:
    p = tmp_path / "m.onnx"
    shutil.copy(fixtures_dir / "tiny_cnn.onnx", p)
    return p


def _assert_one_line_error(r, code=2, contains=""):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("graphopt: error: ")
    assert "Traceback" not in r.stderr
    assert contains in lines[0], lines[0]


def _write_model(path: Path, nodes, x_shape, y_name, y_shape, initializers=()) -> Path:
    """A one-input, one-output float model (opset 17), written without any check: the bad inputs below."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(y_name, onnx.TensorProto.FLOAT, y_shape)], list(initializers))
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _cycle_model(tmp_path) -> Path:
    return _write_model(tmp_path / "cycle.onnx", [helper.make_node("Add", ["x", "b"], ["a"]),
                                                  helper.make_node("Relu", ["a"], ["b"])], [2], "b", [2])


def _duplicate_model(tmp_path) -> Path:
    return _write_model(tmp_path / "dup.onnx", [helper.make_node("Relu", ["x"], ["a"]),
                                                helper.make_node("Neg", ["x"], ["a"])], [2], "a", [2])


def _checker_fails_model(tmp_path) -> Path:
    # Relu with two inputs: parses fine, fails onnx.checker
    return _write_model(tmp_path / "bad_checker.onnx", [helper.make_node("Relu", ["x", "x"], ["y"])], [2], "y", [2])


def _short_weight_model(tmp_path) -> Path:
    # a 64x64 weight whose raw_data holds 100 bytes: parses, fails onnx.checker
    w = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    w.raw_data = w.raw_data[:100]
    return _write_model(tmp_path / "short_weight.onnx", [helper.make_node("MatMul", ["x", "W"], ["y"])], [2, 64], "y",
                        [2, 64], [w])


def _missing_external(tmp_path, fixtures_dir) -> Path:
    m = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save_model(m, d / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    (d / "m.data").unlink()
    return d / "m.onnx"


@pytest.mark.parametrize("case", [
    "missing", "directory", "empty", "truncated", "not-onnx", "checker", "short-weight", "cycle", "duplicate", "missing-external-data",
    "output-is-input", "output-folder-missing", "output-unwritable", "unknown-pass", "bad-option", "bad-pipeline",
    "missing-o", "bad-input-shape", "bad-inputs-file",
])
def test_bad_input(case, tmp_path, model, fixtures_dir):
    before = _md5(model)
    out = tmp_path / "out.onnx"
    args = None
    expect = ""
    if case == "missing":
        args, expect = [tmp_path / "nope.onnx", "-o", out], "no such file"
    elif case == "directory":
        args, expect = [tmp_path, "-o", out], "is a directory"
    elif case == "empty":
        (tmp_path / "e.onnx").write_bytes(b"")
        args, expect = [tmp_path / "e.onnx", "-o", out], "empty file"
    elif case == "truncated":
        (tmp_path / "t.onnx").write_bytes(model.read_bytes()[: len(model.read_bytes()) // 2])
        args, expect = [tmp_path / "t.onnx", "-o", out], "t.onnx"
    elif case == "not-onnx":
        (tmp_path / "n.onnx").write_text("this is not a model\n" * 10)
        args, expect = [tmp_path / "n.onnx", "-o", out], "not an ONNX model"
    elif case == "checker":
        args, expect = [_checker_fails_model(tmp_path), "-o", out], "onnx.checker"
    elif case == "short-weight":
        args, expect = [_short_weight_model(tmp_path), "-o", out], "raw_data size (100 bytes) is too small"
    elif case == "cycle":
        args, expect = [_cycle_model(tmp_path), "-o", out], ""
    elif case == "duplicate":
        args, expect = [_duplicate_model(tmp_path), "-o", out], ""
    elif case == "missing-external-data":
        args, expect = [_missing_external(tmp_path, fixtures_dir), "-o", out], "external data"
    elif case == "output-is-input":
        args, expect = [model, "-o", model], "refusing to overwrite"
    elif case == "output-folder-missing":
        args, expect = [model, "-o", tmp_path / "no" / "o.onnx"], "does not exist"
    elif case == "output-unwritable":
        args, expect = [model, "-o", "/proc/graphopt-test.onnx"], "not writable"
    elif case == "unknown-pass":
        args, expect = [model, "-o", out, "--passes", "dce,fold-konstants"], "unknown pass"
    elif case == "bad-option":
        args, expect = [model, "-o", out, "--passes", "fold-constants{size-limit=huge}"], "size-limit"
    elif case == "bad-pipeline":
        args, expect = [model, "-o", out, "--passes", "fixpoint(dce"], "pipeline"
    elif case == "missing-o":
        args, expect = [model], "-o"
    elif case == "bad-input-shape":
        args, expect = [model, "-o", out, "--input-shape", "input=1x3"], "--input-shape"
    elif case == "bad-inputs-file":
        np.savez(tmp_path / "wrong.npz", other=np.zeros(3, np.float32))
        args, expect = [model, "-o", out, "--inputs", tmp_path / "wrong.npz"], "missing input"
    r = _cli("optimize", *args)
    _assert_one_line_error(r, 2, expect)
    assert not out.exists()
    assert _md5(model) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_cycle_and_duplicate_messages(tmp_path):
    r = _cli("inspect", _cycle_model(tmp_path))
    _assert_one_line_error(r, 2, "cycle")
    r = _cli("inspect", _duplicate_model(tmp_path))
    _assert_one_line_error(r, 2, "duplicate tensor name")


def test_optimize_ok_and_report(tmp_path, model, fixtures_dir):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = _cli("optimize", model, "-o", out, "--report", rep, "--inputs", fixtures_dir / "tiny_cnn_inputs.npz")
    assert r.returncode == 0, r.stderr
    assert "verification: passed" in r.stdout
    onnx.checker.check_model(onnx.load(out), full_check=True)
    d = json.loads(rep.read_text())
    assert d["verification"]["status"] == "passed"
    assert d["before"]["nodes"] >= d["after"]["nodes"]
    assert d["passes"] and all("seconds" in p for p in d["passes"])


def test_quiet(tmp_path, model):
    r = _cli("optimize", model, "-o", tmp_path / "o.onnx", "-q", "-O1")
    assert r.returncode == 0 and r.stdout == ""


def test_levels_and_passes_exclusive(tmp_path, model):
    r = _cli("optimize", model, "-o", tmp_path / "o.onnx", "-O1", "--passes", "dce")
    _assert_one_line_error(r, 2, "either -O or --passes")


def test_O0_is_identity(tmp_path, model):
    out = tmp_path / "o.onnx"
    r = _cli("optimize", model, "-o", out, "-O0", "-q")
    assert r.returncode == 0, r.stderr
    a, b = onnx.load(model), onnx.load(out)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]


def test_verification_failure_exit_1_writes_nothing(tmp_path, model):
    plugin = tmp_path / "breaker.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "import numpy as np, onnx_graphsurgeon as gs\n"
        "from graphopt import Pass, PassResult, register_pass\n"
        "@register_pass\n"
        "class Breaker(Pass):\n"
        "    name = 'test-breaker'\n"
        "    description = 'negates the first Conv weight (a deliberately wrong pass)'\n"
        "    @dataclass(frozen=True)\n"
        "    class Options:\n"
        "        pass\n"
        "    def run(self, graph, ctx):\n"
        "        for n in graph.nodes:\n"
        "            if n.op == 'Conv':\n"
        "                w = n.inputs[1]\n"
        "                w.values = -np.asarray(w.values)\n"
        "                return PassResult(True, {'broken': 1})\n"
        "        return PassResult(False)\n")
    out = tmp_path / "o.onnx"
    r = _cli("optimize", model, "-o", out, "--load-plugin", plugin, "--passes", "test-breaker")
    assert r.returncode == 1
    assert "verification failed" in r.stderr and "logits" in r.stderr and "max_abs" in r.stderr
    assert not out.exists()


def test_inspect(model):
    r = _cli("inspect", model)
    assert r.returncode == 0, r.stderr
    assert "Conv" in r.stdout and "input" in r.stdout and "batch" in r.stdout
    r = _cli("inspect", model, "--json")
    d = json.loads(r.stdout)
    assert d["ops"]["Conv"] == 2 and d["inputs"][0]["shape"] == ["batch", 3, 16, 16]


def test_verify_command(tmp_path, model):
    out = tmp_path / "o.onnx"
    assert _cli("optimize", model, "-o", out, "-q").returncode == 0
    r = _cli("verify", model, out)
    assert r.returncode == 0 and "passed" in r.stdout
    # a different model: fails with exit 1
    m = onnx.load(model)
    for t in m.graph.initializer:
        if t.name == "fc.bias":
            arr = onnx.numpy_helper.to_array(t) + 1.0
            t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), t.name))
    other = tmp_path / "other.onnx"
    onnx.save(m, other)
    r = _cli("verify", model, other)
    assert r.returncode == 1 and "failed" in r.stdout


def test_passes_command():
    r = _cli("passes")
    assert r.returncode == 0 and "fold-constants" in r.stdout and "dce" in r.stdout
    r = _cli("passes", "--preset", "O1")
    assert r.returncode == 0 and "fold-constants" in r.stdout


def test_optimize_does_not_import_the_other_commands(model, tmp_path):
    """bench and bisect (and the reproducer machinery) load when asked for, not on every optimize."""
    code = ("import sys; from graphopt.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('graphopt.bench', 'graphopt.trust') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, "optimize", str(model), "-o", str(tmp_path / "o.onnx"), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    listed = _cli("--help")
    assert listed.returncode == 0 and "bench " in listed.stdout and "bisect " in listed.stdout
