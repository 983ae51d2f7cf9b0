"""Import and export: ONNX model <-> onnx-graphsurgeon ``gs.Graph``.

Data flows one way: file -> :func:`load` -> :func:`import_model` -> passes -> :func:`export_graph` ->
:func:`save` -> file.  Export copies the model-level fields that onnx-graphsurgeon does not carry
(metadata, doc strings, model version, custom opset imports) from the model the graph came from.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import logging
import mmap
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from . import importer, lineage, wire
from .report import all_nodes
from .errors import InputError

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]
TWO_GB = 2**31
SIZE_LIMIT = TWO_GB - 64 * 2**20  # from this size on a model is written with external data (room for the graph)

# onnx-graphsurgeon logs a warning for every odd thing; graphopt reports what matters itself.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)


@dataclass
class Source:
    """The bytes a model was parsed from, and where the ``raw_data`` of each top-level initializer lies
    in them (``(start, end)``, or None): weights read from here cost no copy (upb copies a bytes field
    on every read, and on this machine a fresh 20 MB buffer costs ~15 ms in page faults alone)."""

    data: bytes | mmap.mmap  # (a file mapped into memory: see _read)
    spans: list[tuple[int, int] | None]
    whole: bool = True  # the file holds every weight (no external data)
    # initializers whose raw_data the model (a skeleton: see load_with_source) still holds empty:
    # their bytes are only here
    stripped: set[int] = field(default_factory=set)
    skeleton: bytes | None = None  # the skeleton's bytes (what the model was parsed from)
    mapped: tuple[Path, os.stat_result] | None = None  # data maps this file, which had this stat then

    def guard(self) -> None:
        """Before reading a mapped file's bytes after the run: a one-line error, not a crash (SIGBUS),
        if the file was rewritten in place meanwhile.  A file replaced (renamed over) or deleted is
        fine: the mapping keeps the old one."""
        if self.mapped is not None and self._change() == "rewritten":
            raise InputError(f"{self.mapped[0]}: the input file was rewritten while graphopt was using it; run again")

    def _change(self) -> str | None:
        """What became of the mapped file: None (it is as it was), ``"replaced"`` (another file or
        none at its path) or ``"rewritten"`` (in place)."""
        path, then = self.mapped
        try:
            now = os.stat(path)
        except OSError:
            return "replaced"
        if (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino):
            return "replaced"
        return "rewritten" if (now.st_size, now.st_mtime_ns) != (then.st_size, then.st_mtime_ns) else None

    def runnable(self) -> bytes | str:
        """The model as onnxruntime can load it (when ``whole``): the file itself while it is the
        one that was mapped, unchanged, else the bytes (a copy of a mapping)."""
        if self.mapped is not None:
            if self._change() is None:
                return str(self.mapped[0])
            self.guard()
        return self.data if isinstance(self.data, bytes) else bytes(self.data)

    def raw(self, i: int) -> memoryview | None:
        """The raw bytes of initializer ``i`` (read-only, no copy), if the file holds them."""
        span = self.spans[i] if i < len(self.spans) else None
        return None if span is None else memoryview(self.data)[span[0]:span[1]]

    def fill_one(self, i: int, proto: onnx.TensorProto) -> None:
        """Put initializer ``i``'s bytes into ``proto`` (that initializer of the skeleton model)."""
        if i in self.stripped:
            self.guard()
            proto.raw_data = self.raw(i).tobytes()
            self.stripped.discard(i)

    def fill(self, model: onnx.ModelProto) -> None:
        """Make the skeleton ``model`` (the model parsed with this source) whole."""
        inits = model.graph.initializer
        for i in sorted(self.stripped):
            self.fill_one(i, inits[i])


SOURCE_LIMIT = 2**30  # keep the file's bytes in memory beside the model only up to this size


def load(src: ModelLike, *, check: bool = True) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ``ModelProto`` (returned as is), with its external data.

    Raises :class:`InputError` with a one-line message for anything that is not a usable ONNX model.
    """
    return load_with_source(src, check=check)[0]


def load_with_source(src: ModelLike, *, check: bool = True,
                     skeleton: bool = False) -> tuple[onnx.ModelProto, Source | None]:
    """:func:`load`, and the :class:`Source` of the model when it was parsed here from a file or bytes
    (None for a ``ModelProto``, a model over :data:`SOURCE_LIMIT`, or one whose wire format is odd).

    ``skeleton=True``: the model may come back a skeleton (:func:`graphopt.wire.skeleton`): its big
    float weights hold an empty ``raw_data``, their bytes being only in the source
    (``Source.stripped`` lists them).  :func:`import_model` reads them from there, and the IR fills a
    proto in when something asks for it; :meth:`Source.fill` makes the model whole.  For a caller that
    uses the model only through the IR and :func:`export_for_save`: parsing 20 MB of weights costs
    as much as the rest of a -O1 run."""
    data = None
    cut = None
    external = False
    mapped = None  # the file's stat, when data maps it
    if isinstance(src, onnx.ModelProto):
        model = src
        base_dir = None
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        model, cut = _parse(data, "the given bytes", skeleton)
        base_dir = None
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, not an ONNX file")
        data, mapped = _read(path, mapped=skeleton)
        model, cut = _parse(data, str(path), skeleton)
        base_dir = path.parent
        # (a skeleton holds every byte but big weights': no external data entry ("location") in it, none)
        external = (not cut or b"location" in cut[0]) and uses_external_data(model)
        if external:
            for t in onnx.external_data_helper._get_all_tensors(model):
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    loc = next((e.value for e in t.external_data if e.key == "location"), "")
                    if not (base_dir / loc).is_file():
                        raise InputError(f"{path}: external data file missing: {base_dir / loc} (tensor '{t.name}')")
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
            except (FileNotFoundError, OSError) as e:
                missing = getattr(e, "filename", None) or str(e)
                raise InputError(f"{path}: external data missing: {missing}") from None
            except Exception as e:
                raise InputError(f"{path}: external data unreadable: {e}") from None
    else:
        raise InputError(f"cannot load a model from {type(src).__name__}")
    source = None
    if cut:
        source = Source(data, cut[1], whole=not external, stripped=set(cut[2]), skeleton=cut[0],
                        mapped=(path, mapped) if mapped else None)
    elif data is not None and len(data) <= SOURCE_LIMIT:
        spans = wire.raw_spans(data)
        if spans is not None and len(spans) == len(model.graph.initializer):
            source = Source(data, spans, whole=not external)
    if check:
        check_model(model, str(src) if base_dir else "model", data=data, source=source)
    return model, source


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # (Linux)


def _read(path: Path, mapped: bool) -> tuple[bytes | mmap.mmap, os.stat_result | None]:
    """The bytes of the file ``path``; ``mapped``: mapped into memory rather than read (the weights a
    skeleton leaves out are then read from the page cache only where used, and never copied on the
    way in: 10-25 ms less CPU per -O1 run on a 14-21 MB model; LLVM reads its inputs the same way),
    and then the file's stat.  One-line errors."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if mapped and st.st_size > 0:
                try:
                    if _POPULATE:  # its pages mapped now, in one go: faulting them in one by one later
                        # (when the output is written from them) cost twice as much as reading the file
                        return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ), st
                    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), st
                except (OSError, ValueError):  # a file system that cannot map files: read it
                    pass
            data = f.read()
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not data:
        raise InputError(f"{path}: empty file")
    return data, None


