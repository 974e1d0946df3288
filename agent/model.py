"""The data that flows through pipelines.

A receiver produces a :class:`MetricBatch`; processors return new batches (sharing the points they did
not change); exporters read them. Batches and points are immutable once handed on, so one batch fans
out to several exporters without copies.

Points are one object per series per batch (not per sample): a StatsD flush of 100k series makes 100k
points every flush interval, which costs ~1 µs each, while the per-line hot path never builds objects.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.exphist import ExpHistogram

Labels = tuple[tuple[str, str], ...]
"""Label pairs sorted by name, names unique. The identity of a series is (name, labels). A value may be
a :class:`TypedValue` (an OTLP attribute that was not a string), which is its text everywhere but in
the OTLP exporters."""


class TypedValue(str):
    """A label or attribute value that arrived as a non-string OTLP ``AnyValue``: the text it renders as
    (``receivers/otlp/convert.py``), and its type in its class (:class:`IntValue`, :class:`DoubleValue`,
    :class:`BoolValue`, :class:`BytesValue`, :class:`EncodedValue`).

    It *is* that text for everything string-based (processors, the Prometheus exporters, StatsD and
    JSON output) and for series identity: it compares and hashes as its text, so int ``200`` and the
    string ``"200"`` are one label value, and where both meet in one series the first one seen
    wins. The OTLP exporters send it as the ``AnyValue`` it arrived as, so the type survives OTLP →
    OTLP. A stage that changes a value makes a new plain ``str`` (sent as a string); one that passes it
    on or renames its key keeps the type. Scalars are read back from their text, which is exact (ints
    in decimal, doubles in their shortest round-trip form, bytes in base64), so they cost no memory
    beyond the string's (``__slots__ = ()``); only arrays, kvlists and empty values keep their
    serialized bytes.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str.__repr__(self)})"


class IntValue(TypedValue):
    """An ``int_value``, as decimal text."""

    __slots__ = ()


class DoubleValue(TypedValue):
    """A ``double_value``, as its shortest round-trip text (``NaN``, ``+Inf``, ``-Inf``)."""

    __slots__ = ()


class BoolValue(TypedValue):
    """A ``bool_value``: ``true`` or ``false``."""

    __slots__ = ()


class BytesValue(TypedValue):
    """A ``bytes_value``, as standard base64."""

    __slots__ = ()


class EncodedValue(TypedValue):
    """An array, a kvlist or an empty ``AnyValue`` (compact JSON, or ``""``), keeping the serialized
    ``AnyValue`` in ``any_value``: its JSON text loses types (bytes, non-finite doubles). A str subclass
    cannot have non-empty ``__slots__``, so this one pays a ``__dict__``."""

    any_value: bytes
    """The serialized ``AnyValue`` as it arrived."""

    def __new__(cls, text: str, any_value: bytes) -> EncodedValue:
        self = super().__new__(cls, text)
        self.any_value = any_value
        return self

    def __reduce__(self) -> tuple[type[EncodedValue], tuple[str, bytes]]:
        return EncodedValue, (str(self), self.any_value)

    def __repr__(self) -> str:
        return f"EncodedValue({str.__repr__(self)}, {self.any_value!r})"


class Kind(enum.IntEnum):
    """What a point measures. Numbers are internal, not OTLP's."""

    SUM = 1
    """A sum over time: `value` is the delta or the cumulative total (see `Temporality`)."""
    GAUGE = 2
    """A last value."""
    HISTOGRAM = 3
    """A distribution: `histogram` holds an exponential histogram with exact count/sum/min/max, or
    `explicit` holds fixed-bound buckets (as OTLP explicit-bucket histograms arrive); exactly one is set."""
    SUMMARY = 4
    """Precomputed quantiles (OTLP Summary, Prometheus summary): `summary` is set. Always cumulative."""


class Temporality(enum.IntEnum):
    """Numbers match OTLP's AggregationTemporality."""

    DELTA = 1
    CUMULATIVE = 2


@dataclass(frozen=True, slots=True)
class Point:
    """One series' value at one time."""

    name: str
    """Original metric name (dotted for StatsD); exporters sanitise it for their backend."""
    kind: Kind
    labels: Labels
    time_unix_nano: int
    value: float = 0.0
    """SUM and GAUGE value; unused for HISTOGRAM."""
    start_time_unix_nano: int = 0
    """Start of the delta interval (DELTA) or of the cumulative series (CUMULATIVE); 0 when unknown."""
    temporality: Temporality = Temporality.DELTA
    monotonic: bool = True
    """For SUM: whether the total only grows (a counter)."""
    histogram: ExpHistogram | None = None
    unit: str = ""
    """UCUM unit, e.g. `s` for StatsD timers (converted from ms at the receiver), `1` for sets."""
    description: str = ""
    resource: Resource | None = None
    scope: Scope | None = None
    """The instrumentation scope (OTLP) that produced the point; None for StatsD and the JSON API."""
    explicit: ExplicitHistogram | None = None
    """For HISTOGRAM points that arrived with fixed bucket bounds (OTLP explicit-bucket histograms)."""
    summary: Summary | None = None
    """For SUMMARY points."""
    key: SeriesKey | None = field(default=None, init=False, compare=False, repr=False)
    """The series' identity once a stage asked for it (:func:`key_of`), or given by whoever built the
    point; not an init field, so ``dataclasses.replace`` never carries a stale one over."""


