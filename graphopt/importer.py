"""ONNX -> ``gs.Graph``, building the same objects as ``gs.import_onnx`` at about half the cost.

onnx-graphsurgeon's importer spends most of its time in per-object overhead: keyword-argument
constructors, ``SynchronizedList`` appends through ``getattr``, ``LazyValues`` looking dtypes up in
``onnx.helper`` tables for every weight.  For a 20 MB model that is more than reading and writing the
file.  This module builds the top-level graph's tensors and nodes directly, with the attributes and
links gs's constructors would set (checked against ``gs.import_onnx`` on the ONNX backend models and
the corpus, ``tests/test_importer.py``), and leaves to gs what it does not handle itself: functions,
subgraphs (If/Loop/Scan bodies) and attribute kinds other than the plain ones.
"""
from __future__ import annotations

import sys
import weakref
from collections import OrderedDict

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter, get_itemsize, get_numpy_type
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.util.misc import SynchronizedList

_A = onnx.AttributeProto
# Attribute kinds gs imports as plain Python values (or a Constant); the others go through gs.
_PLAIN_ATTRS = frozenset({_A.FLOAT, _A.INT, _A.STRING, _A.TENSOR, _A.FLOATS, _A.INTS, _A.STRINGS})
_DTYPES: dict[int, object] = {}
LITTLE_ENDIAN = sys.byteorder == "little"


def _dtype(elem_type: int):
    """gs's dtype for an ONNX element type: the numpy type, or the ONNX enum where numpy has none."""
    try:
        return _DTYPES[elem_type]
    except KeyError:
        np_type = get_numpy_type(elem_type)
        _DTYPES[elem_type] = np_type if np_type is not None else elem_type
        return _DTYPES[elem_type]


def _links(owner, field: str) -> SynchronizedList:
    """An empty ``SynchronizedList`` of ``owner`` (``field`` names the back-link on the elements)."""
    s = SynchronizedList.__new__(SynchronizedList)
    s.parent_obj = owner
    s.field_name = field
    return s


def variable(name: str, dtype=None, shape=None, type: str = "tensor_type") -> gs.Variable:
    """``gs.Variable(name, dtype, shape, type)``."""
    v = gs.Variable.__new__(gs.Variable)
    d = v.__dict__
    d["name"] = name
    d["inputs"] = _links(v, "outputs")
    d["outputs"] = _links(v, "inputs")
    d["dtype"] = dtype
    d["shape"] = shape
    d["type"] = type
    return v


def _remember(lv: LazyValues, arr):
    """``arr``, which ``lv`` loaded, noted on ``lv`` (weakly: a pass that replaces the values must not
    keep the old array alive).  Lineage (:mod:`graphopt.lineage`) tells a read from a change by it."""
    try:
        lv.loaded = weakref.ref(arr)
    except TypeError:
        pass
    return arr


class TrackedValues(LazyValues):
    """gs's ``LazyValues``, remembering the array it loads (``loaded``: a weak reference to it)."""

    loaded = None

    def load(self) -> np.ndarray:
        return _remember(self, super().load())


class RawValues(TrackedValues):
    """``LazyValues`` of a little-endian numeric tensor held in ``raw_data``: loaded with numpy
    straight from the bytes (gs's ``load()`` goes through ``onnx.numpy_helper.to_array``, whose
    per-call overhead dominates for the hundreds of small constants an exported transformer has)."""

    def load(self) -> np.ndarray:
        t = self.tensor
        if not t.HasField("raw_data"):
            return super().load()
        return _remember(self, np.frombuffer(t.raw_data, dtype=self.dtype).reshape(tuple(self.shape)).copy())


