"""Shared fixtures. Tests that read ../shared skip (with a reason) where it is absent: a user's clone."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"


def _shared() -> Path | None:
    env = os.environ.get("GRAPHOPT_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if (cand / "corpus").is_dir() or (cand / "digits").is_dir():
            return cand
    return None


SHARED = _shared()
CORPUS_MODELS = sorted((SHARED / "corpus").glob("*.onnx")) if SHARED else []
DIGITS_MODELS = sorted((SHARED / "digits").glob("*.onnx")) if SHARED else []


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if SHARED is None:
        pytest.skip("../shared is not present (a user's clone has no shared corpus)")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def corpus_params():
    """pytest params over every shared model (corpus + digits), or one skipped param without ../shared."""
    models = CORPUS_MODELS + DIGITS_MODELS
    if not models:
        return [pytest.param(None, marks=pytest.mark.skip(reason="../shared is not present"), id="no-shared")]
    return [pytest.param(p, id=p.stem) for p in models]
