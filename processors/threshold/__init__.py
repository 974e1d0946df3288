"""``threshold``: alerts evaluated at the edge. Observes metrics, passes every batch on unchanged.

Each rule watches the series of one metric (a name or a glob, plus Prometheus-style label matchers),
computes a statistic per series — ``last`` value, ``rate`` per second, ``avg``, ``percentile`` or
``count`` over a window — and compares it with a ``warning`` and/or ``critical`` level.

State per series (the series' labels are its identity):

- inactive → pending when a level's comparison holds; → firing once it held for ``for``
  (``for`` in Prometheus: a Python keyword cannot be a config key here). The critical level needs its
  own ``for`` to escalate a firing warning; dropping back below critical while warning still
  holds downgrades at once.
- firing → resolved when no level holds any more — or, with ``resolve`` set (hysteresis), only once
  the value passes the ``resolve`` level too (op ``>``: falls to or below it). In the band between the
  levels and ``resolve`` the alert stays firing, at warning severity when the rule has a warning level.
- no data: a series whose window is empty keeps its state; one without any point for ``stale_after``
  resolves (if firing) and is forgotten.

Time: the processor's clock (wall time, injectable for tests) says "now". Windows hold the points whose
timestamps (capped at now; 0 = arrival time) lie within ``window`` of now; ``for`` timers are
measured on the same clock, at each batch and every ``evaluation_interval``.

Statistics by point kind: counters and gauges use their values (``count`` = number of points); delta
distributions (StatsD timers, OTLP delta histograms) use their observations — ``percentile`` merges
the exponential histograms of the window (explicit-bucket ones are summed and interpolated),
``avg`` is sum/count, ``count`` and ``rate`` count observations; ``last`` of a distribution is the
latest point's mean. Cumulative distributions are lifetime totals: they use the latest point alone
and have no rate. ``rate`` of a cumulative counter treats a drop as a reset; of a gauge it is the
change per second. Summaries are ignored (counted: alert_ignored_points_total{reason}).

Notifications (deduplicated, grouped, rate-limited; a simplified Alertmanager):

- One notification per state change per series: firing (or a new severity) and resolved. A series
  that resolves before anyone was told it fired is never mentioned.
- Alerts group by rule + ``group_by`` labels. A new group's first notification waits ``group_wait``;
  later changes wait until ``group_interval`` has passed since the group's last notification; each
  notification lists the group's firing alerts plus those resolved since the last one.
- While a group has firing alerts and nothing changes, it is re-sent every ``repeat_interval``.
- Limits for alerts that trigger work (a retraining job): a rule's ``cooldown`` holds a group's
  firing notification back until ``cooldown`` after the group's last firing notification, and
  ``max_per_day`` allows that many firing notifications per group per UTC day (days turn at 00:00 UTC,
  not a rolling 24 h, so "twice a day" reads as the calendar says). Held, not dropped: when the limit
  allows, the group is notified if it still fires (one notification, however often it re-fired
  meanwhile); if everything resolved meanwhile, nothing is sent. Repeats count as firing
  notifications; resolved-only notifications are never held nor counted (they trigger nothing: use
  the webhook's ``send_resolved: false`` to keep them from a job API). The hold applies to every
  receiver of the rule's group. Holds are counted once each:
  ``headwater_alert_notifications_suppressed_total{processor, rule, reason="cooldown"|"max_per_day"}``;
  /status lists held groups (``held_notifications``); the counts are part of the saved alert state,
  so a restart resets neither.
- Alertmanager additionally gets every firing alert re-sent each ``alertmanager.resend_interval`` with
  endsAt 4 intervals ahead (as Prometheus does), so it never times one out; it groups and dedups itself.

Receivers: the log (always unless ``log: false``), ``webhook`` (Slack's ``text`` + Alertmanager's
webhook JSON), ``alertmanager`` (``POST {url}/api/v2/alerts``). A webhook with a ``body_template``
calls an API directly instead — one request per alert, ``{{ labels.model }}``-style substitution only,
values JSON-escaped (see processors/threshold/template.py); ``send_resolved: false`` sends firing
alerts only. HTTP delivery goes through
``sending_queue`` and ``retry_on_failure`` like an exporter's; with ``storage: disk`` undelivered
notifications survive a restart. The alert state (pending/firing series, since-times, what was
notified) is saved to ``state_directory`` — by default the disk queue's directory — after each
evaluation that changed it, and restored at start, so ``for`` timers and dedup survive a
restart; without either, a restart starts from no alerts (firing ones notify again once they fire).

Self-metrics: ``headwater_alert_state{processor, rule, severity}`` = number of series firing at that
severity; ``headwater_alert_notifications_total / _sent_total / _failed_total{receiver[, reason]}``;
the receivers' queues as exporter metrics labelled ``exporter="<processor id>:webhook"``. /status lists
the pending and firing alerts.

Example::

    processors:
      threshold/latency:
        rules:
          - name: api_latency_p99
            metric: http.server.duration
            match: '{env="prod", host=~"web-.*"}'
            statistic: percentile
            quantile: 0.99
            window: 5m
            op: ">"
            warning: 0.5
            critical: 1.0
            resolve: 0.4
            for: 2m
            group_by: [service]
            labels: {team: api}
            annotations: {runbook_url: "https://runbooks/api-latency"}
        group_wait: 10s
        repeat_interval: 4h
        webhook: {url: "https://hooks.slack.com/services/${env:SLACK_HOOK}"}
        # or a job API:  webhook: {url: "https://jobs/api/retrain", send_resolved: false,
        #   body_template: '{"model": "{{ labels.model }}", "reason": "psi {{ value }}"}'}
        alertmanager: {url: "http://alertmanager:9093"}
        sending_queue: {storage: disk, directory: /var/lib/headwater/queue}
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.component import ComponentKind, Consumer, Factory, Settings, Signal, Tasks
from agent.confmodel import Duration
from agent.counting import PointCounts
from agent.diskqueue import StateFile, partition_name
from agent.model import MetricBatch
from agent.netcheck import directory_problem
from agent.sending import QueueConfig, RetryConfig
from processors.threshold.engine import SEVERITIES, Engine, Timing
from processors.threshold.notify import (
    HttpNotifier,
    LogNotifier,
    alertmanager_body,
    templated_bodies,
    webhook_body,
)
from processors.threshold.selector import Selector, SelectorError
from processors.threshold.template import BodyTemplate, TemplateError

TYPE = "threshold"

DEFAULT_SUMMARY = "{series}: {statistic} is {value:.4g} ({severity} when {op} {level:g})"


@dataclass(frozen=True)
class RuleConfig:
    name: str = ""
    """Rule name (required, unique in the processor): the alert's `alertname`."""
    metric: str = ""
    """Metric name as received (dotted for StatsD), or a glob: `http.*.duration`."""
    match: str = ""
    """Label matchers, Prometheus style: '{env="prod", host=~"web-.*", path!~"/health.*"}'."""
    statistic: Literal["last", "rate", "avg", "percentile", "count"] = "last"
    """last value; rate per second (counters); avg, percentile or count over the window."""
    quantile: float = 0.99
    """For percentile: the quantile, in [0, 1]."""
    window: Duration = Duration(60.0)
    """Span of points that rate, avg, percentile and count look at."""
    op: Literal[">", ">=", "<", "<="] = ">"
    """How the statistic is compared with the levels: alert when `statistic op level`."""
    warning: float | None = None
    """Warning level (set warning, critical, or both)."""
    critical: float | None = None
    """Critical level."""
    resolve: float | None = None
    """Hysteresis: a firing alert resolves only once the comparison with this level fails too."""
    for_duration: Duration = field(default=Duration(0.0), metadata={"key": "for"})
    """How long a level must hold before the alert fires (Prometheus' `for`)."""
    group_by: list[str] = field(default_factory=list)
    """Series labels whose values split the rule's notifications into groups."""
    labels: dict[str, str] = field(default_factory=dict)
    """Extra alert labels (team, service); they win over series labels of the same name."""
    annotations: dict[str, str] = field(default_factory=dict)
    """Alert annotations; templates with {rule} {metric} {series} {labels[x]} {value} {level} {severity}."""
    summary: str = DEFAULT_SUMMARY
    """The `summary` annotation (and the Slack line) unless annotations set one; same template fields."""
    cooldown: Duration = Duration(0.0)
    """A group's next firing notification waits this long after its last (then sent if firing); 0: off."""
    max_per_day: int = 0
    """Firing notifications per group per UTC day at most (more wait for the next day); 0: no limit."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.name:
            problems.append(("name", "required: name the rule (it becomes alertname)"))
        if not self.metric:
            problems.append(("metric", "required: the metric name or a glob"))
        try:
            Selector(self.match)
        except SelectorError as exc:
            problems.append(("match", str(exc)))
        if self.warning is None and self.critical is None:
            problems.append(("", "set a warning level, a critical level, or both"))
        if not 0.0 <= self.quantile <= 1.0:
            problems.append(("quantile", "must be within [0, 1]"))
        if self.window <= 0:
            problems.append(("window", "must be greater than 0"))
        if self.for_duration < 0:
            problems.append(("for", "must not be negative"))
        if self.cooldown < 0:
            problems.append(("cooldown", "must not be negative"))
        if self.max_per_day < 0:
            problems.append(("max_per_day", "must not be negative (0: no limit)"))
        above = self.op in (">", ">=")
        levels = [v for v in (self.warning, self.critical) if v is not None]
        if self.warning is not None and self.critical is not None:
            if above and self.warning > self.critical:
                problems.append(("warning", f"with op {self.op}, warning must not be above critical"))
            if not above and self.warning < self.critical:
                problems.append(("warning", f"with op {self.op}, warning must not be below critical"))
        if self.resolve is not None and levels:
            if above and self.resolve > min(levels):
                problems.append(("resolve", f"with op {self.op}, resolve must not be above the lowest level"))
            if not above and self.resolve < max(levels):
                problems.append(
                    ("resolve", f"with op {self.op}, resolve must not be below the highest level")
                )
        fields = {"labels": _Probe(), "value": 1.0, "level": 1.0}
        for key, template in [
            ("summary", self.summary),
            *((f"annotations::{k}", v) for k, v in self.annotations.items()),
        ]:
            try:
                template.format_map(_Probe(fields))
            except (ValueError, IndexError, AttributeError, TypeError, KeyError) as exc:
                problems.append((key, f"bad template {template!r}: {exc}"))
        return problems


class _Probe(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return ""


@dataclass(frozen=True)
class WebhookConfig:
    url: str = ""
    """URL to POST to (a Slack incoming webhook, or any service taking Alertmanager's webhook JSON)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra request headers (e.g. Authorization from ${env:VAR}; a Content-Type for a non-JSON body)."""
    body_template: str = ""
    """Body instead of the Alertmanager/Slack JSON, one request per alert: '{"m": "{{ labels.model }}"}'."""
    send_resolved: bool = True
    """Also send resolved notifications (Alertmanager's setting); false for a job API that acts on firing."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.url.startswith(("http://", "https://")):
            problems.append(("url", f"{self.url!r} is not an http:// or https:// URL"))
        if self.body_template:
            try:
                self.template()
            except TemplateError as exc:
                problems.append(("body_template", str(exc)))
        return problems

    def content_type(self) -> str:
        for name, value in self.headers.items():
            if name.lower() == "content-type":
                return value
        return "application/json"

    def template(self) -> BodyTemplate | None:
        """The parsed ``body_template`` (None when unset); raises TemplateError."""
        if not self.body_template:
            return None
        return BodyTemplate(self.body_template, json_body="json" in self.content_type().lower())


@dataclass(frozen=True)
class AlertmanagerConfig:
    url: str = "http://127.0.0.1:9093"
    """Alertmanager's base URL; alerts go to {url}/api/v2/alerts."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra request headers."""
    resend_interval: Duration = Duration(60.0)
    """Firing alerts are re-sent this often, with endsAt 4 intervals ahead, so Alertmanager keeps them."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.url.startswith(("http://", "https://")):
            problems.append(("url", f"{self.url!r} is not an http:// or https:// URL"))
        if self.resend_interval <= 0:
            problems.append(("resend_interval", "must be greater than 0"))
        return problems


@dataclass(frozen=True)
class ThresholdConfig:
    rules: list[RuleConfig] = field(default_factory=list)
    """The alert rules."""
    evaluation_interval: Duration = Duration(10.0)
    """Besides at each batch, every series is evaluated this often (for_duration, windows, staleness)."""
    stale_after: Duration = Duration(300.0)
    """A series without points this long resolves (if firing) and is forgotten."""
    max_series: int = 10_000
    """Series watched at most (all rules); points of further series are ignored and counted."""
    group_wait: Duration = Duration(0.0)
    """A new notification group waits this long before its first notification (to gather alerts)."""
    group_interval: Duration = Duration(60.0)
    """Later changes in a group are notified at most this often."""
    repeat_interval: Duration = Duration(4 * 3600.0)
    """A group still firing with no change is notified again after this long."""
    log: bool = True
    """Log every notification (WARNING firing, INFO resolved)."""
    webhook: WebhookConfig | None = None
    """A webhook receiver (Slack-compatible)."""
    alertmanager: AlertmanagerConfig | None = None
    """An Alertmanager receiver (API v2)."""
    generator_url: str = ""
    """Link put in alerts' generatorURL (a dashboard, say)."""
    timeout: Duration = Duration(10.0)
    """Time limit of one notification request."""
    sending_queue: QueueConfig = field(default_factory=QueueConfig)
    """Queue of each HTTP receiver; storage: disk keeps undelivered notifications across restarts."""
    retry_on_failure: RetryConfig = field(default_factory=RetryConfig)
    """Retries of failed notification requests (5xx, 429, connection errors; other 4xx are dropped)."""
    state_directory: str = ""
    """Where the alert state is saved; empty: the disk queue's directory, or nowhere with a memory queue."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name and rule.name in seen:
                problems.append((f"rules::{i}::name", f"another rule is named {rule.name!r}"))
            seen.add(rule.name)
            problems.extend((f"rules::{i}::{p}" if p else f"rules::{i}", m) for p, m in rule.validate())
        for name in ("evaluation_interval", "group_interval", "repeat_interval", "stale_after", "timeout"):
            if getattr(self, name) <= 0:
                problems.append((name, "must be greater than 0"))
        if self.group_wait < 0:
            problems.append(("group_wait", "must not be negative"))
        if self.max_series < 1:
            problems.append(("max_series", "must be at least 1"))
        for section in ("webhook", "alertmanager", "sending_queue", "retry_on_failure"):
            sub = getattr(self, section)
            if sub is not None:
                problems.extend((f"{section}::{p}" if p else section, m) for p, m in sub.validate())
        return problems

    def environment_problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.webhook is not None or self.alertmanager is not None:
            problems += [(f"sending_queue::{p}", m) for p, m in self.sending_queue.environment_problems()]
        if self.state_directory:
            problem = directory_problem(self.state_directory)
            if problem:
                problems.append(("state_directory", problem))
        return problems


Clock = Callable[[], float]


class ThresholdProcessor:
    """Evaluates rules over the batches it passes on, and notifies receivers of alert state changes."""

    def __init__(
        self,
        settings: Settings,
        config: ThresholdConfig,
        next_consumer: Consumer,
        *,
        clock: Clock = time.time,
    ) -> None:
        self._settings = settings
        self._config = config
        self._next = next_consumer
        self._clock = clock
        self._log = settings.logger
        self.engine = Engine(
            config.rules,
            Timing(
                group_wait_s=config.group_wait,
                group_interval_s=config.group_interval,
                repeat_interval_s=config.repeat_interval,
                stale_after_s=config.stale_after,
                max_series=config.max_series,
            ),
        )
        tel = settings.telemetry
        self._counts = PointCounts(tel)
        self._errors = tel.counter(
            "alert_evaluation_errors_total",
            "Evaluations that failed unexpectedly (logged; data still flows).",
        )
        for rule in config.rules:
            for severity in SEVERITIES:
                if getattr(rule, severity) is not None:
                    tel.gauge(
                        "alert_state",
                        "Series firing at this severity, per rule.",
                        self._firing_reader(rule.name, severity),
                        rule=rule.name,
                        severity=severity,
                    )
        self._log_notifier = LogNotifier(settings.logger) if config.log else None
        self._http: list[HttpNotifier] = []
        self._alertmanager: HttpNotifier | None = None
        if config.webhook is not None:
            url = config.generator_url
            receiver = tel.id
            template = config.webhook.template()
            resolved = config.webhook.send_resolved
            self._http.append(
                self._notifier(
                    "webhook",
                    config.webhook.url,
                    dict(config.webhook.headers),
                    (
                        (lambda n, now: [(webhook_body(n, receiver, url), len(n.alerts))])
                        if template is None
                        else (lambda n, now: templated_bodies(template, n, send_resolved=resolved))
                    ),
                    send_resolved=config.webhook.send_resolved,
                )
            )
        if config.alertmanager is not None:
            am = config.alertmanager
            ahead = 4 * float(am.resend_interval)
            self._alertmanager = self._notifier(
                "alertmanager",
                am.url.rstrip("/") + "/api/v2/alerts",
                dict(am.headers),
                lambda n, now: [
                    (alertmanager_body(list(n.alerts), now, ahead, config.generator_url), len(n.alerts))
                ],
            )
            self._http.append(self._alertmanager)
        self._last_resend = 0.0
        directory = config.state_directory or (
            config.sending_queue.directory if config.sending_queue.storage == "disk" else ""
        )
        self._state_file = (
            StateFile(os.path.join(directory, partition_name(tel.id) + ".alerts"))
            if directory and config.rules
            else None
        )
        self._tasks = Tasks(tel.id, settings.logger)
        self._started = False
        self._stopped = False
        self._lock = asyncio.Lock()

    def _firing_reader(self, rule: str, severity: str) -> Callable[[], float]:
        key = (rule, severity)
        return lambda: float(self.engine.firing_counts.get(key, 0))

    def _notifier(
        self, name: str, url: str, headers: dict[str, str], encode: Any, *, send_resolved: bool = True
    ) -> HttpNotifier:
        c = self._config
        return HttpNotifier(
            name,
            self._settings,
            url,
            headers,
            c.timeout,
            c.sending_queue,
            c.retry_on_failure,
            encode,
            send_resolved=send_resolved,
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        if self._state_file is not None:
            saved = await asyncio.to_thread(self._state_file.load)
            if saved:
                restored = self.engine.restore(saved, self._clock())
                self._log.info("restored the state of %d alert series", restored)
        started: list[HttpNotifier] = []
        try:
            for notifier in self._http:
                await notifier.start()
                started.append(notifier)
        except BaseException:
            for notifier in started:
                await notifier.shutdown(0.0)
            raise
        self._last_resend = self._clock()
        if self.engine.rules:
            self._tasks.spawn(self._run(), "evaluate")

    async def shutdown(self) -> None:
        """Stop evaluating, send what groups still hold (ignoring group_wait), save the state, then let
        the receivers' queues drain until the shutdown deadline. Idempotent, safe before start."""
        if self._stopped:
            return
        self._stopped = True
        await self._tasks.close()
        if self._started:
            try:
                async with self._lock:
                    await self._dispatch(self._clock(), everything=True)
                    await self._save()
                self._count_ignored()
            except Exception as exc:
                self._errors.value += 1
                self._log.error("could not flush alerts on shutdown: %r", exc)
        timeout = self._settings.shutdown_timeout_s
        await asyncio.gather(*(n.shutdown(timeout) for n in self._http))
        tel = self._settings.telemetry
        tel.telemetry.unregister_gauges(processor=tel.id)

    # -- data --------------------------------------------------------------------------------------
    async def consume(self, batch: MetricBatch) -> None:
        n = len(batch)
        self._counts.incoming(n)
        # Pass on first: a batch refused downstream (Backpressure) is offered again by the receiver,
        # and observing it both times would count its points twice in count, rate and avg windows.
        await self._next.consume(batch)
        self._counts.outgoing(n)
        if self.engine.rules and not self._stopped:
            try:
                async with self._lock:
                    now = self._clock()
                    touched = self.engine.observe(batch.points, now)
                    if touched:
                        self.engine.evaluate(now, touched)
                        await self._dispatch(now)
            except Exception as exc:  # an alerting bug must never stop the data
                self._errors.value += 1
                self._log.error("alert evaluation failed: %r", exc, exc_info=exc)
            self._count_ignored()

    async def tick(self) -> None:
        """Evaluate every series now, send due notifications, save changed state. The evaluation task
        calls it every ``evaluation_interval``; tests call it after moving their clock."""
        async with self._lock:
            now = self._clock()
            self.engine.evaluate(now)
            await self._dispatch(now)
            await self._save()
        self._count_ignored()

    async def _run(self) -> None:
        interval = float(self._config.evaluation_interval)
        while True:
            wait = interval
            due = self.engine.next_due()
            if due is not None:
                wait = min(wait, max(0.05, due - self._clock()))
            await asyncio.sleep(wait)
            try:
                await self.tick()
            except Exception as exc:
                self._errors.value += 1
                self._log.error("alert evaluation failed: %r", exc, exc_info=exc)

    async def _dispatch(self, now: float, *, everything: bool = False) -> None:
        notifications = self.engine.due(now, everything=everything)
        for n in notifications:
            if self._log_notifier is not None:
                self._log_notifier.notify(n, now)
            for notifier in self._http:
                notifier.notify(n, now)
        am = self._alertmanager
        if am is not None and now - self._last_resend >= float(self._config.alertmanager.resend_interval):  # type: ignore[union-attr]
            self._last_resend = now
            events = self.engine.firing_events(now)
            if events:
                ahead = 4 * float(self._config.alertmanager.resend_interval)  # type: ignore[union-attr]
                am.offer(alertmanager_body(events, now, ahead, self._config.generator_url), len(events))
        for notifier in self._http:
            await notifier.commit()

    async def _save(self) -> None:
        if self._state_file is None or not self.engine.changed:
            return
        self.engine.changed = False
        try:
            await asyncio.to_thread(self._state_file.save, self.engine.snapshot())
        except OSError as exc:
            self.engine.changed = True
            self._log.warning("could not save the alert state: %s", exc)

    def _count_ignored(self) -> None:
        suppressed = self.engine.suppressed
        if suppressed:
            tel = self._settings.telemetry
            for (rule, reason), count in suppressed.items():
                tel.counter(
                    "alert_notifications_suppressed_total",
                    "Firing notifications a rule's cooldown or max_per_day held back, by rule and reason.",
                    rule=rule,
                    reason=reason,
                ).value += count
            suppressed.clear()
        ignored = self.engine.ignored
        if ignored:
            tel = self._settings.telemetry
            for reason, count in ignored.items():
                tel.counter(
                    "alert_ignored_points_total",
                    "Points a rule selected but could not use, by reason.",
                    reason=reason,
                ).value += count
            ignored.clear()

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For /status: pending and firing alerts, and the receivers' queue sizes."""
        return {
            "alerts": self.engine.active(),
            "held_notifications": self.engine.held(),
            "notification_queues": {n.name: n.sender.queued for n in self._http},
        }


def _create(settings: Settings, config: ThresholdConfig, next_consumer: Consumer) -> ThresholdProcessor:
    return ThresholdProcessor(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=ThresholdConfig,
    create=_create,
    signals=frozenset({Signal.METRICS}),
    description="Evaluates alert rules at the edge and notifies a webhook (Slack), Alertmanager and the log.",
)
