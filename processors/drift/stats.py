"""Drift statistics between two exponential histograms, over their aligned buckets.

Both histograms are brought to a common scale (the coarser one: lowering a scale maps bucket ``i`` to
``i >> k`` exactly, see agent/exphist.py) and laid out on one axis ordered by value: negative buckets
(most negative first), the zero bucket, then positive buckets. On that axis:

- **KS** (two-sample Kolmogorov–Smirnov D): the largest gap between the two empirical CDFs, read at
  every bucket's upper edge. Inside a bucket the CDFs are unknown, so the exact D of the raw samples
  lies in ``[D, D + max over buckets of max(p_i, q_i)]`` (p, q: each side's share of the bucket); the
  upper end is :attr:`Drift.ks_bound`. The p-value is the asymptotic Kolmogorov distribution at
  ``sqrt(n·m/(n+m))·D`` (:func:`kolmogorov_sf`).
- **PSI**, **JS** and **Chi²** are computed over *bins*: runs of consecutive buckets cut where the
  reference's cumulative share crosses ``k / bins`` (deciles of the reference for ``bins = 10``, the
  usual PSI layout; the first and last bins reach to the ends of both histograms). Each equals the
  exact statistic of the raw samples binned at those edges (the edges are bucket edges, so binning
  loses nothing more). Fine buckets would make them measure sampling noise: a 1,000-sample window
  spread over 300 buckets has most buckets empty.

  - PSI = Σ (p_i − q_i)·ln(p_i / q_i), every share floored at :data:`PSI_EPSILON` (1e-4) so an empty
    bin counts as a small share instead of an infinite term.
  - JS = the Jensen–Shannon distance in base 2 (the square root of the divergence), in [0, 1].
  - Chi² = the test of homogeneity of the 2 × k table (current, reference) × non-empty bins, without
    continuity correction, with ``k − 1`` degrees of freedom (k: the bins holding anything); its
    p-value is the Chi-squared survival function (:func:`chi2_sf`).

:func:`drift_many` computes all of this for many pairs at once, on one zero-padded grid (a window end
over thousands of series); :func:`drift_of` the same from histograms given as arrays (the drift
processor's dense rows, read without building an object per series); :func:`drift` is one pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent import exphist
from agent.exphist import ExpHistogram

PSI_EPSILON = 1e-4
"""Floor of each bin's share in PSI: an empty bin weighs as one in ten thousand."""

Counts = npt.NDArray[np.float64]
_Ints = npt.NDArray[np.int64]
_BIG = 1 << 62
"""Beyond any bucket index (they are below 2**31 in magnitude at scale 20)."""


@dataclass(frozen=True, slots=True)
class Drift:
    psi: float
    ks: float
    ks_pvalue: float
    ks_bound: float
    """The exact KS D of the raw samples is within ``[ks, ks_bound]``."""
    js: float
    chi2: float
    chi2_pvalue: float
    bin_edges: Counts
    """Upper edges of the bins PSI, JS and Chi² use: bins hold ``(previous edge, edge]``; the first
    reaches down to -inf, the last edge is +inf."""


@dataclass(frozen=True, slots=True)
class Side:
    """One sign's buckets of many histograms, one after the other in `counts`."""

    first: _Ints
    """Bucket index of each histogram's first entry in `counts`."""
    size: _Ints
    """Entries of each histogram in `counts`."""
    counts: Counts
    low: _Ints
    """Lowest bucket index each histogram holds (its axis starts there; ``low > high``: none)."""
    high: _Ints
    """Highest bucket index each histogram holds."""


@dataclass(frozen=True, slots=True)
class Histograms:
    """Many histograms as arrays (the input of :func:`drift_of`): a window end's rows of a dense store
    are read as they are, without building a histogram object per series."""

    scale: _Ints
    zero: Counts
    positive: Side
    negative: Side


def _side_of(offsets: _Ints, parts: list[Counts]) -> Side:
    size = np.fromiter((c.size for c in parts), dtype=np.int64, count=len(parts))
    counts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return Side(offsets, size, counts, offsets, offsets + size - 1)


