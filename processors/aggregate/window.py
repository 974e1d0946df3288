"""The state of one aggregation group in one window: exact, mergeable running statistics.

An :class:`Acc` holds what the outputs need over the samples of one window: count and sum, the mean
and the sum of squared deviations (Welford's update: stable where ``Σv² − (Σv)²/n`` cancels), min,
max, the last sample by time, and the co-moments of (time, value) for the least-squares slope. Two
accumulators merge exactly (Chan et al.'s pairwise formulas), so a rule's coarser intervals are made
by merging its finest window into them once per finest window, not by folding every point again.
Distributions keep their merged exponential histogram instead of the moments; a rule with the
``quantiles`` or ``histogram`` output keeps a gauge window's samples too, turned into a histogram when
the window ends (:func:`settle`, for many windows at once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from agent import exphist
from agent.exphist import ExpHistogram

_PARTS = 32
"""Distributions gathered before they are merged into the window's histogram."""


class Acc:
    """Running statistics of one window. Fields are public: the processor's fold loop updates them
    inline (a method call a point costs more than the update itself)."""

    __slots__ = (
        "c", "hi", "hist", "last", "last_t", "lo", "m2t", "m2v", "mt", "mv", "n", "parts", "qs", "total",
        "values",
    )  # fmt: skip

    def __init__(self, samples: bool = False) -> None:
        self.n = 0.0
        """Samples (for distributions: observations)."""
        self.total = 0.0
        """Sum of the samples (for counters: the increase)."""
        self.mv = 0.0
        """Mean of the values."""
        self.m2v = 0.0
        """Sum of squared deviations of the values from their mean."""
        self.mt = 0.0
        """Mean of the sample times (seconds since the processor's epoch)."""
        self.m2t = 0.0
        """Sum of squared deviations of the times."""
        self.c = 0.0
        """Co-moment: sum of (t − mean t)(v − mean v)."""
        self.lo = math.inf
        self.hi = -math.inf
        self.last = math.nan
        self.last_t = -math.inf
        self.hist: ExpHistogram | None = None
        """Distributions: the merged histogram of the window's earlier points (see :meth:`histogram`)."""
        self.parts: list[ExpHistogram] | None = None
        """Distributions not merged yet: merged together in one pass (``merge_all`` of 32 costs a few
        pairwise merges), at the window's end or when _PARTS have gathered. None until the first (a
        list per accumulator is a tracked object for the garbage collector to walk)."""
        self.values: list[float] | None = [] if samples else None
        self.qs: list[float] | None = None
        """The quantiles of :attr:`hist` as :func:`settle` found them (None: not found, or data since)."""
        """Gauge samples kept for the quantiles (None: not kept); :func:`settle` makes them a histogram."""

    def reset(self) -> None:
        """Empty, as new (keeping whether samples are kept); no allocation unless parts were left."""
        self.n = self.total = self.mv = self.m2v = self.mt = self.m2t = self.c = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.last = math.nan
        self.last_t = -math.inf
        self.hist = None
        self.qs = None
        self.parts = None
        if self.values:
            self.values = []

    def add_histogram(self, h: ExpHistogram, max_buckets: int) -> None:
        """One distribution's observations (a delta)."""
        self.n += h.count
        self.total += h.sum
        if h.min < self.lo:
            self.lo = h.min
        if h.max > self.hi:
            self.hi = h.max
        self.qs = None
        parts = self.parts
        if parts is None:
            self.parts = [h]
        else:
            parts.append(h)
            if len(parts) >= _PARTS:
                self.histogram(max_buckets)

    def histogram(self, max_buckets: int) -> ExpHistogram | None:
        """The window's merged histogram (None without distributions or kept samples)."""
        if self.values:
            settle([self], max_buckets)
        parts = self.parts
        if parts:
            if self.hist is not None:
                parts.append(self.hist)
            self.hist = exphist.merge_all(parts, max_buckets=max_buckets)
            self.parts = None
        return self.hist

    def merge(self, o: Acc, max_buckets: int, moments: bool = True) -> None:
        """Fold accumulator `o` (a later window) into this one, exactly; the moments only with
        `moments` (the fold did not keep them otherwise)."""
        if o.n == 0:
            return
        na, nb = self.n, o.n
        n = na + nb
        if moments:
            dv = o.mv - self.mv
            dt = o.mt - self.mt
            w = na * nb / n
            self.m2v += o.m2v + dv * dv * w
            self.m2t += o.m2t + dt * dt * w
            self.c += o.c + dt * dv * w
            self.mv += dv * nb / n
            self.mt += dt * nb / n
        self.n = n
        self.total += o.total
        self.lo = min(self.lo, o.lo)
        self.hi = max(self.hi, o.hi)
        if o.last_t >= self.last_t:
            self.last_t = o.last_t
            self.last = o.last
        theirs = o.histogram(max_buckets)
        if theirs is not None:
            self.qs = None
            parts = self.parts
            if parts is None:
                self.parts = [theirs]
            else:
                parts.append(theirs)
                if len(parts) >= _PARTS:
                    self.histogram(max_buckets)

    # -- outputs -------------------------------------------------------------------------------------

    def avg(self) -> float:
        return self.total / self.n

    def stddev(self) -> float:
        """Population standard deviation (numpy's default, ``ddof=0``), as vmagent's ``stddev``."""
        return math.sqrt(max(self.m2v, 0.0) / self.n)

    def slope(self) -> float | None:
        """Least-squares slope of value over time, per second; None with fewer than two distinct times."""
        if self.n < 2 or not self.m2t > 0.0:
            return None
        return self.c / self.m2t


def settle(accs: Sequence[Acc], max_buckets: int, quantiles: Sequence[float] = ()) -> None:
    """Bring each accumulator's histogram up to date (:meth:`Acc.histogram` of each), all at once: kept
    gauge samples become one histogram per accumulator in one ``from_segments`` pass, and every
    accumulator's pending histograms merge in one :func:`exphist.merge_groups` (a window's end over
    thousands of groups: a merge per group cost tens of µs in numpy call overhead). With `quantiles`,
    each accumulator with a histogram gets them in :attr:`Acc.qs` (:func:`exphist.quantiles_of`)."""
    sampled = [a for a in accs if a.values]
    if sampled:
        lists = [a.values for a in sampled]
        sizes = np.fromiter((len(v) for v in lists if v is not None), dtype=np.int64, count=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = np.fromiter(
            (x for v in lists if v is not None for x in v), dtype=np.float64, count=int(offsets[-1])
        )
        for a, h in zip(
            sampled, exphist.from_segments(flat, None, offsets, max_buckets=max_buckets), strict=True
        ):
            a.values = []
            if a.parts is None:
                a.parts = [h]
            else:
                a.parts.append(h)
    pending = [a for a in accs if a.parts]
    if pending:
        _merge_parts(pending, max_buckets)
    if quantiles:
        held = [a for a in accs if a.hist is not None]
        if held:
            found = exphist.quantiles_of([a.hist for a in held if a.hist is not None], quantiles)
            for a, qs in zip(held, found, strict=True):
                a.qs = qs


def _merge_parts(pending: list[Acc], max_buckets: int) -> None:
    groups: list[list[ExpHistogram]] = []
    for a in pending:
        parts = a.parts or []  # (not None: pending)
        if a.hist is not None:
            parts.append(a.hist)
        groups.append(parts)
        a.parts = None
    for a, h in zip(pending, exphist.merge_groups(groups, max_buckets=max_buckets), strict=True):
        a.hist = h
