"""The pass manager: runs a pipeline over a ``gs.Graph`` with instruments around every pass.

Instruments (after TVM's PassInstrument) see every pass before and after it runs.  ``after_pass`` may
return a replacement graph: that is how ``--verify each`` rolls a bad pass back.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Iterable

import onnx_graphsurgeon as gs

from . import ir, lineage
from .errors import GraphoptError
from .pass_base import Pass, PassContext, PassResult
from .pipeline import Element, Fixpoint, Pipeline, PresetRef, format_pass, parse_pipeline
from .report import PassRecord, Report, all_nodes, constant_bytes, op_histogram


class PassCrashed(GraphoptError):
    """A pass raised an exception: a bug in that pass, reported with its name."""

    exit_code = 3

    def __init__(self, pass_name: str, exc: BaseException):
        super().__init__(f"pass '{pass_name}' crashed: {type(exc).__name__}: {exc}")
        self.pass_name = pass_name
        self.exc = exc


class Instrument:
    """Hooks around each pass. Subclass and override what you need."""

    def run_begin(self, graph: gs.Graph, ctx: PassContext) -> None: ...

    def before_pass(self, p: Pass, graph: gs.Graph, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, graph: gs.Graph, ctx: PassContext, record: PassRecord) -> gs.Graph | None:
        """Return a graph to continue with instead of ``graph`` (a rollback), or None."""
        return None

    def on_crash(self, p: Pass, graph: gs.Graph, ctx: PassContext, exc: BaseException) -> gs.Graph | None:
        """Return a graph to continue with (recovering from the crash), or None to re-raise."""
        return None

    def run_end(self, graph: gs.Graph, ctx: PassContext) -> None: ...


class _Node:
    """A pipeline element with its pass instances built once.  Building the tree checks what
    :meth:`Pipeline.validate` checks, in the same order, so the manager does not validate first."""

    def __init__(self, el: Element):
        if isinstance(el, PresetRef):
            self.kind = "seq"
            self.children = [_Node(e) for e in el.expand().elements]
        elif isinstance(el, Fixpoint):
            el.check()
            self.kind = "fixpoint"
            self.max_iter = el.max_iter
            self.children = [_Node(e) for e in el.body]
        else:
            self.kind = "pass"
            self.pass_ = el.instantiate()
            self.text = format_pass(self.pass_)
            self.idempotent = bool(getattr(self.pass_, "idempotent", False))
            # the graph generation this pass left behind on its last run, if a run on that generation
            # would change nothing: it found nothing to do, or changed the graph and is idempotent
            self.done_at: int | None = None


class PassManager:
    """Runs a pipeline.

    >>> pm = PassManager("fold-constants,dce")
    >>> graph = pm.run(graph, ctx)          # doctest: +SKIP
    """

    def __init__(self, pipeline: str | Pipeline, instruments: Iterable[Instrument] = ()):
        self.pipeline = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        self.instruments = list(instruments)
        self._root = [_Node(e) for e in self.pipeline.elements]
        self.report = Report(pipeline=str(self.pipeline))
        self._cached: tuple | None = None
        self._generation = 0  # bumped whenever the graph changes

    @property
    def passes(self) -> list[Pass]:
        out: list[Pass] = []

        def walk(nodes):
            for n in nodes:
                if n.kind == "pass":
                    out.append(n.pass_)
                else:
                    walk(n.children)

        walk(self._root)
        return out

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> gs.Graph:
        """Run the pipeline on ``graph`` (in place where no pass is rolled back) and return the result."""
        ctx = ctx or PassContext()
        for ins in self.instruments:
            ins.run_begin(graph, ctx)
        graph, _ = self._run_seq(self._root, graph, ctx, None)
        for ins in self.instruments:
            ins.run_end(graph, ctx)
        return graph

    def _run_seq(self, nodes: list[_Node], graph: gs.Graph, ctx: PassContext, it: int | None) -> tuple[gs.Graph, bool]:
        changed = False
        for n in nodes:
            if n.kind == "pass":
                if it is not None and it > 1 and n.done_at == self._generation:
                    continue  # in a fixpoint: nothing changed since this pass's last run, which left nothing to do
                g0 = self._generation
                graph, c = self._run_pass(n, graph, ctx, it)
                # (a changed graph that an instrument then replaced is not the one this pass left)
                n.done_at = self._generation if not c or (n.idempotent and self._generation == g0 + 1) else None
            elif n.kind == "seq":
                graph, c = self._run_seq(n.children, graph, ctx, it)
            else:
                c = False
                for i in range(1, n.max_iter + 1):
                    graph, ci = self._run_seq(n.children, graph, ctx, i)
                    c = c or ci
                    if not ci:
                        break
                else:
                    self.report.notes.append(f"fixpoint stopped after {n.max_iter} iterations without converging")
            changed = changed or c
        return graph, changed

    def summary(self, graph: gs.Graph) -> tuple[Counter, int]:
        """The op histogram and constant bytes of ``graph`` (for the report's model summaries), from
        the same cache as the passes' bookkeeping: before the run, the first pass reuses them; after
        it, they are the last change's."""
        hist, nbytes, _ = self._facts(graph)
        return hist, nbytes

    def _facts(self, graph: gs.Graph):
        """Op histogram, constant bytes and lineage signatures of ``graph``, computed once per change:
        a pass that reports no change leaves the graph as it was, so the next pass reuses them."""
        if self._cached is None or self._cached[0] is not graph:
            nodes = all_nodes(graph)  # (one walk for both)
            self._cached = (graph, op_histogram(graph, nodes), constant_bytes(graph), lineage.snapshot(graph, nodes))
        return self._cached[1:]

    def _run_pass(self, n: _Node, graph: gs.Graph, ctx: PassContext, it: int | None) -> tuple[gs.Graph, bool]:
        p = n.pass_
        for ins in self.instruments:
            ins.before_pass(p, graph, ctx)
        hist0, bytes0, sigs = self._facts(graph)
        ctx.current_pass = p.name
        t0 = time.perf_counter()
        try:
            result = p.run(graph, ctx)
        except GraphoptError:
            raise
        except Exception as e:  # a bug in the pass: let an instrument recover, else report it by name
            for ins in self.instruments:
                g = ins.on_crash(p, graph, ctx, e)
                if g is not None:
                    self._cached = None
                    self._generation += 1
                    rec = PassRecord(n.text, False, time.perf_counter() - t0, sum(hist0.values()), sum(hist0.values()),
                                     bytes0, bytes0, iteration=it, status="crashed",
                                     detail=f"{type(e).__name__}: {e} (rolled back)")
                    self.report.passes.append(rec)
                    return g, False
            raise PassCrashed(p.name, e) from e
        finally:
            ctx.current_pass = None
        dt = time.perf_counter() - t0
        if not isinstance(result, PassResult):
            raise PassCrashed(p.name, TypeError(f"run() returned {type(result).__name__}, not PassResult"))
        nodes = all_nodes(graph) if result.changed else None
        hist1 = op_histogram(graph, nodes) if result.changed else hist0
        delta = Counter(hist1)
        delta.subtract(hist0)
        rec = PassRecord(
            name=n.text,
            changed=bool(result.changed),
            seconds=dt,
            nodes_before=sum(hist0.values()),
            nodes_after=sum(hist1.values()),
            const_bytes_before=bytes0,
            const_bytes_after=constant_bytes(graph) if result.changed else bytes0,
            op_delta={k: v for k, v in sorted(delta.items()) if v},
            stats=dict(result.stats),
            skipped=list(result.skipped),
            notes=list(result.notes),
            iteration=it,
        )
        if result.changed:
            ctx.cache.clear()  # analyses of the old graph are stale
            ir.mark_changed(graph)
            self._generation += 1
            _, sigs1 = lineage.mark(graph, sigs, p.name, nodes)
            self._cached = (graph, hist1, rec.const_bytes_after, sigs1)
        self.report.passes.append(rec)
        for ins in self.instruments:
            g = ins.after_pass(p, graph, ctx, rec)
            if g is not None:
                graph = g
                ctx.cache.clear()
                self._cached = None
                self._generation += 1
        return graph, rec.changed and rec.status == "ok"
