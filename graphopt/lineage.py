"""Lineage: which pass created or last changed each node.

The pass manager takes a cheap signature of every node before a pass and, when the pass reports a
change, tags the nodes that are new or whose signature changed with the pass name.  The tags live on
the ``gs.Node`` objects (onnx-graphsurgeon 0.6.1 nodes carry no metadata of their own) and go into
``NodeProto.metadata_props`` on export (``graphopt.pass`` = the last pass that created or changed the
node, ``graphopt.passes`` = the whole chain when more than one pass touched it).  ``metadata_props`` on
nodes is part of ONNX since IR 10 / onnx 1.16; older readers keep it as an unknown field, onnx.checker
and onnxruntime accept it at any IR version.  Import reads the tags back, so re-optimizing a model and
restoring a snapshot keep the history.  Passes do nothing for lineage.
"""
from __future__ import annotations

from typing import Any

import onnx
import onnx_graphsurgeon as gs

from .importer import TrackedValues
from .report import all_nodes

KEY = "graphopt.pass"
CHAIN_KEY = "graphopt.passes"
_ATTR = "_graphopt_lineage"


_PLAIN = frozenset((int, float, str, bool, bytes, type(None)))


def _attr_key(v: Any) -> Any:
    if type(v) in _PLAIN:
        return v
    if isinstance(v, (list, tuple)):
        # An attribute list holds one kind (ints, floats, strings, tensors or graphs): plain values
        # (pads, perm, axes...) compare by content, the others by identity.
        if not v or type(v[0]) in _PLAIN:
            return tuple(v)
        return tuple(_attr_key(x) for x in v)
    return id(v)  # tensors, arrays, subgraphs: identity (a pass that replaces them makes a new object)


_Constant = gs.Constant


_ORIGIN = "_graphopt_lazy"  # a Constant's entry: the lazy values it held when a signature was taken


def _values_id(t: gs.Constant) -> int:
    """Which values ``t`` holds.  Lazy values count as the same values once loaded: reading a weight
    is no change to it (:class:`graphopt.importer.TrackedValues` remembers what it loaded)."""
    v = t._values
    d = t.__dict__
    if isinstance(v, TrackedValues):
        d[_ORIGIN] = v
        return id(v)
    o = d.get(_ORIGIN)
    if o is not None:
        ref = o.loaded
        if ref is not None and ref() is v:
            return id(o)
    return id(v)


def _signature(n: gs.Node) -> tuple:
    """What a pass can change of ``n``; compared with ``==`` only (the lists need no hashing)."""
    ins = n.inputs
    attrs = n.attrs
    return (
        n.op,
        n.domain,
        tuple(map(id, ins)),
        # a Constant whose values were replaced in place (t.values = ...) counts as a change of its
        # users; one whose lazy values were only loaded (read) does not
        [_values_id(t) for t in ins if type(t) is _Constant],
        tuple(map(id, n.outputs)),
        [(k, v if type(v) in _PLAIN else _attr_key(v)) for k, v in attrs.items()] if attrs else None,
    )


def snapshot(graph: gs.Graph, nodes: list[gs.Node] | None = None) -> dict[int, tuple[gs.Node, tuple]]:
    """Node signatures before a pass. Holds the nodes so their ids cannot be reused during the pass.
    ``nodes`` is ``all_nodes(graph)`` when the caller has it."""
    return {id(n): (n, _signature(n)) for n in (all_nodes(graph) if nodes is None else nodes)}


def mark(graph: gs.Graph, before: dict[int, tuple[gs.Node, tuple]], pass_name: str,
         nodes: list[gs.Node] | None = None) -> tuple[int, dict[int, tuple[gs.Node, tuple]]]:
    """Tag the nodes that ``pass_name`` created or changed; returns how many, and the snapshot of the
    graph as it is now (so the next pass need not take it again)."""
    count = 0
    after: dict[int, tuple[gs.Node, tuple]] = {}
    for n in (all_nodes(graph) if nodes is None else nodes):
        sig = _signature(n)
        after[id(n)] = (n, sig)
        old = before.get(id(n))
        if old is not None and old[0] is n and old[1] == sig:
            continue
        chain = getattr(n, _ATTR, None) or []
        if not chain or chain[-1] != pass_name:
            setattr(n, _ATTR, chain + [pass_name])
        count += 1
    return count, after


def passes_of(node: gs.Node) -> list[str]:
    return list(getattr(node, _ATTR, None) or [])


def _pairs(graph: gs.Graph, proto: onnx.GraphProto):
    """(gs node, NodeProto) pairs, subgraphs included; the exporter and importer keep node order."""
    if len(graph.nodes) != len(proto.node):
        return
    for n, p in zip(graph.nodes, proto.node):
        yield n, p
        yield from _subgraph_pairs(n, p)


def _subgraph_pairs(n: gs.Node, p: onnx.NodeProto):
    """:func:`_pairs` of the subgraphs of node ``n`` (imported from ``p``)."""
    if any(isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], gs.Graph))
           for v in n.attrs.values()):
        pattrs = {a.name: a for a in p.attribute}
        for k, v in n.attrs.items():
            a = pattrs.get(k)
            if a is None:
                continue
            if isinstance(v, gs.Graph) and a.type == onnx.AttributeProto.GRAPH:
                yield from _pairs(v, a.g)
            elif isinstance(v, (list, tuple)) and a.type == onnx.AttributeProto.GRAPHS:
                for sg, gp in zip(v, a.graphs):
                    if isinstance(sg, gs.Graph):
                        yield from _pairs(sg, gp)


def to_proto(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    """Write the tags of ``graph``'s nodes into the exported ``proto`` (metadata_props)."""
    for n, p in _pairs(graph, proto):
        chain = getattr(n, _ATTR, None)
        if not chain:
            continue
        keep = [e for e in p.metadata_props if e.key not in (KEY, CHAIN_KEY)]
        del p.metadata_props[:]
        p.metadata_props.extend(keep)
        p.metadata_props.add(key=KEY, value=chain[-1])
        if len(chain) > 1:
            p.metadata_props.add(key=CHAIN_KEY, value=",".join(chain))


def _imported_pairs(pairs: list):
    """:func:`_pairs` from the importer's ``(node, NodeProto, plain)`` list (a plain node has no
    subgraph)."""
    for n, p, plain in pairs:
        yield n, p
        if not plain:
            yield from _subgraph_pairs(n, p)


def from_proto(graph: gs.Graph, proto: onnx.GraphProto, pairs: list | None = None) -> None:
    """Read tags written by :func:`to_proto` back onto the imported ``graph``.  ``pairs``: from
    :func:`graphopt.importer.import_onnx`, when at hand."""
    for n, p in (_pairs(graph, proto) if pairs is None else _imported_pairs(pairs)):
        if not len(p.metadata_props):
            continue
        meta = {e.key: e.value for e in p.metadata_props}
        if CHAIN_KEY in meta:
            setattr(n, _ATTR, [x for x in meta[CHAIN_KEY].split(",") if x])
        elif KEY in meta:
            setattr(n, _ATTR, [meta[KEY]])


def of_model(model: onnx.ModelProto) -> dict[str, str]:
    """{node name: last pass} for the top-level nodes of an exported model (for reports and tests)."""
    out = {}
    for p in model.graph.node:
        for e in p.metadata_props:
            if e.key == KEY:
                out[p.name or p.output[0]] = e.value
    return out
