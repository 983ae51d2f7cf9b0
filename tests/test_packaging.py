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


def test_builtin_passes_found_from_a_checkout_nothing_maps():
    # -S: no site processing, so no editable-install finder; the checkout is first on the path, as when a
    # non-editable install is shadowed by the repository in the working directory (or PYTHONPATH=.)
    import site
    import subprocess

    code = ("import sys; sys.path[:0] = [sys.argv[1]] + sys.argv[2:]; import graphopt; "
            "from graphopt.pass_base import get_pass; import graphopt.passes.fusion.conv_bn as m; "
            "print(graphopt.__file__); print(m.__file__); print(get_pass('fuse-conv-bn').__name__)")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO), *site.getsitepackages()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == str(REPO / "graphopt" / "__init__.py")
    assert lines[1] == str(REPO / "passes" / "fusion" / "conv_bn.py") and lines[2] == "FuseConvBN"
