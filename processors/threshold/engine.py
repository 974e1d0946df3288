"""Rule evaluation for the ``threshold`` processor: per-series windows and statistics, the alert state
machine, and grouping with deduplication. Pure and synchronous: every call takes ``now`` (seconds since
the epoch) from the processor's clock, so tests drive time without sleeping.
"""

from __future__ import annotations

import collections
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import exphist
from agent.model import ExplicitHistogram, Kind, Labels, Point, SeriesKey, Temporality, key_of
from processors.threshold.selector import Selector, name_matcher

if TYPE_CHECKING:
    from processors.threshold import RuleConfig

WARNING, CRITICAL = "warning", "critical"
SEVERITIES = (WARNING, CRITICAL)
FIRING, PENDING, INACTIVE, RESOLVED = "firing", "pending", "inactive", "resolved"

MAX_SAMPLES_PER_SERIES = 10_000
"""Window length cap per series: a 1h window of 1 s samples fits; beyond, the oldest fall out."""

_CMP: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_LABEL_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")

# Sample modes: how a series' points are kept and read.
_GAUGE, _DELTA, _CUMULATIVE, _EXP, _EXPLICIT, _CUM_EXP, _CUM_EXPLICIT = range(7)
_FRONT_LIMIT = 200_000
"""Point keys whose series are cached (most select none); cleared when full."""
_LATEST_ONLY = frozenset({_CUM_EXP, _CUM_EXPLICIT})
"""Cumulative distributions hold the whole lifetime: a window of them would count values many times."""
WINDOW_MAX_BUCKETS = 2048
"""Buckets a side of a window's merged histogram may span before it goes coarser: the receivers'
max_buckets, so a percentile rule reads the window at the scale the data arrived at (160, the merge
default, cost wide timers up to three scales: ~4 % instead of ~0.5 %)."""


def alert_label_name(name: str) -> str:
    """Alertmanager accepts ``[a-zA-Z_][a-zA-Z0-9_]*`` only: StatsD tag names may hold dots and dashes."""
    clean = _LABEL_NAME_BAD.sub("_", name)
    return "_" + clean if not clean or clean[0].isdigit() else clean


def format_labels(labels: Labels) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


class _Fields(dict[str, Any]):
    """Template fields; an unknown ``{name}`` renders empty instead of failing the notification."""

    def __missing__(self, key: str) -> str:
        return ""


def render(template: str, fields: Mapping[str, Any]) -> str:
    try:
        return template.format_map(_Fields(fields))
    except (ValueError, IndexError, AttributeError, TypeError, KeyError):
        return template  # a broken template still says something; validate() catches most


class Rule:
    """A compiled rule."""

    def __init__(self, config: RuleConfig) -> None:
        self.config = config
        self.name = config.name
        self.match_name = name_matcher(config.metric)
        self.selector = Selector(config.match)
        self.cmp = _CMP[config.op]
        self.statistic = config.statistic
        self.window_s = float(config.window)
        self.for_s = float(config.for_duration)
        self.warning = config.warning
        self.critical = config.critical
        self.resolve = config.resolve
        self.latest_only = config.statistic == "last"
        self.extra_labels = {alert_label_name(k): v for k, v in config.labels.items()}
        self.cooldown_s = float(config.cooldown)
        self.max_per_day = config.max_per_day
        if config.statistic == "percentile":
            q = config.quantile * 100
            self.describe = f"p{q:g} over {_dur(self.window_s)}"
        elif config.statistic == "last":
            self.describe = "value"
        elif config.statistic == "rate":
            self.describe = f"rate/s over {_dur(self.window_s)}"
        else:
            self.describe = f"{config.statistic} over {_dur(self.window_s)}"

    def level(self, severity: str) -> float:
        level = self.critical if severity == CRITICAL else self.warning
        return math.nan if level is None else level


def _dur(seconds: float) -> str:
    from agent.confmodel import format_duration

    return format_duration(seconds)


