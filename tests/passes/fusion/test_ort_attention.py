"""fuse-ort-attention: BERT (mask), GPT-2 (packed QKV, causal + padding mask), ViT (no mask) patterns."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tests.passes.fusion._ort_testlib import assert_same, build, full_check, ops, run_pass, weights  # noqa: E402

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
QKV = weights(0, wq=(16, 16), wk=(16, 16), wv=(16, 16), bq=(16,), bk=(16,), bv=(16,))

BERT_BODY = """
  qm = MatMul(x, wq)
  q = Add(bq, qm)
  km = MatMul(x, wk)
  k = Add(km, bk)
  vm = MatMul(x, wv)
  v = Add(bv, vm)
  q4 = Reshape(q, s4)
  k4 = Reshape(k, s4)
  v4 = Reshape(v, s4)
  qt = Transpose<perm=[0,2,1,3]>(q4)
  kt = Transpose<perm=[0,2,3,1]>(k4)
  vt = Transpose<perm=[0,2,1,3]>(v4)
  s = MatMul(qt, kt)
  ss = Mul(s, scale)
  a = Add(ss, mask)
  p = Softmax<axis=-1>(a)
  o = MatMul(p, vt)
  ot = Transpose<perm=[0,2,1,3]>(o)
  y = Reshape(ot, s3)
"""
CONSTS = "<int64[4] s4 = {1,8,-1,8}, int64[3] s3 = {1,8,16}, float scale = {0.35355339}>"


def bert(body: str = BERT_BODY, sig: str = "(float[1,8,16] x, float[1,1,8,8] mask) => (float[1,8,16] y)", consts: str = CONSTS, **w):
    return build(f"{HEADER}\ng {sig} {consts} {{{body}}}", **{**QKV, **w})


def feeds(batch: int = 1, mask_shape=(1, 1, 8, 8), seed: int = 1):
    rng = np.random.default_rng(seed)
    f = {"x": rng.standard_normal((batch, 8, 16)).astype(np.float32)}
    if mask_shape is not None:
        f["mask"] = np.where(rng.random(mask_shape) < 0.3, np.float32(-3.4028235e38), 0).astype(np.float32)
    return f


def test_bert_style_with_additive_mask():
    m = bert()
    m2, r = run_pass(m, "fuse-ort-attention")
    assert r.changed and r.stats == {"matched": 1, "rewritten": 1} and not r.skipped
    assert ops(m2) == {"Attention": 1}
    node = m2.graph.node[0]
    assert node.domain == "com.microsoft"
    attrs = {a.name: a for a in node.attribute}
    assert attrs["num_heads"].i == 2 and abs(attrs["scale"].f - 0.35355339) < 1e-7
    assert node.input[5] == "mask"  # attention_bias: the model's own additive mask
    full_check(m2)
    assert_same(m, m2, feeds())
    m3, r3 = run_pass(m2, "fuse-ort-attention")
    assert not r3.changed and r3.stats["rewritten"] == 0


def test_vit_style_no_mask_div_scale_and_double_transpose_k():
    body = BERT_BODY.replace("kt = Transpose<perm=[0,2,3,1]>(k4)", "kh = Transpose<perm=[0,2,1,3]>(k4)\n  kt = Transpose<perm=[0,1,3,2]>(kh)")
    body = body.replace("ss = Mul(s, scale)\n  a = Add(ss, mask)\n  p = Softmax<axis=-1>(a)", "ss = Div(s, root)\n  p = Softmax<axis=3>(ss)")
    m = bert(body, "(float[1,8,16] x) => (float[1,8,16] y)", "<int64[4] s4 = {1,8,2,8}, int64[3] s3 = {1,8,16}, float root = {2.8284271}>")
    m2, r = run_pass(m, "fuse-ort-attention")
    assert r.stats["rewritten"] == 1 and ops(m2) == {"Attention": 1}
    assert len([i for i in m2.graph.node[0].input]) == 3  # no mask input
    full_check(m2)
    assert_same(m, m2, feeds(mask_shape=None))


GPT2 = """
  x2 = Reshape(x, s2)
  g = Gemm(x2, w, b)
  g3 = Reshape(g, s3w)
  q, k, v = Split<axis=2>(g3, sizes)
  q4 = Reshape(q, s4)
  k4 = Reshape(k, s4)
  v4 = Reshape(v, s4)
  qt = Transpose<perm=[0,2,1,3]>(q4)
  kt = Transpose<perm=[0,2,3,1]>(k4)
  vt = Transpose<perm=[0,2,1,3]>(v4)
  s = MatMul(qt, kt)
  ss = Mul(s, scale)
  keep = And(causal, pad)
  bias = Where(keep, zero, neg)
  a = Add(ss, bias)
  p = Softmax<axis=-1>(a)
  pc = Cast<to=1>(p)
  o = MatMul(pc, vt)
  ot = Transpose<perm=[0,2,1,3]>(o)
  y = Reshape(ot, s3)
