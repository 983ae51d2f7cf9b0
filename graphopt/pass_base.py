"""The pass interface, the pass context and the pass registry.

A pass is a class with a pipeline ``name``, an ``Options`` frozen dataclass filled from
``name{key=value}`` and a ``run(graph, ctx) -> PassResult`` method.  User passes (plugins) use exactly
the same interface as the built-in ones.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import importlib.util
import pkgutil
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator

import onnx_graphsurgeon as gs

from .errors import InputError, PipelineError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


@dataclass
class PassResult:
    """What a pass did. ``changed`` is False only if the graph is untouched."""

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Pass(abc.ABC):
    """Base class of every graph pass.

    Subclasses set ``name`` (the pipeline name, e.g. ``"fuse-conv-bn"``), ``exact`` (False for lossy
    passes, which are verified against a budget instead of a tight tolerance) and ``Options`` (a frozen
    dataclass; field ``size_limit`` is spelled ``size-limit`` in pipelines).

    ``idempotent`` is a promise: run again right after itself, on the graph it left, the pass changes
    nothing (and leaves the graph as it is).  A fixpoint then does not run it again until another pass
    changed the graph.  Declare it only where it holds for every graph: a pass that may leave work
    for a second run of its own (a rewrite that enables another rewrite it has already walked past)
    is not idempotent, even if a fixpoint around it converges.
    """

    name: ClassVar[str]
    exact: ClassVar[bool] = True
    idempotent: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, **options: Any):
        try:
            self.options = self.Options(**options)
        except TypeError as e:
            raise PipelineError(f"bad options for pass '{self.name}': {e}") from None

    @abc.abstractmethod
    def run(self, graph: gs.Graph, ctx: "PassContext") -> PassResult:
        """Rewrite ``graph`` in place and say what changed."""

    def __repr__(self) -> str:
        from .pipeline import format_pass

        return format_pass(self)


# --------------------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------------------


class RewriteLimitReached(Exception):
    """Raised internally when the global rewrite budget (``--rewrite-limit``) is spent."""


@dataclass
class Budget:
    """The accuracy budget that lossy passes and the final verification are held to."""

    max_accuracy_drop: float | None = None  # with labelled eval data: top-1 drop allowed
    min_cosine: float | None = None  # per output, against the fp32 reference
    min_top1_agreement: float | None = None  # argmax agreement with the reference (classifier outputs)

    def is_set(self) -> bool:
        return any(v is not None for v in (self.max_accuracy_drop, self.min_cosine, self.min_top1_agreement))

    def describe(self, *, with_accuracy: bool = True) -> str:
        """The limits set, as a report says them ("cosine >= 0.99, ..."); ``with_accuracy=False``
        leaves out the top-1 drop (a check that has no labelled data to measure it on)."""
        parts = []
        if self.max_accuracy_drop is not None and with_accuracy:
            parts.append(f"top-1 drop <= {self.max_accuracy_drop}")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine}")
        if self.min_top1_agreement is not None:
            parts.append(f"top-1 agreement >= {self.min_top1_agreement}")
        return ", ".join(parts)


class PassContext:
    """Everything a pass may ask for besides the graph: evaluation, shapes, data, budget, rewrites.

    Passes never read files or build onnxruntime sessions themselves; they ask the context, so that
    memory, external data and threading live in one place.
    """

    def __init__(
        self,
        *,
        opset: int | None = None,
        calibration: Callable[[], Iterable[dict[str, "np.ndarray"]]] | None = None,
        eval_data: tuple[list[dict[str, "np.ndarray"]], "np.ndarray"] | None = None,
        budget: Budget | None = None,
        verify_feeds: list[dict[str, "np.ndarray"]] | None = None,
        rewrite_limit: int | None = None,
        input_shapes: dict[str, list[int]] | None = None,
        seed: int = 0,
    ):
        self.opset = opset
        self._calibration = calibration
        self.eval_data = eval_data
        self.budget = budget or Budget()
        self.verify_feeds = verify_feeds or []
        self.rewrite_limit = rewrite_limit
        self.rewrites = 0
        self.rewrite_log: list[tuple[int, str, str]] = []  # (index, pass, description)
        self.input_shapes = input_shapes or {}
        self.seed = seed
        self.current_pass: str | None = None
        self.model_template = None  # set by the manager: the ModelProto the graph came from
        self.cache: dict[str, Any] = {}

    # -- rewrite budget (opt-bisect) -------------------------------------------------------------
    def allow_rewrite(self, description: str = "") -> bool:
        """Ask before applying one rewrite. False once the ``--rewrite-limit`` is reached.

        Every rewrite application is counted, so bisection can find the first bad one.
        """
        if self.rewrite_limit is not None and self.rewrites >= self.rewrite_limit:
            return False
        self.rewrites += 1
        self.rewrite_log.append((self.rewrites, self.current_pass or "?", description))
        return True

    # -- data ------------------------------------------------------------------------------------
    @property
    def has_calibration(self) -> bool:
        return self._calibration is not None

    def calibration_batches(self) -> Iterator[dict[str, "np.ndarray"]]:
        """Calibration feeds, streamed batch by batch (a fresh iterator on every call)."""
        if self._calibration is None:
            return iter(())
        return iter(self._calibration())

    # -- evaluation --------------------------------------------------------------------------------
    def to_model(self, graph: gs.Graph):
        from . import ir

        return ir.export_graph(graph, self.model_template)

    def run_graph(self, graph: gs.Graph, feeds: dict[str, "np.ndarray"], outputs: list[str] | None = None):
        """Run ``graph`` with onnxruntime (optimizations off) and return {name: array}."""
        from .verify import run_model  # not `from . import verify`: graphopt.verify is also the API function

        model = self.to_model(graph)
        return run_model(model, feeds, outputs=outputs)

    def session(self, model, *, extra_outputs: list[str] | None = None):
        """A reusable runner for ``model`` (ModelProto); see :class:`graphopt.verify.Runner`."""
        from .verify import Runner

        return Runner(model, extra_outputs=extra_outputs)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Pass]] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_builtins_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator that makes a pass available by its pipeline name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PipelineError(f"pass {cls.__qualname__} needs a kebab-case 'name', got {name!r}")
    if name in ("fixpoint",):
        raise PipelineError(f"'{name}' is reserved")
    if not (dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen):
        raise PipelineError(f"pass '{name}': Options must be a frozen dataclass")
    old = _REGISTRY.get(name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise PipelineError(f"pass '{name}' is registered twice ({old.__module__} and {cls.__module__})")
    _REGISTRY[name] = cls
    return cls


def load_builtin_passes() -> None:
    """Import every module under ``graphopt.passes`` and the ``graphopt.passes`` entry points."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import graphopt.passes as pkg

    for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
        importlib.import_module(info.name)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="graphopt.passes"):
            ep.load()
    except Exception as e:  # a broken third-party plugin must not break graphopt
        print(f"graphopt: warning: could not load a 'graphopt.passes' entry point: {e}", file=sys.stderr)


