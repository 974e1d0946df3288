"""Points → Prometheus series: names, labels, and cumulative state. Shared by `prometheus` and
`prometheus_remote_write`.

Names: every character outside ``[a-zA-Z0-9_:]`` becomes ``_`` (so ``.``, ``-`` and ``/`` do), a leading
digit gets a ``_`` prefix, unit ``s`` appends ``_seconds`` (StatsD timers), and monotonic sums append
``_total``. Labels: invalid characters become ``_``; a name starting with a digit or ``__`` gets a
``key_`` prefix; labels that collide after sanitising are joined with ``;`` in name order; empty
values are dropped (remote-write forbids them); ``le`` on a histogram becomes ``exported_le`` and
``quantile`` on a summary ``exported_quantile`` (joined with ``;`` to a label already named so, as other
collisions are). Control characters in values (C0 but tab and newline, DEL, C1) and unpaired
surrogates are written as the text ``\\xNN`` / ``\\uNNNN``: no page or request carries a NUL or a
terminal escape, and every value encodes as UTF-8. (Prometheus 2.42 itself stores NUL and ESC as
they come, from a scrape or a remote write; the text format has no escape for them.)

Resources (OTLP): ``job`` = ``service.namespace/service.name`` (or ``service.name``) and ``instance`` =
``service.instance.id`` are added as Prometheus's own OTLP translation does, so two services sending
the same metric stay two series; a point's own ``job`` or ``instance`` label wins. Other resource
attributes are not labels.

State: Prometheus needs cumulative series, StatsD sends deltas. Each series keeps its running total
(counters), last value (gauges) or cumulative bucket counts (histograms), with the time it started.
Delta histograms add their own classic-bucket counts to the running counts, so ``_bucket`` series
never decrease even when exponential scales change. Several input series that map to one Prometheus
series (``a.b`` and ``a_b``) merge: counters add, gauges take the latest.

Histogram shapes. An exponential histogram (StatsD, OTLP exponential) is cut at its family's bounds
(the first ``bucket_layouts`` glob matching the Prometheus name, else ``histogram_buckets``;
``SeriesStore.bounds_of``; ``Series.bounds`` is None) by ``agent.exphist.classic_buckets``: each
exponential bucket goes whole to one ``le`` bucket. State keeps weighted float totals; renderers show
``agent.exphist.whole`` of them, so ``_bucket`` and ``_count`` are integers, never decrease, and
``+Inf`` equals ``_count``. An explicit-bucket histogram (OTLP) keeps its own
bounds, remembered in ``Series.bounds`` (one interned tuple shared by every series with those bounds):

- Deltas add up while the bounds stay the same. When they change, the old counts cannot be re-cut, so
  the series restarts from the new point (its start time moves to the point's start, or its time);
  Prometheus sees a counter reset on every ``_bucket``/``_sum``/``_count``. Switching between an
  exponential and an explicit histogram on one series restarts it the same way.
- A cumulative point replaces the state. A count lower than the previous one is a reset: the start
  time moves to the point's start time (or, without one, its time).
- A NaN sum (OTLP histograms, explicit or exponential, may omit ``sum``) makes ``_sum`` NaN, because
  the total is no longer known. A later delta with a known sum restarts ``_sum`` from that delta (a
  reset for ``rate``), so one point without a sum does not turn ``_sum`` into NaN for the rest of the
  series' life; ``_count`` and the buckets are unaffected. Cumulative points carry their own sum, so
  NaN lasts only while it is sent. (Native histograms merge their sums in ``exphist.merge`` as is.)

Summaries (OTLP Summary, always cumulative) replace their state per point: the quantiles are kept in
``Series.bounds`` (interned like bounds) and their values in ``Series.bucket_counts``; ``count`` and
``sum`` as for histograms. A lower count is a reset, as above.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent import exphist
from agent.bucket_layouts import BucketLayout, BucketLayouts, bounds_problem, validate_layouts
from agent.exphist import ExpHistogram
from agent.model import Kind, Labels, Point, Resource, SeriesKey, Temporality, key_of

DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Prometheus client libraries' default buckets (seconds)."""

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_VALID_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_UNSAFE_VALUE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
"""Characters a label value never carries as is: C0 controls but tab and newline (which the text format
escapes), DEL, C1 controls, and unpaired surrogates (which cannot be encoded as UTF-8)."""
_UNIT_SUFFIX = {"s": "_seconds", "ms": "_milliseconds", "By": "_bytes"}

