"""One StatsD flush interval's state, and the flush that turns it into points.

The parser (``receivers/statsd/parser.py``) writes into an :class:`Interval` on the hot path; the
receiver detaches it with ``StatsdAggregator.swap()`` and turns it into points with ``build()``, which
calls :func:`build_points` here. The rules users see are documented in ``parser.py``.

Series are keyed by a *canonical key*: the metric name, then (only when there are labels) ``0xff`` and
the labels sorted by name as ``key 0xfd value`` joined by ``0xfe``. Those three bytes never occur in
valid UTF-8, so the key is unambiguous, its hash is computed once (bytes cache their hash) and it
decodes back to ``(name, labels)`` without a side table. Counters and gauges carrying a DogStatsD
``|T`` timestamp are keyed by ``(canonical key, unix seconds)``.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

import numpy as np

from agent import exphist
from agent.model import Kind, Labels, Point, Temporality, new_point

FOLD_VALUES = 8192
"""Values one histogram series keeps raw in an interval; at this many they are folded into an
exponential histogram and the array starts again, so memory per series stays bounded."""

HIST_VALUES_PER_CHUNK = 32_768
"""Raw values turned into histograms per ``build()`` chunk (plus at most one series' worth): keeps each
chunk's ``from_segments`` call in the low milliseconds however many samples the timers got."""

NAME_SEP = b"\xff"
PAIR_SEP = b"\xfe"
KV_SEP = b"\xfd"

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


def _point(
    name: str, kind: Kind, labels: Labels, time_unix_nano: int, value: float, start_time_unix_nano: int,
    monotonic: bool, histogram: exphist.ExpHistogram | None, unit: str,
) -> Point:
    """A DELTA Point, built fast (a flush builds one per series: 100k per interval; see new_point)."""
    return new_point(
        name, kind, labels, time_unix_nano, value, start_time_unix_nano, Temporality.DELTA, monotonic,
        histogram, unit, "", None, None, None, None,
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
    last_value: dict[bytes, float], last_seen: dict[bytes, int], built_seq: int, idle_flushes: int,
    max_remembered: int, live_seq: int,
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
    names: dict[bytes, tuple[str, Labels]],
    max_buckets: int,
    pieces: dict[bytes, Any] | None = None,
    max_scale: int = exphist.MAX_SCALE,
) -> Iterator[list[Point]]:
    """Points for one detached interval, in lists of at most ``chunk_size``.

    ``names`` caches canonical key → (name, labels) across flushes so names and labels are decoded once
    per series, not once per flush, and ``pieces`` the decoded names and pairs they share (see
    ``decode_series``); the caller bounds both.
    """
    out: list[Point] = []
    length_ns = time_unix_nano - start_time_unix_nano
    point = _point

    def labelled(canon: bytes) -> tuple[str, Labels]:
        found = names.get(canon)
        if found is None:
            found = names[canon] = decode_series(canon, pieces)
        return found

    for key, value in interval.counters.items():
        if isinstance(key, tuple):
            canon, ts_s = key
            end_ns = ts_s * 1_000_000_000
            begin_ns = max(0, end_ns - length_ns)
        else:
            canon, begin_ns, end_ns = key, start_time_unix_nano, time_unix_nano
        name, labels = labelled(canon)
        out.append(point(name, Kind.SUM, labels, end_ns, value, begin_ns, True, None, ""))
        if len(out) >= chunk_size:
            yield out
            out = []

    for key, value in interval.gauges.items():
        if isinstance(key, tuple):
            canon, ts_s = key
            end_ns = ts_s * 1_000_000_000
        else:
            canon, end_ns = key, time_unix_nano
        name, labels = labelled(canon)
        out.append(point(name, Kind.GAUGE, labels, end_ns, value, 0, False, None, ""))
        if len(out) >= chunk_size:
            yield out
            out = []

    for canon, members in interval.sets.items():
        name, labels = labelled(canon)
        out.append(point(name, Kind.GAUGE, labels, time_unix_nano, float(len(members)), 0, False, None, "1"))
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
            batch.append((
                canon, unit, values, weights_by.get(canon) if weights_by else None,
                folds_by.get(canon) if folds_by else None,
            ))
            n_values += len(values)
            if len(batch) >= chunk_size or n_values >= HIST_VALUES_PER_CHUNK:
                yield _histogram_points(batch, start_time_unix_nano, time_unix_nano, labelled, max_buckets,
                                        max_scale)
                batch = []
                n_values = 0
    if batch:
        yield _histogram_points(batch, start_time_unix_nano, time_unix_nano, labelled, max_buckets, max_scale)


def _histogram_points(
    batch: list[tuple[bytes, str, array[float], array[float] | None, exphist.ExpHistogram | None]],
    start_time_unix_nano: int,
    time_unix_nano: int,
    labelled: Callable[[bytes], tuple[str, Labels]],
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
        name, labels = labelled(canon)
        points.append(point(name, histogram_kind, labels, time_unix_nano, 0.0, start_time_unix_nano, False,
                            hist, unit))
    return points
