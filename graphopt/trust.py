"""Trust tooling: per-pass verification with rollback, reproducers and replay, rewrite bisection and
divergence localisation.

- :class:`VerifyEachInstrument` (``--verify each``): after every pass that reports a change, the model is
  compared with the model before that pass (exact passes at the exact tolerance of
  :mod:`graphopt.verify`, lossy passes against their share of the budget).  A failing or crashing pass is
  rolled back: the graph before it is restored and the pipeline goes on.  The "model before the pass" is
  the last verified model, kept as a ``ModelProto`` (it had to be exported to be run anyway) or, above
  :data:`SNAPSHOT_RAM_LIMIT`, as a file in a temporary folder, never as a deep copy of the IR.
- :class:`TraceInstrument` records the passes as they run, so that a crash or a failed verification can
  be written as a reproducer folder (:func:`write_reproducer`) and re-run with :func:`replay`
  (``graphopt optimize --replay DIR``).
- :func:`bisect` (``graphopt bisect``): binary search over the rewrite budget (``ctx.allow_rewrite``) for
  the first rewrite that breaks equivalence.
- :func:`localise_divergence` (``graphopt verify A B --intermediates``): compares the tensors both
  models still share by name and names the first node, in topological order, where they diverge.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ir
from .data import Feeds, generate_feeds
from .errors import GraphoptError, InputError
from .manager import PassCrashed, PassManager
from .pass_base import Budget, Pass, PassContext, get_pass
from .pipeline import parse_pipeline
from .report import PassRecord
from .trace import Failure, Step, TraceInstrument, default_repro_dir  # noqa: F401 (part of this module's API)
from .verify import OutputMetrics, RunError, Runner, compare_outputs, with_outputs

#: Models bigger than this (serialized bytes) are snapshotted to disk instead of kept in RAM.
SNAPSHOT_RAM_LIMIT = int(os.environ.get("GRAPHOPT_SNAPSHOT_RAM_LIMIT", str(256 * 2**20)))

REPRO_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------------------


class Snapshot:
    """The model at one point of the pipeline: a ``ModelProto`` in RAM, or a file for big models."""

    def __init__(self, model: onnx.ModelProto, folder: Path | None = None, *, to_disk: bool | None = None):
        big = ir.approx_size(model) > SNAPSHOT_RAM_LIMIT if to_disk is None else to_disk
        self.path: Path | None = None
        self.model: onnx.ModelProto | None = model
        self.nodes = len(model.graph.node)
        if big:
            assert folder is not None
            fd, name = tempfile.mkstemp(dir=folder, prefix="snapshot-", suffix=".onnx")
            os.close(fd)
            self.path = Path(name)
            ir.save(model, self.path, external_data=True)  # weights in a side file: no 2 GB limit
            self.model = None

    def load(self) -> onnx.ModelProto:
        if self.model is not None:
            return self.model
        assert self.path is not None
        return ir.load(self.path, check=False)

    def graph(self) -> gs.Graph:
        return ir.import_model(self.load())

    def save_to(self, path: Path) -> None:
        if self.path is not None:
            shutil.copyfile(self.path, path)
            data = Path(str(self.path) + ".data")
            if data.exists():  # ir.save names external data after the file
                shutil.copyfile(data, Path(str(path) + ".data"))
                m = onnx.load(str(path), load_external_data=False)
                for t in onnx.external_data_helper._get_all_tensors(m):
                    for e in t.external_data:
                        if e.key == "location":
                            e.value = path.name + ".data"
                onnx.save_model(m, str(path))
        else:
            ir.save(self.load(), path)

    def discard(self) -> None:
        if self.path is not None:
            for p in (self.path, Path(str(self.path) + ".data")):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass


# --------------------------------------------------------------------------------------------------
# --verify each
# --------------------------------------------------------------------------------------------------


def _lossy_count(pipeline: Any) -> int:
    """Lossy pass instances in the pipeline (0 when unknown)."""
    if pipeline is None:
        return 0
    names = pipeline.pass_names() if hasattr(pipeline, "pass_names") else list(pipeline)
    return sum(1 for n in names if not get_pass(n).exact)


def budget_share(budget: Budget, n_lossy: int) -> tuple[float | None, float | None]:
    """(min cosine, min top-1 agreement) one lossy pass may use: the budget's deficit split evenly.

    Without a budget: the default budget of the final verification (:func:`graphopt.verify.verify_models`):
    its cosine deficit split, top-1 agreement as is (counted only over enough rows, see compare_runs)."""
    if not budget.is_set():
        from .verify import DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1

        return 1.0 - (1.0 - DEFAULT_MIN_COSINE) / n_lossy, DEFAULT_MIN_TOP1
    cos = None if budget.min_cosine is None else 1.0 - (1.0 - budget.min_cosine) / n_lossy
    top1 = None if budget.min_top1_agreement is None else 1.0 - (1.0 - budget.min_top1_agreement) / n_lossy
    return cos, top1


def compare_runs(ref: list[dict[str, Any]], got: list[dict[str, Any]], *, exact: bool,
                 min_cosine: float | None = None, min_top1: float | None = None,
                 budget_set: bool = False) -> tuple[bool, list[OutputMetrics], str]:
    """Compare per-sample outputs; returns (ok, worst metrics per output, one-line reason)."""
    from .verify import DEFAULT_TOP1_MIN_ROWS

    worst: dict[str, OutputMetrics] = {}
    top1: dict[str, list[float]] = {}
    rows: dict[str, int] = {}
    for r, g in zip(ref, got):
        for k, v in r.items():
            if isinstance(v, np.ndarray) and v.ndim == 2:
                rows[k] = rows.get(k, 0) + v.shape[0]
        for m in compare_outputs(r, g, exact=exact):
            if m.top1_agreement is not None:
                top1.setdefault(m.name, []).append(m.top1_agreement)
            old = worst.get(m.name)
            if old is None or (old.ok and not m.ok) or (old.ok == m.ok and m.max_abs > old.max_abs):
                worst[m.name] = m
    for name, vals in top1.items():
        worst[name].top1_agreement = float(np.mean(vals))
    metrics = list(worst.values())
    for m in metrics:
        if not m.ok and (exact or not m.reason.startswith("max_abs")):
            return False, metrics, f"output '{m.name}': {m.reason} (cosine {m.cosine:.6f})"
        if not exact:
            m.ok, m.reason = True, ""
    if not exact:
        for m in metrics:
            # the default budget counts top-1 only over enough rows, and cosine on every output (verify_models)
            top1_counts = m.top1_agreement is not None and (budget_set or rows.get(m.name, 0) >= DEFAULT_TOP1_MIN_ROWS)
            if min_top1 is not None and top1_counts and m.top1_agreement < min_top1 - 1e-12:
                return False, metrics, f"output '{m.name}': top-1 agreement {m.top1_agreement:.4f} < {min_top1:.4f}"
            if min_cosine is not None and m.cosine < min_cosine and (m.top1_agreement is None or budget_set or not top1_counts):
                return False, metrics, f"output '{m.name}': cosine {m.cosine:.6f} < {min_cosine:.6f} (max_abs {m.max_abs:.3g})"
    return True, metrics, ""


def _figures(metrics: list[OutputMetrics]) -> str:
    return "; ".join(f"{m.name} max_abs={m.max_abs:.3g} cos={m.cosine:.6f}" for m in metrics)


class VerifyEachInstrument(TraceInstrument):
    """``--verify each``: verify every pass that reports a change against the model before it, roll back
    the ones that fail (or crash), and keep what is needed for a reproducer."""

    def __init__(self, original: onnx.ModelProto, feeds: list[Feeds] | None = None,
                 input_shapes: dict[str, list[int]] | None = None, seed: int = 0, *,
                 pipeline: Any = None, snapshot_to_disk: bool | None = None):
        super().__init__()
        self.original = original
        self.feeds = feeds
        self.input_shapes = input_shapes or {}
        self.seed = seed
        self.lossy = _lossy_count(pipeline) > 0 or pipeline is None
        self.n_lossy = max(1, _lossy_count(pipeline))
        self.to_disk = snapshot_to_disk
        self._tmp: Path | None = None
        self._snap: Snapshot | None = None
        self._ref: list[dict[str, Any]] = []
        self.original_outputs: list[dict[str, Any]] = []
        self._acc: float | None = None
        self.verified = 0
        self.seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------
    def run_begin(self, graph: gs.Graph, ctx: PassContext) -> None:
        import time

        super().run_begin(graph, ctx)
        t0 = time.perf_counter()
        self.budget = ctx.budget
        self.eval_data = ctx.eval_data
        if not self.feeds:
            self.feeds = list(ctx.verify_feeds) or None
        if not self.feeds and ctx.has_calibration and self.lossy:
            self.feeds = [f for _, f in zip(range(4), ctx.calibration_batches())] or None
        if not self.feeds:
            self.feeds = generate_feeds(self.original, seed=self.seed, input_shapes=self.input_shapes)
        self._tmp = Path(tempfile.mkdtemp(prefix="graphopt-snapshots-"))
        # The input model is already in memory: it is the first snapshot, at no cost.
        self._snap = Snapshot(self.original, to_disk=False)
        self._ref = self._run(self.original)
        self.original_outputs = self._ref  # the final verification reuses them (same feeds)
        self.seconds += time.perf_counter() - t0

    def run_end(self, graph: gs.Graph, ctx: PassContext) -> None:
        if self._snap is not None and not any(f.snapshot is self._snap for f in self.failures):
            self._snap.discard()

    def close(self) -> None:
        """Remove the temporary snapshot folder (after any reproducer was written)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- helpers ----------------------------------------------------------------------------------
    def _run(self, model: onnx.ModelProto) -> list[dict[str, Any]]:
        r = Runner(model)
        return [r.run(f) for f in self.feeds or []]

    def _restore(self) -> gs.Graph:
        assert self._snap is not None
        return self._snap.graph()

    def _accuracy(self, model: onnx.ModelProto) -> float:
        from .verify import accuracy

        return accuracy(model, self.eval_data)

    # -- hooks ------------------------------------------------------------------------------------
    def after_pass(self, p: Pass, graph: gs.Graph, ctx: PassContext, record: PassRecord) -> gs.Graph | None:
        import time

        if not record.changed:
            return None
        t0 = time.perf_counter()
        try:
            return self._check(p, graph, ctx, record)
        finally:
            self.seconds += time.perf_counter() - t0

    def _check(self, p: Pass, graph: gs.Graph, ctx: PassContext, record: PassRecord) -> gs.Graph | None:
        self.verified += 1
        exact = bool(type(p).exact)
        min_cos, min_top1 = (None, None) if exact else budget_share(self.budget, self.n_lossy)
        failure = ""
        model = None
        got: list[dict[str, Any]] = []
        metrics: list[OutputMetrics] = []
        try:
            model = ir.export_graph(graph, ctx.model_template or self.original)
            # duplicate names and cycles here; the full onnx.checker (0.5-1 s on resnet18) runs once at
            # the end, and onnxruntime refuses what else would stop the model from running
            ir.check_structure(model.graph, "the model after this pass")
            got = self._run(model)
        except (GraphoptError, RunError) as e:
            failure = str(e)
        except Exception as e:  # export of a broken graph
            failure = f"the graph cannot be exported or run: {type(e).__name__}: {e}"
        if not failure:
            ok, metrics, failure = compare_runs(self._ref, got, exact=exact, min_cosine=min_cos, min_top1=min_top1,
                                                budget_set=self.budget.is_set())
            acc = None
            if ok and not exact and self.eval_data is not None and self.budget.max_accuracy_drop is not None:
                if self._acc is None:
                    self._acc = self._accuracy(self._snap.load())  # type: ignore[union-attr]
                acc = self._accuracy(model)  # type: ignore[arg-type]
                share = self.budget.max_accuracy_drop / self.n_lossy
                if self._acc - acc > share + 1e-12:
                    failure = f"top-1 accuracy {acc:.4f} vs {self._acc:.4f} before the pass: drop > its share {share:.4f}"
        if failure:
            step = self.steps[-1] if self.steps else Step(record.name, ctx.rewrites)
            self.failures.append(Failure("verification", record.name, failure, step.rewrites_before, exact=exact,
                                         min_cosine=min_cos, min_top1_agreement=min_top1, snapshot=self._snap,
                                         steps=[record.name]))
            record.status = "rolled-back"
            record.detail = failure
            record.nodes_after = record.nodes_before
            record.const_bytes_after = record.const_bytes_before
            record.op_delta = {}
            return self._restore()
        record.detail = ("verified: " if exact else "verified within its budget share: ") + _figures(metrics)
        assert model is not None
        old = self._snap
        self._snap = Snapshot(model, self._tmp, to_disk=self.to_disk)
        if old is not None and not any(f.snapshot is old for f in self.failures):
            old.discard()
        self._ref = got
        if not exact and self.eval_data is not None and self.budget.max_accuracy_drop is not None:
            self._acc = acc
        return None

    def on_crash(self, p: Pass, graph: gs.Graph, ctx: PassContext, exc: BaseException) -> gs.Graph | None:
        step = self.steps[-1]
        self.failures.append(Failure("crash", step.text, f"{type(exc).__name__}: {exc}", step.rewrites_before,
                                     exact=bool(type(p).exact), snapshot=self._snap, steps=[step.text]))
        return self._restore()


