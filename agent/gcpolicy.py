"""The agent process's garbage-collection policy: what ``headwater run`` applies, and why.

The collector only ever finds garbage in cycles; everything else is freed by reference counting. Yet
every collection walks all the container objects of the generations it collects, garbage or not, and
holds the GIL meanwhile (the event loop and the telemetry endpoint's thread stop). An agent's
long-lived state is made of such objects: per series a ``SeriesKey`` with its identity tuple and weak
reference, an exporter's ``Series``, a stage's state, the StatsD parser's descriptor tuples (atoms
only: untracked at their first collection). With 100,000 series that is ~450,000 objects, and at the
thresholds before this policy (50,000, 5, 20) the collector found nothing in them but cost:

- **steady load** (every series already known): no collection at all, at 1,000 or 100,000 series;
- **new series** (the ramp, and churn: pods that come and go): each young collection walks up to
  50,000 new objects (4-40 ms measured), each middle one up to 300,000 (33-72 ms);
- **a full collection** walks everything not frozen: 94-156 ms at 100,000 series (~1.3 µs a series),
  seconds at a million. Under churn it comes when a quarter more objects have been promoted since the
  last one, after at least ``threshold2`` middle collections.

What the agent does (``bench/gc_bench.py`` measures each part):

1. At start and after each reload, :func:`freeze_startup_state`: everything alive (modules, config,
   components) is frozen (``gc.freeze``: never walked again, still freed by reference counting), and
   the thresholds become :data:`THRESHOLDS`. Young collections stay rare (50,000 allocations net: a
   flush's short-lived points never reach it), and the middle generation is collected at every second
   young collection, so it walks at most 100,000 objects instead of 300,000; its threshold for full
   collections grows from 20 to 100 so those come as often as before.
2. Every :data:`FREEZE_INTERVAL_S`, :class:`GcKeeper` collects the young and middle generations (a
   pause no longer than the collector's own middle collection) and freezes what survived: new series'
   state is walked by the young collection that sees it first and, once it has outlived an interval,
   never again — a full collection then walks only what arrived since the last round.
3. Frozen objects are not freed when they become cyclic garbage. So that such garbage cannot pile up,
   the keeper thaws: it unfreezes everything, runs one full collection (the pause the collector would
   otherwise take whenever churn called for it: ~1.3 µs a series, ~0.15 s at 100,000) and freezes
   again — at most every :data:`THAW_INTERVAL_S`, and then only when resident memory grew by
   :data:`THAW_GROWTH` since the last thaw (garbage that piles up shows there), or
   :data:`THAW_MAX_INTERVAL_S` passed. A steady agent so pauses for it once a day, not once an hour.
   There is little to find: after 40 s of StatsD → Prometheus at 400k lines/s over 100,000 series a
   full collection freed nothing.

Measured (2-core shared machine, 100,000 series): in the agent process (400k lines/s, 35 s, every
collection timed) the longest middle collection fell from 30-53 ms to 18-19 ms, and the keeper's round
costs ~1.6 ms once the series are known (the StatsD aggregator reuses its value arrays, so a steady
load makes no new tracked objects); in ``bench/gc_bench.py --churn 0.1`` (10 % new series a flush)
the longest pause fell from 54-72 ms to 15 ms and a full collection from 154-230 ms to 0.1 ms; with
every series new at each flush (``--series 50000 --churn 1``) from 160 ms (a full collection) to 59 ms.
What the collector costs is not what limits the rate at 100,000 series: with the collector disabled a
line still costs 1.24-1.34 µs against 0.59 µs at 1,000 (memory latency of per-series dict lookups).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

from agent import vitals

THRESHOLDS = (50_000, 1, 100)
"""``gc.set_threshold``: young collections after 50,000 net allocations of container objects, the
middle generation at every second young collection, a full one considered after 100 middle ones.

