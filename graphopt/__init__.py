"""graphopt: a verified, compiler-style graph optimizer for ONNX models.

>>> import graphopt
>>> graphopt.optimize("model.onnx", output="model.opt.onnx")        # doctest: +SKIP

The public face: :func:`load`, :func:`save`, :func:`optimize`, :func:`verify`, :class:`PassManager`,
:class:`Pass`, :class:`PassResult`, :class:`PassContext`, :func:`register_pass`.
"""
from __future__ import annotations

__version__ = "0.1.0"


def _find_passes_in_checkout() -> None:
    """Installed, ``graphopt.passes`` is the repository's ``passes/`` folder (pyproject's package-dir
    mapping).  Imported straight from a checkout instead (``PYTHONPATH=.``, or a non-editable install
    shadowed by the checkout in the working directory), nothing maps it: then a finder for that one
    name does, so the built-in passes are there either way."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "passes"
    if not (folder / "__init__.py").is_file() or importlib.util.find_spec(__name__ + ".passes") is not None:
        return

    class _CheckoutPasses(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "graphopt.passes":
                return None
            return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    sys.meta_path.append(_CheckoutPasses())


_find_passes_in_checkout()

from .errors import GraphoptError, InputError, PipelineError, VerificationError
from .pass_base import Budget, Pass, PassContext, PassResult, register_pass, registered_passes, load_plugin
from .manager import Instrument, PassManager
from .pipeline import parse_pipeline
from .api import OptimizeResult, load, optimize, save, verify

__all__ = [
    "Budget", "GraphoptError", "InputError", "Instrument", "OptimizeResult", "Pass", "PassContext",
    "PassManager", "PassResult", "PipelineError", "VerificationError", "load", "load_plugin", "optimize",
    "parse_pipeline", "register_pass", "registered_passes", "save", "verify",
]
