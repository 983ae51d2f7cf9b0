"""The Python API: ``optimize``, ``verify``, ``load``, ``save``.

The CLI is a thin layer over these functions, so scripts (for example right after
``torch.onnx.export``) get exactly what the command line does.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import onnx

from . import ir
from .data import CannotGenerate, Feeds, calibration_source, generate_feeds, load_feeds
from .errors import InputError, VerificationError
from .manager import Instrument, PassCrashed, PassManager
from .pass_base import Budget, PassContext, get_pass, load_plugin
from .pipeline import Pipeline, parse_pipeline
from .report import Report, model_summary
from .trace import Failure, TraceInstrument, default_repro_dir
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

    _model: onnx.ModelProto
    report: Report
    verification: Verification | None = None
    output: Path | None = None
    _unwritten: ir.Unwritten | None = field(default=None, repr=False, compare=False)

    @property
    def model(self) -> onnx.ModelProto:
        """The optimized model (new weights go into it when it is first asked for: a run that only
        writes a file never copies them into protos)."""
        if self._unwritten:
            self._unwritten.complete()
        return self._model

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


def _gc_deferred(fn):
    """Run ``fn`` under :func:`graphopt.ir.deferred_gc`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ir.deferred_gc():
            return fn(*args, **kwargs)

    return wrapper


