import numpy as np

HDR = '<ir_version: 8, opset_import: ["" : 17]>'


def model(fusion, pads, value=None, mode="constant", conv_attrs="pads = [1,0,1,0]", extra_out=""):
    v = ", pv" if value is not None else ""
    text = f"""{HDR}
g (float[1,3,6,6] x) => (float[1,4,H,W] y{extra_out}) {{
  p = Pad<mode = "{mode}">(x, pads{v})
  y = Conv<{conv_attrs}>(p, w, b)
}}"""
    ws = dict(w=fusion.rnd(4, 3, 3, 3), b=fusion.rnd(4), pads=np.array(pads, np.int64))
    if value is not None:
        ws["pv"] = np.array(value, np.float32)
    return fusion.build(text, **ws)


def test_pad_folds_into_conv_pads(fusion):
    out = fusion.run(model(fusion, [0, 0, 1, 2, 0, 0, 3, 1], value=0.0), "fuse-pad-conv")
    assert out.stats == {"matched": 1, "rewritten": 1} and out.ops == ["Conv"]
    pads = [a for a in out.model.graph.node[0].attribute if a.name == "pads"][0].ints
    assert list(pads) == [2, 2, 4, 1]


def test_refusals(fusion):
    out = fusion.run(model(fusion, [0, 0, 1, 1, 0, 0, 1, 1], value=1.0), "fuse-pad-conv")
    assert out.stats["rewritten"] == 0 and "not 0" in out.result.skipped[0]
    out = fusion.run(model(fusion, [0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"), "fuse-pad-conv")
    assert out.stats["rewritten"] == 0 and "reflect" in out.result.skipped[0]
    out = fusion.run(model(fusion, [0, 1, 1, 1, 0, 0, 1, 1]), "fuse-pad-conv")
    assert out.stats["rewritten"] == 0 and "channel" in out.result.skipped[0]
    out = fusion.run(model(fusion, [0, 0, -1, 0, 0, 0, 0, 0]), "fuse-pad-conv")
    assert out.stats["rewritten"] == 0 and "crops" in out.result.skipped[0]
    out = fusion.run(model(fusion, [0, 0, 1, 1, 0, 0, 1, 1], conv_attrs='auto_pad = "SAME_UPPER"'), "fuse-pad-conv")
    assert out.stats["rewritten"] == 0 and "auto_pad" in out.result.skipped[0]
    out = fusion.run(model(fusion, [0, 0, 1, 1, 0, 0, 1, 1], extra_out=", float[1,3,8,8] p"), "fuse-pad-conv")
    assert out.stats["rewritten"] == 0 and "graph output" in out.result.skipped[0]


def test_pad_amounts_as_graph_input_refused(fusion):
    text = f"""{HDR}
g (float[1,3,6,6] x, int64[8] pads) => (float[1,4,H,W] y) {{
  p = Pad(x, pads)
  y = Conv(p, w)
}}"""
    out = fusion.run(fusion.build(text, w=fusion.rnd(4, 3, 3, 3)), "fuse-pad-conv", check_numerics=False)
    assert out.stats["rewritten"] == 0 and "not constant" in out.result.skipped[0]
