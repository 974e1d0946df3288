"""The drift processor's histograms as rows of dense arrays: one row (a *slot*) per histogram held
(a series' current window, its baseline or learning, each trailing past window).

A slot holds one exponential histogram: its positive buckets in a row of ``width`` columns of
:attr:`Rows.positive` (column ``c`` is bucket ``base + c``), its negative ones likewise in
:attr:`Rows.negative`, with its scale, zero count, count, sum, min and max in per-slot arrays.
:meth:`Rows.add` adds a whole batch of histograms to their slots at once: one ``np.add.at`` of every
non-empty bucket into the store, no Python per bucket and no object per merge.

A slot's scale and layout follow :func:`agent.exphist.merge_all`'s rule for everything added to it
since it was cleared: the largest scale no finer than any input's (with buckets) at which each sign's
span of indices fits ``width`` buckets, so a slot equals the merge of its inputs (``width`` being
``max_buckets``). A batch whose histograms are coarser than a slot, or reach outside its columns,
first rebuilds that slot (downscaled and/or moved so its span is centred in the row): the slow path,
a few times a series at most once its span is known.

Memory: ``width`` float64 a slot for the positive side (2.5 KB at 320), the negative side only
touched for slots that hold negative values (the arrays are allocated zeroed, so untouched pages
cost no RSS), plus ~100 B of per-slot fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import attrgetter

import numpy as np
import numpy.typing as npt

from agent import exphist
from agent.exphist import ExpHistogram
from processors.drift.stats import Histograms, Side

Counts = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
_BIG = 1 << 62
"""Beyond any bucket index: the low end of an empty span (its high end is -_BIG)."""
_FIRST_SLOTS = 1024
"""Slots of a new store; it doubles when full."""


class Rows:
    """Histograms in slots; see the module docstring."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._capacity = 0
        self._top = 0
        """Slots ever handed out (the next new one)."""
        self._free: list[int] = []
        self._negative_used = False
        self.positive: Counts = np.zeros((0, width))
        self.negative: Counts = np.zeros((0, width))
        self.scale: Ints = np.zeros(0, dtype=np.int64)
        self.pos_base: Ints = np.zeros(0, dtype=np.int64)
        self.pos_low: Ints = np.zeros(0, dtype=np.int64)
        self.pos_high: Ints = np.zeros(0, dtype=np.int64)
        self.neg_base: Ints = np.zeros(0, dtype=np.int64)
        self.neg_low: Ints = np.zeros(0, dtype=np.int64)
        self.neg_high: Ints = np.zeros(0, dtype=np.int64)
        self.zero: Counts = np.zeros(0)
        self.count: Counts = np.zeros(0)
        self.sum: Counts = np.zeros(0)
        self.min: Counts = np.zeros(0)
        self.max: Counts = np.zeros(0)
        self._grow(_FIRST_SLOTS)

    @property
    def slots_in_use(self) -> int:
        return self._top - len(self._free)

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        width = self.width

        def wider(a: npt.NDArray[np.generic], empty: float) -> npt.NDArray[np.generic]:
            b = np.full(capacity, empty, dtype=a.dtype)
            b[:old] = a
            return b

        # np.zeros: pages never written (the negative side of timers) are never in RSS.
        positive = np.zeros((capacity, width))
        positive[:old] = self.positive
        self.positive = positive
        negative = np.zeros((capacity, width))
        if self._negative_used:
            negative[:old] = self.negative
        self.negative = negative
        self.scale = wider(self.scale, exphist.MAX_SCALE)  # type: ignore[assignment]
        for name in ("pos_base", "neg_base"):
            setattr(self, name, wider(getattr(self, name), 0))
        for name in ("pos_low", "neg_low"):
            setattr(self, name, wider(getattr(self, name), _BIG))
        for name in ("pos_high", "neg_high"):
            setattr(self, name, wider(getattr(self, name), -_BIG))
        for name in ("zero", "count", "sum"):
            setattr(self, name, wider(getattr(self, name), 0.0))
        self.min = wider(self.min, math.inf)  # type: ignore[assignment]
        self.max = wider(self.max, -math.inf)  # type: ignore[assignment]
        self._capacity = capacity

    def allocate(self) -> int:
        """A slot holding nothing."""
        if self._free:
            return self._free.pop()
        if self._top == self._capacity:
            self._grow(2 * self._capacity)
        self._top += 1
        return self._top - 1

    def release(self, slots: list[int]) -> None:
        """Clear `slots` and take them back for reuse."""
        self.clear(slots)
        self._free += slots

    def clear(self, slots: list[int]) -> None:
        """Empty `slots` (a new window starts afresh: its scale is its own inputs')."""
        if not slots:
            return
        at = np.asarray(slots, dtype=np.int64)
        self.positive[at] = 0.0
        if self._negative_used:
            held = at[self.neg_low[at] <= self.neg_high[at]]
            if held.size:
                self.negative[held] = 0.0
        self.scale[at] = exphist.MAX_SCALE
        self.pos_low[at] = self.neg_low[at] = _BIG
        self.pos_high[at] = self.neg_high[at] = -_BIG
        self.zero[at] = self.count[at] = self.sum[at] = 0.0
        self.min[at] = math.inf
        self.max[at] = -math.inf

    # -- adding --------------------------------------------------------------------------------------

    def add_histograms(self, slots: list[int], hs: list[ExpHistogram]) -> int:
        """Add each histogram of `hs` to its slot (a slot may appear more than once: added in order).
        Histograms without observations are left out, and so are those whose min or max is not finite:
        their number is returned."""
        n = len(hs)
        count = np.fromiter(map(_COUNT, hs), dtype=np.float64, count=n)
        low = np.fromiter(map(_MIN, hs), dtype=np.float64, count=n)
        high = np.fromiter(map(_MAX, hs), dtype=np.float64, count=n)
        full = count > 0.0
        keep = full & np.isfinite(low) & np.isfinite(high)
        left_out = 0
        if not keep.all():
            left_out = int(full.sum() - keep.sum())
            kept = keep.tolist()
            slots = [slot for slot, k in zip(slots, kept, strict=True) if k]
            hs = [h for h, k in zip(hs, kept, strict=True) if k]
            count, low, high = count[keep], low[keep], high[keep]
            n = len(hs)
        if n:
            self.add(
                np.array(slots, dtype=np.int64),
                np.fromiter(map(_SCALE, hs), dtype=np.int64, count=n),
                np.fromiter(map(_ZERO, hs), dtype=np.float64, count=n),
                count,
                np.fromiter(map(_SUM, hs), dtype=np.float64, count=n),
                low,
                high,
                _side(hs, _POS_OFFSET, _POS_COUNTS, _POS_SIZE),
                _side(hs, _NEG_OFFSET, _NEG_COUNTS, _NEG_SIZE),
            )
        return left_out

    def add_values(self, slots: Ints, values: Counts, scale: int) -> None:
        """Add each value of `values` (finite) to its slot as one observation, at `scale` at most (as
        exphist.from_values places it: zero in the zero bucket)."""
        n = values.size
        index = exphist.index_of(np.where(values != 0.0, np.abs(values), 1.0), scale)
        ones = np.ones(n)

        def side(where: npt.NDArray[np.bool_]) -> Side:
            counts: Counts = ones[where]
            return Side(index, where.astype(np.int64), counts, index, index)

        self.add(
            slots, np.full(n, scale, dtype=np.int64), np.where(values == 0.0, 1.0, 0.0), ones, values,
            values, values, side(values > 0.0), side(values < 0.0),
        )  # fmt: skip

    def add(
        self,
        slots: Ints,
        scale: Ints,
        zero: Counts,
        count: Counts,
        total: Counts,
        low: Counts,
        high: Counts,
        positive: Side,
        negative: Side,
    ) -> None:
        """Add histograms given as arrays (one entry each; `positive` and `negative` with
        ``low``/``high`` the extents of each entry's bucket array, ``size`` 0 for none) to `slots`."""
        width = self.width
        has_pos, has_neg = positive.size > 0, negative.size > 0
        # Only histograms with buckets constrain a slot's scale.
        own_scale = np.where(has_pos | has_neg, scale, exphist.MAX_SCALE)
        touched, inverse = np.unique(slots, return_inverse=True)
        old_scale = self.scale[touched]
        target = old_scale.copy()
        np.minimum.at(target, inverse, own_scale)
        # Each sign's span at `target` (the slot's own and its inputs'), then the shift that fits it.
        spans = []
        for side, has, s_low, s_high in (
            (positive, has_pos, self.pos_low, self.pos_high),
            (negative, has_neg, self.neg_low, self.neg_high),
        ):
            lo, hi = s_low[touched], s_high[touched]
            held = lo <= hi
            k = old_scale - target
            lo = np.where(held, lo >> k, _BIG)
            hi = np.where(held, hi >> k, -_BIG)
            shift = own_scale - target[inverse]
            np.minimum.at(lo, inverse, np.where(has, side.low >> shift, _BIG))
            np.maximum.at(hi, inverse, np.where(has, side.high >> shift, -_BIG))
            spans.append((lo, hi, lo <= hi))
        extra = np.zeros(touched.size, dtype=np.int64)
        for lo, hi, held in spans:
            if held.any():
                fit = exphist.shift_to_fit(np.where(held, lo, 0), np.where(held, hi, 0), width)
                np.maximum(extra, np.where(held, fit, 0), out=extra)
        np.minimum(extra, target - exphist.MIN_SCALE, out=extra)
        new_scale = target - extra
        (pos_lo, pos_hi, pos_held), (neg_lo, neg_hi, neg_held) = spans
        pos_lo, pos_hi, neg_lo, neg_hi = pos_lo >> extra, pos_hi >> extra, neg_lo >> extra, neg_hi >> extra
        pos_base, neg_base = self.pos_base[touched], self.neg_base[touched]
        rebuild = (
            (new_scale != old_scale)
            | (pos_held & ((pos_lo < pos_base) | (pos_hi >= pos_base + width)))
            | (neg_held & ((neg_lo < neg_base) | (neg_hi >= neg_base + width)))
        )
        if rebuild.any():
            # Centred: room on both sides for the next windows' inputs.
            pos_base = np.where(rebuild & pos_held, pos_lo - (width - (pos_hi - pos_lo + 1)) // 2, pos_base)
            neg_base = np.where(rebuild & neg_held, neg_lo - (width - (neg_hi - neg_lo + 1)) // 2, neg_base)
            self._rebuild(touched[rebuild], new_scale[rebuild], pos_base[rebuild], neg_base[rebuild])
        self.scale[touched] = new_scale
        self.pos_low[touched], self.pos_high[touched] = (
            np.where(pos_held, pos_lo, _BIG),
            np.where(pos_held, pos_hi, -_BIG),
        )
        self.neg_low[touched], self.neg_high[touched] = (
            np.where(neg_held, neg_lo, _BIG),
            np.where(neg_held, neg_hi, -_BIG),
        )
        # Every non-empty bucket into its slot's column, in input order (ufunc.at adds repeated columns
        # one after the other; numpy 2's is as fast as a fancy-index add).
        entry_shift = own_scale - new_scale[inverse]
        shifted = bool(entry_shift.any())
        for side, base, rows in ((positive, pos_base, self.positive), (negative, neg_base, self.negative)):
            live = np.flatnonzero(side.counts != 0.0)
            if not live.size:
                continue
            if rows is self.negative:
                self._negative_used = True
            owner = np.repeat(np.arange(slots.size, dtype=np.int32), side.size)[live]  # int32: less to write
            start = side.first - (np.cumsum(side.size) - side.size)  # bucket index at flat position 0
            if shifted:
                key = (
                    slots[owner] * width
                    + ((live + start[owner]) >> entry_shift[owner])
                    - base[inverse][owner]
                )
            else:  # the usual batch: every input at its slot's scale
                key = live + (slots * width + start - base[inverse])[owner]
            np.add.at(rows.reshape(-1), key, side.counts[live])
        np.add.at(self.zero, slots, zero)
        np.add.at(self.count, slots, count)
        np.add.at(self.sum, slots, total)
        np.minimum.at(self.min, slots, low)
        np.maximum.at(self.max, slots, high)

    def _rebuild(self, slots: Ints, scale: Ints, pos_base: Ints, neg_base: Ints) -> None:
        """Move `slots`' buckets to `scale` (no finer than theirs) and new bases (the spans fit). A side
        holding nothing (a window just begun) only takes its new base."""
        width = self.width
        shift = self.scale[slots] - scale
        for rows, old_base, new_base, low, high in (
            (self.positive, self.pos_base, pos_base, self.pos_low, self.pos_high),
            (self.negative, self.neg_base, neg_base, self.neg_low, self.neg_high),
        ):
            held = low[slots] <= high[slots]
            if held.any():
                at = slots[held]
                block = rows[at]
                live = np.flatnonzero(block)
                owner = live // width
                index = old_base[at][owner] + live % width
                column = (index >> shift[held][owner]) - new_base[held][owner]
                moved = np.bincount(
                    owner * width + column, weights=block.reshape(-1)[live], minlength=block.size
                )
                rows[at] = moved.reshape(at.size, width)
            old_base[slots] = new_base

    # -- reading -------------------------------------------------------------------------------------

    def histograms(self, slots: Ints) -> Histograms:
        """The histograms of `slots` as stats.drift_of reads them (rows as they are, no copy per slot)."""
        width = self.width
        n = slots.size
        size = np.full(n, width, dtype=np.int64)
        neg_held = self.neg_low[slots] <= self.neg_high[slots]
        negative = (
            Side(
                self.neg_base[slots],
                size,
                self.negative[slots].reshape(-1),
                self.neg_low[slots],
                self.neg_high[slots],
            )
            if self._negative_used and neg_held.any()
            else Side(
                np.zeros(n, dtype=np.int64),
                np.zeros(n, dtype=np.int64),
                np.zeros(0),
                self.neg_low[slots],
                self.neg_high[slots],
            )
        )
        return Histograms(
            self.scale[slots],
            self.zero[slots],
            Side(
                self.pos_base[slots],
                size,
                self.positive[slots].reshape(-1),
                self.pos_low[slots],
                self.pos_high[slots],
            ),
            negative,
        )

    def histogram(self, slot: int) -> ExpHistogram:
        """Slot `slot` as an ExpHistogram (its buckets copied; for the baseline file)."""
        if self.count[slot] == 0.0:
            return exphist.EMPTY

        def side(rows: Counts, base: Ints, low: Ints, high: Ints) -> tuple[int, Counts]:
            lo, hi = int(low[slot]), int(high[slot])
            if lo > hi:
                return 0, np.zeros(0)
            start = lo - int(base[slot])
            return lo, rows[slot, start : start + hi - lo + 1].copy()

        pos_offset, pos_counts = side(self.positive, self.pos_base, self.pos_low, self.pos_high)
        neg_offset, neg_counts = side(self.negative, self.neg_base, self.neg_low, self.neg_high)
        return ExpHistogram(
            int(self.scale[slot]), float(self.zero[slot]), pos_offset, pos_counts, neg_offset, neg_counts,
            float(self.count[slot]), float(self.sum[slot]), float(self.min[slot]), float(self.max[slot]),
        )  # fmt: skip


def _side(
    hs: list[ExpHistogram],
    offset: Callable[[ExpHistogram], int],
    counts: Callable[[ExpHistogram], Counts],
    size: Callable[[ExpHistogram], int],
) -> Side:
    n = len(hs)
    sizes = np.fromiter(map(size, hs), dtype=np.int64, count=n)
    if not sizes.any():  # timers have no negative side: nothing to gather
        first = np.zeros(n, dtype=np.int64)
        return Side(first, sizes, np.zeros(0), first, first - 1)
    first = np.fromiter(map(offset, hs), dtype=np.int64, count=n)
    return Side(first, sizes, np.concatenate(list(map(counts, hs))), first, first + sizes - 1)


_SCALE = attrgetter("scale")
_ZERO = attrgetter("zero_count")
_COUNT = attrgetter("count")
_SUM = attrgetter("sum")
_MIN = attrgetter("min")
_MAX = attrgetter("max")
_POS_OFFSET = attrgetter("positive_offset")
_POS_COUNTS = attrgetter("positive_counts")
_POS_SIZE = attrgetter("positive_counts.size")
_NEG_OFFSET = attrgetter("negative_offset")
_NEG_COUNTS = attrgetter("negative_counts")
_NEG_SIZE = attrgetter("negative_counts.size")
