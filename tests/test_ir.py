"""IR import/export: a round trip with no passes keeps everything the issue lists."""
from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import graphopt
from graphopt import ir, wire
from graphopt.errors import InputError

RICH_MODEL = """
<ir_version: 9, opset_import: ["" : 18, "custom.domain" : 1, "local" : 1], producer_name: "unit-test", producer_version: "7.1", model_version: 3, doc_string: "a model doc", domain: "org.example">
main (float[N, 4] x, bool cond) => (float[N, 4] y, float[N, 4] z) <float[N, 4] h> {
    h = local.Double(x)
    y = If(cond) <
        then_branch = g1 () => (float[N, 4] a) { a = Relu(h) },
        else_branch = g2 () => (float[N, 4] b) { b = Neg(h) }
    >
    z = Add(h, x)
}
<domain: "local", opset_import: ["" : 18]>
Double (t) => (u) {
    u = Add(t, t)
}
"""


def _rich_model() -> onnx.ModelProto:
    m = onnx.parser.parse_model(RICH_MODEL)
    onnx.helper.set_model_props(m, {"author": "graphopt", "license": "none"})
    m.graph.doc_string = "graph doc"
    return m


def _roundtrip(m: onnx.ModelProto) -> onnx.ModelProto:
    return ir.export_graph(ir.import_model(m), m)


def test_round_trip_preserves_model_fields():
    m = _rich_model()
    onnx.checker.check_model(m, full_check=True)
    r = _roundtrip(m)
    assert r.ir_version == m.ir_version
    assert {(o.domain, o.version) for o in r.opset_import} == {(o.domain, o.version) for o in m.opset_import}
    assert (r.producer_name, r.producer_version, r.model_version, r.doc_string, r.domain) == ("unit-test", "7.1", 3, "a model doc", "org.example")
    assert {p.key: p.value for p in r.metadata_props} == {"author": "graphopt", "license": "none"}
    assert r.graph.doc_string == "graph doc"
    assert [f.name for f in r.functions] == ["Double"]
    assert [i.name for i in r.graph.input] == ["x", "cond"] and [o.name for o in r.graph.output] == ["y", "z"]
    dims = [d.dim_param or d.dim_value for d in r.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 4]
    assert "h" in {vi.name for vi in r.graph.value_info}
    assert [n.op_type for n in r.graph.node] == ["Double", "If", "Add"]
    if_node = r.graph.node[1]
    assert {a.name for a in if_node.attribute} == {"then_branch", "else_branch"}
    onnx.checker.check_model(r, full_check=True)


