"""Drift processor: each series' current window of observations against a reference distribution.

    processors:
      drift:
        include: ["model.score", "http.*.duration"]   # distributions (histograms, StatsD timers)
        gauges: ["feature.*"]      # optional: every value of these gauges is one observation
        window: 5m                 # tumbling windows aligned to the clock
        reference: baseline        # or: trailing (the window `offset` earlier)
        baseline: 1h               # baseline: each series' first hour of data is its reference
        baseline_file: /var/lib/headwater/drift-baseline.json   # optional: load it, save learnt ones
        offset: 24h                # trailing: the same window a day earlier
        bins: 10

At the end of every window (at multiples of ``window`` on the clock) the processor sends, per series
with at least ``min_count`` observations in both the window and its reference, six gauges
``<name>.drift{test=..., window="5m"}`` (the series' own labels kept), with ``test`` one of:
``psi`` (population stability index), ``ks`` (two-sample Kolmogorov–Smirnov D), ``ks_pvalue``,
``js`` (Jensen–Shannon distance, base 2, in [0, 1]), ``chi2`` (Chi-squared test of homogeneity over
the bins) and ``chi2_pvalue``; they carry no unit, so Prometheus shows them as ``<name>_drift``.
The original points pass on unchanged.

Observations: HISTOGRAM points whose name matches ``include`` (StatsD timers, histograms and
distributions and OTLP exponential histograms as they are, CUMULATIVE ones as the difference from the
series' previous point; OTLP explicit-bucket histograms spread evenly inside each bucket), and GAUGE
points matching ``gauges``, each value one observation (as in ``percentiles``).

Windows hold what arrives in them: a point is placed by its arrival time (the processor's clock), not
its timestamp. Points reach ``drift`` within a flush of being made (processors run before any
exporter queue), so at most a flush's worth lands in the next window at a window's edge, and a
window's distribution is unchanged by that; a client that resends late data after an outage has it
counted in the window it arrives in. (Placing by timestamp would need windows held open for late
points, as ``aggregate``'s ``max_delay`` does, and drift statistics do not depend on a point's exact
minute.)

Reference:

- ``baseline``: the series' first ``baseline`` of data is learnt, then frozen (counted from the start
  of the window of its first point, rounded up to whole windows); windows are compared from then on.
  With ``baseline_file``, baselines in the file are used as they are (their series learn nothing),
  and every newly learnt baseline is written to the file (at the end of the window in which it was
  completed, and at shutdown), so a restart keeps them. Delete a series'
  entry (or the file) to relearn. The file is JSON::

      {"format": "headwater.drift.baseline/1",
       "series": [{"name": "model.score", "labels": {"model": "a"}, "resource": {"host.name": "x"},
                   "histogram": {"scale": 6, "zero_count": 0, "count": 100, "sum": 12.5,
                                 "min": 0.01, "max": 0.9,
                                 "positive": {"offset": -420, "counts": [1, 0, 3]},
                                 "negative": {"offset": 0, "counts": []}}}]}

  (the histogram is the OpenTelemetry exponential histogram: positive bucket ``i`` holds
  ``(base**i, base**(i+1)]``, ``base = 2 ** 2 ** -scale``; ``resource`` may be omitted).
- ``trailing``: the reference of the window ending at ``t`` is the window ending at ``t - offset`` (a
  multiple of ``window``); each series keeps at most ``offset / window`` past windows (``offset`` is
  limited to ``max_trailing_windows`` windows), each one histogram of at most ``max_buckets`` buckets.

Error, stated honestly (see processors/drift/stats.py): both histograms are brought to the coarser of
their two scales and compared over aligned buckets. KS D is read at bucket edges, so the exact D of
the raw samples lies within ``[D, D + the largest single bucket's share]`` (a bucket is ≤ 4.4 % wide
at scale 4; the accuracy tests show the gap below 0.01 at 2048 buckets and below 0.1 at 160 for a
narrow mixture); its p-value is the asymptotic Kolmogorov distribution at ``sqrt(n·m/(n+m))·D``. PSI, JS
and Chi² are computed over ``bins`` bins cut at the reference's quantiles (deciles by default), on
bucket edges: they equal the exact statistics of the raw samples binned at those edges. PSI floors
each bin's share at 1e-4 (an empty bin). Counts are weighted (StatsD sample rates), so ``n`` and ``m``
are the weighted counts.

Memory is bounded: each series has one row for the window being filled, plus one for its reference
(baseline, or the one being learnt) or up to ``offset / window`` rows of past windows (trailing), in
a dense store (processors/drift/store.py): a row is ``max_buckets`` float64 per sign (2.5 KB at the
default 320; the negative side is only touched for series with negative values), and it follows
exphist's merge rule, so a row is exactly the merge of what it holds (the KS bound below is
unchanged). Up to 2048 incoming histograms and 16384 gauge values are held before being added to
their rows, all at once (and at every window end). Beyond ``max_series`` new series are not tracked
(their points still pass) and are counted (``headwater_drift_overflow_points_total``). A series
without a point for ``series_idle_timeout`` (default: twice the reference span: ``2 × offset`` for
trailing, ``2 × baseline`` but at least a day for baseline) is forgotten at a window end, its rows
freed for reuse and counted (``headwater_drift_expired_series_total``); if it returns it starts
afresh: with its baseline from ``baseline_file`` when the file has one (the file keeps it), else
learning again. Aggregate churning labels (``pod``) away before ``drift``.

Cost (``bench/drift_bench.py``, CPU time on one core, 10,000 series, a 5m window of 10 s flushes):
``consume`` ~2.7 µs a timer point (a ~210-bucket histogram: its ~43 non-empty buckets added to the
series' row by one ``np.add.at`` over many batches' points; passes over every bucket and the row's
cache misses are most of it), ~0.75 µs a gauge point. A window end reads the rows as they are (no
merging) and computes the statistics of ~166 series' pairs a call (stats.drift_of): ~28 µs a timer
series, ~29 µs a gauge series. Spread over a window's points: ~3.7 µs a timer point, ~1.7 µs a gauge
point. RSS growth: ~120 MB for 10,000 timer series against baselines (also at the peak of a 5m
window), ~235 MB with five trailing 1m windows each.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent import distributions
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
from agent.confmodel import Duration, format_duration
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
from processors.drift import stats
from processors.drift.baseline_file import FileKey, file_key, read_baseline_file, write_baseline_file
from processors.drift.store import Rows

TYPE = "drift"
DRIFT_SUFFIX = ".drift"
"""Appended to a series' name for its drift gauges: ``<name>.drift{test, window}``."""
TESTS = ("psi", "ks", "ks_pvalue", "js", "chi2", "chi2_pvalue")
"""The values of the ``test`` label, in the order each series' gauges are sent."""