def _parse(data: bytes, what: str, skeleton: bool) -> tuple[onnx.ModelProto, tuple | None]:
    """The model in ``data``, and with ``skeleton``, when one is worth it and usable, as a skeleton:
    then also what :func:`graphopt.wire.skeleton` returned."""
    cut = None
    if skeleton and len(data) <= SOURCE_LIMIT and importer.LITTLE_ENDIAN:
        cut = wire.skeleton(data, LIGHT_BYTES)
    if not cut or not cut[2]:
        return _parse_bytes(data if isinstance(data, bytes) else memoryview(data), what), None
    model = _parse_bytes(cut[0], what)
    if _skeleton_usable(model, cut[2]):
        return model, cut
    return _parse_bytes(data if isinstance(data, bytes) else memoryview(data), what), None


def _skeleton_usable(model: onnx.ModelProto, stripped: list[int]) -> bool:
    """Whether the IR reads every weight a skeleton left empty from the source: it is the only
    initializer of its name, and not a graph input (export copies those from the template)."""
    g = model.graph
    names = [t.name for t in g.initializer]
    if len(set(names)) != len(names):
        return False
    inputs = {vi.name for vi in g.input}
    return not any(names[i] in inputs for i in stripped)


def _parse_bytes(data: bytes, what: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise InputError(f"{what}: not an ONNX model (protobuf parse failed; truncated or another format?)") from None
    if not model.HasField("graph") or (model.ir_version == 0 and not model.opset_import):
        raise InputError(f"{what}: not an ONNX model (no graph or ir_version)")
    return model


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True if a tensor of ``model`` (initializer, or tensor attribute at any depth) lives in a file."""
    return _graph_uses_external_data(model.graph)


_TENSOR_ATTRS = (onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS, onnx.AttributeProto.SPARSE_TENSOR,
                 onnx.AttributeProto.SPARSE_TENSORS, onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _graph_uses_external_data(g: onnx.GraphProto) -> bool:
    ext = onnx.TensorProto.EXTERNAL
    if any(t.data_location == ext for t in g.initializer) or any(
            t.values.data_location == ext for t in g.sparse_initializer):
        return True
    for n in g.node:
        if not len(n.attribute):
            continue
        for a in n.attribute:
            if a.type not in _TENSOR_ATTRS:
                continue
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == ext:
                return True
            if any(t.data_location == ext for t in a.tensors):
                return True
            if a.type == onnx.AttributeProto.SPARSE_TENSOR and a.sparse_tensor.values.data_location == ext:
                return True
            if a.type == onnx.AttributeProto.GRAPH and _graph_uses_external_data(a.g):
                return True
            if any(_graph_uses_external_data(sg) for sg in a.graphs):
                return True
    return False


def check_model(model: onnx.ModelProto, what: str = "model", data: bytes | None = None,
                source: Source | None = None) -> None:
    """onnx.checker, with plainer messages for cycles and duplicate names (:func:`check_structure`).

    The checker runs on :func:`light_model` (weights left out: serializing 20 MB of weights for the
    C++ checker costs as much as saving the model); what it would check on those weights is checked
    here instead (:func:`_check_weights`; ``data``, the bytes ``model`` was parsed from, makes that
    cheaper).
    """
    try:
        heavy = heavy_indices(model.graph.initializer)  # (reads through upb: once)
        _check_weights(model, what, heavy, data, source)
        # (a skeleton with external data has them loaded into the model since, not in its bytes)
        light = light_model(model, serialized=source.skeleton if source is not None and source.whole else None,
                            heavy=heavy)
        serialized = light.SerializeToString()
        if len(serialized) < SIZE_LIMIT:
            onnx.checker.check_model(serialized)
            del light.graph.value_info[:]
            _light_kept[:] = [model, light]  # for the first shape inference (light_model, value_info=False)
        else:
            check_structure(model.graph, what)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        # The checker refuses whatever check_structure does (a name produced twice, a node reading
        # what comes after it), but check_structure says what is wrong more plainly: a cycle, or
        # which name.  It runs only then: on a valid model it would cost as much as the checker.
        check_structure(model.graph, what)
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise InputError(f"{what}: fails onnx.checker: {first}") from None


LIGHT_BYTES = 4096  # initializers up to this size stay in a light model (shape arithmetic needs them)


def _is_heavy(t: onnx.TensorProto) -> bool:
    """A weight a light model leaves out: a float tensor stored in raw_data, over ``LIGHT_BYTES``
    (integer tensors stay: they may be shapes or indices that shape inference reads)."""
    return (t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                            onnx.TensorProto.DOUBLE)
            and t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL
            and wire.nbytes(t) > LIGHT_BYTES)


def heavy_indices(inits) -> list[int]:
    """The indices of the initializers (a repeated TensorProto field) a light model leaves out."""
    return [i for i, t in enumerate(inits) if _is_heavy(t)]


# [model, its light model without value_info] as check_model left it: the next light_model(model,
# value_info=False) takes it instead of building it again (once; the caller may change it).
_light_kept: list = []


def light_model(model: onnx.ModelProto, *, value_info: bool = True, serialized: bytes | None = None,
                heavy: list[int] | None = None) -> onnx.ModelProto:
    """``model`` without its heavy weights: each becomes a graph input of the same type and shape (IR
    4 and later let an input stand for a weight; for IR 3 every initializer is an input anyway).
    Nodes, signature, value_info (unless ``value_info=False``), small initializers and subgraphs are
    copied as they are.  What the checker and shape inference see is the same model, at a fraction of
    the bytes.  ``serialized``: ``model`` serialized, when that is small (a skeleton's bytes): the
    light model is then made from a parse of it, which costs a tenth of copying ``model`` field by
    field.  ``heavy``: :func:`heavy_indices` of the model's initializers, when the caller has them
    (each check reads the tensor through upb)."""
    kept = _light_kept[:]
    if kept:
        _light_kept.clear()
        if kept[0] is model and not value_info:
            return kept[1]
    if serialized is not None:
        return _light_from_copy(onnx.ModelProto.FromString(serialized), value_info, heavy)
    g = model.graph
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    for f in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(m, f, getattr(model, f))
    lg = m.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    if value_info:
        lg.value_info.extend(g.value_info)
    lg.sparse_initializer.extend(g.sparse_initializer)
    listed = {vi.name for vi in g.input}
    is_heavy = set(heavy if heavy is not None else heavy_indices(g.initializer))
    for i, t in enumerate(g.initializer):
        if i not in is_heavy:
            lg.initializer.append(t)
        elif t.name not in listed:
            _input_for(t, lg.input.add())
    return m


def _input_for(t: onnx.TensorProto, vi: onnx.ValueInfoProto) -> None:
    """Make the empty ``vi`` the graph input standing for weight ``t`` in a light model (what
    make_tensor_value_info makes, without its intermediate copies)."""
    vi.name = t.name
    tt = vi.type.tensor_type
    tt.elem_type = t.data_type
    sp = tt.shape
    sp.SetInParent()
    for d in t.dims:
        sp.dim.add().dim_value = d


# What light_model keeps of a model and of its graph (and the graph's initializers but heavy ones).
_LIGHT_MODEL_FIELDS = {"ir_version", "opset_import", "functions", "producer_name", "producer_version", "domain",
                       "model_version", "doc_string", "graph"}
_LIGHT_GRAPH_FIELDS = {"name", "node", "input", "output", "value_info", "sparse_initializer", "initializer"}


def _light_from_copy(m: onnx.ModelProto, value_info: bool, heavy: list[int] | None = None) -> onnx.ModelProto:
    """:func:`light_model` made by cutting down ``m``, a copy of the model (``heavy``: the indices of
    its heavy initializers, when known)."""
    for f, _ in m.ListFields():
        if f.name not in _LIGHT_MODEL_FIELDS:
            m.ClearField(f.name)
    g = m.graph
    for f, _ in g.ListFields():
        if f.name not in _LIGHT_GRAPH_FIELDS or (f.name == "value_info" and not value_info):
            g.ClearField(f.name)
    inits = g.initializer
    if heavy is None:
        heavy = heavy_indices(inits)
    if not heavy:
        return m
    listed = {vi.name for vi in g.input}
    for i in heavy:
        if inits[i].name not in listed:
            _input_for(inits[i], g.input.add())
    for i in reversed(heavy):
        del inits[i]
    return m


def _check_weights(model: onnx.ModelProto, what: str, heavy: list[int], data: bytes | None = None,
                   source: Source | None = None) -> None:
    """The checks onnx.checker makes on the weights :func:`light_model` leaves out (``heavy``: their
    indices, :func:`heavy_indices`).

    ``data``: the bytes ``model`` was parsed from; their wire format gives each weight's byte count
    without reading the weight (upb copies a bytes field on every read: over a whole model, a second
    model's worth of memory traffic)."""
    g = model.graph
    listed = {vi.name for vi in g.input} if model.ir_version < 4 else None
    spans = source.spans if source is not None else (wire.raw_spans(data) if data is not None else None)
    lengths = None if spans is None else [-1 if sp is None else sp[1] - sp[0] for sp in spans]
    if lengths is not None and len(lengths) != len(g.initializer):
        lengths = None
    inits = g.initializer
    for i in heavy:
        t = inits[i]
        if listed is not None and t.name not in listed:
            raise InputError(f"{what}: fails onnx.checker: {t.name} in initializer but not in graph input")
        have = lengths[i] if lengths is not None and lengths[i] >= 0 else len(t.raw_data)
        need = wire.nbytes(t)
        if have < need:
            raise InputError(f"{what}: fails onnx.checker: TensorProto (tensor name: {t.name}) raw_data size "
                             f"({have} bytes) is too small for the declared shape and type ({need} bytes required).")


_SUBGRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}


def _may_have_subgraphs(n: onnx.NodeProto) -> bool:
    """Control flow, or a custom op: the only nodes whose attributes can hold graphs (reading every
    node's attributes through upb costs more than the check)."""
    return n.op_type in _SUBGRAPH_OPS or n.domain not in ("", "ai.onnx")


def _reads(n: onnx.NodeProto) -> set[str]:
    """Names ``n`` reads: its inputs and what its subgraphs take from outer scopes."""
    ins = {i for i in n.input if i}
    if _may_have_subgraphs(n):
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ins |= _outer_refs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    ins |= _outer_refs(g)
    return ins


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """True if a node of ``graph`` has a subgraph attribute (If, Loop, Scan, or a custom op's)."""
    for n in graph.node:
        if _may_have_subgraphs(n) and any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            return True
    return False


def check_structure(graph: onnx.GraphProto, what: str = "model", outer: set[str] | None = None) -> None:
    """Duplicate tensor names and cycles (nodes that cannot be ordered)."""
    inputs = {i.name for i in graph.input}
    known = set(outer or ()) | inputs
    known.update(t.name for t in graph.initializer)
    known.update(t.values.name for t in graph.sparse_initializer)
    produced: set[str] = set()
    in_order = True  # the common case: one walk shows every node reads only what came before it
    avail = set(known)
    for n in graph.node:
        if in_order and not _reads(n) <= avail:
            in_order = False
        for o in n.output:
            if not o:
                continue
            if o in produced or o in inputs:
                raise InputError(f"{what}: duplicate tensor name '{o}' (produced twice)")
            produced.add(o)
            avail.add(o)
    if in_order:
        return
    # Kahn's algorithm over node indices; names from outer scopes, and names nothing produces (the
    # checker's business), count as available.
    deps = [{i for i in _reads(n) if i in produced} for n in graph.node]
    pending = list(range(len(graph.node)))
    ready_names = set(known)
    changed = True
    while pending and changed:
        changed = False
        rest = []
        for idx in pending:
            if deps[idx] <= ready_names:
                ready_names.update(o for o in graph.node[idx].output if o)
                changed = True
            else:
                rest.append(idx)
        pending = rest
    if pending:
        n = graph.node[pending[0]]
        raise InputError(f"{what}: graph has a cycle (node '{n.name or n.op_type}' can never run)")


def _outer_refs(g: onnx.GraphProto) -> set[str]:
    local = {i.name for i in g.input} | {t.name for t in g.initializer}
    refs: set[str] = set()
    for n in g.node:
        for i in n.input:
            if i and i not in local:
                refs.add(i)
        local.update(n.output)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                refs |= _outer_refs(a.g) - local
    return refs


@contextlib.contextmanager
def deferred_gc():
    """No cyclic garbage collection inside the block (one optimization run), and none of the objects
    it made traversed when it ends: the IR is tens of thousands of objects in reference cycles (gs
    links every tensor and node both ways), and each collection would walk them again; on this
    machine that was ~5 ms per collection on a CNN.  On exit the objects made meanwhile join the
    oldest generation untraversed (``gc.freeze()`` + ``gc.unfreeze()``), where the next full
    collection frees what is garbage.  A process that uses ``gc.freeze`` itself is left alone."""
    was = gc.isenabled()
    own = gc.get_freeze_count() == 0
    gc.disable()
    try:
        yield
    finally:
        if was:
            if own:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while building the IR or a proto: both only allocate (tens of
    thousands of objects for a transformer), and each full collection would walk all of them again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def import_model(model: onnx.ModelProto, source: Source | None = None) -> gs.Graph:
    """The IR of ``model``. Weights stay lazy until a pass reads ``Constant.values``; with ``source``
    (from :func:`load_with_source`) they are read from the file's bytes (:func:`const_view`)."""
    with _gc_paused():
        try:
            pairs: list[tuple[gs.Node, onnx.NodeProto, bool]] = []
            graph = importer.import_onnx(model, source, pairs)
        except Exception as e:  # gs raises plain exceptions on odd models
            raise InputError(f"cannot import the model into the IR: {type(e).__name__}: {e}") from None
        # (each of these walked every NodeProto again; upb makes a Python object per field read)
        _import_what_gs_skips(model.graph, graph, model.ir_version, pairs)
        lineage.from_proto(graph, model.graph, pairs)  # which pass made each node, if graphopt wrote this model
        _remember_source(graph, model, pairs)
    return graph


_PRISTINE = "_graphopt_pristine"
_SOURCE_NODES = "_graphopt_source_nodes"


_PLAIN = (int, float, str, bytes)


def _attr_key(k: str, v: Any) -> tuple:
    """An attribute as :func:`_node_key` compares it: by identity, lists also by content, a Constant
    tensor by the identity of its values; an array a pass may have edited in place never compares
    equal."""
    if isinstance(v, _PLAIN):
        return (k, id(v))
    if isinstance(v, list):
        return (k, id(v), tuple(v))
    if isinstance(v, gs.Constant):
        return (k, id(v), id(v._values) if isinstance(v._values, LazyValues) else object())
    if hasattr(v, "__array__"):
        return (k, object())
    return (k, id(v))


def _remember_source(graph: gs.Graph, model: onnx.ModelProto, pairs: list | None = None) -> None:
    """Keep, on the imported graph, the model it came from (until a pass changes the graph: see
    :func:`pristine_source`) and each top-level node's NodeProto with what it was imported as, so
    that export can write the nodes no pass touched by copying their protos (:func:`export_nodes`).
    ``pairs``: from :func:`graphopt.importer.import_onnx`."""
    graph.__dict__[_PRISTINE] = model
    if pairs is None:
        if len(model.graph.node) != len(graph.nodes):
            return
        pairs = [(n, p, False) for n, p in zip(graph.nodes, model.graph.node)]
    src = {}
    for n, p, plain in pairs:
        if plain:  # (its key from the proto's name lists: the same lists, made in C)
            src[id(n)] = (n, p, _node_key(n, list(p.input), list(p.output)))
        elif n.op == p.op_type and not _has_graph_attrs(n):
            src[id(n)] = (n, p, _node_key(n))
    graph.__dict__[_SOURCE_NODES] = src


def _has_graph_attrs(n: gs.Node) -> bool:
    """Whether ``n`` holds subgraphs, which its key does not follow into (they change in place)."""
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
               for v in n.attrs.values())


def _node_key(n: gs.Node, inputs: list[str] | None = None, outputs: list[str] | None = None) -> tuple:
    """Everything of ``n`` its NodeProto holds: a pass that changes any of it, in place or not,
    changes the key (attribute values by identity and, for lists, by content; a Constant attribute by
    the identity of its values).  ``inputs``, ``outputs``: the names of its tensors, when known."""
    return (n.op, n.domain, n.name, [t.name for t in n.inputs] if inputs is None else inputs,
            [t.name for t in n.outputs] if outputs is None else outputs,
            [_attr_key(k, v) for k, v in n.attrs.items()] if n.attrs else None)


def const_view(c: gs.Constant) -> np.ndarray:
    """The values of ``c`` for reading only: for a weight still in the file's bytes, a read-only array
    over them (no copy, and ``c`` stays lazy); otherwise ``c.values``.  Never write into the result."""
    v = c._values
    if type(v) is importer.SourcedValues:
        return v.view()
    return np.asarray(c.values)


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """``graph.tensors()`` (every named tensor of the graph's inputs, nodes and outputs, in that
    order, by name), without gs's per-tensor overhead: it runs after every pass on every tensor."""
    m: dict[str, gs.Tensor] = {}
    for t in graph.inputs:
        if t.name:
            m[t.name] = t
    for n in graph.nodes:
        for t in n.inputs:
            if t.name:
                m[t.name] = t
        for t in n.outputs:
            if t.name:
                m[t.name] = t
    for t in graph.outputs:
        if t.name:
            m[t.name] = t
    return m


def pristine_source(graph: gs.Graph) -> onnx.ModelProto | None:
    """The model ``graph`` was imported from, as long as nothing changed the graph since."""
    return graph.__dict__.get(_PRISTINE)


def mark_changed(graph: gs.Graph) -> None:
    """Called by the pass manager when a pass changed ``graph``: it no longer is its source model."""
    graph.__dict__.pop(_PRISTINE, None)


def _unchanged_proto(n: gs.Node, entry) -> onnx.NodeProto | None:
    """The imported NodeProto of ``n`` if ``n`` is still what was imported, else None."""
    node, p, key = entry
    return p if node is n and _node_key(n) == key else None


def export_nodes(graph: gs.Graph) -> list[onnx.NodeProto]:
    """The NodeProtos of ``graph``'s nodes: for a node no pass touched since it was imported or last
    exported, that proto (shape inference exports the graph after every change, and gs spends ~100
    us on a Conv; the protos returned are copied into a model, never changed)."""
    src = graph.__dict__.get(_SOURCE_NODES)
    if src is None:
        src = graph.__dict__[_SOURCE_NODES] = {}
    out = []
    for n in graph.nodes:
        entry = src.get(id(n))
        p = _unchanged_proto(n, entry) if entry is not None else None
        if p is None:
            p = OnnxExporter.export_node(n)
            if not _has_graph_attrs(n):
                src[id(n)] = (n, p, _node_key(n))
        out.append(p)
    return out


def _export_graph_proto(graph: gs.Graph, g: onnx.GraphProto,
                        borrow: dict[int, int] | None = None) -> dict[int, int | gs.Constant]:
    """gs's ``OnnxExporter.export_graph`` into ``g``, copying the NodeProtos of untouched nodes instead
    of exporting them again (most nodes, in a lightly optimized model; gs spends ~50 us on each), and
    copying the weights once (make_graph + make_model copy them twice).

    With ``borrow`` (``id()`` of the template's initializers -> their index; see :func:`_transplant`)
    no weight is written: each initializer is a stand-in without data (name, type, dims), and the
    returned ``{stand-in index: template index, or the Constant to write}`` says what it stands for."""
    g.node.extend(export_nodes(graph))
    g.name = graph.name or ""
    if graph.doc_string:
        g.doc_string = graph.doc_string
    for t in graph.inputs:
        value_info_into(t, g.input.add())
    for t in graph.outputs:
        value_info_into(t, g.output.add())
    tensors = tensor_map(graph)
    stand_ins: dict[int, int | gs.Constant] = {}
    taken: set[int] = set()
    for t in tensors.values():
        if not isinstance(t, gs.Constant) or isinstance(t._values, SparseValues):
            continue
        if borrow is None:
            if isinstance(t._values, LazyValues):
                g.initializer.append(OnnxExporter.export_tensor_proto(t))
            else:
                _write_tensor(t, g.initializer.add())
            continue
        proto = _proto(t._values) if isinstance(t._values, LazyValues) else None
        i = borrow.get(id(proto)) if proto is not None else None
        if i is not None and i not in taken and t._export_dtype is None:
            proto.name = t.name  # as gs's exporter does: a renamed constant renames its proto
            stand_ins[len(g.initializer)] = i
            taken.add(i)
        else:  # a new weight, or a second Constant on the same proto
            stand_ins[len(g.initializer)] = t
        g.initializer.add(name=t.name, data_type=_onnx_dtype(t), dims=t.shape)
    g.sparse_initializer.extend(OnnxExporter.export_sparse_tensor_proto(t) for t in tensors.values()
                                if isinstance(t, gs.Constant) and isinstance(t._values, SparseValues))
    io = {t.name for t in list(graph.inputs) + list(graph.outputs)}
    for name, t in tensors.items():
        if name not in io and isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None):
            value_info_into(t, g.value_info.add())
    return stand_ins


