"""Aggregate processor: stream aggregation over tumbling or sliding windows (after vmagent's).

    processors:
      aggregate:
        rules:
          - match: ["http.requests", "api.*.latency"]
            intervals: [1m, 1h]
            without: [pod, instance]      # or by: [route, code]
            outputs: [count, sum, avg, min, max, rate, increase, quantiles]
            quantiles: [0.5, 0.99]
            keep_input: false             # drop the raw series (the cardinality saving)

A point whose name matches a rule's glob (``*`` crosses dots) is folded into its *group*: the rule,
the metric name, the kind of data, and the labels the rule keeps (``by``: only those; ``without``: all
but those; neither: all). Each interval is a tumbling window aligned to the wall clock (UTC): a 1m
window ends on every minute, 1h on the hour, 1d at midnight UTC; an interval must divide a day and,
within a rule, be a multiple of the rule's shortest one (1m, 5m, 15m, 1h, 1d all fit). Points are
placed in the window being filled when they arrive; a point whose own timestamp is older than that
window's start by more than ``max_delay`` is *late*: not folded, passed on raw and counted
(``headwater_aggregate_late_points_total``). At each window's end the processor sends one point per
group and output, stamped with the window's end; on shutdown the windows being filled are sent as
they are (rate over the part elapsed). A coarser window is made by merging the finer ones exactly:
each interval from the one below it when each is a multiple of the one before (1m → 5m → 1h: one
merge per group and minute), else each from the shortest.

Sliding windows (``slide: 1m``): every interval is sent each slide over the interval just ended, like
PromQL's ``avg_over_time(x[5m])`` evaluated every minute: the 5m window sent at 12:07 holds the
samples placed in [12:02, 12:07). ``slide`` divides every interval (at most 120 slides each; the
intervals need not be multiples of each other). Each group keeps one state per slide of its longest
interval (the *slices*, as ``percentiles`` keeps slices of its rolling windows, but exact: counts,
sums, extremes, moments and the merged histogram of each slide) and a window is their exact merge,
so every output is what the tumbling window over the same span would give; ``rate`` divides by the
interval (partial at start-up). Cost: at each slide's end a group merges as many slice states as its
longest interval has slides (1h sliding by 1m: 60 a minute), and holds that many.

Samples: a GAUGE (or a non-monotonic SUM) is one sample of its value; a monotonic SUM (a counter) is
one sample of its increase — a DELTA point's value, or a CUMULATIVE point's difference from its
series' previous point. A cumulative value below the previous one (or a new start time) is a reset:
the new value is the increase (Prometheus' rule). A cumulative series' first point only sets its
baseline, unless its start time is after the processor started (a counter born since then: its whole
value is the increase), so a restart of the agent never counts a lifetime total as one window's
increase. A HISTOGRAM (exponential, or explicit-bucket converted as ``percentiles`` does; cumulative
ones as differences) adds its observations.

Outputs (all GAUGE points except ``histogram``); an output that does not apply to a group's kind is
not sent for it:

- ``count``, ``sum``, ``avg``, ``min``, ``max``: over the window's samples (distributions: over the
  observations), exact (``sum`` and ``avg`` to float rounding).
- ``last`` (the sample with the latest timestamp), ``stddev`` (population, numpy's ``ddof=0``), and
  ``slope`` (least-squares slope of value against the points' timestamps, per second; needs two
  distinct times): gauges and counters.
- ``increase`` (the sum of the increases) and ``rate`` (increase per second of the window): counters.
- ``quantiles`` (one point per ``quantiles`` entry, labelled ``quantile``) and ``histogram`` (the
  window's merged exponential histogram, DELTA over the window): distributions, and gauges (over the
  window's samples: kept as values in the shortest window, made a histogram at its end). A quantile
  is within ``exphist.relative_error(scale)`` of the exact one over the raw observations or samples
  (the rank rule of numpy's ``inverted_cdf``; 0.54 % at scale 6, 0.034 % at scale 10), the scale
  being the merged histogram's (``max_buckets`` bounds it, as in ``percentiles``). Not exact: the
  coarser and sliding windows merge histograms, not samples (bounded memory).

Naming, one rule: ``<name>.<interval>[_by_<l1>_<l2>|_without_<l1>_<l2>].<output>``, e.g.
``http.requests.5m_without_pod.rate`` and ``api.latency.1m_by_route.quantile{quantile="0.99"}``. It
is vmagent's ``<name>:<interval>[_by_…|_without_…]_<output>`` in OTLP's dotted form: a colon is not a
valid OTel instrument name character, and Prometheus reserves colons for recording rules, so the
Prometheus form is the exporters' usual translation of the dotted name (dots to ``_``, plus the unit
suffix of the outputs that keep the input's unit: all but ``count``, ``rate`` and ``slope``):
``http_requests_5m_without_pod_rate``, ``api_latency_1m_by_route_quantile_seconds``. The label
lists in the name keep two rules over the same metric apart; the interval keeps windows apart.

Bounds: at most ``max_series`` groups (all rules and intervals share it, each group holding one
accumulator per interval) and ``max_series`` input series tracked for cumulative baselines; a point
that would need one more is passed on raw and counted (``headwater_aggregate_overflow_points_total``).
Idle groups and series are forgotten after twice the rule's longest interval.

A window's end never blocks the event loop for long: each group's accumulator is swapped for an empty
one at the boundary (one pass of pointer swaps), and the ended window is then sent, merged into the
coarser windows and expired :data:`_GROUPS_PER_STEP` groups at a time, each step's points handed on
before the next step and a yield to the loop; the histograms of a step's groups are merged in one
pass (:func:`exphist.merge_groups`).

Backpressure: raw points are handed on before anything is folded, so a refusal downstream is raised
to the sender with nothing taken (its retry does not count twice). Window outputs refused downstream
are kept and resent (every second by the timer, and before the next batch); while they wait, incoming
batches are refused upstream, so nothing is folded into a window that could not be sent.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from agent import distributions, exphist
from agent.component import (
    Backpressure,
    ComponentKind,
    Consumer,
    Factory,
    Settings,
    Signal,
    Tasks,
    run_periodically,
)
from agent.confmodel import Duration
from agent.counting import PointCounts
from agent.exphist import ExpHistogram
from agent.model import (
    ExplicitHistogram,
    Kind,
    Labels,
    MetricBatch,
    Point,
    SeriesKey,
    Temporality,
    key_of,
    new_point,
)
from processors.aggregate.window import Acc, settle

TYPE = "aggregate"

Output = Literal[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "last",
    "stddev",
    "rate",
    "increase",
    "slope",
    "quantiles",
    "histogram",
]
_DAY_S = 86400.0
_RETRY_S = 1.0
"""How often window outputs refused downstream are offered again."""
_POINTS_PER_BATCH = 2000
"""Window output points per batch handed on."""
_GROUPS_PER_STEP = 250
"""Groups sent between yields to the event loop at a window's end (~2 ms of work; their points are
handed on before the next step)."""

_NO_RING: collections.deque[Any] = collections.deque(maxlen=0)
"""Tumbling windows' (shared, never appended to): no deque per group."""
_MAX_SLICES = 120
"""Slides per sliding interval at most: a group keeps one slice state per slide of its longest one."""
_GAUGE, _COUNTER, _DIST = 0, 1, 2
"""Group kinds: gauge samples, counter increases, distributions."""
_APPLIES = {
    _GAUGE: {"count", "sum", "avg", "min", "max", "last", "stddev", "slope", "quantiles", "histogram"},
    _COUNTER: {"count", "sum", "avg", "min", "max", "last", "stddev", "slope", "rate", "increase"},
    _DIST: {"count", "sum", "avg", "min", "max", "quantiles", "histogram"},
}
_Names = tuple[tuple[tuple[int, str, Labels, str, int], ...], ...]
"""Per interval: (output code, point name, labels, unit, index in the rule's quantiles) of each output
sent for a group. Tuples of strings and numbers: the garbage collector stops tracking them (lists it
would walk at every collection)."""
_CODES = {
    "count": 0, "sum": 1, "increase": 1, "avg": 2, "min": 3, "max": 4, "last": 5, "rate": 6,
    "stddev": 7, "slope": 8, "quantiles": 9, "histogram": 10,
}  # fmt: skip
"""Outputs by code: below :data:`_SIMPLE` read from one tuple of an accumulator's plain figures."""
_SIMPLE = 7
"""Codes below this are plain figures."""
_STDDEV, _SLOPE, _QUANTILE = 7, 8, 9
_UNITLESS = {"count", "rate", "slope"}
"""Outputs that do not carry the input's unit (a count; per-second figures)."""