# --------------------------------------------------------------------------------------------------
# Reproducers
# --------------------------------------------------------------------------------------------------


def write_reproducer(folder: str | os.PathLike, failure: Failure, *, original: onnx.ModelProto,
                     feeds: list[Feeds], report: dict | None, input_shapes: dict[str, list[int]] | None = None,
                     seed: int = 0, rewrite_limit: int | None = None, budget: Budget | None = None,
                     source: str = "") -> Path:
    """Write the model before the failing step, the pipeline, the inputs and the report to ``folder``."""
    from .pass_base import LOADED_PLUGINS

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: --repro-dir exists and is not a folder")
    if not folder.parent.exists():
        raise InputError(f"{folder.parent}: folder does not exist (for --repro-dir)")
    folder.mkdir(exist_ok=True)
    for old in folder.glob("inputs*.npz"):
        old.unlink()
    if failure.snapshot is not None:
        failure.snapshot.save_to(folder / "model.onnx")
    else:
        ir.save(original, folder / "model.onnx")
    pipeline = ",".join(failure.steps)
    (folder / "pipeline.txt").write_text(pipeline + "\n")
    for i, f in enumerate(feeds):
        np.savez(folder / ("inputs.npz" if i == 0 else f"inputs_{i}.npz"), **f)
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report, indent=2))
    b = budget or Budget()
    manifest = {
        "format": REPRO_FORMAT,
        "kind": failure.kind,
        "pass": failure.pass_text,
        "detail": failure.detail,
        "pipeline": pipeline,
        "model": "model.onnx",
        "model_is": "the model before the failing pass" if failure.snapshot is not None else "the input model",
        "inputs": sorted(p.name for p in folder.glob("inputs*.npz")),
        "rewrites_before": failure.rewrites_before,
        "rewrite_limit": rewrite_limit,
        "exact": failure.exact,
        "min_cosine": failure.min_cosine,
        "min_top1_agreement": failure.min_top1_agreement,
        "budget": {"max_accuracy_drop": b.max_accuracy_drop, "min_cosine": b.min_cosine,
                   "min_top1_agreement": b.min_top1_agreement},
        "plugins": list(LOADED_PLUGINS),
        "input_shapes": input_shapes or {},
        "seed": seed,
        "source_model": source,
        "replay": f"graphopt optimize --replay {folder}",
    }
    (folder / "repro.json").write_text(json.dumps(manifest, indent=2))
    return folder


