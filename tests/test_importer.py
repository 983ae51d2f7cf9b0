"""graphopt.importer builds the same gs.Graph as gs.import_onnx: same nodes, tensors, attributes, links.

Compared on every model of the ONNX backend data (node cases, on-disk and light models) in the slow
suite, on a sample of them and on the fixtures by default, and on the shared corpus where present.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt import importer
from tests.conftest import corpus_params

sys.path.insert(0, str(Path(__file__).parent / "backend"))
import harness  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures"


def _describe(graph: gs.Graph) -> dict:
    """Everything of ``graph`` an importer sets, with tensors and nodes named by their position (so
    that two imports compare equal when they link the same objects the same way)."""
    node_ix = {id(n): i for i, n in enumerate(graph.nodes)}
    tensor_ix: dict[int, int] = {}

    def tensor(t: gs.Tensor):
        first = id(t) not in tensor_ix
        tensor_ix.setdefault(id(t), len(tensor_ix))
        d = {"ix": tensor_ix[id(t)], "cls": type(t).__name__, "name": t.name,
             "producers": [node_ix.get(id(n), "outer") for n in t.inputs],
             "consumers": [node_ix.get(id(n), "outer") for n in t.outputs],
             "links": (type(t.inputs).__name__, t.inputs.field_name, type(t.outputs).__name__, t.outputs.field_name)}
        if not first:
            return d
        if isinstance(t, gs.Constant):
            v = t._values
            # (graphopt's LazyValues subclasses only load faster)
            kind = "LazyValues" if isinstance(v, gs.ir.tensor.LazyValues) else type(v).__name__
            d.update(data_location=t.data_location, export_dtype=t._export_dtype, values=kind)
            if isinstance(v, gs.ir.tensor.LazyValues):
                d.update(proto=v.tensor.SerializeToString(), shape=list(v.shape), dtype=str(v.dtype), nbytes=v.nbytes)
        else:
            d.update(dtype=str(t.dtype), shape=t.shape, type=getattr(t, "type", None))
        return d

    def attr(v):
        if isinstance(v, gs.Graph):
            return ("graph", _describe(v))
        if isinstance(v, gs.Tensor):
            return ("tensor", tensor(v))
        if isinstance(v, list):
            return [attr(x) for x in v]
        if isinstance(v, float) and np.isnan(v):
            return ("nan",)
        return (type(v).__name__, v if not hasattr(v, "SerializeToString") else v.SerializeToString())

    return {
        "graph": (graph.name, graph.doc_string, graph.opset, graph.producer_name, graph.producer_version,
                  graph.ir_version, [(d.domain, d.version) for d in graph.import_domains or []],
                  [(f.name, f.domain, len(f.nodes)) for f in graph.functions]),
        "inputs": [tensor(t) for t in graph.inputs],
        "outputs": [tensor(t) for t in graph.outputs],
        "nodes": [(n.op, n.name, n.domain, type(n.attrs).__name__, [(k, attr(v)) for k, v in n.attrs.items()],
                   [tensor(t) for t in n.inputs], [tensor(t) for t in n.outputs],
                   (type(n.inputs).__name__, n.inputs.field_name, n.outputs.field_name))
                  for n in graph.nodes],
        "tensors": sorted(graph.tensors().keys()),
    }


def _assert_same(model: onnx.ModelProto) -> None:
    expected = _describe(gs.import_onnx(model))
    got = _describe(importer.import_onnx(model))
    assert got == expected


def _backend_models(sample: int | None):
    cases = harness.load_cases()
    if sample:
        cases = harness.fast_sample(cases, sample)
    for c in cases:
        yield c.id, (c.model if c.model is not None else onnx.load(c.path))


def test_same_as_gs_on_the_fixtures():
    paths = sorted(FIXTURES.glob("*.onnx"))
    assert paths
    for p in paths:
        _assert_same(onnx.load(p))


def test_same_as_gs_on_subgraphs_functions_and_odd_attributes():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18, "local" : 1]>
        g (float[N] x, bool c) => (float[N] y, float[N] z) {
            e = local.twice(x)
            y = If(c) <then_branch = t () => (float[N] a) { a = Add(e, e) },
                       else_branch = f () => (float[N] b) { b = Neg(x) }>
            k = Constant<value = float[2] {1.0, 2.0}>()
            s = Shape<start = 0>(x)
            z = Identity(y)
        }
        <domain: "local", opset_import: ["" : 18]>
        twice(a) => (b) { b = Add(a, a) }
    """)
    _assert_same(model)
    opt = onnx.helper.make_node("Optional", [], ["o"],
                                type=onnx.helper.make_optional_type_proto(onnx.helper.make_tensor_type_proto(1, [1])))
    model.graph.node.append(opt)  # a TYPE_PROTO attribute: gs skips it (graphopt.ir puts it back)
    _assert_same(model)


