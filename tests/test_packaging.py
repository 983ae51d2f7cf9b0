"""Every folder under passes/ must be listed in pyproject.toml, or it will not be installed."""
from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_all_pass_packages_listed():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(cfg["tool"]["setuptools"]["packages"])
    assert cfg["tool"]["setuptools"]["package-dir"]["graphopt.passes"] == "passes"
    for init in (REPO / "passes").rglob("__init__.py"):
        rel = init.parent.relative_to(REPO / "passes")
        name = ".".join(("graphopt", "passes") + rel.parts)
        assert name in listed, f"{name} missing from [tool.setuptools] packages"
    assert not any(p == "passes" or p.startswith("passes.") for p in listed)
