"""The ``graphopt`` command.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 internal error (a bug: run with
``--debug`` for the traceback).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import GraphoptError, InputError, VerificationError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _fail(msg: str, code: int) -> None:
    click.echo(f"graphopt: error: {msg}", err=True)
    sys.exit(code)


_LAZY_COMMANDS = {"bench": "graphopt.bench", "bisect": "graphopt.trust"}  # command -> module with register_cli(main)


class _Group(click.Group):
    """Turns GraphoptError into a one-line message and its exit code; tracebacks only with --debug.

    The commands defined in modules of their own are imported when asked for (or listed by --help):
    importing them all took tens of milliseconds of every command's start-up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | _LAZY_COMMANDS.keys())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY_COMMANDS and name not in self.commands:
            import importlib

            try:
                module = importlib.import_module(_LAZY_COMMANDS[name])
            except ImportError:  # (an optional dependency missing: the command is not there)
                return None
            module.register_cli(self)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        debug = "--debug" in sys.argv or os.environ.get("GRAPHOPT_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except VerificationError as e:
            if debug:
                raise
            _fail(str(e), 1)
        except GraphoptError as e:
            if debug:
                raise
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except MemoryError:
            _fail("out of memory", 3)
        except Exception as e:
            if debug:
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", 3)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="graphopt", prog_name="graphopt")
def main() -> None:
    """graphopt: a verified graph optimizer for ONNX models."""


def _input_shapes(items: tuple[str, ...]) -> dict[str, list[int]]:
    from .data import parse_input_shapes

    return parse_input_shapes(items)


def _load_plugins(plugins: tuple[str, ...]) -> None:
    from .pass_base import load_plugin

    for p in plugins:
        load_plugin(p)


def _lossy_sugar(passes: str, quantize: str | None, prune: tuple[str, ...]) -> str:
    """``--prune channels:0.3`` and ``--quantize int8`` append their passes to the pipeline."""
    extra = []
    for spec in prune:
        kind, _, value = spec.partition(":")
        if kind == "channels":
            extra.append(f"prune-channels{{ratio={value or '0.3'}}}")
        elif kind in ("magnitude", "unstructured"):
            extra.append(f"prune-magnitude{{sparsity={value or '0.5'}}}")
        elif kind == "nm":
            n, _, m = (value or "2:4").partition(":")
            extra.append(f"prune-nm{{n={n},m={m or '4'}}}")
        else:
            raise InputError(f"--prune {spec!r}: expected channels:RATIO, magnitude:SPARSITY or nm:N:M")
    if quantize:
        if quantize not in ("int8",):
            raise InputError(f"--quantize {quantize!r}: only int8 is supported")
        extra.append("quantize-int8")
    if not extra:
        return passes
    return ",".join([p for p in [passes] if p] + extra)


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=True, path_type=str), required=False)
@click.option("-o", "--output", type=click.Path(path_type=str), required=False, help="Where to write the optimized model.")
@click.option("-O", "level", type=click.Choice(["0", "1", "2", "3"]), default=None, help="Preset: -O0 nothing, -O1 cleanup, -O2 portable fusions (default), -O3 onnxruntime fusions.")
@click.option("--passes", "pipeline", default=None, help="A pipeline, e.g. 'fold-constants{size-limit=1MiB},dce,fixpoint(fuse-conv-bn,dce)'.")
@click.option("--inputs", type=click.Path(path_type=str), default=None, help="Verification inputs (.npz with input names as keys, or .pb).")
@click.option("--input-shape", multiple=True, help="NAME:DIMS for symbolic dims, e.g. input:1x3x224x224 (repeatable).")
@click.option("--verify", "verify_mode", type=click.Choice(["end", "each", "off"]), default="end", show_default=True)
@click.option("--strict", is_flag=True, help="Fail when the model cannot be verified.")
@click.option("--report", type=click.Path(path_type=str), default=None, help="Write the JSON report here.")
@click.option("--load-plugin", "plugins", multiple=True, help="A module or .py file that registers passes.")
@click.option("--quantize", type=str, default=None, help="Append int8 quantization (int8).")
@click.option("--prune", multiple=True, help="Append pruning: channels:RATIO, magnitude:SPARSITY, nm:N:M.")
@click.option("--calibration", type=click.Path(path_type=str), default=None, help="Calibration data (.npz, first axis = samples).")
@click.option("--eval", "eval_data", type=click.Path(path_type=str), default=None, help="Labelled eval data (.npz with inputs + 'labels').")
@click.option("--max-accuracy-drop", type=float, default=None, help="Top-1 accuracy budget on --eval data.")
@click.option("--min-cosine", type=float, default=None, help="Minimum cosine similarity of each output with the original.")
@click.option("--rewrite-limit", type=int, default=None, help="Stop after N rewrites (for bisection).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--repro-dir", type=click.Path(path_type=str), default=None, help="Where to write a reproducer on a crash, failed verification or rollback (default: OUTPUT stem + .repro).")
@click.option("--replay", type=click.Path(path_type=str), default=None, help="Re-run the failing step of a reproducer folder (no MODEL).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def optimize(model, output, level, pipeline, inputs, input_shape, verify_mode, strict, report, plugins, quantize, prune,
             calibration, eval_data, max_accuracy_drop, min_cosine, rewrite_limit, seed, repro_dir, replay, quiet, debug) -> None:
    """Optimize MODEL, verify it against the original, and write it to -o."""
    from . import api

    if replay is not None:
        from .trust import replay_cli

        replay_cli(replay, model, output, _console())
        return
    if model is None:
        raise InputError("missing MODEL (or --replay DIR)")
    if output is None:
        raise InputError("missing -o/--output (graphopt never overwrites its input)")
    if level is not None and pipeline is not None:
        raise InputError("give either -O or --passes, not both")
    _load_plugins(plugins)
    passes = pipeline if pipeline is not None else f"O{level if level is not None else '2'}"
    passes = _lossy_sugar(passes, quantize, prune)
    if report:
        rp = Path(report)
        if not rp.parent.exists():
            raise InputError(f"{rp.parent}: report folder does not exist")
    try:
        res = api.optimize(
            model, passes, output=output, inputs=inputs, input_shapes=_input_shapes(input_shape), verify=verify_mode,
            strict=strict, calibration=calibration, eval_data=eval_data, max_accuracy_drop=max_accuracy_drop,
            min_cosine=min_cosine, rewrite_limit=rewrite_limit, seed=seed, repro_dir=repro_dir,
        )
    except VerificationError as e:
        if report and e.report is not None:
            _write_json(report, e.report)
        raise
    if report:
        _write_json(report, res.report.to_dict())
    if not quiet:
        from .summary import print_summary

        print_summary(res.report, _console())


