"""Cardinality processor: caps the number of active series per metric name.

::

    processors:
      cardinality:
        max_series_per_metric: 10000
        max_series: 200000           # over all metrics together
        window: 10m                  # a series not seen for this long stops counting
        action: overflow             # or drop (default)

A series is a metric name plus its labels, resource, scope and kind (its ``agent.model.SeriesKey``).
It is active while a point of it arrived within the last ``window`` of processing time (the agent's clock, not
the points' timestamps). A point of a series that is already active always passes. A point of a new
series passes while its metric has fewer than ``max_series_per_metric`` active series and all metrics
together fewer than ``max_series`` (which bounds the processor's own memory, ~200 B a series, against a
flood of metric names); beyond either:

- ``drop``: the point is dropped;
- ``overflow``: the point is folded into the metric's overflow series, whose labels are replaced by
  ``otel_metric_overflow="true"`` (the OpenTelemetry SDK's convention), so totals stay right while the
  label detail is lost. Within a batch, folded points of the same metric and kind merge into one point:
  sums add, gauges keep the latest value, exponential histograms merge, explicit-bucket histograms
  with the same bounds add their buckets. Points that cannot merge (summaries, histograms of other
  bounds) are dropped. The overflow series does not count toward the cap. Folding suits delta data
  (StatsD, OTLP delta): the overflow series of cumulative sums jumps as its member series change.

Dropped points are counted as ``processor_dropped_points_total{reason="cardinality"}``; points merged
into an overflow point (all but the one carrying the sum) as ``reason="cardinality_merged"`` — their
values live on in it. Per metric, ``processor_cardinality_limited_points_total{metric, action}``
counts points of new series beyond the cap (up to 1,000 metric names; the rest under ``metric="_other"``),
and a warning is logged the first time a metric reaches its cap (for the first 100 such metrics). Points
of new series beyond ``max_series`` are counted as ``processor_cardinality_limited_points_total{metric=
"_all"}`` and logged once. At ``max_series``, idle series of every metric are swept (at most once per
tenth of the window), so expiry frees room.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from agent import exphist
from agent.component import ComponentKind, Consumer, Factory, Settings, Signal
from agent.confmodel import Duration
from agent.counting import PointCounts
from agent.model import Batch, ExplicitHistogram, Kind, Labels, MetricBatch, Point, SeriesKey, key_of
from agent.telemetry import Cell

TYPE = "cardinality"

OVERFLOW_LABELS: Labels = (("otel_metric_overflow", "true"),)
_METRIC_LABEL_MAX = 1000
"""Distinct metric names given their own self-metric cell; more share ``_other`` (our own cardinality)."""
_LOG_MAX = 100
"""Metrics whose reaching the cap is logged; later ones are only counted."""
ALL_METRICS = "_all"
"""The ``metric`` label of points limited by ``max_series`` (all metrics together)."""


@dataclass(frozen=True)
class CardinalityConfig:
    max_series_per_metric: int = 10_000
    """Active series allowed per metric name; points of further new series are dropped or folded."""
    max_series: int = 200_000
    """Active series allowed over all metrics together (~200 B each); beyond, as beyond the per-metric cap."""
    window: Duration = Duration(600.0)
    """A series not seen for this long is forgotten and no longer counts toward the cap."""
    action: Literal["drop", "overflow"] = "drop"
    """drop: drop points of series beyond the cap; overflow: fold them into an otel_metric_overflow series."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.max_series_per_metric < 1:
            problems.append(("max_series_per_metric", "must be at least 1"))
        if self.max_series < 1:
            problems.append(("max_series", "must be at least 1"))
        if self.window <= 0:
            problems.append(("window", "must be longer than 0s"))
        return problems


class _Metric:
    """The active series of one metric name: key → last seen, oldest first (an LRU by last sight)."""

    __slots__ = ("capped", "expired_at", "series")

    def __init__(self) -> None:
        self.series: OrderedDict[SeriesKey, float] = OrderedDict()
        self.capped = False
        self.expired_at = -1.0
        """When idle series were last expired: within one batch (one clock reading) once is enough."""


