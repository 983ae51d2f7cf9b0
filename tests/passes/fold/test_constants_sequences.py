"""fold-constants must not turn a sequence-valued node into a tensor constant.

Found by the backend suite at -O2 (test_sequence_map_*_expanded, simple/test_sequence_model1,
test_if_opt): np.asarray stacked a SequenceConstruct of constants into one tensor, and the model
failed onnx.checker ('type case mismatch. existing=sequence_type inferred=tensor_type').
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser

from graphopt.api import optimize
from graphopt.verify import make_session

MODEL = """
<ir_version: 8, opset_import: ["": 17]>
g (float[2] x) => (float[2] y) {
    a = Constant <value = float[2] {1, 2}> ()
    b = Constant <value = float[2] {3, 4}> ()
    s = SequenceConstruct (a, b)
    i = Constant <value = int64 {1}> ()
    e = SequenceAt (s, i)
    y = Add (x, e)
}
"""


def test_sequence_results_are_not_folded():
    m = onnx.parser.parse_model(MODEL)
    res = optimize(m, "fold-constants", verify="off")
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    rec = res.report.passes[0]
    assert any("SequenceConstruct" in s and "sequence" in s for s in rec.skipped), rec.skipped
    assert "SequenceConstruct" in [n.op_type for n in out.graph.node]
    x = np.array([0.5, -1.0], np.float32)
    want = make_session(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(make_session(out).run(None, {"x": x})[0], want, rtol=1e-5)
    again = optimize(out, "fold-constants", verify="off")
    assert not again.report.passes[0].changed