def test_round_trip_runs_identically():
    m = _rich_model()
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    from onnx.reference import ReferenceEvaluator

    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        a = ReferenceEvaluator(m).run(None, feeds)
        b = ReferenceEvaluator(_roundtrip(m)).run(None, feeds)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_custom_domain_nodes_survive():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "com.vendor" : 2]>
    g (float[2] x) => (float[2] y) { t = com.vendor.Magic<k = 3>(x)  y = Relu(t) }
    """)
    r = _roundtrip(m)
    n = r.graph.node[0]
    assert (n.domain, n.op_type, n.attribute[0].i) == ("com.vendor", "Magic", 3)
    assert ("com.vendor", 2) in {(o.domain, o.version) for o in r.opset_import}


def test_load_sources(fixtures_dir):
    p = fixtures_dir / "tiny_cnn.onnx"
    a = graphopt.load(p)
    b = graphopt.load(p.read_bytes())
    c = graphopt.load(a)
    assert a == b and c is a


def test_external_data_load_and_save(tmp_path, fixtures_dir):
    m = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    onnx.save_model(m, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    loaded = graphopt.load(tmp_path / "ext.onnx")
    assert all(not t.external_data for t in loaded.graph.initializer)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    graphopt.save(loaded, out, external_data=True)
    assert (out.parent / "o.onnx.data").exists()
    again = onnx.load(out)
    orig = onnx.load(fixtures_dir / "tiny_cnn.onnx")  # save_model above converted m in place
    for t1, t2 in zip(orig.graph.initializer, again.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t1), onnx.numpy_helper.to_array(t2))
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]


def test_optimize_with_external_data_input(tmp_path, fixtures_dir):
    m = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    onnx.save_model(m, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    res = graphopt.optimize(tmp_path / "ext.onnx", "O1", output=tmp_path / "o.onnx")
    assert res.verification.ok


def test_save_is_atomic_and_never_overwrites_input(tmp_path, fixtures_dir):
    src = tmp_path / "m.onnx"
    src.write_bytes((fixtures_dir / "tiny_cnn.onnx").read_bytes())
    m = graphopt.load(src)
    with pytest.raises(InputError, match="refusing to overwrite"):
        ir.save(m, src, protect=[src])
    (tmp_path / "link.onnx").symlink_to(src)
    with pytest.raises(InputError, match="refusing to overwrite"):
        graphopt.optimize(src, "O0", output=tmp_path / "link.onnx")
    os.link(src, tmp_path / "hard.onnx")
    (tmp_path / "sub").mkdir()
    for other in (tmp_path / "hard.onnx", tmp_path / "sub" / ".." / "m.onnx"):
        with pytest.raises(InputError, match="refusing to overwrite"):
            graphopt.optimize(src, "O0", output=other)
        with pytest.raises(InputError, match="refusing to overwrite"):
            ir.save(m, other, protect=[src])
    os.unlink(tmp_path / "hard.onnx")
    ir.save(m, tmp_path / "new.onnx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="cannot load a model from int"):
        graphopt.load(3)
    with pytest.raises(InputError, match="not an ONNX model"):
        graphopt.load(b"\x01\x02garbage")


def _short_weight(n_bytes: int, ir_version: int = 8, listed: bool = False) -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    w.raw_data = w.raw_data[:n_bytes]
    inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])]
    if listed:
        inputs.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [64, 64]))
    g = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "W"], ["y"])], "g", inputs,
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 64])], [w])
    return onnx.helper.make_model(g, ir_version=ir_version, opset_imports=[onnx.helper.make_opsetid("", 13)])


@pytest.mark.parametrize("source", ["model", "bytes", "file"])
def test_checker_runs_without_weights_and_still_checks_them(source, tmp_path):
    # the checker sees a light model; a weight shorter than its dims is still refused, for every source
    for m, ok in [(_short_weight(64 * 64 * 4), True), (_short_weight(100), False)]:
        src = m if source == "model" else m.SerializeToString()
        if source == "file":
            (tmp_path / "m.onnx").write_bytes(src)
            src = tmp_path / "m.onnx"
        if ok:
            graphopt.load(src)
        else:
            with pytest.raises(InputError, match=r"raw_data size \(100 bytes\) is too small .*16384 bytes required"):
                graphopt.load(src)


def test_checker_light_model_keeps_ir3_rule():
    with pytest.raises(InputError, match="W in initializer but not in graph input"):
        graphopt.load(_short_weight(64 * 64 * 4, ir_version=3))
    graphopt.load(_short_weight(64 * 64 * 4, ir_version=3, listed=True))


def test_raw_spans_read_off_the_wire(fixtures_dir):
    m = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    data = m.SerializeToString()
    spans = wire.raw_spans(data)
    assert [None if sp is None else data[sp[0]:sp[1]] for sp in spans] == \
        [t.raw_data if t.HasField("raw_data") else None for t in m.graph.initializer]
    assert wire.raw_spans(b"\xff\xff") is None  # malformed: the caller falls back to reading the field


def test_the_source_of_a_loaded_model_holds_its_weights(fixtures_dir):
    path = fixtures_dir / "tiny_cnn.onnx"
    model, source = ir.load_with_source(path)
    assert source is not None and source.data == path.read_bytes()
    for i, t in enumerate(model.graph.initializer):
        raw = source.raw(i)
        assert (raw is None) == (not t.HasField("raw_data"))
        assert raw is None or bytes(raw) == t.raw_data
    assert ir.load_with_source(model)[1] is None  # a ModelProto: nothing was parsed here


def test_light_model_leaves_out_only_large_float_weights(fixtures_dir):
    m = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    light = ir.light_model(m)
    kept = {t.name for t in light.graph.initializer}
    for t in m.graph.initializer:
        big = t.data_type == onnx.TensorProto.FLOAT and wire.nbytes(t) > ir.LIGHT_BYTES
        assert (t.name not in kept) == big
        if big:
            vi = next(v for v in light.graph.input if v.name == t.name)
            assert vi == onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    assert "conv2.weight" not in kept and "conv1.weight" in kept  # 4608 bytes out, 864 bytes in
    onnx.checker.check_model(light)
    assert light.ByteSize() < m.ByteSize()


def test_export_copies_untouched_nodes_and_reexports_changed_ones():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[4, 3, 2] y, float[2, 3, 4] z) {
        t = Transpose <perm = [2, 1, 0]> (x)
        y = Relu(t)
        z = Neg(x)
    }""")
    m.graph.node[2].doc_string = "kept when the node is untouched"
    g = ir.import_model(m)
    out = ir.export_graph(g, m)
    assert [n.doc_string for n in out.graph.node] == ["", "", "kept when the node is untouched"]
    # in-place edits a pass may make: a list attribute, a tensor name, an input swapped
    g = ir.import_model(m)
    tr, relu, neg = g.nodes
    tr.attrs["perm"][0], tr.attrs["perm"][2] = 0, 2
    tr.outputs[0].name = "renamed"
    neg.inputs[0] = relu.outputs[0]
    out = ir.export_graph(g, m)
    perm = next(a.ints for a in out.graph.node[0].attribute if a.name == "perm")
    assert list(perm) == [0, 1, 2]
    assert list(out.graph.node[0].output) == ["renamed"] and list(out.graph.node[1].input) == ["renamed"]
    assert list(out.graph.node[2].input) == ["y"]


