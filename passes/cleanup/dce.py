"""``dce``: dead-code elimination.

Removes nodes none of whose outputs reach a graph output, initializers and value_info nobody uses, in
subgraph bodies too.  Graph inputs and outputs are never removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, ir, register_pass
from graphopt.report import all_nodes


def _count(graph: gs.Graph) -> tuple[int, int]:
    nodes = list(all_nodes(graph))
    consts = {id(t) for t in ir.tensor_map(graph).values() if isinstance(t, gs.Constant)}
    for n in nodes:
        for a in n.attrs.values():
            if isinstance(a, gs.Graph):
                consts |= {id(t) for t in ir.tensor_map(a).values() if isinstance(t, gs.Constant)}
    return len(nodes), len(consts)


def _dead_nodes(graph: gs.Graph) -> list[gs.Node] | None:
    """The nodes ``cleanup()`` would remove, in graph order, when the graph is a plain one: no graph
    input has a producer, and there are no subgraphs or functions (cleanup walks those itself);
    None for any other graph.  A walk from the outputs, ~30x cheaper than gs's cleanup."""
    if graph.functions or any(t.inputs for t in graph.inputs):
        return None
    live: set[int] = set()
    stack = [t for t in graph.outputs]
    while stack:
        for p in stack.pop().inputs:
            if id(p) not in live:
                live.add(id(p))
                stack.extend(p.inputs)
    dead = []
    for n in graph.nodes:
        if id(n) not in live:
            dead.append(n)
        for a in n.attrs.values():
            if isinstance(a, gs.Graph) or (isinstance(a, list) and a and isinstance(a[0], gs.Graph)):
                return None
    return dead


@register_pass
class DeadCodeElimination(Pass):
    name = "dce"
    idempotent = True
    description = "remove nodes, initializers and value_info that no graph output depends on"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # One cleanup is one rewrite for the opt-bisect budget. Whether anything is dead is only known
        # after cleanup, so check the budget first and count the rewrite once something was removed.
        if ctx.rewrite_limit is not None and ctx.rewrites >= ctx.rewrite_limit:
            return PassResult(False, skipped=["graph: rewrite limit reached"])
        dead = _dead_nodes(graph)
        if dead is not None and not dead:
            return PassResult(False, {"nodes_removed": 0, "initializers_removed": 0})
        n0, c0 = _count(graph)
        if dead is not None:  # what cleanup does to a plain graph: keep the live nodes, unlink the others
            gone = set(map(id, dead))
            graph.nodes = [n for n in graph.nodes if id(n) not in gone]
            for n in dead:
                n.inputs.clear()
                n.outputs.clear()
        else:
            graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
        n1, c1 = _count(graph)
        changed = (n0, c0) != (n1, c1)
        if changed:
            ctx.allow_rewrite(f"remove {n0 - n1} dead node(s) and {c0 - c1} unused initializer(s)")
        return PassResult(changed, {"nodes_removed": n0 - n1, "initializers_removed": c0 - c1})
