"""onnxruntime must not print its own error log: graphopt reports failures in one line.

Found while running the backend suite: every model onnxruntime rejects printed a colored
multi-line C++ log to stderr on top of graphopt's message.
"""
from __future__ import annotations

import onnx
import onnx.parser
import pytest

from graphopt.verify import RunError, Runner


def test_unrunnable_model_is_reported_without_onnxruntime_log(capfd):
    # GRU with layout=1 is valid ONNX that onnxruntime's CPU kernel refuses at session creation
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["": 14]>
    g (float[2, 3, 4] x, float[1, 15, 4] w, float[1, 15, 5] r) => (float[2, 3, 1, 5] y) {
        y = GRU <hidden_size = 5, layout = 1> (x, w, r)
    }
    """)
    with pytest.raises(RunError):
        Runner(m, allow_reference=False)
    err = capfd.readouterr().err
    assert "onnxruntime" not in err.lower() and "[E:" not in err, err
