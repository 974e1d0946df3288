"""Percentiles processor: rolling-window quantiles of distributions, from mergeable exponential histograms.

    processors:
      percentiles:
        include: ["http.*", "db.query.duration"]
        gauges: ["api.*.latency"]   # optional: every value of these gauges is one observation
        windows: [1m, 5m, 1h]
        quantiles: [0.5, 0.9, 0.95, 0.99]
        emit_interval: 10s
        naming: labels          # <name>.quantile{quantile="0.99", window="5m"}; suffix: <name>_p99_5m

Every HISTOGRAM point whose name matches goes into its series' rolling windows (series = name +
labels + resource): StatsD timers, histograms and distributions (DELTA exponential histograms) as
they are; OTLP exponential histograms likewise (CUMULATIVE ones as the difference from the series'
previous point; the first cumulative point only sets that baseline); OTLP explicit-bucket
histograms approximated by spreading each bucket's count evenly inside it. Every ``emit_interval``
(at multiples of it on the clock) the processor sends one GAUGE per series, window and quantile with
data in the window, and optionally the window's merged histogram. The original points pass on
unchanged (unless ``drop_original``); SUMMARY points pass on untouched and are counted as ignored.

Gauges as observations (opt-in): a GAUGE point whose name matches a ``gauges`` glob (and no
``exclude`` glob; ``include`` names distributions only) is one observation of its series' distribution,
for clients that send a latency as one gauge value per request. Its value goes into the same windows,
and its quantiles are named as a distribution's (``<name>.quantile{quantile,window}``); the gauge itself
always passes on unchanged (``drop_original`` drops distributions only). The values a batch holds for
one series become one exponential histogram at the finest scale that fits ``max_buckets``, so the error
bound below holds for them too. Every point is an observation: the JSON ``http`` receiver sends each
item as its own point, but the StatsD receiver aggregates a gauge per flush interval (the last value
wins), so only that last value is seen — send StatsD timers (``ms``) or distributions for per-request
values. Non-finite gauge values are counted
(``headwater_percentiles_ignored_points_total{reason="non_finite"}``).

Error, stated honestly:

- Exponential input: each quantile is within ``(b - 1) / (b + 1)`` of the exact one (``b = 2 **
  2 ** -scale``, the rank rule of numpy's ``inverted_cdf``): 0.54 % at scale 6, 1.08 % at 5, 2.2 % at
  4. Every series starts at scale 6 (no finer: that already keeps the 1 % promise) and keeps it while
  its data span at most ``max_buckets`` buckets (2048: 32 octaves, 0.1 ms to 400 s) and the memory
  pool has room; the StatsD and http receivers build their histograms at scale 8 or coarser with up
  to 2048 buckets, so they arrive fine enough. A series whose data span more is lowered (counted:
  ``headwater_percentiles_downscales_total{reason="span"}``); every window emitted with a bound above
  1 % is counted (``headwater_percentiles_coarse_windows_total``) and
  ``headwater_percentiles_worst_error_ratio`` shows the worst bound of the last emit. OTLP clients
  choose their own scale: the SDKs' exponential aggregation defaults to 160 buckets, too few for
  wide latency data; give it ``max_size`` 2048.
- Explicit-bucket input: a quantile is only known to lie within the source bucket that holds it
  (as with Prometheus' histogram_quantile); the interpolation inside the bucket is linear.
- Window edges: see ``processors/percentiles/store.py``. Base-slice windows (1m by default) are
  exact when emitted on schedule; a coarser window spans W ± half its slice (5m ± 15 s, 1h ± 2.5 min
  by default). Data is placed by its arrival time.

Memory follows the data and is bounded: a series holds *pages* of 32 buckets for the span of its
values, each page in every row of every tier (31 rows by default: 32 × 31 × 4 B = 3,968 B a page;
``max_slices_per_window: 6`` makes it 21 rows, at the cost of ± 25 s / ± 5 min edges for 5m / 1h). All
series share a pool of at most ``max_memory`` (256 MiB); when it is full, the series holding the most
pages goes one scale coarser (halving its pages), counted as
``headwater_percentiles_downscales_total{reason="memory"}``; ``headwater_percentiles_memory_bytes``
shows what is held. So a few wide series keep scale 6 however wide, and many wide ones share the pool
at a coarser, reported bound (10,000 series of ~1,000× data fit at scale 4 in 256 MiB; measured by
``bench/accuracy.py``). Idle series expire and give their pages back; beyond ``max_series`` new series
are not tracked (their points still pass) and are counted
(``headwater_percentiles_overflow_points_total``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent import distributions, exphist
from agent.component import (
    Backpressure,
    ComponentKind,
    Consumer,
    Factory,
    Settings,
    Signal,
    Tasks,
    run_periodically,
)
from agent.confmodel import Duration, Size, format_duration
from agent.counting import PointCounts
from agent.exphist import ExpHistogram
from agent.globs import NameFilter
from agent.model import (
    ExplicitHistogram,
    Kind,
    Labels,
    MetricBatch,
    Point,
    Resource,
    SeriesKey,
    Temporality,
    key_of,
    new_point,
)
from processors.percentiles.store import (
    MAX_STORE_SCALE,
    Store,
    histogram_of,
    page_bytes,
    plan_tiers,
    quantiles,
)

TYPE = "percentiles"
QUANTILE_SUFFIX = ".quantile"
"""Appended to a distribution's name for its quantile gauges (labels naming)."""
ROLLING_SUFFIX = ".rolling"
"""Appended to a distribution's name for its merged window histograms (labels naming)."""

