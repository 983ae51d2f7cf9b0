"""Verification: run models with onnxruntime (optimizations off) and compare outputs.

The reference run uses ``ORT_DISABLE_ALL`` so that onnxruntime's own rewrites neither hide nor cause
differences; ``onnx.reference.ReferenceEvaluator`` is the fallback where onnxruntime cannot run a model.

Tolerance rule for exact passes, per output: every element must satisfy
``|got - ref| <= k(dtype) * max(|ref|)`` (with ``max(|ref|)`` floored at the dtype's tiny value), where
``k`` is 1e-4 for float32, 1e-9 for float64, 1e-2 for float16 and 5e-2 for bfloat16; integer, bool and
string outputs must be equal; NaN must stay NaN at the same places. Shapes and dtypes must be equal.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any, Sequence

import numpy as np
import onnx

from .data import Feeds, generate_feeds
from .errors import InputError

EXACT_TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 1e-2, "bfloat16": 5e-2}
_TWO_GB = 2**31 - 64 * 2**20
# the default budget of lossy passes (see verify_models)
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_TOP1 = 0.99
DEFAULT_TOP1_MIN_ROWS = 100

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


class RunError(Exception):
    """Neither onnxruntime nor the reference evaluator could run a model."""


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        return os.cpu_count() or 1


@contextlib.contextmanager
def _side_by_side(parallel: bool):
    """A function ``both(original, optimized)`` that calls the two (either may be None: not called)
    and returns their results, each as (result, None) or (None, the RunError it raised); other
    exceptions propagate once both calls ended.

    With ``parallel``, the original model's side runs in a worker thread while the caller runs the
    optimized model's: onnxruntime releases the GIL while it loads and runs a model, and each session
    has one thread, so on two or more cores a pair of calls takes about as long as the slower one
    (resnet18's two runs: 73 against 144 ms) and each output is what it would be run alone.  Without,
    the original's side runs first, and the optimized side is not called once it has failed."""
    def call(fn):
        if fn is None:
            return None, None
        try:
            return fn(), None
        except RunError as e:
            return None, e

    def one_after_the_other(original, optimized):
        first = call(original)
        return first, ((None, None) if first[1] is not None else call(optimized))

    if not parallel:
        yield one_after_the_other
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="graphopt-verify") as pool:
        def both(original, optimized):
            if original is None or optimized is None:
                return one_after_the_other(original, optimized)
            fut = pool.submit(call, original)
            try:
                second = call(optimized)
            finally:
                first = fut.result()  # (waits; re-raises what the worker raised other than RunError)
            return first, second

        yield both


