"""Model inputs: signatures, generated feeds, user feeds (.npz / .pb) and calibration streams."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from .errors import InputError

Feeds = dict[str, np.ndarray]


@dataclass
class InputSpec:
    name: str
    elem_type: int  # onnx TensorProto data type (0 for non-tensor)
    shape: list[int | str | None] | None  # None: rank unknown; str: symbolic dim; None entry: unknown dim

    @property
    def dtype(self) -> np.dtype | None:
        if self.elem_type == onnx.TensorProto.STRING:
            return np.dtype(object)
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))
        except Exception:
            return None

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real graph inputs (initializers listed as inputs in old models are left out)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        specs.append(_spec(vi))
    return specs


def output_specs(model: onnx.ModelProto) -> list[InputSpec]:
    return [_spec(vi) for vi in model.graph.output]


def _spec(vi: onnx.ValueInfoProto) -> InputSpec:
    t = vi.type
    if not t.HasField("tensor_type"):
        return InputSpec(vi.name, 0, None)
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return InputSpec(vi.name, tt.elem_type, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return InputSpec(vi.name, tt.elem_type, dims)


def parse_input_shapes(items: Iterable[str]) -> dict[str, list[int]]:
    """``["input:1x3x224x224", "ids:1,128"]`` -> ``{"input": [1, 3, 224, 224], "ids": [1, 128]}``."""
    out: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        if not sep or not name or not re.match(r"^\d+([x,]\d+)*$", dims):
            raise InputError(f"--input-shape {item!r}: expected NAME:DIMS such as input:1x3x224x224")
        out[name] = [int(d) for d in re.split(r"[x,]", dims)]
    return out


def resolve_shape(spec: InputSpec, fixed: dict[str, list[int]], symbols: dict[str, int]) -> list[int]:
    """Concrete dims for ``spec``: user's shape first, then static dims, symbolic dims default to
    1 for the leading (batch) dim and 64 elsewhere; a symbol gets the same value everywhere."""
    if spec.name in fixed:
        shape = fixed[spec.name]
        if spec.shape is not None and len(spec.shape) != len(shape):
            raise InputError(f"--input-shape {spec.name}: rank {len(shape)} but the model says {spec.shape_text()}")
        if spec.shape is not None:
            for d, s in zip(spec.shape, shape):
                if isinstance(d, int) and d != s:
                    raise InputError(f"--input-shape {spec.name}: {shape} conflicts with the model's {spec.shape_text()}")
                if isinstance(d, str):
                    symbols.setdefault(d, s)
        return list(shape)
    if spec.shape is None:
        raise InputError(f"input '{spec.name}' has unknown rank; give --input-shape {spec.name}:DIMS")
    out = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, str) and d in symbols:
            out.append(symbols[d])
        else:
            v = 1 if i == 0 else 64
            if isinstance(d, str):
                symbols[d] = v
            out.append(v)
    return out


def index_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Integer inputs that index a table (Gather / embeddings) -> the valid [low, high) range."""
    inits = {t.name: t for t in model.graph.initializer}
    consts: dict[str, tuple[int, ...]] = {n: tuple(t.dims) for n, t in inits.items()}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = tuple(a.t.dims)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    passthrough = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}
    out: dict[str, tuple[int, int]] = {}
    for spec in input_specs(model):
        if spec.dtype is None or spec.dtype.kind not in "iu":
            continue
        frontier, seen, high = [spec.name], set(), None
        while frontier:
            t = frontier.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in consumers.get(t, []):
                if c.op_type in ("Gather", "GatherElements") and len(c.input) > 1 and c.input[1] == t and c.input[0] in consts:
                    axis = next((a.i for a in c.attribute if a.name == "axis"), 0)
                    dims = consts[c.input[0]]
                    if dims:
                        size = dims[axis]
                        high = size if high is None else min(high, size)
                elif c.op_type in passthrough and c.input and c.input[0] == t:
                    frontier.extend(c.output)
        if high is not None:
            out[spec.name] = (0, int(high))
    return out


def generate_feeds(model: onnx.ModelProto, *, seed: int = 0, input_shapes: dict[str, list[int]] | None = None, count: int = 1) -> list[Feeds]:
    """``count`` feed dicts made from the model's signature with a fixed seed."""
    rng = np.random.default_rng(seed)
    ranges = index_ranges(model)
    fixed = input_shapes or {}
    specs = input_specs(model)
    unknown = set(fixed) - {s.name for s in specs}
    if unknown:
        raise InputError(f"--input-shape names no model input: {', '.join(sorted(unknown))} (inputs: {', '.join(s.name for s in specs)})")
    value_infos = {vi.name: vi for vi in model.graph.input}
    feeds_list = []
    for _ in range(count):
        symbols: dict[str, int] = {}
        feeds: Feeds = {}
        for spec in specs:
            if spec.elem_type == 0:
                feeds[spec.name] = _generate_value(spec.name, value_infos[spec.name].type, rng, fixed, symbols, ranges)
                continue
            feeds[spec.name] = _generate_tensor(spec, rng, fixed, symbols, ranges)
        feeds_list.append(feeds)
    return feeds_list


