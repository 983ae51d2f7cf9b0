"""The protobuf wire format, where graphopt reads or writes it itself.

Reading: where each weight's ``raw_data`` lies in a serialized model (:func:`raw_spans`), without
parsing the weights (upb copies a bytes field on every read).  Writing: the pieces that let
:func:`graphopt.ir.save` stream weights to the file from where they already are.  Field numbers are
ONNX's (onnx.proto): ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.raw_data = 9.
"""
from __future__ import annotations

import onnx

_ITEMSIZE: dict[int, int] = {}


def nbytes(t: onnx.TensorProto) -> int:
    """The bytes ``t``'s dims and type call for (-1 for a negative dim).  Never reads the data: upb
    copies a bytes field on every read, and its ``ByteSize()`` encodes the message to measure it."""
    n = _ITEMSIZE.get(t.data_type)
    if n is None:
        try:
            n = _ITEMSIZE[t.data_type] = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            return -1
    for d in t.dims:
        if d < 0:
            return -1
        n *= d
    return n


def read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    """The varint at ``buf[i]`` and the index after it."""
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, i
        shift += 7


def fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value start, value end, tag start) of each field of one protobuf
    message."""
    i = start
    while i < end:
        at = i
        tag, i = read_varint(buf, i)
        wt = tag & 7
        if wt == 0:
            j = read_varint(buf, i)[1]
        elif wt == 1:
            j = i + 8
        elif wt == 5:
            j = i + 4
        elif wt == 2:
            n, i = read_varint(buf, i)
            j = i + n
        else:
            raise ValueError("group fields are not used by ONNX")
        yield tag >> 3, wt, i, j, at
        i = j


class _Initializer:
    """One top-level initializer as the wire format has it: where its message and its ``raw_data``
    lie, and the fields that say how many bytes it should hold."""

    __slots__ = ("at", "start", "end", "raw", "raw_at", "data_type", "dims", "external")

    def __init__(self, buf: memoryview, at: int, start: int, end: int) -> None:
        self.at, self.start, self.end = at, start, end
        self.raw: tuple[int, int] | None = None
        self.raw_at = -1
        self.data_type = 0
        self.dims: list[int] = []
        self.external = False
        for f, wt, a, b, t_at in fields(buf, start, end):
            if f == 9 and wt == 2:  # the last occurrence wins, as in a parse
                self.raw, self.raw_at = (a, b), t_at
            elif f == 2 and wt == 0:
                self.data_type = read_varint(buf, a)[0]
            elif f == 1 and wt == 0:
                self.dims.append(read_varint(buf, a)[0])
            elif f == 1 and wt == 2:  # packed dims
                i = a
                while i < b:
                    d, i = read_varint(buf, i)
                    self.dims.append(d)
            elif f == 14:
                self.external = True


def _model_graph(buf: memoryview) -> tuple[int, int, int] | None:
    """(tag start, value start, value end) of the graph field of a serialized ModelProto; None if it
    has none or more than one (those merge on parsing)."""
    found = None
    for f, wt, a, b, at in fields(buf, 0, len(buf)):
        if f == 7 and wt == 2:
            if found is not None:
                return None
            found = (at, a, b)
    return found


def _initializers(buf: memoryview, a: int, b: int, min_bytes: int = -1) -> list[_Initializer | None]:
    """The initializers of the graph message at ``buf[a:b]``; None for one of at most ``min_bytes``
    bytes (not read)."""
    return [_Initializer(buf, at, ga, gb) if gb - ga > min_bytes else None
            for gf, gwt, ga, gb, at in fields(buf, a, b) if gf == 5 and gwt == 2]


def raw_spans(data: bytes) -> list[tuple[int, int] | None] | None:
    """Where the raw_data (None if absent) of each top-level initializer lies in ``data``, in order, read
    off the serialized ModelProto (graph = field 7, GraphProto.initializer = 5, TensorProto.raw_data = 9;
    the last occurrence of a field wins, as in a parse)."""
    try:
        buf = memoryview(data)
        g = _model_graph(buf)
        return None if g is None else [t.raw for t in _initializers(buf, g[1], g[2])]
    except (ValueError, IndexError):
        return None


# Element types a weight may be left out of a skeleton as (numpy reads their raw_data as is; graphopt's
# importer views them in the file's bytes): FLOAT, FLOAT16, DOUBLE, with their item sizes.
_SKELETON_TYPES = {1: 4, 10: 2, 11: 8}


def skeleton(data: bytes, min_bytes: int) -> tuple[bytes, list[tuple[int, int] | None], list[int]] | None:
    """The serialized model ``data`` with the ``raw_data`` of each big float initializer emptied: a
    model that parses in a fraction of the time (upb copies every bytes field into its arena; for a
    20 MB model that copy, and its page faults, cost as much as the rest of a -O1 run).

    Returns (the skeleton's bytes, :func:`raw_spans` of ``data`` for the initializers over
    ``min_bytes`` (None for the others), the indices of the initializers emptied), or None if
    ``data`` is not plainly a model.  An initializer is emptied when it is FLOAT, FLOAT16 or DOUBLE
    held in ``raw_data`` of more than ``min_bytes`` bytes, exactly as many as its dims call for (so
    that its values can be read from ``data`` at its span).  An emptied tensor keeps a ``raw_data``
    field of length 0 (its other fields are as they were): what asks whether it has raw data still
    hears yes.
    """
    try:
        buf = memoryview(data)
        g = _model_graph(buf)
        if g is None:
            return None
        g_at, a, b = g
        inits = _initializers(buf, a, b, min_bytes)  # (one too small to leave out is not read)
        pieces: list[bytes | memoryview] = []
        stripped: list[int] = []
        done = a  # the graph's bytes before this index are in pieces
        for i, t in enumerate(inits):
            if t is None:
                continue
            size = _SKELETON_TYPES.get(t.data_type)
            if t.raw is None or size is None or t.external or t.raw[1] - t.raw[0] <= min_bytes:
                continue
            for d in t.dims:
                size *= d
            if size != t.raw[1] - t.raw[0]:
                continue
            body = [buf[t.start:t.raw_at], buf[t.raw[1]:t.end], b"\x4a\x00"]  # raw_data (9), empty, last
            pieces += [buf[done:t.at], b"\x2a", encode_varint(sum(len(x) for x in body))] + body
            done = t.end
            stripped.append(i)
        pieces.append(buf[done:b])
        graph = [buf[:g_at], b"\x3a", encode_varint(sum(len(x) for x in pieces))]
        return b"".join(graph + pieces + [buf[b:]]), [t and t.raw for t in inits], stripped
    except (ValueError, IndexError):
        return None


def encode_varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_TENSOR_FIELDS = [f for f in onnx.TensorProto.DESCRIPTOR.fields if f.name != "raw_data"]


def is_repeated(f) -> bool:
    """Whether field descriptor ``f`` is repeated (protobuf >= 5.28 says so; 7 dropped ``label``)."""
    flag = getattr(f, "is_repeated", None)
    return flag if flag is not None else f.label == f.LABEL_REPEATED


def copy_fields(src, dst, skip: str) -> None:
    """Every set field of message ``src`` but ``skip`` into the empty ``dst`` (no bytes field read)."""
    for f, v in src.ListFields():
        if f.name == skip:
            continue
        if is_repeated(f):
            getattr(dst, f.name).extend(v)
        elif f.message_type is not None:
            getattr(dst, f.name).CopyFrom(v)
        else:
            setattr(dst, f.name, v)


def tensor_without_raw_data(t: onnx.TensorProto) -> bytes:
    """``t`` serialized without its ``raw_data`` field (which is never read)."""
    fields_only = onnx.TensorProto()
    for f in _TENSOR_FIELDS:
        if is_repeated(f):
            v = getattr(t, f.name)
            if len(v):
                getattr(fields_only, f.name).extend(v)
        elif t.HasField(f.name):
            setattr(fields_only, f.name, getattr(t, f.name))
    return fields_only.SerializeToString()
