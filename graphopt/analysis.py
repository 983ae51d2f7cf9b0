"""Graph analyses as networkx views, cached per graph generation in ``ctx.cache``.

Views are keyed by node indices into a snapshot of ``graph.nodes`` (``("n", i)``) and by tensor names
(``("t", name)``), never by gs objects, so nothing stale survives a pass that changes the graph: the
pass manager clears ``ctx.cache`` whenever a pass reports a change.

- :func:`dataflow`: the use-def graph (node -> tensor -> node).
- :func:`channel_groups`: channel dependency groups for structured pruning.  Every Conv / Gemm /
  MatMul-with-constant-weight output opens a *channel space*; channel-wise ops carry it on; elementwise
  joins of two channel tensors (residual ``Add``, gating ``Mul``) unify their spaces; ``Concat`` on the
  channel axis lays spaces side by side.  The connected components of the unification graph are the
  dependency groups: removing channel ``c`` means removing it from every space of the group at once.
  Anything the analysis does not understand (Reshape, Transpose, a graph output, a subgraph) blocks
  the spaces it touches, and a blocked group is left alone.
- :func:`flops` and :func:`param_count`: multiply-accumulate counts of Conv / Gemm / MatMul and the
  number of constant weights, for pruning reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from . import ir

if TYPE_CHECKING:
    import networkx as nx
# networkx is imported where it is used: it costs ~0.2 s to import, which every command-line run
# would pay for (the pass registry imports the pruning passes, which import this module).

# ops that act on each channel independently and keep the layout (extra inputs must be scalars)
CHANNELWISE = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
    "Softsign", "Erf", "Gelu", "Identity", "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal",
    "Mish", "Celu", "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
}
# spatial ops on NC... tensors: channel axis 1 is kept
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "PRelu"}


def _generation(graph: gs.Graph) -> tuple[int, ...]:
    """The node list's identity and order: views index nodes by position, so both must match."""
    return tuple(id(n) for n in graph.nodes)


def _cache(ctx, key: str, graph: gs.Graph):
    if ctx is None:
        return None
    hit = ctx.cache.get(key)
    if hit is not None and hit[0] is graph and hit[1] == _generation(graph):
        return hit[2]
    return None


def _store(ctx, key: str, graph: gs.Graph, value):
    if ctx is not None:
        ctx.cache[key] = (graph, _generation(graph), value)
    return value


# --------------------------------------------------------------------------------------------------
# use-def
# --------------------------------------------------------------------------------------------------


def dataflow(graph: gs.Graph, ctx=None) -> nx.DiGraph:
    """Use-def view: ``("n", i)`` for ``graph.nodes[i]``, ``("t", name)`` for tensors."""
    hit = _cache(ctx, "analysis.dataflow", graph)
    if hit is not None:
        return hit
    import networkx as nx

    g = nx.DiGraph()
    for i, node in enumerate(graph.nodes):
        g.add_node(("n", i), op=node.op)
        for t in node.inputs:
            if t.name:
                g.add_edge(("t", t.name), ("n", i))
        for t in node.outputs:
            if t.name:
                g.add_edge(("n", i), ("t", t.name))
    return _store(ctx, "analysis.dataflow", graph, g)


# --------------------------------------------------------------------------------------------------
# channel dependency groups
# --------------------------------------------------------------------------------------------------


@dataclass
class Member:
    """One place a channel space shows up.

    kind: ``producer`` (Conv/Gemm/MatMul output channels), ``consumer`` (input channels of a
    Conv/Gemm/MatMul), ``bn`` / ``dwconv`` / ``const`` (per-channel parameters to slice).
    ``offset`` is where the space starts along the channel axis of the tensor (Concat), ``block`` how
    many features one channel spans there (Flatten of C x H x W gives H*W).  For ``const``,
    ``input_index`` says which input of the node holds the constant and ``axis`` its channel axis.
    """

    kind: str
    node: int
    offset: int = 0
    block: int = 1
    input_index: int = 0
    axis: int = 0
    tensor: str = ""


@dataclass
class ChannelGroup:
    """Channel spaces that must be pruned together with one shared choice of channels."""

    id: int
    size: int
    spaces: list[int]
    members: list[Member] = field(default_factory=list)
    blocked: str | None = None

    def of(self, kind: str) -> list[Member]:
        return [m for m in self.members if m.kind == kind]


@dataclass
class _Layout:
    axis: int  # positive channel axis
    rank: int
    segments: list[tuple[int, int]]  # (space, length)
    block: int = 1

    @property
    def channels(self) -> int:
        return sum(n for _, n in self.segments)

    def offsets(self):
        o = 0
        for s, n in self.segments:
            yield s, o, n
            o += n