def record_failure(tracer: TraceInstrument, failure: Failure, folder: Path, *, original: onnx.ModelProto,
                   feeds: list[Feeds] | None, ctx: PassContext, report, source: str = "") -> Path:
    """Write the reproducer for ``failure`` and point the report at it (api.optimize's hook)."""
    feeds = getattr(tracer, "feeds", None) or feeds or generate_feeds(original, seed=ctx.seed, input_shapes=ctx.input_shapes)
    report.reproducer = str(folder)
    note = f"reproducer of '{failure.pass_text}' ({failure.kind}) in {folder}: graphopt optimize --replay {folder}"
    if note not in report.notes:
        report.notes.append(note)
    return write_reproducer(folder, failure, original=original, feeds=feeds, report=report.to_dict(),
                            input_shapes=ctx.input_shapes, seed=ctx.seed, rewrite_limit=tracer.rewrite_limit,
                            budget=ctx.budget, source=source)


@dataclass
class ReplayResult:
    reproduced: bool
    kind: str  # "crash" | "verification"
    pass_text: str
    pipeline: str
    detail: str  # what happened now
    recorded: str  # what the reproducer recorded
    metrics: list[OutputMetrics] = field(default_factory=list)
    model: onnx.ModelProto | None = None
    nodes: int = 0
    samples: int = 0