"""


def test_gpt2_style_packed_qkv_causal_and_padding_mask():
    causal = np.tril(np.ones((8, 8), dtype=bool)).reshape(1, 1, 8, 8)
    w = weights(2, w=(16, 48), b=(48,))
    m = build(
        f"{HEADER}\ng (float[1,8,16] x, bool[1,1,1,8] pad) => (float[1,8,16] y) "
        "<int64[2] s2 = {-1,16}, int64[3] s3w = {1,8,48}, int64[3] sizes = {16,16,16}, int64[4] s4 = {1,8,2,8}, "
        "int64[3] s3 = {1,8,16}, float scale = {0.35355339}, float zero = {0.0}, float neg = {-3.4028235e38}> "
        f"{{{GPT2}}}",
        causal=causal, **w,
    )
    m2, r = run_pass(m, "fuse-ort-attention")
    assert r.stats["rewritten"] == 1, r.skipped
    assert ops(m2) == {"Attention": 1, "And": 1, "Where": 1}  # the mask subgraph stays
    full_check(m2)
    pad = np.ones((1, 1, 1, 8), dtype=bool)
    pad[..., 6:] = False
    f = {"x": np.random.default_rng(3).standard_normal((1, 8, 16)).astype(np.float32), "pad": pad}
    assert_same(m, m2, f)


def test_dynamic_batch_fuses_and_runs_for_batch_3():
    m = bert(sig="(float[N,8,16] x, float[1,1,8,8] mask) => (float[N,8,16] y)",
             consts="<int64[4] s4 = {0,0,2,8}, int64[3] s3 = {0,0,16}, float scale = {0.35355339}>")
    m2, r = run_pass(m, "fuse-ort-attention")
    assert r.stats["rewritten"] == 1, r.skipped
    full_check(m2)
    assert_same(m, m2, feeds(batch=3))


def _layer(i: int, inp: str, out: str) -> str:
    """One BERT attention block with its own weights (wq{i}, ...), reading the shared ``mask``."""
    return f"""
  qm{i} = MatMul({inp}, wq{i})
  q{i} = Add(bq{i}, qm{i})
  km{i} = MatMul({inp}, wk{i})
  k{i} = Add(km{i}, bk{i})
  vm{i} = MatMul({inp}, wv{i})
  v{i} = Add(bv{i}, vm{i})
  q4{i} = Reshape(q{i}, s4)
  k4{i} = Reshape(k{i}, s4)
  v4{i} = Reshape(v{i}, s4)
  qt{i} = Transpose<perm=[0,2,1,3]>(q4{i})
  kt{i} = Transpose<perm=[0,2,3,1]>(k4{i})
  vt{i} = Transpose<perm=[0,2,1,3]>(v4{i})
  s{i} = MatMul(qt{i}, kt{i})
  ss{i} = Mul(s{i}, scale)
  a{i} = Add(ss{i}, mask)
  p{i} = Softmax<axis=-1>(a{i})
  o{i} = MatMul(p{i}, vt{i})
  ot{i} = Transpose<perm=[0,2,1,3]>(o{i})
  {out} = Reshape(ot{i}, s3)