def test_a_node_exported_once_is_not_exported_again_until_it_changes(monkeypatch):
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[4, 3, 2] y) { t = Transpose <perm = [2, 1, 0]> (x)  y = Relu(t) }""")
    g = ir.import_model(m)
    tr, relu = g.nodes
    tr.attrs["perm"] = [2, 0, 1]  # changed: exported by gs, once
    exported = []
    real = OnnxExporter.export_node
    monkeypatch.setattr(OnnxExporter, "export_node", staticmethod(lambda n: exported.append(n.op) or real(n)))
    first, again = ir.export_nodes(g), ir.export_nodes(g)
    assert exported == ["Transpose"] and first[0] is again[0] and first[1] is again[1]
    assert list(next(a.ints for a in again[0].attribute if a.name == "perm")) == [2, 0, 1]
    tr.attrs["perm"][1] = 1  # in place
    relu.outputs[0].name = "y2"
    third = ir.export_nodes(g)
    assert exported == ["Transpose", "Transpose", "Relu"]
    assert list(next(a.ints for a in third[0].attribute if a.name == "perm")) == [2, 1, 1]
    assert list(third[1].output) == ["y2"]


def test_uses_external_data_finds_tensor_attributes_in_subgraphs():
    m = _rich_model()
    assert not ir.uses_external_data(m)
    then = next(a for a in m.graph.node[1].attribute if a.name == "then_branch").g
    c = onnx.helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.ones(4, np.float32), "k"))
    then.node.insert(0, c)
    assert not ir.uses_external_data(m)
    t = then.node[0].attribute[0].t
    t.data_location = onnx.TensorProto.EXTERNAL
    assert ir.uses_external_data(m)


def _canonical(m: onnx.ModelProto) -> bytes:
    """``m`` serialized with its initializers in name order (a consuming export may reorder them)."""
    c = onnx.ModelProto()
    c.CopyFrom(m)
    inits = sorted(c.graph.initializer, key=lambda t: t.name)
    kept = [onnx.TensorProto.FromString(t.SerializeToString()) for t in inits]
    del c.graph.initializer[:]
    c.graph.initializer.extend(kept)
    return c.SerializeToString(deterministic=True)


def _weights_model() -> onnx.ModelProto:
    m = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18], producer_name: "unit-test">
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Add(x, w1)
            b = Mul(a, w2)
            y = Sub(b, w3)
        }
    """)
    rng = np.random.default_rng(0)
    for name in ("w1", "w2", "w3"):
        m.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((2, 3)).astype(np.float32), name))
    onnx.helper.set_model_props(m, {"k": "v"})
    return m


