"""Points → Prometheus series: names, labels, and cumulative state. Shared by `prometheus` and
`prometheus_remote_write`.

Names: every character outside ``[a-zA-Z0-9_:]`` becomes ``_`` (so ``.``, ``-`` and ``/`` do), a leading
digit gets a ``_`` prefix, unit ``s`` appends ``_seconds`` (StatsD timers), and monotonic sums append
``_total``. Labels: invalid characters become ``_``; a name starting with a digit or ``__`` gets a
``key_`` prefix; labels that collide after sanitising are joined with ``;`` in name order; empty
values are dropped (remote-write forbids them); ``le`` on a histogram becomes ``exported_le``.

State: Prometheus needs cumulative series, StatsD sends deltas. Each series keeps its running total
(counters), last value (gauges) or cumulative bucket counts (histograms), with the time it started.
Delta histograms add their own classic-bucket counts to the running counts, so ``_bucket`` series
never decrease even when exponential scales change. Several input series that map to one Prometheus
series (``a.b`` and ``a_b``) merge: counters add, gauges take the latest.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from agent import exphist
from agent.exphist import ExpHistogram
from agent.model import Kind, Labels, Point, Temporality

DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Prometheus client libraries' default buckets (seconds)."""

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_VALID_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_UNIT_SUFFIX = {"s": "_seconds", "ms": "_milliseconds", "By": "_bytes"}

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

_CACHE_LIMIT = 500_000
"""Entries kept in each name/label translation cache before it is cleared (bounds memory on floods)."""


class _Names:
    """Translation caches: the hot path is one dict lookup per point for the name and one for labels."""

    def __init__(self) -> None:
        self.metric: dict[tuple[str, Kind, bool, str], str] = {}
        self.labels: dict[Labels, Labels] = {}

    def metric_name(self, name: str, kind: Kind, monotonic: bool, unit: str) -> str:
        key = (name, kind, monotonic, unit)
        out = self.metric.get(key)
        if out is None:
            if len(self.metric) >= _CACHE_LIMIT:
                self.metric.clear()
            out = self.metric[key] = metric_name(name, kind, monotonic, unit)
        return out

    def prom_labels(self, labels: Labels) -> Labels:
        out = self.labels.get(labels)
        if out is None:
            if len(self.labels) >= _CACHE_LIMIT:
                self.labels.clear()
            out = self.labels[labels] = prom_labels(labels)
        return out


def metric_name(name: str, kind: Kind, monotonic: bool, unit: str) -> str:
    out = _INVALID_NAME.sub("_", name) or "_"
    if out[0].isdigit():
        out = "_" + out
    suffix = _UNIT_SUFFIX.get(unit, "")
    if suffix and not out.endswith(suffix):
        out += suffix
    if kind is Kind.SUM and monotonic and not out.endswith("_total"):
        out += "_total"
    return out


def label_name(name: str) -> str:
    out = _INVALID_LABEL.sub("_", name)
    if not out or out[0].isdigit() or out.startswith("__"):
        out = "key_" + out
    return out


def prom_labels(labels: Labels) -> Labels:
    """Labels as Prometheus takes them; the same tuple when nothing changes (it is kept per series)."""
    if all(v != "" and _VALID_LABEL.fullmatch(k) and not k.startswith("__") for k, v in labels):
        return labels  # the input is sorted with unique names, and valid names map to themselves
    merged: dict[str, str] = {}
    for k, v in labels:
        if v == "":
            continue
        name = label_name(k)
        merged[name] = f"{merged[name]};{v}" if name in merged else v
    return tuple(sorted(merged.items()))


def prom_kind(point: Point) -> str:
    if point.kind is Kind.HISTOGRAM:
        return HISTOGRAM
    if point.kind is Kind.SUM and point.monotonic:
        return COUNTER
    return GAUGE


class Series:
    """One Prometheus series (a histogram is one series here; exporters expand it)."""

    __slots__ = (
        "bucket_counts",
        "cache",
        "count",
        "kind",
        "labels",
        "last_update",
        "name",
        "native",
        "start_ms",
        "sum",
        "ts_ms",
        "value",
    )

    def __init__(self, name: str, kind: str, labels: Labels, start_ms: int) -> None:
        self.name = name
        self.kind = kind
        self.labels = labels
        self.value = 0.0
        self.start_ms = start_ms
        self.ts_ms = 0
        """Timestamp of the last sample sent; the next one is always later (remote-write order)."""
        self.last_update = 0.0
        self.bucket_counts: npt.NDArray[np.float64] | None = None
        self.sum = 0.0
        self.count = 0.0
        self.native: ExpHistogram | None = None
        self.cache: object = None
        """Exporter-owned rendering of the labels (text or encoded bytes), built once per series."""


