"""Metric points → OTLP ExportMetricsServiceRequest bodies: per-series state, temporality, histograms.

A series is identified by its resource, scope, name and labels (plus kind, input temporality,
monotonicity, unit and description: a change of any of those starts a new series). Each series keeps
its attribute bytes, encoded once (``wire.py``), and what its temporality conversion needs.

Temporality (``temporality`` is what the exporter sends; points say what they carry):

- Gauges are sent as they come. Summaries are always cumulative (OTLP summaries carry no temporality
  and quantiles cannot be subtracted), so they are sent as they come in both modes.
- Delta in, delta out; cumulative in, cumulative out: sent as they come (histograms may still change
  form, see below).
- **Delta → cumulative** (sums, monotonic or not, and histograms): the series keeps a running total.
  Its start time is the start time of its first delta (that point's time when the delta has none) and
  stays fixed while the series lives; each point adds to the total and the total is sent with the
  series' start time. A series not updated for ``series_idle_timeout`` is forgotten: a later point
  starts a new total with a new start time, which a backend reads as a counter reset.
- **Cumulative → delta**: each point sends the difference from the series' previous point, over
  (previous time, this time]. A reset is a start time different from the previous one, or (monotonic
  sums and histograms) a value, count or bucket that went down; after a reset the whole new value is
  the delta, starting at the new start time (or the previous point's time, whichever is later).
  Non-monotonic sums may go down without a reset. A point not later than the previous one is dropped
  (``out_of_order``). **First point of a series**: sent as a delta over (start time, time] with its
  whole value when its start time is known and not earlier than the exporter's start (the series
  began while we were watching, so nobody sent that part before); otherwise it only sets the baseline
  and is not sent (``exporter_otlp_baseline_points_total``), so a restart of the agent never sends
  a counter's whole history again as one delta.
- A delta histogram's min and max are kept when the delta is the whole value; a difference of two
  cumulative histograms has no known min/max, so they are left out.

Histograms (``histograms``): ``exponential`` sends exponential histograms as they are; ``explicit``
converts them to fixed-bound buckets (``explicit_buckets``) with ``agent.exphist.classic_buckets``
(each exponential bucket goes whole to the bucket holding its log-midpoint) and sends whole counts
(``agent.exphist.whole`` of the running totals). Explicit histograms arriving from
OTLP stay explicit with their own bounds in both modes.

Splitting: points are packed into requests of at most ``max_request_size`` bytes (uncompressed,
counting every enclosing message), in arrival order; a single point bigger than that is dropped
(``too_large``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent import exphist
from agent.bucket_layouts import BucketLayout, BucketLayouts
from agent.exphist import ExpHistogram, classic_buckets, merge
from agent.model import Kind, Labels, Point, Resource, Scope, Temporality, key_of
from exporters.otlp import resource as resource_attrs
from exporters.otlp import wire

_DELTA = Temporality.DELTA
_CUMULATIVE = Temporality.CUMULATIVE

# How a series turns a point into a data point entry.
_NUMBER = 0  # gauges and pass-through sums: the hot path, handled inline
_STATEFUL = 1
_STATELESS = 2


@dataclass(slots=True)
class _Explicit:
    """An explicit-bucket histogram with float counts (sums of rounded-later weights)."""

    bounds: tuple[float, ...]
    counts: Sequence[float]
    """Per bucket, one more than the bounds. Python numbers, not numpy: a dozen buckets cost more in
    numpy's per-call overhead than in a list comprehension (the explicit path was ~45 % of encoding)."""
    sum: float
    min: float | None
    max: float | None


Measurement = float | ExpHistogram | _Explicit | Point


class _Entry:
    """A resource or scope as encoded once: the message body and its bytes when nested."""

    __slots__ = ("body", "index", "overhead")

    def __init__(self, body: bytes, index: int) -> None:
        self.body = body
        self.index = index
        self.overhead = len(body) + 2 * wire.MAX_NESTING_OVERHEAD


class _Group:
    """One Metric message's identity within a request: where it goes and its header bytes."""

    __slots__ = ("data_tag", "head", "overhead", "resource", "scope", "trailer")

    def __init__(self, resource: _Entry, scope: _Entry, head: bytes, data_tag: bytes, trailer: bytes) -> None:
        self.resource = resource
        self.scope = scope
        self.head = head
        self.data_tag = data_tag
        self.trailer = trailer
        self.overhead = len(head) + len(trailer) + 2 * wire.MAX_NESTING_OVERHEAD