def _write_json(path: str, data: dict) -> None:
    import tempfile

    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent or ".", prefix=f".{p.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, p)


@main.command(context_settings=CONTEXT)
@click.option("--preset", default=None, help="Show what a preset (O0..O3) expands to.")
@click.option("--load-plugin", "plugins", multiple=True)
def passes(preset, plugins) -> None:
    """List the registered passes, or print a preset's pipeline."""
    from rich.markup import escape
    from rich.table import Table

    from .pass_base import registered_passes

    _load_plugins(plugins)
    if preset:
        from .api import resolve_pipeline

        click.echo(str(resolve_pipeline(preset).flatten()))
        return
    t = Table(box=None, show_header=True, header_style="bold")
    t.add_column("pass")
    t.add_column("kind")
    t.add_column("options")
    t.add_column("what it does")
    import dataclasses

    for name, cls in registered_passes().items():
        opts = ", ".join(f"{f.name.replace('_', '-')}={_fmt_default(f.default)}" for f in dataclasses.fields(cls.Options))
        desc = cls.description or (cls.__doc__ or "").strip().split("\n")[0]
        t.add_row(name, "exact" if cls.exact else "lossy", escape(opts), escape(desc))
    _console().print(t)


def _fmt_default(v: Any) -> str:
    from .pipeline import _value_text

    if v is dataclasses_missing():
        return "?"
    return _value_text(v)


def dataclasses_missing():
    import dataclasses

    return dataclasses.MISSING


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--debug", is_flag=True)
def inspect(model, as_json, debug) -> None:
    """Opsets, inputs/outputs, node count, op histogram, parameters and bytes."""
    from .inspect import inspect_model, print_inspection

    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        print_inspection(info, _console())


@main.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--inputs", type=click.Path(path_type=str), default=None)
@click.option("--input-shape", multiple=True)
@click.option("--min-cosine", type=float, default=None, help="Compare to a budget instead of the exact tolerance.")
@click.option("--seed", type=int, default=0)
@click.option("--intermediates", is_flag=True, help="Also compare the tensors both models share by name; report the first node that diverges.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--debug", is_flag=True)
def verify(a, b, inputs, input_shape, min_cosine, seed, intermediates, as_json, debug) -> None:
    """Compare model B with model A on the same inputs (exit 1 if they differ)."""
    from . import api
    from .pass_base import Budget

    exact = min_cosine is None
    v = api.verify(a, b, inputs=inputs, input_shapes=_input_shapes(input_shape), exact=exact,
                   budget=Budget(min_cosine=min_cosine) if min_cosine is not None else None, seed=seed)
    div = None
    if intermediates:
        from .trust import divergence_between

        div = divergence_between(a, b, inputs=inputs, input_shapes=_input_shapes(input_shape), min_cosine=min_cosine, seed=seed)
    if as_json:
        d = v.to_dict()
        if div is not None:
            from .trust import divergence_json

            d["intermediates"] = divergence_json(div)
        click.echo(json.dumps(d, indent=2))
    else:
        from .summary import print_verification

        print_verification(v, _console())
        if div is not None:
            from .trust import print_divergence

            print_divergence(div, _console())
    if v.status == "failed":
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