def test_consuming_export_is_the_template_rewritten_without_copying_weights():
    m = _weights_model()
    g = ir.import_model(m)
    w1 = next(t for t in m.graph.initializer if t.name == "w1")
    mul = g.nodes[1]
    mul.inputs[1] = gs.Constant("w2_new", np.ones((2, 3), np.float32))  # w2 is dropped, a new weight comes
    g.nodes[2].inputs[1].name = "w3_renamed"
    expected = ir.export_graph(g, _weights_model())
    out = ir.export_graph(g, m, consume=True)
    assert out is m
    assert any(t is w1 for t in out.graph.initializer)  # the same proto, not a copy
    assert sorted(t.name for t in out.graph.initializer) == ["w1", "w2_new", "w3_renamed"]
    assert _canonical(out) == _canonical(expected)
    onnx.checker.check_model(out, full_check=True)
    assert {p.key: p.value for p in out.metadata_props} == {"k": "v"}


def test_consuming_export_with_two_constants_on_one_proto_writes_both():
    m = _weights_model()
    g = ir.import_model(m)
    w1 = g.nodes[0].inputs[1]
    twin = gs.Constant("w1_twin", w1._values)  # e.g. a pass that copied a Constant: same LazyValues
    g.nodes[1].inputs[1] = twin
    expected = ir.export_graph(g, _weights_model())
    out = ir.export_graph(g, m, consume=True)
    assert sorted(t.name for t in out.graph.initializer) == ["w1", "w1_twin", "w3"]
    assert _canonical(out) == _canonical(expected)


def test_consuming_export_of_the_rich_model_matches_the_copying_one():
    m = _rich_model()
    expected = ir.export_graph(ir.import_model(m), _rich_model())
    out = ir.export_graph(ir.import_model(m), m, consume=True)
    assert _canonical(out) == _canonical(expected)


def test_optimize_leaves_a_callers_model_proto_alone(tmp_path):
    m = _weights_model()
    before = m.SerializeToString()
    graphopt.optimize(m, "O1", verify="off")
    assert m.SerializeToString() == before


@pytest.mark.parametrize("values", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array(3.5, np.float16), np.array([True, False]),
    np.arange(4, dtype=np.int64), np.zeros((0, 2), np.uint8), np.array([1 + 2j], np.complex64),
    np.arange(12, dtype=np.float32).reshape(3, 4).T, np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
])
def test_a_weight_is_written_as_gs_writes_it(values):
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    c = gs.Constant("w", values, data_location=onnx.TensorProto.DEFAULT)
    p = onnx.TensorProto()
    ir._write_tensor(c, p)
    assert p == OnnxExporter.export_tensor_proto(c)
    assert np.array_equal(onnx.numpy_helper.to_array(p), values)


def test_save_writes_weights_from_their_views_and_parses_to_the_same_model(tmp_path, fixtures_dir):
    src = fixtures_dir / "tiny_cnn.onnx"
    model, source = ir.load_with_source(src)
    graph = ir.import_model(model, source)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    w = conv.inputs[1]
    conv.inputs[1] = gs.Constant(w.name + "_new", np.ascontiguousarray(ir.const_view(w)[:, :, ::-1, :]))
    out, raw, unwritten = ir.export_for_save(graph, model, source)
    assert sum(v is not None for v in raw) >= 2  # a weight from the file, and the new one from its array
    assert not unwritten
    path = ir.save(out, tmp_path / "out.onnx", raw=raw)
    data = path.read_bytes()
    assert len(data) == out.ByteSize()
    assert onnx.load_from_string(data) == out
    onnx.checker.check_model(onnx.load(path), full_check=True)


