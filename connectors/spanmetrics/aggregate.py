"""The span → metrics aggregation of ``spanmetrics``: plans compiled from the config, series state,
and the points a flush makes. No asyncio here: the connector (``__init__.py``) owns the timer.

A *plan* is one family of outputs with its own dimensions: the Collector's ``calls``/``duration``
(always labelled with ``service.name``, ``span.name``, ``span.kind`` and ``status.code``) or a metric
set (``http_requests_total{method, route, status_code, tenant_id}``). A plan has one or two
*aggregations*: calls and duration share one when they carry the same labels; a metric set whose
duration leaves a label off (``status_code``) aggregates its duration under its own, shorter key, so
each output series is one point a flush.

Per span the work is: the wanted attributes read once into a dict (span attributes over resource
attributes, plus the intrinsic ``span.name``/``span.kind``/``status.code``/``service.name``), then
per plan a tuple of label values, one dict lookup and an ``array.append`` of the duration. Durations
are bucketed at flush, all series in one numpy pass (``exphist.from_segments`` or a ``searchsorted``
and ``bincount``); a series holding more than :data:`FOLD_AT` raw durations folds them early, so
memory per series stays bounded whatever the span rate.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent import exphist
from agent.anyvalue import render_value
from agent.exphist import ExpHistogram
from agent.model import (
    ExplicitHistogram,
    IntValue,
    Kind,
    Labels,
    Point,
    Resource,
    SeriesKey,
    Temporality,
    new_point,
    series_key,
)

SPAN_KINDS = (
    "SPAN_KIND_UNSPECIFIED",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_SERVER",
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_PRODUCER",
    "SPAN_KIND_CONSUMER",
)
"""``span.kind`` label values by the OTLP enum number (the Collector's spelling)."""
STATUS_CODES = ("STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR")
"""``status.code`` label values by the OTLP enum number."""

SERVICE_NAME = "service.name"
INTRINSICS = (SERVICE_NAME, "span.name", "span.kind", "status.code")
"""Dimension names read from the span itself (and its resource's service.name), not its attributes."""
AUTH_TENANT = "auth.tenant"
"""The dimension name of the tenant the request was authenticated as (the batch context's)."""
OVERFLOW_LABEL = "otel.metric.overflow"
"""The label of the one series a plan's spans go to once ``max_series`` is reached (as the Collector's
``aggregation_cardinality_limit`` does)."""

FOLD_AT = 4096
"""Raw durations a series holds before they are bucketed early (32 KiB); the rest wait for the flush."""
_NS = 1e-9
_NEVER = 1 << 62
"""The fold threshold while a flush is being handed on: nothing is folded into what it holds."""


@dataclass(frozen=True)
class Group:
    """One output label: its value is the first of ``names`` a span (then its resource) carries, else
    ``default``; with neither the label is left off."""

    label: str
    names: tuple[str, ...]
    default: str | None


@dataclass(frozen=True)
class Aggregation:
    """What one series of a plan emits, over which of the plan's groups."""

    calls: str | None
    """Name of the calls counter, or None."""
    duration: str | None
    """Name of the duration histogram (seconds), or None."""
    indices: tuple[int, ...] | None
    """The plan's groups this aggregation is keyed and labelled by; None = all of them."""


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]
    aggregations: tuple[Aggregation, ...]
    kinds: frozenset[int] | None
    """Span kinds (OTLP numbers) this plan counts; None = every kind."""
    when_any: tuple[str, ...]
    """The plan counts only spans carrying one of these attributes (span or resource); () = every span."""
    description: str = ""


def plan_groups(
    dimensions: Iterable[tuple[str, str | None]],
    renames: Mapping[str, str],
    leading: Sequence[str] = (),
    tenant_label: str = "",
) -> tuple[Group, ...]:
    """Groups from (attribute, default) dimensions in order: attributes renamed to one label share its
    group (the first present wins; the first default given is the label's); ``leading`` names come first.
    With ``tenant_label``, the authenticated tenant (:data:`AUTH_TENANT`) is that label's first source."""
    order: list[str] = []
    names: dict[str, list[str]] = {}
    defaults: dict[str, str | None] = {}
    for name, default in [*((n, None) for n in leading), *dimensions]:
        label = renames.get(name, name)
        if label not in names:
            order.append(label)
            names[label] = []
            defaults[label] = None
        if name not in names[label]:
            names[label].append(name)
        if defaults[label] is None:
            defaults[label] = default
    if tenant_label:
        if tenant_label not in names:
            order.append(tenant_label)
            names[tenant_label] = []
            defaults[tenant_label] = None
        names[tenant_label].insert(0, AUTH_TENANT)
    return tuple(Group(label, tuple(names[label]), defaults[label]) for label in order)


