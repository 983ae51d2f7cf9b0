"""Helpers for the -O3 (onnxruntime contrib op) fusion tests: build a model from ONNX text plus numpy
weights, run one pass, run models with onnxruntime at ORT_DISABLE_ALL."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser

from graphopt import ir
from graphopt.pass_base import PassContext, get_pass
from graphopt.verify import Runner


def build(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """``onnx.parser`` model text; names in ``weights`` become initializers with those values."""
    model = onnx.parser.parse_model(text)
    for name, value in weights.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def run_pass(model: onnx.ModelProto, name: str, **options):
    """(new model, PassResult) of one pass run on ``model``."""
    graph = ir.import_model(model)
    ctx = PassContext(opset=ir.graph_opset(graph))
    ctx.model_template = model
    ctx.current_pass = name
    result = get_pass(name)(**options).run(graph, ctx)
    return ir.export_graph(graph, model), result


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    r = Runner(model, allow_reference=False)  # onnxruntime, ORT_DISABLE_ALL
    out = r.run(feeds)
    return [out[o.name] for o in model.graph.output]


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for x, y in zip(ort(a, feeds), ort(b, feeds)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol)


def full_check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def weights(seed: int, **shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * (0.3 if len(s) > 1 else 0.1)).astype(np.float32) for k, s in shapes.items()}
