import numpy as np


def attn_model(fusion, opset=23, mask_shape="1,1,8,8", k_perm="[0,2,3,1]", extra_out="", scale_op="Mul(qk, sc)", cast=False):
    sm = "p = Softmax<axis = -1>(sm_in)"
    if cast:
        sm = "p0 = Softmax<axis = -1>(sm_in)\n  p = Cast<to = 1>(p0)"
    mask_in = f", float[{mask_shape}] mask" if mask_shape else ""
    add = "sm_in = Add(scaled, mask)" if mask_shape else "sm_in = Identity(scaled)"
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
g (float[1,4,8,16] q, float[1,8,4,16] kr, float[1,4,8,16] v{mask_in}) => (float[1,4,8,16] y{extra_out}) {{
  kt = Transpose<perm = {k_perm}>(kr)
  qk = MatMul(q, kt)
  scaled = {scale_op}
  {add}
  {sm}
  y = MatMul(p, v)
}}"""
    return fusion.build(text, sc=np.array(0.25, np.float32))


def test_fuses_to_attention(fusion):
    for kw in ({}, {"cast": True}, {"mask_shape": "8,8"}, {"scale_op": "Div(qk, sc)"}):
        out = fusion.run(attn_model(fusion, **kw), "fuse-attention")
        assert out.stats == {"matched": 1, "rewritten": 1}, kw
        assert sorted(out.ops) == ["Attention", "Transpose"], kw
        perm = [a for n in out.model.graph.node if n.op_type == "Transpose" for a in n.attribute][0].ints
        assert list(perm) == [0, 2, 1, 3]


def test_refused_before_opset_23(fusion):
    out = fusion.run(attn_model(fusion, opset=21), "fuse-attention")
    assert out.stats == {"matched": 1, "rewritten": 0} and "Attention needs opset 23" in out.result.skipped[0]


def test_refuses_broadcast_query_mask_and_leaks(fusion):
    out = fusion.run(attn_model(fusion, mask_shape="1,1,1,8"), "fuse-attention")
    assert out.stats["rewritten"] == 0 and "query axis would broadcast" in out.result.skipped[0]
    out = fusion.run(attn_model(fusion, extra_out=", float[1,4,8,8] p"), "fuse-attention")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]
    out = fusion.run(attn_model(fusion, scale_op="Mul(qk, qk)"), "fuse-attention")
    assert out.stats["matched"] == 0