@_gc_deferred
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
    repro_dir: str | os.PathLike | None = None,
    instruments: Iterable[Instrument] = (),
    seed: int = 0,
    external_data: bool | None = None,
) -> OptimizeResult:
    """Optimize ``model`` (path, bytes or ModelProto) with ``passes`` and verify before returning.

    ``passes`` is a preset (``"O0"``..``"O3"``) or a pipeline text.  ``verify`` is ``"end"`` (default),
    ``"each"`` (after every pass, rolling a failing pass back) or ``"off"``.  A failed verification raises
    :class:`VerificationError` and writes no model.  With ``output``, the model is written atomically.
    A crash, a failed verification or a pass rolled back by ``verify="each"`` writes a reproducer folder
    (``repro_dir``, by default ``<output stem>.repro`` beside the output; none without either) that
    ``graphopt optimize --replay DIR`` re-runs.
    """
    t_start = time.perf_counter()
    for p in plugins:
        load_plugin(p)
    pipeline = resolve_pipeline(passes)
    pipeline.validate()
    if verify not in ("end", "each", "off"):
        raise InputError(f"verify must be end, each or off, not {verify!r}")
    src_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if output is not None and src_path is not None and ir.same_file(output, src_path):
        raise InputError(f"{output}: refusing to overwrite the input model; choose another -o")
    if output is not None:
        ir.check_writable(output)

    t0 = time.perf_counter()
    # Every pass lossless (a lossy one measures against the original) and nothing to compare with at
    # the end, or only files: the model is only read through the IR and exported over itself, so its
    # weights can stay in the file's bytes (a skeleton: see ir.load_with_source).
    exact_only = all(get_pass(name).exact for name in pipeline.pass_names())
    # Verified and written, every pass lossless: the output is written first, to a temporary file
    # beside -o, as without verification, and onnxruntime runs the input file and that one; so the
    # input is not parsed whole, nor the output serialized in memory.  It is put in place once verified.
    stream = (verify == "end" and exact_only and output is not None and eval_data is None
              and external_data is not True and not isinstance(model, onnx.ModelProto))
    skeleton = (verify == "off" and exact_only) or stream
    original, source = ir.load_with_source(model, skeleton=skeleton)
    if stream and (source is None or not source.whole):  # (external data, or a model over SOURCE_LIMIT)
        stream = False
        if source is not None:
            source.fill(original)
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    feeds = _as_feeds_list(inputs, original)
    t_load = time.perf_counter() - t0

    budget = Budget(max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine)
    evald = load_eval(eval_data, original) if eval_data is not None else None
    if max_accuracy_drop is not None and evald is None:
        raise InputError("--max-accuracy-drop needs --eval data with labels")
    calib = calibration_source(calibration, original) if calibration is not None else None

    graph = ir.import_model(original, source)
    ctx = PassContext(
        opset=ir.graph_opset(graph), calibration=calib, eval_data=evald, budget=budget,
        verify_feeds=feeds or [], rewrite_limit=rewrite_limit, input_shapes=shapes, seed=seed,
    )
    ctx.model_template = original
    ins = list(instruments)
    repro = Path(repro_dir) if repro_dir is not None else (default_repro_dir(output) if output is not None else None)
    tracer: TraceInstrument | None = None
    each = None  # the --verify each instrument (the tracer too)
    if verify == "each":
        from .trust import VerifyEachInstrument

        tracer = each = VerifyEachInstrument(original, feeds, shapes, seed, pipeline=pipeline)
    elif repro is not None:
        tracer = TraceInstrument()  # records the passes run, for a reproducer
    if tracer is not None:
        ins.append(tracer)
    pm = PassManager(pipeline, ins)
    report = pm.report
    report.input = str(src_path) if src_path else type(model).__name__
    # the file's size when the model came whole from one (external data is not in the file)
    size_before = len(source.data) if source is not None and source.whole else ir.approx_size(original)
    report.before = model_summary(graph, size_before, pm.summary(graph))
    t0 = time.perf_counter()
    try:
        graph = pm.run(graph, ctx)
    except PassCrashed as e:
        if tracer is not None and repro is not None and tracer.failures:
            if source is not None:
                source.fill(original)  # the reproducer's copy of the input must be whole
            _record_failure(tracer, tracer.failures[-1], repro, original=original, feeds=feeds, ctx=ctx,
                            report=report, source=report.input)
            e.args = (f"{e.args[0]}; reproducer: {repro}",)
        if each is not None:
            each.close()  # (its snapshots, once any reproducer is written)
        raise
    t_passes = time.perf_counter() - t0
    ir.toposort(graph)
    # With nothing left to compare against, the original (graphopt's own copy, loaded from a path or
    # bytes) becomes the output: export rewrites it in place and the unchanged weights are not copied.
    raw = unwritten = None
    vfeeds = feeds
    cannot: CannotGenerate | None = None
    signature = None
    if stream:  # what verification needs of the original, taken before export makes it the output
        signature = _signature(original)
        if vfeeds is None:
            try:
                vfeeds = generate_feeds(original, seed=seed, input_shapes=shapes)
            except CannotGenerate as e:
                cannot = e
    if (verify == "off" or stream) and not isinstance(model, onnx.ModelProto):
        optimized, raw, unwritten = ir.export_for_save(graph, original, source, defer=True)
    else:
        optimized = ir.export_graph(graph, original)
    size_after = ir.approx_size(optimized)
    if unwritten:
        size_after += sum(a.nbytes for _, a in unwritten.tensors)  # (their protos hold no bytes yet)
    report.after = model_summary(graph, size_after, pm.summary(graph))
    lossy = any(not p.exact for p in pm.passes)

    verification = None
    t0 = time.perf_counter()

    def whole_original() -> onnx.ModelProto:
        """The input model with all its weights (when streaming, ``original`` became the output)."""
        return ir.load(source.runnable(), check=False) if stream else original

    def failed(msg: str) -> VerificationError:
        """The error to raise; first writes a reproducer: the input model and the whole pipeline."""
        if tracer is not None and repro is not None:
            step = tracer.failures[0] if tracer.failures else Failure(
                "verification", "(the whole pipeline)", msg, 0, exact=not lossy, min_cosine=budget.min_cosine,
                steps=[s.text for s in tracer.steps])
            _record_failure(tracer, step, repro, original=whole_original(), feeds=vfeeds, ctx=ctx, report=report,
                            source=report.input)
            msg += f" (reproducer: {repro})"
        if each is not None:
            each.close()  # (its snapshots, once any reproducer is written)
        return VerificationError(msg, report.to_dict())

    def optimized_whole() -> onnx.ModelProto:
        if unwritten:
            unwritten.complete()
        return optimized

    optimized_bytes: bytes | str | None = None
    staged: ir.Staged | None = None
    try:
        if verify != "off":
            if stream:
                staged = ir.stage(optimized, output, protect=[src_path] if src_path else None, raw=raw,
                                  unwritten=unwritten)
                if staged is None:  # 2 GB or more (external data): verified in memory, written after
                    original = whole_original()
                    stream = False
                    optimized_whole()
            # onnxruntime runs the file or bytes the original was read from (when they are all of it) and
            # the file or bytes the optimized model is written as: neither model is serialized just for it
            if stream:
                original_bytes, optimized_bytes = source.runnable(), str(staged.tmp)
            else:
                original_bytes = source.data if (source is not None and source.whole and not source.stripped
                                                 and isinstance(source.data, bytes)) else None
                if raw is None and size_after < ir.SIZE_LIMIT and external_data is not True:
                    optimized_bytes = optimized.SerializeToString()
            try:
                if stream:  # the file, checked as an input file is
                    written, wsource = ir.load_with_source(staged.tmp, check=False, skeleton=True)
                    ir.check_model(written, "optimized model", data=wsource.data if wsource else None, source=wsource)
                    del written, wsource
                else:
                    ir.check_model(optimized, "optimized model")
            except InputError as e:
                report.verification = {"status": "failed", "reason": str(e)}
                raise failed(f"verification failed: {e}") from None
            if vfeeds is None and lossy and calib is not None:
                vfeeds = [f for _, f in zip(range(4), calib())]
            try:
                if cannot is not None:
                    raise cannot
                if vfeeds is None:
                    vfeeds = generate_feeds(original, seed=seed, input_shapes=shapes)
                ref_outs = None
                if each is not None and each.feeds:  # the original already ran on these
                    vfeeds, ref_outs = each.feeds, each.original_outputs
                verification = verify_models(
                    signature if stream else original, optimized, vfeeds, exact=not lossy, budget=budget,
                    eval_data=evald, reference_outputs=ref_outs, original_bytes=original_bytes,
                    optimized_bytes=optimized_bytes, original_whole=whole_original if stream else None,
                    optimized_whole=optimized_whole if stream else None)
            except CannotGenerate as e:  # e.g. a sequence of unknown-rank tensors: say so, don't refuse the model
                verification = Verification("not-verified", str(e), exact=not lossy)
            report.verification = verification.to_dict()
            if verification.status == "failed":
                raise failed(f"verification failed: {verification.reason}")
            if verification.status == "not-verified" and strict:
                raise VerificationError(f"not verified ({verification.reason}) and --strict is on", report.to_dict())
        else:
            report.verification = {"status": "off"}
        if tracer is not None and tracer.failures and repro is not None:  # --verify each rolled a pass back
            _record_failure(tracer, tracer.failures[0], repro, original=original, feeds=vfeeds, ctx=ctx,
                            report=report, source=report.input)
        if each is not None:
            each.close()  # (its snapshots, once any reproducer is written)
        t_verify = time.perf_counter() - t0

        t0 = time.perf_counter()
        out_path = None
        if staged is not None:
            out_path = staged.commit()
        elif output is not None:
            out_path = ir.save(optimized, output, external_data=external_data,
                               protect=[src_path] if src_path else None, raw=raw, unwritten=unwritten,
                               serialized=optimized_bytes if isinstance(optimized_bytes, bytes) else None)
    except BaseException:
        if staged is not None:
            staged.discard()  # (nothing once committed)
        raise
    if out_path is not None:
        report.output = str(out_path)
    report.seconds = {"load": t_load, "passes": t_passes, "verify": t_verify, "save": time.perf_counter() - t0,
                      "total": time.perf_counter() - t_start}
    if each is not None:  # included in "passes"
        report.seconds["verify_each"] = each.seconds
    return OptimizeResult(optimized, report, verification, out_path, unwritten)


def _record_failure(*args: Any, **kwargs: Any) -> None:
    """``trust.record_failure``, imported only when something failed."""
    from .trust import record_failure

    record_failure(*args, **kwargs)


def _signature(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``'s signature alone (versions, inputs, outputs): what verification reads of a model
    onnxruntime loads from its bytes."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.graph.name = model.graph.name
    m.graph.input.extend(model.graph.input)
    m.graph.output.extend(model.graph.output)
    return m


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
