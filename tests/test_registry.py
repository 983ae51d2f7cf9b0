"""The registry and plugins: a user's pass is written exactly like a built-in one."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

import graphopt
from graphopt.errors import InputError, PipelineError
from graphopt.pass_base import get_pass, load_plugin, registered_passes

PLUGIN = '''
from dataclasses import dataclass
import onnx_graphsurgeon as gs
from graphopt import Pass, PassResult, register_pass

@register_pass
class RenameGraph(Pass):
    name = "{name}"
    description = "set the graph name (a test plugin)"

    @dataclass(frozen=True)
    class Options:
        to: str = "renamed"

    def run(self, graph, ctx):
        if graph.name == self.options.to:
            return PassResult(False)
        graph.name = self.options.to
        return PassResult(True, {{"renamed": 1}})
'''


def test_builtins_registered():
    names = registered_passes()
    assert {"dce", "fold-constants"} <= set(names)
    for name, cls in names.items():
        assert cls.name == name
        assert cls.description, f"{name} has no description"


def test_builtin_index_matches_the_modules():
    """graphopt.passes.BUILTIN (which module to import for a pass) names every built-in pass and the
    module that really registers it."""
    import graphopt.passes as pkg

    builtin = {name: cls.__module__.removeprefix("graphopt.passes.") for name, cls in registered_passes().items()
               if cls.__module__.startswith("graphopt.passes.")}
    assert pkg.BUILTIN == builtin


def test_a_pipeline_imports_only_the_modules_of_its_passes(fixtures_dir, tmp_path):
    code = f"""
import sys, graphopt
graphopt.optimize({str(fixtures_dir / "tiny_cnn.onnx")!r}, "O1", output={str(tmp_path / "o.onnx")!r}, verify="off")
print(" ".join(sorted(m for m in sys.modules if m.startswith("graphopt.passes."))))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "graphopt.passes.fold.constants" in loaded and "graphopt.passes.cleanup.cse" in loaded
    assert not {m for m in loaded if m.split(".")[2] in ("fusion", "prune", "quant")}, loaded


def test_entry_point_plugin_found_by_name(tmp_path, fixtures_dir):
    """A pass from an installed package's 'graphopt.passes' entry point is found when a pipeline names
    it (built-in names do not load the entry points)."""
    (tmp_path / "epplugin.py").write_text(PLUGIN.format(name="test-ep-rename"))
    dist = tmp_path / "epplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\nrename = epplugin\n")
    out = tmp_path / "o.onnx"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(fixtures_dir / "tiny_cnn.onnx"), "-o", str(out),
                        "--passes", "fold-constants,test-ep-rename{to=ep}", "-q"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr
    import onnx

    assert onnx.load(out).graph.name == "ep"


def test_unknown_pass_suggests_a_name():
    with pytest.raises(PipelineError, match="did you mean 'fold-constants'"):
        get_pass("fold-constant")


def test_plugin_file(tmp_path, fixtures_dir):
    f = tmp_path / "myplugin.py"
    f.write_text(PLUGIN.format(name="test-rename-graph"))
    load_plugin(str(f))
    assert get_pass("test-rename-graph").name == "test-rename-graph"
    res = graphopt.optimize(fixtures_dir / "tiny_cnn.onnx", "test-rename-graph{to=hello}")
    assert res.model.graph.name == "hello"
    assert res.report.passes[0].stats == {"renamed": 1}


def test_plugin_from_cli(tmp_path, fixtures_dir):
    f = tmp_path / "cliplugin.py"
    f.write_text(PLUGIN.format(name="test-cli-rename"))
    out = tmp_path / "o.onnx"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(fixtures_dir / "tiny_cnn.onnx"), "-o", str(out),
                        "--load-plugin", str(f), "--passes", "test-cli-rename{to=x}", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import onnx

    assert onnx.load(out).graph.name == "x"


def test_bad_plugins(tmp_path):
    with pytest.raises(InputError, match="plugin file not found"):
        load_plugin(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(InputError, match="boom"):
        load_plugin(str(bad))
    with pytest.raises(InputError, match="cannot load plugin"):
        load_plugin("no_such_module_xyz")


def test_register_rejects_bad_passes():
    with pytest.raises(PipelineError, match="kebab-case"):
        @graphopt.register_pass
        class Bad(graphopt.Pass):
            name = "Bad_Name"

            def run(self, graph, ctx):
                return graphopt.PassResult(False)

    with pytest.raises(PipelineError, match="frozen dataclass"):
        @graphopt.register_pass
        class Bad2(graphopt.Pass):
            name = "test-bad-options"

            @dataclass
            class Options:
                x: int = 1

            def run(self, graph, ctx):
                return graphopt.PassResult(False)


def test_no_bare_passes_package_installed():
    """passes/ installs as graphopt.passes only: a top-level `passes` must not be importable from site-packages."""
    import importlib.util

    import graphopt.passes

    assert graphopt.passes.__name__ == "graphopt.passes"
    spec = importlib.util.find_spec("passes")
    if spec is not None and spec.origin:
        # only acceptable when running from the source tree (cwd on sys.path)
        assert "site-packages" not in spec.origin