def _const(t) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
    return None


def _const_shape(t) -> tuple[int, ...] | None:
    if isinstance(t, gs.Constant):
        return tuple(t.shape)
    v = _const(t)
    return None if v is None else tuple(v.shape)


def _rank(t) -> int | None:
    return len(t.shape) if getattr(t, "shape", None) is not None else None


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims)


class _Builder:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.layout: dict[str, _Layout] = {}
        self.size: dict[int, int] = {}
        self.members: dict[int, list[Member]] = {}
        self.blocked: dict[int, str] = {}
        import networkx as nx

        self.unify = nx.Graph()

    def new_space(self, n: int) -> int:
        s = len(self.size)
        self.size[s] = n
        self.members[s] = []
        self.unify.add_node(s)
        return s

    def block(self, lay: _Layout | None, reason: str) -> None:
        if lay is None:
            return
        for s, _ in lay.segments:
            self.blocked.setdefault(s, reason)

    def add(self, lay: _Layout, kind: str, node: int, **kw) -> None:
        for s, o, _ in lay.offsets():
            self.members[s].append(Member(kind, node, offset=o, block=lay.block, **kw))

    def build(self) -> list[ChannelGroup]:
        graph = self.graph
        nodes = list(graph.nodes)
        inner: set[str] = set()
        for node in nodes:
            for a in node.attrs.values():
                if isinstance(a, gs.Graph):
                    inner |= _names_used_in(a)
        for i, node in enumerate(nodes):
            lays = [self.layout.get(t.name) if isinstance(t, gs.Variable) else None for t in node.inputs]
            try:
                self.visit(i, node, lays)
            except _Block as b:
                for lay in lays:
                    self.block(lay, f"{node.name or node.op}: {b}")
        for t in graph.outputs:
            self.block(self.layout.get(t.name), f"{t.name}: graph output")
        for name in inner:
            self.block(self.layout.get(name), f"{name}: used inside a subgraph")
        groups = []
        import networkx as nx

        for comp in nx.connected_components(self.unify):
            spaces = sorted(comp)
            sizes = {self.size[s] for s in spaces}
            g = ChannelGroup(len(groups), self.size[spaces[0]], spaces)
            for s in spaces:
                g.members.extend(self.members[s])
                if s in self.blocked and g.blocked is None:
                    g.blocked = self.blocked[s]
            if len(sizes) > 1:
                g.blocked = g.blocked or "joined channel spaces differ in size"
            if not g.of("producer") and g.blocked is None:
                g.blocked = "no producer"
            groups.append(g)
        return groups

    def out(self, node: gs.Node, lay: _Layout | None) -> None:
        for k, t in enumerate(node.outputs):
            if k == 0 and lay is not None:
                self.layout[t.name] = lay
            elif t.outputs and lay is not None:
                self.block(lay, f"{node.name or node.op}: second output {t.name} is used")

    def visit(self, i: int, node: gs.Node, lays: list[_Layout | None]) -> None:
        op = node.op
        if any(isinstance(a, gs.Graph) for a in node.attrs.values()) or (node.domain or "") not in ("", "ai.onnx"):
            raise _Block(f"{op} is not analysed")
        if op == "Conv":
            self.visit_conv(i, node, lays)
        elif op == "Gemm":
            self.visit_gemm(i, node, lays)
        elif op == "MatMul":
            self.visit_matmul(i, node, lays)
        elif op == "BatchNormalization":
            lay = lays[0]
            if lay is None:
                return
            if lay.axis != 1 or lay.block != 1 or node.attrs.get("training_mode", 0):
                raise _Block("BatchNormalization not on the channel axis")
            if any(_const(t) is None for t in node.inputs[1:5]):
                raise _Block("BatchNormalization parameters are not constant")
            if len(node.outputs) > 1 and any(t.outputs for t in node.outputs[1:]):
                raise _Block("training outputs used")
            self.add(lay, "bn", i)
            self.out(node, lay)
        elif op in CHANNELWISE or op in SPATIAL:
            lay = lays[0]
            if lay is None:
                return
            if any(l is not None for l in lays[1:]):
                raise _Block("channel tensor as a parameter")
            if op in SPATIAL and (lay.axis != 1 or lay.rank < 3 or lay.block != 1):
                raise _Block(f"{op} over the channel axis")
            for t in node.inputs[1:]:
                shp = _const_shape(t) if t.name else ()
                if shp is None or int(np.prod(shp)) > 1:
                    raise _Block(f"{op} with a non-scalar parameter")
            self.out(node, lay)
        elif op in ELEMENTWISE:
            self.visit_elementwise(i, node, lays)
        elif op == "Flatten":
            lay = lays[0]
            if lay is None:
                return
            axis = node.attrs.get("axis", 1)
            shp = node.inputs[0].shape
            if axis != 1 or lay.axis != 1 or lay.block != 1 or not _static(shp[2:] if shp else None):
                raise _Block("Flatten that does not keep channels as blocks")
            self.out(node, _Layout(1, 2, list(lay.segments), int(np.prod(shp[2:])) if len(shp) > 2 else 1))
        elif op == "Concat":
            if all(l is None for l in lays):
                return
            if any(l is None for l in lays):
                raise _Block("Concat of channel and other tensors")
            first = lays[0]
            axis = node.attrs.get("axis", 0)
            axis = axis + first.rank if axis < 0 else axis
            if any(l.axis != axis or l.rank != first.rank or l.block != 1 for l in lays):
                raise _Block("Concat not on the channel axis")
            self.out(node, _Layout(axis, first.rank, [s for l in lays for s in l.segments]))
        else:
            if any(l is not None for l in lays):
                raise _Block(f"{op} is not channel-transparent")

    def visit_conv(self, i: int, node: gs.Node, lays: list[_Layout | None]) -> None:
        w = node.inputs[1]
        wshape = _const_shape(w)
        lay = lays[0]
        if wshape is None:
            raise _Block("Conv weight is not constant")
        group = int(node.attrs.get("group", 1))
        cout, cin_g = wshape[0], wshape[1]
        if lay is not None and (lay.axis != 1 or lay.block != 1):
            raise _Block("Conv input channels are not on axis 1")
        if len(node.inputs) > 2 and node.inputs[2].name and _const(node.inputs[2]) is None:
            raise _Block("Conv bias is not constant")
        if group == 1:
            if lay is not None:
                self.add(lay, "consumer", i, tensor=node.inputs[0].name)
            s = self.new_space(cout)
            self.members[s].append(Member("producer", i))
            self.out(node, _Layout(1, len(wshape), [(s, cout)]))
        elif cin_g == 1 and cout == group and (lay is None or lay.channels == group):
            # depthwise: channel c in -> channel c out
            if lay is None:
                s = self.new_space(cout)
                self.blocked[s] = f"{node.name or node.op}: depthwise Conv on a non-prunable input"
                self.out(node, _Layout(1, len(wshape), [(s, cout)]))
                return
            self.add(lay, "dwconv", i)
            self.out(node, lay)
        else:
            s = self.new_space(cout)
            self.blocked[s] = f"{node.name or node.op}: grouped Conv (group={group})"
            self.out(node, _Layout(1, len(wshape), [(s, cout)]))
            raise _Block(f"grouped Conv (group={group})")

    def visit_gemm(self, i: int, node: gs.Node, lays: list[_Layout | None]) -> None:
        a = node.attrs
        lay = lays[0]
        wshape = _const_shape(node.inputs[1])
        if wshape is None or len(wshape) != 2 or a.get("transA", 0):
            raise _Block("Gemm without a constant B or with transA")
        n_out = wshape[0] if a.get("transB", 0) else wshape[1]
        if len(node.inputs) > 2 and node.inputs[2].name:
            cshape = _const_shape(node.inputs[2])
            if cshape is None or (int(np.prod(cshape)) not in (1, n_out)) or (len(cshape) == 2 and cshape[0] != 1):
                raise _Block("Gemm C is not a constant bias")
        if lay is not None:
            if lay.axis != 1 or lay.rank != 2:
                raise _Block("Gemm input channels are not features")
            self.add(lay, "consumer", i, tensor=node.inputs[0].name)
        if lays[1] is not None or (len(lays) > 2 and lays[2] is not None):
            raise _Block("channel tensor as Gemm B/C")
        s = self.new_space(n_out)
        self.members[s].append(Member("producer", i))
        self.out(node, _Layout(1, 2, [(s, n_out)]))

    def visit_matmul(self, i: int, node: gs.Node, lays: list[_Layout | None]) -> None:
        lay = lays[0]
        wshape = _const_shape(node.inputs[1])
        rank = _rank(node.inputs[0])
        if wshape is None or len(wshape) != 2 or lays[1] is not None or rank is None or rank < 2:
            raise _Block("MatMul without a constant 2-D weight")
        if lay is not None:
            if lay.axis != rank - 1 or lay.block != 1:
                raise _Block("MatMul input channels are not the last axis")
            self.add(lay, "consumer", i, tensor=node.inputs[0].name)
        s = self.new_space(wshape[1])
        self.members[s].append(Member("producer", i))
        self.out(node, _Layout(rank - 1, rank, [(s, wshape[1])]))

    def visit_elementwise(self, i: int, node: gs.Node, lays: list[_Layout | None]) -> None:
        var = [(k, l) for k, l in enumerate(lays) if l is not None]
        if not var:
            return
        first = var[0][1]
        for k, l in var[1:]:
            if (l.axis, l.rank, l.block) != (first.axis, first.rank, first.block) or [n for _, n in l.segments] != [n for _, n in first.segments]:
                raise _Block("elementwise join of channel tensors with different layouts")
        if node.op == "PRelu" and var[0][0] != 0:
            raise _Block("PRelu slope is a channel tensor")
        for k, t in enumerate(node.inputs):
            if lays[k] is not None:
                continue
            shp = _const_shape(t)
            if shp is None:
                if _rank(t) is not None and _rank(t) <= first.rank and (t.shape[first.axis - (first.rank - len(t.shape))] == 1 if first.axis - (first.rank - len(t.shape)) >= 0 else True):
                    continue  # a variable that broadcasts over the channel axis (e.g. a gate [N,1,H,W])
                raise _Block(f"{node.op} with a non-constant operand of unknown broadcast")
            if len(shp) > first.rank:
                raise _Block(f"{node.op} operand broadens the rank")
            ca = first.axis - (first.rank - len(shp))
            if int(np.prod(shp)) <= 1 or ca < 0 or shp[ca] == 1:
                continue
            if first.block != 1 or shp[ca] != first.channels:
                raise _Block(f"{node.op} operand does not line up with the channels")
            self.add(first, "const", i, input_index=k, axis=ca)
        for _, l in var[1:]:
            for (s1, _), (s2, _) in zip(first.segments, l.segments):
                self.unify.add_edge(s1, s2)
        self.out(node, first)