_POINTS_PER_BATCH = 1000
"""Gauges per batch handed on at a window's end."""
_PENDING_HISTOGRAMS = 2048
"""Incoming histograms held before they are added to their rows, all at once (a StatsD timer flush is
~1.7 KB: ~3.5 MB held)."""
_PENDING_VALUES = 16384
"""Gauge values held before they are added to their rows."""
_GRID_CELLS = 1 << 20
"""Cells of stats.drift_many's grid per call at most (8 MB of float64; a few copies are made)."""
_GAUGE_SCALE = 8
"""Finest scale for gauge observations (as the StatsD receiver builds timers)."""


@dataclass(frozen=True)
class DriftConfig:
    include: list[str] = field(default_factory=lambda: ["*"])
    """Metric name globs (``*`` crosses dots) of the distributions to watch; default all."""
    exclude: list[str] = field(default_factory=list)
    """Metric name globs not to watch, applied after include (and to gauges)."""
    gauges: list[str] = field(default_factory=list)
    """Gauge name globs whose every point is one observation (StatsD: only each flush's last value)."""
    window: Duration = Duration(300.0)
    """Length of the current window (tumbling, aligned to the clock); statistics are sent at its end."""
    reference: Literal["baseline", "trailing"] = "baseline"
    """baseline: each series' first ``baseline`` of data (or baseline_file); trailing: ``offset`` earlier."""
    baseline: Duration = Duration(3600.0)
    """How long each series learns its baseline, in whole windows from its first one (reference: baseline)."""
    baseline_file: str | None = None
    """JSON file of baselines: those in it are used, newly learnt ones are written to it (baseline only)."""
    offset: Duration = Duration(86400.0)
    """How far back the trailing reference window is; a multiple of window (reference: trailing)."""
    max_trailing_windows: int = 288
    """Past windows a series may keep for the trailing reference: offset / window at most."""
    bins: int = 10
    """Bins for PSI, JS and Chi², cut at the reference's quantiles (10: its deciles)."""
    min_count: int = 20
    """Observations needed in both the window and the reference for a series' statistics to be sent."""
    max_buckets: int = 320
    """Buckets per sign per histogram at most (KS is within one bucket's share of the exact D)."""
    max_series: int = 10_000
    """Series tracked at most; points of further series pass untracked and are counted as overflow."""
    series_idle_timeout: Duration | None = None
    """Forget a series this long after its last point; unset: 2 × offset, or 2 × baseline (at least 1d)."""

    def idle_timeout_s(self) -> float:
        """Seconds after its last point that a series is forgotten (see series_idle_timeout)."""
        if self.series_idle_timeout is not None:
            return float(self.series_idle_timeout)
        if self.reference == "trailing":
            return 2.0 * float(self.offset)
        return max(2.0 * float(self.baseline), 86400.0)

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for name, globs in (("include", self.include), ("exclude", self.exclude), ("gauges", self.gauges)):
            for i, g in enumerate(globs):
                if not isinstance(g, str) or not g:
                    problems.append((f"{name}::{i}", "give a non-empty metric name glob"))
        if self.window < 1.0:
            problems.append(("window", "must be at least 1s"))
        if self.reference == "baseline":
            if self.baseline < 1.0:
                problems.append(("baseline", "must be at least 1s"))
            if self.baseline_file is not None and not self.baseline_file:
                problems.append(("baseline_file", "give a file path, or leave it unset"))
        elif self.reference == "trailing":
            if self.baseline_file is not None:
                problems.append(("baseline_file", "applies to reference: baseline only"))
            if self.window >= 1.0:
                ratio = self.offset / self.window
                if not (round(ratio) >= 1 and math.isclose(ratio, round(ratio), abs_tol=1e-9)):
                    problems.append(("offset", f"must be a positive multiple of window ({self.window:g}s)"))
                elif round(ratio) > self.max_trailing_windows:
                    problems.append(
                        (
                            "offset",
                            f"spans {round(ratio)} windows, more than max_trailing_windows "
                            f"({self.max_trailing_windows}): lengthen window or raise max_trailing_windows",
                        )
                    )
        else:
            problems.append(("reference", "must be baseline or trailing"))
        if self.max_trailing_windows < 1:
            problems.append(("max_trailing_windows", "must be at least 1"))
        if not 2 <= self.bins <= 1000:
            problems.append(("bins", "must be between 2 and 1000"))
        if self.min_count < 1:
            problems.append(("min_count", "must be at least 1"))
        if not 3 <= self.max_buckets <= 16384:
            problems.append(("max_buckets", "must be between 3 and 16384"))
        if self.max_series < 1:
            problems.append(("max_series", "must be at least 1"))
        if self.series_idle_timeout is not None and self.series_idle_timeout < self.window:
            problems.append(("series_idle_timeout", f"must be at least window ({float(self.window):g}s)"))
        return problems