def value_info_into(t: gs.Tensor, vi: onnx.ValueInfoProto) -> None:
    """``OnnxExporter.export_value_info_proto(t, False)`` written into the empty ``vi`` (the common
    case, a typed tensor, without gs's and onnx.helper's intermediate protos and copies)."""
    shape = t.shape
    if t.dtype is not None and (type(t) is gs.Constant or getattr(t, "type", None) == "tensor_type") and (
            shape is None or all(d is None or type(d) is int or type(d) is str for d in shape)):
        vi.name = t.name
        tt = vi.type.tensor_type
        tt.elem_type = _dtype_to_onnx(t.dtype)
        if shape is not None:
            sp = tt.shape
            sp.SetInParent()  # a scalar's shape is present and empty
            for d in shape:
                dim = sp.dim.add()
                if type(d) is int:
                    dim.dim_value = d
                elif d is not None:
                    dim.dim_param = d
        return
    vi.CopyFrom(OnnxExporter.export_value_info_proto(t, False))


def _onnx_dtype(c: gs.Constant) -> int:
    """The ONNX element type ``c`` is written with."""
    if isinstance(c._values, LazyValues):
        return _proto(c._values).data_type
    return _dtype_to_onnx(c.export_dtype)


def _write_tensor(c: gs.Constant, p: onnx.TensorProto, unwritten: Unwritten | None = None,
                  index: int = -1) -> memoryview | None:
    """Write ``c`` into the empty ``p``: a numpy weight straight into ``raw_data`` (one copy, where
    ``make_tensor`` + appending make three), or with ``unwritten``, everything but its bytes (``p`` is
    initializer ``index`` of the graph); anything else the way gs's exporter does.  Returns
    the bytes of ``raw_data`` when they come from an array (a view of it, for :func:`save`)."""
    v = c._values
    if (isinstance(v, np.ndarray) and c._export_dtype is None and v.dtype.kind in "biufc"
            and v.dtype.byteorder != ">"):
        a = v if v.flags.c_contiguous else v.copy(order="C")
        p.name = c.name
        p.data_type = _dtype_to_onnx(v.dtype)
        p.dims.extend(v.shape)
        if unwritten is not None:
            unwritten.tensors.append((p, a))
            unwritten.indices.add(index)
        else:
            p.raw_data = a.tobytes()
        if c.data_location is not None:
            p.data_location = c.data_location
        return memoryview(a.reshape(-1).view(np.uint8))
    elif type(v) is importer.SourcedValues and v.empty:  # a skeleton's weight: its bytes are in the file
        p.CopyFrom(v.proto)
        p.name = c.name
        p.ClearField("raw_data")
        if unwritten is not None:
            unwritten.tensors.append((p, v.view()))
            unwritten.indices.add(index)
        else:
            p.raw_data = v.raw.tobytes()
        return v.raw
    elif isinstance(v, LazyValues):  # a copy, renamed: gs's exporter would rename the proto it shares
        p.CopyFrom(v.tensor)
        p.name = c.name
    else:
        p.CopyFrom(OnnxExporter.export_tensor_proto(c))
    return None