def histograms_of(hs: Sequence[ExpHistogram]) -> Histograms:
    """`hs` as :class:`Histograms`."""
    count = len(hs)
    return Histograms(
        np.fromiter((h.scale for h in hs), dtype=np.int64, count=count),
        np.fromiter((h.zero_count for h in hs), dtype=np.float64, count=count),
        _side_of(
            np.fromiter((h.positive_offset for h in hs), dtype=np.int64, count=count),
            [h.positive_counts for h in hs],
        ),
        _side_of(
            np.fromiter((h.negative_offset for h in hs), dtype=np.int64, count=count),
            [h.negative_counts for h in hs],
        ),
    )


def _pair_grid(hs: Histograms) -> tuple[Counts, _Ints, _Ints, _Ints, _Ints, _Ints]:
    """Every pair (histogram ``i`` and ``P + i`` of `hs`) on its own value-ordered axis at the coarser
    of its two scales, as rows of one zero-padded grid: row ``i`` current ``i``, row ``P + i``
    reference ``i``; each axis holds the negative buckets (most negative first), the zero bucket, then
    the positive buckets. Also per pair: the axis length, the scale, the number of negative buckets,
    the lowest negative and the lowest positive index. One ``bincount`` lays out every pair (the
    buckets a coarser scale folds into one are added in bucket order, as exphist.downscale adds them)."""
    count = hs.scale.size
    pairs = count // 2
    scale, zero, pos, neg = hs.scale, hs.zero, hs.positive, hs.negative
    # The coarser scale of the two that hold buckets (a histogram without buckets does not constrain it).
    with_buckets = np.where((pos.low <= pos.high) | (neg.low <= neg.high), scale, exphist.MAX_SCALE)
    common = np.minimum(with_buckets[:pairs], with_buckets[pairs:])
    pair = np.concatenate((np.arange(pairs), np.arange(pairs)))
    shift = np.maximum(scale - common[pair], 0)

    def span(side: Side) -> tuple[_Ints, _Ints]:
        """(lowest index, number of buckets) of each pair's side (both histograms) at the common scale."""
        has = side.low <= side.high
        low = np.where(has, side.low >> shift, _BIG)
        high = np.where(has, side.high >> shift, -_BIG)
        low, high = np.minimum(low[:pairs], low[pairs:]), np.maximum(high[:pairs], high[pairs:])
        size = np.where(low <= high, high - low + 1, 0)
        return np.where(size > 0, low, 0), size

    pos_low, pos_size = span(pos)
    neg_low, neg_size = span(neg)
    length = neg_size + pos_size + 1
    width = int(length.max())
    base = np.arange(count, dtype=np.int64) * width  # row start in the flat grid
    keys = [base + neg_size[pair]]
    weights = [zero]
    for side, low, positive in ((pos, pos_low, True), (neg, neg_low, False)):
        # Only non-empty buckets are placed (an empty one adds nothing): a window of a few dozen
        # gauge values spans hundreds of buckets.
        live = np.flatnonzero(side.counts != 0.0)
        if not live.size:
            continue
        owner = np.repeat(np.arange(count, dtype=np.int32), side.size)[
            live
        ]  # int32: a quarter of the memory traffic
        index = live + (side.first - (np.cumsum(side.size) - side.size))[owner]
        index = (index >> shift[owner]) - low[pair][owner]
        zero_at = (base + neg_size[pair])[owner]
        # Positive index i sits right of the zero bucket; negative index i left of it, reversed.
        keys.append(zero_at + 1 + index if positive else zero_at - 1 - index)
        weights.append(side.counts[live])
    grid = np.bincount(np.concatenate(keys), weights=np.concatenate(weights), minlength=count * width)
    laid: Counts = grid.astype(np.float64, copy=False).reshape(count, width)
    return laid, length, common, neg_size, neg_low, pos_low


def kolmogorov_sf(x: Counts) -> Counts:
    """P(K > x) for the Kolmogorov distribution (the limit of sqrt(n)·D_n), to ~1e-15, element-wise."""
    x = np.asarray(x, dtype=np.float64)
    safe = np.where(x > 0.0, x, 1.0)
    # Small x: the theta-function form, 1 - sqrt(2π)/x Σ exp(-(2k-1)²π²/(8x²)), converges fast.
    w = -(math.pi**2) / (8.0 * safe * safe)
    theta = np.zeros_like(safe)
    # Large x: 2 Σ (-1)^(k-1) exp(-2k²x²); at x >= 1.18 the fifth term is below 1e-24.
    alternating = np.zeros_like(safe)
    for k in range(1, 8):
        theta += np.exp((2 * k - 1) ** 2 * w)
        alternating += (-1.0) ** (k - 1) * np.exp(-2.0 * k * k * safe * safe)
    small = np.maximum(0.0, 1.0 - math.sqrt(2.0 * math.pi) / safe * theta)
    large = np.clip(2.0 * alternating, 0.0, 1.0)
    return np.where(x <= 0.0, 1.0, np.where(x < 1.18, small, large))


