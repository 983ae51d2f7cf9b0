"""-O3 (onnxruntime contrib-op fusions) on the shared corpus: what fused, against the peer, and latency.

For every corpus model: graphopt -O3 (verified), the per-pass matched / rewritten counts and top refusal;
for the transformers, the com.microsoft ops that ``onnxruntime.transformers.optimizer.optimize_model``
(model_type bert / gpt2, num_heads=4, hidden_size=256) produces at opt_level 0 and 1; then latency under
ORT_ENABLE_ALL (how users run): -O3 output / original, interleaved rotated rounds, 1 thread, with an
identical-model control pair for the noise (see o3_latency.py).

    python benchmarks/o3_fusions.py --shared ../shared --rounds 20 --iters 10 --clock cpu --stat min
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).parent))
import o3_latency  # noqa: E402

import graphopt  # noqa: E402

TRANSFORMERS = {"bert_mini": "bert", "gpt2_mini": "gpt2"}


def ms_ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft")


def peer(path: Path, model_type: str, level: int, out: Path) -> Counter:
    if level > 0 and "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            # optimize_by_onnxruntime imports torch only to read torch.version.hip / .cuda; without torch
            # installed, a stand-in with both None keeps the peer on its CPU path.
            tv = types.ModuleType("torch.version")
            tv.cuda = tv.hip = None
            t = types.ModuleType("torch")
            t.version = tv
            sys.modules["torch"], sys.modules["torch.version"] = t, tv
    from onnxruntime.transformers.optimizer import optimize_model

    m = optimize_model(str(path), model_type=model_type, num_heads=4, hidden_size=256, opt_level=level)
    m.save_model_to_file(str(out))
    return ms_ops(m.model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    ap.add_argument("--stat", choices=["median", "min"], default="min")
    ap.add_argument("--no-latency", action="store_true")
    a = ap.parse_args()
    corpus = Path(a.shared) / "corpus"
    names = a.models or sorted(p.stem for p in corpus.glob("*.onnx"))
    tmp = Path(tempfile.mkdtemp(prefix="o3_"))
    for name in names:
        src = corpus / f"{name}.onnx"
        npz = corpus / f"{name}.npz"
        res = graphopt.optimize(src, "O3", inputs=npz if npz.exists() else None)
        out = tmp / f"{name}.O3.onnx"
        res.save(out)
        print(f"\n## {name}: -O3 {res.verification.summary()[:90]}")
        print(f"   nodes {len(onnx.load(src, load_external_data=False).graph.node)} -> {len(res.model.graph.node)}; "
              f"com.microsoft ops {dict(ms_ops(res.model))}")
        for r in res.report.passes:
            if r.name.startswith(("fuse-", "unfuse-")) and r.stats.get("matched"):
                top = Counter(s.split(": ", 1)[-1] for s in r.skipped).most_common(1)
                print(f"   {r.name:24s} {r.stats}" + (f"  top refusal: {top[0][0]} (x{top[0][1]})" if top else ""))
        cands = [str(out)]
        if name in TRANSFORMERS:
            fus = graphopt.optimize(src, "fold-constants,dce,fuse-ort-attention,fuse-embed-layernorm,fuse-skip-layernorm,"
                                    "fuse-bias-gelu,fuse-quick-gelu,dce", inputs=npz)
            print(f"   every -O3 fusion incl. fuse-skip-layernorm: {dict(ms_ops(fus.model))}")
            for level in (0, 1):
                p = tmp / f"{name}.peer{level}.onnx"
                print(f"   peer optimize_model(opt_level={level}):     {dict(peer(src, TRANSFORMERS[name], level, p))}")
                cands.append(str(p))
        if a.no_latency:
            continue
        r = o3_latency.measure(str(src), cands, a.rounds, a.iters, clock=a.clock, stat=a.stat)
        lo, hi = r["control_spread"]
        print(f"   latency ORT_ENABLE_ALL, 1 thread, {a.rounds} rounds x {a.iters} calls, {a.clock} clock, per-round {a.stat}; "
              f"original {r['original_ms']:.2f} ms")
        print(f"     control (same model)  {r['control']:.3f}x  [rounds {lo:.3f}..{hi:.3f}]")
        for c, (med, lo, hi, ms) in r["candidates"].items():
            print(f"     {Path(c).name:22s}{med:.3f}x  [rounds {lo:.3f}..{hi:.3f}]  {ms:.2f} ms")
        ks = o3_latency.kernel_sums([str(src)] + cands + [str(src)])
        print(f"   sum of per-node fastest kernel times (profiler, interleaved, 200 calls): original {ks[0]:.3f} ms, "
              f"original again {ks[-1]:.3f} ms; " + ", ".join(f"{Path(c).name} {k:.3f} ms ({k / ks[0]:.3f}x)" for c, k in zip(cands, ks[1:-1])))


if __name__ == "__main__":
    main()