class _Block(Exception):
    pass


def _names_used_in(g: gs.Graph) -> set[str]:
    out: set[str] = set()
    for n in g.nodes:
        out |= {t.name for t in n.inputs if t.name}
        for a in n.attrs.values():
            if isinstance(a, gs.Graph):
                out |= _names_used_in(a)
    return out


def channel_groups(graph: gs.Graph, ctx=None) -> list[ChannelGroup]:
    """Channel dependency groups of ``graph`` (shapes should be inferred first; see module doc).

    Members refer to nodes by index into ``list(graph.nodes)`` of this graph generation.
    """
    hit = _cache(ctx, "analysis.channel_groups", graph)
    if hit is not None:
        return hit
    return _store(ctx, "analysis.channel_groups", graph, _Builder(graph).build())


# --------------------------------------------------------------------------------------------------
# cost
# --------------------------------------------------------------------------------------------------


def _numel(dims) -> int | None:
    """Elements of a shape; a symbolic leading (batch) dim counts as 1."""
    if dims is None:
        return None
    dims = [1 if k == 0 and not isinstance(d, (int, np.integer)) else d for k, d in enumerate(dims)]
    if not _static(dims):
        return None
    return int(np.prod(dims)) if len(dims) else 1


def node_macs(node: gs.Node) -> int | None:
    """Multiply-accumulates of one Conv / ConvTranspose / Gemm / MatMul (None if shapes are unknown)."""
    if node.op == "Conv":
        w = node.inputs[1].shape
        out = node.outputs[0].shape
        n = _numel(out)
        if n is None or not _static(w):
            return None
        return n * int(np.prod(w[1:]))
    if node.op in ("Gemm", "MatMul"):
        a, out = node.inputs[0].shape, node.outputs[0].shape
        if a is None or _numel(out) is None:
            return None
        k = a[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else a[-1]
        if not isinstance(k, (int, np.integer)):
            return None
        return _numel(out) * int(k)
    return None


def flops(graph: gs.Graph) -> int:
    """2 x multiply-accumulates of the Conv / Gemm / MatMul nodes with known shapes."""
    total = 0
    for n in graph.nodes:
        m = node_macs(n)
        if m:
            total += 2 * m
    return total


def param_count(graph: gs.Graph, *, nonzero: bool = False) -> int:
    """Number of floating-point constant values (weights), or of the nonzero ones."""
    total = 0
    seen: set[int] = set()
    for t in ir.tensor_map(graph).values():
        if isinstance(t, gs.Constant) and id(t) not in seen:
            seen.add(id(t))
            if t.dtype is not None and np.dtype(t.dtype).kind == "f":
                total += int(np.count_nonzero(t.values)) if nonzero else int(np.prod(t.shape))
    return total


def describe(obj: Any) -> str:  # pragma: no cover - debugging aid
    if isinstance(obj, ChannelGroup):
        kinds = {}
        for m in obj.members:
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        return f"group {obj.id}: {obj.size} channels, {len(obj.spaces)} spaces, {kinds}, blocked={obj.blocked}"
    return repr(obj)
