"""Import and export: ONNX model <-> onnx-graphsurgeon ``gs.Graph``.

Data flows one way: file -> :func:`load` -> :func:`import_model` -> passes -> :func:`export_graph` ->
:func:`save` -> file.  Export copies the model-level fields that onnx-graphsurgeon does not carry
(metadata, doc strings, model version, custom opset imports) from the model the graph came from.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import InputError

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]
TWO_GB = 2**31
_SIZE_LIMIT = TWO_GB - 64 * 2**20  # leave room for the graph itself

# onnx-graphsurgeon logs a warning for every odd thing; graphopt reports what matters itself.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)


def load(src: ModelLike, *, check: bool = True) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ``ModelProto`` (returned as is), with its external data.

    Raises :class:`InputError` with a one-line message for anything that is not a usable ONNX model.
    """
    checked_path = None
    if isinstance(src, onnx.ModelProto):
        model = src
        base_dir = None
    elif isinstance(src, (bytes, bytearray, memoryview)):
        model = _parse_bytes(bytes(src), "the given bytes")
        base_dir = None
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, not an ONNX file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror}") from None
        if not data:
            raise InputError(f"{path}: empty file")
        model = _parse_bytes(data, str(path))
        base_dir = path.parent
        checked_path = path
        if _uses_external_data(model):
            checked_path = None
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
            except (FileNotFoundError, OSError) as e:
                missing = getattr(e, "filename", None) or str(e)
                raise InputError(f"{path}: external data missing: {missing}") from None
            except Exception as e:
                raise InputError(f"{path}: external data unreadable: {e}") from None
    else:
        raise InputError(f"cannot load a model from {type(src).__name__}")
    if check:
        check_model(model, str(src) if base_dir else "model", path=checked_path)
    return model


def _parse_bytes(data: bytes, what: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise InputError(f"{what}: not an ONNX model (protobuf parse failed; truncated or another format?)") from None
    if not model.HasField("graph") or (model.ir_version == 0 and not model.opset_import):
        raise InputError(f"{what}: not an ONNX model (no graph or ir_version)")
    return model


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model)
    )


def check_model(model: onnx.ModelProto, what: str = "model", path: Path | None = None) -> None:
    """onnx.checker plus the structural checks the checker does not do (cycles, duplicate names).

    ``path``: the file ``model`` was parsed from (no external data); the checker then reads it in C++
    instead of re-serializing the model in Python (which costs as much as saving it).
    """
    try:
        if path is not None and path.stat().st_size < _SIZE_LIMIT:
            onnx.checker.check_model(str(path))
        elif approx_size(model) < _SIZE_LIMIT:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise InputError(f"{what}: fails onnx.checker: {first}") from None
    check_structure(model.graph, what)


