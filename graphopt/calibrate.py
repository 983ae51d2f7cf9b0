"""Streaming calibration statistics over intermediate activations.

Statistics are accumulated batch by batch from ``ctx.calibration_batches()``: only one batch of
activations is alive at a time, so memory does not grow with the number of samples (onnxruntime's
calibrators keep every intermediate tensor of every sample).  Used by quantization (activation
ranges, per-channel input means for bias correction) and by pruning (activation magnitudes).

Range methods: ``minmax`` (one pass), ``percentile`` (a second pass builds a fixed-range histogram
between the observed min and max and clips both tails at the given percentile), ``entropy`` (the same
second-pass histogram; the clipping threshold minimizes the KL divergence between the tensor's
distribution and its 8-bit quantized version).  Histograms have a fixed number of bins over a range
fixed by the first pass, so memory is O(tensors x bins) whatever the number of samples.  ``mse``: the
same histogram; the range (both ends free) with the least expected squared quantization error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from .pass_base import PassContext

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class TensorStats:
    """Running statistics of one float tensor over all calibration samples."""

    name: str
    channel_axis: int | None = None  # keep a per-channel mean along this axis (None: no mean)
    count: int = 0  # batches seen
    min: float = float("inf")
    max: float = float("-inf")
    abs_mean_sum: float = 0.0
    elements: int = 0
    channel_sum: np.ndarray | None = None
    channel_n: int = 0
    hist: np.ndarray | None = None
    hist_range: tuple[float, float] | None = None

    def update(self, a: np.ndarray) -> None:
        a = np.asarray(a)
        if a.size == 0 or a.dtype.kind != "f":
            return
        a32 = a.astype(np.float32, copy=False)
        finite = a32[np.isfinite(a32)] if not np.isfinite(a32).all() else a32
        if finite.size == 0:
            return
        self.count += 1
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))
        self.abs_mean_sum += float(np.abs(finite, dtype=np.float64).sum())
        self.elements += int(finite.size)
        if self.channel_axis is not None and a32.ndim > 0:
            ax = self.channel_axis % a32.ndim
            axes = tuple(i for i in range(a32.ndim) if i != ax)
            s = a32.sum(axis=axes, dtype=np.float64)
            self.channel_sum = s if self.channel_sum is None or self.channel_sum.shape != s.shape else self.channel_sum + s
            self.channel_n += int(a32.size // max(a32.shape[ax], 1))

    def update_hist(self, a: np.ndarray, bins: int) -> None:
        a = np.asarray(a)
        if a.size == 0 or a.dtype.kind != "f" or self.hist_range is None:
            return
        lo, hi = self.hist_range
        h, _ = np.histogram(a[np.isfinite(a)], bins=bins, range=(lo, hi))
        self.hist = h.astype(np.int64) if self.hist is None else self.hist + h

    @property
    def channel_mean(self) -> np.ndarray | None:
        if self.channel_sum is None or self.channel_n == 0:
            return None
        return (self.channel_sum / self.channel_n).astype(np.float32)

    @property
    def mean_abs(self) -> float:
        return self.abs_mean_sum / self.elements if self.elements else 0.0

    def range(self, method: str = "minmax", percentile: float = 99.99) -> tuple[float, float]:
        """The (low, high) range to quantize to; both ends always include 0."""
        if self.count == 0:
            return 0.0, 0.0
        lo, hi = self.min, self.max
        if method == "percentile" and self.hist is not None and self.hist.sum() > 0:
            edges = np.linspace(self.hist_range[0], self.hist_range[1], len(self.hist) + 1)
            cdf = np.cumsum(self.hist) / self.hist.sum()
            tail = max(0.0, 1.0 - percentile / 100.0)
            if lo < 0:
                lo = float(edges[int(np.searchsorted(cdf, tail, side="left"))])
            hi = float(edges[min(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, len(edges) - 1)])
        elif method == "entropy" and self.hist is not None and self.hist.sum() > 0:
            lo, hi = entropy_range(self.hist, self.hist_range)
        elif method == "mse" and self.hist is not None and self.hist.sum() > 0:
            lo, hi = mse_range(self.hist, self.hist_range)
        return min(lo, 0.0), max(hi, 0.0)


def _kl_cost(p: np.ndarray, clipped: np.ndarray, levels: int) -> float:
    """KL(P || Q): P is the candidate's histogram with the clipped mass folded into its edge bins, Q
    the histogram without it merged into ``levels`` equal groups of bins, each group's mass spread
    evenly over the group's non-empty bins (the distribution 8-bit quantization keeps)."""
    n = len(p)
    idx = (np.arange(n) * levels) // n  # group of each bin
    mass = np.bincount(idx, weights=clipped, minlength=levels)
    nz = clipped > 0
    cnt = np.bincount(idx, weights=nz.astype(np.float64), minlength=levels)
    q = np.where(nz, mass[idx] / np.maximum(cnt[idx], 1), 0.0)
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        return float("inf")
    pn, qn = p / ps, q / qs
    on = pn > 0
    if (qn[on] == 0).any():  # mass where the quantized version has none (a folded outlier): smooth
        qn = (qn + 1e-4 / n) / (1 + 1e-4)
    return float(np.sum(pn[on] * np.log(pn[on] / qn[on])))