"""


def test_key_only_mask_is_expanded_over_queries_once_for_all_layers():
    # classic BERT export: (1 - mask[:, None, None, :]) * -10000, shape [B, 1, 1, S], shared by the layers
    w = {f"{k}{i}": v for i in (1, 2) for k, v in weights(i, wq=(16, 16), wk=(16, 16), wv=(16, 16), bq=(16,), bk=(16,), bv=(16,)).items()}
    m = build(f"{HEADER}\ng (float[1,8,16] x, float[1,1,1,8] mask) => (float[1,8,16] y) {CONSTS} "
              f"{{{_layer(1, 'x', 'h')}{_layer(2, 'h', 'y')}}}", **w)
    m2, r = run_pass(m, "fuse-ort-attention")
    assert r.stats == {"matched": 2, "rewritten": 2}, r.skipped
    assert ops(m2) == {"Attention": 2, "Expand": 1}
    full_check(m2)
    assert_same(m, m2, feeds(mask_shape=(1, 1, 1, 8)))


def test_refuses_a_2d_mask():
    m = bert(sig="(float[1,8,16] x, float[8,8] mask) => (float[1,8,16] y)")
    m2, r = run_pass(m, "fuse-ort-attention")
    assert not r.changed and r.stats == {"matched": 1, "rewritten": 0}
    assert "additive mask has shape" in r.skipped[0]
    assert m2.graph.node[-1].op_type == "Reshape"


def test_refuses_shared_weight():
    body = BERT_BODY + "  z = MatMul(x, wk)\n"
    m = bert(body, "(float[1,8,16] x, float[1,1,8,8] mask) => (float[1,8,16] y, float[1,8,16] z)")
    _, r = run_pass(m, "fuse-ort-attention")
    assert not r.changed and "shared outside" in r.skipped[0]


def test_refuses_weight_as_graph_input():
    w = {k: v for k, v in QKV.items() if k != "wv"}
    m = build(f"{HEADER}\ng (float[1,8,16] x, float[1,1,8,8] mask, float[16,16] wv) => (float[1,8,16] y) {CONSTS} {{{BERT_BODY}}}", **w)
    _, r = run_pass(m, "fuse-ort-attention")
    assert not r.changed and "not a linear layer with constant weights" in r.skipped[0]


def test_refuses_when_probabilities_are_a_graph_output():
    m = bert(sig="(float[1,8,16] x, float[1,1,8,8] mask) => (float[1,8,16] y, float[1,2,8,8] s)")
    _, r = run_pass(m, "fuse-ort-attention")
    assert not r.changed and "graph output" in r.skipped[0]


def test_refuses_when_probabilities_are_read_elsewhere():
    m = bert(BERT_BODY + "  pp = Identity(p)\n", "(float[1,8,16] x, float[1,1,8,8] mask) => (float[1,8,16] y, float[1,2,8,8] pp)")
    _, r = run_pass(m, "fuse-ort-attention")
    assert not r.changed and r.stats["matched"] == 1 and "also read by Identity" in r.skipped[0]


def test_refuses_cross_attention():
    body = BERT_BODY.replace("km = MatMul(x, wk)", "km = MatMul(mem, wk)").replace("vm = MatMul(x, wv)", "vm = MatMul(mem, wv)")
    m = bert(body, "(float[1,8,16] x, float[1,8,16] mem, float[1,1,8,8] mask) => (float[1,8,16] y)")
    _, r = run_pass(m, "fuse-ort-attention")
    assert not r.changed and "different inputs" in r.skipped[0]


def test_attention_inside_a_subgraph_is_left_alone():
    inner = BERT_BODY.replace("y = Reshape(ot, s3)", "yy = Reshape(ot, s3)")
    m = build(
        f"{HEADER}\ng (float[1,8,16] x, float[1,1,8,8] mask, bool c) => (float[1,8,16] y) {CONSTS} {{\n"
        f"  y = If(c) <then_branch = t () => (float[1,8,16] yy) {{{inner}}}, "
        "else_branch = e () => (float[1,8,16] yy) { yy = Identity(x) }>\n}", **QKV,
    )
    _, r = run_pass(m, "fuse-ort-attention")
    assert not r.changed and r.stats["matched"] == 0


def test_heads_merged_straight_to_2d_keep_that_reshape():
    # what -O1 leaves when it merges GPT-2's "merge heads" Reshape with the 2-D Reshape before c_proj
    body = BERT_BODY.replace("y = Reshape(ot, s3)", "y = Reshape(ot, s2)")
    m = bert(body, "(float[1,8,16] x, float[1,1,8,8] mask) => (float[8,16] y)",
             "<int64[4] s4 = {1,8,-1,8}, int64[2] s2 = {8,16}, float scale = {0.35355339}>")
    m2, r = run_pass(m, "fuse-ort-attention")
    assert r.stats["rewritten"] == 1, r.skipped
    assert ops(m2) == {"Attention": 1, "Reshape": 1}
    full_check(m2)
    assert_same(m, m2, feeds())
