"""Incoming distribution points as delta exponential histograms, for every processor that keeps
distributions per series (percentiles, anomaly, aggregate, drift).

StatsD timers, histograms and distributions arrive as DELTA exponential histograms and are used as
they are. OTLP explicit-bucket histograms are approximated (:func:`explicit_to_exponential`), and
CUMULATIVE points of either kind are turned into deltas against the previous point of the series
(:func:`subtract`, :func:`subtract_explicit`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from agent import exphist
from agent.exphist import ExpHistogram
from agent.model import ExplicitHistogram, Point, Temporality

POINTS_PER_BUCKET = 32
"""An explicit bucket's count is spread over this many evenly spaced values inside it (linear
interpolation, as Prometheus' histogram_quantile does): the spread deviates from exact linear
interpolation by at most 1/64 of the bucket's width."""


def _bucket_edges(e: ExplicitHistogram) -> list[tuple[float, float]]:
    """(low, high) value range assumed for each bucket, narrowed by the point's min/max when known.

    The first bucket starts at min, else at 0 when its bound is positive (Prometheus' convention),
    else at its bound. The overflow bucket above the last bound ends at max when known; without a
    max its values are all placed at the last bound (the smallest value they can have).
    """
    bounds, lo_known, hi_known = e.bounds, e.min, e.max
    edges: list[tuple[float, float]] = []
    n = len(bounds)
    for i in range(n + 1):
        if i == 0:
            if n == 0:
                mean = e.sum / e.count if e.count else 0.0
                low = lo_known if lo_known is not None else mean
                high = hi_known if hi_known is not None else mean
            else:
                high = bounds[0]
                low = lo_known if lo_known is not None else (0.0 if high > 0 else high)
        elif i == n:
            low = bounds[-1]
            high = hi_known if hi_known is not None and hi_known > low else low
        else:
            low, high = bounds[i - 1], bounds[i]
        if lo_known is not None and math.isfinite(lo_known):
            low = max(low, lo_known)
        if hi_known is not None and math.isfinite(hi_known):
            high = min(high, hi_known)
        if not high >= low:  # min/max inconsistent with the bounds: trust the bounds' upper edge
            low = high
        edges.append((low, high))
    return edges


def explicit_to_exponential(e: ExplicitHistogram, *, max_buckets: int) -> ExpHistogram | None:
    """An exponential histogram approximating explicit-bucket histogram `e`; None if `e` is unusable.

    Unusable: a count that is not a non-negative whole number per bucket, a bounds/counts length
    mismatch, or non-finite or unordered bounds. Each bucket's count is spread evenly (linearly)
    inside the bucket, so a quantile read from the result is only known to lie within the source
    bucket holding it, plus the exponential histogram's own relative error: the error bound for
    explicit input is the width of the source buckets, not the scale (the same bound as Prometheus'
    histogram_quantile). count and sum are copied exactly, min and max when `e` has them.
    """
    bounds, counts = e.bounds, e.counts
    if len(counts) != len(bounds) + 1:
        return None
    if any(not math.isfinite(b) for b in bounds) or any(b >= c for b, c in itertools.pairwise(bounds)):
        return None
    if any(c < 0 for c in counts):
        return None
    total = sum(counts)
    if total <= 0:
        return exphist.EMPTY
    values: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    steps = (np.arange(POINTS_PER_BUCKET, dtype=np.float64) + 0.5) / POINTS_PER_BUCKET
    for (low, high), c in zip(_bucket_edges(e), counts, strict=True):
        if c <= 0:
            continue
        if high > low:
            values.append(low + steps * (high - low))
            weights.append(np.full(POINTS_PER_BUCKET, c / POINTS_PER_BUCKET))
        else:
            values.append(np.array([high]))
            weights.append(np.array([float(c)]))
    spread = exphist.from_values(np.concatenate(values), np.concatenate(weights), max_buckets=max_buckets)
    if not spread.count > 0:
        return None
    low = e.min if e.min is not None and math.isfinite(e.min) else spread.min
    high = e.max if e.max is not None and math.isfinite(e.max) else spread.max
    return ExpHistogram(
        scale=spread.scale,
        zero_count=spread.zero_count,
        positive_offset=spread.positive_offset,
        positive_counts=spread.positive_counts,
        negative_offset=spread.negative_offset,
        negative_counts=spread.negative_counts,
        count=float(total),
        sum=e.sum if math.isfinite(e.sum) else spread.sum,
        min=min(low, spread.min),
        max=max(high, spread.max),
    )


def subtract(current: ExpHistogram, previous: ExpHistogram) -> ExpHistogram | None:
    """The values `current` (cumulative) gained since `previous`; None when the series was reset
    (:func:`agent.exphist.subtract`). min and max of the difference are `current`'s lifetime ones,
    which still bound it (loosely) for the quantiles' clamping."""
    return exphist.subtract(current, previous)


def subtract_explicit(current: ExplicitHistogram, previous: ExplicitHistogram) -> ExplicitHistogram | None:
    """Per-bucket difference of two cumulative explicit histograms; None on a reset or changed bounds."""
    if current.bounds != previous.bounds or len(current.counts) != len(previous.counts):
        return None
    counts = tuple(c - p for c, p in zip(current.counts, previous.counts, strict=True))
    if any(c < 0 for c in counts):
        return None
    return ExplicitHistogram(
        bounds=current.bounds,
        counts=counts,
        sum=current.sum - previous.sum,
        min=current.min,
        max=current.max,
    )


Base = ExpHistogram | ExplicitHistogram | None
"""What a series keeps of its last cumulative distribution point."""


def to_delta(p: Point, previous: Base, *, max_buckets: int) -> tuple[ExpHistogram | None, Base, str]:
    """Point `p`'s observations as a delta exponential histogram, for a series whose last cumulative
    point was `previous` (None at first): (the histogram, or None when `p` gives none; what the series
    keeps for its next cumulative point; the reason to count when `p` was unusable, else "").

    A cumulative point is the difference from `previous` (the first one only sets the base); a
    difference that went down is a reset (``cumulative_reset``). Explicit buckets are approximated
    (:func:`explicit_to_exponential`); unusable ones are ``invalid_histogram``, a point without either
    histogram ``no_histogram``. Never raises on odd input."""
    cumulative = p.temporality is Temporality.CUMULATIVE
    try:
        if p.histogram is not None:
            h = p.histogram
            if not cumulative:
                return h, previous, ""
            if not isinstance(previous, ExpHistogram):
                return None, h, ""  # the first cumulative point (or a switch of kind) only sets the base
            diff = subtract(h, previous)
            return diff, h, "" if diff is not None else "cumulative_reset"
        if p.explicit is not None:
            e = p.explicit
            if cumulative:
                if not isinstance(previous, ExplicitHistogram):
                    return None, e, ""
                diff_e = subtract_explicit(e, previous)
                if diff_e is None:
                    return None, e, "cumulative_reset"
                previous, e = e, diff_e
            converted = explicit_to_exponential(e, max_buckets=max_buckets)
            return converted, previous, "" if converted is not None else "invalid_histogram"
    except (ValueError, OverflowError):
        return None, previous, "invalid_histogram"
    return None, previous, "no_histogram"
