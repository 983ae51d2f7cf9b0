"""Fuzz: every registered exact pass keeps the numerics of random small graphs.

Graphs mix graph inputs, initializers, Constant nodes, elementwise / shape / matmul ops and If
nodes whose branches read outer tensors, so that
constant subexpressions (fold-constants), dead branches (dce), identities and duplicates (cleanup
passes) all occur, including a graph output computed from constants only and a tensor used twice.
Each exact pass must give a model that passes onnx.checker (full check), keeps the output names,
dtypes and shapes, matches the original under onnxruntime (ORT_DISABLE_ALL) to rtol 1e-5, and is
idempotent.  Few examples by default; ``GRAPHOPT_FUZZ_EXAMPLES=500`` for a long run.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from graphopt import registered_passes
from graphopt.api import optimize
from graphopt.verify import make_session

EXAMPLES = int(os.environ.get("GRAPHOPT_FUZZ_EXAMPLES", "10"))
EXACT = sorted(name for name, cls in registered_passes().items() if cls.exact and not name.startswith("test-"))

UNARY = ["Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Identity"]
BINARY = ["Add", "Sub", "Mul", "Max", "Min"]
SHAPES = [(2, 3), (3, 2), (2, 2)]


@st.composite
def graphs(draw):
    """A random model: (ModelProto, feeds)."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    nodes, inits, pool = [], [], {s: [] for s in SHAPES}
    counter = iter(range(10_000))

    def new(prefix):
        return f"{prefix}{next(counter)}"

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3] if draw(st.booleans()) else [2, 3])]
    pool[(2, 3)].append("x")
    for _ in range(draw(st.integers(0, 2))):  # initializers and Constant nodes: fodder for folding
        shape = draw(st.sampled_from(SHAPES))
        name = new("w")
        val = rng.standard_normal(shape).astype(np.float32)
        if draw(st.booleans()):
            inits.append(onnx.numpy_helper.from_array(val, name))
        else:
            nodes.append(helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(val)))
        pool[shape].append(name)
    const_only = {n for s in pool.values() for n in s if n != "x"}
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["unary", "binary", "transpose", "matmul", "reshape", "const", "if"]))
        shape = draw(st.sampled_from([s for s in SHAPES if pool[s]] or [(2, 3)]))
        if not pool[shape]:
            continue
        a = draw(st.sampled_from(pool[shape]))
        out = new("t")
        if kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(UNARY)), [a], [out]))
            oshape, deps = shape, [a]
        elif kind == "binary":
            b = draw(st.sampled_from(pool[shape]))
            nodes.append(helper.make_node(draw(st.sampled_from(BINARY)), [a, b], [out]))
            oshape, deps = shape, [a, b]
        elif kind == "transpose":
            nodes.append(helper.make_node("Transpose", [a], [out], perm=[1, 0]))
            oshape, deps = (shape[1], shape[0]), [a]
        elif kind == "matmul":
            rhs = [n for n in pool[(shape[1], 2)]] if (shape[1], 2) in pool else []
            if not rhs:
                continue
            b = draw(st.sampled_from(rhs))
            nodes.append(helper.make_node("MatMul", [a, b], [out]))
            oshape, deps = (shape[0], 2), [a, b]
        elif kind == "reshape":
            target = (shape[1], shape[0])
            sname = new("s")
            inits.append(onnx.numpy_helper.from_array(np.array(target, np.int64), sname))
            nodes.append(helper.make_node("Reshape", [a, sname], [out]))
            oshape, deps = target, [a]
        elif kind == "if":
            # a subgraph reading an outer tensor; the condition comes from a constant or from x
            c_src = draw(st.sampled_from(pool[shape]))
            red, cond = new("r"), new("c")
            nodes.append(helper.make_node("ReduceSum", [c_src], [red], keepdims=0))
            zero = new("z")
            inits.append(onnx.numpy_helper.from_array(np.array(0, np.float32), zero))
            nodes.append(helper.make_node("Greater", [red, zero], [cond]))
            branches = {}
            for br, op in (("then_branch", draw(st.sampled_from(UNARY))), ("else_branch", draw(st.sampled_from(UNARY)))):
                inner, inner2 = new("i"), new("o")
                body = [helper.make_node(op, [a], [inner]), helper.make_node("Mul", [inner, a], [inner2])]
                branches[br] = helper.make_graph(body, new("body"), [], [helper.make_tensor_value_info(inner2, TensorProto.FLOAT, [None, None])])
            nodes.append(helper.make_node("If", [cond], [out], **branches))
            oshape, deps = shape, [a, c_src]
        else:
            val = rng.standard_normal(shape).astype(np.float32)
            nodes.append(helper.make_node("Constant", [], [out], value=onnx.numpy_helper.from_array(val)))
            oshape, deps = shape, []
        if all(d in const_only for d in deps):
            const_only.add(out)
        pool[oshape].append(out)
    in_pool = {n for names in pool.values() for n in names}
    produced = [o for n in nodes for o in n.output if o in in_pool]  # rank-2 results only
    if not produced:
        nodes.append(helper.make_node("Relu", ["x"], ["t_last"]))
        produced = ["t_last"]
    k = draw(st.integers(1, min(2, len(produced))))
    outs = draw(st.lists(st.sampled_from(produced), min_size=k, max_size=k, unique=True))
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, None]) for o in outs]
    g = helper.make_graph(nodes, "fuzz", inputs, outputs, initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    batch = 2
    feeds = {"x": rng.standard_normal((batch, 3)).astype(np.float32)}
    return model, feeds


def _run(model, feeds):
    return make_session(model).run(None, feeds)


def test_there_are_exact_passes():
    assert {"dce", "fold-constants"} <= set(EXACT)


@pytest.mark.parametrize("pass_name", EXACT)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=graphs())
def test_exact_pass_keeps_numerics(pass_name, case):
    model, feeds = case
    onnx.checker.check_model(model, full_check=True)
    want = _run(model, feeds)
    res = optimize(model, pass_name, verify="off")
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    got = _run(out, feeds)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    again = optimize(out, pass_name, verify="off")
    assert not any(p.changed for p in again.report.passes), f"{pass_name} is not idempotent"
