"""The ONNX backend test data as a regression suite for graphopt.

Cases come from the ``onnx`` package itself:

* ``node``: the per-operator cases that ``onnx.backend.test.loader.load_model_tests(kind="node")`` builds
  in memory (about 1,900, the ``_expanded`` function versions included);
* ``simple``, ``pytorch-converted``, ``pytorch-operator``: model folders in ``onnx/backend/test/data/``
  (``model.onnx`` + ``test_data_set_N/{input,output}_K.pb``);
* ``light``: ``onnx/backend/test/data/light/light_*.onnx`` with the stored ``*_output_0.pb``; their inputs
  are made exactly as onnx's own runner makes them (``arange(n) / n`` in float32, unknown dims = 1).

For each case and a graphopt pipeline, :func:`run_case`:

1. runs the original with onnxruntime (CPU, ``ORT_DISABLE_ALL``) and compares with the stored outputs
   using the backend's rule (shapes and dtypes equal, ``allclose(rtol, atol)`` with the case's
   tolerances, 1e-3 / 1e-7 by default); a case whose original onnxruntime does not reproduce is
   ``skipped`` (it says nothing about graphopt);
2. optimizes it with ``graphopt.api.optimize(..., verify="off")`` (the path for on-disk cases, the
   ``ModelProto`` for node cases), checks ``onnx.checker.check_model(full_check=True)`` (only where the
   original passes it too), runs the result with onnxruntime and compares with the stored outputs the
   same way.  Every pipeline must keep the model fields, opsets and signature (:func:`fidelity_diff`
   with ``body=False``); ``O0`` also the node count, initializer names and value_info.

Statuses: ``pass`` (a pass changed the model and it still reproduces), ``unchanged`` (no pass changed
anything and the exported model reproduces), ``failed`` (``crash:``, ``invalid:``, ``wrong:``,
``nodes:``, ``fidelity:``, ``written:``, ``timeout:``, with the first error line) and ``skipped``.

:func:`run_suite` runs cases in worker processes (fork) with a per-case timeout; a worker that dies
(a segfault in a runtime) costs only its current case, which is reported as a crash.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import queue
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt import ir

DATA_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data"
DISK_KINDS = ("simple", "pytorch-converted", "pytorch-operator")
KINDS = ("node",) + DISK_KINDS + ("light",)
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7


@dataclass
class Case:
    name: str
    kind: str
    path: str | None = None  # model.onnx for on-disk cases
    model: onnx.ModelProto | None = None  # node cases (built in memory by onnx)
    data_sets: list[tuple[list[Any], list[Any]]] | None = None  # node cases; on-disk ones load lazily
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class CaseResult:
    case: str
    status: str  # pass | unchanged | failed | skipped
    reason: str = ""
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    note: str = ""  # e.g. the original already fails onnx.checker's full check
    verification: str = ""  # graphopt's own verdict with verify="end": passed / not-verified: reason

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0] if self.status == "failed" else self.status


# ------------------------------------------------------------------------------------------------
# Loading cases
# ------------------------------------------------------------------------------------------------


def _normalize(x: Any) -> Any:
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, onnx.SequenceProto):
        return numpy_helper.to_list(x)
    if isinstance(x, onnx.OptionalProto):
        return numpy_helper.to_optional(x)
    if isinstance(x, (list, tuple)):
        return [_normalize(v) for v in x]
    if isinstance(x, np.generic):  # a numpy scalar: onnxruntime takes 0-d arrays only
        return np.asarray(x)
    return x


_CACHE_FORMAT = 1


def _cache_file() -> Path | None:
    if os.environ.get("GRAPHOPT_BACKEND_CACHE", "1") == "0":
        return None
    base = os.environ.get("GRAPHOPT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "graphopt")
    return Path(base) / f"onnx-backend-node-{onnx.__version__}-v{_CACHE_FORMAT}.pkl"


def load_node_cases() -> list[Case]:
    """The per-operator cases built by ``onnx.backend.test.loader``.

    Building them runs every operator's numpy reference (15-45 s), so the result is cached per onnx
    version in ``~/.cache/graphopt`` (``GRAPHOPT_CACHE`` moves it, ``GRAPHOPT_BACKEND_CACHE=0`` turns
    it off).  It is a cache of data the installed onnx package generates, not of graphopt's results.
    """
    import pickle

    path = _cache_file()
    if path is not None and path.is_file():
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except Exception:
            pass  # stale or truncated: rebuild
    cases = _build_node_cases()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                pickle.dump(cases, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except OSError:
            pass
    return cases


def _build_node_cases() -> list[Case]:
    """Numpy warnings of the reference implementations are silenced: they are the point of some
    cases (overflow in casts, log of zero)."""
    from onnx.backend.test import loader

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        tests = loader.load_model_tests(kind="node")
    out = []
    for t in tests:
        sets = [([_normalize(i) for i in ins], [_normalize(o) for o in outs]) for ins, outs in t.data_sets or []]
        out.append(Case(t.name, "node", model=t.model, data_sets=sets, rtol=t.rtol, atol=t.atol))
    return out


def load_disk_cases(kind: str) -> list[Case]:
    from onnx.backend.test import loader

    out = []
    for t in loader.load_model_tests(kind=kind):
        if t.model_dir is None:
            continue  # a model that would have to be downloaded
        out.append(Case(t.name, kind, path=str(Path(t.model_dir) / "model.onnx"), rtol=t.rtol, atol=t.atol))
    return out


def load_light_cases() -> list[Case]:
    out = []
    for p in sorted((DATA_DIR / "light").glob("light_*.onnx")):
        if not p.name.endswith("_output_0.pb"):
            # tolerances as onnx.backend.test.case.model.collect_testcases gives them
            rtol = 2e-3 if p.stem == "light_densenet121" else DEFAULT_RTOL
            out.append(Case(p.stem, "light", path=str(p), rtol=rtol))
    return out


def load_cases(kinds: Iterable[str] = KINDS) -> list[Case]:
    cases: list[Case] = []
    for k in kinds:
        if k == "node":
            cases += load_node_cases()
        elif k == "light":
            cases += load_light_cases()
        elif k in DISK_KINDS:
            cases += load_disk_cases(k)
        else:
            raise ValueError(f"unknown kind {k!r} (kinds: {', '.join(KINDS)})")
    return cases


def _load_pb(path: Path, tp: onnx.TypeProto | None) -> Any:
    data = path.read_bytes()
    kind = tp.WhichOneof("value") if tp is not None else "tensor_type"
    if kind == "sequence_type":
        p = onnx.SequenceProto()
        p.ParseFromString(data)
        return numpy_helper.to_list(p)
    if kind == "optional_type":
        p = onnx.OptionalProto()
        p.ParseFromString(data)
        return numpy_helper.to_optional(p)
    if kind == "map_type":
        p = onnx.MapProto()
        p.ParseFromString(data)
        return numpy_helper.to_dict(p)
    t = onnx.TensorProto()
    t.ParseFromString(data)
    return numpy_helper.to_array(t)


def _light_input(vi: onnx.ValueInfoProto) -> np.ndarray:
    """onnx's runner: ``arange(n).reshape(shape) / n`` in float32, unknown dims taken as 1."""
    if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ValueError(f"light model input {vi.name} is not float")
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def case_model(case: Case) -> onnx.ModelProto:
    if case.model is not None:
        return case.model
    return onnx.load(case.path)