class _Series:
    """One output series' state between flushes. ``values`` are raw durations (seconds) not yet
    bucketed; the rest is what was folded: the histogram (exponential) or counts, sum, min and max
    (explicit)."""

    __slots__ = ("agg", "calls_key", "counts", "duration_key", "folded", "hist", "labels", "max", "min",
                 "resource", "seen_folded", "seen_ns", "start_ns", "sum", "values")  # fmt: skip

    def __init__(self, agg: Aggregation, labels: Labels, resource: Resource, start_ns: int) -> None:
        self.agg = agg
        self.labels = labels
        self.resource = resource
        self.values = array("d")
        self.folded = 0
        self.hist: ExpHistogram | None = None
        self.counts: npt.NDArray[np.int64] | None = None
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.start_ns = start_ns
        self.seen_ns = start_ns
        """When a flush last found new spans in the series (cumulative expiry)."""
        self.seen_folded = 0
        """``folded`` at that flush."""
        self.calls_key: SeriesKey | None = None
        self.duration_key: SeriesKey | None = None


def _text(v: Any) -> str:
    """An attribute value as label text; an int stays typed (:class:`IntValue`), so OTLP sends it back
    as an int (``http.response.status_code``)."""
    which = v.WhichOneof("value")
    if which == "string_value":
        return str(v.string_value)
    if which == "int_value":
        return IntValue(v.int_value)
    return render_value(v)