COUNTER, GAUGE, HISTOGRAM, SUMMARY = "counter", "gauge", "histogram", "summary"

DEFAULT_MAX_SERIES = 200_000
"""Default cap on the series a Prometheus exporter holds. Measured ~650 B per series held (three labels,
one unique; ~750 B once its label text is cached for scrapes): ~150 MB at the cap. That is two StatsD
flushes at the receiver's own default cap of 100,000 series per interval."""
_EXPIRE_STEP = 5000
"""Series examined between yields to the event loop while expiring (~2 ms of work)."""

_CACHE_LIMIT = 500_000
"""Entries kept in each name/label translation cache before it is cleared (bounds memory on floods);
a store keeps at most ``max_series`` (at least ``_CACHE_MIN``): entries of series refused at the cap
must not hold what the cap saves."""
_CACHE_MIN = 1024
_SHAPE_LIMIT = 10_000
"""Distinct bound (or quantile) tuples interned before the table is cleared: clearing only stops new
series from sharing the tuples already held, so it is safe, and a flood of odd bounds stays bounded."""


class _Names:
    """Translation caches: the hot path is one dict lookup per point for the name and one for labels."""

    def __init__(self, limit: int = _CACHE_LIMIT) -> None:
        self.limit = limit
        self.metric: dict[tuple[str, Kind, bool, str], tuple[str, str, str | None]] = {}
        self.labels: dict[Labels, Labels] = {}
        self.jobs: dict[Labels, Labels] = {}
        self.with_job: dict[tuple[Labels, Labels], Labels] = {}

    def resource_labels(self, labels: Labels, resource: Resource) -> Labels:
        """``labels`` plus ``job`` and ``instance`` from the resource (see :func:`job_labels`)."""
        job = self.jobs.get(resource.attributes)
        if job is None:
            if len(self.jobs) >= self.limit:
                self.jobs.clear()
            job = self.jobs[resource.attributes] = job_labels(resource)
        if not job:
            return labels
        key = (labels, job)
        out = self.with_job.get(key)
        if out is None:
            if len(self.with_job) >= self.limit:
                self.with_job.clear()
            merged = dict(job)
            merged.update(labels)  # the point's own job / instance labels win
            out = self.with_job[key] = tuple(sorted(merged.items()))
        return out

    def translate(self, name: str, kind: Kind, monotonic: bool, unit: str) -> tuple[str, str, str | None]:
        """(Prometheus name, Prometheus type, label name the type reserves or None), cached together so
        that counters and gauges pay no per-point test for histogram or summary handling."""
        key = (name, kind, monotonic, unit)
        out = self.metric.get(key)
        if out is None:
            if len(self.metric) >= self.limit:
                self.metric.clear()
            out = self.metric[key] = (
                metric_name(name, kind, monotonic, unit),
                _prom_kind(kind, monotonic),
                _RESERVED_LABEL.get(kind),
            )
        return out

    def prom_labels(self, labels: Labels) -> Labels:
        out = self.labels.get(labels)
        if out is None:
            if len(self.labels) >= self.limit:
                self.labels.clear()
            out = self.labels[labels] = prom_labels(labels)
        return out


def job_labels(resource: Resource) -> Labels:
    """``job`` and ``instance`` as Prometheus derives them from an OTLP resource: ``job`` is
    ``service.namespace/service.name`` (or ``service.name``), ``instance`` is ``service.instance.id``.
    Without them two services sending the same metric and labels would be one series."""
    attrs = dict(resource.attributes)
    out = []
    name = attrs.get("service.name")
    if name:
        namespace = attrs.get("service.namespace")
        out.append(("job", safe_value(f"{namespace}/{name}" if namespace else name)))
    instance = attrs.get("service.instance.id")
    if instance:
        out.append(("instance", safe_value(instance)))
    return tuple(sorted(out))


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