def _proto(v: LazyValues) -> onnx.TensorProto:
    """The TensorProto of lazy values as it is (a skeleton's weight is not filled in: see
    :class:`graphopt.importer.SourcedValues`)."""
    return v.proto if type(v) is importer.SourcedValues else v.tensor


_ONNX_DTYPES: dict[Any, int] = {}


def _dtype_to_onnx(dtype: Any) -> int:
    try:
        return _ONNX_DTYPES[dtype]
    except (KeyError, TypeError):
        pass
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

    code = dtype_to_onnx(dtype)
    try:
        _ONNX_DTYPES[dtype] = code
    except TypeError:
        pass
    return code


def _import_what_gs_skips(proto: onnx.GraphProto, graph: gs.Graph, ir_version: int, pairs: list | None = None) -> None:
    """Put back what ``gs.import_onnx`` leaves out.

    * Attributes of type TYPE_PROTO(S) (``Optional``'s ``type``): gs skips them with a warning, which
      turns a valid model invalid.  ``onnx.helper.make_attribute`` (used by gs's exporter) writes a
      ``TypeProto`` back correctly, so they are stored in ``node.attrs`` as ``TypeProto`` values.
    * Initializers listed as graph inputs: gs turns them into constants and drops them from the
      inputs.  From IR 4 on they are overridable inputs with a default value, so they are imported as
      Variable graph inputs (passes must not fold or fuse them); under IR 3, where every initializer
      must be listed, they stay constants, and the unused ones stay graph inputs.

    ``pairs`` (from :func:`graphopt.importer.import_onnx`): only the nodes gs imported need a look.
    """
    if pairs is not None:
        todo = [(pn, gn) for gn, pn, plain in pairs if not plain]
    else:
        todo = list(zip(proto.node, graph.nodes)) if len(proto.node) == len(graph.nodes) else []
    for pn, gn in todo:
        if pn.op_type != gn.op:
            break
        if len(pn.attribute) == len(gn.attrs) and not any(isinstance(v, gs.Graph) for v in gn.attrs.values()):
            continue  # gs took every attribute, and there is no subgraph to look into
        for a in pn.attribute:
            if a.type == onnx.AttributeProto.TYPE_PROTO and a.name not in gn.attrs:
                gn.attrs[a.name] = a.tp
            elif a.type == onnx.AttributeProto.TYPE_PROTOS and a.name not in gn.attrs:
                gn.attrs[a.name] = list(a.type_protos)
            elif a.type == onnx.AttributeProto.GRAPH and isinstance(gn.attrs.get(a.name), gs.Graph):
                _import_what_gs_skips(a.g, gn.attrs[a.name], ir_version)
    inits = {t.name: t for t in proto.initializer}
    listed = [vi for vi in proto.input if vi.name in inits]
    if not listed:
        return
    have = tensor_map(graph)
    if ir_version >= 4:
        # An initializer that is also a graph input is an overridable default: the caller may feed it.
        # It must stay an input that passes see as such (not folded, not fused into a neighbour), so it
        # becomes a Variable graph input; export_graph writes its default value back.
        replace: dict[int, gs.Variable] = {}
        for vi in listed:
            old = have.get(vi.name)
            var = gs.Variable(vi.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(inits[vi.name].data_type),
                              shape=list(inits[vi.name].dims))
            if old is not None:
                replace[id(old)] = var
            graph.inputs.append(var)
        if replace:
            for g in _all_graphs(graph):
                for node in g.nodes:
                    for i, t in enumerate(node.inputs):
                        if id(t) in replace:
                            node.inputs[i] = replace[id(t)]
                for i, t in enumerate(g.outputs):
                    if id(t) in replace:
                        g.outputs[i] = replace[id(t)]
        return
    for vi in listed:  # IR 3: every initializer is listed; keep the ones no node uses
        if vi.name not in have:
            graph.inputs.append(gs.Constant(vi.name, LazyValues(inits[vi.name])))