class _Series:
    __slots__ = (
        "baseline",
        "cumulative",
        "current",
        "file_key",
        "labels",
        "last_seen",
        "learn_until",
        "learning",
        "name",
        "out",
        "past",
        "resource",
        "unit",
    )

    def __init__(self, name: str, labels: Labels, resource: Resource | None, unit: str, current: int) -> None:
        self.name = name
        self.labels = labels
        self.resource = resource
        self.unit = unit
        self.file_key = file_key(name, labels, resource)
        self.baseline = -1
        """Slot of the baseline in the processor's Rows (-1: none yet)."""
        self.learn_until = -math.inf
        """Until then (clock seconds) observations go to ``learning`` (reference: baseline)."""
        self.learning = -1
        """Slot of the baseline being learnt (-1: none)."""
        self.current = current
        """Slot of the window being filled."""
        self.past: dict[int, int] = {}
        """Slots of closed windows by index (end / window), for the trailing reference."""
        self.cumulative: ExpHistogram | ExplicitHistogram | None = None
        """The previous CUMULATIVE point's histogram, the base for the next difference."""
        self.out: list[tuple[str, Labels]] | None = None
        """(name, labels) of each test's gauge, built once."""
        self.last_seen = 0.0
        """Clock seconds of the series' last point (for series_idle_timeout)."""