class Series:
    """One watched series of one rule, and its alert state."""

    __slots__ = (
        "active_since",
        "alert_labels",
        "forgotten",
        "gone",
        "group",
        "key",
        "labels",
        "last_seen",
        "metric",
        "mode",
        "notified",
        "rule",
        "samples",
        "severity",
        "since_critical",
        "since_warning",
        "state",
        "value",
    )

    def __init__(self, rule: Rule, metric: str, labels: Labels, now: float) -> None:
        self.rule = rule
        self.metric = metric
        self.labels = labels
        self.key = (rule.name, metric, labels)
        present = dict(labels)
        self.group: tuple[str, tuple[tuple[str, str], ...]] = (
            rule.name,
            tuple((name, present.get(name, "")) for name in rule.config.group_by),
        )
        alert_labels = {alert_label_name(k): v for k, v in labels if v}
        alert_labels["metric"] = metric
        alert_labels.update(rule.extra_labels)  # rule labels win, as in Prometheus
        alert_labels["alertname"] = rule.name
        self.alert_labels = alert_labels
        self.samples: collections.deque[tuple[float, float, float, Any]] = collections.deque(
            maxlen=MAX_SAMPLES_PER_SERIES
        )
        self.mode = -1
        self.last_seen = now
        self.since_warning: float | None = None
        self.since_critical: float | None = None
        self.active_since: float | None = None
        self.state = INACTIVE
        self.severity = ""
        self.value = math.nan
        self.notified: tuple[str, str] | None = None
        """What receivers were last told: (firing, severity), or None (nothing, or resolved)."""
        self.gone = False
        """No data for stale_after: resolved, and forgotten once receivers were told."""
        self.forgotten = False
        """Removed from the engine: the front cache of series by point key checks this."""

    def notice(self) -> tuple[str, str] | None:
        """What receivers should know now; a notification is due when it differs from ``notified``."""
        if self.state == FIRING:
            return (FIRING, self.severity)
        if self.notified is None:
            return None
        return (RESOLVED, self.notified[1])


@dataclass(frozen=True)
class AlertEvent:
    """One alert in a notification."""

    rule: str
    status: str
    """firing | resolved"""
    severity: str
    labels: dict[str, str]
    """Alertmanager labels: series labels (names sanitised), metric, rule labels, alertname, severity."""
    annotations: dict[str, str]
    starts_at: float
    ends_at: float | None
    """When it resolved; None while firing."""
    value: float
    previous_severity: str | None = None
    """Set when a firing alert changed severity (Alertmanager: the old one is resolved)."""


@dataclass(frozen=True)
class Notification:
    """What a group has to say: its firing alerts and those resolved since its last notification."""

    group_key: str
    group_labels: dict[str, str]
    rule: str
    alerts: tuple[AlertEvent, ...]
    repeat: bool
    """Nothing changed: a reminder after repeat_interval."""

    @property
    def firing(self) -> int:
        return sum(1 for a in self.alerts if a.status == FIRING)


class _Group:
    __slots__ = ("due_at", "held", "held_repeat", "key", "last_notified", "members")

    def __init__(self, key: tuple[str, tuple[tuple[str, str], ...]]) -> None:
        self.key = key
        self.members: dict[tuple[str, str, Labels], Series] = {}
        self.last_notified: float | None = None
        self.due_at: float | None = None
        self.held = ""
        """Why the group's firing notification is held back until ``due_at`` (cooldown, max_per_day)."""
        self.held_repeat = False
        """The held notification was a repeat: it is sent as one when released."""


class Budget:
    """A group's firing notifications so far, for its rule's ``cooldown`` and ``max_per_day``. Kept
    apart from the group, which goes once every alert in it resolved: the limits must outlive that."""

    __slots__ = ("day", "last_firing", "sent_today")

    def __init__(self, last_firing: float, day: int, sent_today: int) -> None:
        self.last_firing = last_firing
        self.day = day
        """The UTC day (days since the epoch) ``sent_today`` counts."""
        self.sent_today = sent_today


