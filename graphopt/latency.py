"""Latency comparisons of models on onnxruntime CPU, the way the optimizer's target runs them.

Only ratios measured in one run mean anything on a shared machine: the models are run in
interleaved rounds (A, B, A, B, ...), one thread, ``ORT_ENABLE_ALL`` by default, and each model's
median is reported.  Passes that make latency decisions (quantization) call :func:`compare`.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import onnx

from .data import Feeds


def compare(
    models: Sequence[onnx.ModelProto],
    feeds: Feeds,
    *,
    level: str = "all",
    threads: int = 1,
    budget_seconds: float = 1.0,
    min_rounds: int = 5,
    max_rounds: int = 200,
    warmup: int = 2,
) -> list[float]:
    """Median seconds per run of each model on ``feeds``, measured in interleaved rounds.

    The number of rounds is chosen so the whole comparison takes about ``budget_seconds``.
    """
    from .verify import make_session

    sessions = [make_session(m, level, threads) for m in models]
    in_names = [[i.name for i in s.get_inputs()] for s in sessions]
    feeds_per = [{k: feeds[k] for k in names} for names in in_names]
    first = []
    for s, f in zip(sessions, feeds_per):
        for _ in range(warmup):
            s.run(None, f)
        t0 = time.perf_counter()
        s.run(None, f)
        first.append(time.perf_counter() - t0)
    per_round = max(sum(first), 1e-6)
    rounds = int(min(max_rounds, max(min_rounds, budget_seconds / per_round)))
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds_per[i])
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


_SATURATES: bool | None = None


def u8s8_saturates() -> bool:
    """Does this machine's onnxruntime int8 GEMM saturate u8 x s8 pair sums at int16?

    AVX2 kernels multiply with vpmaddubsw, which adds two u8*s8 products into an int16 and
    saturates (255*127*2 > 32767); VNNI / AMX / ARM kernels accumulate in int32.  Measured once with
    a one-node MatMulInteger whose exact result is known, not guessed from CPU flags.
    """
    global _SATURATES
    if _SATURATES is None:
        from onnx import TensorProto, helper, numpy_helper

        from .verify import make_session

        k = 64
        b = numpy_helper.from_array(np.full((k, 4), 127, np.int8), "b")
        g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [8, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [8, 4])], [b])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        try:
            y = make_session(m, "all").run(None, {"a": np.full((8, k), 255, np.uint8)})[0]
            _SATURATES = bool((y != k * 255 * 127).any())
        except Exception:
            _SATURATES = False
    return _SATURATES