def chi2_sf(x: Counts, df: _Ints) -> Counts:
    """P(X > x) for a Chi-squared variable of `df` (>= 1) degrees of freedom, element-wise: the
    regularized upper incomplete gamma function Q(df/2, x/2), in closed form because df/2 is a whole
    or a half number. With y = x/2 and n = df // 2: even df, Q = e^-y Σ_{k<n} y^k / k!; odd df,
    Q = erfc(√y) + e^-y Σ_{k<n} y^(k+½) / Γ(k + 3/2). Every term is positive (no cancellation) and
    taken as exp of its logarithm (no overflow): relative accuracy ~1e-13."""
    y = np.asarray(x, dtype=np.float64) * 0.5
    df = np.asarray(df, dtype=np.int64)
    if np.any(df < 1):
        raise ValueError("chi2_sf needs df >= 1")
    live = (y > 0.0) & np.isfinite(y)
    out = np.where(y > 0.0, 0.0, 1.0)  # x <= 0: 1; x = inf: 0
    if not live.any():
        return out
    y, df = y[live], df[live]
    odd = (df % 2) == 1
    terms = df // 2
    width = int(terms.max())
    total = np.array(
        [math.erfc(math.sqrt(v)) if o else 0.0 for v, o in zip(y.tolist(), odd.tolist(), strict=True)]
    )
    if width:
        k = np.arange(width, dtype=np.float64)
        half = np.where(odd, 0.5, 0.0)[:, None]
        log_gamma = np.where(
            odd[:, None],
            np.array([math.lgamma(j + 1.5) for j in range(width)]),
            np.array([math.lgamma(j + 1.0) for j in range(width)]),
        )
        exponent = (k + half) * np.log(y)[:, None] - y[:, None] - log_gamma
        total += np.where(k < terms[:, None], np.exp(exponent), 0.0).sum(axis=1)
    out[live] = np.minimum(total, 1.0)
    return out


@dataclass(frozen=True, slots=True)
class Drifts:
    """The statistics of many (current, reference) pairs: one entry (row) per pair, each as
    :class:`Drift` describes it; ``valid`` is False (and the numbers NaN) where a side is empty."""

    valid: npt.NDArray[np.bool_]
    psi: Counts
    ks: Counts
    ks_pvalue: Counts
    ks_bound: Counts
    js: Counts
    chi2: Counts
    chi2_pvalue: Counts
    bin_edges: Counts
    """Shape (pairs, bins): each pair's upper bin edges, the last +inf; a bin may be empty (an edge
    repeated) where the reference's cumulative share jumps past two cuts within one bucket."""


def drift_many(
    currents: Sequence[ExpHistogram], references: Sequence[ExpHistogram], *, bins: int = 10
) -> Drifts:
    """Every statistic of each ``currents[i]`` against ``references[i]``, all pairs in one numpy pass
    (per pair ~100 µs of numpy call overhead otherwise)."""
    if len(currents) != len(references):
        raise ValueError("drift_many needs as many references as currents")
    return drift_of(histograms_of([*currents, *references]), bins=bins)


