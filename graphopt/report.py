"""The change report: one record per pass run, plus model and verification summaries.

JSON for machines (``--report``), a rich table for people.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


def all_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Every node, subgraph bodies included (a list: it runs after every pass, and a generator
    costs a resumption per node)."""
    out: list[gs.Node] = []
    for n in graph.nodes:
        out.append(n)
        if not n.attrs:
            continue
        for a in n.attrs.values():
            if isinstance(a, gs.Graph):
                out.extend(all_nodes(a))
            elif isinstance(a, (list, tuple)) and a and isinstance(a[0], gs.Graph):  # (a list holds one kind)
                for g in a:
                    if isinstance(g, gs.Graph):
                        out.extend(all_nodes(g))
    return out


def op_histogram(graph: gs.Graph, nodes: list[gs.Node] | None = None) -> Counter:
    """Op counts, subgraph bodies included; ``nodes`` is ``all_nodes(graph)`` when the caller has it."""
    return Counter((n.domain + "." if n.domain not in (None, "", "ai.onnx") else "") + n.op
                   for n in (all_nodes(graph) if nodes is None else nodes))


def constant_bytes(graph: gs.Graph) -> int:
    """Bytes of constant tensors, without loading lazy weights."""
    const = gs.Constant
    consts = {id(t): t for n in graph.nodes for t in n.inputs if isinstance(t, const)}  # (graph.tensors() is ~10x slower)
    consts.update((id(t), t) for t in graph.outputs if isinstance(t, const))
    total = 0
    for t in consts.values():
        nb = getattr(t._values, "nbytes", None)
        total += int(nb) if nb is not None else 0
    return total


@dataclass
class PassRecord:
    name: str  # the pass as written in the pipeline, with its options
    changed: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    const_bytes_before: int
    const_bytes_after: int
    op_delta: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    iteration: int | None = None  # fixpoint iteration, 1-based
    status: str = "ok"  # ok | rolled-back (--verify each) | crashed (rolled back by --verify each)
    detail: str = ""


@dataclass
class Report:
    input: str = ""
    output: str | None = None
    pipeline: str = ""
    started: float = field(default_factory=time.time)
    passes: list[PassRecord] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reproducer: str | None = None  # folder written on a crash, failed verification or rollback

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return _jsonable(d)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def pass_summary(self) -> dict[str, dict[str, Any]]:
        """Per pass name: runs, changes, stats summed over runs, and the refusal reasons and notes of its
        last run (in a fixpoint every iteration meets the same refusals again; the last run has them once)."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.passes:
            base = r.name.split("{")[0]
            d = out.setdefault(base, {"runs": 0, "changed": 0, "seconds": 0.0, "stats": Counter(), "skipped": Counter(), "notes": []})
            d["runs"] += 1
            d["changed"] += int(r.changed)
            d["seconds"] += r.seconds
            d["stats"].update(r.stats)
            d["skipped"] = Counter(_reason_key(s) for s in r.skipped)
            if r.notes:
                d["notes"] = list(r.notes)
        return out


def _reason_key(s: str) -> str:
    """Group refusal reasons by their text after the node name ('node X: reason' -> 'reason')."""
    return s.split(": ", 1)[1] if ": " in s else s


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    return x


def model_summary(graph: gs.Graph, model_bytes: int | None = None,
                  facts: tuple[Counter, int] | None = None) -> dict[str, Any]:
    """Node count, constant bytes, model bytes and op histogram.  ``facts``: the graph's op histogram
    and constant bytes, when the caller has them (:meth:`graphopt.manager.PassManager.summary`)."""
    hist, nbytes = facts if facts is not None else (op_histogram(graph), constant_bytes(graph))
    return {
        "nodes": sum(hist.values()),
        "const_bytes": nbytes,
        "model_bytes": model_bytes,
        "ops": dict(sorted(hist.items())),
    }


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
