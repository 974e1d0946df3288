"""OTLP metrics → the internal model (:class:`agent.model.Point`), built for ingest speed.

Mapping
-------
=========================  ======================================================================
OTLP                       Point
=========================  ======================================================================
Gauge                      ``Kind.GAUGE``, ``monotonic=False``
Sum                        ``Kind.SUM`` with the metric's temporality and ``is_monotonic``
Histogram                  ``Kind.HISTOGRAM`` with ``explicit`` (:class:`ExplicitHistogram`)
ExponentialHistogram       ``Kind.HISTOGRAM`` with ``histogram`` (:class:`ExpHistogram`)
Summary                    ``Kind.SUMMARY`` with ``summary``, always cumulative
=========================  ======================================================================

Integer values become floats (exact up to 2**53). A NaN value is kept as the canonical quiet NaN, so
no NaN payload from the wire can ever become the Prometheus stale marker; ±Inf values are kept. A
point without ``time_unix_nano`` gets the time the request arrived. Unit and description are kept.
Every point of one ``ResourceMetrics`` shares one :class:`Resource` object, every point of one
``ScopeMetrics`` one :class:`Scope`; both are also shared across requests while cached.

A histogram without ``sum`` gets a NaN sum (unknown, not 0). One without ``bucket_counts`` becomes a
single bucket holding ``count`` with no bounds. An exponential histogram's ``zero_threshold`` is
dropped (values in the zero bucket count as zero); without ``min``/``max`` they are bounded from its
outermost non-empty buckets, so quantiles stay clamped to a range that holds every value.

Attributes
----------
Labels are the data point's attributes sorted by key; for a duplicated key the last one wins. Values
that are not strings are rendered as text the way the OpenTelemetry Collector renders them, so that
series keep their identity whichever agent forwards them: bool → ``true``/``false``; int → decimal;
double → shortest positional decimal (``1``, ``0.25``, ``100000000000000000000``; ``NaN``, ``+Inf``,
``-Inf``); bytes → standard base64; array and kvlist → compact JSON (keys sorted, bytes as base64
strings, non-finite doubles as the strings above); an empty value → ``""``. Resource and scope
attributes follow the same rules. A value that is not a string is an :class:`agent.model.TypedValue`
(``IntValue``, ``DoubleValue``, ``BoolValue``, ``BytesValue``; arrays, kvlists and empty values an
``EncodedValue`` keeping the serialized ``AnyValue``): that text, of a class that tells the OTLP
exporters the type it arrived as (types survive OTLP → OTLP; string values cost nothing extra).

Refusals
--------
A point that cannot be taken is refused with a reason (the ``reason`` label of
``receiver_refused_points_total``) and a sentence naming the metric, the data point's index and where
it is (``resource r, scope s, metric m``: indices in the request), which the receiver returns in
``partial_success``; the other points still go through:

``invalid_name`` (empty metric name), ``no_value`` (a number point with neither ``as_int`` nor
``as_double``), ``invalid_temporality`` (a sum or histogram whose aggregation temporality is
unspecified or unknown), ``invalid_histogram`` (bucket counts that do not add up to ``count``, a bucket
count that does not match the bounds, bounds not finite and strictly ascending, a scale outside
[-10, 20], ``min > max``), ``invalid_summary`` (a quantile outside [0, 1] or a NaN quantile value, a
NaN sum), ``invalid_attributes`` (an attribute that is not valid protobuf or UTF-8),
``attributes_too_deep`` (an attribute value nested past the protobuf parser's limit of
:data:`MAX_ATTRIBUTE_DEPTH` messages: at most 33 nested kvlists or 49 nested arrays), ``invalid_unit``
(more than 63 characters), ``invalid_description`` (more than 4,096 characters).

Size limits (``limits:``, :class:`agent.limits.SeriesLimits`) apply to the series each point would
make: its metric name and its own attributes (``name_too_long``, ``too_many_labels``,
``label_name_too_long``, ``label_value_too_long``, ``series_too_large``). The resource and the scope
are not labels of the series (the Prometheus exporters take only ``job``/``instance`` from them, the
OTLP exporters pass them on as they are) and real ones are large (the OpenTelemetry Java agent's
``process.command_line`` and ``process.command_args`` run to tens of KB), so they are bounded on their
own: their attributes, the scope's name and version together within ``max_resource_bytes``
(``resource_too_large``), whatever the count and length of each value; their attribute keys within
``max_label_name_length``. A metric name or attribute key (point, scope or resource) holding a C0
control character (U+0000-U+001F) or DEL is refused as ``control_character``; attribute *values* may
hold them (a tab or newline is legitimate data) and the exporters escape them. Each resource and
scope is checked once, each metric once, each distinct attribute set once while cached: a resource
or scope over a limit refuses all its points with one sentence.

A point flagged ``NO_RECORDED_VALUE`` says "this series has no value now" (a staleness signal from a
target that vanished). The internal model has no staleness marker (exporters expire idle series on
their own), so the point is skipped and counted as refused with reason ``no_recorded_value``; it is
*not* reported in ``partial_success``, because the sender did nothing wrong.

Chunks
------
:meth:`MetricsConverter.chunks` converts a request in lists of at most ``max_points`` points (the
receiver takes huge requests this way), resuming inside a metric when one is larger than a chunk: the
metric's own checks run once, its points in slices. Points, counts and sentences (indices in the
request) are the same as :meth:`MetricsConverter.convert`'s, which is the same walk in one pass.

Why it looks the way it does
----------------------------
Reading attributes through the generated classes costs ~0.6 µs per attribute (a KeyValue and an
AnyValue wrapper each), more than everything else per point together. So requests are parsed with a
*shadow* schema, built at import from the opentelemetry-proto descriptors, in which every
``attributes`` field is ``repeated bytes`` (same wire encoding as a repeated message) and exemplars are
left as unknown fields (never parsed). A point's attributes then arrive as a list of serialized
KeyValues: the tuple of those bytes keys a bounded cache of rendered, sorted label tuples, and only a
cache miss parses KeyValues and checks them against the limits. An attribute set within the limits
is cached when it leaves room in ``max_series_bytes`` for a name of ``max_name_length`` (or, if that
leaves less than half, when it takes at most half): a metric whose name fits in the rest (with the
defaults, every metric) needs no per-point check on a cache hit, and one that does not takes the
checking path for each point. Points are built without the frozen dataclass ``__init__`` (see
``PointSlots``), ~0.45 µs instead of ~1.8 µs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2

from agent.anyvalue import render_value
from agent.exphist import MAX_SCALE, MIN_SCALE, ExpHistogram
from agent.limits import (
    CONTROL_CHARACTER,
    LABEL_NAME_TOO_LONG,
    NAME_TOO_LONG,
    RESOURCE_TOO_LARGE,
    SERIES_TOO_LARGE,
    SeriesLimits,
    find_control,
)
from agent.limits import REASONS as LIMIT_REASONS
from agent.model import (
    BoolValue,
    BytesValue,
    DoubleValue,
    EncodedValue,
    ExplicitHistogram,
    IntValue,
    Kind,
    Labels,
    Point,
    PointSlots,
    Resource,
    Scope,
    SeriesKey,
    Summary,
    Temporality,
    new_point,
    series_key,
)
from receivers.otlp.wire import PROTOBUF_MAX_DEPTH, is_too_deep

__all__ = [
    "MAX_ATTRIBUTE_DEPTH",
    "POINT_REASONS",
    "Converted",
    "MetricsConverter",
    "ShadowMetricsRequest",
    "count_points",
    "labels_from_keyvalues",
    "render_value",
]

POINT_REASONS = (
    "invalid_name",
    "no_value",
    "invalid_temporality",
    "invalid_histogram",
    "invalid_summary",
    "invalid_attributes",
    "attributes_too_deep",
    "invalid_unit",
    "invalid_description",
    CONTROL_CHARACTER,
    *LIMIT_REASONS,
    RESOURCE_TOO_LARGE,
    "no_recorded_value",
)
"""Reasons a single data point is refused (see the module docs)."""
MAX_ATTRIBUTE_DEPTH = PROTOBUF_MAX_DEPTH
"""Deepest nesting of protobuf messages in one KeyValue: the parser's limit. Each kvlist level is 3
messages (AnyValue, KeyValueList, KeyValue) and each array level 2 (AnyValue, ArrayValue)."""
MAX_UNIT_CHARS = 63
"""Longest metric unit (the OpenTelemetry API's limit for instrument units)."""
MAX_DESCRIPTION_CHARS = 4096
"""Longest metric description (the API must support 1,023 characters; we take four times that)."""
_NO_HITS: Callable[[Any], None] = {}.get
"""The cache lookup of a metric whose hits need checking: every point takes ``_point_labels``."""
_TOO_DEEP = (
    f"attributes are nested more than {MAX_ATTRIBUTE_DEPTH} protobuf messages deep (the parser's limit: "
    "at most 33 nested kvlists or 49 nested arrays)"
)

MAX_ERRORS_LISTED = 10
"""Refusal sentences quoted in ``partial_success.error_message``; the rest are summarised as a count."""
_NO_RECORDED_VALUE = 1  # DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
_NAN = math.nan
_TEMPORALITIES = {1: Temporality.DELTA, 2: Temporality.CUMULATIVE}


# -- the shadow schema --------------------------------------------------------------------------------
def _shadow_classes() -> dict[str, Any]:
    files = []
    for module in (common_pb2, resource_pb2, metrics_pb2, metrics_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    with_attributes = {
        "InstrumentationScope",
        "Resource",
        "NumberDataPoint",
        "HistogramDataPoint",
        "ExponentialHistogramDataPoint",
        "SummaryDataPoint",
    }
    for proto in files:
        for message in proto.message_type:
            if message.name not in with_attributes:
                continue
            kept = []
            for f in message.field:
                if f.name == "exemplars":
                    continue  # left as unknown fields: skipped by the parser, never built
                if f.name == "attributes":
                    f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                    f.ClearField("type_name")
                kept.append(f)
            del message.field[:]
            message.field.extend(kept)
    pool = descriptor_pool.DescriptorPool()
    for proto in files:
        pool.Add(proto)
    name = "opentelemetry.proto.collector.metrics.v1.ExportMetricsServiceRequest"
    return {"request": message_factory.GetMessageClass(pool.FindMessageTypeByName(name))}


ShadowMetricsRequest: Any = _shadow_classes()["request"]
"""``ExportMetricsServiceRequest`` with attributes as serialized KeyValues (bytes); parse requests with
``ShadowMetricsRequest.FromString``. Raises ``DecodeError`` like the generated class."""


# -- attributes ---------------------------------------------------------------------------------------
_SCALARS: dict[str | None, Callable[[str], str]] = {
    "int_value": IntValue,
    "double_value": DoubleValue,
    "bool_value": BoolValue,
    "bytes_value": BytesValue,
}
"""Scalar kinds whose text reads back exactly: typed by their class alone (agent.model.TypedValue)."""


def labels_from_keyvalues(kvs: Iterable[common_pb2.KeyValue]) -> Labels:
    """Sorted (key, rendered value) pairs; the last of duplicated keys wins. A value that is not a
    ``string_value`` is an :class:`agent.model.TypedValue` of its kind."""
    out: dict[str, str] = {}
    for kv in kvs:
        v = kv.value
        which = v.WhichOneof("value")
        if which == "string_value":
            out[kv.key] = v.string_value
        else:
            scalar = _SCALARS.get(which)
            text = render_value(v)
            out[kv.key] = scalar(text) if scalar is not None else EncodedValue(text, v.SerializeToString())
    return tuple(sorted(out.items()))


class _Refused(Exception):
    """Attributes (of a point, scope or resource) that cannot be taken: a reason and what is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail


_parse_keyvalue: Callable[[bytes], common_pb2.KeyValue] = common_pb2.KeyValue.FromString


def _labels_from_serialized(key: tuple[bytes, ...]) -> Labels:
    try:
        return labels_from_keyvalues([_parse_keyvalue(b) for b in key])
    except DecodeError as exc:
        if is_too_deep(exc):
            raise _Refused("attributes_too_deep", _TOO_DEEP) from None
        raise _Refused("invalid_attributes", "attributes are not valid KeyValues") from None


def _utf8_len(s: str) -> int:
    # isascii() is O(1) in CPython; protobuf strings are valid UTF-8, so encode() cannot fail.
    return len(s) if s.isascii() else len(s.encode("utf-8"))


class _Cache(dict[Any, Any]):
    """A dict emptied when it reaches ``max_entries`` entries or about ``max_bytes`` bytes of keys and
    values, so neither many small nor a few large attribute sets make it grow without bound. The byte
    count is kept on the side and may drift under a race between threads (it only decides when to
    empty the cache)."""

    __slots__ = ("_bytes", "_max_bytes", "_max_entries")

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        super().__init__()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if len(self) >= self._max_entries or self._bytes + nbytes > self._max_bytes:
            self.clear()
            self._bytes = 0
        self[key] = value
        self._bytes += nbytes


# -- building points ----------------------------------------------------------------------------------
# Points are built without the frozen dataclass __init__ (agent.model.PointSlots / new_point, which also
# guards Point's layout): ~0.5 µs inline in the loops below, ~0.9 µs through new_point, against ~1.8 µs.
# ExplicitHistogram and ExpHistogram get the same treatment here; the import-time check below stops
# either, if its fields changed, from loading this module at all (ExpHistogram's __post_init__ only copies
# arrays that are writable or not float64, and ours never are).
_EXPLICIT_FIELDS = ("bounds", "counts", "sum", "min", "max")
_EXP_FIELDS = (
    "scale",
    "zero_count",
    "positive_offset",
    "positive_counts",
    "negative_offset",
    "negative_counts",
    "count",
    "sum",
    "min",
    "max",
)
for _cls, _fields in (
    (ExplicitHistogram, _EXPLICIT_FIELDS),
    (ExpHistogram, _EXP_FIELDS),
):
    if tuple(_cls.__slots__) != _fields:
        raise RuntimeError(
            f"{_cls.__name__}'s fields changed to {_cls.__slots__}: update the builders in {__name__}"
        )


class _ExplicitBuilder:
    __slots__ = ExplicitHistogram.__slots__


class _ExpBuilder:
    __slots__ = ExpHistogram.__slots__


@dataclass
class Converted:
    """What one request turned into."""

    points: list[Point] = field(default_factory=list)
    rejected: int = 0
    """Points refused for a fault of the sender (reported in ``partial_success``)."""
    refused: dict[str, int] = field(default_factory=dict)
    """Refused points by reason, including the skipped ``no_recorded_value`` ones (for self-metrics)."""
    errors: list[str] = field(default_factory=list)
    """The first :data:`MAX_ERRORS_LISTED` refusal sentences."""
    location: tuple[int, int] = (0, 0)
    """Indices of the resource and scope being converted (for refusal sentences)."""
    metric_index: int = 0
    """Index of the metric being converted within its scope."""
    listed: int = 0
    """Refused points that the listed sentences stand for."""

    def refuse(self, reason: str, n: int, sentence: str, located: bool = True) -> None:
        """Count ``n`` points refused for ``reason``; list ``sentence`` among the first ones, followed
        by the indices in :attr:`location` and :attr:`metric_index` unless ``located`` is false (the
        sentence says where)."""
        self.refused[reason] = self.refused.get(reason, 0) + n
        if reason == "no_recorded_value":
            return
        self.rejected += n
        if len(self.errors) < MAX_ERRORS_LISTED:
            if located:
                r, s = self.location
                sentence = f"{sentence} (resource {r}, scope {s}, metric {self.metric_index})"
            self.errors.append(sentence)
            self.listed += n

    def refuse_rest(self, reason: str, n: int, sentence: str) -> None:
        """Count the ``n`` points left over when a request stops part way (see the receiver) as
        refused for ``reason``; ``sentence`` (which says where) leads the message whatever was
        listed before it."""
        self.refused[reason] = self.refused.get(reason, 0) + n
        self.rejected += n
        self.errors.insert(0, sentence)
        self.listed += n

    @property
    def error_message(self) -> str:
        """The English ``partial_success.error_message``: empty when nothing was rejected."""
        if not self.rejected:
            return ""
        listed = "; ".join(self.errors)
        more = self.rejected - self.listed
        tail = f"; and {more} more data point(s)" if more > 0 else ""
        return f"{self.rejected} data point(s) rejected: {listed}{tail}"


_Known = tuple[Labels, SeriesKey]
"""A known data point's labels and series key (see MetricsConverter._memo_for)."""


class _Rest:
    """The points of one metric still to convert, taken in slices (a metric larger than a chunk)."""

    __slots__ = ("_args", "_data_points", "_first", "_loop")

    def __init__(self, loop: Callable[..., None], args: tuple[Any, ...], data_points: Any) -> None:
        self._loop = loop
        self._args = args
        self._data_points = data_points
        self._first = 0

    def convert(self, room: int) -> _Rest | None:
        """Convert the next ``room`` data points (at least one); self while some remain, else None."""
        first = self._first
        last = min(first + max(room, 1), len(self._data_points))
        self._loop(self._data_points[first:last], first, *self._args)
        self._first = last
        return self if last < len(self._data_points) else None


def _where(metric: str, index: int) -> str:
    return f"metric {json.dumps(metric[:200], ensure_ascii=False)} data point {index}"


def _boundary(index: int, scale: int) -> float:
    try:
        return float(2.0 ** (index * 2.0**-scale))
    except OverflowError:
        return math.inf


def _bucket_range(offset: int, counts: list[int]) -> tuple[int, int] | None:
    """Indices of the lowest and highest non-empty bucket."""
    low = next((i for i, c in enumerate(counts) if c), None)
    if low is None:
        return None
    high = next(i for i in range(len(counts) - 1, -1, -1) if counts[i])
    return offset + low, offset + high


class MetricsConverter:
    """Converts parsed :data:`ShadowMetricsRequest` messages to points. Thread-safe enough to be used
    from a worker thread and the loop at once: the caches are plain dicts whose single operations the
    GIL makes atomic, and a lost race only costs a recomputation.

    ``max_cached`` bounds each cache (distinct attribute sets, resources, scopes) in entries and
    ``max_cached_bytes`` in bytes; a full cache is emptied and refilled, which costs one miss per live
    attribute set. ``limits`` are the size limits every point's series is held to.
    """

    def __init__(
        self,
        max_cached: int = 16384,
        limits: SeriesLimits | None = None,
        max_cached_bytes: int = 16 * 2**20,
    ) -> None:
        self._limits = limits = limits if limits is not None else SeriesLimits()
        self._labels = _Cache(max_cached, max_cached_bytes)
        self._resources = _Cache(max_cached, max_cached_bytes)
        self._scopes = _Cache(max_cached, max_cached_bytes)
        # Point attribute sets are cached up to the bytes a longest name leaves of max_series_bytes (at
        # least half of them), so a metric whose name fits in the rest takes cache hits without
        # checking them: with the defaults, every metric (see the module docs).
        series_bytes = limits.max_series_bytes
        self._cached_bytes = max(series_bytes - limits.max_name_length, series_bytes // 2)
        self._fast_name_bytes = min(limits.max_name_length, series_bytes - self._cached_bytes)
        self._memos: dict[tuple[Resource, Scope], dict[tuple[str, Kind], dict[int, _Known]]] = {}
        """Per resource and scope, then per metric (name, kind): the series key of a data point's labels,
        by the labels tuple's id (the entry holds the tuple, so the id is its own while the entry
        lives; a hit checks it is the same tuple). A known point costs an int lookup beside the labels
        cache's; a memo keyed by the attribute bytes cost ~0.4 µs more a point in cache misses, its
        keys scattered over memory. A metric's memo is one lookup of (name, kind), its resource and
        scope's one identity check (they are the same objects while cached, see _resource)."""
        self._memo_scope: tuple[Resource | None, Scope | None] = (None, None)
        self._memo_metrics: dict[tuple[str, Kind], dict[int, _Known]] = {}
        self._memos_held = 0
        self._max_memos = max_cached * 2

    def _measure(self, labels: Labels) -> int:
        """The UTF-8 bytes of ``labels``; raises _Refused when one label, or the set alone, is over a
        limit or a label name holds a control character."""
        limits = self._limits
        reason = limits.check("", labels)
        if reason is not None:
            raise _Refused(reason, limits.describe(reason))
        for key, _ in labels:
            if find_control(key):
                raise _Refused(
                    CONTROL_CHARACTER,
                    f"the attribute key {json.dumps(key[:100])} holds a control character",
                )
        return sum(_utf8_len(k) + _utf8_len(v) for k, v in labels)

    def _measure_outer(self, labels: Labels) -> int:
        """The UTF-8 bytes of resource or scope attributes; raises _Refused when a key is over
        ``max_label_name_length`` or holds a control character. Their values and their count are
        bounded by ``max_resource_bytes`` alone: they are not series labels."""
        max_key = self._limits.max_label_name_length
        total = 0
        for key, value in labels:
            n = _utf8_len(key)
            if n > max_key:
                raise _Refused(
                    LABEL_NAME_TOO_LONG,
                    f"the attribute key {json.dumps(key[:100])}{'...' if len(key) > 100 else ''} is {n} "
                    "bytes long: " + self._limits.describe(LABEL_NAME_TOO_LONG),
                )
            if find_control(key):
                raise _Refused(
                    CONTROL_CHARACTER,
                    f"the attribute key {json.dumps(key[:100])} holds a control character",
                )
            total += n + _utf8_len(value)
        return total

    def _too_large(self, what: str, nbytes: int) -> _Refused:
        return _Refused(
            RESOURCE_TOO_LARGE, f"{what} {nbytes} bytes: {self._limits.describe(RESOURCE_TOO_LARGE)}"
        )

    def _resource(self, message: Any) -> tuple[Resource, int]:
        """(the resource, its bytes); raises _Refused."""
        key = tuple(message.attributes)
        entry = self._resources.get(key)
        if entry is None:
            labels = _labels_from_serialized(key)
            nbytes = self._measure_outer(labels)
            if nbytes > self._limits.max_resource_bytes:
                raise self._too_large("the resource is", nbytes)
            entry = (Resource(labels), nbytes)
            self._resources.put(key, entry, sum(map(len, key)) + nbytes)
        return entry

    def _scope(self, message: Any) -> tuple[Scope, int]:
        """(the scope, its bytes: name and version included); raises _Refused."""
        key = (message.name, message.version, tuple(message.attributes))
        entry = self._scopes.get(key)
        if entry is None:
            labels = _labels_from_serialized(key[2])
            nbytes = self._measure_outer(labels) + _utf8_len(key[0]) + _utf8_len(key[1])
            if nbytes > self._limits.max_resource_bytes:
                raise self._too_large("the scope is", nbytes)
            entry = (Scope(key[0], key[1], labels), nbytes)
            self._scopes.put(key, entry, sum(map(len, key[2])) + 2 * nbytes)
        return entry

    def convert(self, request: Any, now_ns: int) -> Converted:
        """The points of a :data:`ShadowMetricsRequest`; ``now_ns`` stands in for missing timestamps."""
        out = Converted()
        for _ in self._walk(request, now_ns, out, 0):
            pass  # never suspends: max_points 0 takes the whole request in one pass
        return out

    def chunks(
        self, request: Any, now_ns: int, max_points: int, out: Converted
    ) -> Generator[list[Point], None, None]:
        """The points of ``request`` in lists of at most ``max_points`` (at least 1), in request order,
        each converted only when the previous one has been taken: a huge request costs one list of
        points at a time, not all of them. Refusals accumulate in ``out`` (counts, ``rejected``,
        sentences with the data points' indices in the request) exactly as :meth:`convert` would have
        them once the iterator is exhausted; ``out.points`` stays empty. A request within
        ``max_points`` is converted by the same single pass as :meth:`convert`. Closing the iterator
        early leaves the rest unconverted (and ``out`` without their refusals)."""
        if max_points < 1:
            raise ValueError("max_points must be at least 1")
        for _ in self._walk(request, now_ns, out, max_points):
            chunk, out.points = out.points, []
            yield chunk
        if out.points:
            chunk, out.points = out.points, []
            yield chunk

    def _walk(self, request: Any, now_ns: int, out: Converted, max_points: int) -> Iterator[None]:
        """Convert ``request`` into ``out``, suspending (with ``out.points`` holding ``max_points``
        points) whenever the next point might not fit; never suspends when ``max_points`` is 0."""
        max_resource_bytes = self._limits.max_resource_bytes
        for r, rm in enumerate(request.resource_metrics):
            try:
                resource, r_bytes = self._resource(rm.resource)
            except _Refused as exc:
                n = _count_points(m for sm in rm.scope_metrics for m in sm.metrics)
                out.refuse(exc.reason, n, f"resource {r}: {exc.detail} ({n} data point(s))", False)
                continue
            for s, sm in enumerate(rm.scope_metrics):
                try:
                    scope, s_bytes = self._scope(sm.scope)
                    if r_bytes + s_bytes > max_resource_bytes:
                        raise self._too_large("the resource and this scope are", r_bytes + s_bytes)
                except _Refused as exc:
                    n = _count_points(sm.metrics)
                    out.refuse(
                        exc.reason,
                        n,
                        f"resource {r}, scope {s}: {exc.detail} ({n} data point(s))",
                        False,
                    )
                    continue
                out.location = (r, s)
                for m, metric in enumerate(sm.metrics):
                    out.metric_index = m
                    if not max_points:
                        self._metric(metric, resource, scope, now_ns, out, 0)
                        continue
                    if len(out.points) >= max_points:
                        yield
                    rest = self._metric(metric, resource, scope, now_ns, out, max_points - len(out.points))
                    while rest is not None:  # a metric with more points than the chunk has room for
                        if len(out.points) >= max_points:
                            yield
                        rest = rest.convert(max_points - len(out.points))

    def _metric(
        self,
        metric: Any,
        resource: Resource,
        scope: Scope,
        now_ns: int,
        out: Converted,
        room: int,
    ) -> _Rest | None:
        """Convert the points of ``metric`` into ``out``; when ``room`` is set and the metric has more
        points than that, convert none of them and return a :class:`_Rest` that converts them in
        slices (the metric's own checks are done once, here)."""
        which = metric.WhichOneof("data")
        if which is None:
            return None  # no data, nothing to take or refuse
        data = getattr(metric, which)
        # Read once here and passed on: each read of a protobuf string field builds a new str (~35 ns).
        name, unit, description = metric.name, metric.unit, metric.description
        name_bytes = len(name) if name.isascii() else len(name.encode("utf-8"))
        check_hits = False
        # A name over _fast_name_bytes is checked, and so are its metric's cache hits.
        if (
            name_bytes > self._fast_name_bytes
            or not name
            or not name.isprintable()
            or len(unit) > MAX_UNIT_CHARS
            or len(description) > MAX_DESCRIPTION_CHARS
        ):
            problem = self._metric_problem(metric, name_bytes)
            if problem is not None:
                n = len(data.data_points)
                if n:
                    reason, detail = problem
                    out.refuse(
                        reason,
                        n,
                        f"metric {json.dumps(name[:200], ensure_ascii=False)}: {detail} ({n} data point(s))",
                    )
                return None
            check_hits = name_bytes > self._fast_name_bytes
        # Every point loop takes the same arguments (some ignore a few), so the usual case is one
        # direct call and a metric larger than the room left keeps them for its slices.
        loop: Callable[..., None]
        monotonic = True
        if which == "gauge":
            loop, kind, temporality, monotonic = self._numbers, Kind.GAUGE, Temporality.DELTA, False
        elif which == "summary":
            loop, kind, temporality = self._summaries, Kind.SUMMARY, Temporality.CUMULATIVE
        else:
            found = _TEMPORALITIES.get(data.aggregation_temporality)
            if found is None:
                n = len(data.data_points)
                if n:
                    shown = json.dumps(name[:200], ensure_ascii=False)
                    out.refuse(
                        "invalid_temporality",
                        n,
                        f"metric {shown}: aggregation_temporality {data.aggregation_temporality} is not "
                        f"DELTA (1) or CUMULATIVE (2) ({n} data point(s))",
                    )
                return None
            temporality = found
            if which == "sum":
                loop, kind, monotonic = self._numbers, Kind.SUM, data.is_monotonic
            else:
                loop = self._explicit if which == "histogram" else self._exponential
                kind = Kind.HISTOGRAM
        data_points = data.data_points
        if room and len(data_points) > room:
            args = (name, unit, description, kind, temporality, monotonic, resource, scope)
            return _Rest(loop, (*args, check_hits, now_ns, out), data_points)
        loop(
            data_points,
            0,
            name,
            unit,
            description,
            kind,
            temporality,
            monotonic,
            resource,
            scope,
            check_hits,
            now_ns,
            out,
        )
        return None

    def _metric_problem(self, metric: Any, name_bytes: int) -> tuple[str, str] | None:
        """(reason, what is wrong) when the metric's own fields refuse all its points."""
        name, unit, description = metric.name, metric.unit, metric.description
        limits = self._limits
        if not name:
            return "invalid_name", f"a {metric.WhichOneof('data')} metric without a name"
        if name_bytes > limits.max_name_length:
            return NAME_TOO_LONG, f"the name is {name_bytes} bytes long: {limits.describe(NAME_TOO_LONG)}"
        if find_control(name):
            return CONTROL_CHARACTER, "the name holds a control character (U+0000-U+001F or U+007F)"
        if len(unit) > MAX_UNIT_CHARS:
            return "invalid_unit", f"the unit is longer than {MAX_UNIT_CHARS} characters"
        if len(description) > MAX_DESCRIPTION_CHARS:
            return "invalid_description", (
                f"the description is {len(description)} characters long; the limit is {MAX_DESCRIPTION_CHARS}"
            )
        if name_bytes > limits.max_series_bytes:
            return (
                SERIES_TOO_LARGE,
                f"the name is {name_bytes} bytes long: {limits.describe(SERIES_TOO_LARGE)}",
            )
        return None

    def _memo_for(
        self, name: str, kind: Kind, resource: Resource, scope: Scope, check_hits: bool
    ) -> dict[int, _Known]:
        """The memo of one metric (filled by :meth:`_known`); a throwaway one when cache hits must be
        checked (see :meth:`_point_labels`)."""
        if check_hits:
            return {}
        last_resource, last_scope = self._memo_scope
        if resource is not last_resource or scope is not last_scope:
            self._memo_scope = (resource, scope)
            self._memo_metrics = self._memos.setdefault((resource, scope), {})
        found = self._memo_metrics.get((name, kind))
        if found is None:
            found = self._memo_metrics[(name, kind)] = {}
        return found

    def _known(
        self,
        memo: dict[int, _Known],
        name: str,
        kind: Kind,
        labels: Labels,
        resource: Resource,
        scope: Scope,
    ) -> _Known:
        if self._memos_held >= self._max_memos:  # bounded: entries hold their series keys alive
            memo.clear()
            self._memos.clear()
            self._memo_scope = (None, None)
            self._memos_held = 0
        self._memos_held += 1
        known = memo[id(labels)] = (labels, series_key(name, kind, labels, resource, scope))
        return known

    def _point_labels(
        self, dp: Any, name: str, index: int, check_hits: bool, out: Converted
    ) -> Labels | None:
        """The labels of ``dp`` checked against the limits together with the metric's name (a cache
        hit only when ``check_hits``); None when refused (counted in ``out``)."""
        key = tuple(dp.attributes[:])
        labels: Labels | None = self._labels.get(key)
        if labels is not None and not check_hits:
            return labels
        try:
            if labels is None:
                labels = _labels_from_serialized(key)
                nbytes = self._measure(labels)
                if nbytes <= self._cached_bytes:
                    self._labels.put(key, labels, sum(map(len, key)) + nbytes)
            else:
                nbytes = sum(_utf8_len(k) + _utf8_len(v) for k, v in labels)
            limits = self._limits
            if _utf8_len(name) + nbytes > limits.max_series_bytes:
                raise _Refused(SERIES_TOO_LARGE, limits.describe(SERIES_TOO_LARGE))
        except _Refused as exc:
            out.refuse(exc.reason, 1, f"{_where(name, index)}: {exc.detail}")
            return None
        return labels

    # The per-point loops below are the hot path: locals instead of attribute lookups, and one pass.
    def _numbers(
        self,
        data_points: Any,
        first: int,
        name: str,
        unit: str,
        description: str,
        kind: Kind,
        temporality: Temporality,
        monotonic: bool,
        resource: Resource,
        scope: Scope,
        check_hits: bool,
        now_ns: int,
        out: Converted,
    ) -> None:
        cache_get = _NO_HITS if check_hits else self._labels.get
        append = out.points.append
        builder: Any = PointSlots  # Any: the builder becomes a Point mid-way, which mypy cannot follow
        point_class: Any = Point
        memo = self._memo_for(name, kind, resource, scope, check_hits)
        memo_get = memo.get
        index = first - 1
        for dp in data_points:
            index += 1
            if dp.flags & _NO_RECORDED_VALUE:
                out.refuse("no_recorded_value", 1, "")
                continue
            which = dp.WhichOneof("value")
            if which == "as_double":
                value = dp.as_double
                if value != value:
                    value = _NAN
            elif which == "as_int":
                value = float(dp.as_int)
            else:
                out.refuse("no_value", 1, f"{_where(name, index)}: has neither as_int nor as_double")
                continue
            labels = cache_get(tuple(dp.attributes[:]))
            if labels is None:
                labels = self._point_labels(dp, name, index, check_hits, out)
                if labels is None:
                    continue
            known = memo_get(id(labels))
            if known is None or known[0] is not labels:
                known = self._known(memo, name, kind, labels, resource, scope)
            p = builder()
            p.name = name
            p.kind = kind
            p.labels = labels
            p.key = known[1]
            p.time_unix_nano = dp.time_unix_nano or now_ns
            p.value = value
            p.start_time_unix_nano = dp.start_time_unix_nano
            p.temporality = temporality
            p.monotonic = monotonic
            p.histogram = None
            p.unit = unit
            p.description = description
            p.resource = resource
            p.scope = scope
            p.explicit = None
            p.summary = None
            p.__class__ = point_class
            append(p)

    def _explicit(
        self,
        data_points: Any,
        first: int,
        name: str,
        unit: str,
        description: str,
        kind: Kind,
        temporality: Temporality,
        monotonic: bool,
        resource: Resource,
        scope: Scope,
        check_hits: bool,
        now_ns: int,
        out: Converted,
    ) -> None:
        cache_get = _NO_HITS if check_hits else self._labels.get
        append = out.points.append
        builder: Any = PointSlots  # Any: the builders change class mid-way, which mypy cannot follow
        point_class: Any = Point
        memo = self._memo_for(name, Kind.HISTOGRAM, resource, scope, check_hits)
        memo_get = memo.get
        explicit_builder: Any = _ExplicitBuilder
        explicit_class: Any = ExplicitHistogram
        # Points of one metric nearly always share their bounds: compared as a list with the previous
        # point's (cheaper than hashing a tuple), checked once, and one tuple kept for all of them.
        last_list: list[float] | None = None
        bounds: tuple[float, ...] = ()
        bounds_problem: str | None = None
        index = first - 1
        for dp in data_points:
            index += 1
            if dp.flags & _NO_RECORDED_VALUE:
                out.refuse("no_recorded_value", 1, "")
                continue
            # Slicing a repeated field and then building the tuple is ~2.5x faster than tuple(field).
            bound_list = dp.explicit_bounds[:]
            if bound_list != last_list:
                last_list = bound_list
                bounds = tuple(bound_list)
                bounds_problem = _bounds_problem(bounds)
            counts = tuple(dp.bucket_counts[:])
            count = dp.count
            problem = bounds_problem
            if problem is None:
                if not counts and not bounds:
                    counts = (count,)
                elif len(counts) != len(bounds) + 1:
                    problem = (
                        f"{len(counts)} bucket_counts for {len(bounds)} explicit_bounds "
                        f"(expected {len(bounds) + 1})"
                    )
                elif sum(counts) != count:
                    problem = f"bucket_counts add up to {sum(counts)} but count is {count}"
            lo = dp.min if dp.HasField("min") else None
            hi = dp.max if dp.HasField("max") else None
            if problem is None and lo is not None and hi is not None and count and lo > hi:
                problem = f"min {lo!r} is greater than max {hi!r}"
            if problem is not None:
                out.refuse("invalid_histogram", 1, f"{_where(name, index)}: {problem}")
                continue
            labels = cache_get(tuple(dp.attributes[:]))
            if labels is None:
                labels = self._point_labels(dp, name, index, check_hits, out)
                if labels is None:
                    continue
            known = memo_get(id(labels))
            if known is None or known[0] is not labels:
                known = self._known(memo, name, Kind.HISTOGRAM, labels, resource, scope)
            total = dp.sum if dp.HasField("sum") else _NAN
            h = explicit_builder()
            h.bounds = bounds
            h.counts = counts
            h.sum = total if total == total else _NAN
            h.min = lo
            h.max = hi
            h.__class__ = explicit_class
            p = builder()
            p.name = name
            p.kind = Kind.HISTOGRAM
            p.labels = labels
            p.key = known[1]
            p.time_unix_nano = dp.time_unix_nano or now_ns
            p.value = 0.0
            p.start_time_unix_nano = dp.start_time_unix_nano
            p.temporality = temporality
            p.monotonic = True
            p.histogram = None
            p.unit = unit
            p.description = description
            p.resource = resource
            p.scope = scope
            p.explicit = h
            p.summary = None
            p.__class__ = point_class
            append(p)

    def _exponential(
        self,
        data_points: Any,
        first: int,
        name: str,
        unit: str,
        description: str,
        kind: Kind,
        temporality: Temporality,
        monotonic: bool,
        resource: Resource,
        scope: Scope,
        check_hits: bool,
        now_ns: int,
        out: Converted,
    ) -> None:
        for index, dp in enumerate(data_points, first):
            if dp.flags & _NO_RECORDED_VALUE:
                out.refuse("no_recorded_value", 1, "")
                continue
            histogram, problem = _exp_histogram(dp)
            if histogram is None:
                out.refuse("invalid_histogram", 1, f"{_where(name, index)}: {problem}")
                continue
            labels = self._point_labels(dp, name, index, check_hits, out)
            if labels is None:
                continue
            out.points.append(
                new_point(
                    name,
                    Kind.HISTOGRAM,
                    labels,
                    dp.time_unix_nano or now_ns,
                    0.0,
                    dp.start_time_unix_nano,
                    temporality,
                    True,
                    histogram,
                    unit,
                    description,
                    resource,
                    scope,
                    None,
                    None,
                )
            )

    def _summaries(
        self,
        data_points: Any,
        first: int,
        name: str,
        unit: str,
        description: str,
        kind: Kind,
        temporality: Temporality,
        monotonic: bool,
        resource: Resource,
        scope: Scope,
        check_hits: bool,
        now_ns: int,
        out: Converted,
    ) -> None:
        for index, dp in enumerate(data_points, first):
            if dp.flags & _NO_RECORDED_VALUE:
                out.refuse("no_recorded_value", 1, "")
                continue
            quantiles = tuple((q.quantile, q.value) for q in dp.quantile_values)
            problem = None
            if dp.sum != dp.sum:
                problem = "sum is NaN"
            for q, v in quantiles:
                if not 0.0 <= q <= 1.0:
                    problem = f"quantile {q!r} is outside [0, 1]"
                    break
                if v != v:
                    problem = f"the value of quantile {q!r} is NaN"
                    break
            if problem is not None:
                out.refuse("invalid_summary", 1, f"{_where(name, index)}: {problem}")
                continue
            labels = self._point_labels(dp, name, index, check_hits, out)
            if labels is None:
                continue
            out.points.append(
                new_point(
                    name,
                    Kind.SUMMARY,
                    labels,
                    dp.time_unix_nano or now_ns,
                    0.0,
                    dp.start_time_unix_nano,
                    Temporality.CUMULATIVE,
                    True,
                    None,
                    unit,
                    description,
                    resource,
                    scope,
                    None,
                    Summary(dp.count, dp.sum, tuple(sorted(quantiles))),
                )
            )


def count_points(request: Any) -> int:
    """Data points in a :data:`ShadowMetricsRequest`, valid or not (one pass over its metrics)."""
    return _count_points(m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics)


def _count_points(metrics: Iterable[Any]) -> int:
    n = 0
    for m in metrics:
        which = m.WhichOneof("data")
        if which is not None:
            n += len(getattr(m, which).data_points)
    return n


def _bounds_problem(bounds: tuple[float, ...]) -> str | None:
    previous = -math.inf
    for b in bounds:
        if not previous < b < math.inf:  # also false for NaN
            return "explicit_bounds must be finite and strictly ascending"
        previous = b
    return None


def _frozen_counts(counts: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
    a = np.array(counts, dtype=np.float64)
    a.flags.writeable = False
    return a


_NO_COUNTS = _frozen_counts([])


def _exp_histogram(dp: Any) -> tuple[ExpHistogram | None, str]:
    """The histogram of an ExponentialHistogramDataPoint, or (None, what is wrong with it)."""
    scale = dp.scale
    if not MIN_SCALE <= scale <= MAX_SCALE:
        return None, f"scale {scale} is outside [{MIN_SCALE}, {MAX_SCALE}]"
    positive, negative = dp.positive, dp.negative
    pos = positive.bucket_counts[:]
    neg = negative.bucket_counts[:]
    count = dp.count
    zero_count = dp.zero_count
    total = zero_count + sum(pos) + sum(neg)
    if total != count:
        return None, f"zero_count and bucket_counts add up to {total} but count is {count}"
    has_min, has_max = dp.HasField("min"), dp.HasField("max")
    if count == 0:
        lo, hi = math.inf, -math.inf
    elif has_min and has_max:
        lo, hi = dp.min, dp.max
    else:
        pos_range = _bucket_range(positive.offset, pos)
        neg_range = _bucket_range(negative.offset, neg)
        # Bucket i holds (base**i, base**(i+1)]: the outermost buckets bound every value.
        if has_min:
            lo = dp.min
        elif neg_range is not None:
            lo = -_boundary(neg_range[1] + 1, scale)
        elif zero_count:
            lo = 0.0
        else:
            assert pos_range is not None
            lo = _boundary(pos_range[0], scale)
        if has_max:
            hi = dp.max
        elif pos_range is not None:
            hi = _boundary(pos_range[1] + 1, scale)
        elif zero_count:
            hi = 0.0
        else:
            assert neg_range is not None
            hi = -_boundary(neg_range[0], scale)
    if lo > hi and count:
        return None, f"min {lo!r} is greater than max {hi!r}"
    s = dp.sum if dp.HasField("sum") else _NAN
    h: Any = _ExpBuilder()
    h.scale = scale
    h.zero_count = float(zero_count)
    h.positive_offset = positive.offset if pos else 0
    h.positive_counts = _frozen_counts(pos) if pos else _NO_COUNTS
    h.negative_offset = negative.offset if neg else 0
    h.negative_counts = _frozen_counts(neg) if neg else _NO_COUNTS
    h.count = float(count)
    h.sum = s if s == s else _NAN
    h.min = lo
    h.max = hi
    h.__class__ = ExpHistogram
    return h, ""


def to_shadow(request: Message) -> Any:
    """A generated ``ExportMetricsServiceRequest`` re-read with the shadow schema (the JSON path)."""
    return ShadowMetricsRequest.FromString(request.SerializeToString())