class Aggregator:
    """Series state of one connector: :meth:`add` spans, :meth:`flush` points.

    ``bounds`` = None aggregates durations into exponential histograms of at most ``max_size``
    buckets a side; a tuple of bounds (seconds, increasing) into explicit-bucket histograms. Not
    thread-safe: one event loop adds and flushes.
    """

    def __init__(
        self,
        plans: Sequence[Plan],
        *,
        resource_keys: Sequence[str],
        temporality: Temporality,
        max_series: int,
        max_size: int = 160,
        bounds: tuple[float, ...] | None = None,
        now_ns: int = 0,
        expiration_ns: int = 0,
    ) -> None:
        self._plans = tuple(plans)
        self._aggregations: list[tuple[Plan, Aggregation]] = []
        compiled = []
        for plan in self._plans:
            aggs = []
            for agg in plan.aggregations:
                aggs.append((len(self._aggregations), agg.indices))
                self._aggregations.append((plan, agg))
            groups = tuple((g.names[0], g.names[1:], g.default) for g in plan.groups)
            compiled.append((plan.kinds, plan.when_any, groups, tuple(aggs)))
        self._compiled = tuple(compiled)
        """Per plan (kinds, when_any, groups as (first name, other names, default), (aggregation id,
        indices) pairs): plain tuples, unpacked in the per-span loop instead of attribute reads."""
        self._fold_at = FOLD_AT
        self._resource_keys = frozenset(resource_keys) | {SERVICE_NAME}
        wanted: set[str] = set()
        for plan in self._plans:
            for group in plan.groups:
                wanted.update(n for n in group.names if n not in INTRINSICS and n != AUTH_TENANT)
            wanted.update(plan.when_any)
        self._wanted = frozenset(wanted)
        self._temporality = temporality
        self._expiration_ns = expiration_ns
        self._max_series = max_series
        self._max_size = max_size
        self._bounds = bounds
        self._bounds_array = np.asarray(bounds if bounds is not None else (), dtype=np.float64)
        self.series: dict[tuple[Any, ...], _Series] = {}
        self._interval_start_ns = now_ns
        self._flush_ns = now_ns
        self._resources: dict[Labels, tuple[Resource, dict[str, str]]] = {}
        self.overflow_spans = 0
        """Spans counted in an overflow series since the start (per aggregation they reached)."""

    # -- input ------------------------------------------------------------------------------------------
    def _resource(self, attributes: Any, tenant: str | None) -> tuple[Resource, dict[str, str]]:
        """(the output Resource, the wanted attributes, service.name and the authenticated tenant) of a
        ResourceSpans' resource; memoised by its key attributes, bounded."""
        keys = self._resource_keys
        wanted = self._wanted
        kept: list[tuple[str, str]] = []
        found: dict[str, str] = {}
        for kv in attributes:
            k = kv.key
            if k in keys or k in wanted:
                text = _text(kv.value)
                if k in keys:
                    kept.append((k, text))
                if k in wanted:
                    found[k] = text
        identity = tuple(sorted(kept))
        found[SERVICE_NAME] = dict(identity).get(SERVICE_NAME, "")
        if tenant:
            found[AUTH_TENANT] = tenant
        memo = self._resources.get(identity)
        if memo is None or memo[1] != found:
            if len(self._resources) >= 10_000:
                self._resources.clear()
            memo = self._resources[identity] = (Resource(identity), found)
        return memo

    def add(self, resource_spans: Iterable[Any], now_ns: int, tenant: str | None = None) -> int:
        """Count every span of ``resource_spans``, sent by the authenticated ``tenant`` (None: not
        authenticated); returns the number of spans."""
        # Hoisted locals: this loop runs once a span (the connector's whole per-span cost).
        compiled = self._compiled
        wanted = self._wanted
        series = self.series
        series_get = series.get
        kinds_text = SPAN_KINDS
        status_text = STATUS_CODES
        fold_at = self._fold_at
        spans_seen = 0
        for rs in resource_spans:
            resource, res_found = self._resource(rs.resource.attributes, tenant)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    spans_seen += 1
                    kind = span.kind
                    status = span.status.code
                    found = res_found.copy()
                    for kv in span.attributes:
                        k = kv.key
                        if k in wanted:
                            av = kv.value
                            # A non-empty string is most values: no WhichOneof, no call.
                            found[k] = av.string_value or _text(av)
                    found["span.name"] = span.name
                    found["span.kind"] = kinds_text[kind] if 0 <= kind < 6 else f"SPAN_KIND_{kind}"
                    found["status.code"] = status_text[status] if 0 <= status < 3 else f"STATUS_CODE_{status}"
                    get = found.get
                    v: str | None
                    seconds = (span.end_time_unix_nano - span.start_time_unix_nano) * _NS
                    if seconds < 0.0:
                        seconds = 0.0  # a clock step in the app: counted, at zero duration
                    for kinds, when_any, groups, aggs in compiled:
                        if kinds is not None and kind not in kinds:
                            continue
                        if when_any and found.keys().isdisjoint(when_any):
                            continue
                        values: list[str | None] = []
                        for first, rest, default in groups:
                            v = get(first)
                            if v is None:
                                for name in rest:
                                    v = get(name)
                                    if v is not None:
                                        break
                                else:
                                    v = default
                            values.append(v)
                        for agg_id, indices in aggs:
                            picked = values if indices is None else [values[i] for i in indices]
                            key = (agg_id, resource, *picked)
                            s = series_get(key)
                            if s is None:
                                s = self._new_series(key, agg_id, resource, picked, now_ns)
                            s.values.append(seconds)
                            if len(s.values) >= fold_at:
                                self._fold((s,))
        return spans_seen

    def _new_series(
        self, key: tuple[Any, ...], agg_id: int, resource: Resource, picked: list[str | None], now_ns: int
    ) -> _Series:
        series = self.series
        plan, agg = self._aggregations[agg_id]
        if len(series) >= self._max_series:
            self.overflow_spans += 1
            over_key = (agg_id, resource, OVERFLOW_LABEL)
            s = series.get(over_key)
            if s is None:  # the overflow series are not counted against the cap
                s = series[over_key] = _Series(agg, ((OVERFLOW_LABEL, "true"),), resource, now_ns)
            return s
        groups = plan.groups if agg.indices is None else [plan.groups[i] for i in agg.indices]
        labels = tuple(
            sorted((g.label, v) for g, v in zip(groups, picked, strict=True) if v is not None and v != "")
        )
        s = series[key] = _Series(agg, labels, resource, now_ns)
        return s

    # -- folding ----------------------------------------------------------------------------------------
    def _fold(self, batch: Sequence[_Series]) -> None:
        """Bucket the raw durations of ``batch`` (every series in it holds some) in one numpy pass."""
        if not batch:
            return
        lengths = np.fromiter((len(s.values) for s in batch), dtype=np.int64, count=len(batch))
        values = np.frombuffer(b"".join(s.values for s in batch), dtype=np.float64)
        offsets = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if self._bounds is None:
            hists = exphist.from_segments(values, None, offsets, max_buckets=self._max_size)
            for s, h in zip(batch, hists, strict=True):
                s.hist = h if s.hist is None else exphist.merge(s.hist, h, max_buckets=self._max_size)
        else:
            width = len(self._bounds) + 1
            # Bucket i holds (bounds[i-1], bounds[i]]: searchsorted's left side puts a value equal to a
            # bound into that bound's bucket.
            index = np.searchsorted(self._bounds_array, values, side="left")
            owner = np.repeat(np.arange(len(batch), dtype=np.int64), lengths)
            counts = np.bincount(owner * width + index, minlength=len(batch) * width).reshape(-1, width)
            starts = offsets[:-1]
            sums = np.add.reduceat(values, starts)
            mins = np.minimum.reduceat(values, starts)
            maxs = np.maximum.reduceat(values, starts)
            for i, s in enumerate(batch):
                s.counts = counts[i].copy() if s.counts is None else s.counts + counts[i]
                s.sum += float(sums[i])
                s.min = min(s.min, float(mins[i]))
                s.max = max(s.max, float(maxs[i]))
        for s, n in zip(batch, lengths.tolist(), strict=True):
            s.folded += n
            s.values = array("d")

    # -- output -----------------------------------------------------------------------------------------
    def flush(self, now_ns: int) -> list[Point]:
        """The points of every series with spans (delta: since the last :meth:`sent`; cumulative: since
        it began). Until :meth:`sent` or :meth:`refused` is called, spans added are held apart (not
        folded), so what the points hold is exactly what ``sent`` forgets."""
        series = self.series
        self._fold([s for s in series.values() if s.values])
        self._fold_at = _NEVER
        delta = self._temporality is Temporality.DELTA
        start_ns = self._interval_start_ns
        points: list[Point] = []
        for s in series.values():
            if s.folded:
                points.extend(self._points(s, start_ns if delta else s.start_ns, now_ns))
        self._flush_ns = now_ns
        return points

    def sent(self) -> None:
        """The last flush's points were handed on. Delta: forget what they held, and the series that
        had no spans in the interval. Cumulative: forget the series without spans for longer than the
        expiration (if one is set); one that comes back starts again from zero, with a new start time."""
        self._fold_at = FOLD_AT
        if self._temporality is not Temporality.DELTA:
            self._expire()
            return
        idle = []
        for key, s in self.series.items():
            if not s.folded and not s.values:
                idle.append(key)
            s.folded = 0
            s.hist = None
            s.counts = None
            s.sum = 0.0
            s.min = math.inf
            s.max = -math.inf
        for key in idle:
            del self.series[key]
        self._interval_start_ns = self._flush_ns

    def _expire(self) -> None:
        now_ns = self._flush_ns
        expiration_ns = self._expiration_ns
        expired = []
        for key, s in self.series.items():
            if s.folded != s.seen_folded:
                s.seen_folded = s.folded
                s.seen_ns = now_ns
            elif expiration_ns and now_ns - s.seen_ns > expiration_ns and not s.values:
                expired.append(key)
        for key in expired:
            del self.series[key]

    def refused(self) -> None:
        """The last flush's points were refused downstream: everything stays, for the next flush (delta:
        which then covers both intervals)."""
        self._fold_at = FOLD_AT

    @property
    def interval_start_ns(self) -> int:
        return self._interval_start_ns

    def _points(self, s: _Series, start_ns: int, now_ns: int) -> list[Point]:
        agg = s.agg
        out: list[Point] = []
        temporality = self._temporality
        if agg.calls is not None:
            key = s.calls_key
            if key is None:
                key = s.calls_key = series_key(agg.calls, Kind.SUM, s.labels, s.resource, None)
            calls = new_point(
                agg.calls, Kind.SUM, s.labels, now_ns, float(s.folded), start_ns, temporality, True,
                None, "1", "", s.resource, None, None, None, key,
            )  # fmt: skip
            out.append(calls)
        if agg.duration is not None:
            key = s.duration_key
            if key is None:
                key = s.duration_key = series_key(agg.duration, Kind.HISTOGRAM, s.labels, s.resource, None)
            explicit = None
            if s.counts is not None and self._bounds is not None:
                counts = tuple(int(c) for c in s.counts.tolist())
                explicit = ExplicitHistogram(self._bounds, counts, s.sum, s.min, s.max)
            duration = new_point(
                agg.duration, Kind.HISTOGRAM, s.labels, now_ns, 0.0, start_ns, temporality, True,
                s.hist, "s", "", s.resource, None, explicit, None, key,
            )  # fmt: skip
            out.append(duration)
        return out