def fold(points: list[Point]) -> tuple[Point | None, int]:
    """One overflow point from points of one metric name and kind: (the point or None, how many of
    ``points`` could not be folded in). Built once per group, not once per merge: a Point costs ~1 µs."""
    first = points[0]
    kind = first.kind
    if kind is Kind.SUMMARY:
        return None, len(points)  # a summary's quantiles cannot be combined
    time = max(p.time_unix_nano for p in points)
    starts = [p.start_time_unix_nano for p in points if p.start_time_unix_nano]
    start = min(starts) if starts else 0
    if kind is Kind.GAUGE:
        latest = max(points, key=lambda p: p.time_unix_nano)
        return _overflow_point(latest, latest.time_unix_nano, latest.start_time_unix_nano), 0
    if kind is Kind.SUM:
        same = [p for p in points if p.temporality is first.temporality]
        value = math.fsum(p.value for p in same)
        return _overflow_point(first, time, start, value=value), len(points) - len(same)
    if first.histogram is not None:
        hists = [p.histogram for p in points if p.histogram is not None]
        merged = hists[0]
        for h in hists[1:]:
            merged = exphist.merge(merged, h)
        return _overflow_point(first, time, start, histogram=merged), len(points) - len(hists)
    e = first.explicit
    if e is None:
        return None, len(points)
    # Same bounds and as many counts (a malformed point must be dropped, not raise out of consume).
    same_bounds = [
        x
        for x in (p.explicit for p in points)
        if x is not None and x.bounds == e.bounds and len(x.counts) == len(e.counts)
    ]
    counts = [sum(c) for c in zip(*(x.counts for x in same_bounds), strict=True)]
    mins = [x.min for x in same_bounds if x.min is not None]
    maxes = [x.max for x in same_bounds if x.max is not None]
    explicit = ExplicitHistogram(
        e.bounds,
        tuple(counts),
        math.fsum(x.sum for x in same_bounds),
        min(mins) if len(mins) == len(same_bounds) else None,
        max(maxes) if len(maxes) == len(same_bounds) else None,
    )
    return _overflow_point(first, time, start, explicit=explicit), len(points) - len(same_bounds)


def _overflow_point(
    p: Point,
    time: int,
    start: int,
    *,
    value: float | None = None,
    histogram: exphist.ExpHistogram | None = None,
    explicit: ExplicitHistogram | None = None,
) -> Point:
    return Point(
        p.name,
        p.kind,
        OVERFLOW_LABELS,
        time,
        p.value if value is None else value,
        start,
        p.temporality,
        p.monotonic,
        histogram if histogram is not None else p.histogram,
        p.unit,
        p.description,
        p.resource,
        p.scope,
        explicit if explicit is not None else p.explicit,
        p.summary,
    )


