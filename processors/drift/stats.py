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


def _edge(scale: int, neg_size: int, neg_low: int, pos_low: int, j: int) -> float:
    """Upper edge of the bucket at position `j` of the value-ordered axis (see :func:`align`)."""
    if j < neg_size:  # negative bucket i holds [-base**(i+1), -base**i)
        return -math.exp2((neg_low + neg_size - 1 - j) * 2.0**-scale)
    if j == neg_size:
        return 0.0
    return math.exp2((pos_low + j - neg_size) * 2.0**-scale)


def _layout(current: ExpHistogram, reference: ExpHistogram) -> tuple[Counts, Counts, int, int, int, int]:
    """(current counts, reference counts, scale, negative buckets, lowest negative index, lowest positive
    index) of both histograms on one value-ordered axis at the coarser of their scales: negative
    buckets (most negative first), the zero bucket, the positive buckets."""
    scales = [h.scale for h in (current, reference) if h.positive_counts.size or h.negative_counts.size]
    scale = min(scales) if scales else exphist.MAX_SCALE
    a = exphist.downscale(current, max(0, current.scale - scale))
    b = exphist.downscale(reference, max(0, reference.scale - scale))
    a_pos, b_pos, a_neg, b_neg = a.positive_counts, b.positive_counts, a.negative_counts, b.negative_counts
    if a_pos.size and b_pos.size:
        pos_low = min(a.positive_offset, b.positive_offset)
        pos_size = max(a.positive_offset + a_pos.size, b.positive_offset + b_pos.size) - pos_low
    elif a_pos.size or b_pos.size:
        pos_low, pos_size = (a.positive_offset, a_pos.size) if a_pos.size else (b.positive_offset, b_pos.size)
    else:
        pos_low, pos_size = 0, 0
    if a_neg.size and b_neg.size:
        neg_low = min(a.negative_offset, b.negative_offset)
        neg_size = max(a.negative_offset + a_neg.size, b.negative_offset + b_neg.size) - neg_low
    elif a_neg.size or b_neg.size:
        neg_low, neg_size = (a.negative_offset, a_neg.size) if a_neg.size else (b.negative_offset, b_neg.size)
    else:
        neg_low, neg_size = 0, 0
    size = neg_size + 1 + pos_size
    out = []
    for h, pos, neg in ((a, a_pos, a_neg), (b, b_pos, b_neg)):
        axis = np.zeros(size, dtype=np.float64)
        if neg.size:
            # Negative index i sits at position neg_size - 1 - (i - neg_low): reversed.
            start = neg_size - 1 - (h.negative_offset + neg.size - 1 - neg_low)
            axis[start : start + neg.size] = neg[::-1]
        axis[neg_size] = h.zero_count
        if pos.size:
            start = neg_size + 1 + h.positive_offset - pos_low
            axis[start : start + pos.size] = pos
        out.append(axis)
    return out[0], out[1], scale, neg_size, neg_low, pos_low


def _cuts(cumulative: Counts, total: float, bins: int) -> list[int]:
    targets = np.arange(1, bins, dtype=np.float64) * (total / bins) - total * 1e-12
    cuts = [0]
    for end in (np.searchsorted(cumulative, targets, side="left") + 1).tolist():
        if cuts[-1] < end < cumulative.size:
            cuts.append(end)
    return cuts


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
    cur, ref, scale, neg_size, neg_low, pos_low = _layout(current, reference)
    cum_cur, cum_ref = np.cumsum(cur), np.cumsum(ref)
    n, m = float(cum_cur[-1]), float(cum_ref[-1])
    if not (n > 0 and m > 0):
        return None

    ks = float(np.abs(cum_cur * (1.0 / n) - cum_ref * (1.0 / m)).max())
    ks_bound = min(1.0, ks + max(float(cur.max()) / n, float(ref.max()) / m))
    ks_pvalue = kolmogorov_sf(math.sqrt(n * m / (n + m)) * ks)

    # The bins are few (<= `bins`): plain floats from here on, cheaper than numpy's per-call cost.
    cuts = _cuts(cum_ref, m, bins)
    ends = [*cuts[1:], cur.size]
    at_end = [e - 1 for e in ends]
    cur_at, ref_at = [0.0, *cum_cur[at_end].tolist()], [0.0, *cum_ref[at_end].tolist()]
    cur_bins = [cur_at[i + 1] - cur_at[i] for i in range(len(ends))]
    ref_bins = [ref_at[i + 1] - ref_at[i] for i in range(len(ends))]
    edges = [_edge(scale, neg_size, neg_low, pos_low, e - 1) for e in ends[:-1]]
    psi = js2 = chi2 = 0.0
    used = 0
    for c, r in zip(cur_bins, ref_bins, strict=True):
        c, r = max(c, 0.0), max(r, 0.0)  # cumulative differences: never a negative residue
        p, q = c / n, r / m
        fp, fq = max(p, PSI_EPSILON), max(q, PSI_EPSILON)
        psi += (fp - fq) * math.log(fp / fq)
        mid = 0.5 * (p + q)
        if p > 0:
            js2 += p * math.log2(p / mid)
        if q > 0:
            js2 += q * math.log2(q / mid)
        if c + r > 0:
            # Σ over both rows of (O - E)² / E for a 2 × k table, in closed form.
            chi2 += (m * c - n * r) ** 2 / (n * m * (c + r))
            used += 1
    js = math.sqrt(max(0.0, 0.5 * js2))
    df = used - 1
    chi2_pvalue = gamma_q(df / 2.0, chi2 / 2.0) if df > 0 else 1.0
    bin_edges = np.array([*edges, math.inf])
    return Drift(psi, ks, ks_pvalue, ks_bound, js, chi2, chi2_pvalue, bin_edges)