def case_data(case: Case, model: onnx.ModelProto) -> list[tuple[dict[str, Any], list[Any]]]:
    """``[(feeds by input name, expected outputs in graph-output order)]``; inputs map by position to
    ``graph.input`` as in onnx's runner."""
    g_inputs = list(model.graph.input)
    g_outputs = list(model.graph.output)
    sets: list[tuple[list[Any], list[Any]]] = []
    if case.kind == "node":
        sets = list(case.data_sets or [])
    elif case.kind == "light":
        inits = {t.name for t in model.graph.initializer}
        real = [vi for vi in g_inputs if vi.name not in inits]
        g_inputs = real
        prefix = Path(case.path).with_suffix("")
        outs = []
        for i in range(len(g_outputs)):
            p = Path(f"{prefix}_output_{i}.pb")
            if not p.exists():
                raise FileNotFoundError(f"no stored output {p.name}")
            outs.append(_load_pb(p, g_outputs[i].type))
        sets = [([_light_input(vi) for vi in real], outs)]
    else:
        folder = Path(case.path).parent
        for d in sorted(folder.glob("test_data_set_*")):
            n_in = len(list(d.glob("input_*.pb")))
            n_out = len(list(d.glob("output_*.pb")))
            ins = [_load_pb(d / f"input_{i}.pb", g_inputs[i].type if i < len(g_inputs) else None) for i in range(n_in)]
            outs = [_load_pb(d / f"output_{i}.pb", g_outputs[i].type if i < len(g_outputs) else None) for i in range(n_out)]
            sets.append((ins, outs))
    out = []
    for ins, outs in sets:
        if len(ins) > len(g_inputs):
            raise ValueError(f"{len(ins)} stored inputs but the model has {len(g_inputs)}")
        feeds = {g_inputs[i].name: v for i, v in enumerate(ins)}
        out.append((feeds, list(outs)))
    return out


