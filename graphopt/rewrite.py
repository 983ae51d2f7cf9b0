"""Small helpers for pattern passes on the gs IR (match / check / rewrite).

Keep passes free of name matching: patterns look at op types, attributes and tensor objects.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from . import ir


def consumers(t: gs.Tensor) -> list[gs.Node]:
    """Nodes that read ``t`` (gs keeps this list up to date)."""
    return list(t.outputs)


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def is_graph_output(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(o is t for o in graph.outputs)


def single_use(graph: gs.Graph, t: gs.Tensor) -> bool:
    """True if ``t`` feeds exactly one node input and is not a graph output (safe to fuse away)."""
    if is_graph_output(graph, t):
        return False
    uses = sum(sum(1 for i in n.inputs if i is t) for n in t.outputs)
    return uses == 1


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    p = producer(t)
    if p is not None and p.op == "Constant" and "value" in p.attrs:
        v = p.attrs["value"]
        return np.asarray(v.values) if isinstance(v, gs.Constant) else np.asarray(v)
    return None


def is_const(t: gs.Tensor | None) -> bool:
    return const_value(t) is not None if not isinstance(t, gs.Constant) else True


def weight_used_only_by(t: gs.Tensor, nodes: Iterable[gs.Node]) -> bool:
    """A shared initializer must not be rewritten in place: check nothing outside ``nodes`` reads it."""
    allowed = {id(n) for n in nodes}
    return all(id(n) in allowed for n in t.outputs)


def replace_uses(old: gs.Tensor, new: gs.Tensor, graph: gs.Graph) -> None:
    """Point every reader of ``old`` (and graph outputs) at ``new``."""
    for n in list(old.outputs):
        for i, inp in enumerate(n.inputs):
            if inp is old:
                n.inputs[i] = new
    for i, o in enumerate(graph.outputs):
        if o is old:
            graph.outputs[i] = new


def bypass(node: gs.Node, graph: gs.Graph, keep: int = 0) -> bool:
    """Remove a one-output node that passes input ``keep`` through unchanged.

    If its output is a graph output, the producer of the input is re-pointed instead so the output
    name survives; refuses (returns False) when that is impossible (the input is a graph input or a
    constant, or it is itself a graph output).
    """
    src, dst = node.inputs[keep], node.outputs[0]
    if is_graph_output(graph, dst):
        p = producer(src)
        if p is None or is_graph_output(graph, src) or isinstance(src, gs.Constant) or len(src.outputs) != 1:
            return False
        # let the producer write the output tensor directly
        idx = next(i for i, o in enumerate(p.outputs) if o is src)
        node.outputs.clear()
        node.inputs.clear()
        p.outputs[idx] = dst
        return True
    replace_uses(dst, src, graph)
    node.outputs.clear()
    node.inputs.clear()
    return True


_NAME_INDEX: dict[int, set[str] | None] = {}  # id(graph) -> its taken names (None: not collected yet)


def _taken_names(graph: gs.Graph) -> set[str]:
    return ir.tensor_map(graph).keys() | {n.name for n in graph.nodes}


@contextlib.contextmanager
def name_index(graph: gs.Graph):
    """Inside this block :func:`derived_name` looks names up in a set of ``graph``'s names made once
    (at its first call), which grows with every name it hands out, instead of collecting them from
    the whole graph on every call (42 ms of efficientnet_b0's -O2, one call per new weight).  For
    loops whose rewrites bring in new names through :func:`derived_name` only, reusing the others
    (the fusions): a name made up any other way inside the block could be handed out again.  A name
    that leaves the graph inside the block stays taken."""
    key = id(graph)
    if key in _NAME_INDEX:
        yield
        return
    _NAME_INDEX[key] = None
    try:
        yield
    finally:
        del _NAME_INDEX[key]


def derived_name(graph: gs.Graph, base: str, suffix: str) -> str:
    """A new tensor/node name derived from an old one, unique in ``graph``."""
    key = id(graph)
    taken = _NAME_INDEX.get(key)
    if taken is None:
        taken = _taken_names(graph)
        if key in _NAME_INDEX:
            _NAME_INDEX[key] = taken
    name = f"{base}_{suffix}"
    i = 1
    while name in taken:
        i += 1
        name = f"{base}_{suffix}{i}"
    taken.add(name)
    return name