class CannotGenerate(InputError):
    """The signature does not say enough to make an input (a sequence of unknown-rank tensors, a map):
    ``--input-shape`` cannot help; the model can still be optimized, just not verified on made-up data."""


SEQUENCE_LENGTH = 2  # elements in a generated sequence input (all of one shape, so Concat-like uses work)


def _generate_value(name: str, tp: onnx.TypeProto, rng, fixed, symbols, ranges) -> Any:
    """A sequence (a list of ``SEQUENCE_LENGTH`` tensors) or an optional (a present value) input,
    in the form onnxruntime takes."""
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        spec = _spec(helper.make_value_info(name, tp))
        if spec.shape is None:
            raise CannotGenerate(f"input '{name}' holds tensors of unknown rank; give --inputs to verify")
        return _generate_tensor(spec, rng, fixed, symbols, ranges)
    if kind == "sequence_type":
        return [_generate_value(name, tp.sequence_type.elem_type, rng, fixed, symbols, ranges) for _ in range(SEQUENCE_LENGTH)]
    if kind == "optional_type":
        return _generate_value(name, tp.optional_type.elem_type, rng, fixed, symbols, ranges)
    raise CannotGenerate(f"input '{name}' is a {(kind or 'untyped value').replace('_type', '')}; graphopt cannot generate it, give --inputs to verify")


def _generate_tensor(spec: InputSpec, rng, fixed, symbols, ranges) -> np.ndarray:
    shape = resolve_shape(spec, {} if spec.name not in fixed else fixed, symbols)
    dt = spec.dtype
    if dt is None:
        raise InputError(f"input '{spec.name}' has a data type graphopt cannot generate; give --inputs")
    if dt == np.dtype(object):
        return rng.choice(np.array(["a", "b", "graphopt"], dtype=object), size=shape)
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        lo, hi = ranges.get(spec.name, (0, 3))
        return rng.integers(lo, max(hi, lo + 1), size=shape).astype(dt)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    raise InputError(f"input '{spec.name}': cannot generate dtype {dt}; give --inputs")


def load_feeds(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> Feeds:
    """Inputs from ``.npz`` (keys = input names) or ``.pb`` (one TensorProto, named or for the only input)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    if p.suffix == ".pb":
        t = onnx.TensorProto()
        try:
            t.ParseFromString(p.read_bytes())
            arr = onnx.numpy_helper.to_array(t)
        except Exception:
            raise InputError(f"{p}: not a TensorProto file") from None
        name = t.name
        if model is not None and not name:
            specs = input_specs(model)
            if len(specs) != 1:
                raise InputError(f"{p}: an unnamed tensor, but the model has {len(specs)} inputs; use .npz")
            name = specs[0].name
        feeds = {name: arr}
    else:
        try:
            with np.load(p, allow_pickle=False) as z:
                feeds = {k: z[k] for k in z.files}
        except Exception as e:
            raise InputError(f"{p}: cannot read as .npz: {e}") from None
    if model is not None:
        names = [s.name for s in input_specs(model)]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise InputError(f"{p}: missing input(s) {', '.join(missing)} (has: {', '.join(feeds) or 'nothing'})")
        feeds = {n: feeds[n] for n in names}
    return feeds


def feeds_batches(arrays: dict[str, np.ndarray], model: onnx.ModelProto, batch_size: int = 16) -> Iterator[Feeds]:
    """Slice arrays whose first axis indexes samples into batches the model accepts.

    A model with a fixed leading dim of k gets ``x[i:i+k]``; a dynamic one gets ``batch_size``.
    """
    specs = {s.name: s for s in input_specs(model)}
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise InputError(f"calibration data misses input(s) {', '.join(missing)}")
    n = min(len(arrays[k]) for k in specs)
    if n == 0:
        raise InputError("calibration data is empty")
    step = batch_size
    for s in specs.values():
        if s.shape and isinstance(s.shape[0], int):
            step = s.shape[0]
            break
    for i in range(0, n - step + 1, step):
        yield {k: np.ascontiguousarray(arrays[k][i : i + step]) for k in specs}


def calibration_source(src: Any, model: onnx.ModelProto, batch_size: int = 16) -> Callable[[], Iterable[Feeds]]:
    """A re-iterable stream of feed dicts from an ``.npz`` path, a dict of arrays or an iterable of feeds.

    A path is opened afresh on each pass over the data; arrays are sliced lazily, so only one batch of
    activations is ever alive at a time.
    """
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.is_file():
            raise InputError(f"{p}: no such calibration file")

        def from_file() -> Iterator[Feeds]:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k in {s.name for s in input_specs(model)}}
            yield from feeds_batches(arrays, model, batch_size)

        # validate now, not in the middle of a pass
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = set(z.files)
        except Exception as e:
            raise InputError(f"{p}: cannot read as .npz: {e}") from None
        missing = [s.name for s in input_specs(model) if s.name not in keys]
        if missing:
            raise InputError(f"{p}: calibration data misses input(s) {', '.join(missing)}")
        return from_file
    if isinstance(src, dict):
        return lambda: feeds_batches(src, model, batch_size)
    if isinstance(src, (list, tuple)):
        return lambda: iter(src)
    if callable(src):
        return src
    raise InputError("calibration data must be an .npz path, a dict of arrays, a list of feed dicts or a callable")