# Value kinds onnx-graphsurgeon can write back; it crashes on the others (optional, map, opaque).
_GS_EXPORTABLE = ("tensor_type", "sequence_type", "sparse_tensor_type")


def _all_graphs(graph: gs.Graph):
    yield graph
    for node in graph.nodes:
        for a in node.attrs.values():
            if isinstance(a, gs.Graph):
                yield from _all_graphs(a)


def _gs_export(graph: gs.Graph, borrow: dict[int, int] | None = None) -> tuple[onnx.ModelProto, dict[int, int]]:
    """What ``gs.export_onnx`` makes (through :func:`_export_graph_proto`), with tensors of kinds gs
    cannot export (optional, map) written untyped for the moment: :func:`_restore_types` puts their
    types back from the template."""
    hidden = []
    for g in _all_graphs(graph):
        for t in tensor_map(g).values():
            if isinstance(t, gs.Variable) and t.dtype is not None and getattr(t, "type", "tensor_type") not in _GS_EXPORTABLE:
                hidden.append((t, t.dtype))
                t.dtype = None
    try:
        model = onnx.ModelProto()
        model.ir_version = graph.ir_version if graph.ir_version is not None else onnx.IR_VERSION
        stand_ins = _export_graph_proto(graph, model.graph, borrow)
        model.functions.extend(OnnxExporter.export_function(f) for f in graph.functions)
        model.opset_import.extend(_import_domains(graph))
        model.producer_name = graph.producer_name or ""
        model.producer_version = graph.producer_version or ""
        return model, stand_ins
    finally:
        for t, dtype in hidden:
            t.dtype = dtype


