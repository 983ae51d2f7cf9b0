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


def bert_style(fusion, extra_out=""):
    text = f"""<ir_version: 10, opset_import: ["" : 23]>
g (float[1,8,64] q3, float[1,8,64] k3, float[1,8,64] v3, float[1,1,8,8] mask) => (float[1,8,64] y{extra_out}) {{
  q4 = Reshape(q3, sh4)
  q = Transpose<perm = [0,2,1,3]>(q4)
  k4 = Reshape(k3, sh4)
  kt = Transpose<perm = [0,2,3,1]>(k4)
  v4 = Reshape(v3, sh4)
  v = Transpose<perm = [0,2,1,3]>(v4)
  qk = MatMul(q, kt)
  scaled = Mul(qk, sc)
  sm_in = Add(scaled, mask)
  p = Softmax<axis = -1>(sm_in)
  o4 = MatMul(p, v)
  o = Transpose<perm = [0,2,1,3]>(o4)
  y = Reshape(o, sh3)
}}"""
    return fusion.build(text, sc=np.array(0.25, np.float32), sh4=np.array([1, 8, 4, 16], np.int64), sh3=np.array([1, 8, 64], np.int64))


def test_heads_3d_form(fusion):
    out = fusion.run(bert_style(fusion), "fuse-attention")
    assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["Attention"]
    attrs = {a.name: a for a in out.model.graph.node[0].attribute}
    assert attrs["q_num_heads"].i == 4 and attrs["kv_num_heads"].i == 4


def test_heads_3d_falls_back_to_4d_when_frame_leaks(fusion):
    # the head-split V is also a graph output: the 4-D form still applies, the frame stays
    out = fusion.run(bert_style(fusion, extra_out=", float[1,4,8,16] v"), "fuse-attention")
    assert out.stats == {"matched": 1, "rewritten": 1}
    assert "Attention" in out.ops and "Reshape" in out.ops


def test_heads_3d_keeps_a_reshape_to_2d(fusion):
    # GPT-2 after merge-chains: the head merge reshapes straight to [B*S, H*D] for the next Gemm
    m = bert_style(fusion)
    for init in m.graph.initializer:
        if init.name == "sh3":
            init.CopyFrom(__import__("onnx").numpy_helper.from_array(np.array([8, 64], np.int64), "sh3"))
    m.graph.output[0].type.tensor_type.shape.ClearField("dim")
    for d in (8, 64):
        m.graph.output[0].type.tensor_type.shape.dim.add().dim_value = d
    out = fusion.run(m, "fuse-attention")
    assert out.stats == {"matched": 1, "rewritten": 1}
    assert out.ops == ["Attention", "Reshape"]


def test_mask_first_and_computed(fusion):
    # Add(mask * -1e4, scores): the mask side is a Mul too, and comes first
    m = attn_model(fusion)
    for n in m.graph.node:
        if n.op_type == "Add":
            n.input[:] = ["mm", "scaled"]
    mul = __import__("onnx").helper.make_node("Mul", ["mask", "big"], ["mm"])
    m.graph.node.insert(0, mul)
    m.graph.initializer.append(__import__("onnx").numpy_helper.from_array(np.array(-3.0, np.float32), "big"))
    out = fusion.run(m, "fuse-attention")
    assert out.stats == {"matched": 1, "rewritten": 1}
    assert "Attention" in out.ops and "Mul" in out.ops  # the mask's own Mul stays