@pytest.mark.parametrize("how", ["short", "no-writev"])
def test_pieces_are_written_whole_through_short_writes_and_without_writev(tmp_path, monkeypatch, how):
    """_write_pieces goes on after a write that took only part of what it was given, and writes
    piece by piece where os.writev is missing."""
    rng = np.random.default_rng(0)
    data = [rng.bytes(n) for n in (3, 0, 5000, 1, 70000)] + [memoryview(np.arange(7, dtype=np.float32)),
                                                             memoryview(np.float32(2.5))]
    want = b"".join(memoryview(p).cast("B").tobytes() for p in data)
    calls = []
    if how == "short":
        real = os.writev

        def writev(fd, buffers):  # at most 1000 bytes a call
            calls.append(len(buffers))
            left, cut = 1000, []
            for b in buffers:
                cut.append(memoryview(b)[:left])
                left -= len(cut[-1])
                if not left:
                    break
            return real(fd, cut)
        monkeypatch.setattr(os, "writev", writev)
    else:
        monkeypatch.delattr(os, "writev")
    ir._write_atomically(data, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == want
    assert how != "short" or len(calls) >= len(want) // 1000


@pytest.mark.parametrize("fails", ["write", "rename", "interrupt"])
def test_a_failed_write_leaves_the_old_output_and_no_temporary_file(tmp_path, monkeypatch, fails):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")

    def broken(*a, **k):
        if fails == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace" if fails == "rename" else "writev", broken)
    with pytest.raises(KeyboardInterrupt if fails == "interrupt" else InputError,
                       match=None if fails == "interrupt" else "out.bin: cannot write: No space left on device"):
        ir._write_atomically([b"new"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"] and out.read_bytes() == b"old"


def test_a_staged_model_is_in_place_only_once_committed(tmp_path, fixtures_dir):
    m = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    out = tmp_path / "o.onnx"
    staged = ir.stage(m, out)
    assert not out.exists() and staged.tmp.parent == tmp_path and staged.tmp.name.startswith(".o.onnx.")
    assert onnx.load(staged.tmp) == m
    assert staged.commit() == out and onnx.load(out) == m and not staged.tmp.exists()
    again = ir.stage(m, out)
    again.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]
    with pytest.raises(RuntimeError):
        again.commit()


@pytest.mark.parametrize("external", [None, True])
def test_a_new_weight_left_out_of_its_proto_is_written_from_its_array(tmp_path, fixtures_dir, external):
    src = fixtures_dir / "tiny_cnn.onnx"

    def exported(defer):
        model, source = ir.load_with_source(src)
        graph = ir.import_model(model, source)
        conv = next(n for n in graph.nodes if n.op == "Conv")
        conv.inputs[1] = gs.Constant("w_new", np.ascontiguousarray(ir.const_view(conv.inputs[1])[::-1]))
        return ir.export_for_save(graph, model, source, defer=defer)

    expected = exported(False)[0]
    out, raw, unwritten = exported(True)
    assert unwritten and not next(t for t in out.graph.initializer if t.name == "w_new").HasField("raw_data")
    path = ir.save(out, tmp_path / "out.onnx", raw=raw, unwritten=unwritten, external_data=external)
    written = onnx.load(path)
    if external:  # (external data leaves data_location set on reload: compare the weights)
        weights = {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in written.graph.initializer}
        assert weights == {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in expected.graph.initializer}
    else:
        assert written == expected  # the file holds the weight
    unwritten.complete()
    assert out == expected and not unwritten


def test_the_model_of_a_run_that_wrote_a_file_is_complete(tmp_path, fixtures_dir):
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 64] x) => (float[2, 32] y) { wt = Transpose(w)  y = MatMul(x, wt) }""")
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(64 * 32, dtype=np.float32).reshape(32, 64), "w"))
    path = tmp_path / "in.onnx"
    onnx.save(m, path)
    res = graphopt.optimize(path, "O1", verify="off", output=tmp_path / "out.onnx")
    written = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in written.graph.node] == ["MatMul"]
    assert res.model == written
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(written.graph.initializer[0]),
                                  np.arange(64 * 32, dtype=np.float32).reshape(32, 64).T)


def test_save_ignores_a_view_that_does_not_fit_its_tensor(tmp_path):
    m = _weights_model()
    raw = [memoryview(b"\x00" * 4)] + [None] * (len(m.graph.initializer) - 1)  # 4 bytes for a 2x3 float
    path = ir.save(m, tmp_path / "out.onnx", raw=raw)
    assert onnx.load(path) == m


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**14, 2**21 + 5, 2**28 + 1, 2**35])
def test_varints_encode_as_protobuf_does(n):
    t = onnx.TensorProto(dims=[n])
    assert wire.encode_varint(n) == t.SerializeToString()[1:]


@pytest.mark.parametrize("tensor", [
    gs.Variable("a", np.float32, [2, "N", None]), gs.Variable("b", np.int64, []), gs.Variable("c", np.float16, None),
    gs.Variable("d", None, None), gs.Variable("e", None, [3]), gs.Variable("f", np.float32, [1], type="sequence_type"),
    gs.Constant("g", np.zeros((2, 3), np.float32)), gs.Variable("h", onnx.TensorProto.BFLOAT16, [4]),
    gs.Variable("i", np.bool_, [np.int64(2)]),
])
def test_value_info_is_written_as_gs_writes_it(tensor):
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    vi = onnx.ValueInfoProto()
    try:
        expected = OnnxExporter.export_value_info_proto(tensor, False)
    except Exception as e:  # what gs cannot write, graphopt cannot either, with the same error
        with pytest.raises(type(e)):
            ir.value_info_into(tensor, vi)
        return
    ir.value_info_into(tensor, vi)
    assert vi == expected and vi.SerializeToString() == expected.SerializeToString()


def test_deferred_gc_restores_the_collector_and_leaves_a_users_freeze_alone():
    import gc

    was = gc.isenabled()
    gc.enable()
    try:
        with ir.deferred_gc():
            assert not gc.isenabled()
        assert gc.isenabled() and gc.get_freeze_count() == 0
        gc.disable()
        with ir.deferred_gc():
            pass
        assert not gc.isenabled()
        gc.enable()
        gc.freeze()
        try:
            frozen = gc.get_freeze_count()
            with ir.deferred_gc():
                [[] for _ in range(100)]
            # the user's frozen objects stay frozen (unfreezing would empty the permanent generation;
            # a few of them may die meanwhile, e.g. in another thread: seen under pytest -n 2)
            assert gc.get_freeze_count() >= frozen - 100
        finally:
            gc.unfreeze()
    finally:
        (gc.enable if was else gc.disable)()


def test_the_light_model_of_the_check_serves_the_first_shape_inference_once(fixtures_dir):
    model = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    other = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    fresh = ir.light_model(model, value_info=False)
    ir.check_model(model)
    assert ir.light_model(other, value_info=False) == fresh  # another model: built, and the kept one dropped
    assert ir._light_kept == []
    ir.check_model(model)
    kept = ir.light_model(model, value_info=False)
    assert kept == fresh and not kept.graph.value_info
    assert ir.light_model(model, value_info=False) is not kept  # once only


def test_the_report_gives_the_input_files_size(fixtures_dir):
    path = fixtures_dir / "tiny_cnn.onnx"
    res = graphopt.optimize(path, "O1", verify="off")
    assert res.report.before["model_bytes"] == path.stat().st_size


def _skeleton_model(listed: bool = False) -> onnx.ModelProto:
    """Two big float weights (one FLOAT16), a small one, a big int64 one (shape arithmetic reads
    those: a skeleton keeps them) and a Constant node."""
    m = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[4, 2048] x) => (float[4, 2048] y, int64[2048] k) {
            a = Add(x, big)
            h = Cast<to = 1>(half)
            b = Mul(a, h)
            c = Constant<value = float[1] {2.0}>()
            d = Mul(b, c)
            y = Sub(d, small)
            k = Identity(ints)
        }
    """)
    rng = np.random.default_rng(0)
    m.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal((4, 2048)).astype(np.float32), "big"),
        onnx.numpy_helper.from_array(rng.standard_normal((4, 2048)).astype(np.float16), "half"),
        onnx.numpy_helper.from_array(np.ones((4, 1), np.float32), "small"),
        onnx.numpy_helper.from_array(np.arange(2048, dtype=np.int64), "ints"),
    ])
    if listed:  # an overridable weight (IR >= 4): also a graph input
        m.graph.input.append(onnx.helper.make_tensor_value_info("big", onnx.TensorProto.FLOAT, [4, 2048]))
    return m


