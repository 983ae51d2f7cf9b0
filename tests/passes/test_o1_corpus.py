"""-O1 on every shared model: verification passes, the signature (dynamic dims included) is kept, nothing
grows, and the second run finds nothing left to do."""
from __future__ import annotations

import onnx
import pytest

from tests.conftest import corpus_params
from graphopt import api
from graphopt.pass_base import PassContext
from graphopt import ir
from graphopt.manager import PassManager


def _sig(vis):
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vis]


@pytest.mark.corpus
@pytest.mark.parametrize("path", corpus_params())
def test_o1_on_shared_models(path, shared_dir):
    original = onnx.load(path)
    res = api.optimize(path, "O1", verify="end")
    assert res.verification.status == "passed", res.verification.reason
    model = res.model
    onnx.checker.check_model(model)
    assert _sig(model.graph.input) == _sig([i for i in original.graph.input if i.name not in {t.name for t in original.graph.initializer}])
    assert _sig(model.graph.output) == _sig(original.graph.output)
    assert len(model.graph.node) <= len(original.graph.node)
    assert not any(n.op_type in ("Identity", "Constant") for n in model.graph.node)
    # a fixpoint: running -O1 again changes nothing
    graph = ir.import_model(model)
    ctx = PassContext(opset=ir.graph_opset(graph))
    ctx.model_template = model
    pm = PassManager("fixpoint{max-iter=6}(fold-constants,merge-chains,eliminate-noops,cse,dce)")
    pm.run(graph, ctx)
    assert not any(r.changed for r in pm.report.passes), [(r.name, r.stats) for r in pm.report.passes if r.changed]


@pytest.mark.corpus
@pytest.mark.parametrize("path", corpus_params())
def test_o1_without_verification_writes_the_same_model_from_the_files_bytes(path, shared_dir, tmp_path):
    """verify="off" from a path takes the fast road (weights read from the file's bytes, the model
    rewritten in place, new weights written to the file from their arrays): the file written must
    be the model verify="end" returns, and the model returned must be what was written."""
    checked = api.optimize(path, "O1", verify="end").model
    out = tmp_path / "o1.onnx"
    res = api.optimize(path, "O1", verify="off", output=out)
    written = onnx.load(out)
    assert written == res.model

    def canonical(m):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        inits = sorted((onnx.TensorProto.FromString(t.SerializeToString()) for t in m.graph.initializer), key=lambda t: t.name)
        del m.graph.initializer[:]
        m.graph.initializer.extend(inits)
        return m.SerializeToString(deterministic=True)

    assert canonical(written) == canonical(checked)
