"""Events to metrics: the ``routes`` and ``mappings`` of the ``http`` receiver, and the mapping the
``logmetrics`` connector applies to log records (here in agent/ because both use it).

Apps that already post JSON events (one per request, a list, or named arrays in an envelope) get
counters, gauges and histograms out of them without changing the client. A **mapping** says which
metrics one event makes; a **route** binds an HTTP path to a mapping::

    receivers:
      http:
        endpoint: 127.0.0.1:8080
        routes:
          - {path: /api/metrics/commands, mapping: commands}
          - path: /api/metrics/batch
            envelope: {command_executions: commands}
          - {path: /metrics, format: metrics, metadata_labels: [model_version]}
        mappings:
          commands:
            labels: [command_name, status]
            timestamp: {field: timestamp, format: auto}
            metrics:
              - {name: command_executions_total, type: counter}
              - name: command_execution_duration_seconds
                type: histogram
                field: execution_time_ms
                unit: ms
                labels: [command_name]

Mappings
--------
Each metric of a mapping is a ``counter`` (+1 per event, or + the value of ``field``, which must not
be negative), a ``gauge`` (the value of ``field``; the latest event's wins) or a ``histogram`` (every
event's ``field`` value is one observation of an exponential histogram, built like the JSON
histograms: ``max_buckets`` / ``max_scale``). ``unit`` is the unit of the field: ``ns``, ``us``,
``ms``, ``s``, ``min``, ``h`` and ``d`` are converted to seconds (the point's unit is ``s``); any other
UCUM unit (``By``, ``1``, ``{token}``) is passed on as the point's unit, the value unchanged.

Fields are named by path: ``context.session_id`` is the ``session_id`` of the object ``context``.
**Labels are an allow-list**: only the fields listed in the mapping's ``labels`` (or a metric's own
``labels``, which replace them for that metric) become labels, named after the path with ``.`` as
``_`` unless ``label_names`` renames them; a field such as ``user_id`` or ``request_id`` never becomes
a label unless listed. A label field that is absent or ``null`` in an event is left off its series;
a string, number or boolean is its value (``true``/``false``); an object or list refuses the event.
A metric's ``static_labels`` add fixed labels (``agent_tokens_total`` from ``input_tokens`` with
``{direction: input}`` and from ``output_tokens`` with ``{direction: output}``: two metrics of one
name, which must then share type and unit).

``timestamp.field`` holds the event's time (absent or ``null``: the time the request arrived) in
``timestamp.format``: ``auto`` (RFC 3339 text, or a number read as epoch seconds below 1e11 and epoch
milliseconds from there up, as for ``/v1/metrics``), ``rfc3339``, ``epoch_s``, ``epoch_ms``,
``epoch_us`` or ``epoch_ns``; it must lie within the receiver's ``max_timestamp_age`` and
``max_timestamp_ahead``.

The events of one request are aggregated per series, as the Collector's ``signaltometrics``
connector does for a batch: one delta counter point with the sum of the increments, one gauge point
with the latest value, one histogram of all the observations, each stamped with the latest event
time of its series.

Routes
------
``mapping``: the body is one event object or a list of them. ``envelope``: the body is an object of
named arrays, each through its own mapping (``{"command_executions": [...], "agent_interactions":
[...]}``); an array not named in the envelope refuses the request (``unknown_field``), one that is
absent is fine. ``format: metrics``: the body is metric objects in the ``/v1/metrics`` shape
(``agent/json_items.py``; ``name`` or ``metric_name``, ``value``, ``tags``...) plus an optional
``metadata`` object whose keys become labels only where listed in ``metadata_labels``.

Every event stands alone: a bad one is refused with its ``index`` (and its ``array`` in an envelope),
a ``code`` and a ``reason``, and the others still go through. The answer of a route is the one of
``/v1/metrics`` plus ``"status"``: ``"success"`` (all accepted), ``"partial"`` (some refused) or
``"error"`` (none accepted, or the request refused whole). Event reason codes: ``invalid_item`` (not
an object), ``invalid_value`` (the field of a metric is missing, not a finite number, or a list),
``negative_counter``, ``invalid_timestamp``, ``timestamp_out_of_range``, ``invalid_labels``,
``label_value_too_long``, ``series_too_large``. ``max_items`` bounds the events of a request, all
arrays of an envelope together.

:class:`EventMapper` takes decoded events (dicts) and is what a logs → metrics connector reuses on
OTLP log record bodies and attributes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from agent import exphist
from agent.json_items import (
    MAX_DESCRIPTION_CHARS,
    MAX_UNIT_CHARS,
    Parsed,
    Refusal,
    _describe,
    _Refused,
    _timestamp_ns,
    _utf8_len,
    decode_body,
    quote,
)
from agent.limits import LABEL_VALUE_TOO_LONG, SERIES_TOO_LARGE, SeriesLimits, find_control
from agent.model import Kind, Labels, Point, Temporality

TIME_UNITS_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
"""Field units converted to seconds (the point's unit is then ``s``)."""
_MAX_CACHED = 4096
"""Entries of each of a mapper's caches (labels by series, seconds by time prefix) before it is cleared."""
_EPOCH_SCALE_NS = {"epoch_s": 10**9, "epoch_ms": 10**6, "epoch_us": 10**3, "epoch_ns": 1}

MetricType = Literal["counter", "gauge", "histogram"]
TimestampFormat = Literal["auto", "rfc3339", "epoch_s", "epoch_ms", "epoch_us", "epoch_ns"]


@dataclass(frozen=True)
class EventTimestampConfig:
    field: str = "timestamp"
    """Field path of the event's time; absent or null in an event (or "" here): when it arrived."""
    format: TimestampFormat = "auto"
    """auto (RFC 3339 or epoch s below 1e11 / ms above), rfc3339, epoch_s, epoch_ms, epoch_us, epoch_ns."""


@dataclass(frozen=True)
class EventMetricConfig:
    name: str
    """Metric name (command_execution_duration_seconds)."""
    type: MetricType = "counter"
    """counter (+1 per event, or + field), gauge (field; latest wins) or histogram (field observations)."""
    labels: list[str] | None = None
    """Field paths whose values become this metric's labels (unset: the mapping's labels)."""
    static_labels: dict[str, str] = dataclasses.field(default_factory=dict)
    """Labels with a fixed value on this metric ({direction: input})."""
    field: str = ""
    """Field path of the value (a finite number); required for gauge and histogram."""
    unit: str = ""
    """Unit of the field: ns, us, ms, s, min, h, d become seconds; any other UCUM unit passes as is."""
    optional: bool = False
    """An event without the field skips this metric instead of being refused (invalid_value)."""
    description: str = ""
    """The metric's description (OTLP description, Prometheus HELP)."""


@dataclass(frozen=True)
class EventMappingConfig:
    metrics: list[EventMetricConfig] = dataclasses.field(default_factory=list)
    """The metrics each event makes (at least one)."""
    labels: list[str] = dataclasses.field(default_factory=list)
    """Allow-list of field paths that become labels (nested: context.session_id); others never do."""
    label_names: dict[str, str] = dataclasses.field(default_factory=dict)
    """Label name of a field path (default: the path with . as _)."""
    timestamp: EventTimestampConfig = dataclasses.field(default_factory=EventTimestampConfig)
    """Where the event's time is, and its format."""

    def validate(self, limits: SeriesLimits | None = None) -> list[tuple[str, str]]:
        limits = limits if limits is not None else SeriesLimits()
        problems: list[tuple[str, str]] = []
        if not self.metrics:
            problems.append(("metrics", "a mapping needs at least one metric"))
        for i, m in enumerate(self.metrics):
            where = f"metrics::{i}"
            problem = _name_problem(m.name, limits.max_name_length)
            if problem:
                problems.append((f"{where}::name", problem))
            if m.type != "counter" and not m.field:
                problems.append((f"{where}::field", f"a {m.type} needs the field holding its value"))
            if m.optional and not m.field:
                problems.append((f"{where}::optional", "only a metric with a field can be optional"))
            if not m.unit.isascii() or len(m.unit) > MAX_UNIT_CHARS or find_control(m.unit):
                problems.append((f"{where}::unit", "must be ASCII (µs: write us), at most 63 characters"))
            if len(m.description) > MAX_DESCRIPTION_CHARS:
                problems.append((f"{where}::description", "longer than 1023 characters"))
            problems += [(f"{where}::field", p) for p in _path_problems(m.field)]
            for j, path in enumerate(m.labels or ()):
                problems += [(f"{where}::labels::{j}", p) for p in _path_problems(path, required=True)]
            problems += self._names_problems(f"{where}::labels", m.labels or (), limits)
            own = [self.label_name(p) for p in (self.labels if m.labels is None else m.labels)]
            for name, value in m.static_labels.items():
                problem = _name_problem(name, limits.max_label_name_length, "label name")
                if problem or name in own:
                    problems.append(
                        (f"{where}::static_labels::{name}", problem or "is also a label from a field")
                    )
                if _utf8_len(value) > limits.max_label_value_length:
                    problems.append((f"{where}::static_labels::{name}", "longer than max_label_value_length"))
            first = next(o for o in self.metrics if o.name == m.name)
            if (first.type, first.unit) != (m.type, m.unit):
                problems.append((f"{where}::name", f"{m.name} is also a metric of another type or unit"))
            if m.labels is not None and len(m.labels) > limits.max_labels:
                problems.append((f"{where}::labels", f"more than limits::max_labels ({limits.max_labels})"))
        for j, path in enumerate(self.labels):
            problems += [(f"labels::{j}", p) for p in _path_problems(path, required=True)]
        problems += self._names_problems("labels", self.labels, limits)
        if len(self.labels) > limits.max_labels:
            problems.append(("labels", f"more than limits::max_labels ({limits.max_labels})"))
        listed = set(self.labels) | {p for m in self.metrics for p in m.labels or ()}
        for path, name in self.label_names.items():
            if path not in listed:
                problems.append((f"label_names::{path}", "renames a field that no labels list names"))
            problem = _name_problem(name, limits.max_label_name_length, "label name")
            if problem:
                problems.append((f"label_names::{path}", problem))
        problems += [("timestamp::field", p) for p in _path_problems(self.timestamp.field)]
        return problems

    def _names_problems(
        self, where: str, paths: Sequence[str], limits: SeriesLimits
    ) -> list[tuple[str, str]]:
        """Problems of the label names that the field ``paths`` give."""
        names = [self.label_name(p) for p in paths]
        problems = [
            (where, problem)
            for problem in (_name_problem(n, limits.max_label_name_length, "label name") for n in names)
            if problem
        ]
        if len(set(names)) < len(names):
            problems.append((where, f"two fields give the same label name: {sorted(names)}"))
        return problems

    def label_name(self, path: str) -> str:
        return self.label_names.get(path) or path.replace(".", "_")


@dataclass(frozen=True)
class EventRouteConfig:
    path: str
    """HTTP path served with POST (/api/metrics/commands)."""
    mapping: str = ""
    """Name of the mapping (in mappings) for a body of one event or a list of events."""
    envelope: dict[str, str] = dataclasses.field(default_factory=dict)
    """For a body of named arrays: array name → mapping name ({command_executions: commands})."""
    format: Literal["events", "metrics"] = "events"
    """events (through mapping or envelope) or metrics (the /v1/metrics objects plus metadata)."""
    metadata_labels: list[str] = dataclasses.field(default_factory=list)
    """With format metrics: the metadata keys that become labels (the others are accepted, dropped)."""


def _name_problem(name: str, max_bytes: int, what: str = "name") -> str:
    if not name:
        return f"the {what} must not be empty"
    if find_control(name):
        return f"the {what} {quote(name)} holds a control character"
    if _utf8_len(name) > max_bytes:
        return f"the {what} is longer than {max_bytes} bytes (limits)"
    return ""


def _path_problems(path: str, required: bool = False) -> list[str]:
    if not path:
        return ["a field path must not be empty"] if required else []
    if any(not part for part in path.split(".")):
        return [f"{quote(path)} is not a field path (names joined by ., like context.session_id)"]
    return []


def route_problems(
    routes: Sequence[EventRouteConfig], mappings: Mapping[str, EventMappingConfig], limits: SeriesLimits
) -> list[tuple[str, str]]:
    """Problems of the receiver's ``routes`` and ``mappings`` settings, each with its path."""
    problems: list[tuple[str, str]] = []
    for name, mapping in mappings.items():
        problems += [(f"mappings::{name}::{p}", m) for p, m in mapping.validate(limits)]
    seen: set[str] = set()
    for i, route in enumerate(routes):
        where = f"routes::{i}"
        if not route.path.startswith("/") or any(c in route.path for c in "{}?#"):
            problems.append((f"{where}::path", f"{quote(route.path)} must be a path like /api/events"))
        elif route.path in seen or route.path in ("/v1/metrics", "/healthz"):
            problems.append((f"{where}::path", f"{route.path} is served twice"))
        seen.add(route.path)
        if route.format == "metrics":
            if route.mapping or route.envelope:
                problems.append((where, "format metrics takes neither mapping nor envelope"))
            continue
        if route.metadata_labels:
            problems.append((f"{where}::metadata_labels", "only for format: metrics"))
        if bool(route.mapping) == bool(route.envelope):
            problems.append((where, "give either mapping (events or a list) or envelope (named arrays)"))
        names = [("mapping", route.mapping)] if route.mapping else []
        names += [(f"envelope::{k}", v) for k, v in route.envelope.items()]
        for key, name in names:
            if name not in mappings:
                known = ", ".join(sorted(mappings)) or "none defined"
                problems.append((f"{where}::{key}", f"no mapping named {quote(name)} (mappings: {known})"))
    return problems


# -- the mapper ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class EventsParsed(Parsed):
    accepted: int = 0
    """Events accepted (``points`` are per series, so fewer)."""


def _getter(path: str) -> Callable[[dict[str, Any]], Any]:
    parts = path.split(".")
    if len(parts) == 1:
        key = parts[0]
        return lambda ev: ev.get(key)

    def get(ev: dict[str, Any]) -> Any:
        v: Any = ev
        for part in parts:
            if type(v) is not dict:
                return None
            v = v.get(part)
        return v

    return get


@dataclass(frozen=True, slots=True)
class _Metric:
    name: str
    kind: Kind
    get: Callable[[dict[str, Any]], Any] | None
    field: str
    scale: float
    unit: str
    description: str
    optional: bool
    names: tuple[str, ...]
    """Label names, sorted; pick takes their values from the event's label values in this order."""
    static: Labels
    """The static labels."""
    pick: Callable[[tuple[str | None, ...]], tuple[str | None, ...]]
    fixed_bytes: int
    """Bytes of the name, the label names and the static labels (the series-size check adds the values)."""
    check_size: bool
    """Whether label values of the longest length allowed could take the series over max_series_bytes."""


def _picker(indices: list[int], n: int) -> Callable[[tuple[str | None, ...]], tuple[str | None, ...]]:
    if indices == list(range(n)):
        return lambda vals: vals
    if len(indices) == 1:
        i = indices[0]
        return lambda vals: (vals[i],)
    if not indices:
        return lambda vals: ()
    get = operator.itemgetter(*indices)
    return lambda vals: get(vals)


class EventMapper:
    """Turns decoded events (dicts) into points through one mapping; one refusal per bad event.

    :meth:`map` takes a whole batch at once (a request, an envelope array, a logs batch) and returns
    the accepted events' points aggregated per series, plus ``{"index", "code", "reason"}`` per refused
    event. Stateless between calls, so one mapper serves concurrent requests."""

    def __init__(
        self,
        mapping: EventMappingConfig,
        *,
        max_timestamp_age_s: float,
        max_timestamp_ahead_s: float,
        max_buckets: int,
        max_scale: int = exphist.MAX_SCALE,
        limits: SeriesLimits | None = None,
    ) -> None:
        self._age_s = max_timestamp_age_s
        self._ahead_s = max_timestamp_ahead_s
        self._max_buckets = max_buckets
        self._max_scale = max_scale
        self._limits = limits if limits is not None else SeriesLimits()
        # Every label field of the mapping, read once per event whichever metrics use it.
        paths: list[str] = list(mapping.labels)
        for m in mapping.metrics:
            paths += [p for p in m.labels or () if p not in paths]
        self._label_paths = tuple(paths)
        self._label_gets = tuple(_getter(p) for p in paths)
        self._label_keys = tuple(paths) if all("." not in p for p in paths) else None
        """The label fields when all are top-level: read with dict.get, no getter call (hot path)."""
        metrics = []
        for m in mapping.metrics:
            own = list(mapping.labels if m.labels is None else m.labels)
            named = sorted((mapping.label_name(p), paths.index(p)) for p in own)
            kind = {"counter": Kind.SUM, "gauge": Kind.GAUGE, "histogram": Kind.HISTOGRAM}[m.type]
            scale = TIME_UNITS_S.get(m.unit, 1.0)
            metrics.append(
                _Metric(
                    name=m.name,
                    kind=kind,
                    get=_getter(m.field) if m.field else None,
                    field=m.field,
                    scale=scale,
                    unit="s" if m.unit in TIME_UNITS_S else m.unit,
                    description=m.description,
                    optional=m.optional,
                    names=tuple(n for n, _ in named),
                    static=tuple(sorted(m.static_labels.items())),
                    pick=_picker([i for _, i in named], len(paths)),
                    fixed_bytes=len(m.name.encode())
                    + sum(len(n.encode()) for n, _ in named)
                    + sum(len(k.encode()) + len(v.encode()) for k, v in m.static_labels.items()),
                    check_size=False,
                )
            )
        lim = self._limits
        self._metrics = tuple(
            dataclasses.replace(
                m,
                check_size=m.fixed_bytes + len(m.names) * lim.max_label_value_length > lim.max_series_bytes,
            )
            for m in metrics
        )
        self._fast_len = min(256, lim.max_label_value_length)
        """Strings this short (in characters, ASCII) are label values without further checks."""
        ts = mapping.timestamp
        self._ts_get = _getter(ts.field) if ts.field else None
        self._ts_field = ts.field
        self._ts_format = ts.format
        # Bounded caches shared by the batches (dict operations are atomic, so a body parsed in a
        # worker thread may use them too): series → labels, and an RFC 3339 time's first 19
        # characters (up to the seconds) → epoch seconds, since most events of a batch share them.
        self._labels_of: dict[tuple[int, tuple[str | None, ...]], Labels] = {}
        self._seconds_of: dict[str, int] = {}

    # The hot loop: one pass over the events, label values read once per event, a dict lookup per
    # (metric, label values); an event is refused whole, before any of its values is kept.
    def map(self, events: Sequence[Any], now_ns: int) -> EventsParsed:
        low = now_ns - int(self._age_s * 1e9)
        high = now_ns + int(self._ahead_s * 1e9)
        errors: list[dict[str, Any]] = []
        refused: collections.Counter[str] = collections.Counter()
        sums: dict[tuple[int, tuple[str | None, ...]], float] = {}
        gauges: dict[tuple[int, tuple[str | None, ...]], tuple[int, float]] = {}
        observations: dict[tuple[int, tuple[str | None, ...]], list[float]] = {}
        latest: dict[tuple[int, tuple[str | None, ...]], int] = {}
        metrics = tuple(enumerate(self._metrics))
        label_gets = self._label_gets
        label_keys = self._label_keys
        fast_len = self._fast_len
        ts_get = self._ts_get
        label_value = self._label_value
        max_series = self._limits.max_series_bytes
        isfinite = math.isfinite
        for index, ev in enumerate(events):
            try:
                if type(ev) is not dict:
                    raise _Refused("invalid_item", f"must be an event object, got {_describe(ev)}")
                t_ns = now_ns
                if ts_get is not None:
                    raw_ts = ts_get(ev)
                    if raw_ts is not None:
                        t_ns = self._timestamp(raw_ts, now_ns, low, high)
                raw_vals = (
                    [ev.get(k) for k in label_keys]
                    if label_keys is not None
                    else [get(ev) for get in label_gets]
                )
                # Short ASCII strings are the common case and are their own label values.
                for v in raw_vals:
                    if not (type(v) is str and len(v) <= fast_len and v.isascii()):
                        vals = tuple([label_value(i, v) for i, v in enumerate(raw_vals)])
                        break
                else:
                    vals = tuple(raw_vals)
                taken: list[tuple[int, _Metric, tuple[str | None, ...], float]] = []
                for mi, m in metrics:
                    if m.get is None:
                        value = 1.0
                    else:
                        raw = m.get(ev)
                        if (type(raw) is int or type(raw) is float) and isfinite(raw):
                            value = raw * m.scale
                        elif raw is None and m.optional:
                            continue
                        else:
                            got = "it is missing" if raw is None else f"got {_describe(raw)}"
                            raise _Refused("invalid_value", f"{m.field}: must be a finite number, {got}")
                        if m.kind is Kind.SUM and value < 0:
                            raise _Refused(
                                "negative_counter",
                                f"{m.field}: counts up by its value, and {raw!r} is negative",
                            )
                    picked = m.pick(vals)
                    if (
                        m.check_size
                        and m.fixed_bytes + sum(len(v.encode()) for v in picked if v is not None) > max_series
                    ):
                        raise _Refused(
                            SERIES_TOO_LARGE,
                            f"{m.name}: the name and labels come to more than {max_series} bytes "
                            "(limits::max_series_bytes)",
                        )
                    taken.append((mi, m, picked, value))
            except _Refused as exc:
                errors.append({"index": index, "code": exc.code, "reason": exc.reason})
                refused[exc.code] += 1
                continue
            for mi, m, picked, value in taken:
                key = (mi, picked)
                if m.kind is Kind.SUM:
                    sums[key] = sums.get(key, 0.0) + value
                elif m.kind is Kind.HISTOGRAM:
                    obs = observations.get(key)
                    if obs is None:
                        observations[key] = [value]
                    else:
                        obs.append(value)
                elif key not in gauges or gauges[key][0] <= t_ns:
                    gauges[key] = (t_ns, value)
                if latest.get(key, -1) < t_ns:
                    latest[key] = t_ns
        points = self._points(sums, gauges, observations, latest)
        return EventsParsed(points, errors, refused, len(events) - len(errors))

    def _points(
        self,
        sums: dict[tuple[int, tuple[str | None, ...]], float],
        gauges: dict[tuple[int, tuple[str | None, ...]], tuple[int, float]],
        observations: dict[tuple[int, tuple[str | None, ...]], list[float]],
        latest: dict[tuple[int, tuple[str | None, ...]], int],
    ) -> list[Point]:
        metrics = self._metrics
        points: list[Point] = []
        for (mi, vals), total in sums.items():
            m = metrics[mi]
            points.append(
                Point(
                    m.name,
                    Kind.SUM,
                    self._labels(mi, m, vals),
                    latest[mi, vals],
                    total,
                    temporality=Temporality.DELTA,
                    monotonic=True,
                    unit=m.unit,
                    description=m.description,
                )
            )
        for (mi, vals), (t_ns, value) in gauges.items():
            m = metrics[mi]
            points.append(
                Point(
                    m.name,
                    Kind.GAUGE,
                    self._labels(mi, m, vals),
                    t_ns,
                    value,
                    unit=m.unit,
                    description=m.description,
                )
            )
        if observations:
            # Every histogram of the batch in one numpy pass (per batch, not per point).
            offsets = [0]
            flat: list[float] = []
            for obs in observations.values():
                flat += obs
                offsets.append(len(flat))
            hists = exphist.from_segments(
                np.array(flat, dtype=np.float64),
                None,
                np.array(offsets, dtype=np.int64),
                max_buckets=self._max_buckets,
                max_scale=self._max_scale,
            )
            for ((mi, vals), _), hist in zip(observations.items(), hists, strict=True):
                m = metrics[mi]
                points.append(
                    Point(
                        m.name,
                        Kind.HISTOGRAM,
                        self._labels(mi, m, vals),
                        latest[mi, vals],
                        histogram=hist,
                        unit=m.unit,
                        description=m.description,
                    )
                )
        return points

    def _label_value(self, i: int, v: Any) -> str | None:
        if v is None:
            return None
        path = self._label_paths[i]
        if type(v) is bool:
            return "true" if v else "false"
        if type(v) is int or (type(v) is float and math.isfinite(v)):
            return str(v)
        if not isinstance(v, str):  # a str subclass too: an OTLP attribute (agent.model.TypedValue)
            raise _Refused(
                "invalid_labels",
                f"{path}: a label takes a string, number or boolean, got {_describe(v)}",
            )
        n = _utf8_len(v)
        if n < 0:
            raise _Refused("invalid_labels", f"{path}: holds an unpaired UTF-16 surrogate escape")
        limit = self._limits.max_label_value_length
        if n > limit:
            raise _Refused(
                LABEL_VALUE_TOO_LONG,
                f"{path}: is {n} bytes long; the limit is {limit} (limits::max_label_value_length)",
            )
        return v

    def _labels(self, mi: int, m: _Metric, vals: tuple[str | None, ...]) -> Labels:
        cache = self._labels_of
        labels = cache.get((mi, vals))
        if labels is None:
            if len(cache) >= _MAX_CACHED:
                cache.clear()
            labels = cache[mi, vals] = _labels(m, vals)
        return labels

    def _timestamp(self, raw: Any, now_ns: int, low: int, high: int) -> int:
        fmt = self._ts_format
        field = self._ts_field
        # RFC 3339 in UTC ("2024-05-01T12:00:00Z", ".250Z"): the seconds from the cache, when a time
        # with the same first 19 characters was read in full before; the fraction is digits only.
        if type(raw) is str and fmt in ("auto", "rfc3339") and len(raw) >= 20 and raw[-1] == "Z":
            seconds = self._seconds_of.get(raw[:19])
            frac = raw[20:-1]
            if seconds is not None and (
                len(raw) == 20
                or (raw[19] == "." and 0 < len(frac) <= 9 and frac.isdigit() and frac.isascii())
            ):
                t_ns = seconds * 10**9 + (int(frac.ljust(9, "0")) if frac else 0)
                if low <= t_ns <= high:
                    return t_ns
        if fmt == "auto":
            try:
                t_ns, _ = _timestamp_ns(raw)
            except _Refused as exc:
                raise _Refused(exc.code, exc.reason.replace("timestamp:", f"{field}:", 1)) from None
        elif fmt == "rfc3339":
            if type(raw) is not str:
                raise _Refused("invalid_timestamp", f"{field}: must be RFC 3339 text, got {_describe(raw)}")
            try:
                t_ns, _ = _timestamp_ns(raw)
            except _Refused as exc:
                raise _Refused(exc.code, exc.reason.replace("timestamp:", f"{field}:", 1)) from None
        else:
            if not ((type(raw) is int or type(raw) is float) and math.isfinite(raw)):
                raise _Refused(
                    "invalid_timestamp", f"{field}: must be a number ({fmt}), got {_describe(raw)}"
                )
            scale = _EPOCH_SCALE_NS[fmt]
            t_ns = raw * scale if type(raw) is int else round(raw * scale)
        if type(raw) is str and len(raw) >= 20 and raw[-1] == "Z" and raw[19] in ".Z":
            if len(self._seconds_of) >= _MAX_CACHED:
                self._seconds_of.clear()
            self._seconds_of[raw[:19]] = t_ns // 10**9
        if not low <= t_ns <= high:
            shown = quote(raw) if isinstance(raw, str) else repr(raw)
            ahead = t_ns > now_ns
            raise _Refused(
                "timestamp_out_of_range",
                f"{field}: {shown} is {abs(t_ns - now_ns) / 1e9:.0f} s "
                f"{'ahead of the agent clock' if ahead else 'in the past'}; accepted: from "
                f"{self._age_s:.0f} s before to {self._ahead_s:.0f} s after now",
            )
        return int(t_ns)


def _labels(m: _Metric, vals: tuple[str | None, ...]) -> Labels:
    """The sorted labels of one series of ``m`` (once per series, not per event)."""
    labels = tuple((n, v) for n, v in zip(m.names, vals, strict=True) if v is not None)
    return tuple(sorted(labels + m.static)) if m.static else labels


# -- routes -------------------------------------------------------------------------------------------
class RouteParser:
    """The parse step of one route: decoded JSON body → :class:`Parsed` (points, errors by index)."""

    def __init__(self, route: EventRouteConfig, mappers: Mapping[str, EventMapper], max_items: int) -> None:
        self._mapper = mappers[route.mapping] if route.mapping else None
        self._envelope = {array: mappers[name] for array, name in route.envelope.items()}
        self._max_items = max_items

    def parse_body(self, body: bytes, now_ns: int, max_values: int) -> EventsParsed:
        """The request body (UTF-8 JSON) → points and refusals; raises :class:`Refusal` for the request."""
        items = decode_body(body, self._max_items, max_values)
        if self._mapper is not None:
            return self._mapper.map(items, now_ns)
        # decode_body puts one object in a list: a list body must not pass for an envelope.
        if body.lstrip()[:1] == b"[" or len(items) != 1 or type(items[0]) is not dict:
            known = ", ".join(quote(k) for k in self._envelope)
            raise Refusal(400, "invalid_json", f"the body must be an object of named arrays ({known})")
        doc = items[0]
        total = 0
        for array, events in doc.items():
            if array not in self._envelope:
                known = ", ".join(quote(k) for k in self._envelope)
                raise Refusal(400, "unknown_field", f"unknown array {quote(array)}; known: {known}")
            if type(events) is not list:
                raise Refusal(
                    400, "invalid_json", f"{quote(array)} must be a list of events, got {_describe(events)}"
                )
            total += len(events)
        if total > self._max_items:
            raise Refusal(
                413,
                "too_many_items",
                f"{total} events in one request; the limit is {self._max_items} (max_items): split it",
            )
        out = EventsParsed([], [], collections.Counter())
        for array, events in doc.items():
            part = self._envelope[array].map(events, now_ns)
            out.accepted += part.accepted
            out.points += part.points
            out.errors += [{"array": array, **e} for e in part.errors]
            out.refused.update(part.refused)
        return out


def status_of(accepted: int, rejected: int) -> str:
    """The ``status`` a route answers with: success, partial or error."""
    if rejected == 0:
        return "success"
    return "partial" if accepted else "error"
