"""Textual pipelines: parse, print back identically, options, fixpoints, presets, errors."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.errors import PipelineError
from graphopt.pipeline import Fixpoint, PassSpec, PresetRef, parse_pipeline, parse_size
from graphopt.manager import PassManager
from graphopt.presets import PRESETS, preset_pipeline

CANONICAL = [
    "dce",
    "fold-constants{size-limit=1MiB},dce,fixpoint(fold-constants,dce)",
    "fixpoint{max-iter=3}(dce,fixpoint(fold-constants,dce)),dce",
    "O1,dce",
    'fold-constants{size-limit="2MiB"}',
]


@pytest.mark.parametrize("text", CANONICAL)
def test_round_trip(text):
    p = parse_pipeline(text)
    assert str(p) == text
    assert parse_pipeline(str(p)) == p
    p.validate()


def test_structure():
    p = parse_pipeline("fold-constants{size-limit=1MiB},dce,fixpoint(fold-constants,dce)")
    a, b, c = p.elements
    assert a == PassSpec("fold-constants", {"size-limit": "1MiB"})
    assert b == PassSpec("dce")
    assert isinstance(c, Fixpoint) and [e.name for e in c.body] == ["fold-constants", "dce"]
    assert c.max_iter == 8


def test_whitespace_and_separators_normalise():
    p = parse_pipeline(" fold-constants{ size-limit=1MiB } , dce ")
    assert str(p) == "fold-constants{size-limit=1MiB},dce"


def test_options_are_typed():
    p = parse_pipeline("fold-constants{size-limit=1MiB}").elements[0].instantiate()
    assert p.options.size_limit == 2**20
    assert str(p) == "fold-constants{size-limit=1MiB}"


def test_preset_expands_and_prints_by_name():
    p = parse_pipeline("O1")
    assert p.elements == [PresetRef("O1")]
    assert str(p) == "O1"
    assert str(p.flatten()) == str(parse_pipeline(PRESETS["O1"]).flatten())
    assert parse_pipeline("O0").flatten().elements == []


@pytest.mark.parametrize("text,msg", [
    ("dce,", "ends early"),
    ("fixpoint(dce", "expected ')'"),
    ("no-such-pass", "unknown pass 'no-such-pass'"),
    ("fold-constants{size-limit=abc}", "not a valid int"),
    ("fold-constants{nope=1}", "has no option 'nope'"),
    ("fold-constants{size-limit=1,size-limit=2}", "given twice"),
    ("fixpoint{max-iter=0}(dce)", "max-iter"),
    ("Dce", "bad pass name"),
    ("dce;dce", "bad pass name"),
    ("dce)", "expected ',' at column 4, got ')'"),
])
def test_errors(text, msg):
    with pytest.raises(PipelineError, match=re.escape(msg)):
        parse_pipeline(text).validate()


@pytest.mark.parametrize("text,msg", [
    ("no-such-pass", "unknown pass 'no-such-pass'"),
    ("fold-constants{nope=1}", "has no option 'nope'"),
    ("fixpoint{max-iter=0}(dce)", "max-iter"),
    ("fixpoint{max-iter=x}(dce)", "whole number"),
    ("fixpoint{nope=1}(dce)", "only max-iter"),
    ("dce,fixpoint(cse,fixpoint{max-iter=0}(no-such-pass))", "max-iter"),  # the first problem in order
])
def test_the_pass_manager_refuses_what_validate_refuses(text, msg):
    # (the manager checks while it builds its passes, instead of validating first)
    with pytest.raises(PipelineError, match=re.escape(msg)):
        PassManager(parse_pipeline(text))
    with pytest.raises(PipelineError, match=re.escape(msg)):
        PassManager(text)


def test_a_preset_is_a_fresh_pipeline_each_time():
    a = preset_pipeline("O1")
    a.elements[0].body.append(PassSpec("dce"))
    a.elements[0].raw_options["max-iter"] = "1"
    b = preset_pipeline("O1")
    assert str(b) == PRESETS["O1"]
    assert b.elements[0] is not a.elements[0]
    assert str(b.copy()) == str(b) and b.copy() == b and b.copy().elements[0].body[0] is not b.elements[0].body[0]


def test_an_edited_preset_is_parsed_again(monkeypatch):
    preset_pipeline("O1")
    monkeypatch.setitem(PRESETS, "O1", "dce")
    assert str(preset_pipeline("O1")) == "dce"


def test_sizes():
    assert parse_size("1MiB") == 2**20
    assert parse_size("1.5KiB") == 1536
    assert parse_size("2MB") == 2_000_000
    assert parse_size("17") == 17
    with pytest.raises(ValueError):
        parse_size("lots")


_names = st.sampled_from(["dce", "fold-constants"])
_opts = st.sampled_from(["", "{size-limit=1MiB}", "{size-limit=512}"])


@st.composite
def _pipelines(draw, depth=0):
    n = draw(st.integers(1, 3))
    parts = []
    for _ in range(n):
        if depth < 2 and draw(st.booleans()) and draw(st.booleans()):
            it = draw(st.sampled_from(["", "{max-iter=2}"]))
            parts.append(f"fixpoint{it}(" + draw(_pipelines(depth=depth + 1)) + ")")
        else:
            name = draw(_names)
            parts.append(name + (draw(_opts) if name == "fold-constants" else ""))
    return ",".join(parts)


@settings(max_examples=60, deadline=None)
@given(_pipelines())
def test_random_pipelines_round_trip(text):
    p = parse_pipeline(text)
    assert str(p) == text
    assert parse_pipeline(str(p)) == p