def replay(folder: str | os.PathLike) -> ReplayResult:
    """Re-run the step recorded in a reproducer folder and say whether the failure happens again."""
    from .pass_base import load_plugin

    folder = Path(folder)
    man_path = folder / "repro.json"
    if not man_path.is_file():
        raise InputError(f"{folder}: not a graphopt reproducer (no repro.json)")
    try:
        man = json.loads(man_path.read_text())
    except ValueError as e:
        raise InputError(f"{man_path}: unreadable: {e}") from None
    if man.get("format") != REPRO_FORMAT:
        raise InputError(f"{man_path}: reproducer format {man.get('format')} is not supported")
    for p in man.get("plugins", []):
        load_plugin(p)
    model = ir.load(folder / man.get("model", "model.onnx"))
    feeds = []
    for name in man.get("inputs", []):
        with np.load(folder / name, allow_pickle=False) as z:
            feeds.append({k: z[k] for k in z.files})
    if not feeds:
        feeds = generate_feeds(model, seed=man.get("seed", 0), input_shapes=man.get("input_shapes") or {})
    pipeline = parse_pipeline(man["pipeline"])
    graph = ir.import_model(model)
    b = man.get("budget") or {}
    ctx = PassContext(opset=ir.graph_opset(graph), verify_feeds=feeds, rewrite_limit=man.get("rewrite_limit"),
                      input_shapes=man.get("input_shapes") or {}, seed=man.get("seed", 0), budget=Budget(**b))
    ctx.rewrites = int(man.get("rewrites_before") or 0)
    ctx.model_template = model
    pm = PassManager(pipeline)
    res = ReplayResult(False, man["kind"], man["pass"], man["pipeline"], "", man.get("detail", ""),
                       nodes=len(model.graph.node), samples=len(feeds))
    try:
        graph = pm.run(graph, ctx)
    except PassCrashed as e:
        res.reproduced = True
        res.kind = "crash"
        res.detail = str(e)
        return res
    graph.toposort()
    out = ir.export_graph(graph, model)
    res.model = out
    try:
        ir.check_model(out, "the replayed model")
        ref = [Runner(model).run(f) for f in feeds]
        got = [Runner(out).run(f) for f in feeds]
    except (GraphoptError, RunError) as e:
        res.reproduced = True
        res.kind = "verification"
        res.detail = str(e)
        return res
    exact = bool(man.get("exact", True))
    ok, metrics, reason = compare_runs(ref, got, exact=exact, min_cosine=man.get("min_cosine"),
                                       min_top1=man.get("min_top1_agreement"), budget_set=Budget(**b).is_set())
    res.metrics = metrics
    res.reproduced = not ok
    res.kind = "verification"
    res.detail = reason if not ok else "the step now verifies: " + _figures(metrics)
    return res


