"""Base-2 exponential histograms (the OpenTelemetry data model), kept in numpy arrays.

Every distribution in the agent is one of these: StatsD timers, histograms and distributions, OTLP
exponential histograms, rolling percentiles. A histogram is immutable and mergeable; its quantiles
carry a relative error of at most :func:`relative_error` of its scale, and it keeps the exact weighted
count, sum, min and max next to the buckets.

Bucket mapping (OTel spec): at scale ``s`` the base is ``2 ** (2 ** -s)`` and positive bucket ``i``
holds the values in ``(base ** i, base ** (i + 1)]``. A negative value goes by its magnitude into the
same-numbered bucket of a separate negative array. Zero goes to ``zero_count`` (zero threshold 0).
Lowering the scale by ``k`` maps bucket ``i`` to ``i >> k`` exactly, so histograms of different
scales merge without loss beyond the coarser scale.

Counts are float64 because StatsD sample rates make weights fractional (``@0.3`` weighs 3.333...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "EMPTY",
    "MAX_SCALE",
    "MIN_SCALE",
    "ExpHistogram",
    "classic_buckets",
    "classic_error",
    "downscale",
    "from_segments",
    "from_values",
    "index_of",
    "merge",
    "merge_groups",
    "quantile",
    "quantiles_of",
    "relative_error",
    "scale_counts",
    "shift_to_fit",
    "whole",
    "whole_count",
]

MAX_SCALE = 20
"""Finest scale produced or accepted (OTel's limit): 2**20 buckets per power of two."""
MIN_SCALE = -10
"""Coarsest scale: at -10 every finite double falls into one of three buckets."""
_MIN_BUCKETS = 3
"""Smallest `max_buckets` that always fits: the finite doubles span three buckets at MIN_SCALE."""
_CHUNK_BUCKETS = 8192
"""from_segments shares bucket memory between histograms in chunks of about this many (64 KiB)."""

Counts = npt.NDArray[np.float64]
_Indices = npt.NDArray[np.int64]


def _frozen(a: Counts) -> Counts:
    a.flags.writeable = False
    return a


_NO_COUNTS: Counts = _frozen(np.zeros(0, dtype=np.float64))
_F64 = np.dtype(np.float64)


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class ExpHistogram:
    """One exponential histogram; immutable, so it can be shared between batches and exporters.

    Invariants kept by every function of this module (and expected of anyone who builds one):
    ``count == zero_count + positive_counts.sum() + negative_counts.sum()`` (up to float rounding when
    weights are fractional), all counts >= 0, ``min <= max`` when ``count > 0``. ``count``, ``sum``,
    ``min`` and ``max`` are exact: computed from the values, not the buckets (a sum past the double
    range is ±inf, or NaN when both signs overflow).

    Bucket arrays are read-only float64; an array passed to the constructor that is writeable, or of
    another dtype, is copied first, so the caller may keep and reuse its own. Equality compares every
    field by value (a NaN sum equals a NaN sum); instances are not hashable.
    """

    scale: int
    zero_count: float
    positive_offset: int
    """Bucket index of ``positive_counts[0]``."""
    positive_counts: Counts
    negative_offset: int
    """Bucket index of ``negative_counts[0]`` (bucket ``i`` holds values in ``[-base**(i+1), -base**i)``)."""
    negative_counts: Counts
    count: float
    sum: float
    min: float
    """Exact smallest value; ``math.inf`` when ``count == 0``."""
    max: float
    """Exact largest value; ``-math.inf`` when ``count == 0``."""

    def __post_init__(self) -> None:
        for name in ("positive_counts", "negative_counts"):
            counts = getattr(self, name)
            if type(counts) is not np.ndarray or counts.flags.writeable or counts.dtype != _F64:
                object.__setattr__(self, name, _frozen(np.array(counts, dtype=np.float64).reshape(-1)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpHistogram):
            return NotImplemented
        return (
            self.scale == other.scale
            and self.zero_count == other.zero_count
            and self.positive_offset == other.positive_offset
            and self.negative_offset == other.negative_offset
            and self.count == other.count
            and (self.sum == other.sum or (self.sum != self.sum and other.sum != other.sum))
            and self.min == other.min
            and self.max == other.max
            and np.array_equal(self.positive_counts, other.positive_counts)
            and np.array_equal(self.negative_counts, other.negative_counts)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays: equality by value, so not hashable

    def __repr__(self) -> str:
        def side(offset: int, counts: Counts) -> str:
            return f"[{offset}:{offset + counts.size}]" if counts.size else "[]"

        return (
            f"ExpHistogram(count={self.count:g}, sum={self.sum:g}, min={self.min:g}, max={self.max:g}, "
            f"scale={self.scale}, zero={self.zero_count:g}, "
            f"pos={side(self.positive_offset, self.positive_counts)}, "
            f"neg={side(self.negative_offset, self.negative_counts)})"
        )


EMPTY = ExpHistogram(MAX_SCALE, 0.0, 0, _NO_COUNTS, 0, _NO_COUNTS, 0.0, 0.0, math.inf, -math.inf)
"""The histogram of no values."""


# from_segments builds tens of thousands of histograms per flush. The dataclass __init__ sets each
# frozen field through object.__setattr__ and runs __post_init__: ~2.3 µs per histogram here, 46 ms
# for a 20k-series flush. Instead each one is filled in as a plain slotted object with the same
# layout and then given its real class (~0.6 µs); CPython refuses the __class__ assignment with a
# TypeError if the layouts ever differ, so this cannot silently go wrong. Only from_segments does
# this, with arrays it knows are read-only float64.
class _Building:
    __slots__ = ExpHistogram.__slots__
    scale: int
    zero_count: float
    positive_offset: int
    positive_counts: Counts
    negative_offset: int
    negative_counts: Counts
    count: float
    sum: float
    min: float
    max: float


def _check_max_buckets(max_buckets: int) -> None:
    if max_buckets < _MIN_BUCKETS:
        raise ValueError(f"max_buckets must be at least {_MIN_BUCKETS}, got {max_buckets}")


def _check_scale(scale: int, what: str) -> None:
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise ValueError(f"{what} must be within [{MIN_SCALE}, {MAX_SCALE}], got {scale}")


def _map_to_index(magnitudes: npt.NDArray[np.float64], scale: int) -> _Indices:
    """Bucket index of each positive finite value at `scale` (OTel mapping).

    Exact for powers of two at every scale and for every value at scales <= 0 (it only reads the
    binary exponent there). At scales > 0 it goes through log2, whose rounding can misplace a value
    within a few ulps of a bucket boundary; the result is clamped into the right power-of-two octave,
    so values just above or below a power of two always land correctly.
    """
    mantissa, exponent = np.frexp(magnitudes)
    # frexp gives magnitude = mantissa * 2**exponent with mantissa in [0.5, 1): the value lies in
    # (2**(exponent-1), 2**exponent], with mantissa == 0.5 exactly at the power 2**(exponent-1).
    octave = exponent.astype(np.int64) - 1
    power = mantissa == 0.5
    if scale <= 0:
        shifted: _Indices = (octave - power) >> -scale
        return shifted
    first = octave << scale
    index = np.ceil(np.log2(magnitudes) * float(1 << scale)).astype(np.int64) - 1
    np.clip(index, first, first + ((1 << scale) - 1), out=index)
    return np.where(power, first - 1, index)


def index_of(magnitudes: npt.NDArray[np.float64], scale: int) -> _Indices:
    """Bucket index of each positive finite value at `scale`, as :func:`from_values` places it (for a
    caller that keeps its own bucket arrays, as the drift processor's dense rows)."""
    _check_scale(scale, "scale")
    return _map_to_index(np.asarray(magnitudes, dtype=np.float64), scale)


def shift_to_fit(low: _Indices, high: _Indices, max_buckets: int) -> _Indices:
    """Smallest k >= 0 with ``(high >> k) - (low >> k) < max_buckets``, element-wise (``low <= high``):
    how far spans of bucket indices must be downscaled to fit `max_buckets` (merge_groups' rule)."""
    _check_max_buckets(max_buckets)
    return _shift_to_fit(np.asarray(low, dtype=np.int64), np.asarray(high, dtype=np.int64), max_buckets)


def _lay_out(
    pos_low: _Indices,
    pos_high: _Indices,
    has_pos: npt.NDArray[np.bool_],
    neg_low: _Indices,
    neg_high: _Indices,
    has_neg: npt.NDArray[np.bool_],
    shift: _Indices,
) -> tuple[_Indices, _Indices, _Indices, _Indices, int]:
    """Shifts each segment's bucket spans down by ``shift`` (the low ends in place) and lays them out in
    one index space, segment by segment, positive then negative: each side's length and start, and the
    space's size."""
    pos_low >>= shift
    neg_low >>= shift
    pos_len = np.where(has_pos, (pos_high >> shift) - pos_low + 1, 0)
    neg_len = np.where(has_neg, (neg_high >> shift) - neg_low + 1, 0)
    pos_start = np.cumsum(pos_len + neg_len) - (pos_len + neg_len)
    neg_start = pos_start + pos_len
    return pos_len, neg_len, pos_start, neg_start, int(pos_start[-1] + pos_len[-1] + neg_len[-1])


def _shift_to_fit(low: _Indices, high: _Indices, max_buckets: int) -> _Indices:
    """Smallest k >= 0 with ``(high >> k) - (low >> k) < max_buckets``, element-wise (``low <= high``)."""
    # (h >> k) - (l >> k) lies within [(h - l) >> k, ((h - l) >> k) + 1] and never grows with k. The
    # smallest k with ((h - l) >> k) < m is the bit length of (h - l) // m: a lower bound, at most one
    # short of the answer.
    quotient = (high - low) // max_buckets
    shift = np.frexp(quotient.astype(np.float64))[1].astype(np.int64)
    short = ((high >> shift) - (low >> shift)) >= max_buckets
    while short.any():
        shift += short
        short = ((high >> shift) - (low >> shift)) >= max_buckets
    return shift


def _lower_boundary(index: int, scale: int) -> float:
    """``base ** index`` at `scale`, exact for powers of two; inf past the double range."""
    if scale >= 0:
        octave, step = divmod(index, 1 << scale)
        if octave >= 1024:
            return math.inf
        return math.ldexp(2.0 ** (step / (1 << scale)), max(octave, -1100))
    octave = index << -scale
    if octave >= 1024:
        return math.inf
    return math.ldexp(1.0, max(octave, -1100))


def from_values(
    values: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float64] | None = None,
    *,
    max_buckets: int = 160,
    max_scale: int = MAX_SCALE,
) -> ExpHistogram:
    """The histogram of `values`, each counted with its weight (1 when `weights` is None).

    Same rules as :func:`from_segments` for one segment (so :data:`EMPTY` when no value is kept), and
    bit for bit the same result as that segment would get there.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    offsets = np.array([0, flat.size], dtype=np.int64)
    return from_segments(flat, weights, offsets, max_buckets=max_buckets, max_scale=max_scale)[0]


def from_segments(
    values: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float64] | None,
    offsets: npt.NDArray[np.int64],
    *,
    max_buckets: int = 160,
    max_scale: int = MAX_SCALE,
) -> list[ExpHistogram]:
    """One histogram per segment ``values[offsets[j]:offsets[j + 1]]``, all computed in one pass.

    `weights`, when given, is parallel to `values`. Each histogram gets the largest scale
    <= `max_scale` at which both its positive and its negative buckets span fewer than `max_buckets`
    indices (one scale for both sides). Values that are NaN or infinite, and weights that are not
    finite and positive, are dropped with their partner. A segment with nothing left is :data:`EMPTY`.

    The histograms' read-only bucket arrays are views into shared chunks of about 64 KiB, so keeping
    one alive keeps at most that much of the call's memory.

    Raises ValueError on malformed arguments (offsets not non-decreasing within ``values``, weights of
    another length, ``max_buckets < 3``, `max_scale` outside ``[MIN_SCALE, MAX_SCALE]``).
    """
    _check_max_buckets(max_buckets)
    _check_scale(max_scale, "max_scale")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1)
    if bounds.size == 0:
        raise ValueError("offsets needs at least one entry")
    n_segments = bounds.size - 1
    lengths = np.diff(bounds)
    if bounds[0] < 0 or bounds[-1] > v.size or (lengths < 0).any():
        raise ValueError("offsets must be non-decreasing and within values")
    w: npt.NDArray[np.float64] | None = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.size != v.size:
            raise ValueError(f"weights has {w.size} entries, values {v.size}")
        w = w[bounds[0] : bounds[-1]]
    v = v[bounds[0] : bounds[-1]]
    if n_segments == 0:
        return []

    segment = np.repeat(np.arange(n_segments, dtype=np.int64), lengths)
    kept: _Indices = lengths
    keep = np.isfinite(v)
    if w is not None:
        keep &= np.isfinite(w) & (w > 0)
    if not keep.all():
        v, segment = v[keep], segment[keep]
        if w is not None:
            w = w[keep]
        kept = np.bincount(segment, minlength=n_segments)
    if v.size == 0:
        return [EMPTY] * n_segments
    if w is None:
        w = np.ones(v.size, dtype=np.float64)

    # Exact statistics. bincount adds in element order, so a segment's sums do not depend on its
    # neighbours: from_values and from_segments agree bit for bit.
    count = np.bincount(segment, weights=w, minlength=n_segments)
    with np.errstate(over="ignore", invalid="ignore"):  # a sum beyond the double range is ±inf or NaN
        total = np.bincount(segment, weights=v * w, minlength=n_segments)
    present = np.flatnonzero(kept)
    starts = (np.cumsum(kept) - kept)[present]
    lowest = np.full(n_segments, math.inf)
    highest = np.full(n_segments, -math.inf)
    lowest[present] = np.minimum.reduceat(v, starts)
    highest[present] = np.maximum.reduceat(v, starts)

    positive = v > 0
    negative = v < 0
    any_negative = bool(negative.any())
    all_positive = not any_negative and bool(positive.all())
    zero_count: Counts
    if all_positive:
        # Timers and most distributions: no masking needed anywhere below.
        zero_count = np.zeros(n_segments)
        index = _map_to_index(v, max_scale)
    else:
        zero_weights = np.where(v == 0, w, 0.0)
        zero_count = np.bincount(segment, weights=zero_weights, minlength=n_segments).astype(np.float64)
        index = _map_to_index(np.where(v != 0, np.abs(v), 1.0), max_scale)

    def side_range(mask: npt.NDArray[np.bool_] | None) -> tuple[_Indices, _Indices, npt.NDArray[np.bool_]]:
        """Lowest and highest index of one side per segment (0, 0 where it has no values) and which
        segments have values on it; `mask` selects the side's elements, None means all of them."""
        low = np.zeros(n_segments, dtype=np.int64)
        high = np.zeros(n_segments, dtype=np.int64)
        if mask is None:
            low[present] = np.minimum.reduceat(index, starts)
            high[present] = np.maximum.reduceat(index, starts)
            return low, high, kept > 0
        far = np.int64(1 << 62)
        low[present] = np.minimum.reduceat(np.where(mask, index, far), starts)
        high[present] = np.maximum.reduceat(np.where(mask, index, -far), starts)
        has = low <= high
        return np.where(has, low, 0), np.where(has, high, 0), has

    pos_low, pos_high, has_pos = side_range(None if all_positive else positive)
    if any_negative:
        neg_low, neg_high, has_neg = side_range(negative)
    else:
        neg_low, neg_high, has_neg = np.zeros_like(pos_low), np.zeros_like(pos_low), np.zeros_like(has_pos)

    shift = _shift_to_fit(pos_low, pos_high, max_buckets)
    if any_negative:
        np.maximum(shift, _shift_to_fit(neg_low, neg_high, max_buckets), out=shift)
    np.minimum(shift, max_scale - MIN_SCALE, out=shift)
    # All buckets of all segments are laid out in one index space: segment j's positive buckets, then
    # its negative ones, then segment j + 1's. That space is cut at segment boundaries into chunks of
    # about _CHUNK_BUCKETS, each filled by one weighted bincount, and every histogram's arrays are
    # views into its chunk: one histogram kept for long then holds on to at most a chunk, not to the
    # whole flush (the chunks' elements are contiguous because segments are in order).
    pos_len, neg_len, pos_start, neg_start, size = _lay_out(
        pos_low, pos_high, has_pos, neg_low, neg_high, has_neg, shift
    )
    if all_positive:
        key = (index >> shift[segment]) + (pos_start - pos_low)[segment]
        key_weight, key_segment = w, segment
    else:
        nonzero = v != 0
        key = (index >> shift[segment]) + np.where(
            positive, (pos_start - pos_low)[segment], (neg_start - neg_low)[segment]
        )
        key, key_weight, key_segment = key[nonzero], w[nonzero], segment[nonzero]
    new_chunk = np.diff(pos_start // _CHUNK_BUCKETS, prepend=-1) != 0
    first = np.flatnonzero(new_chunk)  # first segment of each chunk
    chunk_index = np.cumsum(new_chunk) - 1
    chunk_from = pos_start[first]
    chunk_to = np.append(chunk_from[1:], size)
    element_from = np.searchsorted(key_segment, first)
    element_to = np.append(element_from[1:], key.size)
    chunks: list[Counts] = []
    for lo_key, hi_key, lo_elem, hi_elem in zip(
        chunk_from.tolist(), chunk_to.tolist(), element_from.tolist(), element_to.tolist(), strict=True
    ):
        if hi_key == lo_key:
            chunks.append(_NO_COUNTS)
            continue
        chunk_keys = key[lo_elem:hi_elem] - lo_key
        filled = np.bincount(chunk_keys, weights=key_weight[lo_elem:hi_elem], minlength=hi_key - lo_key)
        chunks.append(_frozen(filled.astype(np.float64, copy=False)))
    local_pos = pos_start - chunk_from[chunk_index]
    local_neg = local_pos + pos_len

    out: list[ExpHistogram] = []
    append = out.append
    building, finished, empty, no_counts = _Building, ExpHistogram, EMPTY, _NO_COUNTS
    for (
        scale, zeros, chunk, p_off, p_begin, p_end, n_off, n_end, c, s, lo, hi,
    ) in zip(
        (max_scale - shift).tolist(), zero_count.tolist(), chunk_index.tolist(),
        pos_low.tolist(), local_pos.tolist(), local_neg.tolist(),
        neg_low.tolist(), (local_neg + neg_len).tolist(),
        count.tolist(), total.tolist(), lowest.tolist(), highest.tolist(),
        strict=True,
    ):  # fmt: skip
        if not c:  # kept weights are > 0, so a zero count means nothing was kept
            append(empty)
            continue
        buckets = chunks[chunk]
        h = building()
        h.scale = scale
        h.zero_count = zeros
        h.positive_offset = p_off
        h.positive_counts = buckets[p_begin:p_end] if p_end != p_begin else no_counts
        h.negative_offset = n_off
        h.negative_counts = buckets[p_end:n_end] if n_end != p_end else no_counts
        h.count = c
        h.sum = s
        h.min = lo
        h.max = hi
        h.__class__ = finished  # type: ignore[assignment]  # see _Building
        append(h)  # type: ignore[arg-type]  # an ExpHistogram now
    return out


def _rebucket(sides: Sequence[tuple[int, Counts, int]], low: int, length: int) -> Counts:
    """Sum of bucket arrays ``(offset, counts, shift)`` after lowering each by `shift`, from index `low`.

    Three or more non-empty sides (a window's flushes) go through one ``bincount`` over all of them
    (:func:`_rebucket_many`); one or two, side by side. Either way the counts of a bucket are added in
    the order of the sides, so both give the same numbers to the bit."""
    live = [side for side in sides if side[1].size]
    if len(live) > 2:
        return _rebucket_many(live, low, length)
    out = np.zeros(length, dtype=np.float64)
    for offset, counts, shift in live:
        if not counts.size:
            continue
        if shift == 0:
            out[offset - low : offset - low + counts.size] += counts
        else:
            index = (np.arange(offset, offset + counts.size, dtype=np.int64) >> shift) - low
            out += np.bincount(index, weights=counts, minlength=length)
    return _frozen(out)


def _rebucket_many(sides: Sequence[tuple[int, Counts, int]], low: int, length: int) -> Counts:
    """:func:`_rebucket` of non-empty sides in one ``bincount``: every side's bucket ``o + i`` moved to
    ``((o + i) >> shift) - low``. Merging a window's ~30 flushes side by side cost ~4 µs a side."""
    n = len(sides)
    sizes = np.fromiter((c.size for _, c, _ in sides), dtype=np.int64, count=n)
    firsts = np.fromiter((o for o, _, _ in sides), dtype=np.int64, count=n)
    shifts = np.fromiter((k for _, _, k in sides), dtype=np.int64, count=n)
    starts = np.cumsum(sizes) - sizes
    index = np.arange(int(sizes.sum()), dtype=np.int64) + np.repeat(firsts - starts, sizes)
    index = (index >> np.repeat(shifts, sizes)) - low
    weights = np.concatenate([c for _, c, _ in sides])
    return _frozen(np.bincount(index, weights=weights, minlength=length).astype(np.float64, copy=False))


def _lower_side(offset: int, counts: Counts, k: int) -> tuple[int, Counts]:
    """One side's (offset, counts) with bucket ``i`` moved to ``i >> k``."""
    if not counts.size:
        return 0, _NO_COUNTS
    low = offset >> k
    return low, _rebucket([(offset, counts, k)], low, ((offset + counts.size - 1) >> k) - low + 1)


def downscale(h: ExpHistogram, k: int) -> ExpHistogram:
    """`h` at scale ``h.scale - k`` (bucket ``i`` becomes ``i >> k``); `h` itself when ``k == 0``.

    Raises ValueError when k < 0 or the new scale would be below MIN_SCALE.
    """
    if k < 0:
        raise ValueError(f"downscale by a negative amount ({k})")
    if k == 0:
        return h
    _check_scale(h.scale - k, "downscaled scale")
    pos_offset, pos_counts = _lower_side(h.positive_offset, h.positive_counts, k)
    neg_offset, neg_counts = _lower_side(h.negative_offset, h.negative_counts, k)
    return ExpHistogram(
        scale=h.scale - k,
        zero_count=h.zero_count,
        positive_offset=pos_offset,
        positive_counts=pos_counts,
        negative_offset=neg_offset,
        negative_counts=neg_counts,
        count=h.count,
        sum=h.sum,
        min=h.min,
        max=h.max,
    )


def _span(sides: Sequence[tuple[int, Counts, int]]) -> tuple[int, int] | None:
    """Lowest and highest bucket index of non-empty ``(offset, counts, shift)`` sides after shifting."""
    spans = [(o >> k, (o + c.size - 1) >> k) for o, c, k in sides if c.size]
    if not spans:
        return None
    return min(lo for lo, _ in spans), max(hi for _, hi in spans)


def merge(a: ExpHistogram, b: ExpHistogram, *, max_buckets: int = 160) -> ExpHistogram:
    """The histogram of the values of `a` and `b` together (:func:`merge_all` of the two)."""
    return merge_all((a, b), max_buckets=max_buckets)


def merge_all(hs: Sequence[ExpHistogram], *, max_buckets: int = 160) -> ExpHistogram:
    """The histogram of the values of all of `hs` (at least one) together, in one pass.

    The scale is the largest one <= every input's scale at which each side of the union spans fewer
    than `max_buckets` indices (a histogram without buckets does not constrain it). count, sum, min and
    max combine exactly. Merging is commutative and, for the scale and bucket layout, associative:
    ``merge_all(hs)`` equals merging them pairwise in any order, at the cost of one allocation per side
    instead of one per pair (a window of 30 flushes merges ~10x faster).
    """
    _check_max_buckets(max_buckets)
    if not hs:
        raise ValueError("merge_all of no histograms")
    if len(hs) == 1:
        return hs[0]
    with_buckets = [h.scale for h in hs if h.positive_counts.size > 0 or h.negative_counts.size > 0]
    # Only a histogram with buckets constrains the scale.
    scale = min(with_buckets) if with_buckets else min(h.scale for h in hs)
    # Sides without buckets add nothing (and may sit at a finer scale than `scale`): left out.
    pos_sides = [
        (h.positive_offset, h.positive_counts, h.scale - scale) for h in hs if h.positive_counts.size
    ]
    neg_sides = [
        (h.negative_offset, h.negative_counts, h.scale - scale) for h in hs if h.negative_counts.size
    ]
    pos_span, neg_span = _span(pos_sides), _span(neg_sides)

    extra = 0  # (hi >> k) - (lo >> k) never grows with k, and at MIN_SCALE everything fits
    for found in (pos_span, neg_span):
        if found is not None:
            low, high = found
            while extra < scale - MIN_SCALE and (high >> extra) - (low >> extra) >= max_buckets:
                extra += 1

    def combined(
        sides: Sequence[tuple[int, Counts, int]], found: tuple[int, int] | None
    ) -> tuple[int, Counts]:
        if found is None:
            return 0, _NO_COUNTS
        low, high = found[0] >> extra, found[1] >> extra
        return low, _rebucket([(o, c, k + extra) for o, c, k in sides], low, high - low + 1)

    pos_offset, pos_counts = combined(pos_sides, pos_span)
    neg_offset, neg_counts = combined(neg_sides, neg_span)
    return ExpHistogram(
        scale=scale - extra,
        zero_count=sum(h.zero_count for h in hs),
        positive_offset=pos_offset,
        positive_counts=pos_counts,
        negative_offset=neg_offset,
        negative_counts=neg_counts,
        count=sum(h.count for h in hs),
        sum=sum(h.sum for h in hs),
        min=min(h.min for h in hs),
        max=max(h.max for h in hs),
    )


def merge_groups(groups: Sequence[Sequence[ExpHistogram]], *, max_buckets: int = 160) -> list[ExpHistogram]:
    """``[merge_all(g, max_buckets=max_buckets) for g in groups]`` (each group non-empty), equal to it
    to the bit, with the buckets of every group rebucketed in one ``bincount``.

    For a window's end over thousands of series: ``merge_all`` of a handful of flushes costs tens of
    µs a series in numpy call overhead. A group of one histogram gives that histogram. The merged
    bucket arrays are read-only views into one array per call (so a kept result holds that array).
    """
    _check_max_buckets(max_buckets)
    out: list[ExpHistogram | None] = [g[0] if len(g) == 1 else None for g in groups]
    many = [i for i, g in enumerate(groups) if len(g) > 1]
    if any(not g for g in groups):
        raise ValueError("merge_all of no histograms")
    if not many:
        return out  # type: ignore[return-value]  # every entry set
    scales: list[int] = []
    # Per side of every merged group: its bucket sides in input order, as (group slot, offset, counts, shift).
    sides: tuple[list[tuple[int, int, Counts, int]], list[tuple[int, int, Counts, int]]] = ([], [])
    for index, i in enumerate(many):
        hs = groups[i]
        with_buckets = [h.scale for h in hs if h.positive_counts.size > 0 or h.negative_counts.size > 0]
        scale = min(with_buckets) if with_buckets else min(h.scale for h in hs)
        scales.append(scale)
        for h in hs:
            if h.positive_counts.size:
                sides[0].append((index, h.positive_offset, h.positive_counts, h.scale - scale))
            if h.negative_counts.size:
                sides[1].append((index, h.negative_offset, h.negative_counts, h.scale - scale))
    n = len(many)
    scale_arr = np.array(scales, dtype=np.int64)

    def spans(side: list[tuple[int, int, Counts, int]]) -> tuple[_Indices, _Indices, npt.NDArray[np.bool_]]:
        low = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        high = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
        if side:
            slot = np.fromiter((s for s, _, _, _ in side), dtype=np.int64, count=len(side))
            first = np.fromiter((o for _, o, _, _ in side), dtype=np.int64, count=len(side))
            size = np.fromiter((c.size for _, _, c, _ in side), dtype=np.int64, count=len(side))
            shift = np.fromiter((k for _, _, _, k in side), dtype=np.int64, count=len(side))
            np.minimum.at(low, slot, first >> shift)
            np.maximum.at(high, slot, (first + size - 1) >> shift)
        has = low <= high
        return np.where(has, low, 0), np.where(has, high, 0), has

    pos_low, pos_high, has_pos = spans(sides[0])
    neg_low, neg_high, has_neg = spans(sides[1])
    extra = np.maximum(
        _shift_to_fit(pos_low, pos_high, max_buckets), _shift_to_fit(neg_low, neg_high, max_buckets)
    )
    np.minimum(extra, scale_arr - MIN_SCALE, out=extra)
    _, neg_len, pos_start, neg_start, size = _lay_out(
        pos_low, pos_high, has_pos, neg_low, neg_high, has_neg, extra
    )
    # Every side's buckets in one index space (group by group, positive then negative, inputs in
    # order): a bucket's counts are added in input order, as merge_all adds them.
    keys: list[_Indices] = []
    weights: list[Counts] = []
    for side, low, start in ((sides[0], pos_low, pos_start), (sides[1], neg_low, neg_start)):
        if not side:
            continue
        slots = np.fromiter((s for s, _, _, _ in side), dtype=np.int64, count=len(side))
        first = np.fromiter((o for _, o, _, _ in side), dtype=np.int64, count=len(side))
        sizes = np.fromiter((c.size for _, _, c, _ in side), dtype=np.int64, count=len(side))
        shift = np.fromiter((k for _, _, _, k in side), dtype=np.int64, count=len(side)) + extra[slots]
        begins = np.cumsum(sizes) - sizes
        counts = np.concatenate([c for _, _, c, _ in side])
        # Only non-empty buckets are placed (an empty one adds nothing, so the sums are the same):
        # a timer flush of a few dozen values spreads over hundreds of buckets, most of them empty,
        # and placing only the others roughly halves a window end's merge (drift_bench).
        live = np.flatnonzero(counts != 0.0)
        owner = np.repeat(np.arange(len(side), dtype=np.int64), sizes)[live]
        bucket = live + (first - begins)[owner]
        keys.append((bucket >> shift[owner]) + (start - low)[slots[owner]])
        weights.append(counts[live])
    # A bucket's inputs all come from one side's list, in input order: bincount adds them in that order.
    buckets = _NO_COUNTS
    if keys:
        filled = np.bincount(np.concatenate(keys), weights=np.concatenate(weights), minlength=size)
        buckets = _frozen(filled.astype(np.float64, copy=False))
    finished, no_counts = ExpHistogram, _NO_COUNTS
    for i, scale, k, p_off, p_begin, p_end, n_off, n_end in zip(
        many, scales, extra.tolist(), pos_low.tolist(), pos_start.tolist(), neg_start.tolist(),
        neg_low.tolist(), (neg_start + neg_len).tolist(), strict=True,
    ):  # fmt: skip
        hs = groups[i]
        built = _Building()
        built.scale = scale - k
        built.zero_count = sum(x.zero_count for x in hs)
        built.positive_offset = p_off if p_end != p_begin else 0
        built.positive_counts = buckets[p_begin:p_end] if p_end != p_begin else no_counts
        built.negative_offset = n_off if n_end != p_end else 0
        built.negative_counts = buckets[p_end:n_end] if n_end != p_end else no_counts
        built.count = sum(x.count for x in hs)
        built.sum = sum(x.sum for x in hs)
        built.min = min(x.min for x in hs)
        built.max = max(x.max for x in hs)
        built.__class__ = finished  # type: ignore[assignment]  # see _Building
        out[i] = built  # type: ignore[call-overload]  # an ExpHistogram now
    return out  # type: ignore[return-value]  # every entry set


RESIDUE = 1e-12
"""Relative size of float residue in cumulative counts (fractional weights, sample rates; ~4500 ulps):
a count that went down by less than this fraction of the cumulative count (or by less than 1e-9)
did not go down."""


def subtract(current: ExpHistogram, previous: ExpHistogram, *, bounds: bool = True) -> ExpHistogram | None:
    """The values cumulative `current` gained since `previous` (a delta); None when the series was
    reset: its count, zero count or any bucket went down.

    Both are brought to the coarser of their scales first (a scale change between points is no reset).
    A decrease smaller than :data:`RESIDUE` times the cumulative count is rounding residue, not a reset,
    and a residue left in a bucket is zero; the buckets are trimmed of empty ends. A delta of no values
    is :data:`EMPTY`. min and max: when `previous` held nothing they are `current`'s, exact; otherwise
    the delta's are not known — with ``bounds`` they are `current`'s lifetime min and max, which still
    bound every value of it (enough to clamp a quantile); without, NaN (unknown: an exporter that must
    send exact ones leaves them out).
    """
    tolerance = max(1e-9, RESIDUE * max(abs(previous.count), abs(current.count)))
    count = current.count - previous.count
    zero = current.zero_count - previous.zero_count
    if count < -tolerance or zero < -tolerance:
        return None
    scale = min(current.scale, previous.scale)
    a = downscale(current, current.scale - scale)
    b = downscale(previous, previous.scale - scale)
    positive = _side_difference(
        a.positive_offset, a.positive_counts, b.positive_offset, b.positive_counts, tolerance
    )
    negative = _side_difference(
        a.negative_offset, a.negative_counts, b.negative_offset, b.negative_counts, tolerance
    )
    if positive is None or negative is None:
        return None
    if not count > tolerance:
        return EMPTY
    exact = not previous.count > 0
    low, high = (current.min, current.max) if exact or bounds else (math.nan, math.nan)
    return ExpHistogram(
        scale=scale,
        zero_count=zero if zero > tolerance else 0.0,
        positive_offset=positive[0],
        positive_counts=positive[1],
        negative_offset=negative[0],
        negative_counts=negative[1],
        count=count,
        sum=current.sum - previous.sum,
        min=low,
        max=high,
    )


def _side_difference(
    offset_a: int, a: Counts, offset_b: int, b: Counts, tolerance: float
) -> tuple[int, Counts] | None:
    """``a - b`` on one side at one scale, residue zeroed and empty ends trimmed; None when a bucket
    went down by more than ``tolerance``."""
    if not b.size:
        if not a.size:
            return 0, _NO_COUNTS
        diff, low = a.copy(), offset_a
    else:
        low = min(offset_a, offset_b) if a.size else offset_b
        high = max(offset_a + a.size, offset_b + b.size) if a.size else offset_b + b.size
        diff = np.zeros(high - low, dtype=np.float64)
        if a.size:
            diff[offset_a - low : offset_a - low + a.size] += a
        diff[offset_b - low : offset_b - low + b.size] -= b
        if float(diff.min()) < -tolerance:
            return None
    diff[diff <= tolerance] = 0.0
    nonzero = np.flatnonzero(diff)
    if not nonzero.size:
        return 0, _NO_COUNTS
    return low + int(nonzero[0]), diff[nonzero[0] : nonzero[-1] + 1]


def scale_counts(h: ExpHistogram, factor: float) -> ExpHistogram:
    """`h` with every count, the total count and the sum multiplied by `factor` (sampling upscale).

    min and max are unchanged. Raises ValueError unless `factor` is finite and positive.
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be finite and positive, got {factor}")
    return ExpHistogram(
        scale=h.scale,
        zero_count=h.zero_count * factor,
        positive_offset=h.positive_offset,
        positive_counts=_frozen(h.positive_counts * factor),
        negative_offset=h.negative_offset,
        negative_counts=_frozen(h.negative_counts * factor),
        count=h.count * factor,
        sum=h.sum * factor,
        min=h.min,
        max=h.max,
    )


def relative_error(scale: int) -> float:
    """``(base - 1) / (base + 1)``: the largest relative error of :func:`quantile` at `scale`."""
    # Equal to tanh(ln(base) / 2), which neither cancels at fine scales nor overflows at coarse ones.
    return math.tanh(math.log(2.0) * 2.0**-scale / 2.0)


def quantile(h: ExpHistogram, q: float) -> float:
    """The `q`-quantile of the values in `h`, within ``relative_error(h.scale)`` of the true one.

    Rank rule (numpy's ``method="inverted_cdf"`` with weights): the answer estimates the smallest
    value x whose cumulative weight reaches ``q`` of the total. The bucket holding x is found by that
    rule over the bucket weights and answered with the point of least relative error inside it,
    ``2 * lo * hi / (lo + hi)`` (negated on the negative side, 0 for the zero bucket), clamped into
    ``[min, max]``. ``q == 0`` gives min, ``q == 1`` max; NaN when ``count == 0``. The bound holds up
    to a few ulps of rounding, for values of normal magnitude (subnormals, below 2.2e-308, carry too
    few bits to represent the estimate).

    Raises ValueError unless ``0 <= q <= 1``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    if not h.count > 0:
        return math.nan
    if q == 0.0:
        return h.min
    if q == 1.0:
        return h.max
    neg, pos = h.negative_counts, h.positive_counts
    # Ascending value order: the most negative bucket first, then zero, then the positive buckets.
    ordered = np.concatenate((neg[::-1], [h.zero_count], pos))
    cdf = np.cumsum(ordered)
    if not cdf[-1] > 0:
        return math.nan
    cdf /= cdf[-1]
    j = min(int(np.searchsorted(cdf, q, side="left")), ordered.size - 1)
    # 2*lo*hi/(lo+hi) with hi = lo*base, written so that base = inf (scale -10) gives 2*lo.
    midpoint = 2.0 / (1.0 + 2.0 ** -(2.0**-h.scale))
    if j < neg.size:
        estimate = -_lower_boundary(h.negative_offset + neg.size - 1 - j, h.scale) * midpoint
    elif j == neg.size:
        estimate = 0.0
    else:
        estimate = _lower_boundary(h.positive_offset + j - neg.size - 1, h.scale) * midpoint
    return float(min(max(estimate, h.min), h.max))


def quantiles_of(hs: Sequence[ExpHistogram], qs: Sequence[float]) -> list[list[float]]:
    """``[[quantile(h, q) for q in qs] for h in hs]``, equal to it to the bit, with the running sums
    of all histograms in one ``cumsum`` (rows of a zero-padded matrix): for a window's end over many
    series, where :func:`quantile`'s numpy calls cost ~7 µs a quantile.

    Raises ValueError unless every q is within [0, 1].
    """
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
    out: list[list[float]] = [[math.nan] * len(qs) for _ in hs]
    inner = [q for q in qs if 0.0 < q < 1.0]
    rows = [i for i, h in enumerate(hs) if h.count > 0]
    for i in rows:
        h = hs[i]
        out[i] = [h.min if q == 0.0 else h.max if q == 1.0 else math.nan for q in qs]
    if not rows or not inner:
        return out
    # Row r: histogram rows[r]'s buckets in ascending value order (negative ones reversed, the zero
    # bucket, the positive ones), zero-padded on the right. cumsum along a row adds in the same order
    # as quantile's cumsum of that histogram, and padding after the last bucket changes nothing.
    sizes = np.fromiter(
        (hs[i].negative_counts.size + 1 + hs[i].positive_counts.size for i in rows),
        dtype=np.int64,
        count=len(rows),
    )
    width = int(sizes.max())
    pieces: list[Counts] = []
    for i in rows:
        h = hs[i]
        pieces.append(h.negative_counts[::-1])
        pieces.append(np.array([h.zero_count]))
        pieces.append(h.positive_counts)
    flat = np.concatenate(pieces)
    starts = np.cumsum(sizes) - sizes
    position = np.arange(flat.size, dtype=np.int64) - np.repeat(starts, sizes)
    matrix = np.zeros((len(rows), width), dtype=np.float64)
    matrix.reshape(-1)[np.repeat(np.arange(len(rows), dtype=np.int64) * width, sizes) + position] = flat
    cdf = np.cumsum(matrix, axis=1)
    totals = cdf[np.arange(len(rows)), sizes - 1]
    usable = totals > 0
    cdf /= np.where(usable, totals, 1.0)[:, None]
    # searchsorted(cdf, q, "left") over a row's own buckets = how many of them are below q: the
    # padding after the last bucket repeats the row's last value, 1.0 exactly, never below q < 1.
    picks = [np.minimum(np.count_nonzero(cdf < q, axis=1), sizes - 1).tolist() for q in inner]
    usable_rows = usable.tolist()
    for r, i in enumerate(rows):
        h = hs[i]
        row = out[i]
        if not usable_rows[r]:
            for k, q in enumerate(qs):
                if 0.0 < q < 1.0:
                    row[k] = math.nan
            continue
        neg_size = h.negative_counts.size
        midpoint = 2.0 / (1.0 + 2.0 ** -(2.0**-h.scale))
        m = 0
        for k, q in enumerate(qs):
            if not 0.0 < q < 1.0:
                continue
            j = picks[m][r]
            m += 1
            if j < neg_size:
                estimate = -_lower_boundary(h.negative_offset + neg_size - 1 - j, h.scale) * midpoint
            elif j == neg_size:
                estimate = 0.0
            else:
                estimate = _lower_boundary(h.positive_offset + j - neg_size - 1, h.scale) * midpoint
            row[k] = float(min(max(estimate, h.min), h.max))
    return out


def classic_error(scale: int) -> float:
    """Largest relative distance between a value and the point :func:`classic_buckets` files it at:
    ``2 ** (2 ** -(scale + 1)) - 1`` (half an exponential bucket in log space)."""
    return float(2.0 ** (2.0 ** -(scale + 1)) - 1.0)


def classic_buckets(h: ExpHistogram, bounds: Sequence[float] | npt.NDArray[np.float64]) -> Counts:
    """Weighted count of values <= each of the ascending `bounds`, whole exponential buckets only.

    The one rule every exporter uses to turn an exponential histogram into classic ``le`` buckets
    (Prometheus pull and remote-write, OTLP explicit). Each exponential bucket's whole weight goes to
    the first ``le`` bucket whose bound is at or above the bucket's log-midpoint (``lo * sqrt(base)``;
    for a negative bucket, its midpoint's negation), so a bucket is never split and integer weights
    stay integers. Error bound: every value is counted as if it were at its bucket's midpoint, at most
    a factor ``2 ** (2 ** -(scale + 1))`` away, i.e. within :func:`classic_error` relative error (1.1 %
    at scale 5, 4.4 % at scale 3). A bound on a bucket boundary (a power of two, at every scale >= 0)
    is exact. The zero bucket counts toward bounds >= 0; bounds >= max give ``count`` and bounds <
    min give 0, and the result never decreases. Counts stay float (sample-rate weights); exporters
    turn them into whole numbers with :func:`whole`. Raises ValueError unless the bounds are finite
    and strictly ascending.
    """
    # Per series per flush with a dozen bounds: a plain loop over the bounds against the buckets'
    # running sums is cheaper than the small numpy calls a vectorised form needs.
    given = np.asarray(bounds, dtype=np.float64).reshape(-1).tolist()
    previous = -math.inf
    for bound in given:
        if not (previous < bound < math.inf):
            raise ValueError("bounds must be finite and strictly ascending")
        previous = bound
    out = np.zeros(len(given), dtype=np.float64)
    if not h.count > 0:
        return out
    per_octave = 2.0**h.scale
    n_pos, n_neg = h.positive_counts.size, h.negative_counts.size
    # Running sums in numpy (C), read at the dozen indices the bounds need: at scale 8 a timer holds
    # ~1,000 buckets, and summing them in Python cost ~30 µs a histogram. cumsum adds in order, so the
    # sums are the same numbers a Python loop made.
    pos_cum = np.cumsum(h.positive_counts)  # [k - 1] = sum(pos[:k])
    neg_cum = np.cumsum(h.negative_counts[::-1])  # [m - 1] = sum of the last m
    neg_total = float(neg_cum[-1]) if n_neg else 0.0
    lowest, highest, count, zero = h.min, h.max, h.count, h.zero_count
    running = 0.0
    for j, bound in enumerate(given):
        if bound >= highest:
            out[j:] = count
            break
        if bound < lowest:
            continue
        # In index space bucket i spans (i, i + 1] of log2(|value|) * 2**scale; its midpoint is
        # i + 0.5. The half keeps a bound on a boundary exact despite rounding in log2.
        if bound < 0:
            # Values <= bound have magnitude >= |bound|: buckets whose midpoint is >= position.
            position = math.log2(-bound) * per_octave
            first = math.ceil(position - 0.5) - h.negative_offset
            last = n_neg - min(max(first, 0), n_neg)  # sum(neg[first:]): the last `last` buckets
            below = float(neg_cum[last - 1]) if last else 0.0
        else:
            below = neg_total + zero
            if bound > 0 and n_pos:
                # Buckets whose midpoint is <= position.
                position = math.log2(bound) * per_octave
                upto = min(max(math.floor(position - 0.5) + 1 - h.positive_offset, 0), n_pos)
                if upto:
                    below += float(pos_cum[upto - 1])
        running = max(running, min(below, count))
        out[j] = running
    return out


def whole(counts: Counts) -> Counts:
    """Whole numbers for cumulative counts (classic buckets and their count), as float64.

    Rounds each running total to the nearest integer (half to even), never each bucket on its own:
    rounding is monotone, so cumulative counts stay non-decreasing, the ``+Inf`` bucket rounded the
    same way equals ``_count``, and each figure is within 0.5 of the weighted total it stands for
    (sample-rate weights ``1/rate`` make totals fractional). Callers keep the float totals as state and
    round only what they send, so rounding errors never add up across flushes.
    """
    return np.rint(counts)


def whole_count(count: float) -> float:
    """:func:`whole` for one total (a histogram's count, shown as ``_count`` and the ``+Inf`` bucket)."""
    return float(np.rint(count))