def test_a_skeleton_empties_only_big_float_weights_and_parses_to_the_model_without_them():
    m = _skeleton_model()
    data = m.SerializeToString()
    cut, spans, stripped = wire.skeleton(data, ir.LIGHT_BYTES)
    assert spans == [sp if sp is not None and sp[1] - sp[0] > ir.LIGHT_BYTES else None for sp in wire.raw_spans(data)]
    assert spans[0] is not None and spans[2] is None  # (a small weight's span is not read)
    assert [m.graph.initializer[i].name for i in stripped] == ["big", "half"]
    assert len(cut) < len(data) - 40000
    expected = onnx.ModelProto()
    expected.CopyFrom(m)
    for i in stripped:
        expected.graph.initializer[i].raw_data = b""
    skel = onnx.load_from_string(cut)
    assert skel == expected and all(t.HasField("raw_data") for t in skel.graph.initializer)
    assert wire.skeleton(b"\xff\xff", 0) is None


def test_a_skeleton_is_made_whole_from_its_source(tmp_path):
    m = _skeleton_model()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    skel, source = ir.load_with_source(path, skeleton=True)
    assert source.stripped == {0, 1} and not len(skel.graph.initializer[0].raw_data)
    graph = ir.import_model(skel, source)
    big = next(t for t in graph.tensors().values() if t.name == "big")
    np.testing.assert_array_equal(ir.const_view(big), onnx.numpy_helper.to_array(m.graph.initializer[0]))
    assert source.stripped == {0, 1}  # reading the values did not fill the proto
    copy = ir.export_graph(graph, skel)  # a copying export (gs's exporter reads each proto): complete
    assert _canonical(copy) == _canonical(ir.export_graph(ir.import_model(m), m))
    assert source.stripped == set()  # ... through the protos of the skeleton itself
    assert skel == m
    skel2, source2 = ir.load_with_source(path, skeleton=True)
    source2.fill(skel2)
    assert skel2 == m and ir.load_with_source(path)[1].stripped == set()  # (no skeleton unless asked)