# --------------------------------------------------------------------------------------------------
# Bisect
# --------------------------------------------------------------------------------------------------


@dataclass
class Probe:
    limit: int | None
    ok: bool
    reason: str
    metrics: list[OutputMetrics]
    rewrites: int
    log: list[tuple[int, str, str]]
    model: onnx.ModelProto


@dataclass
class BisectResult:
    status: str  # "found" | "passes" | "no-rewrite" (fails with no rewrite at all)
    total_rewrites: int
    verifications: int
    probes: list[Probe]
    first_bad: tuple[int, str, str] | None = None
    bad: Probe | None = None
    good: Probe | None = None
    changes: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""


def _run_limited(original: onnx.ModelProto, pipeline, limit: int | None, feeds, ref, *, exact: bool,
                 budget: Budget, shapes, seed: int) -> Probe:
    graph = ir.import_model(original)
    ctx = PassContext(opset=ir.graph_opset(graph), verify_feeds=feeds, rewrite_limit=limit, input_shapes=shapes,
                      seed=seed, budget=budget)
    ctx.model_template = original
    try:
        graph = PassManager(pipeline).run(graph, ctx)
    except PassCrashed as e:  # a crash that depends on earlier rewrites is bisected like a wrong result
        return Probe(limit, False, str(e), [], ctx.rewrites, list(ctx.rewrite_log), original)
    graph.toposort()
    model = ir.export_graph(graph, original)
    try:
        ir.check_model(model, "the optimized model")
        got = [Runner(model).run(f) for f in feeds]
    except (GraphoptError, RunError) as e:
        return Probe(limit, False, str(e), [], ctx.rewrites, list(ctx.rewrite_log), model)
    if exact:
        ok, metrics, reason = compare_runs(ref, got, exact=True)
    else:
        cos, top1 = (budget.min_cosine, budget.min_top1_agreement) if budget.is_set() else (0.99, 1.0)
        ok, metrics, reason = compare_runs(ref, got, exact=False, min_cosine=cos, min_top1=top1,
                                           budget_set=budget.is_set())
    return Probe(limit, ok, reason, metrics, ctx.rewrites, list(ctx.rewrite_log), model)


def _model_changes(a: onnx.ModelProto, b: onnx.ModelProto) -> dict[str, list[str]]:
    """Nodes and initializers that differ between two models (by name)."""
    def nodes(m):
        out = {}
        for i, n in enumerate(m.graph.node):
            c = onnx.NodeProto()
            c.CopyFrom(n)
            del c.metadata_props[:]
            out[n.name or f"{n.op_type}#{i}"] = (n.op_type, c.SerializeToString(deterministic=True))
        return out

    def inits(m):
        return {t.name: t.SerializeToString(deterministic=True) for t in m.graph.initializer}

    na, nb = nodes(a), nodes(b)
    ia, ib = inits(a), inits(b)
    users: dict[str, list[str]] = {}
    for n in b.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n.name or n.op_type)
    return {
        "created": [f"{k} ({nb[k][0]})" for k in nb if k not in na],
        "removed": [f"{k} ({na[k][0]})" for k in na if k not in nb],
        "changed": [f"{k} ({nb[k][0]})" for k in nb if k in na and na[k] != nb[k]],
        "weights_changed": [f"{k} (used by {', '.join(users.get(k, [])) or 'nothing'})" for k in ib if k in ia and ia[k] != ib[k]],
        "weights_created": [k for k in ib if k not in ia],
    }