def utc_day(t: float) -> int:
    return int(t // 86400.0)


@dataclass(frozen=True)
class Timing:
    group_wait_s: float = 0.0
    group_interval_s: float = 60.0
    repeat_interval_s: float = 4 * 3600.0
    stale_after_s: float = 300.0
    max_series: int = 10_000


class Engine:
    """Every rule of one processor instance, the series they watch, and the notification groups."""

    def __init__(self, rules: Iterable[RuleConfig], timing: Timing) -> None:
        self.rules = [Rule(r) for r in rules]
        self.timing = timing
        self.series: dict[tuple[str, str, Labels], Series] = {}
        self.groups: dict[tuple[str, tuple[tuple[str, str], ...]], _Group] = {}
        self._by_name: dict[str, tuple[Rule, ...]] = {}
        self._front: dict[SeriesKey, list[Series]] = {}
        """The series each point key feeds (none for most): one pointer-keyed lookup a point instead of
        the rules' selectors and a (rule, name, labels) lookup per rule."""
        self.ignored: collections.Counter[str] = collections.Counter()
        """Points a rule selected but could not use, by reason (read and reset by the processor)."""
        self.firing_counts: dict[tuple[str, str], int] = {}
        self._rule_by_name = {r.name: r for r in self.rules}
        self.budgets: dict[tuple[str, tuple[tuple[str, str], ...]], Budget] = {}
        """Firing notifications sent per group of a rule with a cooldown or max_per_day."""
        self.suppressed: collections.Counter[tuple[str, str]] = collections.Counter()
        """Firing notifications held back, by (rule, reason) (read and reset by the processor)."""
        self.changed = False
        """State changed since the last snapshot (the processor saves it then)."""

    # -- input -------------------------------------------------------------------------------------
    def _rules_for(self, name: str) -> tuple[Rule, ...]:
        rules = self._by_name.get(name)
        if rules is None:
            rules = tuple(r for r in self.rules if r.match_name(name))
            if len(self._by_name) > 100_000:  # metric names are bounded in practice; memory is not
                self._by_name.clear()
            self._by_name[name] = rules
        return rules

    def observe(self, points: Iterable[Point], now: float) -> list[Series]:
        """Add the points rules select to their series' windows; returns the series touched."""
        touched: dict[int, Series] = {}
        if not self.rules:
            return []
        front = self._front
        for point in points:
            key = key_of(point)
            targets = front.get(key)
            if targets is None or any(s.forgotten for s in targets):
                targets, complete = self._targets(point, now)
                if complete:  # else the point's next sighting tries (and counts) again
                    if len(front) >= _FRONT_LIMIT:
                        front.clear()
                    front[key] = targets
            for series in targets:
                if self._add(series, point, now):
                    touched[id(series)] = series
        return list(touched.values())

    def _targets(self, point: Point, now: float) -> tuple[list[Series], bool]:
        """The series of the rules that select ``point`` (made if new), and whether that is all of them
        (False when one could not be made: series_limit, counted)."""
        targets: list[Series] = []
        complete = True
        for rule in self._rules_for(point.name):
            if not rule.selector.matches(point.labels):
                continue
            key = (rule.name, point.name, point.labels)
            series = self.series.get(key)
            if series is None:
                if len(self.series) >= self.timing.max_series:
                    self.ignored["series_limit"] += 1
                    complete = False
                    continue
                series = self.series[key] = Series(rule, point.name, point.labels, now)
            targets.append(series)
        return targets, complete

    def _add(self, series: Series, point: Point, now: float) -> bool:
        t = point.time_unix_nano / 1e9 if point.time_unix_nano > 0 else now
        t = min(t, now)  # a clock ahead of ours must not keep a sample in the window forever
        payload: Any = None
        if point.kind is Kind.GAUGE or (
            point.kind is Kind.SUM and not point.monotonic and point.temporality is Temporality.CUMULATIVE
        ):
            mode, value = _GAUGE, point.value
        elif point.kind is Kind.SUM:
            mode = _DELTA if point.temporality is Temporality.DELTA else _CUMULATIVE
            value = point.value
        elif point.kind is Kind.HISTOGRAM and point.histogram is not None:
            cumulative = point.temporality is Temporality.CUMULATIVE
            mode, payload, value = (_CUM_EXP if cumulative else _EXP), point.histogram, point.histogram.count
        elif point.kind is Kind.HISTOGRAM and point.explicit is not None:
            cumulative = point.temporality is Temporality.CUMULATIVE
            mode, payload = (_CUM_EXPLICIT if cumulative else _EXPLICIT), point.explicit
            value = float(point.explicit.count)
        else:
            self.ignored["unsupported_kind"] += 1
            return False
        if not math.isfinite(value):
            self.ignored["not_finite"] += 1
            return False
        samples = series.samples
        if mode != series.mode:
            samples.clear()  # a series that changed kind: its old samples mean something else
            series.mode = mode
        elif samples and t < samples[-1][0]:
            self.ignored["out_of_order"] += 1
            return False
        if series.rule.latest_only or mode in _LATEST_ONLY:
            samples.clear()
        start = (
            point.start_time_unix_nano / 1e9 if 0 < point.start_time_unix_nano < point.time_unix_nano else 0.0
        )
        samples.append((t, float(value), start, payload))
        series.last_seen = now
        series.gone = False
        return True

    # -- statistics --------------------------------------------------------------------------------
    def statistic(self, series: Series, now: float) -> float | None:
        """The rule's statistic over the series' window at ``now``; None without data."""
        rule = series.rule
        samples = series.samples
        if not rule.latest_only and series.mode not in _LATEST_ONLY:
            cutoff = now - rule.window_s
            while samples and samples[0][0] <= cutoff:
                samples.popleft()
        if not samples:
            return None
        stat = rule.statistic
        mode = series.mode
        distribution = mode in (_EXP, _EXPLICIT, _CUM_EXP, _CUM_EXPLICIT)
        if stat == "last":
            return _mean(samples[-1][3]) if distribution else samples[-1][1]
        if stat == "count":
            return sum(s[1] for s in samples) if distribution else float(len(samples))
        if stat == "avg":
            if distribution:
                total = sum(s[1] for s in samples)
                return sum(s[3].sum for s in samples) / total if total > 0 else None
            return sum(s[1] for s in samples) / len(samples)
        if stat == "percentile":
            return _percentile(samples, mode, rule.config.quantile)
        return _rate(samples, mode)

    # -- state -------------------------------------------------------------------------------------
    def evaluate(self, now: float, series: Iterable[Series] | None = None) -> None:
        """Update the alert state of ``series`` (all when None); expire series without data."""
        everything = series is None
        dirty = everything
        for s in list(self.series.values()) if series is None else series:
            if everything and not s.gone and now - s.last_seen > self.timing.stale_after_s:
                self._expire(s, now)
                continue
            value = self.statistic(s, now)
            if value is not None:
                dirty = self._step(s, value, now) or dirty
        if dirty:  # a pass over every series: only when some state moved (or on the periodic pass)
            self.firing_counts = collections.Counter(
                (s.rule.name, s.severity) for s in self.series.values() if s.state == FIRING
            )

    def _expire(self, s: Series, now: float) -> None:
        s.gone = True
        s.samples.clear()
        s.since_warning = s.since_critical = s.active_since = None
        if s.state != INACTIVE:
            was, s.state = s.state, INACTIVE
            self.changed = True
            if was == FIRING:
                self._changed(s, now)
        if s.notice() is None:
            self._forget(s)

    def _forget(self, s: Series) -> None:
        self.series.pop(s.key, None)
        s.forgotten = True
        group = self.groups.get(s.group)
        if group is not None:
            group.members.pop(s.key, None)
        self.changed = True

    def _step(self, s: Series, value: float, now: float) -> bool:
        """Move the state machine with a new statistic value; True when the state changed."""
        rule = s.rule
        s.value = value
        cmp = rule.cmp
        hold_c = rule.critical is not None and cmp(value, rule.critical)
        hold_w = hold_c or (rule.warning is not None and cmp(value, rule.warning))
        s.since_critical = (now if s.since_critical is None else s.since_critical) if hold_c else None
        s.since_warning = (now if s.since_warning is None else s.since_warning) if hold_w else None
        lowest = WARNING if rule.warning is not None else CRITICAL
        eligible = None
        if s.since_critical is not None and now - s.since_critical >= rule.for_s:
            eligible = CRITICAL
        elif s.since_warning is not None and now - s.since_warning >= rule.for_s:
            eligible = lowest
        before = (s.state, s.severity)
        if s.state == FIRING:
            if eligible is not None:
                s.severity = eligible
            elif rule.resolve is not None and cmp(value, rule.resolve):
                s.severity = lowest  # between the levels and `resolve`: hysteresis keeps it firing
            else:
                s.state = INACTIVE
        elif eligible is not None:
            s.state, s.severity = FIRING, eligible
            s.active_since = s.since_warning if s.since_warning is not None else now
        else:
            s.state = PENDING if hold_w else INACTIVE
            s.active_since = s.since_warning if hold_w else None
        if (s.state, s.severity) == before:
            return False
        self.changed = True
        self._changed(s, now)
        return True

    def _changed(self, s: Series, now: float) -> None:
        if s.notice() == s.notified:
            return
        group = self.groups.get(s.group)
        if group is None:
            group = self.groups[s.group] = _Group(s.group)
        group.members[s.key] = s
        if group.due_at is None:
            t = self.timing
            group.due_at = (
                now + t.group_wait_s
                if group.last_notified is None
                else max(now, group.last_notified + t.group_interval_s)
            )

    # -- notifications -----------------------------------------------------------------------------
    def next_due(self) -> float | None:
        """When the next group is due (for the processor's timer), or None."""
        times = []
        for g in self.groups.values():
            if g.due_at is not None:
                times.append(g.due_at)
            elif g.last_notified is not None:
                times.append(g.last_notified + self.timing.repeat_interval_s)
        return min(times) if times else None

    def due(self, now: float, *, everything: bool = False) -> list[Notification]:
        """Notifications due at ``now``; ``everything`` flushes pending changes regardless of group_wait
        and group_interval (shutdown: they would be lost otherwise) — not regardless of a rule's
        cooldown or max_per_day: a held notification stays held (and saved) until its time."""
        out = []
        for group in list(self.groups.values()):
            repeat = False
            if group.held:
                if group.due_at is not None and now < group.due_at:
                    continue
                repeat = group.held_repeat
            elif group.due_at is None or (now < group.due_at and not everything):
                if group.last_notified is None or now < group.last_notified + self.timing.repeat_interval_s:
                    continue
                repeat = True
            if self._hold(group, now, repeat):
                continue
            notification = self._flush(group, now, repeat)
            if notification is not None:
                out.append(notification)
                if notification.firing:
                    self._spend(group, now)
        self._prune_budgets(now)
        return out

    def _hold(self, group: _Group, now: float, repeat: bool) -> bool:
        """Hold the group's notification back when it would announce firing alerts and its rule's
        cooldown or daily limit forbids that now; it is due again when the limit allows. Counted
        once per hold (and again if it then meets the other limit)."""
        rule = self._rule_by_name.get(group.key[0])
        budget = self.budgets.get(group.key)
        if rule is None or budget is None or (rule.cooldown_s <= 0 and rule.max_per_day <= 0):
            group.held = ""
            return False
        if not any(s.state == FIRING for s in group.members.values()):
            group.held = ""  # resolved-only notifications do not trigger anything: never held
            return False
        reason, until = "", now
        if rule.cooldown_s > 0 and now < budget.last_firing + rule.cooldown_s:
            reason, until = "cooldown", budget.last_firing + rule.cooldown_s
        if rule.max_per_day > 0 and budget.day == utc_day(now) and budget.sent_today >= rule.max_per_day:
            reason, until = "max_per_day", max(until, (utc_day(now) + 1) * 86400.0)
        if not reason:
            group.held = ""
            return False
        if group.held != reason:
            self.suppressed[(rule.name, reason)] += 1
            group.held = reason
        group.held_repeat = group.held_repeat or repeat
        group.due_at = until
        return True

    def _spend(self, group: _Group, now: float) -> None:
        group.held, group.held_repeat = "", False
        rule = self._rule_by_name.get(group.key[0])
        if rule is None or (rule.cooldown_s <= 0 and rule.max_per_day <= 0):
            return
        day = utc_day(now)
        budget = self.budgets.get(group.key)
        if budget is None:
            self.budgets[group.key] = Budget(now, day, 1)
        else:
            budget.sent_today = budget.sent_today + 1 if budget.day == day else 1
            budget.day, budget.last_firing = day, now
        self.changed = True

    def _prune_budgets(self, now: float) -> None:
        """Forget budgets that limit nothing any more (cooldown over, counted day past)."""
        if len(self.budgets) < 1024:
            return
        day = utc_day(now)
        for key, budget in list(self.budgets.items()):
            rule = self._rule_by_name.get(key[0])
            if rule is None or (budget.day != day and now >= budget.last_firing + rule.cooldown_s):
                del self.budgets[key]

    def _flush(self, group: _Group, now: float, repeat: bool) -> Notification | None:
        events: list[AlertEvent] = []
        changed = False
        sent: list[tuple[Series, tuple[str, str]]] = []
        for s in list(group.members.values()):
            notice = s.notice()
            if notice is None:  # resolved before anyone was told it fired: nothing to say
                del group.members[s.key]
                if s.gone:
                    self._forget(s)
                continue
            changed = changed or notice != s.notified
            previous = None
            if s.notified is not None and notice[0] == FIRING and s.notified[1] != notice[1]:
                previous = s.notified[1]
            events.append(self._event(s, notice, now, previous))
            sent.append((s, notice))
        group.due_at = None
        if not events or not (changed or repeat):
            if not group.members:
                del self.groups[group.key]
            return None
        for s, notice in sent:
            if notice[0] == RESOLVED:
                s.notified = None
                del group.members[s.key]
                if s.gone:
                    self._forget(s)
            else:
                s.notified = notice
        group.last_notified = now
        self.changed = True
        if not group.members:
            del self.groups[group.key]
        rule, key_labels = group.key
        return Notification(
            group_key=f"{rule}:{format_labels(key_labels)}",
            group_labels={"alertname": rule, **{alert_label_name(k): v for k, v in key_labels}},
            rule=rule,
            alerts=tuple(events),
            repeat=repeat and not changed,
        )

    def _event(self, s: Series, notice: tuple[str, str], now: float, previous: str | None) -> AlertEvent:
        status, severity = notice
        rule = s.rule
        fields = {
            "rule": rule.name,
            "metric": s.metric,
            "labels": _Fields(s.labels),  # a label the series lacks renders empty
            "series": s.metric + format_labels(s.labels),
            "severity": severity,
            "status": status,
            "value": s.value,
            "level": rule.level(severity),
            "op": rule.config.op,
            "statistic": rule.describe,
        }
        annotations = {k: render(v, fields) for k, v in rule.config.annotations.items()}
        annotations.setdefault("summary", render(rule.config.summary, fields))
        return AlertEvent(
            rule=rule.name,
            status=status,
            severity=severity,
            labels={**s.alert_labels, "severity": severity},
            annotations=annotations,
            starts_at=s.active_since if s.active_since is not None else now,
            ends_at=now if status == RESOLVED else None,
            value=s.value,
            previous_severity=previous,
        )

    def firing_events(self, now: float) -> list[AlertEvent]:
        """Alerts receivers were told are firing (Alertmanager's periodic resend)."""
        return [
            self._event(s, s.notified, now, None)
            for s in self.series.values()
            if s.notified is not None and s.notified[0] == FIRING and s.state == FIRING
        ]

    # -- status and persistence --------------------------------------------------------------------
    def active(self) -> list[dict[str, Any]]:
        """Pending and firing series, for /status."""
        return [
            {
                "rule": s.rule.name,
                "metric": s.metric,
                "labels": dict(s.labels),
                "state": s.state,
                "severity": s.severity if s.state == FIRING else None,
                "value": s.value if math.isfinite(s.value) else None,
                "active_since": s.active_since,
            }
            for s in self.series.values()
            if s.state in (FIRING, PENDING)
        ]

    def held(self) -> list[dict[str, Any]]:
        """Groups whose firing notification a rule's cooldown or max_per_day holds back, for /status."""
        out = []
        for g in self.groups.values():
            if g.held:
                budget = self.budgets.get(g.key)
                out.append(
                    {
                        "rule": g.key[0],
                        "group_labels": dict(g.key[1]),
                        "reason": g.held,
                        "until": g.due_at,
                        "sent_today": budget.sent_today if budget is not None else 0,
                    }
                )
        return out

    def snapshot(self) -> dict[str, Any]:
        """The alert state (not the windows): which series are pending or firing and since when, and
        what receivers were told. msgpack-able."""
        series = [
            {
                "rule": s.rule.name,
                "metric": s.metric,
                "labels": [list(kv) for kv in s.labels],
                "state": s.state,
                "severity": s.severity,
                "since_warning": s.since_warning,
                "since_critical": s.since_critical,
                "active_since": s.active_since,
                "value": s.value,
                "notified": list(s.notified) if s.notified else None,
                "gone": s.gone,
            }
            for s in self.series.values()
            if s.state != INACTIVE or s.notified is not None
        ]
        groups = [
            {"rule": g.key[0], "key": [list(kv) for kv in g.key[1]], "last_notified": g.last_notified}
            for g in self.groups.values()
            if g.last_notified is not None
        ]
        budgets = [
            {
                "rule": k[0],
                "key": [list(kv) for kv in k[1]],
                "last_firing": b.last_firing,
                "day": b.day,
                "sent_today": b.sent_today,
            }
            for k, b in self.budgets.items()
        ]
        return {"series": series, "groups": groups, "budgets": budgets}

    def restore(self, state: Mapping[str, Any], now: float) -> int:
        """Load a snapshot; entries of rules no longer configured are dropped. Series get a fresh
        ``last_seen``: the agent was down, which is not the series' fault. Returns series restored."""
        rules = {r.name: r for r in self.rules}
        restored = 0
        self._front.clear()  # restored series replace any of the same key
        for item in state.get("series", []):
            try:
                rule = rules.get(item["rule"])
                if rule is None:
                    continue
                labels: Labels = tuple((str(k), str(v)) for k, v in item["labels"])
                s = Series(rule, str(item["metric"]), labels, now)
                s.state = str(item["state"])
                if s.state not in (FIRING, PENDING, INACTIVE):
                    raise ValueError(s.state)
                s.severity = str(item["severity"])
                s.since_warning = _opt_float(item["since_warning"])
                s.since_critical = _opt_float(item["since_critical"])
                s.active_since = _opt_float(item["active_since"])
                s.value = float(item["value"])
                notified = item["notified"]
                s.notified = (str(notified[0]), str(notified[1])) if notified else None
                s.gone = bool(item["gone"])
            except (KeyError, TypeError, ValueError):
                self.ignored["bad_saved_state"] += 1
                continue
            self.series[s.key] = s
            restored += 1
            if s.notice() is not None:
                group = self.groups.get(s.group)
                if group is None:
                    group = self.groups[s.group] = _Group(s.group)
                group.members[s.key] = s
                if s.notice() != s.notified:
                    group.due_at = now
        for item in state.get("groups", []):
            try:
                key = (str(item["rule"]), tuple((str(k), str(v)) for k, v in item["key"]))
                last = float(item["last_notified"])
            except (KeyError, TypeError, ValueError):
                continue
            group = self.groups.get(key)
            if group is not None:
                group.last_notified = last
        for item in state.get("budgets", []):
            try:
                key = (str(item["rule"]), tuple((str(k), str(v)) for k, v in item["key"]))
                budget = Budget(float(item["last_firing"]), int(item["day"]), int(item["sent_today"]))
            except (KeyError, TypeError, ValueError):
                self.ignored["bad_saved_state"] += 1
                continue
            if key[0] in rules:
                self.budgets[key] = budget
        self.firing_counts = collections.Counter(
            (s.rule.name, s.severity) for s in self.series.values() if s.state == FIRING
        )
        return restored


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _mean(h: Any) -> float:
    count = h.count
    return float(h.sum / count) if count > 0 else math.nan


def _percentile(
    samples: collections.deque[tuple[float, float, float, Any]], mode: int, q: float
) -> float | None:
    if mode in (_EXP, _CUM_EXP):
        merged = exphist.merge_all([s[3] for s in samples], max_buckets=WINDOW_MAX_BUCKETS)
        value = exphist.quantile(merged, q)
        return None if math.isnan(value) else value
    if mode in (_EXPLICIT, _CUM_EXPLICIT):
        latest: ExplicitHistogram = samples[-1][3]
        counts = [0.0] * len(latest.counts)
        lo, hi = math.inf, -math.inf
        for s in samples:
            h: ExplicitHistogram = s[3]
            if h.bounds != latest.bounds:  # bounds changed inside the window: the older ones cannot merge
                continue
            for i, c in enumerate(h.counts):
                counts[i] += c
            if h.min is not None:
                lo = min(lo, h.min)
            if h.max is not None:
                hi = max(hi, h.max)
        return _explicit_quantile(latest.bounds, counts, q, lo, hi)
    values = sorted(s[1] for s in samples)
    # Nearest rank (numpy's "inverted_cdf"): the smallest value with at least q of the samples at or below.
    return values[min(max(math.ceil(q * len(values)) - 1, 0), len(values) - 1)]


def _explicit_quantile(
    bounds: tuple[float, ...], counts: list[float], q: float, lo: float, hi: float
) -> float | None:
    """Linear interpolation inside the bucket holding the rank, like Prometheus' histogram_quantile,
    with the exact min and max (when known) as the outer edges of the first and last buckets."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank = q * total
    running = 0.0
    for i, c in enumerate(counts):
        if c > 0 and running + c >= rank:
            low = bounds[i - 1] if i > 0 else (lo if math.isfinite(lo) else min(0.0, bounds[0]))
            high = bounds[i] if i < len(bounds) else (hi if math.isfinite(hi) else bounds[-1])
            low = max(low, lo) if math.isfinite(lo) else low
            high = min(high, hi) if math.isfinite(hi) else high
            return low + (high - low) * max(0.0, rank - running) / c
        running += c
    return hi if math.isfinite(hi) else bounds[-1]


def _rate(samples: collections.deque[tuple[float, float, float, Any]], mode: int) -> float | None:
    """Per second. Deltas (counters, delta distributions: their count): the sum over the span they
    cover — from the first sample's start time when known, else from the first sample's time (whose own
    delta is then left out). Cumulative counters: the increase over the window, a drop being a reset.
    Gauges: the change per second."""
    if mode in (_DELTA, _EXP, _EXPLICIT):
        first_t, _, first_start, _ = samples[0]
        last_t = samples[-1][0]
        if first_start > 0:
            span, total = last_t - first_start, sum(s[1] for s in samples)
        else:
            span, total = last_t - first_t, sum(s[1] for s in list(samples)[1:])
        return total / span if span > 0 else None
    if mode in (_CUMULATIVE, _GAUGE):
        if len(samples) < 2:
            return None
        span = samples[-1][0] - samples[0][0]
        if span <= 0:
            return None
        if mode == _GAUGE:
            return (samples[-1][1] - samples[0][1]) / span
        increase = 0.0
        previous = samples[0][1]
        for s in list(samples)[1:]:
            increase += s[1] - previous if s[1] >= previous else s[1]
            previous = s[1]
        return increase / span
    return None  # cumulative distributions: no window to take a rate over
