"""Rolling-window distributions of many series in fixed numpy arrays.

Layout. Time is cut into *base slices* (``slice_interval``, 10 s by default). Each window is served by
a *tier* of slices of one length: the smallest multiple of the base slice that divides the window
into at most ``max_slices_per_window`` slices (defaults: 1m → 6 × 10 s, 5m → 10 × 30 s, 1h → 12 ×
5 min). A tier is a ring of ``n + 1`` rows (``n`` completed slices, one filling) per series; windows
sharing a slice length share a tier. Incoming histograms go only into the base tier's filling row;
when a base slice completes, its row is added to the filling row of every coarser tier, for all
series in one numpy operation. So per series the memory is fixed — rows × ``max_buckets`` float32
counts plus five float64 statistics per row — whatever the rate, and 1h costs 13 rows, not 360.

Buckets. One series has one scale and one bucket offset per side (positive, negative), shared by all
its rows, so any rows add up column by column. A series' ``max_buckets`` columns cover a contiguous
range of bucket indices; data that does not fit moves the range (re-centred) or lowers the scale of
every row of that series (bucket ``i`` → ``i >> k``, as :func:`agent.exphist.downscale`). The scale
never goes up again while the series lives: one wide burst costs precision until the series expires.
The negative side's arrays exist only once some series had a negative value.

Window edges. A window of ``n`` slices of length ``s``, read at time ``t`` when the filling slice
started at ``t0`` (``p = t - t0`` elapsed), is the filling slice plus the last ``n`` completed slices
if ``p <= s/2``, else the last ``n - 1``: it spans ``[t - W - p, t)`` or ``[t - W + s - p, t)``, so
at most ``s/2`` longer or shorter than ``W``, and exactly ``W`` when read at a slice boundary (the
processor emits at base-slice boundaries, so base-tier windows are exact). Data is placed by arrival
time.

Emission reads the windows of a range of series at once (:meth:`Store.window`); :func:`quantiles`
then finds every quantile of every series of the range with a handful of vectorised numpy calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent import exphist
from agent.exphist import MAX_SCALE, MIN_SCALE, ExpHistogram

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_EMPTY_LOW = np.int64(1 << 62)
"""Occupied-span sentinels: an empty side has low > high."""
_EMPTY_HIGH = np.int64(-(1 << 62))


def plan_tiers(base_s: float, windows_s: list[float], max_slices: int) -> tuple[list[float], list[int]]:
    """(slice length of each tier, base tier first; tier index of each window).

    A window uses the smallest multiple of ``base_s`` that divides it into at most ``max_slices``
    slices (the base itself if that is few enough). Windows must be multiples of ``base_s``.
    """
    base_per_window = [round(w / base_s) for w in windows_s]
    slice_bases: list[int] = []
    for n_base in base_per_window:
        chosen = n_base
        for k in range(1, n_base + 1):
            if n_base % k == 0 and n_base // k <= max_slices:
                chosen = k
                break
        slice_bases.append(chosen)
    lengths = sorted(set(slice_bases) | {1})
    return [k * base_s for k in lengths], [lengths.index(k) for k in slice_bases]


class _Tier:
    """One ring of slices for every series: arrays are [row, series, ...]."""

    def __init__(self, slice_s: float, rows: int, capacity: int, buckets: int, now: float) -> None:
        self.slice_s = slice_s
        self.rows = rows
        self.cursor = 0
        """Ring row of the filling slice."""
        self.number = math.floor(now / slice_s)
        """Which slice (time // slice_s) the filling row is."""
        self.pos: F32 = np.zeros((rows, capacity, buckets), dtype=np.float32)
        self.neg: F32 | None = None
        self.zero: F64 = np.zeros((rows, capacity))
        self.count: F64 = np.zeros((rows, capacity))
        self.sum: F64 = np.zeros((rows, capacity))
        self.min: F64 = np.full((rows, capacity), np.inf)
        self.max: F64 = np.full((rows, capacity), -np.inf)

    def clear_row(self, row: int) -> None:
        self.pos[row] = 0.0
        if self.neg is not None:
            self.neg[row] = 0.0
        self.zero[row] = 0.0
        self.count[row] = 0.0
        self.sum[row] = 0.0
        self.min[row] = np.inf
        self.max[row] = -np.inf

    def clear_series(self, i: int) -> None:
        self.pos[:, i] = 0.0
        if self.neg is not None:
            self.neg[:, i] = 0.0
        self.zero[:, i] = 0.0
        self.count[:, i] = 0.0
        self.sum[:, i] = 0.0
        self.min[:, i] = np.inf
        self.max[:, i] = -np.inf

    def add_row_from(self, other: _Tier, row: int) -> None:
        """Add `other`'s `row` (all series) into this tier's filling row."""
        cur = self.cursor
        self.pos[cur] += other.pos[row]
        if other.neg is not None and self.neg is not None:
            self.neg[cur] += other.neg[row]
        self.zero[cur] += other.zero[row]
        self.count[cur] += other.count[row]
        self.sum[cur] += other.sum[row]
        np.minimum(self.min[cur], other.min[row], out=self.min[cur])
        np.maximum(self.max[cur], other.max[row], out=self.max[cur])

    def grow(self, capacity: int) -> None:
        extra = capacity - self.pos.shape[1]

        def wider(a: np.ndarray, fill: float) -> np.ndarray:
            pad = np.full((a.shape[0], extra, *a.shape[2:]), fill, dtype=a.dtype)
            return np.concatenate((a, pad), axis=1)

        self.pos = wider(self.pos, 0.0)
        if self.neg is not None:
            self.neg = wider(self.neg, 0.0)
        self.zero = wider(self.zero, 0.0)
        self.count = wider(self.count, 0.0)
        self.sum = wider(self.sum, 0.0)
        self.min = wider(self.min, np.inf)
        self.max = wider(self.max, -np.inf)


@dataclass(slots=True)
class Window:
    """The merged window of series ``[start, stop)``: float64 [series, bucket] counts and statistics."""

    pos: F64
    neg: F64 | None
    zero: F64
    count: F64
    sum: F64
    min: F64
    max: F64
    scale: I64
    pos_offset: I64
    neg_offset: I64
    span_s: float
    """How much time the window covers (see the module docstring: W ± half a slice)."""


class Store:
    """Slots for up to ``max_series`` series; see the module docstring."""

    def __init__(
        self, base_s: float, tier_slices_s: list[float], tier_rows: list[int], max_buckets: int, now: float
    ) -> None:
        self.buckets = max_buckets
        self.capacity = 0
        self.tiers = [
            _Tier(s, rows, 0, max_buckets, now) for s, rows in zip(tier_slices_s, tier_rows, strict=True)
        ]
        self.base = self.tiers[0]
        self.scale: I64 = np.zeros(0, dtype=np.int64)
        self.pos_offset: I64 = np.zeros(0, dtype=np.int64)
        self.neg_offset: I64 = np.zeros(0, dtype=np.int64)
        # Occupied bucket-index span per side at the series' scale (never shrinks while the series lives).
        self.pos_low: I64 = np.zeros(0, dtype=np.int64)
        self.pos_high: I64 = np.zeros(0, dtype=np.int64)
        self.neg_low: I64 = np.zeros(0, dtype=np.int64)
        self.neg_high: I64 = np.zeros(0, dtype=np.int64)
        self.downscales = 0
        """Times a series' scale was lowered to fit its data into max_buckets (for self-telemetry)."""

    # -- slots -------------------------------------------------------------------------------------

    def grow(self, capacity: int) -> None:
        """Make room for `capacity` series (only ever grows)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        for t in self.tiers:
            t.grow(capacity)

        def wider(a: I64, fill: int) -> I64:
            return np.concatenate((a, np.full(extra, fill, dtype=np.int64)))

        self.scale = wider(self.scale, MAX_SCALE)
        self.pos_offset = wider(self.pos_offset, 0)
        self.neg_offset = wider(self.neg_offset, 0)
        self.pos_low = wider(self.pos_low, int(_EMPTY_LOW))
        self.pos_high = wider(self.pos_high, int(_EMPTY_HIGH))
        self.neg_low = wider(self.neg_low, int(_EMPTY_LOW))
        self.neg_high = wider(self.neg_high, int(_EMPTY_HIGH))
        self.capacity = capacity

    def reset(self, i: int) -> None:
        """Forget everything of slot `i` (a series expired); the slot can be reused."""
        for t in self.tiers:
            t.clear_series(i)
        self.scale[i] = MAX_SCALE
        self.pos_offset[i] = self.neg_offset[i] = 0
        self.pos_low[i] = self.neg_low[i] = _EMPTY_LOW
        self.pos_high[i] = self.neg_high[i] = _EMPTY_HIGH

    # -- time --------------------------------------------------------------------------------------

    def rotate(self, now: float) -> None:
        """Complete every base slice that ended by `now`, rolling each into the coarser tiers."""
        base = self.base
        target = math.floor(now / base.slice_s)
        behind = target - base.number
        if 0 >= behind >= -1:  # within the filling slice (or a small step back): nothing to complete
            return
        # Past the longest ring everything is gone: clear instead of stepping slice by slice. The same
        # when the clock stepped back by more than a slice: the slices held are in its future.
        longest = max(round(t.slice_s / base.slice_s) * t.rows for t in self.tiers)
        if behind > longest or behind < -1:
            for t in self.tiers:
                for row in range(t.rows):
                    t.clear_row(row)
                t.cursor = 0
                t.number = math.floor(target * base.slice_s / t.slice_s + 1e-9)
            return
        for _ in range(behind):
            for t in self.tiers[1:]:
                t.add_row_from(base, base.cursor)
            base.number += 1
            base.cursor = (base.cursor + 1) % base.rows
            base.clear_row(base.cursor)
            start_s = base.number * base.slice_s
            for t in self.tiers[1:]:
                number = math.floor(start_s / t.slice_s + 1e-9)
                if number != t.number:
                    t.number = number
                    t.cursor = (t.cursor + 1) % t.rows
                    t.clear_row(t.cursor)

    # -- data --------------------------------------------------------------------------------------

    def _ensure_negative(self) -> None:
        for t in self.tiers:
            if t.neg is None:
                t.neg = np.zeros_like(t.pos)

    def add(self, i: int, h: ExpHistogram) -> None:
        """Add histogram `h` (count > 0) to series `i`'s filling base slice."""
        buckets = self.buckets
        has_pos, has_neg = h.positive_counts.size > 0, h.negative_counts.size > 0
        if has_neg and self.base.neg is None:
            self._ensure_negative()
        if has_pos or has_neg:
            scale = int(self.scale[i])
            target = min(scale, h.scale)
            ds, dh = scale - target, h.scale - target
            spans = []
            for has, off, n, low, high in (
                (has_pos, h.positive_offset, h.positive_counts.size, self.pos_low[i], self.pos_high[i]),
                (has_neg, h.negative_offset, h.negative_counts.size, self.neg_low[i], self.neg_high[i]),
            ):
                lo, hi = int(low) >> ds, int(high) >> ds
                if low > high:
                    lo, hi = 1 << 62, -(1 << 62)
                if has:
                    lo, hi = min(lo, off >> dh), max(hi, (off + n - 1) >> dh)
                spans.append((lo, hi))
            extra = 0
            while extra < target - MIN_SCALE and any(
                lo <= hi and (hi >> extra) - (lo >> extra) >= buckets for lo, hi in spans
            ):
                extra += 1
            new_scale = target - extra
            (p_lo, p_hi), (n_lo, n_hi) = ((lo >> extra, hi >> extra) for lo, hi in spans)
            p_off, n_off = int(self.pos_offset[i]), int(self.neg_offset[i])
            moved = new_scale != scale
            if p_lo <= p_hi and (moved or p_lo < p_off or p_hi >= p_off + buckets):
                p_off, moved = p_lo - (buckets - (p_hi - p_lo + 1)) // 2, True
            if n_lo <= n_hi and (moved or n_lo < n_off or n_hi >= n_off + buckets):
                n_off, moved = n_lo - (buckets - (n_hi - n_lo + 1)) // 2, True
            if moved:
                self._relayout(i, new_scale, p_off, n_off)
            shift = h.scale - new_scale
            row = self.base.cursor
            if has_pos:
                self._add_side(self.base.pos[row, i], h.positive_offset, h.positive_counts, shift, p_off)
                self.pos_low[i] = min(int(self.pos_low[i]), h.positive_offset >> shift)
                self.pos_high[i] = max(
                    int(self.pos_high[i]), (h.positive_offset + h.positive_counts.size - 1) >> shift
                )
            if has_neg:
                assert self.base.neg is not None
                self._add_side(self.base.neg[row, i], h.negative_offset, h.negative_counts, shift, n_off)
                self.neg_low[i] = min(int(self.neg_low[i]), h.negative_offset >> shift)
                self.neg_high[i] = max(
                    int(self.neg_high[i]), (h.negative_offset + h.negative_counts.size - 1) >> shift
                )
        b, row = self.base, self.base.cursor
        b.zero[row, i] += h.zero_count
        b.count[row, i] += h.count
        b.sum[row, i] += h.sum
        if h.min < b.min[row, i]:
            b.min[row, i] = h.min
        if h.max > b.max[row, i]:
            b.max[row, i] = h.max

    @staticmethod
    def _add_side(row: F32, offset: int, counts: F64, shift: int, row_offset: int) -> None:
        if shift == 0:
            start = offset - row_offset
            row[start : start + counts.size] += counts
            return
        index = (np.arange(offset, offset + counts.size, dtype=np.int64) >> shift) - row_offset
        first = int(index[0])
        summed = np.bincount(index - first, weights=counts)
        row[first : first + summed.size] += summed

    def _relayout(self, i: int, new_scale: int, pos_offset: int, neg_offset: int) -> None:
        """Move series `i`'s rows to `new_scale` (<= its scale) and new column offsets."""
        d = int(self.scale[i]) - new_scale
        if d:
            self.downscales += 1
        for side in ("pos", "neg"):
            low = int(self.pos_low[i] if side == "pos" else self.neg_low[i])
            high = int(self.pos_high[i] if side == "pos" else self.neg_high[i])
            old_offset = int(self.pos_offset[i] if side == "pos" else self.neg_offset[i])
            new_offset = pos_offset if side == "pos" else neg_offset
            if low <= high:
                columns = np.arange(low - old_offset, high - old_offset + 1)
                target = ((columns + old_offset) >> d) - new_offset
                # target is non-decreasing: add runs of equal targets with one reduceat.
                starts = np.flatnonzero(np.diff(target, prepend=target[0] - 1))
                for t in self.tiers:
                    arrays = t.pos if side == "pos" else t.neg
                    if arrays is None:
                        continue
                    block = arrays[:, i, columns[0] : columns[-1] + 1].astype(np.float64)
                    summed = np.add.reduceat(block, starts, axis=1)
                    arrays[:, i] = 0.0
                    arrays[:, i, target[starts]] = summed
                if side == "pos":
                    self.pos_low[i], self.pos_high[i] = low >> d, high >> d
                else:
                    self.neg_low[i], self.neg_high[i] = low >> d, high >> d
        self.scale[i] = new_scale
        self.pos_offset[i] = pos_offset
        self.neg_offset[i] = neg_offset

    # -- reading -----------------------------------------------------------------------------------

    def window_rows(self, tier: int, slices: int, now: float) -> tuple[list[int], bool, float]:
        """(rows of `tier` to add, whether to add the base tier's filling row too, span in seconds)."""
        t = self.tiers[tier]
        elapsed = min(max(now - t.number * t.slice_s, 0.0), t.slice_s)
        completed = slices if elapsed <= t.slice_s / 2 else slices - 1
        rows = [t.cursor] + [(t.cursor - k) % t.rows for k in range(1, completed + 1)]
        return rows, tier != 0, completed * t.slice_s + elapsed

    def window(self, tier: int, slices: int, now: float, start: int, stop: int) -> Window:
        """The merged window (`slices` slices of `tier`, read at `now`) of series ``[start, stop)``."""
        rows, with_base, span = self.window_rows(tier, slices, now)
        t, b = self.tiers[tier], self.base
        parts = [(t, r) for r in rows] + ([(b, b.cursor)] if with_base else [])
        n = stop - start
        pos = np.zeros((n, self.buckets))
        neg = np.zeros((n, self.buckets)) if b.neg is not None else None
        zero, count, total = np.zeros(n), np.zeros(n), np.zeros(n)
        low, high = np.full(n, np.inf), np.full(n, -np.inf)
        for src, r in parts:
            pos += src.pos[r, start:stop]
            if neg is not None and src.neg is not None:
                neg += src.neg[r, start:stop]
            zero += src.zero[r, start:stop]
            count += src.count[r, start:stop]
            total += src.sum[r, start:stop]
            np.minimum(low, src.min[r, start:stop], out=low)
            np.maximum(high, src.max[r, start:stop], out=high)
        return Window(
            pos=pos,
            neg=neg,
            zero=zero,
            count=count,
            sum=total,
            min=low,
            max=high,
            scale=self.scale[start:stop].copy(),
            pos_offset=self.pos_offset[start:stop].copy(),
            neg_offset=self.neg_offset[start:stop].copy(),
            span_s=span,
        )


def quantiles(w: Window, qs: list[float]) -> F64:
    """[quantile, series] estimates by :func:`agent.exphist.quantile`'s rule, for every series of `w`.

    NaN where a series has no data in the window. The relative error is at most
    ``exphist.relative_error(scale)`` of each series (for exponential input).
    """
    n, buckets = w.pos.shape
    out = np.full((len(qs), n), np.nan)
    if n == 0:
        return out
    zero_at = buckets if w.neg is not None else 0
    parts = ([w.neg[:, ::-1]] if w.neg is not None else []) + [w.zero[:, None], w.pos]
    cdf = np.cumsum(np.concatenate(parts, axis=1), axis=1)
    total = cdf[:, -1]
    has = (w.count > 0) & (total > 0)
    width = np.exp2(-w.scale.astype(np.float64))  # log2 of the base
    midpoint = 2.0 / (1.0 + np.exp2(-width))  # 2*lo*hi/(lo+hi) relative to lo, as exphist.quantile
    last = cdf.shape[1] - 1
    for k, q in enumerate(qs):
        if q <= 0.0:
            out[k] = np.where(has, w.min, np.nan)
            continue
        if q >= 1.0:
            out[k] = np.where(has, w.max, np.nan)
            continue
        j = np.minimum(np.argmax(cdf >= q * total[:, None], axis=1), last)
        positive = j > zero_at
        negative = j < zero_at
        index = np.where(positive, w.pos_offset + (j - zero_at - 1), w.neg_offset + (zero_at - 1 - j))
        with np.errstate(over="ignore"):
            magnitude = np.exp2(index * width) * midpoint
        estimate = np.where(positive, magnitude, np.where(negative, -magnitude, 0.0))
        out[k] = np.where(has, np.minimum(np.maximum(estimate, w.min), w.max), np.nan)
    return out


def histogram_of(w: Window, k: int) -> ExpHistogram:
    """Series `k` of window `w` as an :class:`ExpHistogram` (for ``emit_histogram``)."""
    if not w.count[k] > 0:
        return exphist.EMPTY

    def side(counts: F64, offset: int) -> tuple[int, F64]:
        nonzero = np.flatnonzero(counts)
        if not nonzero.size:
            return 0, np.zeros(0)
        return offset + int(nonzero[0]), counts[nonzero[0] : nonzero[-1] + 1].copy()

    p_off, p_counts = side(w.pos[k], int(w.pos_offset[k]))
    n_off, n_counts = side(w.neg[k], int(w.neg_offset[k])) if w.neg is not None else (0, np.zeros(0))
    return ExpHistogram(
        scale=int(w.scale[k]),
        zero_count=float(w.zero[k]),
        positive_offset=p_off,
        positive_counts=p_counts,
        negative_offset=n_off,
        negative_counts=n_counts,
        count=float(w.count[k]),
        sum=float(w.sum[k]),
        min=float(w.min[k]),
        max=float(w.max[k]),
    )
