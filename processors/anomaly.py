"""Anomaly processor: a rolling baseline per series and a z-score for every new value; optionally a
CUSUM change-point detector for lasting level shifts.

    processors:
      anomaly:
        include: ["http.server.duration", "queue.depth"]
        baseline_window: 10m
        histogram_statistic: p99
        change_detection: true    # also <name>_change: the relative size of a lasting level shift
      threshold/anomaly:          # then alert on the scores (after anomaly in the pipeline)
        rules: [{name: anomalous, metric: "*_anomaly_score", op: ">", critical: 4}]

What is scored, per series (its identity: name, kind, labels, resource and scope, ``agent.model.SeriesKey``):

- GAUGE points and non-monotonic SUMs (up-down counters): their value.
- Monotonic SUMs (counters): their rate per second. A DELTA point's rate is its value over its own
  interval (start to time), or over the time since the series' previous point when it has no start;
  a CUMULATIVE point's rate is the increase since the previous point over the time between them (a
  decrease is a reset: that point only becomes the new base).
- HISTOGRAM points: one statistic of the distribution in the point (``histogram_statistic``): the
  exact mean (sum / count), the exact max, or a quantile (p50/p90/p95/p99 from the exponential
  histogram, within its relative error; explicit buckets are interpolated linearly). CUMULATIVE
  histograms are differenced against the series' previous point first.
- SUMMARY points are not scored (they are lifetime aggregates).

The baseline is an exponentially weighted mean and variance. Each new value x is scored against the
baseline *before* x joins it: ``score = (x - mean) / sd`` with ``sd = max(sqrt(variance),
min_relative_stddev * |mean|, min_stddev)``; then x updates it with weight ``alpha = 1 -
exp(-dt / baseline_window)`` (dt = time since the series' previous value, from the points'
timestamps), or the fixed ``alpha`` if set. Until a series has ``min_samples`` values, no score is sent
and the baseline is a plain running mean/variance (weight at least 1/n), so the first value does not
dominate it. A lone spike thus scores high and raises the baseline's variance (and so lowers the
next spikes' scores) for about one baseline window.

Change points (``change_detection: true``): beside the z-score, a two-sided CUSUM (Page's tabular
CUSUM; chosen over Page–Hinkley because it watches both directions with one slack and threshold in
units of the noise) flags a lasting shift of a series' level. Its reference is its own EWMA of the
values (same weights as the baseline, but each value clipped to ±3 deviations first, so a spike cannot
inflate it); each value's ``z = (x - reference) / sd`` adds ``min(z - change_drift, cap)`` to the
upward sum and ``min(-z - change_drift, cap)`` to the downward one (sums floored at 0), ``cap =
change_threshold / change_min_points``. A sum above ``change_threshold`` is a change: the gauge
``<name><change_suffix>`` (default ``<name>_change``) is then the relative size of the shift,
``(new - old) / |old|`` (-0.3 for a drop of 30 %; the new level is the mean of the last
``change_min_points`` values beyond the slack, the old the reference when the sum left 0), and 0 at
every other value. After a change the reference learns the new level afresh. What to expect:

- Detection: a shift of d deviations is flagged after about ``change_threshold / (d -
  change_drift)`` values, and never before ``change_min_points`` values (a shift of 6 deviations or
  more: after 3 or 4). Measured with the defaults, 30 % drop: within 4 values at noise sd 5 % of the
  level, within 16 at 15 % (tests/processors/test_anomaly_change.py).
- Noise: with the defaults (h = 10, k = 0.5) a false change about once per 100,000 values of
  stationary Gaussian noise (3 in 400,000 simulated).
- Spikes: each value adds at most ``cap``, so a spike of fewer than ``change_min_points`` values
  cannot alone flag a change (one of exactly that many can, when noise had already raised the sum);
  the z-score is what flags spikes.
- Blind spots: nothing is flagged during the first 30 values (or ``min_samples``, if more) of a
  series and the 30 after each change, while the reference learns the level and its noise. A change
  in the noise alone (its variance) can be flagged as level changes.

One threshold rule then says "dropped 30 % and stayed there", e.g. ``{metric: "*_change", statistic:
percentile, quantile: 0, window: 1h, op: "<=", critical: -0.3}`` (the minimum over the hour).

Each score is a GAUGE ``<name><suffix>`` (default ``<name>_anomaly_score``) with the series' labels
and resource, unit ``1``, added to the same batch right after the original points, which pass on
unchanged. Series idle for ``series_idle_timeout`` are forgotten; beyond ``max_series`` new series are
not scored and are counted (``headwater_anomaly_overflow_points_total``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from agent import distributions, exphist
from agent.component import Backpressure, ComponentKind, Consumer, Factory, Settings, Signal
from agent.confmodel import Duration
from agent.counting import PointCounts
from agent.exphist import ExpHistogram
from agent.globs import NameFilter
from agent.model import (
    ExplicitHistogram,
    Kind,
    MetricBatch,
    Point,
    SeriesKey,
    Temporality,
    key_of,
    new_point,
)
from agent.telemetry import Cell

TYPE = "anomaly"

Statistic = Literal["mean", "max", "p50", "p90", "p95", "p99"]
_QUANTILE = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
_EXPIRY_CHECK_S = 10.0
"""How often (processor clock) idle series are looked for: one pass over all series at most this often."""


@dataclass(frozen=True)
class AnomalyConfig:
    include: list[str] = field(default_factory=lambda: ["*"])
    """Metric name globs (``*`` crosses dots) of the series to score; default all."""
    exclude: list[str] = field(default_factory=list)
    """Metric name globs not to score, applied after include (scores are never scored again)."""
    kinds: list[Literal["gauge", "counter", "histogram"]] = field(
        default_factory=lambda: ["gauge", "counter", "histogram"]
    )
    """Which points to score: gauge (and up-down sums) by value, counter by rate, histogram by statistic."""
    histogram_statistic: Statistic = "mean"
    """The statistic of each histogram point that is scored: mean, max, p50, p90, p95 or p99."""
    baseline_window: Duration = Duration(600.0)
    """Time constant of the exponentially weighted baseline: older values weigh e times less per window."""
    alpha: float | None = None
    """A fixed weight (0 < alpha <= 1) per new value instead of the time-based one; unset: baseline_window."""
    min_samples: int = 10
    """Values a series needs before its scores are sent."""
    min_relative_stddev: float = 0.001
    """Floor of the standard deviation relative to |mean|, so a flat series does not score infinity."""
    min_stddev: float = 1e-9
    """Absolute floor of the standard deviation (for series whose mean is 0)."""
    suffix: str = "_anomaly_score"
    """Appended to the metric name to name the score."""
    max_series: int = 10_000
    """Series scored at most; values of further series pass unscored and are counted as overflow."""
    series_idle_timeout: Duration = Duration(3600.0)
    """Forget a series' baseline this long after its last value."""
    change_detection: bool = False
    """Also detect level changes (two-sided CUSUM) and send <name><change_suffix> for each scored value."""
    change_threshold: float = 10.0
    """CUSUM decision level h, in standard deviations: a level change is flagged when a sum passes it."""
    change_drift: float = 0.5
    """CUSUM slack k, in standard deviations: shifts smaller than about 2k are tolerated, not summed."""
    change_min_points: int = 3
    """Each value adds at most change_threshold / this to a sum: a shorter spike cannot flag a change."""
    change_suffix: str = "_change"
    """Appended to the metric name to name the change gauge."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for name, globs in (("include", self.include), ("exclude", self.exclude)):
            for i, g in enumerate(globs):
                if not g:
                    problems.append((f"{name}::{i}", "give a non-empty metric name glob"))
        if not self.kinds:
            problems.append(("kinds", "give at least one of gauge, counter, histogram"))
        if not self.baseline_window > 0:
            problems.append(("baseline_window", "must be positive"))
        if self.alpha is not None and not 0.0 < self.alpha <= 1.0:
            problems.append(("alpha", "must be within (0, 1]"))
        if self.min_samples < 2:
            problems.append(("min_samples", "must be at least 2 (a variance needs two values)"))
        if not (self.min_relative_stddev >= 0 and math.isfinite(self.min_relative_stddev)):
            problems.append(("min_relative_stddev", "must be a finite number >= 0"))
        if not (self.min_stddev > 0 and math.isfinite(self.min_stddev)):
            problems.append(("min_stddev", "must be a finite number > 0"))
        if not self.suffix:
            problems.append(("suffix", "must not be empty (the score would take the metric's own name)"))
        if self.max_series < 1:
            problems.append(("max_series", "must be at least 1"))
        if not self.series_idle_timeout > 0:
            problems.append(("series_idle_timeout", "must be positive"))
        if not (self.change_threshold > 0 and math.isfinite(self.change_threshold)):
            problems.append(("change_threshold", "must be a finite number > 0 (standard deviations)"))
        if not (self.change_drift >= 0 and math.isfinite(self.change_drift)):
            problems.append(("change_drift", "must be a finite number >= 0 (standard deviations)"))
        if self.change_min_points < 1:
            problems.append(("change_min_points", "must be at least 1"))
        if not self.change_suffix:
            problems.append(
                ("change_suffix", "must not be empty (the gauge would take the metric's own name)")
            )
        elif self.change_detection and self.change_suffix == self.suffix:
            problems.append(("change_suffix", "must differ from suffix (the score's)"))
        return problems


_REFERENCE_CLIP = 3.0
"""The change detector's reference learns each value clipped to within this many standard deviations:
a spike then cannot inflate its variance (and blind it) for several baseline windows."""


_CHANGE_WARMUP = 30
"""Values the change detector's reference learns from (at the start, and after each change) before
it detects: the deviation of fewer is too uncertain (10 values: within ±35 %, often underestimated, and
a CUSUM over an underestimated deviation flags changes in plain noise)."""


class _Cusum:
    """A two-sided CUSUM over one series' values, standardised against its own EWMA reference. See
    the module docstring."""

    __slots__ = (
        "down",
        "down_base",
        "down_recent",
        "mean",
        "n",
        "quiet_variance",
        "ready",
        "up",
        "up_base",
        "up_recent",
        "variance",
    )

    def __init__(self) -> None:
        self.n = 0
        self.ready = False
        self.mean = self.variance = self.quiet_variance = 0.0
        self.up = self.up_base = self.down = self.down_base = 0.0
        self.up_recent: tuple[float, ...] = ()
        self.down_recent: tuple[float, ...] = ()

    # Spelled out (not a loop over __slots__): taken for every series a batch touches, for its undo.
    def state(self) -> tuple[Any, ...]:
        return (
            self.n,
            self.ready,
            self.mean,
            self.variance,
            self.quiet_variance,
            self.up,
            self.up_base,
            self.up_recent,
            self.down,
            self.down_base,
            self.down_recent,
        )

    def restore(self, state: tuple[Any, ...]) -> None:
        (
            self.n,
            self.ready,
            self.mean,
            self.variance,
            self.quiet_variance,
            self.up,
            self.up_base,
            self.up_recent,
            self.down,
            self.down_base,
            self.down_recent,
        ) = state

    def step(self, x: float, alpha: float, c: AnomalyConfig) -> float | None:
        """Add ``x``; the relative size of a level change detected at ``x`` (0.0: none), or None
        while the reference is young (fewer than ``min_samples`` values)."""
        if self.n < max(c.min_samples, _CHANGE_WARMUP):
            self._learn(x, max(alpha, 1.0 / (self.n + 1)))
            self.quiet_variance = self.variance
            return 0.0 if self.ready else None
        self.ready = True
        sd = max(math.sqrt(self.variance), c.min_relative_stddev * abs(self.mean), c.min_stddev)
        z = (x - self.mean) / sd
        k, h = c.change_drift, c.change_threshold
        cap = h / c.change_min_points
        up_inc, down_inc = min(z - k, cap), min(-z - k, cap)
        # A run starts where its sum leaves 0: the reference then is the old level. The new level is
        # the mean of the last change_min_points values of the trailing streak beyond the slack: a
        # detection needs at least that many, so for a clear step they all follow it (the whole run
        # may hold many pre-change values when the noise is small next to the change).
        if self.up == 0.0 and up_inc > 0:
            self.up_base = self.mean
        if self.down == 0.0 and down_inc > 0:
            self.down_base = self.mean
        self.up = max(0.0, self.up + up_inc)
        self.down = max(0.0, self.down + down_inc)
        if up_inc > 0:
            self.up_recent = (*self.up_recent[1 - c.change_min_points :], x)
        else:
            self.up_recent = ()
        if down_inc > 0:
            self.down_recent = (*self.down_recent[1 - c.change_min_points :], x)
        else:
            self.down_recent = ()
        self._learn(self.mean + max(-_REFERENCE_CLIP, min(_REFERENCE_CLIP, z)) * sd, alpha)
        if self.up == 0.0 and self.down == 0.0:
            self.quiet_variance = self.variance
        if self.up <= h and self.down <= h:
            return 0.0
        recent, base = (self.up_recent, self.up_base) if self.up > h else (self.down_recent, self.down_base)
        new = sum(recent) / len(recent)
        # The new level is learnt again, as at the start (a running mean, no detection), from these
        # values and the noise as it was before the change: set from a few values only, the reference
        # would be off by a fraction of a deviation and "detect" corrections of it in turn.
        self.n, self.mean, self.variance = len(recent), new, self.quiet_variance
        self.up = self.down = 0.0
        self.up_recent = self.down_recent = ()
        return (new - base) / max(abs(base), c.min_stddev)

    def _learn(self, x: float, alpha: float) -> None:
        if self.n == 0:
            self.mean, self.variance = x, 0.0
        else:
            diff = x - self.mean
            step = alpha * diff
            self.mean += step
            self.variance = (1.0 - alpha) * (self.variance + diff * step)
        self.n += 1


class _Series:
    __slots__ = ("change_key", "cusum", "last_ns", "last_seen", "mean", "n", "previous", "variance")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.variance = 0.0
        self.last_ns = 0
        """Timestamp of the previous value (for dt and counter rates); 0 before the first."""
        self.last_seen = 0.0
        """Processor clock at the last point (for expiry)."""
        self.previous: float | ExpHistogram | ExplicitHistogram | None = None
        """The previous CUMULATIVE value or histogram, the base of the next difference."""
        self.cusum: _Cusum | None = None
        """The change detector's state (change_detection on)."""
        self.change_key: SeriesKey | None = None
        """The identity of the series' change gauge, once one was made."""