_POINTS_PER_BATCH = 1000
"""Gauges per batch handed on during an emit: series are read in ranges that make about this many."""
_ONE_PERCENT_SCALE = 6
"""The coarsest scale whose relative error bound (0.54 %) stays within 1 %."""


@dataclass(frozen=True)
class PercentilesConfig:
    include: list[str] = field(default_factory=lambda: ["*"])
    """Metric name globs (``*`` crosses dots) of the distributions to track; default all."""
    exclude: list[str] = field(default_factory=list)
    """Metric name globs not to track, applied after include (and to gauges)."""
    gauges: list[str] = field(default_factory=list)
    """Gauge name globs whose every point is one observation (StatsD: only each flush's last value)."""
    windows: list[Duration] = field(
        default_factory=lambda: [Duration(60.0), Duration(300.0), Duration(3600.0)]
    )
    """Rolling windows; each must be a multiple of slice_interval."""
    quantiles: list[float] = field(default_factory=lambda: [0.5, 0.9, 0.95, 0.99])
    """Quantiles to emit, within [0, 1] (0 gives the window's exact min, 1 its exact max)."""
    emit_interval: Duration = Duration(10.0)
    """How often the window quantiles are sent; a multiple of slice_interval (StatsD flushes every 10s)."""
    slice_interval: Duration = Duration(10.0)
    """The finest time slice; windows made of it are exact at each emit, coarser ones are ± half a slice."""
    max_slices_per_window: int = 12
    """A window uses the shortest slice cutting it into at most this many: more is sharper and costlier."""
    naming: Literal["labels", "suffix"] = "labels"
    """labels: ``<name>.quantile{quantile="0.99",window="5m"}``; suffix: ``<name>_p99_5m``."""
    emit_histogram: bool = False
    """Also send each window's merged histogram: ``<name>.rolling{window="5m"}`` (suffix: ``<name>_5m``)."""
    drop_original: bool = False
    """Drop the tracked distribution points instead of passing them on (untracked ones always pass)."""
    max_buckets: int = 2048
    """Buckets per side per series at most: 2048 hold scale 6 (≤ 0.54 % error) over 32 octaves (max/min)."""
    max_memory: Size = Size(256 * 2**20)
    """Memory for the bucket counts of all series; when full, the widest series goes one scale coarser."""
    max_series: int = 10_000
    """Series tracked at most; points of further series pass untracked and are counted as overflow."""
    series_idle_timeout: Duration | None = None
    """Forget a series this long after its last point; unset: twice the longest window."""

    def idle_timeout_s(self) -> float:
        if self.series_idle_timeout is not None:
            return float(self.series_idle_timeout)
        return 2.0 * max(self.windows, default=0.0)

    def tier_rows(self) -> tuple[list[float], list[int], list[tuple[float, int, int]]]:
        """(slice length of each tier, rows of each tier, (window, tier, slices) of each window)."""
        base = float(self.slice_interval)
        windows = [float(w) for w in self.windows]
        tier_slices, window_tier = plan_tiers(base, windows, self.max_slices_per_window)
        plan = [(w, t, round(w / tier_slices[t])) for w, t in zip(windows, window_tier, strict=True)]
        rows = [1 + max((n for _, t, n in plan if t == k), default=0) for k in range(len(tier_slices))]
        return tier_slices, rows, plan

    def page_bytes(self) -> int:
        """Bytes of one page of buckets (see processors/percentiles/store.py) with these windows."""
        return page_bytes(self.tier_rows()[1])

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for name, globs in (("include", self.include), ("exclude", self.exclude), ("gauges", self.gauges)):
            for i, g in enumerate(globs):
                if not isinstance(g, str) or not g:
                    problems.append((f"{name}::{i}", "give a non-empty metric name glob"))
        base = float(self.slice_interval)
        if base < 1.0:
            problems.append(("slice_interval", "must be at least 1s"))
            base = 1.0
        if not self.windows:
            problems.append(("windows", "give at least one window, like 5m"))
        for i, w in enumerate(self.windows):
            if not w > 0 or not _is_multiple(w, base):
                problems.append(
                    (f"windows::{i}", f"must be a positive multiple of slice_interval ({base:g}s)")
                )
        if len(set(self.windows)) != len(self.windows):
            problems.append(("windows", "windows must be distinct"))
        if not self.quantiles:
            problems.append(("quantiles", "give at least one quantile, like 0.99"))
        for i, q in enumerate(self.quantiles):
            if not 0.0 <= q <= 1.0:
                problems.append((f"quantiles::{i}", f"{q} is not within [0, 1]"))
        if len(set(self.quantiles)) != len(self.quantiles):
            problems.append(("quantiles", "quantiles must be distinct"))
        if not self.emit_interval > 0 or not _is_multiple(self.emit_interval, base):
            problems.append(("emit_interval", f"must be a positive multiple of slice_interval ({base:g}s)"))
        if self.max_slices_per_window < 1:
            problems.append(("max_slices_per_window", "must be at least 1"))
        if not 3 <= self.max_buckets <= 16384:
            problems.append(("max_buckets", "must be between 3 and 16384"))
        if self.max_series < 1:
            problems.append(("max_series", "must be at least 1"))
        elif not problems:
            page = self.page_bytes()
            needed = 2 * self.max_series * page
            if self.max_memory < needed:
                problems.append(
                    (
                        "max_memory",
                        f"holds {int(self.max_memory) // page} pages of {page} B; max_series "
                        f"{self.max_series} needs 2 per series: raise it to {-(-needed // 2**20)}MiB "
                        "or lower max_series",
                    )
                )
        if self.series_idle_timeout is not None and self.series_idle_timeout < max(self.windows, default=0):
            problems.append(("series_idle_timeout", "must be at least the longest window"))
        return problems


