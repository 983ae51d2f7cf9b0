"""The Python API: ``optimize``, ``verify``, ``load``, ``save``.

The CLI is a thin layer over these functions, so scripts (for example right after
``torch.onnx.export``) get exactly what the command line does.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx

from . import ir
from .data import Feeds, calibration_source, generate_feeds, load_feeds
from .errors import InputError, PipelineError, VerificationError
from .manager import Instrument, PassManager
from .pass_base import Budget, PassContext, load_plugin
from .pipeline import Pipeline, parse_pipeline
from .report import Report, model_summary
from .shapes import is_sorted
from .verify import Verification, load_eval, verify_models


def load(src: ir.ModelLike, *, check: bool = True) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto (with external data); one-line errors."""
    return ir.load(src, check=check)


def save(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write atomically; external data when the model reaches 2 GB (or when asked)."""
    return ir.save(model, path, external_data=external_data)


@dataclass
class OptimizeResult:
    """What :func:`optimize` returns: the model, the report and the verification."""

    model: onnx.ModelProto
    report: Report
    verification: Verification | None = None
    output: Path | None = None

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        return ir.save(self.model, path, external_data=external_data)


def resolve_pipeline(passes: str | Pipeline | None) -> Pipeline:
    """``"O2"``, ``"-O2"``, ``"2"`` or any pipeline text."""
    if passes is None:
        passes = "O2"
    if isinstance(passes, Pipeline):
        return passes
    text = passes.strip()
    if text.upper().lstrip("-") in ("O0", "O1", "O2", "O3"):
        text = text.upper().lstrip("-")
    elif text in ("0", "1", "2", "3"):
        text = "O" + text
    return parse_pipeline(text)


def _as_feeds_list(inputs: Any, model: onnx.ModelProto) -> list[Feeds] | None:
    if inputs is None:
        return None
    if isinstance(inputs, (str, os.PathLike)):
        return [load_feeds(inputs, model)]
    if isinstance(inputs, dict):
        return [dict(inputs)]
    return [dict(f) for f in inputs]


def optimize(
    model: ir.ModelLike,
    passes: str | Pipeline | None = "O2",
    *,
    output: str | os.PathLike | None = None,
    inputs: Any = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    verify: str = "end",
    strict: bool = False,
    calibration: Any = None,
    eval_data: str | os.PathLike | None = None,
    max_accuracy_drop: float | None = None,
    min_cosine: float | None = None,
    rewrite_limit: int | None = None,
    plugins: Iterable[str] = (),
    instruments: Iterable[Instrument] = (),
    seed: int = 0,
    external_data: bool | None = None,
) -> OptimizeResult:
    """Optimize ``model`` (path, bytes or ModelProto) with ``passes`` and verify before returning.

    ``passes`` is a preset (``"O0"``..``"O3"``) or a pipeline text.  ``verify`` is ``"end"`` (default),
    ``"each"`` (after every pass, rolling a failing pass back) or ``"off"``.  A failed verification raises
    :class:`VerificationError` and writes nothing.  With ``output``, the model is written atomically.
    """
    t_start = time.perf_counter()
    for p in plugins:
        load_plugin(p)
    pipeline = resolve_pipeline(passes)
    pipeline.validate()
    if verify not in ("end", "each", "off"):
        raise InputError(f"verify must be end, each or off, not {verify!r}")
    src_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if output is not None and src_path is not None:
        out = Path(output)
        if out.exists() and src_path.exists() and os.path.samefile(out, src_path):
            raise InputError(f"{out}: refusing to overwrite the input model; choose another -o")
        if out.resolve() == src_path.resolve():
            raise InputError(f"{out}: refusing to overwrite the input model; choose another -o")
    if output is not None:
        folder = Path(output).parent
        if not folder.exists():
            raise InputError(f"{folder}: output folder does not exist")
        if not os.access(folder, os.W_OK):
            raise InputError(f"{folder}: output folder is not writable")
        if Path(output).is_dir():
            raise InputError(f"{output}: is a directory")

    t0 = time.perf_counter()
    original = ir.load(model)
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    feeds = _as_feeds_list(inputs, original)
    t_load = time.perf_counter() - t0

    budget = Budget(max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine)
    evald = load_eval(eval_data, original) if eval_data is not None else None
    if max_accuracy_drop is not None and evald is None:
        raise InputError("--max-accuracy-drop needs --eval data with labels")
    calib = calibration_source(calibration, original) if calibration is not None else None

    graph = ir.import_model(original)
    ctx = PassContext(
        opset=ir.graph_opset(graph), calibration=calib, eval_data=evald, budget=budget,
        verify_feeds=feeds or [], rewrite_limit=rewrite_limit, input_shapes=shapes, seed=seed,
    )
    ctx.model_template = original
    ins = list(instruments)
    if verify == "each":
        from .trust import VerifyEachInstrument

        ins.append(VerifyEachInstrument(original, feeds, shapes, seed))
    pm = PassManager(pipeline, ins)
    report = pm.report
    report.input = str(src_path) if src_path else type(model).__name__
    size_before = src_path.stat().st_size if src_path is not None and not ir._uses_external_data(original) \
        else ir.approx_size(original)
    report.before = model_summary(graph, size_before)
    t0 = time.perf_counter()
    graph = pm.run(graph, ctx)
    t_passes = time.perf_counter() - t0
    if not is_sorted(graph):  # gs.toposort costs as much as the import; passes mostly keep the order
        graph.toposort()
    optimized = ir.export_graph(graph, original)
    report.after = model_summary(graph, ir.approx_size(optimized))
    lossy = any(not p.exact for p in pm.passes)

    verification = None
    t0 = time.perf_counter()
    if verify != "off":
        try:
            ir.check_model(optimized, "optimized model")
        except InputError as e:
            report.verification = {"status": "failed", "reason": str(e)}
            raise VerificationError(f"verification failed: {e}", report.to_dict()) from None
        vfeeds = feeds
        if vfeeds is None and lossy and calib is not None:
            vfeeds = [f for _, f in zip(range(4), calib())]
        if vfeeds is None:
            vfeeds = generate_feeds(original, seed=seed, input_shapes=shapes)
        verification = verify_models(original, optimized, vfeeds, exact=not lossy, budget=budget, eval_data=evald)
        report.verification = verification.to_dict()
        if verification.status == "failed":
            raise VerificationError(f"verification failed: {verification.reason}", report.to_dict())
        if verification.status == "not-verified" and strict:
            raise VerificationError(f"not verified ({verification.reason}) and --strict is on", report.to_dict())
    else:
        report.verification = {"status": "off"}
    t_verify = time.perf_counter() - t0

    t0 = time.perf_counter()
    out_path = None
    if output is not None:
        out_path = ir.save(optimized, output, external_data=external_data, protect=[src_path] if src_path else None)
        report.output = str(out_path)
    report.seconds = {"load": t_load, "passes": t_passes, "verify": t_verify, "save": time.perf_counter() - t0,
                      "total": time.perf_counter() - t_start}
    return OptimizeResult(optimized, report, verification, out_path)


def verify(
    original: ir.ModelLike,
    optimized: ir.ModelLike,
    *,
    inputs: Any = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    exact: bool = True,
    budget: Budget | None = None,
    seed: int = 0,
) -> Verification:
    """Compare two models on the user's inputs or on inputs generated from the signature."""
    a = ir.load(original)
    b = ir.load(optimized)
    feeds = _as_feeds_list(inputs, a)
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    return verify_models(a, b, feeds, exact=exact, budget=budget, input_shapes=shapes, seed=seed)
