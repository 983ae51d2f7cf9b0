"""Issue 2: the -O0 round trip over every shared model (../shared/corpus and ../shared/digits).

Same outputs (bit for bit: onnxruntime at ORT_DISABLE_ALL runs the same kernels), same node count,
and ir_version, opsets, producer, metadata, signature, initializer names, value_info and functions
preserved.  The ONNX backend test models are covered by tests/backend.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import corpus_params
from graphopt.api import optimize
from graphopt.data import generate_feeds, input_specs
from graphopt.verify import make_session

sys.path.insert(0, str(Path(__file__).parent / "backend"))
import harness  # noqa: E402


def _feeds(path: Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    sample = path.with_suffix(".npz")
    names = [s.name for s in input_specs(model)]
    if sample.is_file():
        with np.load(sample) as z:
            if all(n in z.files for n in names):
                return {n: z[n] for n in names}
    return generate_feeds(model, seed=0)[0]


@pytest.mark.corpus
@pytest.mark.parametrize("path", corpus_params())
def test_o0_round_trip(path, shared_dir):
    original = onnx.load(str(path))
    out = optimize(path, "O0", verify="off").model
    assert harness.fidelity_diff(original, out) == []
    onnx.checker.check_model(out, full_check=True)
    feeds = _feeds(path, original)
    want = make_session(original).run(None, feeds)
    got = make_session(out).run(None, feeds)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.shape == g.shape and w.dtype == g.dtype
        np.testing.assert_array_equal(g, w)


def test_fidelity_diff_sees_losses():
    """The round-trip check must be able to fail."""
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["": 17, "custom.domain": 1], producer_name: "me">
    g (float[N, 2] x) => (float[N, 2] y) { t = Relu (x)  y = Neg (t) }
    """)
    m.metadata_props.add(key="k", value="v")
    m.graph.value_info.append(onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["N", 2]))
    assert harness.fidelity_diff(m, m) == []
    for mutate, expect in [
        (lambda c: setattr(c, "ir_version", 7), "ir_version"),
        (lambda c: c.opset_import.pop(), "opset_import"),
        (lambda c: setattr(c, "producer_name", ""), "producer_name"),
        (lambda c: c.metadata_props.pop(), "metadata_props"),
        (lambda c: c.graph.value_info.pop(), "value_info"),
        (lambda c: c.graph.input[0].type.tensor_type.shape.dim[0].ClearField("dim_param"), "graph inputs"),
        (lambda c: c.graph.node.pop(), "node count"),
        (lambda c: setattr(c.graph.node[1], "doc_string", "edited"), "node"),
    ]:
        c = onnx.ModelProto()
        c.CopyFrom(m)
        mutate(c)
        diffs = harness.fidelity_diff(m, c)
        assert diffs and diffs[0].startswith(expect), (expect, diffs)