History: CPython's (700, 10, 10) collected young objects throughout every flush (50,000 made flushes
~35 % shorter). A middle threshold of 20 let one middle collection walk 1M objects, holding even the
telemetry thread's /healthz 100-130 ms with 200,000 series (29 ms with the collector off, 49 ms at 5:
bench/hostile.py --cases scrape_many_series); 5 still walked 300,000 (33-72 ms at 100,000 series
under churn, bench/gc_bench.py), 1 walks at most 100,000 (15 ms)."""
FREEZE_INTERVAL_S = 10.0
"""How often :class:`GcKeeper` collects the young generations and freezes what survived (the StatsD
receiver's default flush interval: each flush's new series are frozen before the next one)."""
THAW_INTERVAL_S = 3600.0
"""The least time between two thaws of :class:`GcKeeper` (unfreeze, full collection, freeze)."""
THAW_GROWTH = 0.10
"""Resident memory growth since the last thaw that calls for the next one."""
THAW_MAX_INTERVAL_S = 86_400.0
"""The most time between two thaws, whatever memory did: frozen cyclic garbage is held at most this
long (and at most ~:data:`THAW_GROWTH` of memory for :data:`THAW_INTERVAL_S`)."""


def freeze_startup_state() -> None:
    """Freeze everything alive and set :data:`THRESHOLDS` (at start, and after a reload)."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def collect_all() -> int:
    """Unfreeze everything, run a full collection and freeze what is left: the only way to free cyclic
    garbage that was frozen (the keeper's thaw; also what a memory limit wants). Returns the objects
    the collection found unreachable. Pauses ~1-2 µs per live series' worth of objects."""
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    return found


class GcKeeper:
    """Collects the young generations and freezes the survivors every ``freeze_interval_s``; thaws (a
    full collection over everything) at most every ``thaw_interval_s``, when ``rss_bytes()`` grew by
    :data:`THAW_GROWTH` since the last thaw or ``max_thaw_interval_s`` passed (see the module doc).

    ``start`` schedules the rounds on the running loop (a timer, not a task: nothing to await at stop)
    and ``stop`` cancels them; both are idempotent. ``step`` is one round, run by the timer."""

    def __init__(
        self,
        freeze_interval_s: float | None = None,
        thaw_interval_s: float | None = None,
        clock_s: Callable[[], float] = time.monotonic,
        rss_bytes: Callable[[], int | None] = vitals.rss_bytes,
        max_thaw_interval_s: float | None = None,
    ) -> None:
        # None: the module's values as they are now (not when this was defined).
        freeze_interval_s = FREEZE_INTERVAL_S if freeze_interval_s is None else freeze_interval_s
        thaw_interval_s = THAW_INTERVAL_S if thaw_interval_s is None else thaw_interval_s
        max_thaw_interval_s = THAW_MAX_INTERVAL_S if max_thaw_interval_s is None else max_thaw_interval_s
        if freeze_interval_s <= 0 or not freeze_interval_s <= thaw_interval_s <= max_thaw_interval_s:
            raise ValueError("need 0 < freeze_interval_s <= thaw_interval_s <= max_thaw_interval_s")
        self.freeze_interval_s = freeze_interval_s
        self.thaw_interval_s = thaw_interval_s
        self.max_thaw_interval_s = max_thaw_interval_s
        self._clock_s = clock_s
        self._rss_bytes = rss_bytes
        self._thawed_s = clock_s()
        self._thawed_rss = rss_bytes()
        self._timer: asyncio.TimerHandle | None = None
        self.rounds = 0
        """Rounds run (young collection + freeze), thaws included."""
        self.thaws = 0
        """Rounds that unfroze everything and ran a full collection."""

    def step(self) -> None:
        """One round: collect the young and middle generations (or, when a thaw is due, unfreeze and
        collect everything), then freeze what is alive."""
        now = self._clock_s()
        if self._thaw_due(now):
            collect_all()
            self._thawed_s = now
            self._thawed_rss = self._rss_bytes()
            self.thaws += 1
        else:
            gc.collect(1)
            gc.freeze()
        self.rounds += 1

    def _thaw_due(self, now: float) -> bool:
        since = now - self._thawed_s
        if since < self.thaw_interval_s:
            return False
        if since >= self.max_thaw_interval_s:
            return True
        rss, base = self._rss_bytes(), self._thawed_rss
        if rss is None or base is None:  # memory cannot be read: thaw on the shorter interval
            return True
        return rss >= base * (1.0 + THAW_GROWTH)

    def start(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.freeze_interval_s, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.freeze_interval_s, self._tick)
        self.step()
