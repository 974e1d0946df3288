"""Rolling-window distributions of many series: slices of bucket counts in a shared, bounded page pool.

Time. Time is cut into *base slices* (``slice_interval``, 10 s by default). Each window is served by
a *tier* of slices of one length: the smallest multiple of the base slice that divides the window
into at most ``max_slices_per_window`` slices (defaults: 1m → 6 × 10 s, 5m → 10 × 30 s, 1h → 12 ×
5 min). A tier is a ring of ``n + 1`` rows (``n`` completed slices, one filling) per series; windows
sharing a slice length share a tier. Incoming histograms go only into the base tier's filling row;
when a base slice completes, its row is added to the filling row of every coarser tier, for all
series in one numpy operation, so 1h costs 13 rows, not 360.

Buckets. One series has one scale and one bucket offset per side (positive, negative), shared by all
its rows, so any rows add up column by column. Its columns are *pages* of :data:`PAGE` buckets taken
from a pool shared by all series: page ``k`` of a series holds buckets ``offset + k·PAGE …`` in every
row of every tier (a pool is ``[row, page, PAGE]`` float32 per tier). A series holds only the pages
its data spans, so memory follows the data: a narrow series costs one page per side, a series
spanning 20 octaves at scale 6 forty. The scale starts at :data:`MAX_STORE_SCALE` (6: every quantile
within 0.54 %) and is lowered (bucket ``i`` → ``i >> k``, as :func:`agent.exphist.downscale`) only

- when the series' data span more than ``max_buckets`` buckets, or
- when the pool (``max_memory``) has no free page for a growing series: then the series holding the
  most pages is lowered one scale (it frees about half its pages), which may be the growing series
  itself. So memory is bounded whatever comes, and precision is shared out widest-first.

The scale never goes up again while the series lives: one wide burst costs precision until the
series expires (its pages then return to the pool). Pages not yet used are never touched (the pool is
zero-filled virtual memory), so the resident memory is what the series use, up to ``max_memory``.

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
from agent.exphist import MIN_SCALE, ExpHistogram

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

PAGE = 32
"""Buckets per page: half an octave at scale 6."""
MAX_STORE_SCALE = 6
"""The finest scale a series is kept at: every quantile within 0.54 % (``exphist.relative_error(6)``)."""

_EMPTY_LOW = 1 << 62
"""Occupied-span sentinels: an empty side has low > high."""
_EMPTY_HIGH = -(1 << 62)


def page_bytes(tier_rows: list[int]) -> int:
    """Bytes one page takes in the pools: a float32 count per bucket, in every row of every tier."""
    return sum(tier_rows) * PAGE * 4


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
    """One ring of slices for every series: the page pool is [row, page, bucket], statistics [row, series]."""

    def __init__(self, slice_s: float, rows: int, pages: int, now: float) -> None:
        self.slice_s = slice_s
        self.rows = rows
        self.cursor = 0
        """Ring row of the filling slice."""
        self.number = math.floor(now / slice_s)
        """Which slice (time // slice_s) the filling row is."""
        # Zero-filled and untouched until used: only the pages series take become resident.
        self.pool: F32 = np.zeros((rows, pages, PAGE), dtype=np.float32)
        self.zero: F64 = np.zeros((rows, 0))
        self.count: F64 = np.zeros((rows, 0))
        self.sum: F64 = np.zeros((rows, 0))
        self.min: F64 = np.full((rows, 0), np.inf)
        self.max: F64 = np.full((rows, 0), -np.inf)

    def clear_row(self, row: int, used: int) -> None:
        self.pool[row, :used] = 0.0
        self.zero[row] = 0.0
        self.count[row] = 0.0
        self.sum[row] = 0.0
        self.min[row] = np.inf
        self.max[row] = -np.inf

    def clear_series(self, i: int) -> None:
        """Clear series `i`'s statistics (its pages are cleared when they return to the pool)."""
        self.zero[:, i] = 0.0
        self.count[:, i] = 0.0
        self.sum[:, i] = 0.0
        self.min[:, i] = np.inf
        self.max[:, i] = -np.inf

    def add_row_from(self, other: _Tier, row: int, used: int) -> None:
        """Add `other`'s `row` (all series) into this tier's filling row."""
        cur = self.cursor
        self.pool[cur, :used] += other.pool[row, :used]
        self.zero[cur] += other.zero[row]
        self.count[cur] += other.count[row]
        self.sum[cur] += other.sum[row]
        np.minimum(self.min[cur], other.min[row], out=self.min[cur])
        np.maximum(self.max[cur], other.max[row], out=self.max[cur])

    def grow(self, capacity: int) -> None:
        extra = capacity - self.count.shape[1]

        def wider(a: F64, fill: float) -> F64:
            return np.concatenate((a, np.full((a.shape[0], extra), fill)), axis=1)

        self.zero = wider(self.zero, 0.0)
        self.count = wider(self.count, 0.0)
        self.sum = wider(self.sum, 0.0)
        self.min = wider(self.min, np.inf)
        self.max = wider(self.max, -np.inf)


class _Side:
    """One sign's layout of every series: its pages, bucket offset and occupied span."""

    def __init__(self, max_pages: int) -> None:
        self.table: I32 = np.zeros((0, max_pages), dtype=np.int32)
        """[series, k]: the pool page holding the series' k-th page of buckets; 0 (the zero page): none."""
        self.pages: I64 = np.zeros(0, dtype=np.int64)
        """Pages held by each series."""
        self.offset: I64 = np.zeros(0, dtype=np.int64)
        """Bucket index of each series' first column."""
        self.low: I64 = np.zeros(0, dtype=np.int64)
        """Occupied bucket span at the series' scale (low > high: empty); never shrinks while it lives."""
        self.high: I64 = np.zeros(0, dtype=np.int64)

    def grow(self, extra: int) -> None:
        def wider(a: I64, fill: int) -> I64:
            return np.concatenate((a, np.full(extra, fill, dtype=np.int64)))

        self.table = np.concatenate((self.table, np.zeros((extra, self.table.shape[1]), dtype=np.int32)))
        self.pages = wider(self.pages, 0)
        self.offset = wider(self.offset, 0)
        self.low = wider(self.low, _EMPTY_LOW)
        self.high = wider(self.high, _EMPTY_HIGH)

    def fits(self, i: int, lo: int, hi: int) -> bool:
        """Whether series `i`'s pages hold buckets ``lo..hi`` (an empty span always fits)."""
        off = int(self.offset[i])
        return lo > hi or (off <= lo and hi < off + int(self.pages[i]) * PAGE)


def _layout(lo: int, hi: int) -> tuple[int, int]:
    """(offset, pages) holding buckets ``lo..hi`` with the span centred in its pages; (0, 0) if empty."""
    if lo > hi:
        return 0, 0
    width = hi - lo + 1
    pages = -(-width // PAGE)
    return lo - (pages * PAGE - width) // 2, pages


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
    """Slots for up to ``max_series`` series and a pool of at most ``max_memory`` bytes of pages; see
    the module docstring."""

    def __init__(
        self,
        base_s: float,
        tier_slices_s: list[float],
        tier_rows: list[int],
        max_buckets: int,
        now: float,
        max_memory: int,
    ) -> None:
        self.buckets = max_buckets
        self.max_pages = -(-max_buckets // PAGE)
        """Pages a series holds per side at most (its span is at most max_buckets)."""
        self.page_bytes = page_bytes(tier_rows)
        self.budget = max(2, max_memory // self.page_bytes)
        """Pages the pool holds (page 0, the zero page, comes on top)."""
        self.capacity = 0
        self.tiers = [
            _Tier(s, rows, self.budget + 1, now) for s, rows in zip(tier_slices_s, tier_rows, strict=True)
        ]
        self.base = self.tiers[0]
        self.scale: I64 = np.zeros(0, dtype=np.int64)
        self.pos = _Side(self.max_pages)
        self.neg = _Side(self.max_pages)
        self.has_negative = False
        """Whether any series had a negative value (windows then carry a negative side)."""
        self._free: list[int] = []
        self.used = 1
        """Pool pages ``[1, used)`` were handed out at some time (rotation touches only those)."""
        self.held = 0
        """Pages held by series now."""
        self.downscales = 0
        """Times a series' scale was lowered because its data spanned more than max_buckets."""
        self.squeezes = 0
        """Times a series' scale was lowered because the pool (max_memory) was full."""

    # -- slots -------------------------------------------------------------------------------------

    def grow(self, capacity: int) -> None:
        """Make room for `capacity` series (only ever grows)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        if 2 * capacity > self.budget:
            # Two pages a series (one per side) are always to be had: that is what ends every squeeze.
            raise ValueError(f"a pool of {self.budget} pages cannot hold {capacity} series (2 pages each)")
        for t in self.tiers:
            t.grow(capacity)
        self.pos.grow(extra)
        self.neg.grow(extra)
        self.scale = np.concatenate((self.scale, np.full(extra, MAX_STORE_SCALE, dtype=np.int64)))
        self.capacity = capacity

    def reset(self, i: int) -> None:
        """Forget everything of slot `i` (a series expired): its pages go back to the pool."""
        for t in self.tiers:
            t.clear_series(i)
        for side in (self.pos, self.neg):
            self._release(side.table[i, : int(side.pages[i])].astype(np.int64))
            side.table[i] = 0
            side.pages[i] = side.offset[i] = 0
            side.low[i], side.high[i] = _EMPTY_LOW, _EMPTY_HIGH
        self.scale[i] = MAX_STORE_SCALE

    def memory_bytes(self) -> int:
        """Bytes of the pages series hold now."""
        return self.held * self.page_bytes

    # -- pages -------------------------------------------------------------------------------------

    def _free_pages(self) -> int:
        return len(self._free) + self.budget + 1 - self.used

    def _take(self, n: int) -> I64:
        """`n` zeroed pages (the caller checked there are enough)."""
        reused = [self._free.pop() for _ in range(min(n, len(self._free)))]
        fresh = list(range(self.used, self.used + n - len(reused)))
        self.used += len(fresh)
        self.held += n
        return np.array(reused + fresh, dtype=np.int64)

    def _release(self, ids: I64) -> None:
        if not ids.size:
            return
        for t in self.tiers:
            t.pool[:, ids] = 0.0
        self._free.extend(ids.tolist())
        self.held -= int(ids.size)

    # -- time --------------------------------------------------------------------------------------

    def rotate(self, now: float) -> None:
        """Complete every base slice that ended by `now`, rolling each into the coarser tiers."""
        base = self.base
        target = math.floor(now / base.slice_s)
        behind = target - base.number
        if 0 >= behind >= -1:  # within the filling slice (or a small step back): nothing to complete
            return
        used = self.used
        # Past the longest ring everything is gone: clear instead of stepping slice by slice. The same
        # when the clock stepped back by more than a slice: the slices held are in its future.
        longest = max(round(t.slice_s / base.slice_s) * t.rows for t in self.tiers)
        if behind > longest or behind < -1:
            for t in self.tiers:
                for row in range(t.rows):
                    t.clear_row(row, used)
                t.cursor = 0
                t.number = math.floor(target * base.slice_s / t.slice_s + 1e-9)
            return
        for _ in range(behind):
            for t in self.tiers[1:]:
                t.add_row_from(base, base.cursor, used)
            base.number += 1
            base.cursor = (base.cursor + 1) % base.rows
            base.clear_row(base.cursor, used)
            start_s = base.number * base.slice_s
            for t in self.tiers[1:]:
                number = math.floor(start_s / t.slice_s + 1e-9)
                if number != t.number:
                    t.number = number
                    t.cursor = (t.cursor + 1) % t.rows
                    t.clear_row(t.cursor, used)

    # -- data --------------------------------------------------------------------------------------

    def add(self, i: int, h: ExpHistogram) -> None:
        """Add histogram `h` (count > 0) to series `i`'s filling base slice."""
        has_pos, has_neg = h.positive_counts.size > 0, h.negative_counts.size > 0
        if has_neg:
            self.has_negative = True
        if has_pos or has_neg:
            shift = self._fit(i, h, has_pos, has_neg)
            row = self.base.cursor
            if has_pos:
                self._add_side(self.pos, i, row, h.positive_offset, h.positive_counts, shift)
            if has_neg:
                self._add_side(self.neg, i, row, h.negative_offset, h.negative_counts, shift)
        b, row = self.base, self.base.cursor
        b.zero[row, i] += h.zero_count
        b.count[row, i] += h.count
        b.sum[row, i] += h.sum
        if h.min < b.min[row, i]:
            b.min[row, i] = h.min
        if h.max > b.max[row, i]:
            b.max[row, i] = h.max

    def _fit(self, i: int, h: ExpHistogram, has_pos: bool, has_neg: bool) -> int:
        """Lay series `i` out to hold `h`'s buckets too; returns ``h.scale`` minus the series' scale.

        The scale is the finest (at most the series' own and ``h``'s) at which each side spans at most
        ``max_buckets`` buckets and the pages it needs are free; when they are not, the series holding
        the most pages gives some back by going one scale lower (which may be series `i` itself).
        """
        ceiling = int(self.scale[i])
        while True:
            scale = int(self.scale[i])
            target = min(ceiling, h.scale)
            ds, dh = scale - target, h.scale - target
            spans = []
            for side, has, off, n in (
                (self.pos, has_pos, h.positive_offset, h.positive_counts.size),
                (self.neg, has_neg, h.negative_offset, h.negative_counts.size),
            ):
                low, high = int(side.low[i]), int(side.high[i])
                lo, hi = (low >> ds, high >> ds) if low <= high else (_EMPTY_LOW, _EMPTY_HIGH)
                if has:
                    lo, hi = min(lo, off >> dh), max(hi, (off + n - 1) >> dh)
                spans.append((lo, hi))
            extra = 0
            while extra < target - MIN_SCALE and any(
                lo <= hi and (hi >> extra) - (lo >> extra) >= self.buckets for lo, hi in spans
            ):
                extra += 1
            new_scale = target - extra
            sides = (self.pos, self.neg)
            spans = [(lo >> extra, hi >> extra) if lo <= hi else (lo, hi) for lo, hi in spans]
            if new_scale == scale and all(
                s.fits(i, lo, hi) for s, (lo, hi) in zip(sides, spans, strict=True)
            ):
                return h.scale - scale
            layouts = [
                (int(s.offset[i]), int(s.pages[i]))
                if new_scale == scale and s.fits(i, lo, hi)
                else _layout(lo, hi)
                for s, (lo, hi) in zip(sides, spans, strict=True)
            ]
            planned = sum(pages for _, pages in layouts)
            # Net: a side that shrinks gives its pages back before the other takes new ones.
            if planned - int(self.pos.pages[i] + self.neg.pages[i]) <= self._free_pages():
                if new_scale < scale and extra:
                    self.downscales += 1
                self._relayout(i, new_scale, layouts)
                return h.scale - new_scale
            held = self.pos.pages + self.neg.pages
            victim = int(np.argmax(held))
            self.squeezes += 1
            if victim == i or planned >= int(held[victim]):
                ceiling = new_scale - 1  # series i is the widest: it goes coarser itself
            else:
                self._lower(victim)

    def _lower(self, j: int) -> None:
        """Series `j` one scale coarser, in no more pages than it holds (about half)."""
        new_scale = int(self.scale[j]) - 1
        layouts = [_layout(int(s.low[j]) >> 1, int(s.high[j]) >> 1) for s in (self.pos, self.neg)]
        self._relayout(j, new_scale, layouts)

    def _add_side(self, side: _Side, i: int, row: int, offset: int, counts: F64, shift: int) -> None:
        n = counts.size
        column = (np.arange(offset, offset + n, dtype=np.int64) >> shift) - int(side.offset[i])
        if shift:
            first = int(column[0])
            # With weights, bincount sums them as float64 (numpy's stubs type it as an int array).
            counts = np.bincount(column - first, weights=counts).astype(np.float64, copy=False)
            column = np.arange(first, first + counts.size, dtype=np.int64)
        flat = self.base.pool[row].reshape(-1)
        flat[side.table[i, column // PAGE].astype(np.int64) * PAGE + column % PAGE] += counts
        side.low[i] = min(int(side.low[i]), offset >> shift)
        side.high[i] = max(int(side.high[i]), (offset + n - 1) >> shift)

    def _relayout(self, i: int, new_scale: int, layouts: list[tuple[int, int]]) -> None:
        """Move series `i`'s rows to `new_scale` (<= its scale) and the given (offset, pages) per side."""
        d = int(self.scale[i]) - new_scale
        moves = sorted(  # the side giving pages back goes first, so the other can take them
            zip((self.pos, self.neg), layouts, strict=True), key=lambda m: m[1][1] - int(m[0].pages[i])
        )
        for side, (new_offset, new_pages) in moves:
            old_pages = int(side.pages[i])
            ids = side.table[i, :old_pages].astype(np.int64)
            if new_pages <= old_pages:
                keep, drop = ids[:new_pages], ids[new_pages:]
            else:
                keep, drop = np.concatenate((ids, self._take(new_pages - old_pages))), ids[:0]
            low, high = int(side.low[i]), int(side.high[i])
            old_offset = int(side.offset[i])
            if low <= high and old_pages:
                columns = np.arange(low - old_offset, high - old_offset + 1)
                target = ((columns + old_offset) >> d) - new_offset
                # target is non-decreasing: add runs of equal targets with one reduceat.
                starts = np.flatnonzero(np.diff(target, prepend=target[0] - 1))
                for t in self.tiers:
                    block = t.pool[:, ids].reshape(t.rows, old_pages * PAGE)[:, columns[0] : columns[-1] + 1]
                    summed = np.add.reduceat(block.astype(np.float64), starts, axis=1)
                    dense = np.zeros((t.rows, new_pages * PAGE), dtype=np.float32)
                    dense[:, target[starts]] = summed
                    t.pool[:, keep] = dense.reshape(t.rows, new_pages, PAGE)
                side.low[i], side.high[i] = low >> d, high >> d
            self._release(drop)
            side.table[i] = 0
            side.table[i, :new_pages] = keep
            side.pages[i] = new_pages
            side.offset[i] = new_offset
        self.scale[i] = new_scale

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
        zero, count, total = np.zeros(n), np.zeros(n), np.zeros(n)
        low, high = np.full(n, np.inf), np.full(n, -np.inf)
        for src, r in parts:
            zero += src.zero[r, start:stop]
            count += src.count[r, start:stop]
            total += src.sum[r, start:stop]
            np.minimum(low, src.min[r, start:stop], out=low)
            np.maximum(high, src.max[r, start:stop], out=high)
        return Window(
            pos=self._gather(self.pos, parts, start, stop),
            neg=self._gather(self.neg, parts, start, stop) if self.has_negative else None,
            zero=zero,
            count=count,
            sum=total,
            min=low,
            max=high,
            scale=self.scale[start:stop].copy(),
            pos_offset=self.pos.offset[start:stop].copy(),
            neg_offset=self.neg.offset[start:stop].copy(),
            span_s=span,
        )

    @staticmethod
    def _gather(side: _Side, parts: list[tuple[_Tier, int]], start: int, stop: int) -> F64:
        """[series, column] float64 counts of one side of series ``[start, stop)``, summed over `parts`."""
        n = stop - start
        width = max(1, int(side.pages[start:stop].max(initial=0)))
        table = side.table[start:stop, :width]
        out = np.zeros((n, width, PAGE))
        for src, r in parts:
            out += src.pool[r][table]
        return out.reshape(n, width * PAGE)


def quantiles(w: Window, qs: list[float]) -> F64:
    """[quantile, series] estimates by :func:`agent.exphist.quantile`'s rule, for every series of `w`.

    NaN where a series has no data in the window. The relative error is at most
    ``exphist.relative_error(scale)`` of each series (for exponential input).
    """
    n = w.pos.shape[0]
    out = np.full((len(qs), n), np.nan)
    if n == 0:
        return out
    zero_at = w.neg.shape[1] if w.neg is not None else 0
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
