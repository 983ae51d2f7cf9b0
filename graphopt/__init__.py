"""graphopt: a verified, compiler-style graph optimizer for ONNX models.

>>> import graphopt
>>> graphopt.optimize("model.onnx", output="model.opt.onnx")        # doctest: +SKIP

The public face: :func:`load`, :func:`save`, :func:`optimize`, :func:`verify`, :class:`PassManager`,
:class:`Pass`, :class:`PassResult`, :class:`PassContext`, :func:`register_pass`.
"""
from __future__ import annotations

__version__ = "0.1.0"

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
