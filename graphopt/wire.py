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
    """(field number, wire type, value start, value end) of each field of one protobuf message."""
    i = start
    while i < end:
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
        yield tag >> 3, wt, i, j
        i = j


def raw_spans(data: bytes) -> list[tuple[int, int] | None] | None:
    """Where the raw_data (None if absent) of each top-level initializer lies in ``data``, in order, read
    off the serialized ModelProto (graph = field 7, GraphProto.initializer = 5, TensorProto.raw_data = 9;
    the last occurrence of a field wins, as in a parse)."""
    try:
        buf = memoryview(data)
        out: list[tuple[int, int] | None] = []
        for f, wt, a, b in fields(buf, 0, len(buf)):
            if f == 7 and wt == 2:
                for gf, gwt, ga, gb in fields(buf, a, b):
                    if gf == 5 and gwt == 2:
                        span = None
                        for tf, twt, ta, tb in fields(buf, ga, gb):
                            if tf == 9 and twt == 2:
                                span = (ta, tb)
                        out.append(span)
        return out
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
