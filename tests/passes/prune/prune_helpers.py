"""Shared helpers of the pruning tests: inline models with numpy weights, runs at ORT_DISABLE_ALL."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

from graphopt import ir
from graphopt.data import calibration_source
from graphopt.manager import PassManager
from graphopt.pass_base import PassContext
from graphopt.verify import Runner


def make_model(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    m = onnx.parser.parse_model(text)
    for name, value in weights.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        m.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(m, full_check=True)
    return m


def run_pipeline(model: onnx.ModelProto, pipeline: str, calib: dict | None = None, batch: int = 16, budget=None):
    """Run ``pipeline`` on ``model``; returns (optimized ModelProto, list of PassRecords)."""
    graph = ir.import_model(model)
    ctx = PassContext(opset=ir.graph_opset(graph), calibration=calibration_source(calib, model, batch) if calib else None,
                      budget=budget)
    ctx.model_template = model
    pm = PassManager(pipeline)
    graph = pm.run(graph, ctx)
    graph.toposort()
    out = ir.export_graph(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, pm.report.passes


def run(model: onnx.ModelProto, feeds: dict) -> dict:
    return Runner(model).run(feeds)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)