LOADED_PLUGINS: list[str] = []  # what load_plugin loaded (files as absolute paths), for reproducers


def load_plugin(spec: str) -> None:
    """Import a module (dotted name) or a ``.py`` file that registers passes."""
    try:
        if spec.endswith(".py") or "/" in spec or Path(spec).exists():
            path = Path(spec)
            if not path.is_file():
                raise InputError(f"plugin file not found: {spec}")
            mod_name = f"graphopt_plugin_{abs(hash(str(path.resolve())))}"
            if mod_name in sys.modules:
                return
            s = importlib.util.spec_from_file_location(mod_name, path)
            assert s is not None and s.loader is not None
            mod = importlib.util.module_from_spec(s)
            sys.modules[mod_name] = mod
            s.loader.exec_module(mod)
            if str(path.resolve()) not in LOADED_PLUGINS:
                LOADED_PLUGINS.append(str(path.resolve()))
        else:
            importlib.import_module(spec)
            if spec not in LOADED_PLUGINS:
                LOADED_PLUGINS.append(spec)
    except InputError:
        raise
    except PipelineError:
        raise
    except Exception as e:
        raise InputError(f"cannot load plugin {spec}: {type(e).__name__}: {e}") from None


def get_pass(name: str) -> type[Pass]:
    cls = _REGISTRY.get(name)
    if cls is None:
        # A built-in pass: import only its module (graphopt.passes.BUILTIN).  Anything else (a
        # plugin's pass from an entry point, or a misspelling to suggest a name for) loads everything.
        import graphopt.passes as pkg

        module = pkg.BUILTIN.get(name)
        if module is not None:
            importlib.import_module(f"{pkg.__name__}.{module}")
            cls = _REGISTRY.get(name)
        if cls is None:
            load_builtin_passes()
            cls = _REGISTRY.get(name)
    if cls is None:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PipelineError(f"unknown pass '{name}'{hint}; 'graphopt passes' lists them")
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))
