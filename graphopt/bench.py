"""``graphopt bench``: onnxruntime CPU latency, throughput, cold start and peak memory of models, side by side.

Latency is measured in interleaved rounds (A, B, C, A, B, C, ...) so that the machine's drift (other
processes, thermal state, frequency) hits every model alike; figures are the median, p10 and p90 of the
per-round samples, and every model is also given as a ratio against the first one.  Peak memory and the
process-level cold start come from a fresh subprocess per model (``python -m graphopt.bench --probe``),
since a process's peak RSS cannot be attributed to one of several models living in it.

The measuring core (:func:`interleaved_latency`, :func:`session_create_times`, :func:`memory_probe`,
:func:`bench_models`) takes plain callables and paths, so ``benchmarks/compare.py`` and user scripts reuse it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import ir
from .errors import InputError

LEVELS = ("disable", "basic", "extended", "all")


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a non-empty sequence."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class LatencyStats:
    """Per-call latency of one candidate over interleaved rounds, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    rounds: int
    calls_per_sample: int
    samples_ms: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples_s: Sequence[float], calls: int) -> "LatencyStats":
        ms = [s * 1000.0 for s in samples_s]
        return cls(percentile(ms, 50), percentile(ms, 10), percentile(ms, 90), float(np.mean(ms)) if ms else float("nan"),
                   len(ms), calls, ms)

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            d.pop("samples_ms")
        return d


# --------------------------------------------------------------------------------------------------
# The measuring core
# --------------------------------------------------------------------------------------------------