def _import_domains(graph: gs.Graph) -> list[onnx.OperatorSetIdProto]:
    """gs's ``update_import_domains``: the graph's opset imports, with version 1 of each domain a node
    uses that has none (in first-use order; gs's own walk over subgraphs costs ~10x more)."""
    if graph.import_domains is None:
        graph.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    have = {o.domain for o in graph.import_domains}
    for n in all_nodes(graph):
        d = n.domain
        if d is not None and d not in have:
            graph.import_domains.append(onnx.helper.make_opsetid(d, 1))
            have.add(d)
    return graph.import_domains


def proto_nodes(g: onnx.GraphProto):
    """Every NodeProto of ``g`` and its subgraphs, graph by graph (see :func:`_proto_graphs`)."""
    for sg in _proto_graphs(g):
        yield from sg.node


def _proto_graphs(g: onnx.GraphProto):
    """``g`` and every subgraph below it, depth first."""
    yield g
    for n in g.node:
        if not _may_have_subgraphs(n):
            continue
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _proto_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    yield from _proto_graphs(sg)


def _restore_types(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Give back the non-tensor types (sequence, optional, map) that gs drops or truncates (a sequence's
    element shape), for graph inputs, outputs and value_info at every level.  Names are unique in a
    model, so the template's entry of the same name is the one.  A type a pass set to a different kind
    is left alone."""
    typed: dict[str, onnx.ValueInfoProto] = {}
    for g in _proto_graphs(template.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            kind = vi.type.WhichOneof("value")
            if kind is not None and kind != "tensor_type":
                typed.setdefault(vi.name, vi)
    if not typed:
        return

    def fix(vi: onnx.ValueInfoProto) -> None:
        ref = typed.get(vi.name)
        if ref is None:
            return
        kind = vi.type.WhichOneof("value")
        if kind is None or kind == ref.type.WhichOneof("value"):
            vi.type.CopyFrom(ref.type)

    for g in _proto_graphs(model.graph):
        listed = set()
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            fix(vi)
            listed.add(vi.name)
        for n in g.node:
            for o in n.output:
                if o and o not in listed and o in typed:
                    vi = g.value_info.add()
                    vi.CopyFrom(typed[o])
                    listed.add(o)


def _restore_initializer_inputs(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Initializers listed as graph inputs: gs imports them as constants and drops them from the inputs.

    IR < 4 requires every initializer to be a graph input (the checker refuses the model otherwise);
    from IR 4 on, such an input is an overridable default and part of the signature.  Rebuild the input
    list in the template's order, keeping the initializers that still exist.
    """
    g, tg = model.graph, template.graph
    inits = {t.name: t for t in g.initializer}
    t_inits = {t.name for t in tg.initializer}
    listed_in_template = [vi for vi in tg.input if vi.name in t_inits]
    if not listed_in_template and template.ir_version >= 4:
        return
    if template.ir_version >= 4:
        # overridable inputs were imported as Variables: write their default values back
        wanted = {vi.name for vi in listed_in_template} & {vi.name for vi in g.input}
        for t in tg.initializer:
            if t.name in wanted and t.name not in inits:
                g.initializer.append(t)
                inits[t.name] = t
    current = {vi.name: vi for vi in g.input}
    new: list[onnx.ValueInfoProto] = []
    seen = set()
    for vi in tg.input:
        if vi.name in current:
            new.append(current[vi.name])
        elif vi.name in t_inits and vi.name in inits:
            new.append(vi)
        else:
            continue
        seen.add(vi.name)
    new += [vi for vi in g.input if vi.name not in seen]
    seen |= {vi.name for vi in g.input}
    if template.ir_version < 4:  # initializers a pass created must be listed too
        for t in g.initializer:
            if t.name not in seen:
                new.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
                seen.add(t.name)
    del g.input[:]
    g.input.extend(new)


def export_graph(graph: gs.Graph, template: onnx.ModelProto | None = None, *, consume: bool = False) -> onnx.ModelProto:
    """A ``ModelProto`` of ``graph``, keeping the model-level fields of ``template``.

    ``consume=True`` (the caller has no further use for ``template``): the result is ``template``
    itself, rewritten in place, so that the weights no pass changed stay where they are instead of
    being copied (for a 45 MB model that copy costs as much as writing the file)."""
    if not consume or template is None:
        with _gc_paused():
            return _export_model(graph, template)[0]
    return export_for_save(graph, template)[0]


class Unwritten:
    """New weights of an exported model whose bytes are not in their TensorProto yet (name, type and
    dims are): :func:`save` writes them to the file from their arrays, and :meth:`complete` puts
    them in the protos, once, when the model itself is wanted.  Copying a weight into a proto costs
    two copies (``tobytes``, then into upb's arena), which a run that only writes a file never needs."""

    def __init__(self) -> None:
        self.tensors: list[tuple[onnx.TensorProto, np.ndarray]] = []
        self.indices: set[int] = set()  # their positions in graph.initializer
        self.source: Source | None = None  # the template's
        # weights the template (a skeleton: see load_with_source) holds with an empty raw_data: (index
        # in the source, proto)
        self.sourced: list[tuple[int, onnx.TensorProto]] = []

    def __bool__(self) -> bool:
        return bool(self.tensors or self.sourced)

    def complete(self) -> None:
        if self.source is not None:
            self.source.guard()  # (arrays may be views of a mapped input file)
        for p, a in self.tensors:
            p.raw_data = a.tobytes()
        for i, p in self.sourced:
            self.source.fill_one(i, p)
        self.tensors.clear()
        self.indices.clear()
        self.sourced.clear()


def export_for_save(graph: gs.Graph, template: onnx.ModelProto, source: Source | None = None,
                    *, defer: bool = False) -> tuple[onnx.ModelProto, list[memoryview | None], Unwritten]:
    """``export_graph(graph, template, consume=True)``, and for each initializer of the result, its
    ``raw_data`` bytes where they are at hand without a copy (``source``: the template's
    :class:`Source`; new weights: their arrays), else None: :func:`save` writes from those.
    ``defer=True``: new weights are left :class:`Unwritten` in the model until ``complete()``."""
    with _gc_paused():
        borrow = {id(t): i for i, t in enumerate(template.graph.initializer)}
        model, stand_ins = _export_model(graph, template, borrow)
        unwritten = Unwritten()
        unwritten.source = source
        model, views = _transplant(model, template, stand_ins, source, unwritten if defer else None)
        return model, views, unwritten


def _transplant(model: onnx.ModelProto, into: onnx.ModelProto, stand_ins: dict[int, int | gs.Constant],
                source: Source | None = None,
                unwritten: Unwritten | None = None) -> tuple[onnx.ModelProto, list[memoryview | None]]:
    """Make ``into`` the model ``model`` is.  ``model``'s initializers at the keys of ``stand_ins`` are
    stand-ins (:func:`_export_graph_proto`): for ``into``'s initializer at that index, which stays
    where it is, or for a Constant, written now straight into ``into``.  Everything else of ``into``
    is replaced by ``model``'s.  Also returns the raw bytes views of :func:`export_for_save`."""
    inits = into.graph.initializer
    keep = {v for v in stand_ins.values() if isinstance(v, int)}
    if source is not None and source.stripped:  # a skeleton's weights kept: their bytes are in the file
        for i in sorted(keep & source.stripped):
            if unwritten is not None:
                unwritten.sourced.append((i, inits[i]))
            else:
                source.fill_one(i, inits[i])
    for i in range(len(inits) - 1, -1, -1):
        if i not in keep:
            del inits[i]
    views: list[memoryview | None] = [source.raw(i) if source is not None else None for i in sorted(keep)]
    others = [t for i, t in enumerate(model.graph.initializer) if i not in stand_ins]  # added after export
    del model.graph.initializer[:]
    for f in into.DESCRIPTOR.fields:
        if f.name != "graph":
            into.ClearField(f.name)
    for f in into.graph.DESCRIPTOR.fields:
        if f.name != "initializer":
            into.graph.ClearField(f.name)
    graph = model.graph
    model.ClearField("graph")
    into.MergeFrom(model)
    into.graph.MergeFrom(graph)
    for c in stand_ins.values():
        if not isinstance(c, int):
            p = inits.add()
            views.append(_write_tensor(c, p, unwritten, len(inits) - 1))
    inits.extend(others)
    views += [None] * len(others)
    return into, views


def _export_model(graph: gs.Graph, template: onnx.ModelProto | None,
                  borrow: dict[int, int] | None = None) -> tuple[onnx.ModelProto, dict[int, int]]:
    model, stand_ins = _gs_export(graph, borrow)
    lineage.to_proto(graph, model.graph)  # node metadata: the pass that created or changed it
    if template is not None:
        _restore_types(model, template)
        _restore_initializer_inputs(model, template)
        model.ir_version = template.ir_version
        model.producer_name = template.producer_name
        model.producer_version = template.producer_version
        model.domain = template.domain
        model.model_version = template.model_version
        model.doc_string = template.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
        # Keep every opset import of the original (gs drops unused custom domains), and add any new
        # domain a pass introduced (e.g. com.microsoft for -O3 fusions).
        versions = {o.domain: o.version for o in template.opset_import}
        for o in model.opset_import:
            if o.domain not in versions:
                versions[o.domain] = o.version
            elif o.domain in ("", "ai.onnx") and o.version > versions[o.domain]:
                versions[o.domain] = o.version  # a pass upgraded the opset on purpose
        del model.opset_import[:]
        for d, v in versions.items():
            model.opset_import.append(onnx.helper.make_opsetid(d, v))
        if not model.functions and template.functions:
            model.functions.extend(template.functions)
        if template.training_info:
            model.training_info.extend(template.training_info)
    # gs exports value_info for every intermediate it knows a dtype or shape of; a dtype without a
    # shape or vice versa is fine for onnx.
    return model, stand_ins


def _subgraph_uses(node: gs.Node) -> list[gs.Tensor]:
    used = []
    for a in node.attrs.values():
        if isinstance(a, gs.Graph):
            for g in _all_graphs(a):
                for n in g.nodes:
                    used.extend(n.inputs)
    return used


def is_topologically_sorted(graph: gs.Graph) -> bool:
    """True when every node comes after the producers of what it (and its subgraphs) reads."""
    nodes = graph.nodes
    pos = dict(zip(map(id, nodes), range(len(nodes))))
    get = pos.get
    Graph = gs.Graph
    for i, node in enumerate(nodes):
        ins = node.inputs
        attrs = node.attrs
        if attrs:
            for a in attrs.values():
                if type(a) is Graph:
                    ins = list(ins) + _subgraph_uses(node)
                    break
        for t in ins:
            for p in t.inputs:  # (at most one producer)
                j = get(id(p))
                if j is not None and j >= i:
                    return False
    return True


def toposort(graph: gs.Graph, *, recurse: bool = True) -> None:
    """Order the nodes topologically, keeping a valid order as it is (gs's toposort reorders any
    graph, so a no-pass round trip would shuffle the nodes of the user's model)."""
    if not is_topologically_sorted(graph):
        graph.toposort(recurse_subgraphs=recurse)


def graph_opset(graph: gs.Graph) -> int:
    return int(graph.opset)


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (weights included)."""
    return model.ByteSize()


def approx_size(model: onnx.ModelProto) -> int:
    """The serialized size to within a few bytes per tensor, without serializing the model.

    upb's ``ByteSize()`` on a whole model costs about as much as ``SerializeToString()``; summing the
    parts (raw tensor bytes are counted from dims and type, never read: reading copies them) is
    ~20x cheaper.  Good for thresholds and reports.
    """
    g = model.graph
    total = 64
    for t in g.initializer:
        n = wire.nbytes(t) if t.HasField("raw_data") else -1
        total += (n + 64 + 16 * len(t.dims)) if n >= 0 else t.ByteSize() + 8
    for part in (g.node, g.input, g.output, g.value_info, g.sparse_initializer, model.functions, model.opset_import,
                 model.metadata_props):
        total += sum(p.ByteSize() + 4 for p in part)
    return total


def save(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
         protect: list[str | os.PathLike] | None = None, raw: list[memoryview | None] | None = None,
         unwritten: Unwritten | None = None, serialized: bytes | None = None) -> Path:
    """Write ``model`` atomically (temporary file in the same folder, then rename).

    ``external_data=None`` picks external data only when the model would reach 2 GB.  ``protect`` lists
    paths that must not be overwritten (the input model).  ``raw`` (from :func:`export_for_save`): the
    ``raw_data`` bytes of each initializer where they are at hand; those go to the file from there
    instead of through ``SerializeToString`` (which builds the whole file in memory first).
    ``unwritten`` (from :func:`export_for_save`): the new weights not in their protos yet; written
    from their arrays, or completed first where the model is written another way.  ``serialized``:
    ``model.SerializeToString()``, when the caller made it already (it is written as it is, unless
    external data is asked for).
    """
    path = Path(path)
    _before_writing(path, protect, unwritten)
    if serialized is not None and external_data is not True and len(serialized) < SIZE_LIMIT:
        _write_atomically([serialized], path)
        return path
    pieces = _serialized(model, raw, unwritten) if raw is not None and external_data is not True else None
    if pieces is not None and external_data is None:
        big = sum(len(p) for p in pieces) >= SIZE_LIMIT
    else:
        if unwritten:
            unwritten.complete()
        big = approx_size(model) >= SIZE_LIMIT if external_data is None else external_data
    if big and unwritten:
        unwritten.complete()
    if not big:
        _write_atomically(pieces if pieces is not None else [model.SerializeToString()], path)
        return path
    folder = check_writable(path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as e:
        raise InputError(f"{folder}: cannot write there: {e.strerror}") from None
    try:
        staged = staging / path.name
        data_name = path.name + ".data"
        m = onnx.ModelProto()
        m.CopyFrom(model)
        onnx.save_model(m, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(staging / data_name, folder / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _before_writing(path: Path, protect: list[str | os.PathLike] | None, unwritten: Unwritten | None) -> None:
    if unwritten is not None and unwritten.source is not None:
        unwritten.source.guard()  # (the views in raw may be of a mapped input file)
    for p in protect or ():
        if same_file(p, path):
            raise InputError(f"{path}: refusing to overwrite the input model; choose another -o")


def _serialized(model: onnx.ModelProto, raw: list[memoryview | None],
                unwritten: Unwritten | None = None) -> list[bytes | memoryview]:
    """``model`` in the protobuf wire format, as pieces to write one after the other, with the
    ``raw_data`` of initializer ``i`` taken from ``raw[i]`` where given (no copy of it is made).

    The pieces: the model without its graph; then the graph field, which is the graph without its
    initializers followed by each initializer (field 5), each tensor being its fields but
    ``raw_data`` followed by ``raw_data`` (field 9).  Fields in another order than
    ``SerializeToString`` writes them parse to the same message (protobuf's rule), and the file
    has the same size.  A view whose length the tensor's type and dims do not call for is not used.
    """
    g = model.graph
    rest = onnx.ModelProto()
    wire.copy_fields(model, rest, "graph")
    head = onnx.GraphProto()
    wire.copy_fields(g, head, "initializer")
    pieces: list[bytes | memoryview] = [head.SerializeToString()]
    for i, t in enumerate(g.initializer):
        view = raw[i] if i < len(raw) else None
        from_view = view is not None and wire.nbytes(t) == len(view) and (
            t.HasField("raw_data") or (unwritten is not None and i in unwritten.indices))
        if not from_view:
            if unwritten is not None and i in unwritten.indices:
                unwritten.complete()  # (a stand-in without its view: cannot be; never write one empty)
            body = t.SerializeToString()
            pieces += [b"\x2a", wire.encode_varint(len(body)), body]
            continue
        front = wire.tensor_without_raw_data(t)
        n = wire.encode_varint(len(view))
        pieces += [b"\x2a", wire.encode_varint(len(front) + 1 + len(n) + len(view)), front, b"\x4a", n, view]
    size = sum(len(p) for p in pieces)
    return [rest.SerializeToString(), b"\x3a", wire.encode_varint(size)] + pieces


def _write_atomically(data: list[bytes | memoryview], path: Path) -> None:
    """``data`` (pieces, written in order) into ``path`` through a hidden temporary file beside it and
    a rename: a reader sees the old file or the new one, never half of one.  The file gets the usual
    mode (0666 less umask)."""
    _commit(_write_temp(data, path), path)


def _write_temp(data: list[bytes | memoryview], path: Path) -> Path:
    """``data`` written to a new hidden temporary file beside ``path``; its path.  Nothing is left
    behind when that fails."""
    folder = _output_folder(path)
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise InputError(f"{folder}: output folder is not writable ({e.strerror})") from None
    with _deleted_on_failure(tmp, path):
        try:
            _write_pieces(fd, data)
        finally:
            os.close(fd)
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    """Rename the temporary file ``tmp`` onto ``path``; on failure it is deleted."""
    with _deleted_on_failure(tmp, path):
        os.replace(tmp, path)


@contextlib.contextmanager
def _deleted_on_failure(tmp: Path, path: Path):
    """Deletes the temporary file ``tmp`` if the block fails; an OSError becomes a one-line error
    about writing ``path``."""
    try:
        yield
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"{path}: cannot write: {e.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Staged:
    """A model written to a hidden temporary file beside ``path`` (:func:`stage`) and not in place
    yet: :meth:`commit` renames it onto ``path``, :meth:`discard` deletes it."""

    def __init__(self, tmp: Path, path: Path) -> None:
        self.tmp = tmp
        self.path = path
        self._done = False

    def commit(self) -> Path:
        if self._done:
            raise RuntimeError("already committed or discarded")
        self._done = True
        _commit(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        if not self._done:
            self._done = True
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


def stage(model: onnx.ModelProto, path: str | os.PathLike, *, protect: list[str | os.PathLike] | None = None,
          raw: list[memoryview | None] | None = None, unwritten: Unwritten | None = None) -> Staged | None:
    """Write ``model`` as :func:`save` does, but to a temporary file beside ``path``, and leave it
    there (for a check of the very bytes that are to be put in place); None, writing nothing, when
    it would need external data (2 GB and more): :func:`save` writes those."""
    path = Path(path)
    _before_writing(path, protect, unwritten)
    pieces = _serialized(model, raw, unwritten) if raw is not None else None
    if pieces is None:
        if unwritten:
            unwritten.complete()
        if approx_size(model) >= SIZE_LIMIT:
            return None
        pieces = [model.SerializeToString()]
    elif sum(len(p) for p in pieces) >= SIZE_LIMIT:
        return None
    return Staged(_write_temp(pieces, path), path)


_IOV_MAX = 1024  # pieces per writev call (POSIX's minimum IOV_MAX is 16; Linux and macOS allow 1024)


def _write_pieces(fd: int, data: list[bytes | memoryview]) -> None:
    """Write ``data`` to ``fd`` in as few system calls as it takes (``os.writev``), without joining it
    into one buffer (mobilenet_v2's -O1 output: writing it and renaming it over the last one took
    18.1 ms against 20.7 ms through a buffered file, a write per piece).  Without ``os.writev``
    (Windows), one write per piece."""
    writev = getattr(os, "writev", None)
    pieces = [v for v in (memoryview(p).cast("B") for p in data) if v.nbytes]
    i = 0
    while i < len(pieces):
        n = os.write(fd, pieces[i]) if writev is None else writev(fd, pieces[i:i + _IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, "nothing written")
        # a short write (a full disk raises instead; a signal could cut one short): go on after it
        while n > 0:
            if n >= len(pieces[i]):
                n -= len(pieces[i])
                i += 1
            else:
                pieces[i] = pieces[i][n:]
                n = 0


def _output_folder(path: Path) -> Path:
    """The folder ``path`` goes in; a one-line error if ``path`` is a folder or its folder is missing."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    if not folder.exists():
        raise InputError(f"{folder}: output folder does not exist")
    return folder


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether paths ``a`` and ``b`` both exist and are the same file (through symlinks, hard links,
    ``..`` and the like); a path that does not exist is no file to overwrite."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, with one line, if ``path`` cannot be written (probing for real: root ignores modes)."""
    path = Path(path)
    folder = _output_folder(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{folder}: output folder is not writable ({e.strerror})") from None
    return folder