@dataclass(frozen=True)
class RuleConfig:
    match: list[str] = field(default_factory=list)
    """Metric name globs (``*`` crosses dots) this rule aggregates (required)."""
    intervals: list[Duration] = field(default_factory=lambda: [Duration(60.0)])
    """Windows aligned to the clock (UTC): each divides a day, a multiple of the shortest (or of slide)."""
    by: list[str] = field(default_factory=list)
    """Keep only these labels (the others are aggregated away); not with ``without``."""
    without: list[str] = field(default_factory=list)
    """Aggregate these labels away, keep the others; not with ``by``. Neither: keep all labels."""
    outputs: list[Output] = field(default_factory=lambda: ["count", "sum", "avg", "min", "max"])
    """Per window: count, sum, avg, min, max, last, stddev, rate, increase, slope, quantiles, histogram."""
    quantiles: list[float] = field(default_factory=lambda: [0.5, 0.99])
    """For the quantiles output (distributions and gauges): the quantiles, within [0, 1]."""
    keep_input: bool = False
    """Also pass on the raw points this rule aggregates (false drops them: the cardinality saving)."""
    slide: Duration | None = None
    """Sliding windows: send every interval each ``slide`` over the interval just ended (like PromQL's
    ``avg_over_time(x[5m])`` evaluated every minute); divides each interval. Unset: tumbling windows."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.match:
            problems.append(("match", "give at least one metric name glob, like http.*"))
        for i, g in enumerate(self.match):
            if not isinstance(g, str) or not g:
                problems.append((f"match::{i}", "give a non-empty metric name glob"))
        if not self.intervals:
            problems.append(("intervals", "give at least one interval, like 1m"))
        slide = float(self.slide) if self.slide is not None else 0.0
        for i, iv in enumerate(self.intervals):
            if not 1.0 <= iv <= _DAY_S or not _divides(iv, _DAY_S):
                problems.append(
                    (f"intervals::{i}", "must be between 1s and 1d and divide a day (1m, 5m, 15m, 1h, 1d)")
                )
            elif slide > 0:
                if not _divides(slide, iv):
                    problems.append((f"intervals::{i}", f"must be a multiple of slide, {slide:g}s"))
                elif iv / slide > _MAX_SLICES + 1e-9:
                    problems.append(
                        (f"intervals::{i}", f"holds more than {_MAX_SLICES} slides; give a longer slide")
                    )
            elif self.intervals and not _divides(min(self.intervals), iv):
                problems.append(
                    (f"intervals::{i}", f"must be a multiple of the shortest, {min(self.intervals):g}s")
                )
        if self.slide is not None and not (1.0 <= slide <= _DAY_S and _divides(slide, _DAY_S)):
            problems.append(("slide", "must be between 1s and 1d and divide a day (like 1m)"))
        if len(set(self.intervals)) != len(self.intervals):
            problems.append(("intervals", "intervals must be distinct"))
        if self.by and self.without:
            problems.append(("without", "give by or without, not both"))
        if not self.outputs:
            problems.append(("outputs", "give at least one output, like avg"))
        if len(set(self.outputs)) != len(self.outputs):
            problems.append(("outputs", "outputs must be distinct"))
        if "quantiles" in self.outputs and not self.quantiles:
            problems.append(("quantiles", "give at least one quantile, like 0.99"))
        for i, q in enumerate(self.quantiles):
            if not 0.0 <= q <= 1.0:
                problems.append((f"quantiles::{i}", f"{q} is not within [0, 1]"))
        return problems


@dataclass(frozen=True)
class AggregateConfig:
    rules: list[RuleConfig] = field(default_factory=list)
    """The aggregation rules; a point may match several (each folds it)."""
    max_series: int = 100_000
    """Groups held at most (all rules), and input series tracked at most; beyond, points pass on raw."""
    max_delay: Duration = Duration(10.0)
    """A point stamped more than this before the filling window's start is late (counted, passed raw)."""
    max_buckets: int = 1024
    """Buckets per side of a window's merged histogram: more keeps a finer scale (smaller quantile error)."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for i, rule in enumerate(self.rules):
            problems.extend((f"rules::{i}::{p}" if p else f"rules::{i}", m) for p, m in rule.validate())
        if self.max_series < 1:
            problems.append(("max_series", "must be at least 1"))
        if self.max_delay < 0:
            problems.append(("max_delay", "must not be negative"))
        if not 3 <= self.max_buckets <= 16384:
            problems.append(("max_buckets", "must be between 3 and 16384"))
        return problems


def _divides(base: float, value: float) -> bool:
    ratio = value / base
    return round(ratio) >= 1 and math.isclose(ratio, round(ratio), rel_tol=0, abs_tol=1e-9)


def interval_text(seconds: float) -> str:
    """``60`` → ``1m``, ``86400`` → ``1d``: the interval as it appears in output names."""
    for unit, factor in (("d", _DAY_S), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= factor and math.isclose(seconds / factor, round(seconds / factor)):
            return f"{round(seconds / factor)}{unit}"
    return f"{seconds:g}s"


def output_prefix(name: str, interval_s: float, by: list[str], without: list[str]) -> str:
    """``<name>.<interval>[_by_…|_without_…]``: the output names' common part (see the module doc)."""
    text = f"{name}.{interval_text(interval_s)}"
    if by:
        text += "_by_" + "_".join(by)
    elif without:
        text += "_without_" + "_".join(without)
    return text


