"""Per fusion, per corpus model: matched / rewritten and the top refusal reasons, for -O2 and -O3 (verified).

    python benchmarks/fusion_counts.py [--shared ../shared] [--presets O2 O3] [--json out.json] [models...]

Counts come from graphopt's own report (``fusion_o2.fusion_table``: rewrites summed over the -O2 fixpoint's
iterations, refusals as of the last iteration, matched = rewritten + refused).  Passes that matched nothing
on a model are left out of its rows.  No latency here (see transformer_latency.py / compare.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fusion_o2 import fusion_table  # noqa: E402

from graphopt.api import optimize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--shared", default=os.environ.get("GRAPHOPT_SHARED", str(Path(__file__).resolve().parents[2] / "shared")))
    ap.add_argument("--presets", nargs="+", default=["O2", "O3"])
    ap.add_argument("--reasons", type=int, default=2, help="refusal reasons shown per fusion")
    ap.add_argument("--json")
    a = ap.parse_args()
    paths = [Path(m) for m in a.models] or sorted((Path(a.shared) / "corpus").glob("*.onnx"))
    out: dict = {}
    for p in paths:
        for preset in a.presets:
            sample = p.with_suffix(".npz")
            r = optimize(str(p), preset, inputs=str(sample) if sample.exists() else None, verify="end")
            table = fusion_table(r.report)
            v = r.verification.status if r.verification else "off"
            print(f"## {p.stem} -{preset}: verification {v}; nodes {r.report.before['nodes']} -> {r.report.after['nodes']}")
            rows = {}
            for name, d in table.items():
                if d["matched"] == 0:
                    continue
                top = "; ".join(f"{n}x {why}" for why, n in d["reasons"].most_common(a.reasons))
                print(f"   {name:<24} matched {d['matched']:3d}  rewritten {d['rewritten']:3d}" + (f"  refused: {top}" if top else ""))
                rows[name] = {"matched": d["matched"], "rewritten": d["rewritten"], "reasons": dict(d["reasons"].most_common(a.reasons))}
            out[f"{p.stem}/{preset}"] = {"verification": v, "nodes": [r.report.before["nodes"], r.report.after["nodes"]], "fusions": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