@pytest.mark.parametrize("defer", [False, True])
def test_a_skeletons_consuming_export_writes_the_weights_from_the_file(tmp_path, defer):
    m = _skeleton_model()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)

    def edited(model, source=None):
        graph = ir.import_model(model, source)
        big = next(t for t in graph.tensors().values() if t.name == "big")
        graph.nodes[-2].inputs[1] = gs.Constant("big_twin", big._values)  # a second Constant on one proto
        return graph

    expected = ir.export_graph(edited(onnx.load(path)), onnx.load(path))
    skel, source = ir.load_with_source(path, skeleton=True)
    out, raw, unwritten = ir.export_for_save(edited(skel, source), skel, source, defer=defer)
    written = ir.save(out, tmp_path / "out.onnx", raw=raw, unwritten=unwritten)
    assert _canonical(onnx.load(written)) == _canonical(expected)
    if defer:
        assert unwritten  # the protos are not whole until asked for
        unwritten.complete()
    assert _canonical(out) == _canonical(expected)


@pytest.mark.parametrize("listed", [False, True])
def test_optimize_without_verification_reads_a_skeleton_and_writes_the_same_model(tmp_path, listed):
    m = _skeleton_model(listed)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    _, source = ir.load_with_source(path, skeleton=True)
    assert bool(source.stripped) != listed  # an initializer that is also an input: no skeleton
    off = graphopt.optimize(path, "O1", verify="off", output=tmp_path / "off.onnx")
    end = graphopt.optimize(path.read_bytes(), "O1", verify="end", output=tmp_path / "end.onnx")
    assert _canonical(onnx.load(tmp_path / "off.onnx")) == _canonical(onnx.load(tmp_path / "end.onnx"))
    assert _canonical(off.model) == _canonical(end.model)
    onnx.checker.check_model(off.model, full_check=True)


def test_a_skeleton_is_read_from_bytes_too(tmp_path):
    m = _skeleton_model()
    data = m.SerializeToString()
    skel, source = ir.load_with_source(data, skeleton=True)
    assert source.stripped and source.mapped is None and source.data == data
    res = graphopt.optimize(data, "O1", verify="off", output=tmp_path / "out.onnx")
    expected = graphopt.optimize(m, "O1", verify="off")
    assert _canonical(res.model) == _canonical(expected.model) == _canonical(onnx.load(tmp_path / "out.onnx"))


def test_a_skeleton_is_read_from_a_mapped_file_and_keeps_external_weights_external(tmp_path):
    m = _skeleton_model()
    half = m.graph.initializer[1]
    (tmp_path / "half.bin").write_bytes(half.raw_data)
    onnx.external_data_helper.set_external_data(half, "half.bin", offset=0, length=len(half.raw_data))
    half.data_location = onnx.TensorProto.EXTERNAL
    half.ClearField("raw_data")
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    skel, source = ir.load_with_source(path, skeleton=True)
    assert source.stripped == {0} and not source.whole  # "big" left out; "half" read from its file
    assert bytes(source.data) == path.read_bytes()
    res = graphopt.optimize(path, "O1", verify="off", output=tmp_path / "out.onnx")
    expected = graphopt.optimize(path, "O1", verify="end").model  # (no skeleton)
    got = onnx.load(tmp_path / "out.onnx")
    weights = lambda model: {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    assert weights(got) == weights(expected) == weights(res.model)
    assert "h" in weights(got)  # (the Cast of the external weight was folded)


@pytest.mark.parametrize("value_info", [True, False])
def test_a_light_model_cut_from_a_skeleton_is_the_light_model(tmp_path, fixtures_dir, value_info):
    m = _skeleton_model()
    m.metadata_props.add(key="k", value="v")  # (a light model has no metadata)
    m.graph.value_info.append(onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [4, 2048]))
    for model in (m, onnx.load(fixtures_dir / "tiny_cnn.onnx")):
        onnx.save(model, tmp_path / "m.onnx")
        skel, source = ir.load_with_source(tmp_path / "m.onnx", skeleton=True, check=False)
        assert source.skeleton is not None
        cut = ir.light_model(skel, value_info=value_info, serialized=source.skeleton)
        built = ir.light_model(model, value_info=value_info)
        assert cut.graph == built.graph
        for f, v in built.ListFields():  # (light_model sets empty strings and zeros, which cutting leaves unset)
            assert f.name == "graph" or getattr(cut, f.name) == v
        assert not cut.metadata_props