class _Rule:
    """A rule as the processor runs it."""

    __slots__ = (
        "_by_list",
        "_without_list",
        "base",
        "by",
        "chain",
        "coarse",
        "cutoff_ns",
        "filling",
        "groups",
        "histograms",
        "index",
        "intervals",
        "keep_input",
        "moments",
        "outputs",
        "quantiles",
        "regex",
        "slices",
        "without",
    )

    def __init__(self, index: int, config: RuleConfig, now: float, max_delay_s: float) -> None:
        self.index = index
        self.regex = re.compile("|".join(fnmatch.translate(g) for g in config.match))
        self.intervals = sorted(float(iv) for iv in config.intervals)
        slide = float(config.slide) if config.slide is not None else 0.0
        self.slices = [round(iv / slide) for iv in self.intervals] if slide > 0 else []
        """Sliding: per interval, the slides it spans (empty for tumbling windows)."""
        self.base = slide if slide > 0 else self.intervals[0]
        """The shortest interval (sliding: the slide): points fold into its window; the others merge it."""
        self.coarse = [] if self.slices else self.intervals[1:]
        self.chain = all(_divides(a, b) for a, b in zip(self.intervals, self.intervals[1:], strict=False))
        """Each interval a multiple of the one before: a window merges into the next coarser one when it
        ends (one merge per group and shortest window, not one per coarser interval)."""
        self.filling = math.floor(now / self.base) * self.base
        """Start of the shortest interval's window being filled."""
        self.cutoff_ns = int((self.filling - max_delay_s) * 1e9)
        """Points stamped before this (unix ns) are late."""
        self.by = frozenset(config.by) if config.by else None
        self.without = frozenset(config.without) if config.without else None
        self.keep_input = config.keep_input
        self.outputs = list(dict.fromkeys(config.outputs))
        self.quantiles = [float(q) for q in config.quantiles]
        self.histograms = bool({"quantiles", "histogram"} & set(self.outputs))
        """Whether windows need their merged histogram (distributions; gauges keep their samples)."""
        self.moments = bool({"stddev", "slope"} & set(self.outputs))
        """Whether groups keep the moments (stddev and slope need them; the fold skips them otherwise)."""
        self.groups: dict[tuple[str, int, Labels], _Group] = {}
        self._by_list = sorted(config.by)
        self._without_list = sorted(config.without)

    def kept(self, labels: Labels) -> Labels:
        if self.by is not None:
            by = self.by
            return tuple(kv for kv in labels if kv[0] in by)
        if self.without is not None:
            without = self.without
            return tuple(kv for kv in labels if kv[0] not in without)
        return labels

    def names(self, name: str, kind: int, labels: Labels, unit: str) -> _Names:
        """Per interval: (output, point name, labels, unit, quantile) of each output that applies."""
        out: list[tuple[tuple[int, str, Labels, str, int], ...]] = []
        applies = _APPLIES[kind]
        for iv in self.intervals:
            prefix = output_prefix(name, iv, self._by_list, self._without_list)
            per: list[tuple[int, str, Labels, str, int]] = []
            for o in self.outputs:
                if o not in applies:
                    continue
                u = "" if o in _UNITLESS else unit
                if o == "quantiles":
                    for qi, q in enumerate(self.quantiles):
                        ql = tuple(sorted((*labels, ("quantile", f"{q:g}"))))
                        per.append((_QUANTILE, prefix + ".quantile", ql, u, qi))
                else:
                    per.append((_CODES[o], f"{prefix}.{o}", labels, u, 0))
            out.append(tuple(per))
        return tuple(out)


