"""Built-in passes, installed as ``graphopt.passes``: one module per pass, registered on import.

``BUILTIN`` says which module registers each built-in pass, so that a pipeline imports only the modules
of the passes it names (importing all of them is most of a short command's start-up);
``tests/test_registry.py`` checks it against what the modules register.
"""

BUILTIN = {
    "cse": "cleanup.cse",
    "dce": "cleanup.dce",
    "eliminate-noops": "cleanup.noops",
    "fold-constants": "fold.constants",
    "fuse-attention": "fusion.attention",
    "fuse-bias-gelu": "fusion.bias_gelu",
    "fuse-bn-gemm": "fusion.bn_gemm",
    "fuse-conv-activation": "fusion.conv_activation",
    "fuse-conv-bn": "fusion.conv_bn",
    "fuse-conv-scale": "fusion.conv_scale",
    "fuse-embed-layernorm": "fusion.embed_layernorm",
    "fuse-gelu": "fusion.gelu",
    "fuse-gelu-sigmoid": "fusion.gelu_sigmoid",
    "fuse-hardsigmoid": "fusion.hardsigmoid",
    "fuse-hardswish": "fusion.hardswish",
    "fuse-layernorm": "fusion.layernorm",
    "fuse-matmul-add": "fusion.matmul_add",
    "fuse-ort-attention": "fusion.ort_attention",
    "fuse-pad-conv": "fusion.pad_conv",
    "fuse-qk-scale": "fusion.qk_scale",
    "fuse-quick-gelu": "fusion.quick_gelu",
    "fuse-residual-gemm": "fusion.residual_gemm",
    "fuse-silu": "fusion.silu",
    "fuse-skip-layernorm": "fusion.skip_layernorm",
    "fuse-transpose-matmul": "fusion.transpose_matmul",
    "infer-shapes": "fold.infer_shapes",
    "merge-chains": "cleanup.merge_chains",
    "prune-channels": "prune.channels",
    "prune-magnitude": "prune.magnitude",
    "prune-nm": "prune.nm",
    "quantize-int8": "quant.int8",
    "unfuse-skip-layernorm": "fusion.unfuse_skip_layernorm",
}