def _gauge(
    name: str, labels: Labels, time_ns: int, value: float, unit: str, resource: Resource | None
) -> Point:
    return new_point(
        name, Kind.GAUGE, labels, time_ns, value, 0, Temporality.DELTA, True, None, unit, "", resource, None,
        None, None,
    )  # fmt: skip


class DriftProcessor:
    """See the module docstring. `clock` (unix seconds) is injectable for tests; `run_timer=False`
    leaves window ends to explicit :meth:`tick` calls."""

    def __init__(
        self,
        settings: Settings,
        config: DriftConfig,
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
        self._window_s = float(config.window)
        self._window_text = format_duration(self._window_s)
        self._trailing = config.reference == "trailing"
        self._lag = round(float(config.offset) / self._window_s) if self._trailing else 0
        self._baseline_s = float(config.baseline)
        self._idle_s = config.idle_timeout_s()
        self._max_buckets = config.max_buckets
        self._series: dict[SeriesKey, _Series] = {}
        self._rows = Rows(config.max_buckets)
        self._pending_slots: list[int] = []
        self._pending_hists: list[ExpHistogram] = []
        """Histograms not yet added to their slots (in ``_pending_slots``), in arrival order."""
        self._pending_value_slots: list[int] = []
        self._pending_values: list[float] = []
        """Gauge values not yet added to their slots, in arrival order."""
        self._file_baselines: dict[FileKey, ExpHistogram] = {}
        self._file_dirty = False
        self._next_end = (math.floor(clock() / self._window_s) + 1) * self._window_s
        self._started = False
        self._stopped = False

        tel = settings.telemetry
        self._counts = PointCounts(tel)
        self._overflow = tel.counter(
            "drift_overflow_points_total", "Points of series beyond max_series, passed on untracked."
        )
        self._file_errors = tel.counter(
            "drift_baseline_file_errors_total", "Times the baseline file could not be written (logged)."
        )
        self._expired = tel.counter(
            "drift_expired_series_total",
            "Series forgotten after series_idle_timeout without a point (their state freed).",
        )
        tel.gauge("drift_series", "Series tracked now.", lambda: float(len(self._series)))

    def _ignored(self, reason: str) -> Any:
        return self._settings.telemetry.counter(
            "drift_ignored_points_total",
            "Matching points passed on without being observed, by reason.",
            reason=reason,
        )

    def _skipped(self, reason: str) -> Any:
        return self._settings.telemetry.counter(
            "drift_skipped_windows_total",
            "Series windows without statistics: no_reference (yet), few_observations (below min_count).",
            reason=reason,
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the baseline file (ValueError naming what is wrong in it), then start the timer."""
        if self._started or self._stopped:
            return
        path = self._config.baseline_file
        if path is not None and not self._trailing:
            self._file_baselines = await asyncio.to_thread(read_baseline_file, path)
            self._logger.info("drift: %d baselines loaded from %s", len(self._file_baselines), path)
        self._started = True
        if self._run_timer:
            self._tasks.spawn(
                run_periodically(self._wait_s, self.tick, self._logger, "drift: window end"), "windows"
            )

    async def shutdown(self) -> None:
        """Stop the timer, send the statistics of the window so far (once) and save new baselines;
        idempotent, safe before start."""
        if self._stopped:
            return
        self._stopped = True
        await self._tasks.close()
        now = self._clock()
        try:
            await self._close_window(now, now)
        except Backpressure as exc:
            self._logger.warning("drift: final statistics refused downstream: %s", exc.reason)
        await self._save()

    def _wait_s(self) -> float:
        # At most one window: a wall clock stepped back must not put the timer to sleep for hours.
        return min(max(self._next_end - self._clock(), 0.0), self._window_s) + 0.001

    async def tick(self) -> None:
        """If a window end passed since the last one: send each series' statistics, save baselines."""
        now = self._clock()
        if self._next_end - now > self._window_s:  # the wall clock stepped back
            self._next_end = (math.floor(now / self._window_s) + 1) * self._window_s
        if now < self._next_end:
            return
        end = math.floor(now / self._window_s) * self._window_s
        self._next_end = end + self._window_s
        try:
            await self._close_window(now, end)
        finally:
            await self._save()

    # -- input ---------------------------------------------------------------------------------------

    def _new_series(self, key: SeriesKey, p: Point, now: float) -> _Series | None:
        if len(self._series) >= self._config.max_series:
            return None
        rows = self._rows
        s = _Series(p.name, p.labels, p.resource, p.unit, rows.allocate())
        if not self._trailing:
            loaded = self._file_baselines.get(s.file_key)
            if loaded is not None:
                s.baseline = rows.allocate()
                rows.add_histograms([s.baseline], [loaded])
            else:
                # Whole windows: from the start of the first point's window, rounded up to a window end.
                w = self._window_s
                s.learn_until = math.floor(now / w) * w + math.ceil(self._baseline_s / w - 1e-9) * w
                s.learning = rows.allocate()
        self._series[key] = s
        return s

    async def consume(self, batch: MetricBatch) -> None:
        n = len(batch.points)
        self._counts.incoming(n)
        now = self._clock()
        series = self._series
        # Each observation's slot is chosen here, in the one pass over the batch; a DELTA histogram is
        # taken as it is, a CUMULATIVE or explicit one is turned into a delta once passed on.
        slots: list[int] = []
        hists: list[ExpHistogram] = []
        later: list[tuple[_Series, Point]] = []
        value_slots: list[int] = []
        values: list[float] = []
        overflow = 0
        observe_gauges = self._gauge_matches.takes_any
        histogram, gauge, delta = Kind.HISTOGRAM, Kind.GAUGE, Temporality.DELTA
        for p in batch.points:
            kind = p.kind
            if kind is histogram:
                if not self._matches(p.name):
                    continue
            elif kind is gauge and observe_gauges:
                if not self._gauge_matches(p.name):
                    continue
            else:
                continue
            key = key_of(p)
            s = series.get(key)
            if s is None:
                s = self._new_series(key, p, now)
                if s is None:
                    overflow += 1
                    continue
            s.last_seen = now
            if kind is histogram:
                h = p.histogram
                if h is not None and p.temporality is delta:
                    slots.append(s.learning if now < s.learn_until else s.current)
                    hists.append(h)
                else:
                    later.append((s, p))
            else:
                value_slots.append(s.learning if now < s.learn_until else s.current)
                values.append(p.value)
        if overflow:
            self._overflow.value += overflow
        # Refuse before taking: a Backpressure here propagates and nothing was observed.
        await self._next.consume(batch)
        self._counts.outgoing(n)
        for s, p in later:
            h = self._delta(s, p)
            if h is not None:
                slots.append(s.learning if now < s.learn_until else s.current)
                hists.append(h)
        # Held, then added to the rows many batches at once (a call's numpy overhead, spread).
        self._pending_slots += slots
        self._pending_hists += hists
        self._pending_value_slots += value_slots
        self._pending_values += values
        if len(self._pending_hists) >= _PENDING_HISTOGRAMS or len(self._pending_values) >= _PENDING_VALUES:
            self._observe()

    def _observe(self) -> None:
        """Add the histograms and gauge values held to their slots; empty histograms are left out, those
        with a non-finite min or max and non-finite values counted."""
        slots, hists = self._pending_slots, self._pending_hists
        self._pending_slots, self._pending_hists = [], []
        if hists:
            bad = self._rows.add_histograms(slots, hists)
            if bad:
                self._ignored("non_finite").value += bad
        at = np.array(self._pending_value_slots, dtype=np.int64)
        values = np.array(self._pending_values, dtype=np.float64)
        self._pending_value_slots, self._pending_values = [], []
        finite = np.isfinite(values)
        if not finite.all():
            self._ignored("non_finite").value += int(values.size - finite.sum())
            at, values = at[finite], values[finite]
        if values.size:
            self._rows.add_values(at, values, _GAUGE_SCALE)

    def _delta(self, s: _Series, p: Point) -> ExpHistogram | None:
        """Point `p`'s observations as a delta histogram (agent.distributions.to_delta); odd input is
        counted, not raised."""
        h, s.cumulative, problem = distributions.to_delta(p, s.cumulative, max_buckets=self._max_buckets)
        if problem:
            self._ignored(problem).value += 1
        return h

    # -- output --------------------------------------------------------------------------------------

    def _names(self, s: _Series) -> list[tuple[str, Labels]]:
        # Labels are sorted by name with names unique: "test" and "window" go in at their places.
        base = [pair for pair in s.labels if pair[0] != "test" and pair[0] != "window"]
        at_test = sum(1 for key, _ in base if key < "test")
        at_window = sum(1 for key, _ in base if key < "window")
        head, middle, tail = tuple(base[:at_test]), tuple(base[at_test:at_window]), tuple(base[at_window:])
        window = ("window", self._window_text)
        name = s.name + DRIFT_SUFFIX
        return [(name, (*head, ("test", test), *middle, window, *tail)) for test in TESTS]

    def _chunk_statistics(
        self, chunk: list[_Series], now: float, index: int, counts: dict[str, int]
    ) -> list[tuple[_Series, list[float]]]:
        """The series of `chunk` with statistics for window `index`, each with its values in TESTS
        order: the statistics of every (window, reference) pair of slots by stats.drift_of, read from
        the rows as they are; then each window moves on (trailing: kept as a past window, a fresh slot
        for the next; baseline: emptied) and learning completes."""
        rows = self._rows
        for s in chunk:
            if s.learning >= 0 and now >= s.learn_until:
                s.baseline, s.learning = s.learning, -1
                if self._config.baseline_file is not None and rows.count[s.baseline] > 0:
                    self._file_baselines[s.file_key] = rows.histogram(s.baseline)
                    self._file_dirty = True
        lag = self._lag
        current = [s.current for s in chunk]
        if self._trailing:
            reference = [s.past.get(index - lag, -1) for s in chunk]
        else:
            reference = [s.baseline for s in chunk]
        n = rows.count[current].tolist()
        m = np.where(np.array(reference) >= 0, rows.count[reference], 0.0).tolist()
        min_count = self._config.min_count
        tested: list[_Series] = []
        currents: list[int] = []
        references: list[int] = []
        for s, c, r, c_n, r_m in zip(chunk, current, reference, n, m, strict=True):
            if c_n == 0:
                continue
            if r_m == 0:
                counts["no_reference"] += 1
            elif c_n < min_count or r_m < min_count:
                counts["few_observations"] += 1
            else:
                tested.append(s)
                currents.append(c)
                references.append(r)
        out: list[tuple[_Series, list[float]]] = []
        # drift_of's grid is 2 rows a pair of up to ~4 × max_buckets + 1 cells: bound it (~8 MB).
        step = max(1, _GRID_CELLS // (2 * (4 * self._max_buckets + 1)))
        for start in range(0, len(tested), step):
            end = start + step
            slots = np.array([*currents[start:end], *references[start:end]], dtype=np.int64)
            d = stats.drift_of(rows.histograms(slots), bins=self._config.bins)
            table = np.column_stack((d.psi, d.ks, d.ks_pvalue, d.js, d.chi2, d.chi2_pvalue)).tolist()
            out += [(s, v) for s, v, ok in zip(tested[start:end], table, d.valid.tolist(), strict=True) if ok]
        # The window moves on.
        if self._trailing:
            old: list[int] = []
            emptied: list[int] = []
            for s, c_n in zip(chunk, n, strict=True):
                if c_n > 0:
                    s.past[index] = s.current
                    s.current = rows.allocate()
                else:
                    emptied.append(s.current)
                for k in [k for k in s.past if k <= index - lag]:
                    old.append(s.past.pop(k))
            rows.clear(emptied)
            rows.release(old)
        else:
            rows.clear(current)
        return out

    async def _close_window(self, now: float, end: float) -> None:
        """Send the statistics of every series' window ending at `end`, in batches of about
        _POINTS_PER_BATCH; a Backpressure refusal is counted and the first one raised at the end."""
        index = math.ceil(end / self._window_s - 1e-9)
        time_ns = int(end * 1e9)
        counts = {"no_reference": 0, "few_observations": 0}
        step = max(1, _POINTS_PER_BATCH // len(TESTS))
        self._observe()  # everything that arrived is in its window
        every = list(self._series.values())
        refused: Backpressure | None = None
        for start in range(0, len(every), step):
            points: list[Point] = []
            for s, values in self._chunk_statistics(every[start : start + step], now, index, counts):
                names = s.out
                if names is None:
                    names = s.out = self._names(s)
                # No unit: the statistics are dimensionless (a unit would give Prometheus a suffix).
                for (name, labels), value in zip(names, values, strict=True):
                    points.append(_gauge(name, labels, time_ns, value, "", s.resource))
            if points:
                try:
                    await self._next.consume(MetricBatch(tuple(points)))
                except Backpressure as exc:
                    # Counted, and the other series are still offered; the first refusal is raised last.
                    self._counts.dropped("backpressure", len(points))
                    refused = refused or exc
                else:
                    self._counts.outgoing(len(points))
            await asyncio.sleep(0)  # let receivers run between groups of series
        for reason, n in counts.items():
            if n:
                self._skipped(reason).value += n
        self._forget_idle(now)
        if refused is not None:
            raise refused

    def _forget_idle(self, now: float) -> None:
        """Drop the series without a point for series_idle_timeout (after their last window was sent).
        A returning series starts afresh: its baseline_file entry if it has one, else it learns again."""
        limit = now - self._idle_s
        idle = [key for key, s in self._series.items() if s.last_seen < limit]
        freed: list[int] = []
        for key in idle:
            s = self._series.pop(key)
            freed += [slot for slot in (s.current, s.learning, s.baseline, *s.past.values()) if slot >= 0]
        self._rows.release(freed)
        if idle:
            self._expired.value += len(idle)

    async def _save(self) -> None:
        path = self._config.baseline_file
        if path is None or not self._file_dirty:
            return
        self._file_dirty = False
        try:
            await asyncio.to_thread(write_baseline_file, path, dict(self._file_baselines))
        except OSError as exc:
            self._file_dirty = True  # tried again at the next window end
            self._file_errors.value += 1
            self._logger.warning("drift: cannot write baseline_file %s: %s", path, exc)


def create(settings: Settings, config: DriftConfig, next_consumer: Consumer) -> DriftProcessor:
    return DriftProcessor(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=DriftConfig,
    create=create,
    signals=frozenset({Signal.METRICS}),
    description="Distribution drift per series (PSI, KS, Jensen-Shannon, Chi²): a window against a reference",
)
