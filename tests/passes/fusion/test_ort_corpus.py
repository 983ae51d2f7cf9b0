"""The -O3 onnxruntime fusions on the real exported transformers (../shared/corpus), against the peer
``onnxruntime.transformers.optimizer.optimize_model(model_type=..., num_heads=4, hidden_size=256,
opt_level=0)``: graphopt must fuse at least as much, without a model-type flag, and verify exactly."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.data import load_feeds

FUSIONS = "fold-constants,dce,fuse-ort-attention,fuse-embed-layernorm,fuse-skip-layernorm,fuse-bias-gelu,fuse-quick-gelu,dce"
PEER_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
            "EmbedLayerNormalization", "QuickGelu")


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft")


def _stats(report) -> dict[str, dict[str, int]]:
    return {r.name: r.stats for r in report.passes if r.name.startswith("fuse-")}


def _peer_counts(path, model_type: str) -> Counter:
    from onnxruntime.transformers.optimizer import optimize_model

    m = optimize_model(str(path), model_type=model_type, num_heads=4, hidden_size=256, opt_level=0)
    return Counter({k: v for k, v in m.get_fused_operator_statistics().items() if k in PEER_OPS and v})


@pytest.mark.corpus
@pytest.mark.parametrize("name,model_type,expect", [
    ("bert_mini", "bert", {"Attention": 4, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 8, "BiasGelu": 4}),
    ("gpt2_mini", "gpt2", {"Attention": 4, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 8, "FastGelu": 4}),
])
def test_fusion_counts_match_or_beat_the_peer_and_verify(shared_dir, name, model_type, expect):
    path = shared_dir / "corpus" / f"{name}.onnx"
    res = graphopt.optimize(path, FUSIONS, inputs=shared_dir / "corpus" / f"{name}.npz", verify="end")
    assert res.verification.ok, res.verification.summary()
    got = _ops(res.model)
    assert dict(got) == expect
    stats = _stats(res.report)
    assert stats["fuse-ort-attention"] == {"matched": 4, "rewritten": 4}
    assert stats["fuse-embed-layernorm"]["rewritten"] == 1
    peer = _peer_counts(path, model_type)
    for op, n in peer.items():
        if op == "LayerNormalization":
            continue
        assert got[op] >= n, f"peer fused {n} {op}, graphopt {got[op]}"
    assert sum(got.values()) > sum(peer.values())
    # the sample output in the .npz (onnxruntime, ORT_DISABLE_ALL) at the exact tolerance
    d = np.load(shared_dir / "corpus" / f"{name}.npz")
    from graphopt.verify import Runner, compare_arrays

    feeds = load_feeds(shared_dir / "corpus" / f"{name}.npz", res.model)
    out = Runner(res.model, allow_reference=False).run(feeds)
    for k, v in out.items():
        assert compare_arrays(k, d[k], v).ok


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["bert_mini", "gpt2_mini"])
def test_O3_preset_on_the_transformers(shared_dir, name):
    res = graphopt.optimize(shared_dir / "corpus" / f"{name}.onnx", "O3", inputs=shared_dir / "corpus" / f"{name}.npz")
    assert res.verification.ok
    got = _ops(res.model)
    assert got["Attention"] == 4 and got["EmbedLayerNormalization"] == 1
    assert got["SkipLayerNormalization"] == 0  # kept apart on purpose (unfuse-skip-layernorm)
    assert got["BiasGelu" if name == "bert_mini" else "FastGelu"] == 4
    gelus = [n for n in res.model.graph.node if n.op_type in ("BiasGelu", "FastGelu")]
    assert all(len(n.input) == 2 for n in gelus)  # the bias rides along (GPT-2: from the Reshape/Gemm detour)
    stats = _stats(res.report)
    if name == "bert_mini":  # post-LN: every residual bias moved into a LayerNorm beta, no Add left
        assert stats["fuse-residual-gemm"]["rewritten"] == 8
        assert not any(n.op_type == "Add" for n in res.model.graph.node)
    else:
        total = Counter()
        for r in res.report.passes:  # -O2's fixpoint runs these more than once: count every run
            total[r.name] += r.stats.get("rewritten", 0)
        assert total["fuse-qk-scale"] == 4 and total["fuse-gelu-sigmoid"] == 0  # not in -O2: see presets.py


@pytest.mark.corpus
@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet1_1", "mobilenet_v3_small", "mobilenet_v2", "resnet18", "efficientnet_b0"])
def test_O3_preset_on_the_cnns(shared_dir, name):
    res = graphopt.optimize(shared_dir / "corpus" / f"{name}.onnx", "O3", inputs=shared_dir / "corpus" / f"{name}.npz")
    assert res.verification.ok
    if name == "efficientnet_b0":
        assert _ops(res.model)["QuickGelu"] == 49  # SiLU = QuickGelu(alpha=1)


def _decompose_layernorms(model: onnx.ModelProto) -> onnx.ModelProto:
    """bert_mini as an exporter without the LayerNormalization op (opset < 17) writes it:
    ReduceMean / Sub / Pow / ReduceMean / Add / Sqrt / Div / Mul / Add."""
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for i, n in enumerate(m.graph.node):
        if n.op_type != "LayerNormalization":
            nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        x, g, b = n.input
        p = f"ln{i}_"
        m.graph.initializer.extend([numpy_helper.from_array(np.array(2.0, np.float32), p + "two"),
                                    numpy_helper.from_array(np.array(eps, np.float32), p + "eps")])
        nodes += [
            helper.make_node("ReduceMean", [x], [p + "mu"], axes=[-1]),
            helper.make_node("Sub", [x, p + "mu"], [p + "d"]),
            helper.make_node("Pow", [p + "d", p + "two"], [p + "sq"]),
            helper.make_node("ReduceMean", [p + "sq"], [p + "var"], axes=[-1]),
            helper.make_node("Add", [p + "var", p + "eps"], [p + "ve"]),
            helper.make_node("Sqrt", [p + "ve"], [p + "sd"]),
            helper.make_node("Div", [p + "d", p + "sd"], [p + "n"]),
            helper.make_node("Mul", [p + "n", g], [p + "ng"]),
            helper.make_node("Add", [p + "ng", b], [n.output[0]]),
        ]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@pytest.mark.corpus
def test_decomposed_layernorm_form_of_bert_mini(shared_dir):
    model = _decompose_layernorms(onnx.load(shared_dir / "corpus" / "bert_mini.onnx"))
    assert not any(n.op_type == "LayerNormalization" for n in model.graph.node)
    res = graphopt.optimize(model, FUSIONS, inputs=shared_dir / "corpus" / "bert_mini.npz")
    assert res.verification.ok, res.verification.summary()
    assert dict(_ops(res.model)) == {"Attention": 4, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 8, "BiasGelu": 4}
