"""The -O presets, as pipeline text (explicit order: no pass is placed implicitly).

-O0 does nothing; -O1 is lossless cleanup; -O2 adds portable fusions (standard ONNX ops only); -O3
adds onnxruntime-specific fusions (com.microsoft contrib ops).  A preset only names passes that are
registered; each pass family adds itself to the preset it belongs to here.
"""
from __future__ import annotations

import functools

from .errors import PipelineError

# fuse-silu is registered but not in -O2: its target op (Swish, opset 24) has no onnxruntime CPU kernel
# in 1.32, so the fused model would not run where graphopt verifies it.  fuse-gelu-sigmoid is registered
# but not in -O2 either: its 6-op tanh GELU is faster under ORT_DISABLE_ALL, but onnxruntime's own
# FastGelu fusion (ORT_ENABLE_ALL, how -O2 output is usually run) no longer recognises it (gpt2_mini:
# 1.018x the original with it, 0.977x without).  -O3 fuses either form into FastGelu/BiasGelu.
PRESETS: dict[str, str] = {
    "O0": "",
    "O1": "fixpoint{max-iter=6}(fold-constants,merge-chains,eliminate-noops,cse,dce)",
    "O2": "O1,fixpoint{max-iter=4}(fuse-pad-conv,fuse-conv-bn,fuse-conv-scale,fuse-bn-gemm,fuse-matmul-add,"
          "fuse-transpose-matmul,fuse-qk-scale,fuse-layernorm,fuse-gelu,fuse-hardswish,fuse-hardsigmoid,fuse-attention,merge-chains,eliminate-noops,cse,dce)",
    "O3": "O2,fuse-ort-attention,fuse-embed-layernorm,fuse-bias-gelu,fuse-quick-gelu,fuse-conv-activation,unfuse-skip-layernorm,fuse-residual-gemm,"
          "merge-chains,eliminate-noops,dce",
}


def preset_pipeline(name: str):
    """The preset's pipeline, a fresh copy each call (callers may edit it); the text is parsed once."""
    key = name.upper().lstrip("-")
    if key not in PRESETS:
        raise PipelineError(f"unknown preset '{name}' (presets: {', '.join(PRESETS)})")
    return _parsed(PRESETS[key]).copy()


@functools.lru_cache(maxsize=16)
def _parsed(text: str):
    """Keyed by the text, so a preset edited in ``PRESETS`` is parsed again; never handed out itself."""
    from .pipeline import parse_pipeline

    return parse_pipeline(text)