_Saved = tuple[
    int,
    float,
    float,
    int,
    float,
    float | ExpHistogram | ExplicitHistogram | None,
    tuple[Any, ...] | None,
]
"""A series' state (n, mean, variance, last_ns, last_seen, previous, cusum), to undo a refused batch."""


class AnomalyProcessor:
    """See the module docstring. `clock` (unix seconds) is injectable for tests; it drives expiry and
    stands in for points without a timestamp."""

    def __init__(
        self,
        settings: Settings,
        config: AnomalyConfig,
        next_consumer: Consumer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._config = config
        self._next = next_consumer
        self._clock = clock
        # Never its own outputs (scores, change gauges), whatever the globs say.
        self._matches = NameFilter(config.include, config.exclude, unless=self._is_output)
        self._kinds = frozenset(config.kinds)
        self._series: dict[SeriesKey, _Series] = {}
        self._tau_s = float(config.baseline_window)
        self._next_expiry = clock() + _EXPIRY_CHECK_S
        tel = settings.telemetry
        self._counts = PointCounts(tel)
        self._overflow = tel.counter(
            "anomaly_overflow_points_total", "Points of series beyond max_series, passed on unscored."
        )
        self._scored = tel.counter("anomaly_scores_total", "Anomaly scores sent.")
        self._expired = tel.counter("anomaly_expired_series_total", "Series forgotten after being idle.")
        tel.gauge("anomaly_series", "Series with a baseline now.", lambda: float(len(self._series)))

    def _ignored(self, reason: str) -> Cell:
        return self._settings.telemetry.counter(
            "anomaly_ignored_points_total",
            "Matching points that gave no value to score, by reason.",
            reason=reason,
        )

    async def start(self) -> None:
        """Nothing to start: scores are computed inline."""

    async def shutdown(self) -> None:
        """Nothing to flush (every score was sent with its point); idempotent, safe before start."""

    def _is_output(self, name: str) -> bool:
        cfg = self._config
        return name.endswith(cfg.suffix) or (cfg.change_detection and name.endswith(cfg.change_suffix))

    def _wanted(self, p: Point) -> bool:
        if p.kind is Kind.GAUGE:
            return "gauge" in self._kinds
        if p.kind is Kind.SUM:
            return ("counter" if p.monotonic else "gauge") in self._kinds
        if p.kind is Kind.HISTOGRAM:
            return "histogram" in self._kinds
        return False

    async def consume(self, batch: MetricBatch) -> None:
        n = len(batch.points)
        self._counts.incoming(n)
        now = self._clock()
        if now >= self._next_expiry:
            self._expire(now)
        scores: list[Point] = []
        changes: list[Point] = []
        overflow = 0
        # Each touched series' state before this batch (None: new), restored if downstream refuses the
        # batch: the receiver offers it again, and its values must not enter the baselines twice.
        undo: dict[SeriesKey, _Saved | None] = {}
        for p in batch.points:
            if not self._wanted(p) or not self._matches(p.name):
                continue
            key = key_of(p)
            s = self._series.get(key)
            if s is None:
                if len(self._series) >= self._config.max_series:
                    overflow += 1
                    continue
                s = self._series[key] = _Series()
                undo.setdefault(key, None)
            elif key not in undo:
                cusum = s.cusum.state() if s.cusum is not None else None
                undo[key] = (s.n, s.mean, s.variance, s.last_ns, s.last_seen, s.previous, cusum)
            s.last_seen = now
            time_ns = p.time_unix_nano or int(now * 1e9)
            score, change = self._score(s, p, time_ns)
            if change is not None:
                # new_point with the series' cached key: a gauge per value doubled the processor's cost
                # through Point() and key_of (about 2.5 µs of the 6 it added).
                point = new_point(
                    p.name + self._config.change_suffix,
                    Kind.GAUGE,
                    p.labels,
                    time_ns,
                    change,
                    0,
                    Temporality.DELTA,
                    True,
                    None,
                    "1",
                    "",
                    p.resource,
                    p.scope,
                    None,
                    None,
                    s.change_key,
                )
                if s.change_key is None:
                    s.change_key = key_of(point)
                changes.append(point)
            if score is not None:
                scores.append(
                    Point(
                        p.name + self._config.suffix,
                        Kind.GAUGE,
                        p.labels,
                        time_ns,
                        value=score,
                        unit="1",
                        resource=p.resource,
                        scope=p.scope,
                    )
                )
        if overflow:
            self._overflow.value += overflow
        added = scores + changes if changes else scores
        out = MetricBatch(batch.points + tuple(added), batch.context) if added else batch
        try:
            await self._next.consume(out)  # Backpressure propagates to the caller
        except Backpressure:
            self._undo(undo)
            raise
        self._counts.outgoing(len(out.points))
        self._scored.value += len(scores)

    def _undo(self, undo: dict[SeriesKey, _Saved | None]) -> None:
        for key, saved in undo.items():
            if saved is None:
                self._series.pop(key, None)
                continue
            s = self._series.get(key)
            if s is not None:
                s.n, s.mean, s.variance, s.last_ns, s.last_seen, s.previous, cusum = saved
                if cusum is None:
                    s.cusum = None
                elif s.cusum is not None:
                    s.cusum.restore(cusum)

    def _score(self, s: _Series, p: Point, time_ns: int) -> tuple[float | None, float | None]:
        """Score `p`'s value against the baseline, then add it to the baseline; None when not scored.
        Second: the change gauge's value (change_detection on and the reference warmed up), or None."""
        try:
            x = self._value(s, p, time_ns)
        except (ValueError, OverflowError, ZeroDivisionError):
            self._ignored("invalid").value += 1
            x = None
        dt_s = (time_ns - s.last_ns) / 1e9 if s.last_ns else 0.0
        s.last_ns = time_ns
        if x is None:
            return None, None
        if not math.isfinite(x):
            self._ignored("non_finite").value += 1
            return None, None
        c = self._config
        score = None
        if s.n >= c.min_samples:
            sd = max(math.sqrt(s.variance), c.min_relative_stddev * abs(s.mean), c.min_stddev)
            score = (x - s.mean) / sd
        alpha = c.alpha if c.alpha is not None else -math.expm1(-max(dt_s, 0.0) / self._tau_s)
        change = None
        if c.change_detection:
            if s.cusum is None:
                s.cusum = _Cusum()
            change = s.cusum.step(x, alpha, c)
        alpha = max(alpha, 1.0 / (s.n + 1))  # a running mean while young: the first value does not dominate
        if s.n == 0:
            s.mean, s.variance = x, 0.0
        else:
            diff = x - s.mean
            step = alpha * diff
            s.mean += step
            s.variance = (1.0 - alpha) * (s.variance + diff * step)
        s.n += 1
        return score, change

    def _value(self, s: _Series, p: Point, time_ns: int) -> float | None:
        cumulative = p.temporality is Temporality.CUMULATIVE
        if p.kind is Kind.GAUGE or (p.kind is Kind.SUM and not p.monotonic):
            return p.value
        if p.kind is Kind.SUM:
            if cumulative:
                previous, s.previous = s.previous, p.value
                if not isinstance(previous, float) or not s.last_ns or time_ns <= s.last_ns:
                    return None  # the first value, or no time between: only the base
                if p.value < previous:
                    self._ignored("counter_reset").value += 1
                    return None
                return (p.value - previous) / ((time_ns - s.last_ns) / 1e9)
            if p.start_time_unix_nano and time_ns > p.start_time_unix_nano:
                return p.value / ((time_ns - p.start_time_unix_nano) / 1e9)
            if s.last_ns and time_ns > s.last_ns:
                return p.value / ((time_ns - s.last_ns) / 1e9)
            return None
        return self._statistic(s, p, cumulative)

    def _statistic(self, s: _Series, p: Point, cumulative: bool) -> float | None:
        stat = self._config.histogram_statistic
        h: ExpHistogram | None = None
        if p.histogram is not None:
            h = p.histogram
            if cumulative:
                previous, s.previous = s.previous, h
                if not isinstance(previous, ExpHistogram):
                    return None
                h = distributions.subtract(h, previous)
        elif p.explicit is not None:
            e: ExplicitHistogram | None = p.explicit
            if cumulative:
                previous_e, s.previous = s.previous, p.explicit
                if not isinstance(previous_e, ExplicitHistogram):
                    return None
                e = distributions.subtract_explicit(p.explicit, previous_e)
            if e is None:
                self._ignored("histogram_reset").value += 1
                return None
            if stat == "mean":
                return e.sum / e.count if e.count > 0 else None
            if stat == "max" and e.max is not None and not cumulative:
                return e.max
            h = distributions.explicit_to_exponential(e, max_buckets=160)
        if h is None:
            self._ignored("histogram_reset" if cumulative else "no_histogram").value += 1
            return None
        if not h.count > 0:
            return None  # an interval without values has no statistic
        if stat == "mean":
            return h.sum / h.count
        if stat == "max":
            return h.max
        return exphist.quantile(h, _QUANTILE[stat])

    def _expire(self, now: float) -> None:
        self._next_expiry = now + _EXPIRY_CHECK_S
        limit = now - float(self._config.series_idle_timeout)
        idle = [k for k, s in self._series.items() if s.last_seen < limit]
        for k in idle:
            del self._series[k]
        self._expired.value += len(idle)


def create(settings: Settings, config: AnomalyConfig, next_consumer: Consumer) -> AnomalyProcessor:
    return AnomalyProcessor(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=AnomalyConfig,
    create=create,
    signals=frozenset({Signal.METRICS}),
    description="Per-series z-scores of gauges, counter rates and distribution statistics vs a baseline",
)
