#!/usr/bin/env python
"""Run graphopt over the ONNX backend test data (issue 2's round trip, issue 4's correctness bar).

    python benchmarks/backend_suite.py -O0                   # every case, the no-pass round trip
    python benchmarks/backend_suite.py -O2 --json o2.json    # every case, -O2; failures to JSON
    python benchmarks/backend_suite.py --passes fold-constants,dce --sample 150 -k test_if

Prints the counts (cases, reproduced by onnxruntime, pass / unchanged / failed) and every failure with
its first error line.  Exit status 1 when a case fails.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "backend"))

import harness  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    for lvl in ("O0", "O1", "O2", "O3"):
        g.add_argument(f"-{lvl}", dest="pipeline", action="store_const", const=lvl)
    g.add_argument("--passes", dest="pipeline", help="a pipeline text instead of a preset")
    ap.add_argument("--kinds", default=",".join(harness.KINDS), help="comma-separated: " + ",".join(harness.KINDS))
    ap.add_argument("--sample", type=int, default=0, help="only the fixed fast sample of this many cases")
    ap.add_argument("-k", dest="match", default="", help="only cases whose id contains this text")
    ap.add_argument("-j", "--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per case")
    ap.add_argument("--verify", choices=["off", "end", "each"], default="off",
                    help="graphopt's own verification during optimize (default off: the stored outputs are the judge)")
    ap.add_argument("--plugin", action="append", default=[], help="a plugin module or file (repeatable)")
    ap.add_argument("--json", help="write counts, failures and skips to this file")
    ap.add_argument("--show-skipped", action="store_true", help="list the cases onnxruntime does not reproduce")
    args = ap.parse_args(argv)
    pipeline = args.pipeline or "O0"

    t0 = time.perf_counter()
    cases = harness.load_cases([k.strip() for k in args.kinds.split(",") if k.strip()])
    if args.sample:
        cases = harness.fast_sample(cases, args.sample)
    if args.match:
        cases = [c for c in cases if args.match in c.id]
    t_load = time.perf_counter() - t0

    def progress(i: int, n: int, r) -> None:
        if sys.stderr.isatty():
            print(f"\r{i}/{n} {r.case[:60]:60s}", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = harness.run_suite(cases, pipeline, workers=args.workers, timeout=args.timeout, plugins=args.plugin, verify=args.verify, progress=progress)
    t_run = time.perf_counter() - t0
    if sys.stderr.isatty():
        print(file=sys.stderr)

    s = harness.summarize(results)
    print(f"pipeline: {pipeline!r}   verify: {args.verify}   onnx {harness.onnx.__version__}   load {t_load:.1f} s, run {t_run:.1f} s ({args.workers} workers)")
    by_kind = Counter(c.kind for c in cases)
    print("cases: " + ", ".join(f"{k} {v}" for k, v in by_kind.items()) + f"; total {s['cases']}")
    print(f"reproduced by onnxruntime (ORT_DISABLE_ALL): {s['reproduced_by_onnxruntime']}   skipped: {s['skipped']}")
    print(f"pass: {s['pass']}   unchanged: {s['unchanged']}   failed: {s['failed']}")
    print(f"nodes over the reproduced cases: {s['nodes_before']} -> {s['nodes_after']}")
    if s["original_fails_full_check"]:
        print(f"reproduced cases whose original already fails onnx.checker(full_check=True): {s['original_fails_full_check']}"
              " (their result is held to the plain checker; listed under 'notes' in the JSON)")
    if args.verify != "off":
        print(f"graphopt's own verification said 'not verified' (and exported) on {s['graphopt_not_verified']} reproduced cases")
    if args.show_skipped:
        print("\nskipped (onnxruntime does not reproduce the original):")
        for r in results:
            if r.status == "skipped":
                print(f"  {r.case}: {r.reason}")
    if s["failed"]:
        cats = Counter(r.category for r in results if r.status == "failed")
        print("\nfailed (" + ", ".join(f"{k} {v}" for k, v in cats.most_common()) + "):")
        for r in results:
            if r.status == "failed":
                print(f"  {r.case}: {r.reason}")
    if args.json:
        harness.write_json(args.json, pipeline, results)
        print(f"\nwrote {args.json}")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