class SourcedValues(RawValues):
    """``LazyValues`` whose bytes are read from the file the model was parsed from (``raw``, a
    read-only memoryview), not from the proto: upb copies a bytes field on every read, so gs's
    ``load()`` makes two copies of a weight where this makes one, and :meth:`view` none.

    The proto may be a skeleton's (:func:`graphopt.wire.skeleton`: its ``raw_data`` left empty):
    ``tensor`` then fills it from ``raw`` when first asked for, so that whatever reads or copies
    the proto (gs's exporter does) gets the whole tensor; ``proto`` gives it as it is."""

    proto: onnx.TensorProto
    empty: bool = False  # the proto's raw_data is empty (a skeleton's): its bytes are only in raw
    source = None  # then the graphopt.ir.Source it came from,
    index = -1  # and its initializer index there

    @property
    def tensor(self) -> onnx.TensorProto:
        if self.empty:
            self.source.fill_one(self.index, self.proto)
            self.empty = False
        return self.proto

    @tensor.setter
    def tensor(self, t: onnx.TensorProto) -> None:
        self.proto = t
        self.empty = False

    def view(self) -> np.ndarray:
        """The values as a read-only array over the file's bytes (no copy)."""
        return np.frombuffer(self.raw, dtype=self.dtype).reshape(tuple(self.shape))

    def load(self) -> np.ndarray:
        return _remember(self, self.view().copy())


# Element types whose raw_data numpy reads as is (onnx's to_array special-cases the others: bfloat16,
# float8, int4, strings...).
_VIEWABLE = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                            np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_,
                                            np.complex64, np.complex128))


def constant(t: onnx.TensorProto, raw: memoryview | None = None, source=None, index: int = -1) -> gs.Constant:
    """What gs imports a TensorProto as: a Constant with lazy values (the proto is not read).  ``raw``:
    the tensor's raw_data in the file's bytes, when known (see :class:`SourcedValues`).  ``t`` may be
    a skeleton's weight left empty: initializer ``index`` of the ``source`` :class:`graphopt.ir.Source`
    (then ``raw`` must be its bytes)."""
    empty = source is not None and index in source.stripped
    dtype = _dtype(t.data_type)
    n = 1
    for x in t.dims:
        n *= x
    nbytes = n * get_itemsize(dtype)
    viewable = LITTLE_ENDIAN and not isinstance(dtype, int) and np.dtype(dtype) in _VIEWABLE  # (int: no numpy type)
    if raw is not None and len(raw) == nbytes and viewable:
        lv = SourcedValues.__new__(SourcedValues)
        lv.raw = raw
        lv.proto = t
        if empty:
            lv.empty = True
            lv.source = source
            lv.index = index
    elif empty:
        raise ValueError(f"weight '{t.name}' of a skeleton has no bytes to read")
    else:
        lv = RawValues.__new__(RawValues) if viewable else TrackedValues.__new__(TrackedValues)
        lv.tensor = t
    lv.shape = list(t.dims)  # (gs keeps the proto's dims container: every read of it goes through upb)
    lv.dtype = dtype
    lv.nbytes = nbytes
    c = gs.Constant.__new__(gs.Constant)
    d = c.__dict__
    d["name"] = t.name
    d["inputs"] = _links(c, "outputs")
    d["outputs"] = _links(c, "inputs")
    d["_values"] = lv
    d["data_location"] = int(t.data_location) if t.HasField("data_location") else None
    d["_export_dtype"] = None
    return c


def _value_info(vi: onnx.ValueInfoProto) -> gs.Tensor:
    t = vi.type
    if t.WhichOneof("value") != "tensor_type":
        return OnnxImporter.import_tensor(vi)  # sequences, optionals, maps, untyped: rare, gs knows them
    tt = t.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = []
        for dim in tt.shape.dim:
            kind = dim.WhichOneof("value")
            shape.append(dim.dim_param if kind == "dim_param" else dim.dim_value if kind == "dim_value" else None)
    return variable(vi.name, _dtype(tt.elem_type), shape)


def _attributes(node: onnx.NodeProto) -> OrderedDict | None:
    """The node's attributes as gs imports them, or None if one of them is of a kind left to gs."""
    out = OrderedDict()
    for a in node.attribute:
        kind = a.type
        if kind not in _PLAIN_ATTRS or a.ref_attr_name:
            return None
        if kind == _A.INTS:
            v = list(a.ints)
        elif kind == _A.INT:
            v = a.i
        elif kind == _A.FLOAT:
            v = a.f
        elif kind == _A.FLOATS:
            v = list(a.floats)
        elif kind == _A.STRING:
            v = a.s.decode()
        elif kind == _A.TENSOR:
            v = constant(a.t)
        else:
            v = [s.decode() for s in a.strings]
        out[a.name] = v
    return out


