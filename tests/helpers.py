"""Small model builders shared by tests."""
from __future__ import annotations

import numpy as np
import onnx


def parse(text: str) -> onnx.ModelProto:
    m = onnx.parser.parse_model(text)
    onnx.checker.check_model(m, full_check=True)
    return m


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    from graphopt.verify import make_session

    return make_session(model).run(None, feeds)


ADD_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 4] x) => (float[N, 4] y) {
    y = Add(x, x)
}
"""