def _is_multiple(value: float, base: float) -> bool:
    ratio = value / base
    return round(ratio) >= 1 and math.isclose(ratio, round(ratio), rel_tol=0, abs_tol=1e-9)


def quantile_label(q: float) -> str:
    """``0.99`` → ``0.99`` (the quantile label's value, as Prometheus summaries write it)."""
    return f"{q:g}"


def quantile_suffix(q: float) -> str:
    """``0.99`` → ``p99``, ``0.999`` → ``p99_9``, ``0.5`` → ``p50``."""
    return "p" + f"{q * 100:.6g}".replace(".", "_")


def _with_labels(labels: Labels, extra: Labels) -> Labels:
    """`labels` plus `extra` (which win over labels of the same name), sorted by name."""
    names = {k for k, _ in extra}
    return tuple(sorted([p for p in labels if p[0] not in names] + list(extra)))


def _gauge(
    name: str, labels: Labels, time_ns: int, value: float, unit: str, resource: Resource | None
) -> Point:
    """``Point(name, Kind.GAUGE, labels, time_ns, value=value, unit=unit, resource=resource)``, built fast
    (an emit makes windows × quantiles gauges per series: 120k every 10 s for 10k series)."""
    return new_point(
        name,
        Kind.GAUGE,
        labels,
        time_ns,
        value,
        0,
        Temporality.DELTA,
        True,
        None,
        unit,
        "",
        resource,
        None,
        None,
        None,
    )