def check_structure(graph: onnx.GraphProto, what: str = "model", outer: set[str] | None = None) -> None:
    """Duplicate tensor names and cycles (nodes that cannot be ordered)."""
    produced: dict[str, int] = {}
    known = set(outer or ())
    for i in graph.input:
        known.add(i.name)
    for t in graph.initializer:
        known.add(t.name)
    for t in graph.sparse_initializer:
        known.add(t.values.name)
    for idx, n in enumerate(graph.node):
        for o in n.output:
            if not o:
                continue
            if o in produced or o in {i.name for i in graph.input}:
                raise InputError(f"{what}: duplicate tensor name '{o}' (produced twice)")
            produced[o] = idx
    # Kahn's algorithm over node indices; names from outer scopes count as available.
    avail = known | set()
    pending = list(range(len(graph.node)))
    deps = []
    for n in graph.node:
        ins = {i for i in n.input if i}
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ins |= _outer_refs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    ins |= _outer_refs(g)
        deps.append({i for i in ins if i in produced})
    done: set[int] = set()
    ready_names = set(avail)
    changed = True
    while pending and changed:
        changed = False
        rest = []
        for idx in pending:
            if all(d in ready_names for d in deps[idx]):
                done.add(idx)
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


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """The IR of ``model``. Weights stay lazy until a pass reads ``Constant.values``.

    gs drops graph inputs that also have an initializer.  From IR version 4 on such an input is a
    default the user may override, so it comes back as a graph input (a ``gs.Variable``: no pass may
    treat it as constant) and :func:`export_graph` writes its default back.  Before IR 4 every
    initializer had to be listed as an input; those stay constants and are listed again on export.
    """
    try:
        graph = gs.import_onnx(model)
    except Exception as e:  # gs raises plain exceptions on odd models
        raise InputError(f"cannot import the model into the IR: {type(e).__name__}: {e}") from None
    inits = {t.name for t in model.graph.initializer}
    overridable = [i for i in model.graph.input if i.name in inits]
    if overridable and model.ir_version >= 4:
        tensors = graph.tensors()
        protos = {t.name: t for t in model.graph.initializer}
        defaults = {}
        order = [i.name for i in model.graph.input]
        for vi in overridable:
            t = tensors.get(vi.name)
            if isinstance(t, gs.Constant):
                dtype = t.export_dtype
                shape = list(t.shape)
                t.to_variable(dtype=dtype, shape=shape)
                t.type = "tensor_type"
            elif t is None:
                t = gs.Variable(vi.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(protos[vi.name].data_type),
                                shape=list(protos[vi.name].dims))
            defaults[vi.name] = protos[vi.name]
            graph.inputs.append(t)
        rank = {n: i for i, n in enumerate(order)}
        graph.inputs.sort(key=lambda t: rank.get(t.name, len(rank)))
        graph._graphopt_input_defaults = defaults  # read back by export_graph
    return graph


def export_graph(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A ``ModelProto`` of ``graph``, keeping the model-level fields of ``template``."""
    model = gs.export_onnx(graph, do_type_check=False)
    defaults = graph.__dict__.get("_graphopt_input_defaults") or {}  # (gs.Graph.__getattr__ logs misses)
    if defaults:
        have = {t.name for t in model.graph.initializer}
        inputs = {i.name for i in model.graph.input}
        model.graph.initializer.extend(t for n, t in defaults.items() if n not in have and n in inputs)
    if template is not None and template.ir_version < 4:
        # IR < 4: every initializer must also be a graph input
        inputs = {i.name for i in model.graph.input}
        for t in model.graph.initializer:
            if t.name not in inputs:
                model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if template is not None:
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
    return model


def graph_opset(graph: gs.Graph) -> int:
    return int(graph.opset)


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (weights included)."""
    return model.ByteSize()


def approx_size(model: onnx.ModelProto) -> int:
    """The serialized size to within a few bytes per tensor, without serializing the model.

    upb's ``ByteSize()`` on a whole model costs about as much as ``SerializeToString()``; summing the
    parts (raw tensor bytes are only measured) is ~20x cheaper.  Good for thresholds and reports.
    """
    g = model.graph
    total = 64
    for t in g.initializer:
        total += (len(t.raw_data) + 64 + 16 * len(t.dims)) if t.HasField("raw_data") else t.ByteSize() + 8
    for part in (g.node, g.input, g.output, g.value_info, g.sparse_initializer, model.functions, model.opset_import,
                 model.metadata_props):
        total += sum(p.ByteSize() + 4 for p in part)
    return total


def save(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None, protect: list[str | os.PathLike] | None = None) -> Path:
    """Write ``model`` atomically (temporary file in the same folder, then rename).

    ``external_data=None`` picks external data only when the model would reach 2 GB.  ``protect`` lists
    paths that must not be overwritten (the input model).
    """
    path = Path(path)
    for p in protect or ():
        try:
            if Path(p).exists() and path.exists() and os.path.samefile(p, path):
                raise InputError(f"{path}: refusing to overwrite the input model; choose another -o")
        except OSError:
            pass
        if Path(p).resolve() == path.resolve():
            raise InputError(f"{path}: refusing to overwrite the input model; choose another -o")
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    if not folder.exists():
        raise InputError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{folder}: output folder is not writable")
    big = approx_size(model) >= _SIZE_LIMIT if external_data is None else external_data
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    try:
        staged = staging / path.name
        if big:
            data_name = path.name + ".data"
            m = onnx.ModelProto()
            m.CopyFrom(model)
            onnx.save_model(m, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(staging / data_name, folder / data_name)
        else:
            with open(staged, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
