"""Recording the passes as they run, so that a crash or a failed verification can be written as a
reproducer (:mod:`graphopt.trust` writes, replays and bisects them).

Apart from :mod:`graphopt.trust` so that a run that goes well, which only records, does not import the
reproducer, replay, bisection and ``--verify each`` machinery: every ``optimize`` with an output traces,
and creating that module's classes alone took some 10 ms of a first call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .manager import Instrument
from .pipeline import format_pass

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from .pass_base import Pass, PassContext
    from .trust import Snapshot


@dataclass
class Step:
    text: str  # the pass as written, with options
    rewrites_before: int
    iteration: int | None = None


@dataclass
class Failure:
    kind: str  # "crash" | "verification"
    pass_text: str
    detail: str
    rewrites_before: int
    exact: bool = True
    min_cosine: float | None = None
    min_top1_agreement: float | None = None
    snapshot: Snapshot | None = None  # the model before the failing pass (None: the input model)
    steps: list[str] = field(default_factory=list)  # the pipeline to re-run on that model


class TraceInstrument(Instrument):
    """Records the passes as they run and the first crash, for :func:`graphopt.trust.write_reproducer`."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.failures: list[Failure] = []
        self.rewrite_limit: int | None = None

    def run_begin(self, graph: gs.Graph, ctx: PassContext) -> None:
        self.rewrite_limit = ctx.rewrite_limit

    def before_pass(self, p: Pass, graph: gs.Graph, ctx: PassContext) -> None:
        self.steps.append(Step(format_pass(p), ctx.rewrites))

    def on_crash(self, p: Pass, graph: gs.Graph, ctx: PassContext, exc: BaseException) -> gs.Graph | None:
        step = self.steps[-1]
        self.failures.append(Failure("crash", step.text, f"{type(exc).__name__}: {exc}", 0,
                                     steps=[s.text for s in self.steps]))
        return None

    def pipeline_so_far(self) -> str:
        return ",".join(s.text for s in self.steps)


def default_repro_dir(output: str | os.PathLike) -> Path:
    """``out/model.opt.onnx`` -> ``out/model.opt.repro``."""
    p = Path(output)
    return p.with_name(p.stem + ".repro")