def _escape_char(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_value(value: str) -> str:
    """``value`` with control characters and unpaired surrogates written as ``\\xNN`` / ``\\uNNNN`` text
    (see the module notes); the same string when there are none."""
    if value.isascii() and value.isprintable():
        return value
    return _UNSAFE_VALUE.sub(_escape_char, value)


def _plain(value: str) -> bool:
    return (value.isascii() and value.isprintable()) or _UNSAFE_VALUE.search(value) is None


def prom_labels(labels: Labels) -> Labels:
    """Labels as Prometheus takes them; the same tuple when nothing changes (it is kept per series)."""
    if all(v != "" and _VALID_LABEL.fullmatch(k) and not k.startswith("__") and _plain(v) for k, v in labels):
        return labels  # the input is sorted with unique names, and valid names map to themselves
    merged: dict[str, str] = {}
    for k, v in labels:
        if v == "":
            continue
        name = label_name(k)
        v = safe_value(v)
        merged[name] = f"{merged[name]};{v}" if name in merged else v
    return tuple(sorted(merged.items()))


def prom_kind(point: Point) -> str:
    return _prom_kind(point.kind, point.monotonic)


def _prom_kind(kind: Kind, monotonic: bool) -> str:
    if kind is Kind.HISTOGRAM:
        return HISTOGRAM
    if kind is Kind.SUMMARY:
        return SUMMARY
    if kind is Kind.SUM and monotonic:
        return COUNTER
    return GAUGE


_RESERVED_LABEL = {Kind.HISTOGRAM: "le", Kind.SUMMARY: "quantile"}
"""The label a histogram or summary puts on its own sub-series; a point's label of that name is renamed
``exported_<name>``."""


def _rename_label(labels: Labels, old: str, new: str) -> Labels:
    """``labels`` with ``old`` renamed ``new``; a clash with an existing ``new`` joins the values with
    ``;`` in name order, like any other collision (``new`` sorts first for exported_le/exported_quantile)."""
    merged: dict[str, str] = {}
    for k, v in labels:
        if k == old:
            k = new
        merged[k] = f"{merged[k]};{v}" if k in merged else v
    return tuple(sorted(merged.items()))


class Series:
    """One Prometheus series (a histogram or summary is one series here; exporters expand it)."""

    __slots__ = (
        "bounds",
        "bucket_counts",
        "cache",
        "count",
        "dead",
        "front_monotonic",
        "front_unit",
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
        """Cumulative count per finite bound (histograms), or the value per quantile (summaries)."""
        self.bounds: tuple[float, ...] | None = None
        """An explicit histogram's own bounds, or a summary's quantiles; None for the store's bounds.
        Interned by the store, so series with the same bounds share one tuple."""
        self.sum = 0.0
        self.count = 0.0
        self.native: ExpHistogram | None = None
        self.cache: object = None
        """Exporter-owned rendering of the labels (text or encoded bytes), built once per series."""
        self.dead = False
        """Removed from the store (expired, or refused as it was made): the store's front cache of
        series by point identity checks this instead of looking the labels up again."""
        self.front_monotonic = False
        self.front_unit = ""
        """The monotonic flag and unit of the points the front cache found this series for: with the
        series key, everything the Prometheus name and labels are made of."""


class SeriesStore:
    """Cumulative state for every live series, grouped by family so renderers keep families together."""

    def __init__(
        self,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        *,
        layouts: Sequence[BucketLayout] = (),
        keep_native: bool = False,
        max_buckets: int = 160,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        self.bounds = tuple(sorted(buckets))
        self.layouts = BucketLayouts(self.bounds, layouts)
        """The classic bounds of each family cut from exponential histograms (``bounds_of``)."""
        self.keep_native = keep_native
        self.max_buckets = max_buckets
        self.max_series = max_series
        self.families: dict[str, dict[Labels, Series]] = {}
        self.kinds: dict[str, str] = {}
        self.size = 0
        self._names = _Names(min(_CACHE_LIMIT, max(_CACHE_MIN, max_series)))
        self._shapes: dict[tuple[float, ...], tuple[float, ...]] = {}
        self.refused: dict[str, int] = {}
        self._refusals_taken: dict[str, int] = {}
        self._front: dict[SeriesKey, Series] = {}
        """Series by the series key of the points that reach them (checked against the series'
        front_monotonic and front_unit): one pointer-keyed lookup a point instead of translating and
        hashing its name and labels each time, and no tuple a series."""

    def bounds_of(self, name: str) -> tuple[float, ...]:
        """The bounds family ``name`` cuts exponential histograms at (its layout, else the default);
        a few shared tuples, so renderers may cache their text by identity."""
        return self.layouts.bounds_for(name)

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def new_refusals(self) -> dict[str, int]:
        """The points refused (``refused``) since the last call, by reason: what an exporter adds to
        its dropped counter after each batch."""
        new = {r: n - self._refusals_taken.get(r, 0) for r, n in self.refused.items()}
        self._refusals_taken = dict(self.refused)
        return {r: n for r, n in new.items() if n}

    def _intern(self, shape: tuple[float, ...]) -> tuple[float, ...]:
        """One shared tuple per distinct bounds (or quantiles): 100k series of one metric hold one."""
        out = self._shapes.get(shape)
        if out is None:
            if len(self._shapes) >= _SHAPE_LIMIT:
                self._shapes.clear()
            out = self._shapes[shape] = shape
        return out

    def _refuse_point(self, reason: str, series: Series, family: dict[Labels, Series]) -> None:
        """Refuse a point; a series it had just created (no state yet) is forgotten again."""
        self._refuse(reason)
        if series.bucket_counts is None and family.get(series.labels) is series:
            del family[series.labels]
            series.dead = True
            self.size -= 1
            if not family:
                del self.families[series.name]
                self.kinds.pop(series.name, None)

    def _locate(self, point: Point) -> Series | None:
        """The series ``point`` updates (made if new), found by its Prometheus name and labels; None
        when refused (counted)."""
        names = self._names
        name, kind, reserved = names.translate(point.name, point.kind, point.monotonic, point.unit)
        known = self.kinds.get(name)
        if known is None:
            self.kinds[name] = kind
        elif known != kind:
            self._refuse("type_conflict")  # one family name cannot be both a counter and a gauge
            return None
        labels = names.prom_labels(point.labels)
        if point.resource is not None:
            labels = names.resource_labels(labels, point.resource)
        if reserved is not None and any(k == reserved for k, _ in labels):
            labels = _rename_label(labels, reserved, "exported_" + reserved)
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
        return series

    def update(self, point: Point, now: float | None = None) -> Series | None:
        """Apply one point; return its series, or None when refused (counted in ``refused``)."""
        key = key_of(point)
        series = self._front.get(key)
        if (
            series is None
            or series.dead
            or series.front_monotonic != point.monotonic
            or series.front_unit != point.unit
        ):
            series = self._locate(point)
            if series is None:
                return None
            if len(self._front) >= self._names.limit:
                self._front.clear()
            self._front[key] = series
            series.front_monotonic, series.front_unit = point.monotonic, point.unit
        name, kind = series.name, series.kind
        reserved = _RESERVED_LABEL.get(point.kind)
        family = self.families[name]
        series.last_update = time.monotonic() if now is None else now
        cumulative = point.temporality is Temporality.CUMULATIVE
        if reserved is not None:  # histograms and summaries
            if kind == SUMMARY:
                return self._update_summary(point, series, family)
            h = point.histogram
            if h is None:
                return self._update_explicit(point, series, family, cumulative)
            delta_counts = exphist.classic_buckets(h, self.layouts.bounds_for(name))
            if cumulative or series.bucket_counts is None or series.bounds is not None:
                if series.bounds is not None:  # was an explicit histogram: a new shape restarts it
                    series.bounds = None
                    series.start_ms = (point.start_time_unix_nano or point.time_unix_nano) // 1_000_000
                series.bucket_counts = np.array(delta_counts, dtype=np.float64)
                series.sum, series.count = h.sum, h.count
                series.native = h if self.keep_native else None
                if cumulative and point.start_time_unix_nano:
                    series.start_ms = point.start_time_unix_nano // 1_000_000
            else:
                series.bucket_counts += delta_counts
                total = series.sum
                # After a NaN sum, a known one restarts _sum (see the module notes) instead of NaN forever.
                series.sum = h.sum if total != total else total + h.sum
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

    def _update_explicit(
        self, point: Point, series: Series, family: dict[Labels, Series], cumulative: bool
    ) -> Series | None:
        """A HISTOGRAM point with fixed bounds (see the module notes)."""
        e = point.explicit
        if e is None:
            self._refuse_point("missing_histogram", series, family)
            return None
        bounds = e.bounds
        if len(e.counts) != len(bounds) + 1:  # the model's invariant; never let bad input crash a render
            self._refuse_point("invalid_histogram", series, family)
            return None
        known = series.bounds
        same = known is bounds or (known is not None and known == bounds)
        # Keep the interned tuple: sharing saves memory, and remote-write rebuilds label bytes when
        # the identity changes.
        bounds = known if same and known is not None else self._intern(bounds)
        counts = e.counts
        total = sum(counts)
        total_sum = e.sum
        if total_sum != total_sum:
            total_sum = math.nan  # an input NaN never carries the stale-marker bit pattern
        fresh = series.bucket_counts is None
        # Running counts per finite bound; the last input count (above the last bound) is only in +Inf.
        running = np.fromiter(itertools.accumulate(counts[:-1]), dtype=np.float64, count=len(bounds))
        if cumulative or fresh or not same:
            if not fresh and (not same or total < series.count):
                # New bounds, or a cumulative count that went down: a new series life starts here.
                series.start_ms = (point.start_time_unix_nano or point.time_unix_nano) // 1_000_000
            if cumulative and point.start_time_unix_nano:
                series.start_ms = point.start_time_unix_nano // 1_000_000
            series.bucket_counts = running
            series.sum = total_sum
            series.count = float(total)
            series.bounds = bounds
            series.native = None  # explicit buckets cannot become a native histogram exactly
        else:
            assert series.bucket_counts is not None
            series.bucket_counts += running
            known_sum = series.sum
            series.sum = total_sum if known_sum != known_sum else known_sum + total_sum
            series.count += total
        return series

    def _update_summary(self, point: Point, series: Series, family: dict[Labels, Series]) -> Series | None:
        summary = point.summary
        if summary is None:
            self._refuse_point("missing_summary", series, family)
            return None
        # One value per quantile (the last one given): a repeated quantile would be a duplicate series,
        # which a remote-write receiver answers with a 400 for the whole request.
        pairs = sorted(dict(summary.quantiles).items())
        quantiles = tuple(q for q, _ in pairs)
        known = series.bounds
        if known is None or known != quantiles:
            series.bounds = self._intern(quantiles)
        if series.bucket_counts is not None and summary.count < series.count:
            series.start_ms = (point.start_time_unix_nano or point.time_unix_nano) // 1_000_000
        if point.start_time_unix_nano:
            series.start_ms = point.start_time_unix_nano // 1_000_000
        # NaN values are normalised so no input payload can become the stale marker.
        series.bucket_counts = np.array([v if v == v else math.nan for _, v in pairs], dtype=np.float64)
        total_sum = summary.sum
        series.sum = total_sum if total_sum == total_sum else math.nan
        series.count = float(summary.count)
        return series

    @staticmethod
    def row(s: Series) -> list[Any]:
        """One series' cumulative state as plain data (see :meth:`snapshot`)."""
        return [
            [x for pair in s.labels for x in pair],
            s.value,
            s.start_ms,
            s.ts_ms,
            None if s.bucket_counts is None else s.bucket_counts.tolist(),
            s.sum,
            s.count,
            None if s.bounds is None else list(s.bounds),
        ]

    def snapshot(self) -> dict[str, Any]:
        """Every series' cumulative state as plain data (msgpack-able), to survive a restart.

        Native histogram state is not kept: a restored series' native histogram starts again (a reset
        for Prometheus); classic buckets, sums, counts, counters and gauges continue."""
        families = [
            [name, self.kinds.get(name, ""), [self.row(s) for s in family.values()]]
            for name, family in self.families.items()
        ]
        return {"version": 1, "families": families}

    def restore(self, state: dict[str, Any], now: float | None = None) -> int:
        """Load a :meth:`snapshot`; returns the series restored. Unknown versions and malformed rows
        are skipped: a restart must never fail on old state."""
        if state.get("version") != 1:
            return 0
        restored = 0
        for entry in state.get("families", ()):
            try:
                name, kind, rows = entry
            except (TypeError, ValueError):
                continue
            restored += self.restore_rows(name, kind, rows, now)
        return restored

    def restore_rows(self, name: str, kind: str, rows: Any, now: float | None = None) -> int:
        """Apply :meth:`row` s of family ``name``; a row replaces what is known of its series unless that
        was sent later (``ts_ms`` is strictly increasing per series). Returns the series that were new."""
        now = time.monotonic() if now is None else now
        added = 0
        try:
            for flat, value, start_ms, ts_ms, buckets, total, count, bounds in rows:
                labels = tuple(zip(flat[::2], flat[1::2], strict=True))
                series = Series(name, kind, labels, int(start_ms))
                series.value, series.ts_ms, series.last_update = float(value), int(ts_ms), now
                if buckets is not None:
                    series.bucket_counts = np.array(buckets, dtype=np.float64)
                    if bounds is None and kind == HISTOGRAM and len(buckets) != len(self.bounds_of(name)):
                        continue  # the layout changed across the restart: the series starts again
                series.sum, series.count = float(total), float(count)
                if bounds is not None:
                    series.bounds = self._intern(tuple(float(b) for b in bounds))
                family = self.families.setdefault(name, {})
                known = family.get(labels)
                if known is None:
                    if self.size >= self.max_series:
                        continue
                    self.size += 1
                    added += 1
                elif known.ts_ms > series.ts_ms:
                    continue  # an older row (a journal written while a snapshot was taken): keep the newer
                family[labels] = series
                self.kinds[name] = kind
        except (TypeError, ValueError):
            pass
        return added

    def expire(self, idle_s: float, now: float | None = None) -> list[Series]:
        """Remove and return series not updated for ``idle_s`` seconds, in one go (tests, small stores);
        on the loop use :meth:`expire_sliced`."""
        return [s for step in self.expire_steps(idle_s, now) for s in step]

    async def expire_sliced(self, idle_s: float, now: float | None = None) -> list[Series]:
        """:meth:`expire`, yielding to the event loop every ``_EXPIRE_STEP`` series examined."""
        gone: list[Series] = []
        for step in self.expire_steps(idle_s, now):
            gone += step
            await asyncio.sleep(0)
        return gone

    def expire_steps(self, idle_s: float, now: float | None = None) -> Iterator[list[Series]]:
        """Expire in steps of about ``_EXPIRE_STEP`` series examined, yielding the series each step
        removed. Between steps the store may change (points arrive, series are added): each step looks
        series up again, and removes only those still idle. Series removed free room under
        ``max_series`` at once."""
        now = time.monotonic() if now is None else now
        cutoff = now - idle_s
        families, kinds = self.families, self.kinds
        gone: list[Series] = []
        examined = 0
        for name in list(families):
            family = families.get(name)
            if family is None:
                continue
            keys = list(family)
            for lo in range(0, len(keys), _EXPIRE_STEP):
                part = keys[lo : lo + _EXPIRE_STEP]
                for labels in part:
                    s = family.get(labels)
                    if s is not None and s.last_update < cutoff:
                        del family[labels]
                        s.dead = True
                        gone.append(s)
                examined += len(part)
                if not family and families.get(name) is family:
                    del families[name]
                    kinds.pop(name, None)
                if examined >= _EXPIRE_STEP:
                    self.size -= len(gone)
                    yield gone
                    gone, examined = [], 0
        self.size -= len(gone)
        yield gone


def store_problems(
    histogram_buckets: Sequence[float],
    bucket_layouts: Sequence[BucketLayout],
    expiration: tuple[str, float],
    max_series: int,
) -> list[tuple[str, str]]:
    """The problems of the series-store settings both Prometheus exporters share: the classic
    buckets and layouts, the idle time after which a series goes (``expiration``: its field's name
    and value) and the series cap."""
    problems = []
    bounds = bounds_problem(histogram_buckets)
    if bounds is not None:
        problems.append(("histogram_buckets", bounds))
    problems += validate_layouts(bucket_layouts)
    name, seconds = expiration
    if seconds <= 0:
        problems.append((name, "must be greater than 0"))
    if max_series < 1:
        problems.append(("max_series", "must be at least 1"))
    return problems


def expiry_interval_s(ttl_s: float) -> float:
    """How often an exporter looks for series idle for ``ttl_s``: a quarter of it, 50 ms to 30 s."""
    return min(max(ttl_s / 4, 0.05), 30.0)


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