@dataclass(frozen=True, slots=True)
class Resource:
    """Attributes of the entity that produced the points (OTLP resource); shared by reference."""

    attributes: Labels = ()
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        # Hashed for every point's series key: the attributes are hashed once, not once a point.
        h = self._hash
        if not h:
            h = hash(self.attributes) or 1
            object.__setattr__(self, "_hash", h)
        return h

    def __reduce__(self) -> tuple[type[Resource], tuple[Labels]]:
        return Resource, (self.attributes,)  # not the cached hash: str hashes differ between processes


@dataclass(frozen=True, slots=True)
class Scope:
    """OTLP instrumentation scope; shared by reference like :class:`Resource`."""

    name: str = ""
    version: str = ""
    attributes: Labels = ()
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        h = self._hash
        if not h:
            h = hash((self.name, self.version, self.attributes)) or 1
            object.__setattr__(self, "_hash", h)
        return h

    def __reduce__(self) -> tuple[type[Scope], tuple[str, str, Labels]]:
        return Scope, (self.name, self.version, self.attributes)  # not the cached hash (see Resource)


@dataclass(frozen=True, slots=True)
class ExplicitHistogram:
    """A histogram with fixed upper bounds, as OTLP ``HistogramDataPoint`` carries it.

    ``counts[i]`` is the number of values in ``(bounds[i-1], bounds[i]]``; the last count is above the
    last bound, so ``len(counts) == len(bounds) + 1``. Counts are per bucket, not cumulative.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float = 0.0
    min: float | None = None
    max: float | None = None

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class Summary:
    """Count, sum and quantile values (quantile in [0, 1], value) over the series' lifetime."""

    count: int
    sum: float
    quantiles: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class MetricBatch:
    """Points that travel together, plus request context (headers, authenticated tenant)."""

    points: tuple[Point, ...]
    context: Mapping[str, str] = field(default_factory=dict)
    """Request metadata receivers pass on (lower-case header names, `auth.tenant`); read by `tenant`."""

    def __len__(self) -> int:
        return len(self.points)


@dataclass(frozen=True, slots=True)
class SpanBatch:
    """Traces pass through as OTLP ``ResourceSpans`` messages (opentelemetry-proto classes).

    Processors that change spans build new messages; nobody mutates a message after handing it on.
    """

    resource_spans: tuple[Any, ...]
    context: Mapping[str, str] = field(default_factory=dict)
    span_count: int = 0
    """Spans in the batch (for loss accounting), computed once by whoever builds the batch."""

    def __len__(self) -> int:
        return self.span_count


@dataclass(frozen=True, slots=True)
class LogBatch:
    """Logs pass through as OTLP ``ResourceLogs`` messages; StatsD events join as log records."""

    resource_logs: tuple[Any, ...]
    context: Mapping[str, str] = field(default_factory=dict)
    record_count: int = 0
    """Log records in the batch (for loss accounting)."""

    def __len__(self) -> int:
        return self.record_count


Batch = MetricBatch | SpanBatch | LogBatch
"""What flows in a pipeline: a metrics pipeline carries MetricBatch only, and so on."""


class SeriesKey:
    """The identity of a series: name, kind, labels, resource and scope, interned.

    There is one SeriesKey object per identity while anything holds it (points, or a stage's state),
    so it hashes and compares as a pointer: every stage keys its state by it without hashing the
    labels again. A point gets its key once (:func:`key_of`, cached on the point; a receiver that keeps
    series across flushes, like StatsD's aggregator, hands the same key to each flush's point). A stage
    that changes only labels derives the new key with :meth:`derive`, memoised on the old key: a
    series pays for its new label tuple and its interning once in its lifetime, not once a point.

    Labels compare as text (see :class:`TypedValue`), so the first labels seen for an identity are
    the key's: a stage that takes its labels from a derived key passes on that first point's types.
    """

    __slots__ = ("__weakref__", "_derived", "kind", "labels", "name", "resource", "scope")

    name: str
    kind: Kind
    labels: Labels
    resource: Resource | None
    scope: Scope | None
    _derived: dict[Hashable, SeriesKey] | None

    def __init__(self) -> None:
        raise TypeError("SeriesKey is interned: use series_key() or key_of()")

    def derive(self, change: Hashable, labels_of: Callable[..., Labels], *args: Any) -> SeriesKey:
        """The key of this series with its labels changed by ``labels_of(labels, *args)``; ``change``
        names the change (say ``("tenant_id", "team-a")``) for the memo, and must determine it. Same name,
        kind, resource and scope."""
        memo = self._derived
        if memo is None:
            memo = self._derived = {}
        found = memo.get(change)
        if found is None:
            if len(memo) >= _DERIVED_LIMIT:  # changes per series are few; never let them pile up
                memo.clear()
            labels = labels_of(self.labels, *args)
            found = memo[change] = series_key(self.name, self.kind, labels, self.resource, self.scope)
        return found

    def __reduce__(self) -> tuple[Callable[..., SeriesKey], tuple[object, ...]]:
        # Unpickled in another process, a key is interned there, or it would not compare equal.
        return series_key, (self.name, self.kind, self.labels, self.resource, self.scope)

    def __repr__(self) -> str:
        return f"SeriesKey({self.name!r}, {self.kind.name}, {self.labels!r})"