def test_same_as_gs_on_repeated_and_partial_value_info():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 3] x) => (float[N, 3] y) { t = Relu(x)  y = Neg(t) }
    """)
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["N", None]))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("u", onnx.TensorProto.BFLOAT16, [2]))
    _assert_same(model)


def test_same_as_gs_on_a_sample_of_the_backend_models():
    for name, model in _backend_models(150):
        try:
            _assert_same(model)
        except AssertionError:
            pytest.fail(f"{name}: graphopt.importer differs from gs.import_onnx")


@pytest.mark.slow
def test_same_as_gs_on_every_backend_model():
    differ = []
    for name, model in _backend_models(None):
        try:
            _assert_same(model)
        except AssertionError:
            differ.append(name)
    assert differ == []


@pytest.mark.corpus
@pytest.mark.parametrize("path", corpus_params())
def test_same_as_gs_on_the_corpus(path, shared_dir):
    _assert_same(onnx.load(str(path)))


def test_unchanged_gs_attribute_order_is_kept():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[1, 1, 4, 4] x) => (float[1, 1, 2, 2] y) { y = MaxPool<strides = [2, 2], kernel_shape = [2, 2]>(x) }
    """)
    attrs = importer.import_onnx(model).nodes[0].attrs
    assert isinstance(attrs, OrderedDict) and list(attrs) == ["strides", "kernel_shape"]


def _constants(graph: gs.Graph):
    """Every Constant of ``graph``: inputs of nodes and Constant nodes' values."""
    from graphopt import ir

    for t in ir.tensor_map(graph).values():
        if isinstance(t, gs.Constant):
            yield t
    for n in graph.nodes:
        for v in n.attrs.values():
            if isinstance(v, gs.Constant):
                yield v


def _assert_sourced_values_match(path: Path) -> int:
    """Weights read from the file's bytes (SourcedValues) or the proto's raw_data (RawValues) load
    as gs loads them; returns how many were read from the file."""
    from graphopt import ir

    model, source = ir.load_with_source(path, check=False)
    graph = importer.import_onnx(model, source)
    n = 0
    for t in _constants(graph):
        v = t._values
        if not isinstance(v, importer.RawValues):
            continue
        expected = gs.ir.tensor.LazyValues(v.tensor).load()
        got = v.load()
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.flags.writeable
        assert got.tobytes() == expected.tobytes()
        if isinstance(v, importer.SourcedValues):
            assert not v.view().flags.writeable
            n += 1
    return n


def test_weights_of_types_numpy_lacks_import_from_a_file():
    from graphopt import ir

    h = onnx.helper
    weights = [h.make_tensor("w", onnx.TensorProto.BFLOAT16, [2], [1.0, 2.0]),
               h.make_tensor("w8", onnx.TensorProto.FLOAT8E4M3FN, [2], [1.0, 2.0])]
    g = h.make_graph([h.make_node("Cast", ["w"], ["y"], to=1), h.make_node("Cast", ["w8"], ["z"], to=1)], "g", [],
                     [h.make_tensor_value_info("y", 1, [2]), h.make_tensor_value_info("z", 1, [2])], weights)
    model, source = ir.load_with_source(h.make_model(g, opset_imports=[h.make_opsetid("", 21)]).SerializeToString())
    graph = ir.import_model(model, source)  # (numpy has no bfloat16: the dtype is the ONNX enum)
    # gs's own loading (onnx's to_array), not numpy's straight from the bytes
    assert [type(t._values) for t in _constants(graph)] == [importer.TrackedValues] * 2


def test_weights_read_from_the_file_equal_gs_reading_the_proto():
    assert sum(_assert_sourced_values_match(p) for p in sorted(FIXTURES.glob("*.onnx"))) > 0


@pytest.mark.slow
def test_weights_read_from_the_file_on_every_backend_model_on_disk():
    cases = [c for c in harness.load_cases(harness.DISK_KINDS + ("light",)) if c.path]
    assert sum(_assert_sourced_values_match(Path(c.path)) for c in cases) > 0


@pytest.mark.corpus
@pytest.mark.parametrize("path", corpus_params())
def test_weights_read_from_the_file_on_the_corpus(path, shared_dir):
    assert _assert_sourced_values_match(path) > 0
