"""Textual pipelines (after MLIR): ``fold-constants{size-limit=1MiB},dce,fixpoint(fuse-conv-bn,dce)``.

Grammar::

    pipeline := element ("," element)*
    element  := NAME options? | "fixpoint" options? "(" pipeline ")" | PRESET      (PRESET: O0..O3)
    options  := "{" key "=" value (("," | " ") key "=" value)* "}"

Values are bare words (no ``,{}()`` or spaces) or double-quoted strings.  List options separate
items with ``;``.  Sizes accept ``KiB``, ``MiB``, ``GiB``, ``KB``, ``MB``, ``GB``.  Printing gives
back the canonical text (options as the user wrote them, ``,`` between options), and parsing that
gives an equal pipeline.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import PipelineError
from .pass_base import Pass, get_pass

PRESET_RE = re.compile(r"^O[0-3]$")


@dataclass
class PassSpec:
    """One pass in a pipeline, with the option text the user wrote."""

    name: str
    raw_options: dict[str, str] = field(default_factory=dict)

    def instantiate(self) -> Pass:
        cls = get_pass(self.name)
        inst = cls(**parse_options(cls, self.raw_options))
        inst.raw_options = dict(self.raw_options)  # printed back as the user wrote them
        return inst


@dataclass
class Fixpoint:
    """Run ``body`` again until no pass in it reports a change (bounded by ``max-iter``)."""

    body: list["Element"]
    raw_options: dict[str, str] = field(default_factory=dict)

    @property
    def max_iter(self) -> int:
        return int(self.raw_options.get("max-iter", "8"))

    def check(self) -> None:
        """The fixpoint's own part of :meth:`Pipeline.validate` (its body not included)."""
        if not self.body:
            raise PipelineError("fixpoint() needs at least one pass")
        try:
            mi = self.max_iter
        except ValueError:
            raise PipelineError(f"fixpoint max-iter must be a whole number, got {self.raw_options['max-iter']!r}") from None
        if mi < 1 or set(self.raw_options) - {"max-iter"}:
            raise PipelineError(f"fixpoint takes only max-iter>=1, got {self.raw_options}")


@dataclass
class PresetRef:
    name: str  # "O0".."O3"

    def expand(self) -> "Pipeline":
        from .presets import preset_pipeline

        return preset_pipeline(self.name)


Element = Union[PassSpec, Fixpoint, PresetRef]


@dataclass
class Pipeline:
    elements: list[Element]

    def __str__(self) -> str:
        return format_pipeline(self)

    def copy(self) -> "Pipeline":
        """An equal pipeline that shares no mutable part with this one."""
        return Pipeline(_copy(self.elements))

    def flatten(self) -> "Pipeline":
        """The same pipeline with presets expanded."""
        return Pipeline(_flatten(self.elements))

    def pass_names(self) -> list[str]:
        out: list[str] = []

        def walk(els: list[Element]) -> None:
            for e in els:
                if isinstance(e, PassSpec):
                    out.append(e.name)
                elif isinstance(e, Fixpoint):
                    walk(e.body)
                else:
                    walk(e.expand().elements)

        walk(self.elements)
        return out

    def validate(self) -> None:
        """Instantiate every pass once, so unknown names and bad options fail before any work."""

        def walk(els: list[Element]) -> None:
            for e in els:
                if isinstance(e, PassSpec):
                    e.instantiate()
                elif isinstance(e, Fixpoint):
                    e.check()
                    walk(e.body)
                else:
                    walk(e.expand().elements)

        walk(self.elements)


def _copy(els: list[Element]) -> list[Element]:
    out: list[Element] = []
    for e in els:
        if isinstance(e, PassSpec):
            out.append(PassSpec(e.name, dict(e.raw_options)))
        elif isinstance(e, Fixpoint):
            out.append(Fixpoint(_copy(e.body), dict(e.raw_options)))
        else:
            out.append(PresetRef(e.name))
    return out