class _Series:
    __slots__ = ("cumulative", "dead", "labels", "last_seen", "name", "out", "resource", "slot", "unit")

    def __init__(self, name: str, labels: Labels, resource: Resource | None, unit: str, slot: int) -> None:
        self.name = name
        self.labels = labels
        self.resource = resource
        self.unit = unit
        self.slot = slot
        self.last_seen = 0.0
        self.dead = False
        """Expired: the front cache of series by key checks this."""
        self.cumulative: ExpHistogram | ExplicitHistogram | None = None
        """The previous CUMULATIVE point's histogram, the base for the next difference."""
        self.out: list[tuple[str, Labels]] | None = None
        """(name, labels) of each output point, per window then per quantile (then histogram), built at
        the first emit: sorting labels for every gauge of every emit cost ~5 µs a point."""


_Identity = tuple[str, Labels, Labels | None]
"""A series here: name, labels and resource attributes (points of one series from several scopes merge)."""


class PercentilesProcessor:
    """See the module docstring. `clock` (unix seconds) is injectable for tests; `run_timer=False`
    leaves emitting to explicit :meth:`tick` calls."""

    def __init__(
        self,
        settings: Settings,
        config: PercentilesConfig,
        next_consumer: Consumer,
        *,
        clock: Callable[[], float] = time.time,
        run_timer: bool = True,
    ) -> None:
        self._settings = settings
        self._config = config
        self._next = next_consumer
        self._clock = clock
        self._run_timer = run_timer
        self._logger: logging.Logger = settings.logger
        self._tasks = Tasks(str(settings.id), self._logger)
        self._matches = NameFilter(config.include, config.exclude)
        self._gauge_matches = NameFilter(config.gauges, config.exclude)
        """Whether a gauge is observed (a ``gauges`` glob, no ``exclude`` glob)."""
        self._quantiles = [float(q) for q in config.quantiles]
        self._windows = [float(w) for w in config.windows]
        base = float(config.slice_interval)
        tier_slices, rows, plan = config.tier_rows()
        self._window_plan = [(w, tier, n, format_duration(w)) for w, tier, n in plan]
        self._store = Store(base, tier_slices, rows, config.max_buckets, clock(), int(config.max_memory))
        self._series: dict[_Identity, _Series] = {}
        self._front: dict[SeriesKey, _Series] = {}
        """Series by the points' series keys: one pointer-keyed lookup a point after the first."""
        self._slots: list[_Series | None] = []
        self._free: list[int] = []
        self._emit_s = float(config.emit_interval)
        self._next_emit = (math.floor(clock() / self._emit_s) + 1) * self._emit_s
        self._idle_s = config.idle_timeout_s()
        self._started = False
        self._stopped = False

        tel = settings.telemetry
        self._counts = PointCounts(tel)
        self._overflow = tel.counter(
            "percentiles_overflow_points_total", "Points of series beyond max_series, passed on untracked."
        )
        downscaled = (
            "Times a series' scale was lowered: its data spanned more than max_buckets (span)"
            " or max_memory was full (memory)."
        )
        self._downscales = tel.counter("percentiles_downscales_total", downscaled, reason="span")
        self._squeezes = tel.counter("percentiles_downscales_total", downscaled, reason="memory")
        self._coarse = tel.counter(
            "percentiles_coarse_windows_total", "Window quantile sets emitted with an error bound above 1%."
        )
        self._expired = tel.counter("percentiles_expired_series_total", "Series forgotten after being idle.")
        self._worst_error = 0.0
        tel.gauge("percentiles_series", "Series tracked now.", lambda: float(len(self._series)))
        tel.gauge(
            "percentiles_memory_bytes",
            "Bytes of bucket counts the tracked series hold now (at most max_memory).",
            lambda: float(self._store.memory_bytes()),
        )
        tel.gauge(
            "percentiles_worst_error_ratio",
            "Largest relative error bound among the windows of the last emit (exponential input).",
            lambda: self._worst_error,
        )

    def _ignored(self, reason: str) -> Any:
        return self._settings.telemetry.counter(
            "percentiles_ignored_points_total",
            "Matching points passed on without entering a window, by reason.",
            reason=reason,
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        if self._run_timer:
            self._tasks.spawn(
                run_periodically(self._wait_s, self.tick, self._logger, "percentiles: emit"), "emit"
            )

    async def shutdown(self) -> None:
        """Stop the timer, then send the windows as they are now (once); idempotent, safe before start."""
        if self._stopped:
            return
        self._stopped = True
        await self._tasks.close()
        if self._series:
            now = self._clock()
            self._store.rotate(now)
            try:
                await self._emit(now)
            except Backpressure as exc:
                self._logger.warning("percentiles: final emit refused downstream: %s", exc.reason)

    def _wait_s(self) -> float:
        # Wake at the emit boundary on the processor's clock (time.time by default).
        # At most one interval: a wall clock stepped back must not put the timer to sleep for hours.
        return min(max(self._next_emit - self._clock(), 0.0), self._emit_s) + 0.001

    async def tick(self) -> None:
        """Advance the slices to the clock; emit if an emit boundary passed since the last emit."""
        now = self._clock()
        self._store.rotate(now)
        if self._next_emit - now > self._emit_s:  # the wall clock stepped back: emit on the new time
            self._next_emit = (math.floor(now / self._emit_s) + 1) * self._emit_s
        if now < self._next_emit:
            return
        self._next_emit = (math.floor(now / self._emit_s) + 1) * self._emit_s
        self._expire(now)
        await self._emit(now)

    # -- input ---------------------------------------------------------------------------------------

    def _series_for(self, p: Point) -> _Series | None:
        front = key_of(p)
        s = self._front.get(front)
        if s is not None and not s.dead:
            return s
        key = (p.name, p.labels, p.resource.attributes if p.resource is not None else None)
        s = self._series.get(key)
        if s is not None:
            self._remember(front, s)
            return s
        if len(self._series) >= self._config.max_series:
            return None
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._slots)
            if slot >= self._store.capacity:
                cap = self._store.capacity
                grown = cap * 2 if cap < 1024 else cap + cap // 4
                self._store.grow(min(self._config.max_series, max(64, grown)))
            self._slots.append(None)
        s = _Series(p.name, p.labels, p.resource, p.unit, slot)
        self._slots[slot] = s
        self._series[key] = s
        self._remember(front, s)
        return s

    def _remember(self, key: SeriesKey, s: _Series) -> None:
        if len(self._front) >= 2 * self._config.max_series:  # keys of several scopes or kinds per series
            self._front.clear()
        self._front[key] = s

    async def consume(self, batch: MetricBatch) -> None:
        n = len(batch.points)
        self._counts.incoming(n)
        now = self._clock()
        self._store.rotate(now)
        tracked: list[tuple[_Series, Point]] = []
        # Gauge values by series slot: one histogram per series and batch, not one per value.
        observed: dict[int, tuple[_Series, list[float]]] = {}
        overflow = 0
        observe_gauges = self._gauge_matches.takes_any
        for p in batch.points:
            if p.kind is not Kind.HISTOGRAM or not self._matches(p.name):
                if p.kind is Kind.GAUGE:
                    if observe_gauges and self._gauge_matches(p.name):
                        s = self._series_for(p)
                        if s is None:
                            overflow += 1
                            continue
                        s.last_seen = now
                        entry = observed.get(s.slot)
                        if entry is None:
                            observed[s.slot] = (s, [p.value])
                        else:
                            entry[1].append(p.value)
                elif p.kind is Kind.SUMMARY and self._matches(p.name):
                    self._ignored("summary").value += 1
                continue
            s = self._series_for(p)
            if s is None:
                overflow += 1
                continue
            s.last_seen = now
            tracked.append((s, p))
        if overflow:
            self._overflow.value += overflow
        out = batch
        if self._config.drop_original and tracked:
            dropped = {id(p) for _, p in tracked}
            out = MetricBatch(tuple(p for p in batch.points if id(p) not in dropped), batch.context)
        if out.points:
            await self._next.consume(out)  # Backpressure propagates; the data then was not ingested
            self._counts.outgoing(len(out.points))
        before, squeezed = self._store.downscales, self._store.squeezes
        for s, p in tracked:
            self._ingest(s, p)
        if observed:
            self._observe(observed.values())
        self._downscales.value += self._store.downscales - before
        self._squeezes.value += self._store.squeezes - squeezed

    def _observe(self, observed: Iterable[tuple[_Series, list[float]]]) -> None:
        """Put each series' gauge values into its window as one histogram; non-finite ones are counted."""
        max_buckets = self._config.max_buckets
        non_finite = 0
        for s, values in observed:
            h = exphist.from_values(
                np.asarray(values, dtype=np.float64), max_buckets=max_buckets, max_scale=MAX_STORE_SCALE
            )
            non_finite += len(values) - round(h.count)  # from_values drops NaN and infinities
            if h.count > 0:
                self._store.add(s.slot, h)
        if non_finite:
            self._ignored("non_finite").value += non_finite

    def _ingest(self, s: _Series, p: Point) -> None:
        """Put point `p`'s histogram (as a delta) into series `s`; odd input is counted, not raised."""
        try:
            h = self._delta(s, p)
        except (ValueError, OverflowError):
            h = None
            self._ignored("invalid_histogram").value += 1
        if h is None or not h.count > 0:
            return
        if not (math.isfinite(h.min) and math.isfinite(h.max)):
            self._ignored("non_finite").value += 1
            return
        self._store.add(s.slot, h)

    def _delta(self, s: _Series, p: Point) -> ExpHistogram | None:
        """Point `p`'s observations as a delta histogram (agent.distributions.to_delta); odd input is
        counted, not raised."""
        max_buckets = self._config.max_buckets
        h, s.cumulative, problem = distributions.to_delta(p, s.cumulative, max_buckets=max_buckets)
        if problem:
            self._ignored(problem).value += 1
        return h

    # -- output --------------------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        idle = [s for s in self._series.values() if now - s.last_seen > self._idle_s]
        for s in idle:
            key = (s.name, s.labels, s.resource.attributes if s.resource is not None else None)
            del self._series[key]
            s.dead = True
            self._store.reset(s.slot)
            self._slots[s.slot] = None
            self._free.append(s.slot)
        self._expired.value += len(idle)

    async def _emit(self, now: float) -> None:
        """Send every series' window quantiles (and histograms), in batches of about _POINTS_PER_BATCH."""
        per_series = len(self._window_plan) * (len(self._quantiles) + self._config.emit_histogram)
        step = max(1, _POINTS_PER_BATCH // max(per_series, 1))
        time_ns = int(now * 1e9)
        worst = 0.0
        start = 0
        refused: Backpressure | None = None
        while start < len(self._slots):
            stop = min(start + step, len(self._slots))
            points, chunk_worst = self._read(start, stop, now, time_ns)
            worst = max(worst, chunk_worst)
            start = stop
            if points:
                try:
                    await self._next.consume(MetricBatch(tuple(points)))
                except Backpressure as exc:
                    # Counted, and the other ranges are still offered: stopping here would lose
                    # them without a trace. The first refusal is raised once the emit is done.
                    self._counts.dropped("backpressure", len(points))
                    refused = refused or exc
                else:
                    self._counts.outgoing(len(points))
            await asyncio.sleep(0)  # let receivers run between ranges of series
        self._worst_error = worst
        if refused is not None:
            raise refused

    def _names(self, s: _Series) -> list[tuple[str, Labels]]:
        """(name, labels) of series `s`'s outputs: per window, each quantile then the histogram."""
        out = []
        suffix = self._config.naming == "suffix"
        for _, _, _, window_text in self._window_plan:
            for q in self._quantiles:
                if suffix:
                    out.append((f"{s.name}_{quantile_suffix(q)}_{window_text}", s.labels))
                else:
                    # Not the distribution's own name: a Prometheus histogram and these gauges must
                    # never share a family name (the exporters would refuse one as a type conflict).
                    extra = (("quantile", quantile_label(q)), ("window", window_text))
                    out.append((s.name + QUANTILE_SUFFIX, _with_labels(s.labels, extra)))
            if self._config.emit_histogram:
                if suffix:
                    out.append((f"{s.name}_{window_text}", s.labels))
                else:
                    out.append((s.name + ROLLING_SUFFIX, _with_labels(s.labels, (("window", window_text),))))
        return out

    def _read(self, start: int, stop: int, now: float, time_ns: int) -> tuple[list[Point], float]:
        """The points of series slots ``[start, stop)`` for every window; and the worst error bound."""
        points: list[Point] = []
        append = points.append
        worst_scale = exphist.MAX_SCALE
        coarse = 0
        with_histogram = self._config.emit_histogram
        per_window = len(self._quantiles) + with_histogram
        for wi, (_, tier, slices, _) in enumerate(self._window_plan):
            w = self._store.window(tier, slices, now, start, stop)
            values = quantiles(w, self._quantiles).T.tolist()
            has = (w.count > 0).tolist()
            scales = w.scale.tolist()
            start_ns = time_ns - int(w.span_s * 1e9)
            for k in range(stop - start):
                s = self._slots[start + k]
                if s is None or not has[k]:
                    continue
                names = s.out
                if names is None:
                    names = s.out = self._names(s)
                scale = scales[k]
                worst_scale = min(worst_scale, scale)
                coarse += scale < _ONE_PERCENT_SCALE
                base = wi * per_window
                unit, resource = s.unit, s.resource
                for j, value in enumerate(values[k]):
                    name, labels = names[base + j]
                    append(_gauge(name, labels, time_ns, value, unit, resource))
                if with_histogram:
                    name, labels = names[base + per_window - 1]
                    # A sliding window is not a delta of anything: sent as CUMULATIVE from the window's
                    # start, so every emit is a fresh start (do not rate() it).
                    append(
                        Point(
                            name,
                            Kind.HISTOGRAM,
                            labels,
                            time_ns,
                            start_time_unix_nano=start_ns,
                            temporality=Temporality.CUMULATIVE,
                            histogram=histogram_of(w, k),
                            unit=unit,
                            resource=resource,
                        )
                    )
        self._coarse.value += coarse
        worst = exphist.relative_error(worst_scale) if points else 0.0
        return points, worst


def create(settings: Settings, config: PercentilesConfig, next_consumer: Consumer) -> PercentilesProcessor:
    return PercentilesProcessor(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=PercentilesConfig,
    create=create,
    signals=frozenset({Signal.METRICS}),
    description="Rolling-window quantiles (1m/5m/1h by default) of distributions from exponential histograms",
)