class SeriesStore:
    """Cumulative state for every live series, grouped by family so renderers keep families together."""

    def __init__(
        self,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        *,
        keep_native: bool = False,
        max_buckets: int = 160,
        max_series: int = 1_000_000,
    ) -> None:
        self.bounds = tuple(sorted(buckets))
        self.keep_native = keep_native
        self.max_buckets = max_buckets
        self.max_series = max_series
        self.families: dict[str, dict[Labels, Series]] = {}
        self.kinds: dict[str, str] = {}
        self.size = 0
        self._names = _Names()
        self.refused: dict[str, int] = {}

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def update(self, point: Point, now: float | None = None) -> Series | None:
        """Apply one point; return its series, or None when refused (counted in ``refused``)."""
        names = self._names
        kind = prom_kind(point)
        name = names.metric_name(point.name, point.kind, point.monotonic, point.unit)
        known = self.kinds.get(name)
        if known is None:
            self.kinds[name] = kind
        elif known != kind:
            self._refuse("type_conflict")  # one family name cannot be both a counter and a gauge
            return None
        labels = names.prom_labels(point.labels)
        if kind == HISTOGRAM and any(k == "le" for k, _ in labels):
            labels = tuple(sorted(("exported_le" if k == "le" else k, v) for k, v in labels))
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = {}
        series = family.get(labels)
        if series is None:
            if self.size >= self.max_series:
                self._refuse("series_limit")
                return None
            start_ns = point.start_time_unix_nano or point.time_unix_nano
            series = family[labels] = Series(name, kind, labels, start_ns // 1_000_000)
            self.size += 1
        series.last_update = time.monotonic() if now is None else now
        cumulative = point.temporality is Temporality.CUMULATIVE
        if kind == HISTOGRAM:
            h = point.histogram
            if h is None:
                self._refuse("missing_histogram")
                return series
            delta_counts = exphist.cumulative_buckets(h, self.bounds)
            if cumulative or series.bucket_counts is None:
                series.bucket_counts = np.array(delta_counts, dtype=np.float64)
                series.sum, series.count = h.sum, h.count
                series.native = h if self.keep_native else None
                if cumulative and point.start_time_unix_nano:
                    series.start_ms = point.start_time_unix_nano // 1_000_000
            else:
                series.bucket_counts += delta_counts
                series.sum += h.sum
                series.count += h.count
                if self.keep_native:
                    series.native = (
                        h
                        if series.native is None
                        else exphist.merge(series.native, h, max_buckets=self.max_buckets)
                    )
        else:
            value = point.value
            if value != value:
                value = math.nan  # an input NaN never carries the stale-marker bit pattern
            if kind == COUNTER or (point.kind is Kind.SUM and not cumulative):
                if cumulative:
                    series.value = value
                else:
                    series.value += value
            else:
                series.value = value
        return series

    def expire(self, idle_s: float, now: float | None = None) -> list[Series]:
        """Remove and return series not updated for ``idle_s`` seconds."""
        now = time.monotonic() if now is None else now
        cutoff = now - idle_s
        gone: list[Series] = []
        for name in list(self.families):
            family = self.families[name]
            stale = [labels for labels, s in family.items() if s.last_update < cutoff]
            for labels in stale:
                gone.append(family.pop(labels))
            if not family:
                del self.families[name]
                self.kinds.pop(name, None)
        self.size -= len(gone)
        return gone


def next_timestamp_ms(series: Series, time_unix_nano: int) -> int:
    """The sample time for ``series``: the point's time, nudged past the last one sent (ordering)."""
    ts = time_unix_nano // 1_000_000
    if ts <= series.ts_ms:
        ts = series.ts_ms + 1
    series.ts_ms = ts
    return ts


def format_value(v: float) -> str:
    """Exposition-format number: integral values without a fraction, +Inf/-Inf/NaN spelled out."""
    v = float(v)
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)