# ------------------------------------------------------------------------------------------------
# Comparison (onnx's assert_similar_outputs, returning a one-line reason instead of raising)
# ------------------------------------------------------------------------------------------------


def _as_float(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def compare_one(ref: Any, got: Any, rtol: float, atol: float, where: str) -> str | None:
    if isinstance(ref, (list, tuple)) or isinstance(got, (list, tuple)):
        if not isinstance(ref, (list, tuple)) or not isinstance(got, (list, tuple)):
            return f"{where}: kind {type(got).__name__} != {type(ref).__name__}"
        if len(ref) != len(got):
            return f"{where}: sequence length {len(got)} != {len(ref)}"
        for j, (r, g) in enumerate(zip(ref, got)):
            msg = compare_one(r, g, rtol, atol, f"{where}[{j}]")
            if msg:
                return msg
        return None
    if ref is None or got is None:
        return None if ref is None and got is None else f"{where}: optional {'empty' if got is None else 'set'} but expected {'empty' if ref is None else 'set'}"
    if isinstance(ref, dict) or isinstance(got, dict):
        if not isinstance(ref, dict) or not isinstance(got, dict) or set(ref) != set(got):
            return f"{where}: map keys differ"
        for k in ref:
            msg = compare_one(np.asarray(ref[k]), np.asarray(got[k]), rtol, atol, f"{where}[{k!r}]")
            if msg:
                return msg
        return None
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return f"{where}: shape {list(got.shape)} != {list(ref.shape)}"
    if ref.dtype == object or got.dtype == object:
        if not np.array_equal(ref, got):
            return f"{where}: string values differ"
        return None
    if ref.dtype != got.dtype:
        return f"{where}: dtype {got.dtype} != {ref.dtype}"
    if ref.size == 0:
        return None
    if ref.dtype.kind == "b":
        bad = int(np.count_nonzero(ref != got))
        return f"{where}: {bad} of {ref.size} values differ" if bad else None
    r, g, tol = ref, got, rtol
    if ref.dtype.kind not in "iufc":  # bfloat16, float8, int4 ... (ml_dtypes): compare in float32
        if ref.dtype.name == "bfloat16":
            tol = max(rtol, 2**-6)
        r, g = _as_float(ref), _as_float(got)
    if r.dtype.kind in "iu":
        r, g = r.astype(np.float64), g.astype(np.float64)
    with np.errstate(all="ignore"):
        close = np.isclose(g, r, rtol=tol, atol=atol, equal_nan=True)
    if close.all():
        return None
    bad = int(close.size - np.count_nonzero(close))
    with np.errstate(all="ignore"):
        d = np.abs(g.astype(np.complex128 if g.dtype.kind == "c" else np.float64) - r)
    d = d[~close]
    return f"{where}: {bad} of {ref.size} values differ (max abs diff {float(np.nanmax(d)) if d.size else float('nan'):.3g})"


def compare_outputs(expected: Sequence[Any], got: Sequence[Any], names: Sequence[str], rtol: float, atol: float) -> str | None:
    if len(expected) != len(got):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (r, g) in enumerate(zip(expected, got)):
        msg = compare_one(r, g, rtol, atol, f"output {i} '{names[i] if i < len(names) else '?'}'")
        if msg:
            return msg
    return None


# ------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------


def count_nodes(graph: onnx.GraphProto) -> int:
    n = 0
    for node in graph.node:
        n += 1
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                n += count_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                n += sum(count_nodes(g) for g in a.graphs)
    return n


def _io(vis: Iterable[onnx.ValueInfoProto]) -> list[tuple[str, bytes]]:
    return [(vi.name, vi.type.SerializeToString(deterministic=True)) for vi in vis]


def _first_diff(a: list[tuple[str, bytes]], b: list[tuple[str, bytes]]) -> str:
    da, db = dict(a), dict(b)
    lost = [n for n, _ in a if n not in db]
    added = [n for n, _ in b if n not in da]
    retyped = [n for n, t in a if n in db and db[n] != t]
    if lost or added or retyped:
        parts = [f"{k} {v[:3]}{'...' if len(v) > 3 else ''}" for k, v in (("lost", lost), ("added", added), ("retyped", retyped)) if v]
        return ", ".join(parts)
    return "order changed"


def fidelity_diff(original: onnx.ModelProto, optimized: onnx.ModelProto, *, body: bool = True) -> list[str]:
    """What a no-pass round trip lost: model fields, opsets, signature, value_info, functions, node count.

    ``body=False`` (after real passes) checks only what no pass may change: the model fields, the
    opsets (a pass may add a domain), the signature (names, types, symbolic dims) and the functions.
    """
    diffs = []
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if getattr(original, f) != getattr(optimized, f):
            diffs.append(f"{f} {getattr(optimized, f)!r} != {getattr(original, f)!r}")
    o_ops = sorted((o.domain or "", o.version) for o in original.opset_import)
    n_ops = sorted((o.domain or "", o.version) for o in optimized.opset_import)
    if (o_ops != n_ops) if body else not set(o_ops) <= set(n_ops):
        diffs.append(f"opset_import {n_ops} != {o_ops}")
    if [(p.key, p.value) for p in original.metadata_props] != [(p.key, p.value) for p in optimized.metadata_props]:
        diffs.append("metadata_props differ")
    g0, g1 = original.graph, optimized.graph
    in0, in1 = list(g0.input), list(g1.input)
    if not body and original.ir_version < 4:
        # IR 3 lists every initializer as an input, so folding weights must change that list; the
        # signature is the inputs that are not initializers
        in0 = [vi for vi in in0 if vi.name not in {t.name for t in g0.initializer}]
        in1 = [vi for vi in in1 if vi.name not in {t.name for t in g1.initializer}]
    for what, a, b in (("inputs", in0, in1), ("outputs", g0.output, g1.output)):
        if _io(a) != _io(b):
            diffs.append(f"graph {what} differ: {_first_diff(_io(a), _io(b))}")
    if body and sorted(t.name for t in g0.initializer) != sorted(t.name for t in g1.initializer):
        diffs.append("initializer names differ")
    vi1 = dict(_io(g1.value_info))
    lost = [name for name, t in _io(g0.value_info) if vi1.get(name) != t]
    if lost and body:
        diffs.append(f"value_info lost or changed for {len(lost)} tensors, e.g. '{lost[0]}'")
    f0 = [(f.domain, f.name) for f in original.functions]
    f1 = [(f.domain, f.name) for f in optimized.functions]
    if f0 != f1:
        diffs.append(f"functions {f1} != {f0}")
    if body and count_nodes(g0) != count_nodes(g1):
        diffs.append(f"node count {count_nodes(g1)} != {count_nodes(g0)}")
    elif body:
        for a, b in zip(ir.proto_nodes(g0), ir.proto_nodes(g1)):
            if _node_key(a) != _node_key(b):
                diffs.append(f"node '{a.name or a.op_type}' changed (op, domain, name, doc_string, inputs, outputs or attributes)")
                break
    return diffs


def _attr_bytes(a: onnx.AttributeProto) -> bytes:
    if a.type == onnx.AttributeProto.TENSOR and a.t.HasField("name") and not a.t.name:
        a = onnx.AttributeProto.FromString(a.SerializeToString())
        a.t.ClearField("name")  # gs writes an explicit empty name: the same tensor
    return a.SerializeToString(deterministic=True)


def _node_key(n: onnx.NodeProto) -> tuple:
    attrs = sorted((a.name, _attr_bytes(a)) for a in n.attribute
                   if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS))
    return (n.op_type, n.domain, n.name, n.doc_string, tuple(n.input), tuple(n.output), tuple(attrs))