def drift_of(hs: Histograms, *, bins: int = 10) -> Drifts:
    """:func:`drift_many` of pairs given as arrays: the first half of `hs` the currents, the second
    half their references."""
    pairs = hs.scale.size // 2
    if not pairs:
        e = np.zeros(0, dtype=np.float64)
        return Drifts(np.zeros(0, dtype=bool), e, e, e, e, e, e, e, np.zeros((0, bins)))
    grid, length, scale, neg_size, neg_low, pos_low = _pair_grid(hs)
    cumulative = np.cumsum(grid, axis=1)
    cur, ref = grid[:pairs], grid[pairs:]
    cum_cur, cum_ref = cumulative[:pairs], cumulative[pairs:]
    n, m = cum_cur[:, -1], cum_ref[:, -1]
    valid = (n > 0) & (m > 0)
    n, m = np.where(valid, n, 1.0), np.where(valid, m, 1.0)  # no division by zero; masked at the end

    ks = np.abs(cum_cur * (1.0 / n)[:, None] - cum_ref * (1.0 / m)[:, None]).max(axis=1)
    ks_bound = np.minimum(1.0, ks + np.maximum(cur.max(axis=1) / n, ref.max(axis=1) / m))
    ks_pvalue = kolmogorov_sf(np.sqrt(n * m / (n + m)) * ks)

    # Bin ends: each cut is where the reference's cumulative count reaches k/bins of it (past the
    # padding never: the targets are below m). Cuts closer than a bucket give empty bins, which add
    # nothing to any statistic.
    targets = np.arange(1, bins, dtype=np.float64)[None, :] * (m / bins)[:, None] - (m * 1e-12)[:, None]
    ends = np.empty((pairs, bins), dtype=np.int64)
    for i in range(pairs):
        ends[i, :-1] = np.searchsorted(cum_ref[i], targets[i], side="left") + 1
    ends[:, -1] = length
    np.minimum(ends, length[:, None], out=ends)
    at_cur = np.take_along_axis(cum_cur, ends - 1, axis=1)
    at_ref = np.take_along_axis(cum_ref, ends - 1, axis=1)
    c = np.maximum(np.diff(at_cur, axis=1, prepend=0.0), 0.0)  # cumulative differences: no residue < 0
    r = np.maximum(np.diff(at_ref, axis=1, prepend=0.0), 0.0)
    p, q = c / n[:, None], r / m[:, None]
    fp, fq = np.maximum(p, PSI_EPSILON), np.maximum(q, PSI_EPSILON)
    psi = ((fp - fq) * np.log(fp / fq)).sum(axis=1)
    mid = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        js2 = np.where(p > 0, p * np.log2(p / mid), 0.0) + np.where(q > 0, q * np.log2(q / mid), 0.0)
        # Σ over both rows of (O - E)² / E for a 2 × k table, in closed form.
        cells = np.where(c + r > 0, (m[:, None] * c - n[:, None] * r) ** 2 / (n * m)[:, None] / (c + r), 0.0)
    js = np.sqrt(np.maximum(0.0, 0.5 * js2.sum(axis=1)))
    chi2 = cells.sum(axis=1)
    df = (c + r > 0).sum(axis=1) - 1
    chi2_pvalue = np.ones(pairs)
    tested = df > 0
    if tested.any():
        chi2_pvalue[tested] = chi2_sf(chi2[tested], df[tested])

    # Upper edge of each bin's last bucket (position j on its pair's axis).
    j = ends[:, :-1] - 1
    step = np.exp2(-scale.astype(np.float64))[:, None]
    below = j < neg_size[:, None]
    with np.errstate(over="ignore"):
        negative = -np.exp2(((neg_low + neg_size - 1)[:, None] - j) * step)
        positive = np.exp2(((pos_low - neg_size)[:, None] + j) * step)
    edges = np.where(below, negative, np.where(j == neg_size[:, None], 0.0, positive))
    bin_edges = np.concatenate((edges, np.full((pairs, 1), math.inf)), axis=1)

    def masked(a: Counts) -> Counts:
        return np.where(valid, a, math.nan)

    return Drifts(
        valid, masked(psi), masked(ks), masked(ks_pvalue), masked(ks_bound), masked(js), masked(chi2),
        masked(chi2_pvalue), bin_edges,
    )  # fmt: skip


def drift(current: ExpHistogram, reference: ExpHistogram, *, bins: int = 10) -> Drift | None:
    """Every statistic of `current` against `reference` (:func:`drift_many` of one pair); None when
    either holds no observation."""
    d = drift_many([current], [reference], bins=bins)
    if not d.valid[0]:
        return None
    return Drift(
        float(d.psi[0]), float(d.ks[0]), float(d.ks_pvalue[0]), float(d.ks_bound[0]), float(d.js[0]),
        float(d.chi2[0]), float(d.chi2_pvalue[0]), np.unique(d.bin_edges[0]),
    )  # fmt: skip
