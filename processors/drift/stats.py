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
    continuity correction, with ``k − 1`` degrees of freedom; its p-value is the regularized upper
    incomplete gamma function ``Q(df / 2, chi² / 2)`` (:func:`gamma_q`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent import exphist
from agent.exphist import ExpHistogram

PSI_EPSILON = 1e-4
"""Floor of each bin's share in PSI: an empty bin weighs as one in ten thousand."""

Counts = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Aligned:
    """Two histograms' counts on one axis of buckets ordered by value, and each bucket's upper edge."""

    current: Counts
    reference: Counts
    upper_edges: Counts
    """Upper edge of each bucket: buckets hold ``(previous edge, edge]`` (negative ones ``[lo, hi)``)."""


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
    """Upper edges of the bins PSI, JS and Chi² use (the last one is the axis' end)."""


def _upper_edges(scale: int, first: int, n: int) -> Counts:
    """Upper edges ``base ** (i + 1)`` of positive buckets ``first .. first + n - 1`` at `scale`."""
    i = np.arange(first + 1, first + n + 1, dtype=np.float64)
    return np.asarray(np.exp2(i * 2.0**-scale), dtype=np.float64)


def align(current: ExpHistogram, reference: ExpHistogram) -> Aligned:
    """Both histograms' counts on a common axis at the coarser of their scales."""
    scales = [h.scale for h in (current, reference) if h.positive_counts.size or h.negative_counts.size]
    scale = min(scales) if scales else exphist.MAX_SCALE
    a = exphist.downscale(current, max(0, current.scale - scale))
    b = exphist.downscale(reference, max(0, reference.scale - scale))

    def side(offset_a: int, ca: Counts, offset_b: int, cb: Counts) -> tuple[int, Counts, Counts]:
        spans = [(o, o + c.size) for o, c in ((offset_a, ca), (offset_b, cb)) if c.size]
        if not spans:
            empty = np.zeros(0, dtype=np.float64)
            return 0, empty, empty
        low, high = min(s for s, _ in spans), max(e for _, e in spans)
        out_a = np.zeros(high - low, dtype=np.float64)
        out_b = np.zeros(high - low, dtype=np.float64)
        out_a[offset_a - low : offset_a - low + ca.size] += ca
        out_b[offset_b - low : offset_b - low + cb.size] += cb
        return low, out_a, out_b

    pos_low, pos_a, pos_b = side(a.positive_offset, a.positive_counts, b.positive_offset, b.positive_counts)
    neg_low, neg_a, neg_b = side(a.negative_offset, a.negative_counts, b.negative_offset, b.negative_counts)
    # Negative bucket i holds [-base**(i+1), -base**i): by value, the highest index comes first and
    # its upper edge is -base**i.
    neg_edges = -_upper_edges(scale, neg_low - 1, neg_a.size)[::-1]
    zero = np.array([0.0])
    return Aligned(
        current=np.concatenate((neg_a[::-1], [a.zero_count], pos_a)),
        reference=np.concatenate((neg_b[::-1], [b.zero_count], pos_b)),
        upper_edges=np.concatenate((neg_edges, zero, _upper_edges(scale, pos_low, pos_a.size))),
    )


def bin_cuts(reference_share: Counts, bins: int) -> npt.NDArray[np.intp]:
    """Start index of each bin: a cut after the bucket where the reference's cumulative share first
    reaches ``k / bins`` (k = 1 .. bins - 1); always starting with 0."""
    cumulative = np.cumsum(reference_share)
    targets = np.arange(1, bins, dtype=np.float64) / bins
    ends = np.searchsorted(cumulative, targets - 1e-12, side="left") + 1
    ends = ends[ends < reference_share.size]
    return np.unique(np.concatenate(([0], ends)))


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution (the limit of sqrt(n)·D_n), to ~1e-15."""
    if x <= 0.0:
        return 1.0
    if x < 1.18:
        # The theta-function form converges fast for small x: 1 - sqrt(2π)/x Σ exp(-(2k-1)²π²/(8x²)).
        w = -(math.pi**2) / (8.0 * x * x)
        total = sum(math.exp((2 * k - 1) ** 2 * w) for k in range(1, 8))
        return max(0.0, 1.0 - math.sqrt(2.0 * math.pi) / x * total)
    # 2 Σ (-1)^(k-1) exp(-2k²x²); at x >= 1.18 the fifth term is below 1e-24.
    total = 0.0
    for k in range(1, 8):
        total += (-1.0) ** (k - 1) * math.exp(-2.0 * k * k * x * x)
    return min(1.0, max(0.0, 2.0 * total))


def gamma_q(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x) = Γ(a, x) / Γ(a), for a > 0, x >= 0.

    Series for P when x < a + 1, else Lentz's continued fraction for Q (Numerical Recipes §6.2);
    relative accuracy ~1e-14.
    """
    if a <= 0.0:
        raise ValueError(f"gamma_q needs a > 0, got {a}")
    if x <= 0.0:
        return 1.0
    if math.isinf(x):
        return 0.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return min(1.0, math.exp(log_prefix) * h)


def drift(current: ExpHistogram, reference: ExpHistogram, *, bins: int = 10) -> Drift | None:
    """Every statistic of `current` against `reference`; None when either holds no observation."""
    if not (current.count > 0 and reference.count > 0):
        return None
    al = align(current, reference)
    n, m = float(al.current.sum()), float(al.reference.sum())
    if not (n > 0 and m > 0):
        return None
    p, q = al.current / n, al.reference / m

    gaps = np.abs(np.cumsum(p) - np.cumsum(q))
    ks = float(gaps.max())
    ks_bound = min(1.0, ks + float(np.maximum(p, q).max()))
    effective = n * m / (n + m)
    ks_pvalue = kolmogorov_sf(math.sqrt(effective) * ks)

    cuts = bin_cuts(q, bins)
    cur_bins = np.add.reduceat(al.current, cuts)
    ref_bins = np.add.reduceat(al.reference, cuts)
    bin_edges = al.upper_edges[np.concatenate((cuts[1:] - 1, [al.upper_edges.size - 1]))]
    pb, qb = cur_bins / n, ref_bins / m

    floored_p, floored_q = np.maximum(pb, PSI_EPSILON), np.maximum(qb, PSI_EPSILON)
    psi = float(np.sum((floored_p - floored_q) * np.log(floored_p / floored_q)))

    mid = 0.5 * (pb + qb)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(pb > 0, pb * np.log2(pb / mid), 0.0)
        kl_q = np.where(qb > 0, qb * np.log2(qb / mid), 0.0)
    js = math.sqrt(max(0.0, 0.5 * float(kl_p.sum() + kl_q.sum())))

    used = (cur_bins + ref_bins) > 0
    observed = np.stack((cur_bins[used], ref_bins[used]))
    expected = np.outer(np.array([n, m]), observed.sum(axis=0)) / (n + m)
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    df = observed.shape[1] - 1
    chi2_pvalue = gamma_q(df / 2.0, chi2 / 2.0) if df > 0 else 1.0
    return Drift(psi, ks, ks_pvalue, ks_bound, js, chi2, chi2_pvalue, bin_edges)
