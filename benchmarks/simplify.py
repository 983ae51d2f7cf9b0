"""-O1 against its peers and against plain load+save, in one run.

Node counts: graphopt -O1 vs onnxsim vs onnxslim (vs onnxruntime's BASIC level, optimized model written
out) on every model given.  Wall time: ``graphopt optimize -O1 --verify off`` through the Python API
(load, check, passes, export, save) against ``onnx.load`` + ``onnx.save`` of the same model, measured
interleaved (A, B, A, B, ...) on one thread (onnxsim and onnxslim, load and save included, in
the same rounds), with an identical-model control pair (A vs A') that shows
the noise.  Times are medians; ratios are medians of per-round ratios (each run against the mean of
the two load+save timings around it).

    python benchmarks/simplify.py ../shared/corpus/*.onnx ../shared/digits/*.onnx --rounds 7

``--fresh``: every timing in a process of its own, the way ``graphopt optimize`` runs (a long-lived
process reuses memory the previous call faulted in, which favours whichever call comes second);
imports and a warm-up call on the bundled tiny model are excluded on every side, and the A, B, A'
order of a round stays (the peers, unless ``--no-peers``, run between B and A').  ``--no-warmup``
times the first call instead, as compare.py does: it then carries what a process pays once, such as
the operator schema registry onnx builds on the first check or shape inference (load+save needs none).

``--cli``: the commands as a user times them, each a process of its own from interpreter start to exit:
``graphopt optimize MODEL -o OUT -O1 --verify off -q`` (the console script beside this Python) against
``python -c "onnx.save(onnx.load(MODEL), OUT)"``.  Both start Python and import onnx; graphopt imports
more.  Whether Python may cache compiled modules (PYTHONDONTWRITEBYTECODE) is taken from the
environment and printed: without the cache graphopt's own modules compile on every run.

``--floor`` (in-process rounds only): also times, in the same rounds, the work outside Python that
-O1's guarantees call for, with no IR and no passes: read the file, parse it, onnx.checker and shape
inference on the model without its big weights (``graphopt.ir.light_model``, as graphopt runs them),
serialize with the inferred shapes, and write through a temporary file and a rename.  Its
ratio (column ``floor x``) is what is left of the 2x budget for everything graphopt does in Python.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx


def _peer_counts(path: str) -> dict[str, object]:
    out: dict[str, object] = {}
    try:
        import onnxsim

        m, ok = onnxsim.simplify(onnx.load(path))
        out["onnxsim"] = len(m.graph.node) if ok else "check failed"
    except Exception as e:  # a peer failing is a result, not a crash
        out["onnxsim"] = f"error: {type(e).__name__}"
    try:
        import onnxslim

        out["onnxslim"] = len(onnxslim.slim(onnx.load(path)).graph.node)
    except Exception as e:
        out["onnxslim"] = f"error: {type(e).__name__}"
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as d:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = os.path.join(d, "basic.onnx")
            so.intra_op_num_threads = 1
            ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            out["ort-basic"] = len(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)
    except Exception as e:
        out["ort-basic"] = f"error: {type(e).__name__}"
    return out


def _run_peer(peer: str, path: str, out: str) -> None:
    if peer == "onnxsim":
        import onnxsim

        m, _ = onnxsim.simplify(onnx.load(path))
    else:
        import onnxslim

        m = onnxslim.slim(onnx.load(path))
    onnx.save(m, out)


_TINY = str(Path(__file__).resolve().parents[1] / "fixtures" / "tiny_cnn.onnx")

# One timing in a fresh process: argv = clock, tool, model, output folder, warm-up model, this folder.
# Prints seconds.
_FRESH = """
import sys, time, onnx
clock = time.perf_counter if sys.argv[1] == "wall" else time.thread_time
tool, path, d = sys.argv[2:5]
if tool == "graphopt":
    from graphopt import api
    run = lambda p, out: api.optimize(p, "O1", output=out, verify="off")
elif tool == "onnx":
    def run(p, out):
        onnx.save(onnx.load(p), out)
