"""``prune-nm``: N:M semi-structured sparsity (keep ``n`` of every ``m`` consecutive weights).

Groups run along the reduction axis the way sparse kernels read them: a Gemm / MatMul's input
features, a Conv's input channels (for each kernel tap).  A layer whose reduction size is not a
multiple of ``m`` is left dense (reported).  With calibration data the mask and the remaining weights
come from the layer-wise OBS reconstruction of :mod:`.reconstruct`.

Like unstructured sparsity this shrinks the compressed file; only hardware with N:M sparse kernels
(e.g. 2:4 on recent GPUs) turns it into speed, and onnxruntime's CPU kernels do not.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass
from graphopt.errors import PipelineError

from .common import find_layers
from .magnitude import run_unstructured
from .reconstruct import Target, nm_permutation


def is_nm(w: np.ndarray, n: int, m: int) -> bool:
    """Every group of ``m`` along the last axis holds at most ``n`` nonzeros."""
    if w.shape[-1] % m:
        return False
    return bool((np.count_nonzero(w.reshape(-1, m), axis=1) <= n).all())


@register_pass
class PruneNM(Pass):
    name = "prune-nm"
    exact = False
    description = "N:M sparsity (n of every m weights kept along the reduction axis), OBS reconstruction"

    @dataclass(frozen=True)
    class Options:
        n: int = 2
        m: int = 4
        exclude: tuple[str, ...] = ()

    def __init__(self, **options):
        super().__init__(**options)
        if not 0 < self.options.n < self.options.m:
            raise PipelineError(f"prune-nm: need 0 < n < m, got n={self.options.n} m={self.options.m}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        n, m = self.options.n, self.options.m
        skipped: list[str] = []
        graph.toposort()
        layers = find_layers(graph, self.options.exclude, skipped)
        targets = []
        for l in layers:
            perm = nm_permutation(l)
            W = l.matrix()
            if l.kind == "conv":
                red = int(l.weight.shape[1])
                if int(l.node.attrs.get("group", 1)) != 1:
                    skipped.append(f"{l.name}: grouped Conv left dense")
                    continue
            else:
                red = W.shape[1]
            if red % m:
                skipped.append(f"{l.name}: reduction size {red} is not a multiple of {m}")
                continue
            if is_nm(W[:, perm] if perm is not None else W, n, m):
                continue  # already N:M
            targets.append(Target(l, sparsity=1.0 - n / m, nm=(n, m), perm=perm))
        return run_unstructured(graph, ctx, targets, skipped, {"layers": len(layers), "pattern_n": n, "pattern_m": m})
