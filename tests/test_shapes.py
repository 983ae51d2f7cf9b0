"""graphopt.shapes: onnx shape inference written onto the IR, through onnxruntime contrib ops too."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs

from graphopt import ir, shapes


def test_shapes_flow_through_contrib_ops_a_pass_introduced():
    # the model imports no com.microsoft opset (as when a -O3 pass creates the first contrib node)
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x, int64[2,16] ids) => (float[1,4,8,8] y, float[2,16,32] e) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = Relu(c)
        g1 = Gather(emb, ids)
        e = Relu(g1)
    }""")
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((100, 32), np.float32), "emb"))
    g = ir.import_model(m)
    conv, relu, gather, relu2 = g.nodes
    fused = gs.Variable("fused")
    g.nodes.append(gs.Node("FusedConv", domain="com.microsoft", attrs={"pads": [1, 1, 1, 1], "activation": "Relu"},
                           inputs=list(conv.inputs), outputs=[fused]))
    relu.inputs[0] = fused
    gelu = gs.Variable("gelu")
    g.nodes.append(gs.Node("FastGelu", domain="com.microsoft", inputs=[gather.outputs[0]], outputs=[gelu]))
    relu2.inputs[0] = gelu
    conv.outputs.clear()
    g.cleanup()
    ir.toposort(g)
    assert shapes.infer_shapes(g, template=m) > 0
    assert fused.shape == [1, 4, 8, 8] and gelu.shape == [2, 16, 32]


def test_stand_ins_only_where_they_describe_every_node():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[1,8,16] x, float[16,48] w, float[48] b) => (float[1,8,16] y) {
        y = com.microsoft.Attention <num_heads = 2, qkv_hidden_sizes = [16, 16, 16]> (x, w, b)
    }""")
    assert shapes.contrib_functions(m) == []  # qkv_hidden_sizes: the value width need not be the input's
    del m.graph.node[0].attribute[1]
    assert [f.name for f in shapes.contrib_functions(m)] == ["Attention"]


def test_tensors_of_one_type_get_shapes_of_their_own():
    # inference decodes each distinct type once: the tensors sharing it must not share a shape list
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x, int64[3] s) => (float[N,4] y, int64[3] z) {
        a = Relu(x)
        b = Sigmoid(a)
        y = Tanh(b)
        z = Identity(s)
    }""")
    g = ir.import_model(m)
    a, b = g.nodes[0].outputs[0], g.nodes[1].outputs[0]
    assert shapes.infer_shapes(g, template=m) == 2
    assert a.shape == b.shape == ["N", 4] and a.shape is not b.shape and a.dtype == b.dtype == np.float32
    a.shape[1] = 5
    assert b.shape == ["N", 4]
    assert g.outputs[0].shape == ["N", 4] and g.outputs[1].shape == [3]  # declared, as they were