# ------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------


def _first_line(e: BaseException | str) -> str:
    s = str(e).strip()
    line = next((l.strip() for l in s.splitlines() if l.strip()), type(e).__name__ if isinstance(e, BaseException) else "")
    return line[:300]


def _run_ort(model: onnx.ModelProto, feeds: dict[str, Any]) -> list[Any]:
    from graphopt.verify import make_session

    sess = make_session(model)
    names = [o.name for o in model.graph.output]
    return list(sess.run(names, feeds))


def _full_check(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=True)
        return None
    except Exception as e:
        return _first_line(e)


def run_case(case: Case, pipeline: str = "O0", plugins: Sequence[str] = (), verify: str = "off") -> CaseResult:
    t0 = time.perf_counter()
    res = CaseResult(case.id, "skipped")
    try:
        _run_case(case, pipeline, plugins, res, verify)
    finally:
        res.seconds = round(time.perf_counter() - t0, 3)
    return res


def _run_case(case: Case, pipeline: str, plugins: Sequence[str], res: CaseResult, verify: str = "off") -> None:
    import graphopt.api

    try:
        model = case_model(case)
        data = case_data(case, model)
    except Exception as e:
        res.reason = f"cannot load the case: {_first_line(e)}"
        return
    res.nodes_before = count_nodes(model.graph)
    names = [o.name for o in model.graph.output]
    # (a) the original must reproduce the stored outputs under onnxruntime
    for feeds, expected in data:
        try:
            got = _run_ort(model, feeds)
        except Exception as e:
            res.reason = f"onnxruntime cannot run the original: {_first_line(e)}"
            return
        msg = compare_outputs(expected, got, names, case.rtol, case.atol)
        if msg:
            res.reason = f"onnxruntime does not reproduce the original: {msg}"
            return
    # (b) graphopt
    # An on-disk case is optimized the way the command line does it: from the file, into a file, and
    # the file written is what gets checked and run (it must parse to the model returned).
    out_dir = tempfile.TemporaryDirectory() if case.path else contextlib.nullcontext(None)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), out_dir as d:
            out_file = os.path.join(d, "optimized.onnx") if d else None
            result = graphopt.api.optimize(case.path if case.path else model, pipeline, verify=verify, plugins=plugins,
                                           output=out_file)
            written = onnx.load(out_file) if out_file else None
    except graphopt.errors.VerificationError as e:
        # graphopt's own check (generated inputs) refused a result: wrong, or a false alarm
        res.status, res.reason = "failed", f"verify: {_first_line(e)}"
        return
    except Exception as e:
        res.status, res.reason = "failed", f"crash: {type(e).__name__}: {_first_line(e)}"
        return
    opt = result.model
    if written is not None:
        if written != opt:
            res.status, res.reason = "failed", "written: the file written does not parse to the model returned"
            return
        opt = written
    if result.verification is not None:
        v = result.verification
        res.verification = v.status + (f": {v.reason}" if v.reason else "")
    res.nodes_after = count_nodes(opt.graph)
    orig_check = _full_check(model)
    opt_check = _full_check(opt)
    if opt_check and not orig_check:
        res.status, res.reason = "failed", f"invalid: onnx.checker(full_check): {opt_check}"
        return
    if orig_check:
        res.note = f"the original fails onnx.checker(full_check) too: {orig_check}"
    if opt_check:
        try:  # the original fails the full check too: hold the result to the plain checker
            onnx.checker.check_model(opt)
        except Exception as e:
            res.status, res.reason = "failed", f"invalid: onnx.checker: {_first_line(e)}"
            return
    diffs = fidelity_diff(model, opt, body=pipeline.upper().lstrip("-") == "O0")
    if diffs:
        cat = "nodes" if diffs[0].startswith("node count") else "fidelity"
        res.status, res.reason = "failed", f"{cat}: {diffs[0]}"
        return
    opt_names = [o.name for o in opt.graph.output]
    if opt_names != names:
        res.status, res.reason = "failed", f"wrong: outputs {opt_names} != {names}"
        return
    for feeds, expected in data:
        try:
            got = _run_ort(opt, feeds)
        except Exception as e:
            res.status, res.reason = "failed", f"wrong: onnxruntime cannot run the optimized model: {_first_line(e)}"
            return
        msg = compare_outputs(expected, got, names, case.rtol, case.atol)
        if msg:
            res.status, res.reason = "failed", f"wrong: {msg}"
            return
    changed = any(p.changed for p in result.report.passes)
    res.status = "pass" if changed else "unchanged"