@pytest.mark.parametrize("how", ["rewritten", "replaced"])
def test_an_input_file_rewritten_after_the_run_is_an_error_not_a_crash(tmp_path, how):
    m = _skeleton_model()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    res = graphopt.optimize(path, "O1", verify="off")  # the weights stay in the mapped file until asked for
    other = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    if how == "rewritten":  # in place (same inode, truncated): reading the old mapping would be SIGBUS
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(other.SerializeToString())
        with pytest.raises(InputError, match="rewritten while graphopt was using it"):
            res.model
    else:  # renamed over: the mapping keeps the old file
        onnx.save(other, tmp_path / "new.onnx")
        os.replace(tmp_path / "new.onnx", path)
        expected = graphopt.optimize(_skeleton_model(), "O1", verify="off").model
        assert _canonical(res.model) == _canonical(expected)


@pytest.mark.parametrize("how", ["unchanged", "rewritten", "replaced"])
def test_onnxruntime_gets_the_input_file_only_while_it_is_the_one_mapped(tmp_path, how):
    m = _skeleton_model()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    data = path.read_bytes()
    _, source = ir.load_with_source(path, skeleton=True)
    other = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])).SerializeToString()
    if how == "unchanged":
        assert source.runnable() == str(path)
    elif how == "rewritten":
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(other)
        with pytest.raises(InputError, match="rewritten while graphopt was using it"):
            source.runnable()
    else:
        (tmp_path / "new.onnx").write_bytes(other)
        os.replace(tmp_path / "new.onnx", path)
        assert source.runnable() == data  # the mapping's bytes: the file as it was read


def test_a_file_that_cannot_be_mapped_is_read(tmp_path, monkeypatch):
    import mmap

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap says on a file system without it

    monkeypatch.setattr(mmap, "mmap", refuse)
    path = tmp_path / "m.onnx"
    onnx.save(_skeleton_model(), path)
    model, source = ir.load_with_source(path, skeleton=True)
    assert isinstance(source.data, bytes) and source.mapped is None and source.stripped == {0, 1}
    res = graphopt.optimize(path, "O1", verify="off", output=tmp_path / "out.onnx")
    assert _canonical(res.model) == _canonical(graphopt.optimize(_skeleton_model(), "O1", verify="off").model)


def test_derived_names_are_unique_with_and_without_the_name_index():
    from graphopt.rewrite import derived_name, name_index

    x = gs.Variable("x", np.float32, [2])
    taken = gs.Variable("w_bn", np.float32, [2])
    g = gs.Graph(nodes=[gs.Node("Relu", "w_bn_node", inputs=[x], outputs=[taken])], inputs=[x], outputs=[taken])
    # without the index every call looks at the graph: a name handed out but not used yet is free again
    assert [derived_name(g, "w", "bn") for _ in range(2)] == ["w_bn2", "w_bn2"]
    with name_index(g):
        got = [derived_name(g, "w", "bn") for _ in range(3)]
        assert got == ["w_bn2", "w_bn3", "w_bn4"]  # each name handed out once
        g.nodes.append(gs.Node("Relu", derived_name(g, "w_bn", "node"), inputs=[x], outputs=[gs.Variable("y", np.float32, [2])]))
        assert derived_name(g, "w_bn", "node") == "w_bn_node3"  # w_bn_node was in the graph, _node2 handed out
    assert derived_name(g, "w", "bn") == "w_bn2"