def bisect(model: ir.ModelLike, passes: Any = "O2", *, inputs: Any = None,
           input_shapes: dict[str, Sequence[int]] | None = None, min_cosine: float | None = None,
           seed: int = 0, progress=None) -> BisectResult:
    """Find the first rewrite (``ctx.allow_rewrite`` count) after which the result stops verifying.

    One full run (which must fail), one run with no rewrite at all (which must pass), then a binary search
    over the rewrite limit: ``ceil(log2(rewrites)) + 2`` verifications.  Assumes a deterministic pipeline
    and a monotone failure (once broken, later rewrites do not repair it); both are checked where cheap.
    """
    from .api import _as_feeds_list, resolve_pipeline

    original = ir.load(model)
    pipeline = resolve_pipeline(passes)
    pipeline.validate()
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    feeds = _as_feeds_list(inputs, original) or generate_feeds(original, seed=seed, input_shapes=shapes)
    lossy = any(not get_pass(n).exact for n in pipeline.pass_names())
    budget = Budget(min_cosine=min_cosine)
    exact = not lossy and min_cosine is None
    try:
        ref = [Runner(original).run(f) for f in feeds]
    except RunError as e:
        raise InputError(f"the input model cannot be run, nothing to bisect against: {e}") from None
    probes: list[Probe] = []

    def probe(limit):
        pr = _run_limited(original, pipeline, limit, feeds, ref, exact=exact, budget=budget, shapes=shapes, seed=seed)
        probes.append(pr)
        if progress is not None:
            progress(pr)
        return pr

    full = probe(None)
    total = full.rewrites
    if full.ok:
        return BisectResult("passes", total, len(probes), probes, good=full)
    zero = probe(0)
    if not zero.ok:
        return BisectResult("no-rewrite", total, len(probes), probes, bad=zero,
                            note="the result fails even with --rewrite-limit 0: a pass changes the graph without "
                                 "asking ctx.allow_rewrite, or the model does not survive import/export")
    good, bad = zero, full
    lo, hi = 0, total  # good at lo, bad at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        pr = probe(mid)
        if pr.ok:
            lo, good = mid, pr
        else:
            hi, bad = mid, pr
    entry = full.log[hi - 1] if 0 < hi <= len(full.log) else None
    note = ""
    if bad.log and len(bad.log) >= hi and entry is not None and bad.log[hi - 1] != entry:
        note = "the rewrite log differs between runs: the pipeline is not deterministic, the result may be wrong"
    res = BisectResult("found", total, len(probes), probes, first_bad=entry, bad=bad, good=good, note=note)
    if (bad.limit if bad.limit is not None else total) == hi and good.limit == lo:
        res.changes = _model_changes(good.model, bad.model)
    return res


# --------------------------------------------------------------------------------------------------
# Divergence localisation
# --------------------------------------------------------------------------------------------------


@dataclass
class TensorDiff:
    node: str
    op: str
    tensor: str
    ok: bool
    metrics: OutputMetrics
    order: int


@dataclass
class Divergence:
    compared: int
    shared: int
    first: TensorDiff | None
    diffs: list[TensorDiff]
    inputs_of_first: list[TensorDiff] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    b_producer: str = ""  # B's node for the first diverging tensor, with the pass that made it (lineage)


def _topo_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    g = ir.import_model(model)
    g.toposort()
    names = [n.name for n in g.nodes]
    by_out = {}
    for n in model.graph.node:
        by_out[tuple(n.output)] = n
    out = []
    for n in g.nodes:
        p = by_out.get(tuple(t.name for t in n.outputs))
        if p is not None:
            out.append(p)
    del names
    return out


def localise_divergence(a: onnx.ModelProto, b: onnx.ModelProto, feeds: Feeds, *, min_cosine: float | None = None,
                        chunk: int = 256) -> Divergence:
    """Compare every tensor both models produce under the same name; the first (in A's topological order)
    that differs beyond the exact tolerance (or under ``min_cosine``) is where they diverge."""
    a_nodes = _topo_nodes(a)
    b_produced = {o for n in b.graph.node for o in n.output if o}
    producer: dict[str, tuple[int, onnx.NodeProto]] = {}
    order: list[str] = []
    for i, n in enumerate(a_nodes):
        for o in n.output:
            if o and o in b_produced:
                producer[o] = (i, n)
                order.append(o)
    res = Divergence(0, len(order), None, [])
    # chunks bound the memory of the intermediate tensors kept alive at once
    for s in range(0, len(order), chunk):
        names = order[s:s + chunk]
        try:
            ra = Runner(with_outputs(a, names)).run(feeds, names)
            rb = Runner(with_outputs(b, names)).run(feeds, names)
        except RunError as e:
            raise InputError(f"cannot run the models with their intermediate tensors exposed: {e}") from None
        for name in names:
            i, n = producer[name]
            if name not in ra or name not in rb:
                res.skipped.append(name)
                continue
            m = compare_outputs({name: ra[name]}, {name: rb[name]}, exact=min_cosine is None)[0]
            if min_cosine is not None and m.ok and m.cosine < min_cosine:
                m.ok, m.reason = False, f"cosine {m.cosine:.6f} < {min_cosine}"
            d = TensorDiff(n.name or n.op_type, n.op_type, name, m.ok, m, i)
            res.compared += 1
            res.diffs.append(d)
            if not m.ok and res.first is None:
                res.first = d
                from .lineage import KEY

                bn = next((x for x in b.graph.node if name in x.output), None)
                if bn is not None:
                    made = next((e.value for e in bn.metadata_props if e.key == KEY), "")
                    res.b_producer = f"{bn.name or bn.op_type} ({bn.op_type}" + (f", made by pass '{made}')" if made else ", not changed by graphopt)")
                for inp in n.input:
                    prev = next((x for x in res.diffs if x.tensor == inp), None)
                    if prev is not None:
                        res.inputs_of_first.append(prev)
        del ra, rb
        if res.first is not None:
            break
    return res