_DERIVED_LIMIT = 64


class _KeyRef(weakref.ref["SeriesKey"]):
    """A weak reference to a key that knows the identity it is filed under."""

    __slots__ = ("identity",)
    identity: tuple[object, ...]


def _key_gone(ref: _KeyRef) -> None:
    if _KEYS.get(ref.identity) is ref:  # a newer key of the same identity may be filed already
        del _KEYS[ref.identity]


_KEYS: dict[tuple[object, ...], _KeyRef] = {}
"""Every live key by its identity, weakly: a key lives while a point or a stage's state holds it.
(WeakValueDictionary does the same behind a Python-level ``get``; this is two C calls a lookup.)"""


def series_key(
    name: str, kind: Kind, labels: Labels, resource: Resource | None = None, scope: Scope | None = None
) -> SeriesKey:
    """The one :class:`SeriesKey` of this identity (made when none is alive)."""
    identity = (name, kind, labels, resource, scope)
    ref = _KEYS.get(identity)
    key = ref() if ref is not None else None
    if key is None:
        key = object.__new__(SeriesKey)
        key.name, key.kind, key.labels, key.resource, key.scope = identity
        key._derived = None
        ref = _KeyRef(key, _key_gone)
        ref.identity = identity
        _KEYS[identity] = ref
    return key


def key_of(p: Point) -> SeriesKey:
    """Point `p`'s series key: computed on first use and kept on the point, so later stages and every
    exporter reuse it."""
    key = p.key
    if key is None:
        key = series_key(p.name, p.kind, p.labels, p.resource, p.scope)
        object.__setattr__(p, "key", key)
    return key


class PointSlots:
    """A plain object with :class:`Point`'s slots, for building points fast (see :func:`new_point`).

    Point is a frozen slotted dataclass whose generated ``__init__`` sets each of its 15 fields through
    ``object.__setattr__``: ~1.8-3.8 µs a point here, the largest single cost where points are made in
    bulk (a StatsD flush, OTLP ingest, percentile emits). Filling one of these and then giving it the
    Point class costs a fraction of that. CPython refuses the ``__class__`` assignment if the layouts
    ever differ, and the import-time check below refuses a Point whose fields changed.
    """

    __slots__ = Point.__slots__


POINT_FIELDS = (
    "name", "kind", "labels", "time_unix_nano", "value", "start_time_unix_nano", "temporality", "monotonic",
    "histogram", "unit", "description", "resource", "scope", "explicit", "summary", "key",
)  # fmt: skip
if tuple(f for f in Point.__slots__) != POINT_FIELDS:  # pragma: no cover - guards a model change
    raise RuntimeError(f"Point's fields changed to {Point.__slots__}: update POINT_FIELDS and new_point")


def new_point(
    name: str,
    kind: Kind,
    labels: Labels,
    time_unix_nano: int,
    value: float,
    start_time_unix_nano: int,
    temporality: Temporality,
    monotonic: bool,
    histogram: ExpHistogram | None,
    unit: str,
    description: str,
    resource: Resource | None,
    scope: Scope | None,
    explicit: ExplicitHistogram | None,
    summary: Summary | None,
    key: SeriesKey | None = None,
) -> Point:
    """``Point(...)`` with every field given positionally, without the dataclass ``__init__``; ``key``
    is the series' key when the caller knows it (it must be this point's identity)."""
    p: Any = PointSlots()
    p.name = name
    p.kind = kind
    p.labels = labels
    p.time_unix_nano = time_unix_nano
    p.value = value
    p.start_time_unix_nano = start_time_unix_nano
    p.temporality = temporality
    p.monotonic = monotonic
    p.histogram = histogram
    p.unit = unit
    p.description = description
    p.resource = resource
    p.scope = scope
    p.explicit = explicit
    p.summary = summary
    p.key = key
    p.__class__ = Point
    return p  # type: ignore[no-any-return]


def relabelled(p: Point, key: SeriesKey, value: float | None = None) -> Point:
    """`p` as a point of series `key` (its labels; same name, kind, resource and scope), optionally with
    a new value: what ``dataclasses.replace(p, labels=...)`` did at ~4x the cost."""
    return new_point(
        p.name, p.kind, key.labels, p.time_unix_nano, p.value if value is None else value,
        p.start_time_unix_nano, p.temporality, p.monotonic, p.histogram, p.unit, p.description,
        p.resource, p.scope, p.explicit, p.summary, key,
    )  # fmt: skip
