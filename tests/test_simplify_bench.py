"""benchmarks/simplify.py (issue 4's -O1 speed instrument) runs in each of its modes on the tiny
fixture and prints a row for it. No timing assertions: the figures are only checked to be figures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SIMPLIFY = Path(__file__).resolve().parents[1] / "benchmarks" / "simplify.py"


def _row(args: list[str], model: Path) -> list[str]:
    r = subprocess.run([sys.executable, str(SIMPLIFY), str(model), "--rounds", "1", *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    head, row = r.stdout.splitlines()[-2:]
    assert head.split()[0] == "model" and row.split()[0] == model.stem
    return row.split()


@pytest.mark.parametrize("mode", [["--clock", "cpu", "--floor"], ["--fresh"], ["--fresh", "--no-warmup"], ["--cli"]],
                         ids=["floor", "fresh", "first-call", "cli"])
def test_simplify_modes(fixtures_dir, mode):
    cells = _row(["--no-peers", *mode], fixtures_dir / "tiny_cnn.onnx")
    nodes, o1, verify = int(cells[1]), int(cells[2]), cells[6]
    assert o1 <= nodes and verify == "passed"
    ratio = float(cells[9])
    assert ratio > 0
    if "--floor" in mode:
        assert float(cells[-1]) > 0  # the floor column


def test_simplify_usage_errors(fixtures_dir):
    for bad in (["--no-warmup"], ["--fresh", "--floor"], ["--cli", "--clock", "cpu"]):
        r = subprocess.run([sys.executable, str(SIMPLIFY), str(fixtures_dir / "tiny_cnn.onnx"), *bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "error:" in r.stderr, (bad, r.stderr)