class CardinalityLimiter:
    def __init__(
        self,
        settings: Settings,
        config: CardinalityConfig,
        next_consumer: Consumer,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._next = next_consumer
        self._cap = config.max_series_per_metric
        self._max_series = config.max_series
        self._full_logged = False
        self._all_cell: Cell | None = None
        self._last_full_sweep = -math.inf
        self._window = float(config.window)
        self._overflow = config.action == "overflow"
        self._clock = clock
        self._logger = settings.logger
        self.tel = settings.telemetry
        self._counts = PointCounts(self.tel, "cardinality", "cardinality_merged")
        self._limited: dict[str, Cell] = {}
        self._metrics: dict[str, _Metric] = {}
        self.active_series = 0
        self._capped_metrics = 0
        # Idle series of metrics that stay under the cap are only removed by this periodic sweep.
        self._next_sweep = clock() + self._window
        self.tel.gauge(
            "processor_cardinality_active_series",
            "Series seen within the window, over all metrics.",
            lambda: float(self.active_series),
        )

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        """Holds no data; removes the gauge."""
        self.tel.telemetry.unregister_gauges(**{self.tel.kind: self.tel.id})

    def _limited_cell(self, name: str) -> Cell:
        cell = self._limited.get(name)
        if cell is None:
            label = name if len(self._limited) < _METRIC_LABEL_MAX else "_other"
            cell = self.tel.counter(
                "processor_cardinality_limited_points_total",
                "Points of new series beyond a metric's cap, by metric and action (drop / overflow).",
                metric=label,
                action="overflow" if self._overflow else "drop",
            )
            if len(self._limited) < _METRIC_LABEL_MAX * 2:  # beyond that, look up each time: bounded dict
                self._limited[name] = cell
        return cell

    def _expire(self, m: _Metric, cutoff: float) -> None:
        series = m.series
        # Oldest first: stop at the first series seen recently enough.
        while series:
            key, seen = next(iter(series.items()))
            if seen >= cutoff:
                break
            del series[key]
            self.active_series -= 1

    def _sweep(self, now: float) -> None:
        cutoff = now - self._window
        for name in list(self._metrics):
            m = self._metrics[name]
            self._expire(m, cutoff)
            if not m.series:
                del self._metrics[name]
        self._next_sweep = now + self._window / 4

    def _room(self, now: float) -> bool:
        """Whether a new series may be tracked under ``max_series``; at the cap, idle series of every
        metric are swept first (at most once per tenth of the window: a sweep visits every metric)."""
        if self.active_series < self._max_series:
            return True
        if now - self._last_full_sweep >= self._window / 10:
            self._last_full_sweep = now
            self._sweep(now)
        if self.active_series < self._max_series:
            return True
        if not self._full_logged:
            self._full_logged = True
            self._logger.warning(
                "cardinality: %d active series over all metrics (max_series); points of new series are %s",
                self._max_series,
                "folded into overflow series" if self._overflow else "dropped",
            )
        return False

    async def consume(self, batch: Batch) -> None:
        if not isinstance(batch, MetricBatch):
            await self._next.consume(batch)
            return
        n = len(batch)
        self._counts.incoming(n)
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        cutoff = now - self._window
        cap = self._cap
        metrics = self._metrics
        out: list[Point] = []
        limited: list[Point] = []
        for p in batch.points:
            key = key_of(p)
            m = metrics.get(p.name)
            if m is None:
                if not self._room(now):
                    limited.append(p)  # no _Metric either: a flood of names must not grow the dict
                    continue
                m = metrics[p.name] = _Metric()
            series = m.series
            seen = series.get(key)
            if seen is not None:
                if seen != now:
                    series[key] = now
                    series.move_to_end(key)
                out.append(p)
                continue
            if len(series) >= cap and m.expired_at != now:
                self._expire(m, cutoff)
                m.expired_at = now
            if len(series) < cap and self._room(now):
                metrics[p.name] = m  # a sweep in _room may have dropped this metric while it was empty
                series[key] = now
                self.active_series += 1
                out.append(p)
                continue
            limited.append(p)
        if limited:
            out.extend(self._limit(limited))
        self._counts.outgoing(len(out))
        if not out:
            return
        # Not len(out) == n: folded overflow points can make up the same count with other labels.
        await self._next.consume(batch if not limited else MetricBatch(tuple(out), batch.context))

    def _limit(self, points: list[Point]) -> list[Point]:
        """Points of new series beyond the cap: counted, then dropped or folded into overflow points."""
        per_metric: dict[str, int] = {}
        everywhere = 0
        for p in points:
            m = self._metrics.get(p.name)
            if m is None or len(m.series) < self._cap:
                everywhere += 1  # limited by max_series, not by its metric's cap
            else:
                per_metric[p.name] = per_metric.get(p.name, 0) + 1
        if everywhere:
            if self._all_cell is None:
                self._all_cell = self.tel.counter(
                    "processor_cardinality_limited_points_total",
                    "Points of new series beyond a metric's cap, by metric and action (drop / overflow).",
                    metric=ALL_METRICS,
                    action="overflow" if self._overflow else "drop",
                )
            self._all_cell.value += everywhere
        for name, count in per_metric.items():
            self._limited_cell(name).value += count
            m = self._metrics[name]
            if not m.capped:
                m.capped = True
                self._capped_metrics += 1
                # One line per metric, for the first metrics only: a flood of capped names must not
                # become a flood of log lines (the per-metric counter has the rest).
                if self._capped_metrics <= _LOG_MAX:
                    self._logger.warning(
                        "cardinality: metric %r reached %d active series; points of new series are %s%s",
                        name,
                        self._cap,
                        "folded into the overflow series" if self._overflow else "dropped",
                        "; further capped metrics are not logged" if self._capped_metrics == _LOG_MAX else "",
                    )
        if not self._overflow:
            self._counts.dropped("cardinality", len(points))
            return []
        groups: dict[tuple[str, Kind], list[Point]] = {}
        for p in points:
            groups.setdefault((p.name, p.kind), []).append(p)
        out: list[Point] = []
        for group in groups.values():
            point, unfolded = fold(group)
            self._counts.dropped("cardinality", unfolded)
            if point is not None:
                out.append(point)
                # all but the one overflow point: their values live on in it
                self._counts.dropped("cardinality_merged", len(group) - unfolded - 1)
        return out


def create(settings: Settings, config: CardinalityConfig, next_consumer: Consumer) -> CardinalityLimiter:
    return CardinalityLimiter(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=CardinalityConfig,
    create=create,
    signals=frozenset({Signal.METRICS}),
    description="Caps active series per metric name; drops or folds points of series beyond the cap.",
)