def _flatten(els: list[Element]) -> list[Element]:
    out: list[Element] = []
    for e in els:
        if isinstance(e, PresetRef):
            out.extend(_flatten(e.expand().elements))
        elif isinstance(e, Fixpoint):
            out.append(Fixpoint(_flatten(e.body), dict(e.raw_options)))
        else:
            out.append(e)
    return out


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(?P<punct>[{}(),=])|(?P<str>"(?:[^"\\]|\\.)*")|(?P<word>[^\s{}(),="]+))')


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    toks: list[tuple[str, str, int]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"pipeline: unexpected character {text[pos]!r} at column {pos + 1}")
        kind = m.lastgroup or ""
        toks.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return toks


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None, kind: str | None = None) -> tuple[str, str, int]:
        t = self.peek()
        if t is None:
            raise PipelineError(f"pipeline {self.text!r}: ends early" + (f", expected {value!r}" if value else ""))
        if (value is not None and t[1] != value) or (kind is not None and t[0] != kind):
            want = repr(value) if value else kind
            raise PipelineError(f"pipeline {self.text!r}: expected {want} at column {t[2] + 1}, got {t[1]!r}")
        self.i += 1
        return t

    def pipeline(self, closing: str | None) -> list[Element]:
        els = [self.element()]
        while True:
            t = self.peek()
            if t is None or (closing and t[1] == closing):
                return els
            self.take(",")
            els.append(self.element())

    def element(self) -> Element:
        kind, word, col = self.take(kind="word")
        if PRESET_RE.match(word):
            return PresetRef(word)
        if not re.match(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$", word):
            raise PipelineError(f"pipeline: bad pass name {word!r} at column {col + 1}")
        opts: dict[str, str] = {}
        t = self.peek()
        if t is not None and t[1] == "{":
            opts = self.options()
        if word == "fixpoint":
            self.take("(")
            body = self.pipeline(")")
            self.take(")")
            return Fixpoint(body, opts)
        return PassSpec(word, opts)

    def options(self) -> dict[str, str]:
        self.take("{")
        opts: dict[str, str] = {}
        while True:
            t = self.peek()
            if t is not None and t[1] == "}":
                self.take("}")
                return opts
            if opts and t is not None and t[1] == ",":
                self.take(",")
            _, key, col = self.take(kind="word")
            self.take("=")
            t = self.peek()
            if t is None or t[0] not in ("word", "str"):
                raise PipelineError(f"pipeline: option {key!r} needs a value")
            self.i += 1
            if key in opts:
                raise PipelineError(f"pipeline: option {key!r} given twice")
            opts[key] = t[1]


def parse_pipeline(text: str) -> Pipeline:
    """Parse a pipeline string (or a preset name such as ``O2``; an empty string is an empty pipeline)."""
    if not text.strip():
        return Pipeline([])
    p = _Parser(text)
    els = p.pipeline(None)
    if p.peek() is not None:
        t = p.peek()
        assert t is not None
        raise PipelineError(f"pipeline {text!r}: unexpected {t[1]!r} at column {t[2] + 1}")
    return Pipeline(els)


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def _format_options(raw: dict[str, str]) -> str:
    if not raw:
        return ""
    return "{" + ",".join(f"{k}={v}" for k, v in raw.items()) + "}"


def format_element(e: Element) -> str:
    if isinstance(e, PassSpec):
        return e.name + _format_options(e.raw_options)
    if isinstance(e, Fixpoint):
        return "fixpoint" + _format_options(e.raw_options) + "(" + ",".join(format_element(x) for x in e.body) + ")"
    return e.name


def format_pipeline(p: Pipeline) -> str:
    return ",".join(format_element(e) for e in p.elements)


def format_pass(p: Pass) -> str:
    raw = getattr(p, "raw_options", None)
    if raw is None:
        raw = {}
        defaults = type(p).Options()
        for f in dataclasses.fields(p.options):
            v = getattr(p.options, f.name)
            if v != getattr(defaults, f.name):
                raw[f.name.replace("_", "-")] = _value_text(v)
    return p.name + _format_options(raw)


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return ";".join(_value_text(x) for x in v)
    s = str(v)
    return s if re.match(r'^[^\s{}(),="]+$', s) else '"' + s.replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------
# Option values
# ---------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^(?P<num>[0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(?P<unit>[KMGT]i?B|B)?$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    unit = (m.group("unit") or "b").lower()
    return int(float(m.group("num")) * _UNITS[unit])


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return re.sub(r"\\(.)", r"\1", v[1:-1])
    return v


def _convert(value: str, tp: Any, pass_name: str, key: str) -> Any:
    v = _unquote(value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        non_none = [a for a in args if a is not type(None)]
        if v.lower() in ("none", "null", "") and len(non_none) < len(args):
            return None
        last: Exception | None = None
        for a in non_none:
            try:
                return _convert(value, a, pass_name, key)
            except PipelineError as e:
                last = e
        raise last or PipelineError(f"{pass_name}: bad value for {key}")
    if origin is typing.Literal:
        if v not in args:
            raise PipelineError(f"{pass_name}: option {key} must be one of {'|'.join(map(str, args))}, got {v!r}")
        return v
    if origin in (tuple, list):
        item = args[0] if args else str
        items = [x for x in v.split(";") if x != ""]
        return tuple(_convert(x, item, pass_name, key) for x in items)
    try:
        if tp is bool:
            if v.lower() in ("true", "1", "yes", "on"):
                return True
            if v.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            try:
                return int(v)
            except ValueError:
                return parse_size(v)
        if tp is float:
            return float(v)
        if tp is str:
            return v
    except ValueError:
        raise PipelineError(f"{pass_name}: option {key}={v!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return v


@functools.lru_cache(maxsize=None)
def _option_fields(options: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    """The fields of an Options dataclass and their resolved types (typing.get_type_hints is slow)."""
    fields = {f.name: f for f in dataclasses.fields(options)}
    try:
        hints = typing.get_type_hints(options)
    except Exception:
        hints = {n: f.type for n, f in fields.items()}
    return fields, hints


def parse_options(cls: type[Pass], raw: dict[str, str]) -> dict[str, Any]:
    """Turn ``{"size-limit": "1MiB"}`` into ``{"size_limit": 1048576}`` by the Options field types."""
    fields, hints = _option_fields(cls.Options)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        attr = key.replace("-", "_")
        if attr not in fields:
            known = ", ".join(sorted(k.replace("_", "-") for k in fields)) or "none"
            raise PipelineError(f"pass '{cls.name}' has no option '{key}' (options: {known})")
        out[attr] = _convert(value, hints.get(attr, str), cls.name, key)
    return out
