"""StatsD aggregation: :class:`StatsdAggregator`, one flush interval's state and the flush that turns it
into points.

``StatsdAggregator.feed()`` (the hot path) cuts each line, finds its cached descriptor in the
``LineParser`` of ``receivers/statsd/parser.py`` (or has that parser parse the line completely) and
writes the value into the current :class:`Interval`; the receiver detaches the interval with
``swap()`` and turns it into points with ``build()``, which calls :func:`build_points`. The rules users
see are documented in ``parser.py``.

Series are keyed by a *canonical key*, which the parser builds: the metric name, then (only when there
are labels) ``0xff`` and the labels sorted by name as ``key 0xfd value`` joined by ``0xfe``. Those three
bytes never occur in valid UTF-8, so the key is unambiguous, its hash is computed once (bytes cache
their hash) and it decodes back to ``(name, labels)`` without a side table. Counters and gauges
carrying a DogStatsD ``|T`` timestamp are keyed by ``(canonical key, unix seconds)``.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Iterator
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from agent import exphist, model
from agent.limits import SeriesLimits
from agent.model import Kind, Labels, Point, Temporality, new_point, series_key
from receivers.statsd.parser import (
    COUNTER,
    DEFAULT_LIMITS,
    EVENT_LIMIT,
    GAUGE,
    HISTOGRAM,
    INVALID_VALUE,
    KV_SEP,
    MALFORMED_LINE,
    NAME_SEP,
    NUMERIC,
    PAIR_SEP,
    SERIES_LIMIT,
    SET,
    SET_MEMBER_LIMIT,
    TIMER,
    LineParser,
    MetricLine,
    StatsdEvent,
    StatsdServiceCheck,
)

_log = logging.getLogger(__name__)

FOLD_VALUES = 8192
"""Values one histogram series keeps raw in an interval; at this many they are folded into an
exponential histogram and the array starts again, so memory per series stays bounded."""

HIST_VALUES_PER_CHUNK = 32_768
"""Raw values turned into histograms per ``build()`` chunk (plus at most one series' worth): keeps each
chunk's ``from_segments`` call in the low milliseconds however many samples the timers got."""

MAX_EVENTS = 10_000
"""Events and service checks waiting to be taken, at most."""
MAX_EVENT_BYTES = 8 * 2**20
"""...and their lines' bytes at most: 10,000 events of 64 KB would otherwise hold 640 MB."""
_CACHE_MIN = 4096

SeriesKey = bytes | tuple[bytes, int]
"""A canonical key, or (canonical key, ``|T`` seconds) for timestamped counters and gauges."""


class Interval:
    """Everything aggregated during one flush interval. Detached whole by ``swap()``; after that only
    ``build()`` reads it, so the parser never shares a dict with a flush in progress."""

    __slots__ = (
        "counters",
        "dist_folds",
        "dist_weights",
        "dists",
        "gauges",
        "n_members",
        "n_series",
        "seq",
        "sets",
        "timer_folds",
        "timer_weights",
        "timers",
    )

    def __init__(self, seq: int) -> None:
        self.seq = seq
        """Position of the interval since the aggregator was created (1, 2, ...): the gauge idle clock."""
        self.n_series = 0
        """Series slots in use (all types; a ``|T`` slot counts as one); compared with ``max_series``."""
        self.n_members = 0
        """Set members held, over all sets; compared with ``max_set_members_total``."""
        self.counters: dict[SeriesKey, float] = {}
        """Sum of value / sample rate."""
        self.gauges: dict[SeriesKey, float] = {}
        """Last value, deltas applied; only gauges updated in this interval."""
        self.timers: dict[bytes, array[float]] = {}
        """``ms`` values, converted to seconds, not yet folded."""
        self.timer_weights: dict[bytes, array[float]] = {}
        """1 / sample rate per value, parallel to ``timers``; present only for series that saw a rate."""
        self.timer_folds: dict[bytes, exphist.ExpHistogram] = {}
        """Values folded out of ``timers`` when a series reached FOLD_VALUES."""
        self.dists: dict[bytes, array[float]] = {}
        """``h`` and ``d`` values (unit-less), as ``timers``."""
        self.dist_weights: dict[bytes, array[float]] = {}
        self.dist_folds: dict[bytes, exphist.ExpHistogram] = {}
        self.sets: dict[bytes, set[int]] = {}
        """Distinct members, each kept as its 64-bit ``hash()``: a member's memory does not grow with its
        length (a 60 KB member costs what a 6-byte one does); two members collide with odds ~2^-64."""


class IntervalPart:
    """What a worker process hands in at a flush (``StatsdAggregator.take_part``): its interval, its
    gauge writes in order, its events, and its counts since the previous part."""

    __slots__ = ("accepted", "events", "gauge_log", "interval", "refused", "tag_errors")

    def __init__(
        self,
        interval: Interval,
        gauge_log: list[tuple[SeriesKey, int, float, bool]],
        events: list[StatsdEvent | StatsdServiceCheck],
        accepted: int,
        refused: dict[str, int],
        tag_errors: dict[str, int],
    ) -> None:
        self.interval = interval
        self.gauge_log = gauge_log
        self.events = events
        self.accepted = accepted
        self.refused = refused
        self.tag_errors = tag_errors

    def __getstate__(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple[object, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)


def _point(
    key: model.SeriesKey,
    time_unix_nano: int,
    value: float,
    start_time_unix_nano: int,
    monotonic: bool,
    histogram: exphist.ExpHistogram | None,
    unit: str,
) -> Point:
    """A DELTA Point of series ``key``, built fast (a flush builds one per series: 100k per interval;
    see new_point)."""
    name, kind, labels = key.name, key.kind, key.labels
    return new_point(
        name,
        kind,
        labels,
        time_unix_nano,
        value,
        start_time_unix_nano,
        Temporality.DELTA,
        monotonic,
        histogram,
        unit,
        "",
        None,
        None,
        None,
        None,
        key,
    )


def decode_series(canon: bytes, pieces: dict[bytes, Any] | None = None) -> tuple[str, Labels]:
    """The metric name and sorted labels behind a canonical key (see the module docstring).

    ``pieces`` shares decoded names and (key, value) pairs between series: with 100k series that
    differ in one tag, every other pair is one object instead of 100k copies. The separators are
    bytes UTF-8 never holds, so a name and a pair can never share a key there.
    """
    if pieces is None:
        pieces = {}
    name_b, sep, rest = canon.partition(NAME_SEP)
    name = pieces.get(name_b)
    if name is None:
        name = pieces[name_b] = name_b.decode()
    if not sep:
        return name, ()
    labels = []
    for raw in rest.split(PAIR_SEP):
        pair = pieces.get(raw)
        if pair is None:
            key, _, value = raw.partition(KV_SEP)
            pair = pieces[raw] = (key.decode(), value.decode())
        labels.append(pair)
    return name, tuple(labels)


def fold(
    values: array[float],
    weights: array[float] | None,
    previous: exphist.ExpHistogram | None,
    max_buckets: int,
    max_scale: int = exphist.MAX_SCALE,
) -> exphist.ExpHistogram:
    """Values (and weights) as one exponential histogram, merged into ``previous`` if there is one."""
    hist = exphist.from_values(
        np.array(values, dtype=np.float64),
        None if weights is None else np.array(weights, dtype=np.float64),
        max_buckets=max_buckets,
        max_scale=max_scale,
    )
    return hist if previous is None else exphist.merge(previous, hist, max_buckets=max_buckets)


def expire_gauges(
    last_value: dict[bytes, float],
    last_seen: dict[bytes, int],
    built_seq: int,
    idle_flushes: int,
    max_remembered: int,
    live_seq: int,
) -> int:
    """Forget gauges not updated in the last ``idle_flushes`` intervals up to ``built_seq``; then, if
    more than ``max_remembered`` remain, forget the longest idle (never one updated in the live
    interval ``live_seq``). ``last_seen`` holds, per gauge, the seq of the last interval updating it.
    Returns how many were forgotten early, over ``max_remembered`` (the idle ones are not counted)."""
    cutoff = built_seq - idle_flushes
    dead = [key for key, seq in last_seen.items() if seq <= cutoff]
    excess = len(last_seen) - len(dead) - max_remembered
    early = 0
    if excess > 0:
        by_age = sorted(
            ((key, seq) for key, seq in last_seen.items() if cutoff < seq < live_seq), key=itemgetter(1)
        )
        early = min(excess, len(by_age))
        dead.extend(key for key, _ in by_age[:early])
    for key in dead:
        del last_seen[key]
        last_value.pop(key, None)
    return early


def build_points(
    interval: Interval,
    start_time_unix_nano: int,
    time_unix_nano: int,
    chunk_size: int,
    names: dict[bytes, model.SeriesKey],
    max_buckets: int,
    pieces: dict[bytes, Any] | None = None,
    max_scale: int = exphist.MAX_SCALE,
) -> Iterator[list[Point]]:
    """Points for one detached interval, in lists of at most ``chunk_size``.

    ``names`` caches canonical key → series key (name, kind and labels) across flushes so names and
    labels are decoded, and series keys made, once per series, not once per flush (a series flushed as
    another kind too gets that key interned, not cached here), and ``pieces`` the decoded names and
    pairs they share (see ``decode_series``); the caller bounds both.
    """
    out: list[Point] = []
    length_ns = time_unix_nano - start_time_unix_nano
    point = _point

    def labelled(canon: bytes, kind: Kind) -> model.SeriesKey:
        found = names.get(canon)
        if found is None:
            name, labels = decode_series(canon, pieces)
            found = names[canon] = series_key(name, kind, labels)
        elif found.kind is not kind:
            found = series_key(found.name, kind, found.labels)
        return found

    for key, value in interval.counters.items():
        if isinstance(key, tuple):
            canon, ts_s = key
            end_ns = ts_s * 1_000_000_000
            begin_ns = max(0, end_ns - length_ns)
        else:
            canon, begin_ns, end_ns = key, start_time_unix_nano, time_unix_nano
        out.append(point(labelled(canon, Kind.SUM), end_ns, value, begin_ns, True, None, ""))
        if len(out) >= chunk_size:
            yield out
            out = []

    for key, value in interval.gauges.items():
        if isinstance(key, tuple):
            canon, ts_s = key
            end_ns = ts_s * 1_000_000_000
        else:
            canon, end_ns = key, time_unix_nano
        out.append(point(labelled(canon, Kind.GAUGE), end_ns, value, 0, False, None, ""))
        if len(out) >= chunk_size:
            yield out
            out = []

    for canon, members in interval.sets.items():
        out.append(
            point(labelled(canon, Kind.GAUGE), time_unix_nano, float(len(members)), 0, False, None, "1")
        )
        if len(out) >= chunk_size:
            yield out
            out = []

    if out:
        yield out
        out = []

    # Histograms: one from_segments call per chunk over the concatenated raw values of its series.
    batch: list[tuple[bytes, str, array[float], array[float] | None, exphist.ExpHistogram | None]] = []
    n_values = 0
    for unit, values_by, weights_by, folds_by in (
        ("s", interval.timers, interval.timer_weights, interval.timer_folds),
        ("", interval.dists, interval.dist_weights, interval.dist_folds),
    ):
        for canon, values in values_by.items():
            batch.append(
                (
                    canon,
                    unit,
                    values,
                    weights_by.get(canon) if weights_by else None,
                    folds_by.get(canon) if folds_by else None,
                )
            )
            n_values += len(values)
            if len(batch) >= chunk_size or n_values >= HIST_VALUES_PER_CHUNK:
                yield _histogram_points(
                    batch, start_time_unix_nano, time_unix_nano, labelled, max_buckets, max_scale
                )
                batch = []
                n_values = 0
    if batch:
        yield _histogram_points(batch, start_time_unix_nano, time_unix_nano, labelled, max_buckets, max_scale)


def _histogram_points(
    batch: list[tuple[bytes, str, array[float], array[float] | None, exphist.ExpHistogram | None]],
    start_time_unix_nano: int,
    time_unix_nano: int,
    labelled: Callable[[bytes, Kind], model.SeriesKey],
    max_buckets: int,
    max_scale: int,
) -> list[Point]:
    lengths = [len(entry[2]) for entry in batch]
    offsets = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.frombuffer(b"".join([entry[2] for entry in batch]), dtype=np.float64)
    weights = None
    if any(entry[3] is not None for entry in batch):
        ones = array("d", [1.0])
        weights = np.frombuffer(
            b"".join([entry[3] if entry[3] is not None else ones * len(entry[2]) for entry in batch]),
            dtype=np.float64,
        )
    # A series whose values were all folded away has an empty segment (from_segments gives EMPTY for
    # it) and its fold holds everything.
    hists = exphist.from_segments(values, weights, offsets, max_buckets=max_buckets, max_scale=max_scale)
    points = []
    point = _point
    histogram_kind = Kind.HISTOGRAM
    for (canon, unit, _, _, folded), hist, length in zip(batch, hists, lengths, strict=True):
        if folded is not None:
            hist = exphist.merge(folded, hist, max_buckets=max_buckets) if length else folded
        points.append(
            point(
                labelled(canon, histogram_kind), time_unix_nano, 0.0, start_time_unix_nano, False, hist, unit
            )
        )
    return points


class StatsdAggregator:
    """Parses StatsD/DogStatsD packets and aggregates them per flush interval.

    Not thread-safe: one event loop calls ``feed``, ``swap``, ``build`` and ``take_events``. ``feed``
    never raises on any input. Call ``build`` (and exhaust it) for every interval ``swap`` returns.
    """

    def __init__(
        self,
        *,
        max_buckets: int = 2048,
        max_scale: int = 8,
        max_series: int = 100_000,
        gauge_idle_flushes: int = 360,
        clock_s: Callable[[], float] = time.time,
        max_set_members: int = 100_000,
        max_set_members_total: int = 1_000_000,
        limits: SeriesLimits = DEFAULT_LIMITS,
    ) -> None:
        if min(max_series, gauge_idle_flushes, max_set_members, max_set_members_total) < 1 or max_buckets < 2:
            raise ValueError(
                "max_series, gauge_idle_flushes, max_set_members(_total) must be >= 1; max_buckets >= 2"
            )
        self.accepted = 0
        """Values accepted since creation (each packed value, set member, event or check counts one)."""
        self.refused: dict[str, int] = {}
        """Reason → lines refused since creation (see REFUSAL_REASONS)."""
        self.tag_errors: dict[str, int] = {}
        """Reason → embedded tags dropped from lines that were kept, since creation (see
        TAG_ERROR_REASONS; a missing bracket counts one)."""
        self.events: list[StatsdEvent | StatsdServiceCheck] = []
        """Parsed events and service checks not yet taken."""
        self.gauges_forgotten = 0
        """Gauge bases (last values kept for +/- deltas) forgotten before their expiry because more than
        ``max_series`` were kept; a delta sent later for one of them applies to 0."""
        self._event_bytes = 0
        self._max_buckets = max_buckets
        self._max_scale = max_scale
        self._max_series = max_series
        self._idle_flushes = gauge_idle_flushes
        self._max_set_members = max_set_members
        self._max_set_members_total = max_set_members_total
        self._cache_max = max(_CACHE_MIN, max_series + max_series // 4)
        self._parser = LineParser(cache_max=self._cache_max, clock_s=clock_s, limits=limits)
        self._iv = Interval(1)
        self._gauge_last: dict[bytes, float] = {}
        """Latest value per gauge series, across intervals: the base for +/- deltas."""
        self._gauge_seen: dict[bytes, int] = {}
        """Seq of the last interval that updated each gauge in _gauge_last (the idle clock)."""
        self._names: dict[bytes, model.SeriesKey] = {}
        self._pieces: dict[bytes, Any] = {}
        self._fold_ok = True
        self._spare: list[array[float]] = []
        """Empty value arrays of built intervals, for the next intervals' histogram series. An array is a
        container the garbage collector tracks: at 100,000 series (20,000 of them timers) making a fresh
        one per series per interval kept ~20,000 new objects in the young generations for every
        collection to walk (~10 ms a collection); reused, they are old and frozen (agent/gcpolicy.py)."""
        self.stamp_ns = 0
        """Arrival time (unix ns) of the packet being fed; written into ``gauge_log`` (workers only)."""
        self.gauge_log: list[tuple[SeriesKey, int, float, bool]] | None = None
        """When set (a worker process), every gauge write as (series key, ``stamp_ns``, value, is a
        +/- delta), in order: the main process replays all workers' writes by arrival time, so deltas
        and "last write wins" come out as one process would have them (receivers/statsd/workers.py)."""

    @property
    def series_count(self) -> int:
        """Series in the current interval."""
        return self._iv.n_series

    def take_events(self) -> list[StatsdEvent | StatsdServiceCheck]:
        """The parsed events and service checks, in arrival order; the list starts again empty."""
        events, self.events = self.events, []
        self._event_bytes = 0
        return events

    def swap(self) -> Interval:
        """Detach the current interval (O(1)); ``feed`` continues into a fresh one."""
        done = self._iv
        self._iv = Interval(done.seq + 1)
        return done

    def take_part(self) -> IntervalPart:
        """Worker side: detach the current interval with the counts and events since the last call, for
        the main process's ``absorb``. A worker never builds points, so the gauge bases it keeps only
        for its own interval start again (the main process holds the real ones)."""
        iv = self.swap()
        log, self.gauge_log = self.gauge_log or [], []
        self._gauge_last.clear()
        self._gauge_seen.clear()
        refused, self.refused = self.refused, {}
        tag_errors, self.tag_errors = self.tag_errors, {}
        accepted, self.accepted = self.accepted, 0
        return IntervalPart(iv, log, self.take_events(), accepted, refused, tag_errors)

    def absorb(self, interval: Interval, parts: list[IntervalPart]) -> None:
        """Main side: merge the workers' parts into ``interval`` (detached by ``swap``) exactly as if this
        aggregator had taken all their lines: counters sum, sets unite, histogram values and folds
        join, and gauge writes are replayed in arrival order over the gauge bases held here (deltas
        apply to the latest value whichever worker set it; the last write wins). Counts and events
        are added to this aggregator's."""
        counters, sets = interval.counters, interval.sets
        for part in parts:
            self.accepted += part.accepted
            for reason, n in part.refused.items():
                self.refused[reason] = self.refused.get(reason, 0) + n
            for reason, n in part.tag_errors.items():
                self.tag_errors[reason] = self.tag_errors.get(reason, 0) + n
            self.events.extend(part.events[: max(0, MAX_EVENTS - len(self.events))])
            got = part.interval
            for key, value in got.counters.items():
                total = counters.get(key)
                counters[key] = value if total is None else total + value
            for canon, members in got.sets.items():
                held = sets.get(canon)
                if held is None:
                    sets[canon] = members
                else:
                    held |= members
            for timer in (True, False):
                self._absorb_histograms(interval, got, timer)
        writes = [part.gauge_log for part in parts if part.gauge_log]
        if writes:
            # Stable: writes with the same stamp keep their order within a worker.
            ordered = writes[0] if len(writes) == 1 else sorted(chain(*writes), key=itemgetter(1))
            gauges, base, seen, seq = interval.gauges, self._gauge_last, self._gauge_seen, interval.seq
            for key, _, value, delta in ordered:
                name: bytes = key[0] if isinstance(key, tuple) else key
                if delta:
                    value += base.get(name, 0.0)
                    if value - value:
                        continue  # past the double range: a worker refused it (invalid_value) with its base
                if key not in gauges or isinstance(key, tuple):
                    seen[name] = seq
                gauges[key] = value
                base[name] = value
        interval.n_members = sum(len(m) for m in sets.values())
        interval.n_series = (
            len(counters) + len(interval.gauges) + len(sets) + len(interval.timers) + len(interval.dists)
        )

    def _absorb_histograms(self, into: Interval, got: Interval, timer: bool) -> None:
        table, weights_table, folds = (
            (into.timers, into.timer_weights, into.timer_folds)
            if timer
            else (into.dists, into.dist_weights, into.dist_folds)
        )
        got_table, got_weights, got_folds = (
            (got.timers, got.timer_weights, got.timer_folds)
            if timer
            else (got.dists, got.dist_weights, got.dist_folds)
        )
        for canon, values in got_table.items():
            held = table.get(canon)
            weights = got_weights.get(canon)
            held_weights = weights_table.get(canon)
            if held is None:
                table[canon] = values
                if weights is not None:
                    weights_table[canon] = weights
                continue
            if weights is not None or held_weights is not None:
                weights_table[canon] = (
                    held_weights if held_weights is not None else array("d", [1.0]) * len(held)
                ) + (weights if weights is not None else array("d", [1.0]) * len(values))
            held.extend(values)
        for canon, folded in got_folds.items():
            held_fold = folds.get(canon)
            if held_fold is not None:
                folded = exphist.merge(held_fold, folded, max_buckets=self._max_buckets)
            folds[canon] = folded
            if canon not in table:
                table[canon] = array("d")

    def build(
        self, interval: Interval, start_time_unix_nano: int, time_unix_nano: int, chunk_size: int = 2000
    ) -> Iterator[list[Point]]:
        """Points of a detached interval in lists of at most ``chunk_size``: counters, gauges, sets,
        then histograms. Each list costs a few milliseconds at most, so the caller can yield to the
        event loop between them. Also forgets gauges idle for ``gauge_idle_flushes`` flushes. Once every
        chunk is taken, the interval's raw histogram values are gone: their arrays serve the next
        intervals (``_spare``)."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.gauges_forgotten += expire_gauges(
            self._gauge_last,
            self._gauge_seen,
            interval.seq,
            self._idle_flushes,
            self._max_series,
            self._iv.seq,
        )
        if len(self._names) > self._cache_max or len(self._pieces) > 4 * self._cache_max:
            self._names.clear()
            self._pieces.clear()
        return self._recycled_after(
            interval,
            build_points(
                interval,
                start_time_unix_nano,
                time_unix_nano,
                chunk_size,
                self._names,
                self._max_buckets,
                self._pieces,
                self._max_scale,
            ),
        )

    def _recycled_after(self, interval: Interval, chunks: Iterator[list[Point]]) -> Iterator[list[Point]]:
        """``chunks``; once all are taken, the interval's raw value arrays (copied into the histograms,
        referenced by no point) are emptied into ``_spare``, which keeps at most as many as this interval
        had. A build not taken to the end recycles nothing."""
        yield from chunks
        spare = self._spare
        used = 0
        for table in (interval.timers, interval.timer_weights, interval.dists, interval.dist_weights):
            used += len(table)
            for values in table.values():
                try:
                    del values[:]
                except BufferError:  # a view of it is still alive somewhere: let it go
                    continue
                spare.append(values)
            table.clear()
        del spare[used:]

    # -- ingest ------------------------------------------------------------------------------------
    def feed(self, packet: bytes) -> None:
        """Parse and aggregate every line of one datagram or one chunk of whole stream lines."""
        if packet.__class__ is not bytes:
            packet = bytes(packet)
        # The hot path. Everything the loop touches is hoisted into locals (each attribute lookup
        # saved is ~20 ns a line; the budget is ~1 µs). A line is cut into name, value and tail with
        # two partitions; (name, tail) finds the cached descriptor — canonical series key, type, 1/rate
        # — so tags are neither parsed nor sorted again. Anything unusual or wrong goes to _slow_line,
        # which parses the line from scratch and states the refusal reason.
        iv = self._iv
        counters = iv.counters
        gauges = iv.gauges
        timers = iv.timers
        timer_weights = iv.timer_weights
        dists = iv.dists
        dist_weights = iv.dist_weights
        sets = iv.sets
        gauge_last = self._gauge_last
        descriptor_get = self._parser.descriptors.get
        descriptor = self._parser.descriptor
        slow = self._slow_line
        numeric = NUMERIC
        fold_at = FOLD_VALUES
        max_series = self._max_series
        max_members = self._max_set_members
        max_members_total = self._max_set_members_total
        gauge_log = self.gauge_log
        spare = self._spare
        accepted = 0
        for line in packet.split(b"\n"):
            if not line:
                continue
            try:
                name, _, rest = line.partition(b":")
                value, _, tail = rest.partition(b"|")
                key = (name, tail)
                found = descriptor_get(key)
                if found is None:
                    found = descriptor(key)
                    if found is None:
                        accepted += slow(line)
                        continue
                canon, code, inv = found
                if code == COUNTER:
                    if not value.isdigit() and value.translate(None, numeric):  # isdigit: ASCII only
                        accepted += slow(line)
                        continue
                    v = float(value) * inv
                    if v < 0.0 or v - v:  # negative, or overflowed to inf
                        accepted += slow(line)
                        continue
                    total = counters.get(canon)
                    if total is None:
                        if iv.n_series >= max_series:
                            accepted += slow(line)
                            continue
                        iv.n_series += 1
                        counters[canon] = v
                    else:
                        total += v
                        if total - total:
                            accepted += slow(line)
                            continue
                        counters[canon] = total
                elif code <= HISTOGRAM:  # TIMER or HISTOGRAM
                    if not value.isdigit() and value.translate(None, numeric):
                        accepted += slow(line)
                        continue
                    v = float(value)
                    if v - v:
                        accepted += slow(line)
                        continue
                    if code == TIMER:
                        v /= 1000.0
                        table = timers
                        weights_table = timer_weights
                    else:
                        table = dists
                        weights_table = dist_weights
                    if inv != 1.0 and v * inv - v * inv:  # the weighted value would overflow the sum
                        accepted += slow(line)
                        continue
                    values = table.get(canon)
                    if values is None:
                        if iv.n_series >= max_series:
                            accepted += slow(line)
                            continue
                        iv.n_series += 1
                        values = table[canon] = spare.pop() if spare else array("d")
                    if inv != 1.0:
                        weights = weights_table.get(canon)
                        if weights is None:
                            weights = weights_table[canon] = array("d", [1.0]) * len(values)
                        weights.append(inv)
                    elif weights_table and canon in weights_table:
                        weights_table[canon].append(1.0)
                    values.append(v)
                    if len(values) >= fold_at:
                        self._fold(code == TIMER, canon)
                elif code == GAUGE:
                    if not value.isdigit() and value.translate(None, numeric):
                        accepted += slow(line)
                        continue
                    v = float(value)
                    if v - v:
                        accepted += slow(line)
                        continue
                    first = value[0]
                    written = v
                    if first == 43 or first == 45:  # '+' / '-': a delta on the previous value
                        v += gauge_last.get(canon, 0.0)
                        if v - v:
                            accepted += slow(line)
                            continue
                    if canon not in gauges:
                        if iv.n_series >= max_series:
                            accepted += slow(line)
                            continue
                        iv.n_series += 1
                        self._gauge_seen[canon] = iv.seq
                    gauges[canon] = v
                    gauge_last[canon] = v
                    if gauge_log is not None:  # a worker process only (None in-process: one test)
                        gauge_log.append((canon, self.stamp_ns, written, first == 43 or first == 45))
                else:  # SET
                    members = sets.get(canon)
                    held = iv.n_members
                    if members is None:
                        if not value or iv.n_series >= max_series or held >= max_members_total:
                            accepted += slow(line)
                            continue
                        iv.n_series += 1
                        sets[canon] = {hash(value)}
                        iv.n_members = held + 1
                    else:
                        # At a cap the slow path decides: a member already seen still counts.
                        size = len(members)
                        if not value or size >= max_members or held >= max_members_total:
                            accepted += slow(line)
                            continue
                        members.add(hash(value))
                        iv.n_members = held + len(members) - size
                accepted += 1
            except Exception:  # float() refusing what translate let through ('1.2.3', '+', 'e5')
                accepted += slow(line)
        self.accepted += accepted

    def _slow_line(self, line: bytes) -> int:
        """Parse and apply one line completely; returns the values accepted, counts a refusal."""
        try:
            parsed = self._parser.parse(line)
            reason = parsed if isinstance(parsed, str) else self._apply(parsed, len(line))
        except Exception:
            _log.exception("statsd parser failed on a line; refused as malformed_line (this is a bug)")
            reason = MALFORMED_LINE
        if isinstance(reason, str):
            self.refused[reason] = self.refused.get(reason, 0) + 1
            return 0
        if isinstance(parsed, MetricLine) and parsed.tag_errors:
            tag_errors = self.tag_errors
            for error in parsed.tag_errors:
                tag_errors[error] = tag_errors.get(error, 0) + 1
        return reason

    def _apply(self, parsed: MetricLine | StatsdEvent | StatsdServiceCheck, size: int) -> int | str:
        """Aggregate one parsed line of ``size`` bytes: values accepted, or a refusal reason (nothing
        applied then)."""
        if not isinstance(parsed, MetricLine):
            if len(self.events) >= MAX_EVENTS or self._event_bytes + size > MAX_EVENT_BYTES:
                return EVENT_LIMIT
            self.events.append(parsed)
            self._event_bytes += size
            return 1
        iv = self._iv
        canon, code, values = parsed.canon, parsed.code, parsed.values
        ts = parsed.timestamp_s
        key: SeriesKey = canon if ts is None else (canon, ts)
        if code == COUNTER:
            total = iv.counters.get(key)
            new = total is None
            # In order, as one line after another would add them (on 3.11 sum() adds floats plainly;
            # -0.0 is the identity that keeps a lone -0 as it is).
            total = sum(values, -0.0 if total is None else total)
            if total - total:
                return INVALID_VALUE
            if new and not self._admit(iv):
                return SERIES_LIMIT
            iv.counters[key] = total
            return len(values)
        if code == GAUGE:
            current = self._gauge_last.get(canon, 0.0)
            for v, delta in zip(values, parsed.deltas, strict=True):
                current = current + v if delta else v
                if current - current:
                    return INVALID_VALUE
            new = key not in iv.gauges
            if new and not self._admit(iv):
                return SERIES_LIMIT
            if new or ts is not None:
                self._gauge_seen[canon] = iv.seq
            iv.gauges[key] = current
            self._gauge_last[canon] = current
            if self.gauge_log is not None:
                stamp = self.stamp_ns
                self.gauge_log.extend(
                    (key, stamp, v, delta) for v, delta in zip(values, parsed.deltas, strict=True)
                )
            return len(values)
        if code == SET:
            member = hash(parsed.member)
            members = iv.sets.get(canon)
            if members is None:
                if iv.n_series >= self._max_series:
                    return SERIES_LIMIT
                if iv.n_members >= self._max_set_members_total:
                    return SET_MEMBER_LIMIT
                self._admit(iv)
                members = iv.sets[canon] = set()
            elif member in members:
                return 1
            elif len(members) >= self._max_set_members or iv.n_members >= self._max_set_members_total:
                return SET_MEMBER_LIMIT
            members.add(member)
            iv.n_members += 1
            return 1
        timer = code == TIMER
        table = iv.timers if timer else iv.dists
        weights_table = iv.timer_weights if timer else iv.dist_weights
        stored = table.get(canon)
        if stored is None:
            if not self._admit(iv):
                return SERIES_LIMIT
            stored = table[canon] = self._spare.pop() if self._spare else array("d")
        inv = parsed.inv_rate
        weights = weights_table.get(canon)
        if weights is None and inv != 1.0:
            weights = weights_table[canon] = array("d", [1.0]) * len(stored)
        stored.extend(values)
        if weights is not None:
            weights.extend([inv] * len(values))
        if len(stored) >= FOLD_VALUES:
            self._fold(timer, canon)
        return len(values)

    def _admit(self, iv: Interval) -> bool:
        """Take one series slot of the interval, if the cap allows."""
        if iv.n_series >= self._max_series:
            return False
        iv.n_series += 1
        return True

    def _fold(self, timer: bool, canon: bytes) -> None:
        """Fold a histogram series' raw values into its ExpHistogram so memory stays bounded."""
        if not self._fold_ok:
            return
        iv = self._iv
        table = iv.timers if timer else iv.dists
        weights_table = iv.timer_weights if timer else iv.dist_weights
        folds = iv.timer_folds if timer else iv.dist_folds
        weights = weights_table.get(canon)
        try:
            folds[canon] = fold(table[canon], weights, folds.get(canon), self._max_buckets, self._max_scale)
        except Exception:
            # A bug in the histogram code: keep the raw values (build() still turns them into a
            # histogram) and stop folding rather than fail every line.
            _log.exception("folding statsd histogram values failed; folding disabled")
            self._fold_ok = False
            return
        table[canon] = array("d")
        if weights is not None:
            weights_table[canon] = array("d")