def divergence_between(a: ir.ModelLike, b: ir.ModelLike, *, inputs: Any = None,
                       input_shapes: dict[str, Sequence[int]] | None = None, min_cosine: float | None = None,
                       seed: int = 0) -> Divergence:
    """:func:`localise_divergence` on the first input sample (the user's, or generated from A's signature)."""
    from .api import _as_feeds_list

    ma, mb = ir.load(a), ir.load(b)
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    feeds = _as_feeds_list(inputs, ma) or generate_feeds(ma, seed=seed, input_shapes=shapes)
    return localise_divergence(ma, mb, feeds[0], min_cosine=min_cosine)


def divergence_json(d: Divergence) -> dict:
    from .report import _jsonable

    def one(t: TensorDiff) -> dict:
        return {"node": t.node, "op": t.op, "tensor": t.tensor, "ok": t.ok, "order": t.order, **t.metrics.__dict__}

    return _jsonable({"compared": d.compared, "shared": d.shared, "skipped": d.skipped,
                      "first_divergence": one(d.first) if d.first else None, "b_producer": d.b_producer,
                      "inputs_of_first": [one(t) for t in d.inputs_of_first]})


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def replay_cli(folder: str, model: str | None, output: str | None, con) -> None:
    """``graphopt optimize --replay DIR``: exit 1 (verification) or 3 (crash) when the failure reproduces."""
    if model is not None:
        raise InputError("--replay takes the model from the reproducer folder; give no MODEL")
    res = replay(folder)
    print_replay(res, con)
    if output is not None and res.model is not None:
        ir.save(res.model, output)
        con.print(f"wrote {output}", markup=False)
    if res.reproduced:
        raise SystemExit(3 if res.kind == "crash" else 1)


def register_cli(main) -> None:
    import click

    from .cli import CONTEXT, _console, _input_shapes, _load_plugins

    @main.command(context_settings=CONTEXT)
    @click.argument("model", type=click.Path(path_type=str))
    @click.option("-O", "level", type=click.Choice(["0", "1", "2", "3"]), default=None, help="Preset to bisect (default -O2).")
    @click.option("--passes", "pipeline", default=None, help="The pipeline to bisect.")
    @click.option("--inputs", type=click.Path(path_type=str), default=None, help="Verification inputs (.npz).")
    @click.option("--input-shape", multiple=True, help="NAME:DIMS for symbolic dims (repeatable).")
    @click.option("--load-plugin", "plugins", multiple=True, help="A module or .py file that registers passes.")
    @click.option("--min-cosine", type=float, default=None, help="Judge by cosine instead of the exact tolerance.")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.option("--debug", is_flag=True)
    def bisect_cmd(model, level, pipeline, inputs, input_shape, plugins, min_cosine, seed, as_json, debug) -> None:
        """Find the first rewrite that breaks equivalence (binary search over --rewrite-limit)."""
        if level is not None and pipeline is not None:
            raise InputError("give either -O or --passes, not both")
        _load_plugins(plugins)
        passes = pipeline if pipeline is not None else f"O{level or '2'}"
        con = _console()

        def progress(pr: Probe) -> None:
            if as_json:
                return
            lim = "none" if pr.limit is None else str(pr.limit)
            from rich.markup import escape

            state = "[green]ok[/green]" if pr.ok else f"[red]FAILS[/red] {escape(pr.reason)}"
            con.print(f"  rewrite-limit {lim:>5} ({pr.rewrites} rewrites applied): {state}")

        if not as_json:
            from rich.markup import escape

            con.print(f"bisect: {escape(model)} with '{escape(passes)}'")
        res = bisect(model, passes, inputs=inputs, input_shapes=_input_shapes(input_shape), min_cosine=min_cosine,
                     seed=seed, progress=progress)
        bound = math.log2(res.total_rewrites) + 2 if res.total_rewrites > 0 else 2
        if as_json:
            click.echo(json.dumps(_bisect_json(res, bound), indent=2))
        else:
            _print_bisect(res, bound, con)
        if res.status != "passes":
            raise SystemExit(1)

    bisect_cmd.name = "bisect"
    main.add_command(bisect_cmd, "bisect")


