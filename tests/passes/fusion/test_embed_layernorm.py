"""fuse-embed-layernorm: word + position (+ segment) lookups + LayerNorm -> EmbedLayerNormalization."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tests.passes.fusion._ort_testlib import assert_same, build, full_check, ops, run_pass, weights  # noqa: E402

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
W = weights(0, word=(50, 16), seg=(2, 16), pos=(1, 8, 16), table=(12, 16), gamma=(16,), beta=(16,))
IDS = np.random.default_rng(1).integers(0, 50, (2, 8)).astype(np.int64)
SEG = np.random.default_rng(2).integers(0, 2, (2, 8)).astype(np.int64)


def model(body, ins="int64[2,8] ids, int64[2,8] tt", outs="float[2,8,16] y", consts="", **extra):
    return build(f"{HEADER}\ng ({ins}) => ({outs}) {consts} {{{body}}}", **{**W, **extra})


BERT = ("w = Gather(word, ids)\n s = Gather(seg, tt)\n ws = Add(w, s)\n e = Add(ws, pos)\n"
        " y = LayerNormalization<axis=-1, epsilon=1e-12>(e, gamma, beta)")


def test_bert_embeddings_with_segments():
    m = model(BERT)
    m2, r = run_pass(m, "fuse-embed-layernorm")
    assert r.stats == {"matched": 1, "rewritten": 1}
    assert ops(m2) == {"EmbedLayerNormalization": 1, "Cast": 2}  # int64 ids -> int32
    full_check(m2)
    assert_same(m, m2, {"ids": IDS, "tt": SEG})
    assert not run_pass(m2, "fuse-embed-layernorm")[1].changed


def test_gpt2_embeddings_sum_feeds_the_residual_and_positions_by_lookup():
    body = ("w = Gather(word, ids)\n p = Gather(table, positions)\n e = Add(w, p)\n"
            " n = LayerNormalization<axis=-1, epsilon=1e-5>(e, gamma, beta)\n y = Add(n, e)")
    m = model(body, ins="int64[2,8] ids", consts="<int64[1,8] positions = {0,1,2,3,4,5,6,7}>")
    m2, r = run_pass(m, "fuse-embed-layernorm")
    assert r.stats["rewritten"] == 1
    node = next(n for n in m2.graph.node if n.op_type == "EmbedLayerNormalization")
    assert node.output[2] == "e"  # embedding_sum still feeds the residual Add
    full_check(m2)
    assert_same(m, m2, {"ids": IDS})


def test_refuses_positions_that_are_not_0_to_s():
    body = "w = Gather(word, ids)\n p = Gather(table, positions)\n e = Add(w, p)\n y = LayerNormalization<axis=-1>(e, gamma, beta)"
    m = model(body, ins="int64[2,8] ids", consts="<int64[1,8] positions = {2,3,4,5,6,7,8,9}>")
    _, r = run_pass(m, "fuse-embed-layernorm")
    assert not r.changed and "position ids are not 0..7" in r.skipped[0]


def test_refuses_dynamic_sequence_length():
    m = build(f"{HEADER}\ng (int64[2,S] ids) => (float[2,S,16] y) "
              "{ w = Gather(word, ids)\n e = Add(w, pos)\n y = LayerNormalization<axis=-1>(e, gamma, beta) }", **W)
    _, r = run_pass(m, "fuse-embed-layernorm")
    assert not r.changed and "static S" in r.skipped[0]


def test_refuses_when_a_lookup_is_read_elsewhere():
    m = model(BERT + "\n z = Identity(w)", outs="float[2,8,16] y, float[2,8,16] z")
    _, r = run_pass(m, "fuse-embed-layernorm")
    assert not r.changed and "also read by" in r.skipped[0]