class _Group:
    """One aggregation group: an accumulator per interval of its rule (the shortest first)."""

    __slots__ = ("accs", "closed", "idle", "key", "kind", "labels", "moments", "name", "names", "ring")

    def __init__(
        self,
        key: tuple[str, int, Labels],
        kind: int,
        labels: Labels,
        names: _Names,
        samples: bool,
        moments: bool,
        slices: int,
    ) -> None:
        self.key = key
        self.moments = moments
        """Whether the fold keeps the moments (mean, variance, co-moment): only for stddev and slope."""
        self.name = key[0]
        self.kind = kind
        self.labels = labels
        self.names = names
        self.accs = [Acc(samples) if i == 0 else Acc() for i in range(1 if slices else len(names))]
        """Per interval (sliding: the slide being filled only); the shortest keeps a gauge's samples when
        `samples` (for its quantiles)."""
        self.ring: collections.deque[Acc] = collections.deque(maxlen=slices) if slices else _NO_RING
        """Sliding: the last `slices` slides' states, newest last (merged into each interval's window)."""
        self.closed = Acc(samples)
        """The shortest window that ended, until it is sent (swapped with ``accs[0]`` at its end)."""
        self.idle = 0
        """Shortest windows ended in a row without data."""


class _Closed:
    """A rule's shortest window that ended: its groups are sent and merged a chunk at a time."""

    __slots__ = ("end", "groups", "next", "rule", "start")

    def __init__(self, rule: _Rule, end: float, start: float, groups: list[_Group]) -> None:
        self.rule = rule
        self.end = end
        """When the window ended (unix seconds)."""
        self.start = start
        """Start of the window being filled when it was closed."""
        self.groups = groups
        self.next = 0
        """Groups before this index are done."""


class _Match:
    """The rules a metric name matches (cached per name)."""

    __slots__ = ("cutoff_ns", "keep_input", "rules")

    def __init__(self, rules: tuple[_Rule, ...]) -> None:
        self.rules = rules
        self.keep_input = any(r.keep_input for r in rules)
        self.cutoff_ns = 0
        self.update()

    def update(self) -> None:
        """Points stamped before this (unix ns) are late for one of the rules (after a window end)."""
        self.cutoff_ns = max((r.cutoff_ns for r in self.rules), default=0)


class _Series:
    """An input series: the groups it folds into (one per matching rule) and its cumulative baseline."""

    __slots__ = ("baseline", "generation", "groups", "last_seen", "start_ns")

    def __init__(self) -> None:
        self.groups: list[_Group] = []
        self.baseline: float | ExpHistogram | ExplicitHistogram | None = None
        self.start_ns = 0
        self.last_seen = 0.0
        self.generation = -1
        """The processor's group generation its groups were looked up at (see ``_generation``)."""


def _group_kind(p: Point) -> int:
    if p.kind is Kind.HISTOGRAM:
        return _DIST
    if p.kind is Kind.SUM and p.monotonic:
        return _COUNTER
    return _GAUGE