def import_onnx(model: onnx.ModelProto, source=None, pairs: list | None = None) -> gs.Graph:
    """The ``gs.Graph`` that ``gs.import_onnx(model)`` returns, built faster.  ``source`` (a
    :class:`graphopt.ir.Source` of ``model``) lets weights be read without copying them.  ``pairs``:
    a list to append ``(node, NodeProto, plain)`` to for each top-level node, in order; ``plain``: the
    node was built here, from attributes of the plain kinds only (so no subgraph, nothing gs skips),
    and its inputs and outputs are the tensors named in the proto."""
    g = model.graph
    opset = OnnxImporter.get_opset(model)
    domains = OnnxImporter.get_import_domains(model)
    functions = [OnnxImporter.import_function(f, model_opset=opset, model_import_domains=domains)
                 for f in model.functions]
    tensors: OrderedDict[str, gs.Tensor] = OrderedDict()
    for i, t in enumerate(g.initializer):
        if t.name not in tensors:
            tensors[t.name] = constant(t, source.raw(i), source, i) if source is not None else constant(t)
    for st in g.sparse_initializer:
        if st.values.name not in tensors:
            tensors[st.values.name] = OnnxImporter.import_tensor(st)
    for vi in g.value_info:  # a repeated entry may add what an earlier one left out
        old = tensors.get(vi.name)
        if old is None:
            tensors[vi.name] = _value_info(vi)
        elif isinstance(old, gs.Variable):
            new = _value_info(vi)
            old.dtype = old.dtype or new.dtype
            old.shape = old.shape or new.shape

    def declared(vi: onnx.ValueInfoProto) -> gs.Tensor:
        t = tensors.get(vi.name)
        if t is None:
            t = tensors[vi.name] = _value_info(vi)
        return t

    weights = {t.name for t in g.initializer} | {st.values.name for st in g.sparse_initializer}
    inputs = [declared(vi) for vi in g.input if vi.name not in weights]
    outputs = [declared(vi) for vi in g.output]

    nodes: list[gs.Node] = []
    by_gs: list[gs.Node] = []  # imported by gs (subgraphs, rare attribute kinds)
    for pn in g.node:
        attrs = _attributes(pn) if len(pn.attribute) else OrderedDict()
        if attrs is None:
            node = OnnxImporter.import_node(pn, OrderedDict(), tensors, opset, domains)
            nodes.append(node)
            by_gs.append(node)
            if pairs is not None:
                pairs.append((node, pn, False))
            continue
        node = gs.Node.__new__(gs.Node)
        d = node.__dict__
        d["op"] = pn.op_type
        d["name"] = pn.name
        d["attrs"] = attrs
        ins = d["inputs"] = _links(node, "outputs")
        for name in pn.input:
            t = tensors.get(name)
            if t is None:  # an omitted optional input, or a tensor nothing declares
                t = tensors.setdefault(name, variable(name)) if name else variable("")
            list.append(ins, t)
            list.append(t.outputs, node)
        outs = d["outputs"] = _links(node, "inputs")
        for name in pn.output:
            t = tensors.get(name)
            if t is None:
                t = tensors.setdefault(name, variable(name)) if name else variable("")
            list.append(outs, t)
            list.append(t.inputs, node)
        d["domain"] = pn.domain if pn.HasField("domain") else None
        nodes.append(node)
        if pairs is not None:
            pairs.append((node, pn, True))
    # gs.Graph merges the function lists of subgraphs into its own: only gs-imported nodes have any.
    graph = gs.Graph(nodes=by_gs, inputs=inputs, outputs=outputs, name=g.name, doc_string=g.doc_string,
                     opset=opset, import_domains=domains, producer_name=model.producer_name,
                     producer_version=model.producer_version, functions=functions, ir_version=model.ir_version)
    graph.nodes = nodes
    return graph
