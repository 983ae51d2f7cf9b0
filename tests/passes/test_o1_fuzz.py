"""-O1 on random small graphs built from the patterns its passes target (seeded, so failures reproduce):
chains of layout ops, casts, neutral arithmetic, duplicated subexpressions and Shape arithmetic on a
tensor with a dynamic batch.  Every result must pass onnx.checker, keep the signature (the dynamic dim
too) and give the same numbers as the original for two batch sizes."""
from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import api

F = TensorProto.FLOAT


class _Builder:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, value: np.ndarray) -> str:
        nm = self.name("c")
        if self.rng.random() < 0.5:
            self.inits.append(onnx.numpy_helper.from_array(value, nm))
        else:
            self.nodes.append(helper.make_node("Constant", [], [nm], value=onnx.numpy_helper.from_array(value)))
        return nm

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out


def _step(b: _Builder, x: str, shape: list) -> tuple[str, list]:
    """Append one random pattern to the chain; returns the new tensor and its shape ('N' = dynamic)."""
    r = b.rng
    rank = len(shape)
    kind = r.choice(["identity", "transpose_pair", "transpose", "reshape_same", "unsq_sq", "cast_pair", "add_zero",
                     "mul_one", "shape_reshape", "relu", "dup", "flatten_reshape", "slice_all", "expand_same"])
    if kind == "identity":
        return b.op("Identity", [x]), shape
    if kind in ("transpose_pair", "transpose"):
        perm = list(range(rank))
        r.shuffle(perm)
        y = b.op("Transpose", [x], perm=perm)
        yshape = [shape[p] for p in perm]
        if kind == "transpose":
            return y, yshape
        inv = [perm.index(i) for i in range(rank)]
        return b.op("Transpose", [y], perm=inv), shape
    if kind == "reshape_same":
        target = [0 if d == "N" else d for d in shape]
        if r.random() < 0.5 and "N" not in shape[1:]:
            target[-1] = -1
        return b.op("Reshape", [x, b.const(np.array(target, np.int64))]), shape
    if kind == "unsq_sq":
        ax = r.randrange(-(rank + 1), rank + 1)
        u = b.op("Unsqueeze", [x, b.const(np.array([ax], np.int64))])
        return b.op("Squeeze", [u, b.const(np.array([ax], np.int64))]), shape
    if kind == "cast_pair":
        c = b.op("Cast", [x], to=TensorProto.DOUBLE)
        return b.op("Cast", [c], to=F), shape
    if kind == "add_zero":
        k = r.randrange(0, rank + 1)
        z = np.zeros([1] * k, np.float32)
        return b.op("Add", [x, b.const(z)] if r.random() < 0.5 else [b.const(z), x]), shape
    if kind == "mul_one":
        return b.op("Mul", [x, b.const(np.ones([1], np.float32))]), shape
    if kind == "shape_reshape":
        # Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])): flattens all but the dynamic batch
        s = b.op("Shape", [x])
        g0 = b.op("Gather", [s, b.const(np.array(0, np.int64))], axis=0)
        u0 = b.op("Unsqueeze", [g0, b.const(np.array([0], np.int64))])
        dims = [b.op("Unsqueeze", [b.op("Gather", [s, b.const(np.array(i, np.int64))], axis=0),
                                   b.const(np.array([0], np.int64))]) for i in range(1, rank)]
        cat = b.op("Concat", [u0] + dims, axis=0)
        y = b.op("Reshape", [x, cat])
        return y, shape
    if kind == "relu":
        return b.op(r.choice(["Relu", "Neg", "Sigmoid"]), [x]), shape
    if kind == "dup":
        a1 = b.op("Tanh", [x])
        a2 = b.op("Tanh", [x])
        return b.op("Add", [a1, a2]), shape
    if kind == "flatten_reshape":
        if shape[0] != "N" or rank < 2:
            return x, shape
        prod = int(np.prod([d for d in shape[1:]]))
        f = b.op("Reshape", [x, b.const(np.array([0, prod], np.int64))])
        return b.op("Reshape", [f, b.const(np.array([0] + shape[1:], np.int64))]), shape
    if kind == "slice_all":
        ax = r.randrange(rank)
        return b.op("Slice", [x, b.const(np.array([0], np.int64)), b.const(np.array([2**63 - 1], np.int64)),
                              b.const(np.array([ax], np.int64))]), shape
    if kind == "expand_same":
        tgt = [1] * r.randrange(0, rank + 1)
        return b.op("Expand", [x, b.const(np.array(tgt, np.int64))]), shape
    raise AssertionError(kind)


def _random_model(seed: int) -> tuple[onnx.ModelProto, list]:
    rng = random.Random(seed)
    rank = rng.randrange(2, 5)
    in_shape = ["N"] + [rng.randrange(2, 4) for _ in range(rank - 1)]
    shape = list(in_shape)
    b = _Builder(rng)
    cur = "x"
    for _ in range(rng.randrange(4, 10)):
        cur, shape = _step(b, cur, shape)
    y = b.op("Relu", [cur])  # the output is produced by a real op
    graph = helper.make_graph(b.nodes, f"fuzz{seed}", [helper.make_tensor_value_info("x", F, in_shape)],
                              [helper.make_tensor_value_info(y, F, shape)], initializer=b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, in_shape


@pytest.mark.parametrize("seed", range(40))
def test_o1_random_graph(seed):
    m, in_shape = _random_model(seed)
    onnx.checker.check_model(m, full_check=True)
    feeds = [{"x": np.random.default_rng(n).standard_normal([n] + in_shape[1:]).astype(np.float32)} for n in (1, 3)]
    res = api.optimize(m, "O1", inputs=feeds, verify="end")
    assert res.verification.status == "passed", res.verification.reason
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.input[0].type == m.graph.input[0].type
    assert out.graph.output[0] == m.graph.output[0]
    assert len(out.graph.node) <= len(m.graph.node)