def interleaved_latency(
    runners: Sequence[Callable[[], Any]],
    *,
    rounds: int = 20,
    warmup: int = 2,
    min_sample_s: float = 0.005,
    max_calls: int = 1000,
    time_budget_s: float | None = None,
    max_rounds: int = 500,
    rewarm_below_s: float = 0.01,
    shuffle: bool = True,
    seed: int = 0,
    on_round: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[LatencyStats]:
    """Time ``runners`` (zero-argument callables, one inference each) in interleaved rounds.

    Every runner is first called ``warmup`` times (at least once); the fastest warm-up call sets how many
    calls make one sample (enough to last ``min_sample_s``, so that microsecond models are not timer noise).
    Then ``rounds`` times: one sample of every runner (A, B, C, then A, B, C again, ...).  A sample is the
    mean time per call.  With ``shuffle`` (the default) each round visits the runners in a fresh seeded
    order (A, B, C, then C, A, B, ...), so that anything periodic on the machine cannot keep hitting the
    same position of the round.

    On an oversubscribed machine a call is either undisturbed or preempted (per-call times here, load 10 on
    2 cores: p25 0.8 ms, p50 1.2 ms, p75 5-7 ms for one sub-millisecond model), so when about half the
    calls are preempted the median jumps between the two modes; the p10 stays with the undisturbed calls
    and is the steadier figure there.
    With ``time_budget_s``, ``rounds`` is a minimum: rounds go on until the budget is spent (at most
    ``max_rounds``): on a shared machine many short samples give steadier medians than a few long ones.
    Runners faster than ``rewarm_below_s`` per call get one untimed call before each sample: the other
    runners of the round evict a small model's weights and activations from the CPU caches, so a timed
    first call would partly measure the interleaving.  Big models do not fit the caches anyway, so they are
    timed as they come.
    ``on_round(i)`` is called after each round (progress bars).
    ``clock`` times the samples: wall time by default; ``time.thread_time`` counts only the CPU time of the
    calling thread, which is where onnxruntime runs every kernel with 1 intra-op thread, so time spent
    preempted by other processes on a shared machine drops out (cache and memory-bandwidth sharing stay).
    """
    if rounds < 1:
        raise InputError("rounds must be at least 1")
    calls: list[int] = []
    rewarm: list[bool] = []
    for r in runners:
        t = math.inf
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            r()
            t = min(t, time.perf_counter() - t0)
        n = int(min(max_calls, max(1, math.ceil(min_sample_s / max(t, 1e-7)))))
        calls.append(n)
        rewarm.append(t < rewarm_below_s)
    samples: list[list[float]] = [[] for _ in runners]
    wall = time.perf_counter
    start = wall()
    rng = np.random.default_rng(seed)
    order = list(range(len(runners)))
    i = 0
    while i < rounds or (time_budget_s is not None and i < max_rounds and wall() - start < time_budget_s):
        if shuffle:
            rng.shuffle(order)
        for j in order:
            r = runners[j]
            n = calls[j]
            if rewarm[j]:
                r()
            t0 = clock()
            for _ in range(n):
                r()
            samples[j].append((clock() - t0) / n)
        if on_round is not None:
            on_round(i)
        i += 1
    return [LatencyStats.from_samples(s, c) for s, c in zip(samples, calls)]


def session_create_times(
    factories: Sequence[Callable[[], Any]], *, rounds: int = 3, on_round: Callable[[int], None] | None = None
) -> list[list[float]]:
    """Seconds to build each session (interleaved like the latency rounds); one list of samples per factory."""
    out: list[list[float]] = [[] for _ in factories]
    for i in range(max(1, rounds)):
        for j, f in enumerate(factories):
            t0 = time.perf_counter()
            s = f()
            out[j].append(time.perf_counter() - t0)
            del s
        if on_round is not None:
            on_round(i)
    return out


def ort_session(path: str | os.PathLike, level: str = "all", threads: int = 1):
    """An onnxruntime CPU session for a model file at a graphopt level name (disable/basic/extended/all)."""
    from .verify import make_session

    if level not in LEVELS:
        raise InputError(f"--ort-level {level!r}: expected one of {', '.join(LEVELS)}")
    return make_session(str(path), level, threads)


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    ``VmHWM`` from /proc/self/status, not ``getrusage().ru_maxrss``: Linux carries ``ru_maxrss`` across
    ``exec``, so a child forked from a big parent would report the parent's peak (seen here: every tool
    "peaking" at the benchmark driver's 850 MiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_probe(path: str | os.PathLike, feeds_npz: str | os.PathLike, *, level: str = "all", threads: int = 1,
                 timeout: float = 600.0) -> dict[str, Any]:
    """Peak memory and cold start of one model, measured in a fresh Python process.

    Returns ``baseline_rss`` (bytes after importing onnxruntime), ``peak_rss`` (the process's peak),
    ``model_peak`` (peak minus baseline: what the model costs), ``session_s`` (session creation in a fresh
    process: the real cold start) and ``first_run_s``; or ``{"error": "..."}``.
    """
    cmd = [sys.executable, "-m", "graphopt.bench", "--probe", str(path), str(feeds_npz), level, str(threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        err = next((l.strip() for l in reversed(p.stderr.splitlines()) if l.strip()), f"exit {p.returncode}")
        return {"error": err[:300]}
    return json.loads(lines[-1])


def _probe_main(argv: list[str]) -> int:
    """The subprocess side of :func:`memory_probe` (prints one JSON line)."""
    import psutil

    path, feeds_npz, level, threads = argv[0], argv[1], argv[2], int(argv[3])
    import onnxruntime  # noqa: F401  (imported before the baseline so that it is not counted)

    from .verify import make_session

    with np.load(feeds_npz, allow_pickle=False) as z:
        feeds = {k: z[k] for k in z.files}
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    sess = make_session(path, level, threads)
    t1 = time.perf_counter()
    sess.run(None, feeds)
    t2 = time.perf_counter()
    peak = peak_rss_bytes()
    print(json.dumps({"baseline_rss": base, "peak_rss": peak, "model_peak": max(0, peak - base),
                      "session_s": t1 - t0, "first_run_s": t2 - t1}))
    return 0


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def model_feeds(model, *, inputs: str | os.PathLike | None = None, input_shapes: dict[str, list[int]] | None = None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """The feeds ``graphopt optimize`` would use: ``--inputs`` if given, else generated from the signature."""
    from .data import generate_feeds, load_feeds

    if inputs is not None:
        return load_feeds(inputs, model)
    return generate_feeds(model, seed=seed, input_shapes=input_shapes or {})[0]


def _batch_of(feeds: dict[str, np.ndarray]) -> int | None:
    for v in feeds.values():
        if getattr(v, "ndim", 0) >= 1:
            return int(v.shape[0])
    return None


def batched_feeds(model, batch: int, *, input_shapes: dict[str, list[int]] | None = None, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Generated feeds with leading dim ``batch``, or None when an input's leading dim is fixed to another value."""
    from .data import input_specs

    shapes = dict(input_shapes or {})
    for spec in input_specs(model):
        if spec.shape is None or not spec.shape:
            return None
        lead = spec.shape[0]
        if isinstance(lead, int) and lead != batch:
            return None
        if spec.name in shapes:
            shapes[spec.name] = [batch] + list(shapes[spec.name][1:])
        elif all(isinstance(d, int) for d in spec.shape[1:]):
            shapes[spec.name] = [batch] + list(spec.shape[1:])
        else:
            return None  # other symbolic dims: leave them to generate_feeds only through --input-shape
    from .data import generate_feeds

    return generate_feeds(model, seed=seed, input_shapes=shapes)[0]


# --------------------------------------------------------------------------------------------------
# bench_models: the whole measurement of `graphopt bench`
# --------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    level: str = "all"
    threads: int = 1
    rounds: int = 20
    warmup: int = 2
    batch: int | None = None
    session_rounds: int = 3
    probe_memory: bool = True
    seed: int = 0


@dataclass
class ModelBench:
    path: str
    nodes: int = 0
    file_bytes: int = 0
    batch: int | None = None
    latency: LatencyStats | None = None
    throughput: dict[str, Any] = field(default_factory=dict)
    session_s: float | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency"] = self.latency.to_dict(with_samples=True) if self.latency else None
        return d


def _count_nodes(model) -> int:
    """Nodes of ``model``, subgraphs included."""
    return sum(1 for _ in ir.proto_nodes(model.graph))


def _ratio(x: float | None, ref: float | None) -> float | None:
    if x is None or ref is None or not ref or math.isnan(x) or math.isnan(ref):
        return None
    return x / ref


def bench_models(
    paths: Sequence[str | os.PathLike],
    config: BenchConfig | None = None,
    *,
    inputs: str | os.PathLike | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> list[ModelBench]:
    """Measure every model of ``paths`` under the same conditions; ratios are against ``paths[0]``.

    ``progress(stage, steps_done)`` is called as work advances (see :func:`progress_steps`).
    """
    from . import ir

    cfg = config or BenchConfig()
    if cfg.level not in LEVELS:
        raise InputError(f"--ort-level {cfg.level!r}: expected one of {', '.join(LEVELS)}")
    if cfg.rounds < 1:
        raise InputError("--rounds must be at least 1")
    if cfg.threads < 1:
        raise InputError("--threads must be at least 1")
    if cfg.batch is not None and cfg.batch < 1:
        raise InputError("--batch must be at least 1")
    if not paths:
        raise InputError("give at least one model")
    tick = progress or (lambda stage, n: None)
    results: list[ModelBench] = []
    feeds_list: list[dict[str, np.ndarray]] = []
    models = []
    for p in paths:
        m = ir.load(p)
        models.append(m)
        feeds_list.append(model_feeds(m, inputs=inputs, input_shapes=input_shapes, seed=cfg.seed))
        results.append(ModelBench(str(p), nodes=_count_nodes(m), file_bytes=Path(p).stat().st_size, batch=_batch_of(feeds_list[-1])))

    sessions = []
    for p, r, f in zip(paths, results, feeds_list):
        try:
            s = ort_session(p, cfg.level, cfg.threads)
            s.run(None, f)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{p}: onnxruntime cannot run the model: {_first_line(e)}") from None
        sessions.append(s)
    tick("load", len(paths))

    # cold start (in-process session creation, interleaved)
    times = session_create_times([lambda p=p: ort_session(p, cfg.level, cfg.threads) for p in paths],
                                 rounds=cfg.session_rounds, on_round=lambda i: tick("session", 1))
    for r, t in zip(results, times):
        r.session_s = percentile(t, 50)

    # peak memory and process-level cold start, one fresh process per model
    if cfg.probe_memory:
        with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as d:
            for i, (p, r, f) in enumerate(zip(paths, results, feeds_list)):
                fp = os.path.join(d, f"feeds{i}.npz")
                np.savez(fp, **f)
                r.probe = memory_probe(p, fp, level=cfg.level, threads=cfg.threads)
                tick("memory", 1)

    # latency: interleaved rounds
    runners = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds_list)]
    stats = interleaved_latency(runners, rounds=cfg.rounds, warmup=cfg.warmup, seed=cfg.seed, on_round=lambda i: tick("latency", 1))
    for r, st in zip(results, stats):
        r.latency = st

    # throughput at the asked batch (the latency feeds' batch when none is asked or the batch is fixed)
    tp_feeds: list[dict[str, np.ndarray] | None] = []
    for m, r, f in zip(models, results, feeds_list):
        if cfg.batch is None or cfg.batch == r.batch or inputs is not None:
            tp_feeds.append(None)
        else:
            tp_feeds.append(batched_feeds(m, cfg.batch, input_shapes=input_shapes, seed=cfg.seed))
    need = [i for i, f in enumerate(tp_feeds) if f is not None]
    tp_stats: dict[int, LatencyStats] = {}
    if need:
        st = interleaved_latency([lambda s=sessions[i], f=tp_feeds[i]: s.run(None, f) for i in need],
                                 rounds=max(3, cfg.rounds // 2), warmup=cfg.warmup, on_round=lambda i: tick("throughput", 1))
        tp_stats = dict(zip(need, st))
    else:
        tick("throughput", max(3, cfg.rounds // 2))
    for i, r in enumerate(results):
        if i in tp_stats:
            b, st = cfg.batch, tp_stats[i]
            note = ""
        else:
            b, st = r.batch or 1, r.latency
            note = "" if cfg.batch is None or cfg.batch == b else f"batch fixed at {b} by the model or --inputs"
        r.throughput = {"batch": b, "per_s": (b / (st.median_ms / 1000.0)) if st and st.median_ms > 0 else None,
                        "median_ms": st.median_ms if st else None, "note": note}

    ref = results[0]
    for r in results:
        r.ratios = {
            "latency": _ratio(r.latency.median_ms, ref.latency.median_ms),
            "latency_p10": _ratio(r.latency.p10_ms, ref.latency.p10_ms),
            "throughput": _ratio(r.throughput.get("per_s"), ref.throughput.get("per_s")),
            "session": _ratio(r.session_s, ref.session_s),
            "memory": _ratio(r.probe.get("model_peak"), ref.probe.get("model_peak")),
            "size": _ratio(float(r.file_bytes), float(ref.file_bytes)),
        }
    return results


def progress_steps(n_models: int, cfg: BenchConfig) -> int:
    return n_models + max(1, cfg.session_rounds) + (n_models if cfg.probe_memory else 0) + cfg.rounds + max(3, cfg.rounds // 2)


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


# --------------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------------


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def display_names(results: Sequence[ModelBench]) -> list[str]:
    """File names, numbered where the same name appears twice (a model benched against itself)."""
    names = [Path(r.path).name for r in results]
    return [f"{n} #{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def results_table(results: Sequence[ModelBench], cfg: BenchConfig):
    from rich.table import Table

    names = display_names(results)
    t = Table(title=f"onnxruntime CPU, level={cfg.level}, threads={cfg.threads}, {cfg.rounds} interleaved rounds; ratios vs {names[0]}",
              header_style="bold", title_justify="left")
    for col in ("model", "nodes", "MiB", "median ms", "p10 ms", "p90 ms", "latency", "throughput /s", "tput",
                "session ms", "session", "cold ms", "peak MiB", "memory"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, r in zip(names, results):
        lat = r.latency
        tp = r.throughput.get("per_s")
        t.add_row(
            name, str(r.nodes), _mib(r.file_bytes), _fmt_ms(lat.median_ms), _fmt_ms(lat.p10_ms), _fmt_ms(lat.p90_ms),
            _fmt_ratio(r.ratios.get("latency")),
            "-" if tp is None else f"{tp:.1f} @{r.throughput.get('batch')}", _fmt_ratio(r.ratios.get("throughput")),
            _fmt_ms(None if r.session_s is None else r.session_s * 1000), _fmt_ratio(r.ratios.get("session")),
            _fmt_ms((r.probe["session_s"] + r.probe["first_run_s"]) * 1000) if "session_s" in r.probe else "-",
            _mib(r.probe.get("model_peak")) if "error" not in r.probe else "err", _fmt_ratio(r.ratios.get("memory")),
        )
    return t


def register_cli(main) -> None:
    import click

    ctx_settings = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

    @main.command(context_settings=ctx_settings)
    @click.argument("models", nargs=-1, required=True, type=click.Path(path_type=str))
    @click.option("--ort-level", type=click.Choice(list(LEVELS)), default="all", show_default=True,
                  help="onnxruntime graph optimization level (all: how users run models).")
    @click.option("--threads", type=int, default=1, show_default=True, help="intra-op threads (1 gives stable figures).")
    @click.option("--rounds", type=int, default=20, show_default=True, help="Interleaved latency rounds.")
    @click.option("--warmup", type=int, default=2, show_default=True)
    @click.option("--batch", type=int, default=None, help="Batch for the throughput figure (models with a dynamic leading dim).")
    @click.option("--inputs", type=click.Path(path_type=str), default=None, help="Inputs (.npz with input names as keys, or .pb).")
    @click.option("--input-shape", multiple=True, help="NAME:DIMS for symbolic dims, e.g. input:1x3x224x224 (repeatable).")
    @click.option("--no-memory", is_flag=True, help="Skip the per-model subprocess (peak memory, process cold start).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    def bench(models, ort_level, threads, rounds, warmup, batch, inputs, input_shape, no_memory, seed, as_json, no_progress, debug) -> None:
        """Latency (median/p10/p90), throughput, cold start and peak memory of MODELS under onnxruntime CPU.

        Rounds are interleaved (every model once per round, in a fresh seeded order each round); ratios are
        against the first model.  "session" is the median time to build a session in this process; "cold" is
        session + first run in a fresh process, where "peak" (peak RSS above the process's baseline) is measured.
        """
        from rich.console import Console

        from .data import parse_input_shapes

        for m in models:
            p = Path(m)
            if not p.exists():
                raise InputError(f"{p}: no such file")
            if p.is_dir():
                raise InputError(f"{p}: is a directory, not an ONNX file")
        if rounds < 1:
            raise InputError("--rounds must be at least 1")
        cfg = BenchConfig(level=ort_level, threads=threads, rounds=rounds, warmup=warmup, batch=batch,
                          probe_memory=not no_memory, seed=seed)
        shapes = parse_input_shapes(input_shape)
        err = Console(stderr=True, highlight=False)
        show = not no_progress and err.is_terminal
        if show:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), console=err, transient=True) as prog:
                task = prog.add_task("bench", total=progress_steps(len(models), cfg))
                res = bench_models(models, cfg, inputs=inputs, input_shapes=shapes,
                                   progress=lambda stage, n: prog.update(task, advance=n, description=stage))
        else:
            res = bench_models(models, cfg, inputs=inputs, input_shapes=shapes)
        if as_json:
            click.echo(json.dumps({"config": asdict(cfg), "models": [r.to_dict() for r in res]}, indent=2))
            return
        out = Console(highlight=False, soft_wrap=False, width=max(160, Console().width))
        out.print(results_table(res, cfg))
        notes: dict[str, list[str]] = {}
        for name, r in zip(display_names(res), res):
            if "error" in r.probe:
                notes.setdefault(f"memory probe failed: {r.probe['error']}", []).append(name)
            if r.throughput.get("note"):
                notes.setdefault(r.throughput["note"], []).append(name)
        for text, who in notes.items():
            out.print(f"note: {', '.join(who) if len(who) < len(res) else 'all models'}: {text}")


if __name__ == "__main__":  # pragma: no cover - the memory probe's entry point
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        sys.exit(_probe_main(sys.argv[2:]))
    print("usage: python -m graphopt.bench --probe MODEL FEEDS.npz LEVEL THREADS", file=sys.stderr)
    sys.exit(2)