def _bisect_json(res: BisectResult, bound: float) -> dict:
    from .report import _jsonable

    d = {"status": res.status, "total_rewrites": res.total_rewrites, "verifications": res.verifications,
         "log2_bound": bound, "note": res.note,
         "probes": [{"limit": p.limit, "ok": p.ok, "reason": p.reason, "rewrites": p.rewrites} for p in res.probes]}
    if res.first_bad is not None:
        idx, pname, desc = res.first_bad
        d["first_bad"] = {"index": idx, "pass": pname, "description": desc}
        d["changes"] = res.changes
        d["figures"] = [m.__dict__ for m in res.bad.metrics] if res.bad else []
    return _jsonable(d)


def _print_bisect(res: BisectResult, bound: float, con) -> None:
    from rich.markup import escape as e

    if res.status == "passes":
        con.print(f"the full pipeline verifies ({res.total_rewrites} rewrites): nothing to bisect")
    elif res.status == "no-rewrite":
        con.print(f"[red]{e(res.note)}[/red]")
        failing = res.bad
        if failing is not None:
            con.print(f"  figures: {e(failing.reason)}")
    else:
        idx, pname, desc = res.first_bad or (0, "?", "")
        k = 0  # which rewrite of this pass's run it is
        for j in range(idx, 0, -1):
            if res.probes[0].log[j - 1][1] != pname:
                break
            k += 1
        con.print(f"first bad rewrite: [bold]#{idx}[/bold] of {res.total_rewrites} (rewrite {k} of that run of the pass), "
                  f"pass [bold]{e(pname)}[/bold]: {e(desc)}")
        for k in ("created", "removed", "changed", "weights_changed", "weights_created"):
            if res.changes.get(k):
                shown = res.changes[k][:8]
                more = f" (+{len(res.changes[k]) - 8} more)" if len(res.changes[k]) > 8 else ""
                con.print(f"  {k.replace('_', ' ')}: {e(', '.join(shown))}{more}")
        if res.bad is not None:
            con.print(f"  with rewrite #{idx}: {e(res.bad.reason)}")
            for m in res.bad.metrics:
                con.print(f"    {e(m.name)}: max_abs={m.max_abs:.3g} rel_l2={m.rel_l2:.3g} cosine={m.cosine:.6f}"
                          + ("" if m.top1_agreement is None else f" top1={m.top1_agreement:.3f}"))
        if res.good is not None:
            con.print(f"  without it (rewrite-limit {res.good.limit}): verifies ({e(_figures(res.good.metrics))})")
    if res.note and res.status == "found":
        con.print(f"[yellow]note[/yellow]: {e(res.note)}")
    con.print(f"verifications: {res.verifications} (log2({res.total_rewrites}) + 2 = {bound:.1f})")


def print_replay(res: ReplayResult, con) -> None:
    from rich.markup import escape as e

    con.print(f"replay: pass '{e(res.pass_text)}' on the recorded model ({res.nodes} nodes, {res.samples} input sample(s))")
    con.print(f"  recorded: {res.kind}: {e(res.recorded)}")
    if res.reproduced:
        con.print(f"  [red]reproduced[/red]: {e(res.detail)}")
    else:
        con.print(f"  [green]not reproduced[/green]: {e(res.detail)}")


def print_divergence(d: Divergence, con) -> None:
    from rich.markup import escape as e

    con.print(f"intermediates: {d.compared} tensor(s) shared by name compared (of {d.shared})"
              + (f", {len(d.skipped)} could not be read" if d.skipped else ""))
    if d.first is None:
        con.print("  no shared tensor diverges")
        return
    f = d.first
    m = f.metrics
    con.print(f"  [red]first divergence[/red]: node '{e(f.node)}' ({f.op}), tensor '{e(f.tensor)}' "
              f"(#{f.order + 1} in topological order)")
    tol = f" tolerance={m.tolerance:.3g}" if m.tolerance is not None else ""
    con.print(f"    max_abs={m.max_abs:.3g}{tol} max_rel={m.max_rel:.3g} rel_l2={m.rel_l2:.3g} cosine={m.cosine:.6f}"
              + (f" ({e(m.reason)})" if m.reason else ""))
    if d.b_producer:
        con.print(f"    in B it is produced by {e(d.b_producer)}")
    for i in d.inputs_of_first:
        con.print(f"    input '{e(i.tensor)}' (from {e(i.node)}): {'matches' if i.ok else 'differs'} (max_abs={i.metrics.max_abs:.3g})")
    if not d.inputs_of_first:
        con.print("    its inputs are not shared by name (graph inputs, weights, or renamed by a pass)")