# ------------------------------------------------------------------------------------------------
# Many cases, in parallel
# ------------------------------------------------------------------------------------------------


def quiet_onnxruntime() -> None:
    """onnxruntime logs session-creation errors to stderr itself; the harness reports them per case."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)


def _worker(cases: list[Case], pipeline: str, plugins: Sequence[str], verify: str, tasks, results, wid: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quiet_onnxruntime()
    while True:
        i = tasks.get()
        if i is None:
            return
        results.put(("start", wid, i, time.time()))
        try:
            r = run_case(cases[i], pipeline, plugins, verify)
        except BaseException as e:  # run_case catches per step; this is a harness bug
            r = CaseResult(cases[i].id, "failed", f"crash: harness: {type(e).__name__}: {_first_line(e)}")
        results.put(("done", wid, i, r))


def run_suite(
    cases: list[Case],
    pipeline: str = "O0",
    *,
    workers: int = 2,
    timeout: float = 180.0,
    plugins: Sequence[str] = (),
    verify: str = "off",
    progress: Callable[[int, int, CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run ``cases`` in ``workers`` forked processes; results in the order of ``cases``.

    ``verify`` is passed to ``graphopt.optimize``: ``"off"`` (default) tests the optimizer alone;
    ``"end"`` is what ``graphopt optimize`` does by default, so a refusal by graphopt's own
    verification (on generated inputs) shows up as a ``verify:`` failure.
    """
    if workers <= 1 or len(cases) <= 1:
        quiet_onnxruntime()
        out = []
        for i, c in enumerate(cases):
            out.append(run_case(c, pipeline, plugins, verify))
            if progress:
                progress(i + 1, len(cases), out[-1])
        return out
    ctx = mp.get_context("fork")
    tasks, results = ctx.Queue(), ctx.Queue()
    for i in range(len(cases)):
        tasks.put(i)
    procs: dict[int, Any] = {}
    current: dict[int, tuple[int, float] | None] = {}
    next_id = 0

    def spawn() -> None:
        nonlocal next_id
        p = ctx.Process(target=_worker, args=(cases, pipeline, tuple(plugins), verify, tasks, results, next_id), daemon=True)
        p.start()
        procs[next_id] = p
        current[next_id] = None
        next_id += 1

    for _ in range(workers):
        spawn()
    for _ in range(workers):
        tasks.put(None)
    done: dict[int, CaseResult] = {}

    def record(i: int, r: CaseResult) -> None:
        if i in done:
            return
        done[i] = r
        if progress:
            progress(len(done), len(cases), r)

    try:
        while len(done) < len(cases):
            try:
                msg = results.get(timeout=1.0)
            except queue.Empty:
                msg = None
            if msg is not None:
                kind, wid, i, payload = msg
                if kind == "start":
                    current[wid] = (i, payload)
                else:
                    current[wid] = None
                    record(i, payload)
                continue
            now = time.time()
            for wid, p in list(procs.items()):
                cur = current.get(wid)
                if cur is not None and (not p.is_alive() or now - cur[1] > timeout):
                    i, t = cur
                    if p.is_alive():
                        p.kill()
                        p.join()
                        r = CaseResult(cases[i].id, "failed", f"timeout: over {timeout:.0f} s", seconds=now - t)
                    else:
                        r = CaseResult(cases[i].id, "failed", f"crash: worker process died (exit code {p.exitcode})", seconds=now - t)
                    record(i, r)
                    del procs[wid], current[wid]
                    spawn()
                    tasks.put(None)
                elif cur is None and not p.is_alive():
                    del procs[wid], current[wid]
            if not procs and len(done) < len(cases):
                raise RuntimeError(f"all workers exited with {len(cases) - len(done)} cases left")
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join()
    return [done[i] for i in range(len(cases))]


