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
