"""Generated inputs and reference runs for sequence / optional values.

Found by the backend suite with graphopt's default verification (``--verify end``): 18 valid models
with sequence or optional inputs were refused as bad input ('input x is not a tensor'), and the
reference-evaluator fallback crashed on sequence outputs whose elements differ in shape.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from graphopt.api import optimize
from graphopt.data import CannotGenerate, SEQUENCE_LENGTH, generate_feeds
from graphopt.errors import VerificationError
from graphopt.verify import Runner, compare_outputs, make_session

SEQ_OPT = """
<ir_version: 8, opset_import: ["": 17]>
g (seq(float[N, 3]) xs, optional(float[2]) o) => (float[M, 3] y, float[2] z) {
    y = ConcatFromSequence <axis = 0> (xs)
    z = OptionalGetElement (o)
}
"""


def test_sequence_and_optional_inputs_are_generated_and_run():
    m = onnx.parser.parse_model(SEQ_OPT)
    feeds = generate_feeds(m, seed=0)[0]
    assert isinstance(feeds["xs"], list) and len(feeds["xs"]) == SEQUENCE_LENGTH
    assert all(a.shape == (1, 3) and a.dtype == np.float32 for a in feeds["xs"])
    assert feeds["o"].shape == (2,)
    y, z = make_session(m).run(None, feeds)
    assert y.shape == (SEQUENCE_LENGTH, 3)
    res = optimize(m, "O2")  # default verification runs on the generated feeds
    assert res.verification is not None and res.verification.status == "passed", res.verification


def test_unknown_rank_sequence_is_not_verified_rather_than_refused():
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["xs"], ["ys"])], "g",
        [onnx.helper.make_tensor_sequence_value_info("xs", onnx.TensorProto.FLOAT, None)],  # no rank
        [onnx.helper.make_tensor_sequence_value_info("ys", onnx.TensorProto.FLOAT, None)])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(CannotGenerate):
        generate_feeds(m)
    res = optimize(m, "O2")
    assert res.verification.status == "not-verified" and "unknown rank" in res.verification.reason
    with pytest.raises(VerificationError):
        optimize(m, "O2", strict=True)


def test_reference_fallback_keeps_ragged_sequences():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["": 17]>
    g (float[3] x) => (seq(float) parts) {
        sizes = Constant <value = int64[2] {1, 2}> ()
        parts = SplitToSequence (x, sizes)
    }
    """)
    r = Runner(m)
    r._sess = None
    r._use_reference()
    out = r.run({"x": np.arange(3, dtype=np.float32)})["parts"]
    assert [a.shape for a in out] == [(1,), (2,)]
    assert all(ok.ok for ok in compare_outputs({"parts": out}, {"parts": [a.copy() for a in out]}))