class AggregateProcessor:
    """See the module docstring. `clock` (unix seconds) is injectable for tests; `run_timer=False`
    leaves rolling windows over to explicit :meth:`tick` calls."""

    def __init__(
        self,
        settings: Settings,
        config: AggregateConfig,
        next_consumer: Consumer,
        *,
        clock: Callable[[], float] = time.time,
        run_timer: bool = True,
    ) -> None:
        self._settings = settings
        self._config = config
        self._next = next_consumer
        self._clock = clock
        self._run_timer = run_timer
        self._logger: logging.Logger = settings.logger
        self._tasks = Tasks(str(settings.id), self._logger)
        now = clock()
        self._started_ns = int(now * 1e9)
        self._epoch = math.floor(now / _DAY_S) * _DAY_S
        """Sample times are kept relative to this (midnight UTC before start): small, precise floats."""
        self._rules = [_Rule(i, r, now, float(config.max_delay)) for i, r in enumerate(config.rules)]
        self._longest = max((r.intervals[-1] for r in self._rules), default=60.0)
        self._matching: dict[str, _Match] = {}
        self._generation = 0
        """Bumped when groups expire: a series looked up at an older one finds its groups again."""
        self._series: dict[SeriesKey, _Series] = {}
        self._group_count = 0
        self._closed: collections.deque[_Closed] = collections.deque()
        """Windows that ended and whose groups are not all sent yet, oldest first."""
        self._pending: collections.deque[MetricBatch] = collections.deque()
        """Window outputs refused downstream, oldest first: resent before anything else."""
        self._started = False
        self._stopped = False

        tel = settings.telemetry
        self._counts = PointCounts(tel)
        self._late = tel.counter(
            "aggregate_late_points_total", "Points stamped before the window being filled: passed on raw."
        )
        self._overflow = tel.counter(
            "aggregate_overflow_points_total", "Points of groups or series beyond max_series: passed on raw."
        )
        self._non_finite = tel.counter(
            "aggregate_ignored_points_total", "Matching points not folded, by reason.", reason="non_finite"
        )
        self._invalid = tel.counter(
            "aggregate_ignored_points_total",
            "Matching points not folded, by reason.",
            reason="invalid_histogram",
        )
        self._windows = tel.counter("aggregate_windows_total", "Group windows sent (per group and interval).")
        tel.gauge("aggregate_groups", "Aggregation groups held now.", lambda: float(self._group_count))
        tel.gauge(
            "aggregate_pending_points",
            "Window output points refused downstream, waiting to be resent.",
            lambda: float(sum(len(b) for b in self._pending)),
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        if self._run_timer and self._rules:
            self._tasks.spawn(
                run_periodically(self._wait_s, self.tick, self._logger, "aggregate: window outputs (kept)"),
                "windows",
            )

    async def shutdown(self) -> None:
        """Stop the timer, then send the windows being filled as they are (once); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self._tasks.close()
        now = self._clock()
        self._roll(now)
        while self._closed:
            self._step(self._closed[0], None)
        for rule in self._rules:
            self._close_partial(rule, now)
        try:
            await self._flush()
        except Backpressure as exc:
            lost = sum(len(b) for b in self._pending)
            self._counts.dropped("backpressure", lost)
            self._pending.clear()
            self._logger.warning("aggregate: %d window points refused at shutdown: %s", lost, exc.reason)

    def _wait_s(self) -> float:
        due = min(r.filling + r.base for r in self._rules)
        # At most one retry period while outputs wait; never more than the shortest interval (a wall
        # clock stepped back must not put the timer to sleep for hours).
        wait = max(due - self._clock(), 0.0) + 0.001
        if self._pending:
            wait = min(wait, _RETRY_S)
        return min(wait, min(r.base for r in self._rules))

    async def tick(self) -> None:
        """Close the windows that ended by the clock and send what waits; Backpressure if refused."""
        self._roll(self._clock())
        await self._drain()
        await self._flush()

    # -- input ---------------------------------------------------------------------------------------

    def _match_for(self, name: str) -> _Match:
        hit = self._matching.get(name)
        if hit is None:
            hit = _Match(tuple(r for r in self._rules if r.regex.fullmatch(name)))
            if len(self._matching) >= 100_000:  # bounds the cache under name churn
                self._matching.clear()
            self._matching[name] = hit
        return hit

    def _series_for(self, p: Point, key: SeriesKey, rules: tuple[_Rule, ...]) -> _Series | None:
        """The series `key` of `p` with its groups (made if room), or None when max_series is reached."""
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= self._config.max_series:
                return None
            s = _Series()
        kind = _group_kind(p)
        groups = []
        for rule in rules:
            labels = rule.kept(p.labels)
            gkey = (p.name, kind, labels)
            g = rule.groups.get(gkey)
            if g is None:
                if self._group_count >= self._config.max_series:
                    return None
                names = rule.names(p.name, kind, labels, p.unit)
                samples = kind == _GAUGE and rule.histograms
                g = _Group(gkey, kind, labels, names, samples, rule.moments, max(rule.slices, default=0))
                rule.groups[gkey] = g
                self._group_count += 1
            groups.append(g)
        s.groups = groups
        s.generation = self._generation
        self._series[key] = s
        return s

    async def consume(self, batch: MetricBatch) -> None:
        if self._pending:
            await self._flush()  # raises Backpressure, taking nothing, while window outputs wait
        n = len(batch.points)
        self._counts.incoming(n)
        now = self._clock()
        self._roll(now)
        fold_series: list[_Series] = []
        fold_points: list[Point] = []
        kept: list[Point] = []
        late = overflow = non_finite = 0
        # Hoisted lookups: this loop runs once per point.
        matching, match_for, series, generation = (
            self._matching,
            self._match_for,
            self._series,
            self._generation,
        )
        # Two parallel lists, not a list of pairs: no tuple (a tracked object) per point.
        keep, add_series, add_point, isfinite = (
            kept.append,
            fold_series.append,
            fold_points.append,
            math.isfinite,
        )
        summary, histogram = Kind.SUMMARY, Kind.HISTOGRAM
        for p in batch.points:
            m = matching.get(p.name) or match_for(p.name)
            kind = p.kind
            if not m.rules or kind is summary:
                keep(p)
                continue
            t = p.time_unix_nano
            if t and t < m.cutoff_ns:
                late += 1
                keep(p)
                continue
            if kind is not histogram and not isfinite(p.value):
                non_finite += 1
                keep(p)
                continue
            key = p.key or key_of(p)  # receivers hand most points on with their key: no call then
            s = series.get(key)
            if s is None or s.generation != generation:  # new, or one of its groups expired since
                s = self._series_for(p, key, m.rules)
                if s is None:
                    overflow += 1
                    keep(p)
                    continue
            s.last_seen = now
            add_series(s)
            add_point(p)
            if m.keep_input:
                keep(p)
        if late:
            self._late.value += late
        if overflow:
            self._overflow.value += overflow
        if non_finite:
            self._non_finite.value += non_finite
        out = batch if len(kept) == n else MetricBatch(tuple(kept), batch.context)
        if out.points:
            await self._next.consume(out)  # Backpressure propagates with nothing folded
            self._counts.outgoing(len(out.points))
        if len(kept) < n:
            self._counts.dropped("aggregated", n - len(kept))
        self._fold(fold_series, fold_points, now)

    def _fold(self, fold_series: list[_Series], fold_points: list[Point], now: float) -> None:
        epoch_ns = int(self._epoch * 1e9)
        now_ns = int(now * 1e9)
        max_buckets = self._config.max_buckets
        invalid = 0
        cumulative, dist, counter = Temporality.CUMULATIVE, _DIST, _COUNTER
        for s, p in zip(fold_series, fold_points, strict=True):
            # Integer nanoseconds since the epoch first, then seconds: exact to the nanosecond (unix
            # seconds as a float carry only ~0.2 µs, which the slope's time moments would feel).
            t = ((p.time_unix_nano or now_ns) - epoch_ns) * 1e-9
            groups = s.groups
            kind = groups[0].kind
            if kind == dist:
                h = self._histogram_delta(s, p)
                if h is None:
                    continue
                if not (h.count > 0 and math.isfinite(h.min) and math.isfinite(h.max)):
                    invalid += h.count > 0
                    continue
                for g in groups:
                    g.accs[0].add_histogram(h, max_buckets)
                continue
            v = p.value
            if kind == counter and p.temporality is cumulative:
                previous = s.baseline
                restarted = p.start_time_unix_nano != s.start_ns and s.start_ns != 0
                s.baseline, s.start_ns = float(v), p.start_time_unix_nano
                if not isinstance(previous, float):
                    if not p.start_time_unix_nano or p.start_time_unix_nano < self._started_ns:
                        continue  # the first point of a counter older than us only sets the baseline
                elif v >= previous and not restarted:
                    v -= previous
                # else: a reset (a drop, or a new start time): the new value is the increase
            for g in groups:
                # One sample into the window's Acc (running sums, extremes, last, and where the rule
                # sends stddev or slope Welford's mean and variance of value and time), written out
                # here: it runs once per point and group.
                a = g.accs[0]
                a.n += 1.0
                a.total += v
                if g.moments:
                    n = a.n
                    dv = v - a.mv
                    a.mv += dv / n
                    a.m2v += dv * (v - a.mv)
                    dt = t - a.mt
                    a.mt += dt / n
                    a.m2t += dt * (t - a.mt)
                    a.c += dt * (v - a.mv)
                if v < a.lo:
                    a.lo = v
                if v > a.hi:
                    a.hi = v
                if t >= a.last_t:
                    a.last_t = t
                    a.last = v
                if a.values is not None:
                    a.values.append(v)
        if invalid:
            self._invalid.value += invalid

    def _histogram_delta(self, s: _Series, p: Point) -> ExpHistogram | None:
        cumulative = p.temporality is Temporality.CUMULATIVE
        try:
            if p.histogram is not None:
                h = p.histogram
                if not cumulative:
                    return h
                previous, s.baseline = s.baseline, h
                if not isinstance(previous, ExpHistogram):
                    return h if p.start_time_unix_nano >= self._started_ns else None
                diff = distributions.subtract(h, previous)
                return h if diff is None else diff  # None: a reset, the new histogram is the increase
            if p.explicit is not None:
                e = p.explicit
                if cumulative:
                    previous_e, s.baseline = s.baseline, e
                    if not isinstance(previous_e, ExplicitHistogram):
                        if p.start_time_unix_nano < self._started_ns:
                            return None
                    else:
                        e = distributions.subtract_explicit(e, previous_e) or e
                return distributions.explicit_to_exponential(e, max_buckets=self._config.max_buckets)
        except (ValueError, OverflowError):
            pass
        self._invalid.value += 1
        return None

    # -- windows -------------------------------------------------------------------------------------

    def _roll(self, now: float) -> None:
        """Close every rule's shortest window that ended by `now`: each group's accumulator is swapped for
        an empty one at once (points from now on fill the next window); sending them, merging them into
        the coarser windows and closing those is :meth:`_drain`'s, a chunk of groups at a time."""
        rolled = False
        for rule in self._rules:
            start = math.floor(now / rule.base) * rule.base
            if start <= rule.filling:
                continue  # (a clock stepped back keeps the window being filled)
            while self._closed:  # the previous end is not all sent yet (rare): finish it first
                self._step(self._closed[0], None)
            groups = list(rule.groups.values())
            for g in groups:
                accs = g.accs
                accs[0], g.closed = g.closed, accs[0]
            self._closed.append(_Closed(rule, rule.filling + rule.base, start, groups))
            rule.filling = start
            rule.cutoff_ns = int((start - self._config.max_delay) * 1e9)
            rolled = True
        if rolled:
            for m in self._matching.values():
                m.update()
            if self._series:
                self._expire_series(now)

    async def _drain(self) -> None:
        """Send the windows that ended, :data:`_GROUPS_PER_STEP` groups at a time, each step's points
        handed on before the next step (they die young instead of piling up for the garbage
        collector's oldest generation); Backpressure if refused (the rest is sent by the next tick)."""
        while self._closed:
            self._step(self._closed[0], _GROUPS_PER_STEP)
            await self._flush()
            await asyncio.sleep(0)

    def _step(self, closed: _Closed, limit: int | None) -> None:
        """Send up to `limit` (None: all) more groups of window `closed`; drop it from the queue when done."""
        rule, end, start = closed.rule, closed.end, closed.start
        groups = closed.groups
        stop = len(groups) if limit is None else min(len(groups), closed.next + limit)
        chunk = groups[closed.next : stop]
        ended = [(i + 1, iv) for i, iv in enumerate(rule.coarse) if math.ceil(end / iv - 1e-9) * iv <= start]
        idle_limit = max(2, math.ceil(2 * rule.intervals[-1] / rule.base))
        max_buckets = self._config.max_buckets
        points: list[Point] = []
        emit, quantiles, chain = self._emit, rule.quantiles, rule.chain
        # The quantiles of every window of the step at once (sliding: of the merged windows instead).
        wanted = quantiles if "quantiles" in rule.outputs and not rule.slices else []
        sent: list[_Group] = []
        for g in chunk:
            if g.closed.n > 0:
                g.idle = 0
                sent.append(g)
            else:
                g.idle += 1
        if rule.histograms:
            settle([g.closed for g in sent], max_buckets, wanted)
        if rule.slices:
            self._slide(rule, chunk, end, round((start - end) / rule.base), points)
            sent = []
        for g in sent:
            base = g.closed
            emit(g, 0, base, end, rule.base, quantiles, points)
            accs = g.accs
            if chain:
                if len(accs) > 1:
                    up = accs[1]
                    if up.n == 0 and base.values is None:
                        # The coarser window is empty (its first part): the ended one becomes it whole
                        # and the empty one is filled next, instead of a merge and a reset.
                        accs[1], g.closed = base, up
                        continue
                    up.merge(base, max_buckets, g.moments)
            else:
                for i in range(1, len(accs)):
                    accs[i].merge(base, max_buckets, g.moments)
            base.reset()
        windows = len(sent)
        for i, iv in ended:
            full = [g for g in chunk if g.accs[i].n > 0]
            windows += len(full)
            if rule.histograms:
                settle([g.accs[i] for g in full], max_buckets, wanted)
            iv_end = math.ceil(end / iv - 1e-9) * iv
            coarser = chain and i + 1 < len(rule.intervals)
            for g in full:
                accs = g.accs
                a = accs[i]
                emit(g, i, a, iv_end, iv, quantiles, points)
                if coarser:
                    up = accs[i + 1]
                    if up.n == 0:  # as above: moved up whole
                        accs[i], accs[i + 1] = up, a
                        continue
                    up.merge(a, max_buckets, g.moments)
                a.reset()
        self._windows.value += windows  # (the sliding ones count in _slide)
        expired = 0
        for g in chunk:
            if g.idle >= idle_limit and all(a.n == 0 for a in g.accs) and rule.groups.get(g.key) is g:
                del rule.groups[g.key]
                expired += 1
        closed.next = stop
        if expired:
            self._group_count -= expired
            self._generation += 1
        if points:
            self._queue(points)
        if stop == len(groups):
            self._closed.popleft()

    def _slide(self, rule: _Rule, chunk: list[_Group], end: float, gap: int, points: list[Point]) -> None:
        """Sliding windows at the end of a slide: each group's ended slide joins its ring (with `gap`
        empty ones when slides passed without a tick), and each interval's window is the merge of the
        ring's last slides, newest first: the shortest interval's slides, then the next one's extra
        ones, so a group costs one merge per slide of its longest interval."""
        max_buckets = self._config.max_buckets
        for g in chunk:
            ring, ended = g.ring, g.closed
            old = ring[0] if len(ring) == ring.maxlen else None
            ring.append(ended)
            for _ in range(min(gap, ring.maxlen or 0)):
                ring.append(Acc(ended.values is not None))
            if old is not None and old is not ring[0]:
                old.reset()
                g.closed = old  # reused: no allocation a slide in the steady state
            else:
                g.closed = Acc(ended.values is not None)
        windows = [Acc() for _ in chunk]
        done = 0
        for i, (iv, k) in enumerate(zip(rule.intervals, rule.slices, strict=True)):
            for g, w in zip(chunk, windows, strict=True):
                ring = g.ring
                for j in range(done, min(k, len(ring))):
                    w.merge(ring[-1 - j], max_buckets, g.moments)
            done = k
            live = [(g, w) for g, w in zip(chunk, windows, strict=True) if w.n > 0]
            self._windows.value += len(live)
            if rule.histograms:
                settle(
                    [w for _, w in live], max_buckets, rule.quantiles if "quantiles" in rule.outputs else ()
                )
            for g, w in live:
                self._emit(g, i, w, end, iv, rule.quantiles, points)

    def _close_partial(self, rule: _Rule, now: float) -> None:
        """Shutdown: send the windows being filled as they are, the rate over the time elapsed."""
        points: list[Point] = []
        if rule.slices:  # sliding: the slide being filled as the newest, each window over its span
            for g in rule.groups.values():
                w = Acc()
                w.merge(g.accs[0], self._config.max_buckets)
                done = 1
                for i, (iv, k) in enumerate(zip(rule.intervals, rule.slices, strict=True)):
                    for j in range(done, min(k, len(g.ring) + 1)):
                        w.merge(g.ring[-j], self._config.max_buckets)
                    done = k
                    if w.n > 0:
                        self._windows.value += 1
                        self._emit(g, i, w, now, iv, rule.quantiles, points)
                g.accs[0].reset()
            if points:
                self._queue(points)
            return
        for g in rule.groups.values():
            base = g.accs[0]
            for i in range(1, len(g.accs)):
                g.accs[i].merge(g.accs[i - 1] if rule.chain else base, self._config.max_buckets)
            for i, iv in enumerate(rule.intervals):
                a = g.accs[i]
                if a.n > 0:
                    self._windows.value += 1
                    w_start = math.floor(now / iv) * iv
                    self._emit(g, i, a, now, max(now - w_start, 1e-3), rule.quantiles, points)
                    a.reset()
        if points:
            self._queue(points)

    def _expire_series(self, now: float) -> None:
        limit = 2 * self._longest
        idle = [k for k, s in self._series.items() if now - s.last_seen > limit]
        for k in idle:
            del self._series[k]

    def _queue(self, points: list[Point]) -> None:
        for i in range(0, len(points), _POINTS_PER_BATCH):
            self._pending.append(MetricBatch(tuple(points[i : i + _POINTS_PER_BATCH])))

    async def _flush(self) -> None:
        """Send the pending window outputs in order; on a refusal keep the rest and raise it."""
        while self._pending:
            batch = self._pending[0]
            await self._next.consume(batch)
            self._pending.popleft()
            self._counts.outgoing(len(batch.points))

    def _emit(
        self, g: _Group, i: int, a: Acc, end_s: float, span_s: float, quantiles: list[float], out: list[Point]
    ) -> None:
        """Append the output points of group `g`'s interval `i` (accumulator `a`, window ending `end_s`)."""
        time_ns = int(end_s * 1e9)
        n, total = a.n, a.total
        # The plain figures at once (a handful of float operations), read by code: cheaper than testing
        # each output against a chain of names, once per output point of every group at every window end.
        simple = (n, total, total / n, a.lo, a.hi, a.last, total / span_s)
        gauge, delta, append = Kind.GAUGE, Temporality.DELTA, out.append
        for code, name, labels, unit, qi in g.names[i]:
            value: float | None
            if code < _SIMPLE:
                value = simple[code]
            elif code == _STDDEV:
                value = a.stddev()
            elif code == _SLOPE:
                value = a.slope()
            elif code == _QUANTILE:
                found = a.qs  # settle() found them for the whole step; else this window's own
                if found is not None:
                    value = found[qi]
                else:
                    h = a.histogram(self._config.max_buckets)
                    value = exphist.quantile(h, quantiles[qi]) if h is not None else None
            else:  # histogram
                h = a.histogram(self._config.max_buckets)
                if h is not None:
                    append(
                        Point(
                            name,
                            Kind.HISTOGRAM,
                            labels,
                            time_ns,
                            start_time_unix_nano=time_ns - int(span_s * 1e9),
                            temporality=delta,
                            histogram=h,
                            unit=unit,
                        )
                    )
                continue
            if value is None:
                continue
            append(
                new_point(
                    name,
                    gauge,
                    labels,
                    time_ns,
                    float(value),
                    0,
                    delta,
                    True,
                    None,
                    unit,
                    "",
                    None,
                    None,
                    None,
                    None,
                )
            )


def create(settings: Settings, config: AggregateConfig, next_consumer: Consumer) -> AggregateProcessor:
    return AggregateProcessor(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=AggregateConfig,
    create=create,
    signals=frozenset({Signal.METRICS}),
    description="Stream aggregation: count/sum/avg/min/max/rate/increase/slope/quantiles per window",
)