else:  # a peer, run as the in-process rounds run it
    sys.path.insert(0, sys.argv[6])
    from simplify import _run_peer
    __import__(tool)  # (imported inside _run_peer: here, so that no timing includes it)
    run = lambda p, out: _run_peer(tool, p, out)
if sys.argv[5] != "-":
    run(sys.argv[5], d + "/warm.onnx")  # imports and first-call work, on another (tiny) model
t = clock()
run(path, d + "/out.onnx")
print(clock() - t)
"""


def _floor(path: str, out: str) -> None:
    """What -O1 with nothing to rewrite costs outside Python: load, check, infer shapes, save atomically."""
    with open(path, "rb") as f:
        data = f.read()
    from graphopt.ir import light_model

    m = onnx.ModelProto()
    m.ParseFromString(data)
    light = light_model(m)  # (as graphopt checks and infers: big weights left out)
    onnx.checker.check_model(light)
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    m.graph.value_info.extend(inferred.graph.value_info)
    tmp = out + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, m.SerializeToString())
    finally:
        os.close(fd)
    os.replace(tmp, out)


def _fresh(clock: str, tool: str, path: str, d: str, warmup: bool = True) -> float:
    out = subprocess.run([sys.executable, "-c", _FRESH, clock, tool, path, d, _TINY if warmup else "-",
                          str(Path(__file__).parent)],
                         capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise SystemExit(f"{tool} on {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.split()[-1])


_LOAD_SAVE = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"


def _command(tool: str, path: str, d: str) -> float:
    """Wall time of one whole command (interpreter start to exit)."""
    if tool == "graphopt":
        exe = Path(sys.executable).with_name("graphopt")
        cmd = [str(exe), "optimize", path, "-o", d + "/cli.onnx", "-O1", "--verify", "off", "-q"]
    else:
        cmd = [sys.executable, "-c", _LOAD_SAVE, path, d + "/cli.onnx"]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    elapsed = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{tool} on {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    return elapsed


def _ms(x: float) -> str:
    return f"{x * 1e3:6.0f}ms" if x == x else f"{'-':>8s}"  # (nan: not measured)


def _fmt(x: float | None) -> str:
    return f"{x:6.2f}" if x is not None else f"{'-':>6s}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="each timing in a fresh process (peers too, unless --no-peers)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="with --fresh: time the first call of the process, as compare.py does (imports still excluded)")
    ap.add_argument("--cli", action="store_true", help="whole commands, interpreter start to exit (peers not timed; "
                    "wall clock)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this thread's CPU time (user+sys), which other processes on a shared machine "
                         "disturb less than wall time")
    ap.add_argument("--floor", action="store_true",
                    help="also time load, check, shape inference and an atomic save without IR or passes "
                         "(in-process rounds only)")
    args = ap.parse_args(argv)
    if args.cli and (args.fresh or args.clock != "wall"):
        ap.error("--cli times whole commands by the wall clock: not with --fresh or --clock cpu")
    separate = args.fresh or args.cli
    if args.no_warmup and not args.fresh:
        ap.error("--no-warmup goes with --fresh")
    if args.floor and separate:
        ap.error("--floor is timed in the in-process rounds: not with --fresh or --cli")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from graphopt import api

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for path in args.models:
            name = Path(path).stem
            n0 = len(onnx.load(path, load_external_data=False).graph.node)
            res = api.optimize(path, "O1", verify="end")
            n1 = len(res.model.graph.node)
            peers = {} if args.no_peers else _peer_counts(path)
            a, a2, b = [], [], []
            peer_t: dict[str, list[float]] = {"onnxsim": [], "onnxslim": []}
            passes_t = []
            floor_t: list[float] = []
            if args.cli:  # the first run of a command may compile and cache modules: not timed
                _command("graphopt", path, d), _command("onnx", path, d)
            for _ in range(args.rounds if separate else 0):
                one = ((lambda tool: _command(tool, path, d)) if args.cli else
                       (lambda tool: _fresh(args.clock, tool, path, d, warmup=not args.no_warmup)))
                a.append(one("onnx"))
                b.append(one("graphopt"))
                if args.fresh and not args.no_peers:
                    for peer in ("onnxsim", "onnxslim"):
                        try:
                            peer_t[peer].append(one(peer))
                        except SystemExit:  # a peer failing is a result (its node count says how), not a crash
                            pass
                a2.append(one("onnx"))
                passes_t.append(float("nan"))
            for _ in range(0 if separate else args.rounds):
                gc.collect()  # each timed call starts without the garbage of the one before (peers leave plenty)
                t = clock()
                m = onnx.load(path)
                onnx.save(m, os.path.join(d, "a.onnx"))
                a.append(clock() - t)
                gc.collect()  # each timed call starts without the garbage of the one before (peers leave plenty)
                t = clock()
                r = api.optimize(path, "O1", output=os.path.join(d, "b.onnx"), verify="off")
                b.append(clock() - t)
                passes_t.append(r.report.seconds["passes"])
                if args.floor:
                    gc.collect()
                    t = clock()
                    _floor(path, os.path.join(d, "f.onnx"))
                    floor_t.append(clock() - t)
                if not args.no_peers:
                    for peer in ("onnxsim", "onnxslim"):
                        gc.collect()
                        t = clock()
                        try:
                            _run_peer(peer, path, os.path.join(d, f"{peer}.onnx"))
                            peer_t[peer].append(clock() - t)
                        except Exception:
                            pass
                gc.collect()  # each timed call starts without the garbage of the one before (peers leave plenty)
                t = clock()
                m = onnx.load(path)
                onnx.save(m, os.path.join(d, "c.onnx"))
                a2.append(clock() - t)
            ma, ma2, mb = statistics.median(a), statistics.median(a2), statistics.median(b)
            # Ratios are taken round by round, against the mean of the two load+save timings around
            # each run (same machine state), and the median of those is reported: on a shared machine
            # the baseline itself drifts by tens of percent between rounds.
            base = [(x + y) / 2 for x, y in zip(a, a2)]
            ratio = statistics.median(bi / ai for bi, ai in zip(b, base))
            control = statistics.median(y / x for x, y in zip(a, a2))
            peer_ratio = {k: (statistics.median(vi / ai for vi, ai in zip(v, base)) if len(v) == len(base) else
                              (statistics.median(v) / ma if v else None)) for k, v in peer_t.items()}
            if floor_t:
                peer_ratio["floor"] = statistics.median(fi / ai for fi, ai in zip(floor_t, base))
            rows.append((name, n0, n1, res.verification.status, peers, ma, mb, ratio, control, statistics.median(passes_t),
                         peer_ratio))
    how = (f", each timing in a fresh process{' (its first call)' if args.no_warmup else ''}" if args.fresh else
           f", whole commands (Python caches compiled modules: {'no' if os.environ.get('PYTHONDONTWRITEBYTECODE') else 'yes'})"
           if args.cli else "")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        how += f", glibc mmap threshold fixed at {os.environ['MALLOC_MMAP_THRESHOLD_']}"
    print(f"clock: {args.clock}, {args.rounds} interleaved rounds{how}, medians")
    print(f"{'model':22s} {'nodes':>6s} {'-O1':>5s} {'onnxsim':>8s} {'onnxslim':>9s} {'ort-basic':>9s} {'verify':>7s} "
          f"{'load+save':>10s} {'-O1 total':>10s} {'ratio':>6s} {'control':>8s} {'passes':>8s} {'sim x':>6s} {'slim x':>6s}"
          + (f" {'floor x':>7s}" if args.floor else ""))
    for name, n0, n1, st, peers, ma, mb, ratio, ctl, pt, pr in rows:
        print(f"{name:22s} {n0:6d} {n1:5d} {str(peers.get('onnxsim', '-')):>8s} {str(peers.get('onnxslim', '-')):>9s} "
              f"{str(peers.get('ort-basic', '-')):>9s} {st:>7s} {ma * 1e3:8.0f}ms {mb * 1e3:8.0f}ms {ratio:6.2f} {ctl:8.2f} {_ms(pt)} "
              f"{_fmt(pr.get('onnxsim'))} {_fmt(pr.get('onnxslim'))}" + (f" {_fmt(pr.get('floor')):>7s}" if args.floor else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