def session_options(level: str = "disable", threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    name = _LEVELS.get(level, level)
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, name, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # fatal only: errors come back as exceptions, reported in one line
    return so


def make_session(model: onnx.ModelProto | bytes | str | os.PathLike, level: str = "disable", threads: int = 1):
    """An onnxruntime CPU session of a model, its serialized bytes or its file; models near 2 GB go
    through a temporary file with external data."""
    import onnxruntime as ort

    so = session_options(level, threads)
    if isinstance(model, bytes):
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    if isinstance(model, onnx.ModelProto):
        from .ir import approx_size

        if approx_size(model) >= _TWO_GB:  # (ByteSize() would serialize the whole model to measure it)
            with tempfile.TemporaryDirectory() as d:
                p = os.path.join(d, "model.onnx")
                onnx.save_model(model, p, save_as_external_data=True, location="model.onnx.data")
                return ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names`` (types inferred)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    types = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    missing = [n for n in names if n not in types]
    if missing:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
            for vi in inferred.graph.value_info:
                types.setdefault(vi.name, vi)
        except Exception:
            pass
    for n in names:
        if n in have:
            continue
        if n in types and types[n].type.HasField("tensor_type") and types[n].type.tensor_type.elem_type:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(types[n])
            vi.type.tensor_type.ClearField("shape")  # shapes may be stale; the type is what matters
        else:
            vi = onnx.helper.make_empty_tensor_value_info(n)
        m.graph.output.append(vi)
        have.add(n)
    return m


class Runner:
    """Runs one model many times: onnxruntime first, the reference evaluator as the fallback."""

    def __init__(self, model: onnx.ModelProto, *, extra_outputs: Sequence[str] | None = None, level: str = "disable",
                 threads: int = 1, allow_reference: bool = True, serialized: bytes | str | None = None,
                 whole: Callable[[], onnx.ModelProto] | None = None):
        """``serialized``: ``model``'s bytes, or the path of its file, when the caller has them
        (onnxruntime parses those instead of a serialization made here: for a 45 MB model that is
        ~150 ms).  ``whole``: gives ``model`` with all its weights, where ``model`` lacks some (only
        its signature is read then, unless the reference evaluator has to run it)."""
        if extra_outputs:
            model = whole() if whole is not None else model
            model = with_outputs(model, extra_outputs)
            serialized = whole = None
        self.model = model
        self._whole = whole
        self.output_names = [o.name for o in model.graph.output]
        self.backend = "onnxruntime"
        self.fallback_reason = ""
        self._sess = None
        self._ref = None
        try:
            self._sess = make_session(serialized if serialized is not None else model, level, threads)
        except Exception as e:
            self.fallback_reason = _first_line(e)
            if not allow_reference:
                raise RunError(f"onnxruntime cannot load the model: {self.fallback_reason}") from None
            self._use_reference()

    def _use_reference(self) -> None:
        from onnx.reference import ReferenceEvaluator

        try:
            if self._whole is not None:
                self.model, self._whole = self._whole(), None
            self._ref = ReferenceEvaluator(self.model)
            self.backend = "onnx.reference"
        except Exception as e:
            raise RunError(f"onnxruntime: {self.fallback_reason}; onnx.reference: {_first_line(e)}") from None

    def run(self, feeds: Feeds, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else self.output_names
        if self._sess is not None:
            try:
                vals = self._sess.run(names, feeds)
                return dict(zip(names, vals))
            except Exception as e:
                self.fallback_reason = _first_line(e)
                self._sess = None
                self._use_reference()
        try:
            vals = self._ref.run(names, feeds)  # type: ignore[union-attr]
        except Exception as e:
            raise RunError(f"onnxruntime: {self.fallback_reason}; onnx.reference: {_first_line(e)}") from None
        return {n: _as_output(v) for n, v in zip(names, vals)}


def _as_output(v: Any) -> Any:
    """The reference evaluator's value as onnxruntime gives it: a sequence stays a list of arrays (its
    elements may differ in shape; np.asarray would stack or reject it), an empty optional stays None."""
    if isinstance(v, (list, tuple)):
        return [_as_output(x) for x in v]
    if v is None or isinstance(v, dict):
        return v
    return np.asarray(v)


def run_model(model: onnx.ModelProto, feeds: Feeds, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    return Runner(model, extra_outputs=[o for o in (outputs or []) if o not in {x.name for x in model.graph.output}]).run(feeds, outputs)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    text = next((l.strip() for l in s if l.strip()), type(e).__name__)
    return text[:300]


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class OutputMetrics:
    name: str
    ok: bool
    reason: str = ""
    shape_ref: list[int] | None = None
    shape_got: list[int] | None = None
    dtype: str = ""
    max_abs: float = 0.0
    max_rel: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0
    top1_agreement: float | None = None
    tolerance: float | None = None


@dataclass
class Verification:
    status: str  # "passed" | "failed" | "not-verified"
    reason: str = ""
    backend: str = "onnxruntime"
    samples: int = 0
    exact: bool = True
    outputs: list[OutputMetrics] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        from .report import _jsonable

        return _jsonable(asdict(self))

    def worst(self) -> OutputMetrics | None:
        bad = [o for o in self.outputs if not o.ok]
        return bad[0] if bad else None

    def figures(self) -> str:
        """The figures per output (and accuracy), one line: what lossy passes put in their notes."""
        parts = [f"{m.name}: cos={m.cosine:.5f} rel_l2={m.rel_l2:.3g}" + (f" top1={m.top1_agreement:.3f}" if m.top1_agreement is not None else "")
                 for m in self.outputs]
        if self.accuracy:
            parts.append(f"accuracy {self.accuracy['accuracy']:.4f} (fp32 {self.accuracy['accuracy_ref']:.4f})")
        return "; ".join(parts)

    def summary(self) -> str:
        if self.status == "not-verified":
            return f"not verified: {self.reason}"
        parts = []
        for o in self.outputs:
            s = f"{o.name}: max_abs={o.max_abs:.3g} rel_l2={o.rel_l2:.3g} cos={o.cosine:.6f}"
            if o.top1_agreement is not None:
                s += f" top1={o.top1_agreement:.3f}"
            parts.append(s)
        for k, v in self.accuracy.items():
            parts.append(f"{k}={v:.4f}")
        head = "passed" if self.ok else f"FAILED ({self.reason})"
        return head + ("; " + "; ".join(parts) if parts else "")


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind in "fc" or a.dtype.name == "bfloat16"


def compare_arrays(name: str, ref: Any, got: Any, *, exact: bool = True, tolerance: float | None = None) -> OutputMetrics:
    """Metrics for one output; ``ok`` follows the exact rule (or ``tolerance`` if given)."""
    if not isinstance(ref, np.ndarray) or not isinstance(got, np.ndarray):
        # sequences / optionals: compare element-wise
        if isinstance(ref, list) and isinstance(got, list) and len(ref) == len(got):
            subs = [compare_arrays(f"{name}[{i}]", r, g, exact=exact, tolerance=tolerance) for i, (r, g) in enumerate(zip(ref, got))]
            bad = [s for s in subs if not s.ok]
            return bad[0] if bad else OutputMetrics(name, True)
        if ref is None and got is None:
            return OutputMetrics(name, True)
        return OutputMetrics(name, False, f"output kinds differ ({type(ref).__name__} vs {type(got).__name__})")
    m = OutputMetrics(name, True, shape_ref=list(ref.shape), shape_got=list(got.shape), dtype=str(ref.dtype))
    if ref.dtype != got.dtype:
        m.ok, m.reason = False, f"dtype {got.dtype} != {ref.dtype}"
        return m
    if ref.shape != got.shape:
        m.ok, m.reason = False, f"shape {list(got.shape)} != {list(ref.shape)}"
        return m
    if ref.size == 0:
        return m
    if not _is_float(ref):
        eq = ref == got if ref.dtype != object else np.array([a == b for a, b in zip(ref.ravel(), got.ravel())])
        diff = int(np.size(eq) - np.count_nonzero(eq))
        if diff:
            m.ok, m.reason = False, f"{diff} of {ref.size} values differ"
            if ref.dtype.kind in "iub":
                d = np.abs(ref.astype(np.float64) - got.astype(np.float64))
                m.max_abs = float(d.max())
        return m
    r = ref.astype(np.float64) if ref.dtype.kind != "c" else ref.astype(np.complex128)
    g = got.astype(np.float64) if got.dtype.kind != "c" else got.astype(np.complex128)
    nan_r, nan_g = np.isnan(r), np.isnan(g)
    if (nan_r != nan_g).any():
        m.ok, m.reason = False, f"NaN at {int((nan_r != nan_g).sum())} places where the reference has none (or vice versa)"
    finite = ~(nan_r | nan_g)
    inf_mismatch = np.isinf(r) != np.isinf(g)
    if (inf_mismatch & finite).any() or (np.isinf(r) & finite & (r != g)).any():
        m.ok, m.reason = False, "infinities differ"
    both = finite & np.isfinite(r) & np.isfinite(g)
    rv, gv = r[both], g[both]
    d = np.abs(rv - gv)
    scale = float(np.abs(rv).max()) if rv.size else 0.0
    m.max_abs = float(d.max()) if d.size else 0.0
    m.max_rel = float((d / np.maximum(np.abs(rv), 1e-12)).max()) if d.size else 0.0
    nr = float(np.linalg.norm(rv))
    m.rel_l2 = float(np.linalg.norm(rv - gv) / nr) if nr > 0 else float(np.linalg.norm(gv) > 0)
    ng = float(np.linalg.norm(gv))
    m.cosine = float(np.real(np.vdot(rv, gv)) / (nr * ng)) if nr > 0 and ng > 0 else (1.0 if nr == ng else 0.0)
    if ref.ndim == 2 and ref.shape[-1] > 1 and ref.dtype.kind == "f":  # classifier-like [N, C]
        m.top1_agreement = float((ref.argmax(-1) == got.argmax(-1)).mean())
    if exact or tolerance is not None:
        k = tolerance if tolerance is not None else EXACT_TOLERANCE.get(ref.dtype.name, 1e-4)
        tiny = float(np.finfo(ref.dtype).tiny) if ref.dtype.kind == "f" else 1e-30
        m.tolerance = k * max(scale, tiny)
        if m.ok and m.max_abs > m.tolerance:
            m.ok = False
            m.reason = f"max_abs {m.max_abs:.3g} > tolerance {m.tolerance:.3g} (= {k:g} x max|ref| {scale:.3g})"
    return m


def compare_outputs(ref: dict[str, Any], got: dict[str, Any], *, exact: bool = True, tolerance: float | None = None) -> list[OutputMetrics]:
    out = []
    for name, r in ref.items():
        if name not in got:
            out.append(OutputMetrics(name, False, "output missing"))
            continue
        out.append(compare_arrays(name, r, got[name], exact=exact, tolerance=tolerance))
    return out


def _merge(acc: dict[str, OutputMetrics], new: list[OutputMetrics], weight: int) -> None:
    """Keep the worst figures per output across samples (top-1 agreement averaged)."""
    for m in new:
        old = acc.get(m.name)
        if old is None:
            acc[m.name] = m
            m._n = weight  # type: ignore[attr-defined]
            continue
        n_old = getattr(old, "_n", 1)
        if old.top1_agreement is not None and m.top1_agreement is not None:
            old.top1_agreement = (old.top1_agreement * n_old + m.top1_agreement * weight) / (n_old + weight)
        old._n = n_old + weight  # type: ignore[attr-defined]
        if not m.ok and old.ok:
            old.ok, old.reason = False, m.reason
        old.max_abs = max(old.max_abs, m.max_abs)
        old.max_rel = max(old.max_rel, m.max_rel)
        old.rel_l2 = max(old.rel_l2, m.rel_l2)
        old.cosine = min(old.cosine, m.cosine)


def verify_models(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    feeds: list[Feeds] | None = None,
    *,
    exact: bool = True,
    budget=None,
    eval_data: tuple[list[Feeds], np.ndarray] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    reference_outputs: list[dict[str, np.ndarray]] | None = None,
    original_bytes: bytes | None = None,
    optimized_bytes: bytes | str | None = None,
    parallel: bool = True,
    original_whole: Callable[[], onnx.ModelProto] | None = None,
    optimized_whole: Callable[[], onnx.ModelProto] | None = None,
) -> Verification:
    """Compare ``optimized`` with ``original`` on ``feeds`` (generated from the signature if None).

    Exact: the tolerance rule of this module.  Lossy (``exact=False``): the ``budget`` (min cosine, min
    top-1 agreement, max accuracy drop on ``eval_data``); without a budget, the default budget: cosine
    >= 0.99 on every float output, and on classifier-like outputs [N, C] top-1 agreement >= 0.99 once at
    least 100 rows were compared (on fewer rows a single flip between two near-tied logits -- common
    with untrained weights -- would decide alone, and says more about the sample than the model).
    ``original_bytes``, ``optimized_bytes``: the models serialized, where the caller has them (the
    file the original was read from, the bytes the optimized model is written as): onnxruntime runs
    those, and neither model is serialized again here; ``optimized_bytes`` may be the path of the
    file it was written to.  ``original_whole``, ``optimized_whole``: give the models with all their
    weights where ``original`` or ``optimized`` lacks some (a skeleton: see :class:`Runner`).
    ``parallel``: on two or more cores, load and run the two models at the same time
    (:func:`_side_by_side`).
    """
    from .pass_base import Budget

    ref_names = [o.name for o in original.graph.output]
    got_names = [o.name for o in optimized.graph.output]
    if ref_names != got_names:
        return Verification("failed", f"outputs differ: {got_names} vs {ref_names}", exact=exact)
    if feeds is None:
        feeds = generate_feeds(original, seed=seed, input_shapes=input_shapes)
    with _side_by_side(parallel and reference_outputs is None and cores() > 1) as both:
        (ref_runner, err), (got_runner, got_err) = both(
            (lambda: Runner(original, serialized=original_bytes, whole=original_whole))
            if reference_outputs is None else None,
            lambda: Runner(optimized, serialized=optimized_bytes, whole=optimized_whole))
        if err is not None:
            return Verification("not-verified", f"the original model cannot be run: {err}", exact=exact)
        if got_err is not None:
            return Verification("failed", f"the optimized model cannot be run: {got_err}", exact=exact)
        acc: dict[str, OutputMetrics] = {}
        rows_per_output: dict[str, int] = {}
        for i, f in enumerate(feeds):
            (ref, err), (got, got_err) = both(
                (lambda f=f: ref_runner.run(f)) if ref_runner is not None else None,  # type: ignore[union-attr]
                lambda f=f: got_runner.run(f))
            if err is not None:
                return Verification("not-verified", f"the original model cannot be run on the inputs: {err}", exact=exact)
            if reference_outputs is not None:
                ref = reference_outputs[i]
            if got_err is not None:
                return Verification("failed", f"the optimized model fails on inputs that the original runs: {got_err}",
                                    exact=exact)
            _merge(acc, compare_outputs(ref, got, exact=exact), 1)
            for k, r in ref.items():
                if isinstance(r, np.ndarray) and r.ndim == 2:
                    rows_per_output[k] = rows_per_output.get(k, 0) + r.shape[0]
    if got_runner.backend != "onnxruntime":
        # The optimized model only ran on the reference evaluator. If onnxruntime runs the original, that is a
        # regression (e.g. an op with no onnxruntime kernel), whatever the values say.
        ort_ran_original = ref_runner.backend == "onnxruntime" if ref_runner is not None else _ort_loads(original)
        if ort_ran_original:
            return Verification("failed", f"onnxruntime runs the original but not the optimized model: {got_runner.fallback_reason}",
                                backend=got_runner.backend, samples=len(feeds), exact=exact, outputs=list(acc.values()))
    v = Verification("passed", backend=got_runner.backend if ref_runner is None else ref_runner.backend, samples=len(feeds), exact=exact, outputs=list(acc.values()))
    for m in v.outputs:
        m.__dict__.pop("_n", None)
    if exact:
        bad = v.worst()
        if bad is not None:
            v.status, v.reason = "failed", f"output '{bad.name}': {bad.reason}"
        return v
    # lossy: structural failures (shape, dtype, NaN) still fail; values are held to the budget
    for m in v.outputs:
        if not m.ok and not m.reason.startswith("max_abs"):
            v.status, v.reason = "failed", f"output '{m.name}': {m.reason}"
            return v
        m.ok, m.reason = True, ""
    b = budget or Budget()
    if eval_data is not None and b.max_accuracy_drop is not None:
        acc_ref = accuracy(original, eval_data)
        acc_got = accuracy(optimized, eval_data)
        v.accuracy = {"accuracy_ref": acc_ref, "accuracy": acc_got, "accuracy_drop": acc_ref - acc_got}
        if acc_ref - acc_got > b.max_accuracy_drop + 1e-12:
            v.status = "failed"
            v.reason = f"top-1 accuracy {acc_got:.4f} vs {acc_ref:.4f}: drop {acc_ref - acc_got:.4f} > budget {b.max_accuracy_drop}"
            return v
    min_cos = b.min_cosine
    min_top1 = b.min_top1_agreement
    default = not b.is_set()
    if default:
        min_top1, min_cos = DEFAULT_MIN_TOP1, DEFAULT_MIN_COSINE
    for m in v.outputs:
        rows = rows_per_output.get(m.name, 0)
        top1_counts = m.top1_agreement is not None and (not default or rows >= DEFAULT_TOP1_MIN_ROWS)
        if min_top1 is not None and top1_counts and m.top1_agreement < min_top1 - 1e-12:
            m.ok, m.reason = False, f"top-1 agreement {m.top1_agreement:.4f} < {min_top1} over {rows} rows"
        elif min_cos is not None and m.cosine < min_cos and (default or m.top1_agreement is None or b.min_cosine is not None):
            m.ok, m.reason = False, f"cosine {m.cosine:.6f} < {min_cos}"
    bad = v.worst()
    if bad is not None:
        v.status, v.reason = "failed", f"output '{bad.name}': {bad.reason}"
    return v


def budget_reference(ctx: Any, current: onnx.ModelProto) -> onnx.ModelProto:
    """The model a lossy pass measures its budget against: the pipeline's original model
    (``ctx.model_template``, what the final verification compares with) when its graph inputs and
    outputs are the current model's, else ``current``.  Measuring every lossy pass against the
    original keeps one budget for the whole pipeline (prune then quantize cannot each spend it all).
    """
    orig = getattr(ctx, "model_template", None)
    if orig is None:
        return current
    names = lambda m: ([i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}],
                       [o.name for o in m.graph.output])
    return orig if names(orig) == names(current) else current


def _ort_loads(model: onnx.ModelProto) -> bool:
    try:
        make_session(model)
        return True
    except Exception:
        return False


def accuracy(model: onnx.ModelProto, eval_data: tuple[list[Feeds], np.ndarray], output: int = 0) -> float:
    """Top-1 accuracy of ``model``'s first output over labelled feeds (batches concatenated)."""
    feeds_list, labels = eval_data
    r = Runner(model)
    name = r.output_names[output]
    preds = [np.asarray(r.run(f, [name])[name]).reshape(len(next(iter(f.values()))), -1).argmax(-1) for f in feeds_list]
    p = np.concatenate(preds)
    return float((p == np.asarray(labels).reshape(-1)[: len(p)]).mean())


def load_eval(path: str | os.PathLike, model: onnx.ModelProto, batch_size: int = 64) -> tuple[list[Feeds], np.ndarray]:
    """``--eval F.npz``: model inputs plus a ``labels`` array (batched like calibration data)."""
    from .data import feeds_batches

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:
        raise InputError(f"{path}: cannot read as .npz: {e}") from None
    if "labels" not in arrays:
        raise InputError(f"{path}: --eval data needs a 'labels' array (has: {', '.join(arrays)})")
    labels = arrays.pop("labels")
    batches = list(feeds_batches(arrays, model, batch_size))
    n = sum(len(next(iter(b.values()))) for b in batches)
    return batches, labels[:n]