def entropy_range(hist: np.ndarray, hist_range: tuple[float, float], levels: int = 256,
                  max_candidates: int = 192) -> tuple[float, float]:
    """The clipping range whose 8-bit quantization loses the least information (min KL divergence).

    The histogram covers [lo, hi] (lo <= 0 <= hi or a one-sided range).  Candidate ranges are
    [-T, T] intersected with the observed range, for thresholds T swept over the histogram: a
    one-sided tensor (after Relu) keeps its zero end, a lopsided one (after GELU) its short side.
    The bin holding 0 is set to its neighbours' mean first: exact zeros (half of a Relu output) are
    exact in every candidate grid and would otherwise dominate the divergence.
    """
    h = np.asarray(hist, dtype=np.float64).copy()
    lo, hi = float(hist_range[0]), float(hist_range[1])
    n = len(h)
    if n <= levels or hi <= lo:
        return lo, hi
    edges = np.linspace(lo, hi, n + 1)
    z = int(np.clip(np.searchsorted(edges, 0.0, side="right") - 1, 0, n - 1))  # bin holding 0
    nb = [h[i] for i in (z - 1, z + 1) if 0 <= i < n]
    h[z] = min(h[z], float(np.mean(nb))) if nb else h[z]
    left, right = z, n - 1 - z  # bins on each side of the zero bin
    widest = max(left, right)
    best, best_cost = (lo, hi), float("inf")
    step = max(1, (widest - levels // 2) // max_candidates)
    for k in list(range(max(levels // 2, 1), widest, step)) + [widest]:
        a, b = z - min(left, k), z + min(right, k)
        if b - a + 1 < levels:
            continue
        clipped = h[a:b + 1]
        p = clipped.copy()
        p[0] += h[:a].sum()
        p[-1] += h[b + 1:].sum()
        cost = _kl_cost(p, clipped, levels)
        if cost < best_cost:
            best_cost, best = cost, (float(edges[a]), float(edges[b + 1]))
    if best_cost == float("inf"):
        return lo, hi
    return max(best[0], lo), min(best[1], hi)


def mse_range(hist: np.ndarray, hist_range: tuple[float, float], levels: int = 256, max_candidates: int = 384) -> tuple[float, float]:
    """The range [a, b] (a <= 0 <= b, ends chosen independently) whose uint8 quantization has the least
    expected squared error on the histogram: rounding noise step^2 / 12 for the values inside, plus
    (x - end)^2 for the clipped values outside.  All candidate pairs are scored at once from cumulative
    sums, so the search costs O(candidates^2) array arithmetic and no pass over the data."""
    h = np.asarray(hist, dtype=np.float64)
    lo, hi = float(hist_range[0]), float(hist_range[1])
    n = len(h)
    if n < 2 or hi <= lo or h.sum() <= 0:
        return lo, hi
    edges = np.linspace(lo, hi, n + 1)
    c = (edges[:-1] + edges[1:]) / 2
    z = int(np.clip(np.searchsorted(edges, 0.0, side="right") - 1, 0, n - 1))
    # candidate lower ends: edges[0..z] (a <= 0); upper ends: edges[z+1..n] (b >= 0)
    ia = np.unique(np.linspace(0, z, min(z + 1, max_candidates)).round().astype(int))
    ib = np.unique(np.linspace(z + 1, n, min(n - z, max_candidates)).round().astype(int))
    c0, c1, c2 = (np.concatenate([[0.0], np.cumsum(h * c ** p)]) for p in (0, 1, 2))  # prefix sums over bins
    a, b = edges[ia], edges[ib]
    # clipped below a: bins [0, ia): sum n (c - a)^2 = S2 - 2 a S1 + a^2 S0
    low = c2[ia] - 2 * a * c1[ia] + a * a * c0[ia]
    # clipped above b: bins [ib, n)
    S0, S1, S2 = c0[n] - c0[ib], c1[n] - c1[ib], c2[n] - c2[ib]
    high = S2 - 2 * b * S1 + b * b * S0
    inside = c0[ib][None, :] - c0[ia][:, None]
    step = (b[None, :] - a[:, None]) / (levels - 1)
    err = low[:, None] + high[None, :] + inside * step * step / 12.0
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return max(float(a[i]), lo), min(float(b[j]), hi)


def collect_stats(
    ctx: "PassContext",
    model: "onnx.ModelProto",
    names: Iterable[str],
    *,
    channel_axes: dict[str, int] | None = None,
    method: str = "minmax",
    bins: int = 2048,
    max_batches: int | None = None,
) -> dict[str, TensorStats]:
    """Statistics of the tensors ``names`` of ``model`` over the calibration stream.

    One onnxruntime session (optimizations off) exposes the tensors as extra outputs; each batch's
    activations are folded into the running statistics and dropped before the next batch is run.
    ``method='percentile'``, ``'entropy'`` and ``'mse'`` make a second pass for the histograms.
    """
    if method not in RANGE_METHODS:
        raise ValueError(f"unknown calibration method {method!r} (use {', '.join(RANGE_METHODS)})")
    names = list(dict.fromkeys(names))
    axes = channel_axes or {}
    stats = {n: TensorStats(n, axes.get(n)) for n in names}
    if not names or not ctx.has_calibration:
        return stats
    runner = ctx.session(model, extra_outputs=names)

    def batches():
        for i, feeds in enumerate(ctx.calibration_batches()):
            if max_batches is not None and i >= max_batches:
                return
            yield feeds

    for feeds in batches():
        out = runner.run(feeds, names)
        for n, v in out.items():
            stats[n].update(v)
        del out
    if method in ("percentile", "entropy", "mse"):
        for s in stats.values():
            if s.count:
                hi = s.max if s.max > s.min else s.min + 1e-6
                s.hist_range = (s.min, hi)
        for feeds in batches():
            out = runner.run(feeds, names)
            for n, v in out.items():
                stats[n].update_hist(v, bins)
            del out
    return stats