# ------------------------------------------------------------------------------------------------
# Selection and summaries
# ------------------------------------------------------------------------------------------------

# Cases the fast sample always includes: control flow, sequences, optionals, strings, functions,
# old-IR models with initializers listed as inputs, custom dtypes.
ALWAYS = (
    "node/test_if", "node/test_if_seq", "node/test_if_opt", "node/test_loop11", "node/test_loop13_seq",
    "node/test_scan9_sum", "node/test_range_float_type_positive_delta_expanded",
    "node/test_sequence_map_identity_1_sequence", "node/test_optional_get_element_sequence",
    "node/test_layer_normalization_2d_axis0_expanded", "node/test_softmax_axis_1_expanded",
    "node/test_gelu_tanh_1_expanded", "node/test_cast_FLOAT_to_BFLOAT16", "node/test_strnormalizer_export_monday_casesensintive_lower",
    "node/test_constant", "node/test_shape", "node/test_reshape_reordered_all_dims", "node/test_dropout_default",
    "node/test_identity_sequence", "node/test_quantizelinear", "node/test_dequantizelinear",
    "simple/test_sequence_model1", "simple/test_expand_shape_model1", "simple/test_strnorm_model_monday_casesensintive_lower",
    "pytorch-converted/test_BatchNorm2d_eval", "pytorch-converted/test_Conv2d", "pytorch-converted/test_GLU",
    "pytorch-operator/test_operator_chunk", "pytorch-operator/test_operator_index",
    "light/light_squeezenet", "light/light_shufflenet",
)