class _Series:
    __slots__ = (
        "attrs",
        "emit",
        "group",
        "heads",
        "last_ns",
        "last_seen",
        "mode",
        "start_ns",
        "state",
    )

    def __init__(self, group: _Group, attrs: bytes, mode: int, number: bool) -> None:
        self.group = group
        self.attrs = attrs
        self.heads = wire.number_heads(attrs) if number else (b"", b"")
        self.mode = mode
        self.emit: Callable[[_Series, Point], bytes | None] | None = None
        self.last_seen = 0.0
        self.state: Measurement | None = None
        self.start_ns = 0
        self.last_ns = 0


@dataclass(frozen=True, slots=True)
class EncoderOptions:
    temporality: Temporality
    histograms: str
    """exponential | explicit"""
    explicit_buckets: tuple[float, ...]
    max_request_size: int
    series_idle_timeout_s: float
    max_series: int
    static_resource: Mapping[str, str]
    scope_name: str
    scope_version: str
    started_ns: int
    """Wall-clock start of the exporter: the first-point rule of cumulative → delta."""
    explicit_layouts: tuple[BucketLayout, ...] = ()
    """Per-metric bounds when histograms: explicit (first matching glob on the metric name wins)."""


class MetricEncoder:
    """Turns batches into request bodies. Not thread-safe; one batch at a time (the exporter locks).

    Use: ``begin(now_s)``, then ``add(points)`` once or more (each returns the requests that filled
    up), then ``finish()`` for the rest. ``counts`` holds points not sent by reason (``too_large``,
    ``out_of_order``, ``series_limit``, ``invalid``) and ``baseline``, for the exporter to report.
    """

    def __init__(self, options: EncoderOptions) -> None:
        self._o = options
        self._out_temporality = options.temporality
        self._explicit = options.histograms == "explicit"
        self._layouts = BucketLayouts(options.explicit_buckets, options.explicit_layouts)
        self._bounds_fields: dict[tuple[float, ...], bytes] = {}
        self._series: dict[tuple[object, ...], _Series] = {}
        self._groups: dict[tuple[object, ...], _Group] = {}
        self._resources: dict[Resource | None, _Entry] = {}
        self._scopes: dict[Scope | None, _Entry] = {}
        self._limit = options.max_request_size
        self._now = 0.0
        self._last_sweep = 0.0
        self.counts: dict[str, int] = {}
        self._reset_request()

    @property
    def series(self) -> int:
        return len(self._series)

    # -- batches -------------------------------------------------------------------------------------
    def _reset_request(self) -> None:
        self._pending: dict[_Group, list[bytes]] = {}
        self._placed: set[int] = set()
        self._size = 0
        self._points = 0

    def begin(self, now_s: float) -> None:
        """Start a batch at monotonic time ``now_s``; sweeps idle series now and then."""
        self._now = now_s
        ttl = self._o.series_idle_timeout_s
        if now_s - self._last_sweep >= ttl / 4:
            self._last_sweep = now_s
            self._sweep(now_s - ttl)

    def _sweep(self, cutoff: float) -> None:
        before = len(self._series)
        self._series = {k: s for k, s in self._series.items() if s.last_seen >= cutoff}
        groups = len(self._groups)
        held = len(self._series) == before and groups <= before
        if held and len(self._resources) <= groups and len(self._scopes) <= groups:
            # Nothing expired, and no group, resource or scope is held without a series (points of
            # series over max_series are sent uncached, but their groups are made here too).
            return
        live = {id(s.group) for s in self._series.values()}
        self._groups = {k: g for k, g in self._groups.items() if id(g) in live}
        resources = {id(g.resource) for g in self._groups.values()}
        scopes = {id(g.scope) for g in self._groups.values()}
        self._resources = {k: e for k, e in self._resources.items() if id(e) in resources}
        self._scopes = {k: e for k, e in self._scopes.items() if id(e) in scopes}

    def _count(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def add(self, points: Sequence[Point]) -> list[tuple[bytes, int]]:
        """Encode ``points``; returns the requests (body, data points) that reached the size limit."""
        # The hot loop (~1 µs a point): request state lives in locals while it runs (an attribute
        # of self costs a dict lookup each time), written back before anything that reads it.
        done: list[tuple[bytes, int]] = []
        series_get = self._series.get
        now = self._now
        number = _NUMBER
        number_tail = wire.NUMBER_TAIL.pack
        number_tail_no_start = wire.NUMBER_TAIL_NO_START.pack
        pending = self._pending
        pending_get = pending.get
        placed = self._placed
        limit = self._limit
        size = self._size
        count = self._points
        for p in points:
            # The series key (name, kind, labels, resource, scope) is made once per point at most,
            # usually by an earlier stage; what else shapes the metric sent joins it here.
            identity = p.key or key_of(p)
            key = (identity, p.temporality, p.monotonic, p.histogram is None, p.unit, p.description)
            s = series_get(key)
            if s is None:
                s = self._new_series(key, p)
                if s is None:
                    continue
            s.last_seen = now
            if s.mode == number:
                start = p.start_time_unix_nano
                if start:
                    entry = s.heads[0] + number_tail(0x11, start, 0x19, p.time_unix_nano, 0x21, p.value)
                else:
                    entry = s.heads[1] + number_tail_no_start(0x19, p.time_unix_nano, 0x21, p.value)
            else:
                assert s.emit is not None
                found = s.emit(s, p)
                if found is None:
                    continue
                entry = found
            g = s.group
            points_of = pending_get(g)
            grow = len(entry)
            if points_of is None:
                grow += g.overhead
                if g.scope.index not in placed:
                    grow += g.scope.overhead
                if g.resource.index not in placed:
                    grow += g.resource.overhead
            if size + grow > limit:
                if count:
                    self._size, self._points = size, count
                    done.append(self._take())
                    pending, placed, size, count = self._pending, self._placed, 0, 0
                    pending_get = pending.get
                    grow = len(entry) + g.overhead + g.scope.overhead + g.resource.overhead
                    points_of = None
                if grow > limit:
                    self._count("too_large")
                    continue
            if points_of is None:
                points_of = pending[g] = []
                placed.add(g.scope.index)
                placed.add(g.resource.index)
            points_of.append(entry)
            size += grow
            count += 1
        self._size, self._points = size, count
        return done

    def finish(self) -> list[tuple[bytes, int]]:
        """The last, partly filled request of the batch (none when nothing is pending)."""
        return [self._take()] if self._points else []

    def _take(self) -> tuple[bytes, int]:
        by_resource: dict[_Entry, dict[_Entry, list[bytes]]] = {}
        for g, entries in self._pending.items():
            by_resource.setdefault(g.resource, {}).setdefault(g.scope, []).append(
                wire.metric(g.head, g.data_tag, entries, g.trailer)
            )
        body = wire.request(
            (r.body, ((sc.body, metrics) for sc, metrics in scopes.items()))
            for r, scopes in by_resource.items()
        )
        taken = (body, self._points)
        self._reset_request()
        return taken

    # -- resources and scopes ------------------------------------------------------------------------
    def _resource(self, r: Resource | None) -> _Entry:
        entry = self._resources.get(r)
        if entry is None:
            own = r.attributes if r is not None else ()
            pairs = resource_attrs.merge(own, self._o.static_resource)
            # Indices start at 1 and never repeat, so 0 can mean "not looked up yet".
            entry = self._resources[r] = _Entry(wire.resource(pairs), _next_index())
        return entry

    def _scope(self, sc: Scope | None) -> _Entry:
        entry = self._scopes.get(sc)
        if entry is None:
            if sc is None:
                body = wire.scope(self._o.scope_name, self._o.scope_version)
            else:
                body = wire.scope(sc.name, sc.version, sc.attributes)
            entry = self._scopes[sc] = _Entry(body, _next_index())
        return entry

    # -- series ----------------------------------------------------------------------------------------
    def _new_series(self, key: tuple[object, ...], p: Point) -> _Series | None:
        ttl = self._o.series_idle_timeout_s
        if len(self._series) >= self._o.max_series and self._now - self._last_sweep >= ttl / 16:
            # At the cap, idle series free room now rather than at the next periodic sweep.
            self._last_sweep = self._now
            self._sweep(self._now - ttl)
        if len(self._series) >= self._o.max_series:
            # Stateless points still go out (uncached); only a conversion needs the state we refuse.
            s = self._make_series(p)
            if s is not None and s.mode == _STATEFUL:
                self._count("series_limit")
                return None
            return s
        s = self._make_series(p)
        if s is not None:
            self._series[key] = s
        return s

    def _make_series(self, p: Point) -> _Series | None:
        out = self._out_temporality
        kind = p.kind
        temporality = 0
        monotonic = False
        emit: Callable[[_Series, Point], bytes | None] | None = None
        if kind is Kind.GAUGE:
            data_tag, attr_tag, mode = wire.DATA_GAUGE, wire.ATTR_NUMBER, _NUMBER
        elif kind is Kind.SUM:
            data_tag, attr_tag, temporality, monotonic = wire.DATA_SUM, wire.ATTR_NUMBER, out, p.monotonic
            mode = _NUMBER if p.temporality == out else _STATEFUL
            if mode == _STATEFUL:
                emit = self._sum_to_cumulative if out == _CUMULATIVE else self._sum_to_delta
        elif kind is Kind.SUMMARY:
            if p.summary is None:
                self._count("invalid")
                return None
            data_tag, attr_tag, mode, emit = wire.DATA_SUMMARY, wire.ATTR_SUMMARY, _STATELESS, _summary
        elif kind is Kind.HISTOGRAM:
            temporality = out
            if p.histogram is not None and not self._explicit:
                data_tag, attr_tag = wire.DATA_EXPONENTIAL, wire.ATTR_EXPONENTIAL
            elif p.histogram is not None or p.explicit is not None:
                data_tag, attr_tag = wire.DATA_HISTOGRAM, wire.ATTR_HISTOGRAM
            else:
                self._count("invalid")
                return None
            if p.temporality == out:
                mode, emit = _STATELESS, self._histogram_as_is
            else:
                mode = _STATEFUL
                emit = self._histogram_to_cumulative if out == _CUMULATIVE else self._histogram_to_delta
        else:
            self._count("invalid")
            return None
        group_key = (
            self._resource(p.resource).index, self._scope(p.scope).index, p.name, p.description, p.unit,
            data_tag, temporality, monotonic,
        )  # fmt: skip
        group = self._groups.get(group_key)
        if group is None:
            group = self._groups[group_key] = _Group(
                self._resource(p.resource),
                self._scope(p.scope),
                wire.metric_head(p.name, p.description, p.unit),
                data_tag,
                wire.data_trailer(temporality, monotonic),
            )
        s = _Series(group, wire.attributes(attr_tag, p.labels), mode, kind is Kind.SUM or kind is Kind.GAUGE)
        s.emit = emit
        return s

    # -- sums (the pass-through path is inline in add) -------------------------------------------------
    def _sum_to_cumulative(self, s: _Series, p: Point) -> bytes:
        if s.state is None:
            s.state, s.start_ns = float(p.value), p.start_time_unix_nano or p.time_unix_nano
        else:
            assert isinstance(s.state, float)
            s.state += p.value
        s.last_ns = max(s.last_ns, p.time_unix_nano)
        return wire.number_point(s.heads, s.start_ns, s.last_ns, s.state)

    def _sum_to_delta(self, s: _Series, p: Point) -> bytes | None:
        found = self._delta_of(s, p, float(p.value), _subtract_number)
        if found is None:
            return None
        delta, start_ns = found
        assert isinstance(delta, float)
        return wire.number_point(s.heads, start_ns, p.time_unix_nano, delta)

    # -- histograms ------------------------------------------------------------------------------------
    def _measure(self, p: Point) -> ExpHistogram | _Explicit:
        """The point's histogram in the form it is sent in (exponential, or explicit with float counts)."""
        if p.histogram is not None:
            h = p.histogram
            if not self._explicit:
                return h
            bounds = self._layouts.bounds_for(p.name)
            below = classic_buckets(h, bounds).tolist()
            counts = [b - a for a, b in zip([0.0, *below], [*below, h.count], strict=True)]
            lowest = h.min if h.count > 0 else None
            highest = h.max if h.count > 0 else None
            return _Explicit(bounds, counts, h.sum, lowest, highest)
        e = p.explicit
        assert e is not None
        return _Explicit(e.bounds, e.counts, e.sum, e.min, e.max)

    def _histogram_entry(self, s: _Series, m: ExpHistogram | _Explicit, start_ns: int, time_ns: int) -> bytes:
        if isinstance(m, ExpHistogram):
            return wire.exponential_point(s.attrs, m, start_ns, time_ns)
        bounds_field = self._bounds_fields.get(m.bounds)
        if bounds_field is None:
            bounds_field = wire.packed_bounds(m.bounds)
            if len(self._bounds_fields) < 1024:
                self._bounds_fields[m.bounds] = bounds_field
        # Rounding the running (cumulative) counts, not each bucket separately, keeps the cumulative
        # form non-decreasing, so the per-bucket integers are never negative (exphist.whole's rule:
        # half to even, as round does).
        counts: list[int] = []
        running = 0.0
        sent = 0
        for c in m.counts:
            if c > 0:
                running += c
            rounded = round(running)
            counts.append(rounded - sent)
            sent = rounded
        return wire.explicit_point(s.attrs, bounds_field, counts, m.sum, m.min, m.max, start_ns, time_ns)

    def _histogram_as_is(self, s: _Series, p: Point) -> bytes:
        return self._histogram_entry(s, self._measure(p), p.start_time_unix_nano, p.time_unix_nano)

    def _histogram_to_cumulative(self, s: _Series, p: Point) -> bytes:
        m = self._measure(p)
        total = _add(s.state, m) if s.state is not None else None
        if total is None:
            s.state, s.start_ns = m, p.start_time_unix_nano or p.time_unix_nano
        else:
            s.state = total
        s.last_ns = max(s.last_ns, p.time_unix_nano)
        state = s.state
        assert isinstance(state, (ExpHistogram, _Explicit))
        return self._histogram_entry(s, state, s.start_ns, s.last_ns)

    def _histogram_to_delta(self, s: _Series, p: Point) -> bytes | None:
        m = self._measure(p)
        found = self._delta_of(s, p, m, _subtract_histogram)
        if found is None:
            return None
        delta, start_ns = found
        assert isinstance(delta, (ExpHistogram, _Explicit))
        return self._histogram_entry(s, delta, start_ns, p.time_unix_nano)

    def _delta_of(
        self,
        s: _Series,
        p: Point,
        m: Measurement,
        subtract: Callable[[Measurement, Measurement, bool], Measurement | None],
    ) -> tuple[Measurement, int] | None:
        """Cumulative → delta for any measurement: (delta, its start time), or None when not sent."""
        start, t = p.start_time_unix_nano, p.time_unix_nano
        if s.state is None:
            s.state, s.start_ns, s.last_ns = m, start, t
            if start and start >= self._o.started_ns and start < t:
                return m, start
            self._count("baseline")
            return None
        if t <= s.last_ns:
            self._count("out_of_order")
            return None
        restarted = bool(start and s.start_ns and start != s.start_ns)
        delta = None if restarted else subtract(m, s.state, p.monotonic)
        if delta is None:
            delta, begin = m, max(start, s.last_ns)
        else:
            begin = s.last_ns
        s.state, s.start_ns, s.last_ns = m, start, t
        return delta, begin


_index = 0


def _next_index() -> int:
    global _index
    _index += 1
    return _index


def _subtract_number(current: Measurement, previous: Measurement, monotonic: bool) -> Measurement | None:
    assert isinstance(current, float) and isinstance(previous, float)
    if monotonic and current < previous:
        return None
    return current - previous


def _summary(s: _Series, p: Point) -> bytes:
    summary = p.summary
    assert summary is not None
    return wire.summary_point(
        s.attrs, summary.count, summary.sum, summary.quantiles, p.start_time_unix_nano, p.time_unix_nano
    )


# -- histogram arithmetic ----------------------------------------------------------------------------
def _add(a: Measurement, b: Measurement) -> Measurement | None:
    """a + b, or None when they cannot be added (explicit bounds changed: the series restarts)."""
    if isinstance(a, ExpHistogram) and isinstance(b, ExpHistogram):
        return merge(a, b)
    if isinstance(a, _Explicit) and isinstance(b, _Explicit):
        if a.bounds != b.bounds:
            return None
        counts = [x + y for x, y in zip(a.counts, b.counts, strict=True)]
        return _Explicit(a.bounds, counts, a.sum + b.sum, _pick(min, a.min, b.min), _pick(max, a.max, b.max))
    return None


def _pick(f: Callable[[float, float], float], a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return f(a, b)


def _subtract_histogram(current: Measurement, previous: Measurement, monotonic: bool) -> Measurement | None:
    """current - previous for two cumulative histograms, or None on a reset (anything went down)."""
    if isinstance(current, _Explicit) and isinstance(previous, _Explicit):
        if current.bounds != previous.bounds:
            return None
        counts = [c - p for c, p in zip(current.counts, previous.counts, strict=True)]
        if counts and min(counts) < -1e-9:
            return None
        kept = [c if c > 0 else 0.0 for c in counts]
        return _Explicit(current.bounds, kept, current.sum - previous.sum, None, None)
    if isinstance(current, ExpHistogram) and isinstance(previous, ExpHistogram):
        # The delta's min and max are not known: sent without them (bounds=False).
        return exphist.subtract(current, previous, bounds=False)
    return None


__all__ = ["EncoderOptions", "Labels", "MetricEncoder"]