def fast_sample(cases: list[Case], n: int = 150) -> list[Case]:
    """A fixed, varied subset: the :data:`ALWAYS` cases, then an even stride over the rest (sorted by
    id, so the sample only changes when onnx adds or removes cases)."""
    by_id = {c.id: c for c in cases}
    picked = [by_id[i] for i in ALWAYS if i in by_id]
    rest = sorted((c for c in cases if c.id not in set(ALWAYS)), key=lambda c: c.id)
    k = max(n - len(picked), 0)
    if k and rest:
        step = len(rest) / k
        picked += [rest[int(j * step)] for j in range(min(k, len(rest)))]
    return picked


def summarize(results: list[CaseResult]) -> dict[str, Any]:
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "unchanged", "failed", "skipped")}
    return {
        "cases": len(results),
        "reproduced_by_onnxruntime": len(results) - counts["skipped"],
        **counts,
        "original_fails_full_check": sum(bool(r.note) for r in results),
        "graphopt_not_verified": sum(r.verification.startswith("not-verified") for r in results),
        "nodes_before": sum(r.nodes_before for r in results if r.status in ("pass", "unchanged")),
        "nodes_after": sum(r.nodes_after for r in results if r.status in ("pass", "unchanged")),
    }


def failures_text(results: list[CaseResult]) -> str:
    return "\n".join(f"{r.case}: {r.reason}" for r in results if r.status == "failed")


def write_json(path: str | os.PathLike, pipeline: str, results: list[CaseResult]) -> None:
    doc = {
        "pipeline": pipeline,
        "onnx": onnx.__version__,
        "summary": summarize(results),
        "failed": [asdict(r) for r in results if r.status == "failed"],
        "skipped": [{"case": r.case, "reason": r.reason} for r in results if r.status == "skipped"],
        "notes": [{"case": r.case, "note": r.note} for r in results if r.note],
        "not_verified": [{"case": r.case, "verification": r.verification} for r in results if r.verification.startswith("not-verified")],
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
