"""``logmetrics``: OTLP log records become metrics through the same event mappings as the ``http``
receiver's routes (:mod:`agent.json_events`), like Vector's ``log_to_metric`` and the Collector's
``count`` / ``signaltometrics`` connectors.

::

    connectors:
      logmetrics:
        rules:
          - when: {field: event.name, equals: [command_executed]}   # optional: which records
            mapping:
              metrics:
                - {name: command_executions_total}
                - {name: command_execution_duration_seconds, type: histogram,
                   field: execution_time_ms, unit: ms}
              labels: [command_name, status]
    service:
      pipelines:
        logs: {receivers: [otlp], exporters: [logmetrics, otlp_http]}
        metrics: {receivers: [logmetrics], exporters: [prometheus_remote_write]}

A log record is an event (a dict) made of, in this order of precedence:

- its attributes (``http.route`` is both the field ``http.route`` as a path ``http`` → ``route`` and,
  where no other attribute claims ``http``, readable as written);
- its body, when it is a map (kvlist) or a string holding a JSON object;
- ``severity_text``, ``severity_number``, ``timestamp`` (the record's time, else its observed time, in
  epoch seconds: the mappings' default ``timestamp`` field and ``auto`` format read it);
- ``resource``: the resource's attributes (``resource.service.name``).

Each rule whose ``when`` matches takes the record (a record may feed several rules); records no rule
takes are not counted (the logs pipeline still carries them). A record a mapping refuses (a missing
or non-numeric field, a bad timestamp, a label over the limits) is counted in
``headwater_connector_dropped_points_total{reason}`` with the mapping's refusal code, and the rest of
the batch still becomes metrics. Per logs batch and series, counters are summed, gauges keep the
latest value and histograms merge (one point per series and batch), and the points carry the
resource attributes listed in ``resource_attributes``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from agent import exphist
from agent.anyvalue import json_value
from agent.component import ComponentKind, Consumer, Factory, Settings, Signal
from agent.confmodel import Duration
from agent.json_events import EventMapper, EventMappingConfig, EventMetricConfig
from agent.limits import SeriesLimits
from agent.model import Batch, Labels, LogBatch, MetricBatch, Point, Resource, new_point
from connectors import ConnectorCounts

TYPE = "logmetrics"


@dataclass(frozen=True)
class LogWhenConfig:
    field: str = ""
    """Field path of the record's event that selects it (event.name); empty: every record."""
    equals: list[str] = dataclasses.field(default_factory=list)
    """Values of that field that select the record (as text); empty: the field is present."""


@dataclass(frozen=True)
class LogRuleConfig:
    mapping: EventMappingConfig
    """The metrics a selected record makes: the http receiver's mapping (metrics, labels, timestamp)."""
    when: LogWhenConfig = dataclasses.field(default_factory=LogWhenConfig)
    """Which records this rule takes."""


_COUNT_EVERY_RECORD = LogRuleConfig(EventMappingConfig(metrics=[EventMetricConfig(name="log.record.count")]))


@dataclass(frozen=True)
class LogMetricsConfig:
    rules: list[LogRuleConfig] = dataclasses.field(default_factory=lambda: [_COUNT_EVERY_RECORD])
    """Mappings and the records each takes (at least one rule). Default: log.record.count, one a record
    (the Collector's count connector)."""
    resource_attributes: list[str] = dataclasses.field(
        default_factory=lambda: ["service.name", "service.namespace", "service.instance.id"]
    )
    """Resource attributes the metrics keep (Prometheus exporters make job/instance of them)."""
    max_timestamp_age: Duration = Duration(86400.0)
    """A record older than this is refused (timestamp_out_of_range)."""
    max_timestamp_ahead: Duration = Duration(600.0)
    """A record further ahead of the agent's clock than this is refused."""
    max_buckets: int = 2048
    """Largest exponential histogram a batch's observations make (as the receivers)."""
    max_scale: int = 8
    """Finest histogram scale (Prometheus' finest native schema)."""
    limits: SeriesLimits = dataclasses.field(default_factory=SeriesLimits)
    """Size limits of the series the mappings make."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.rules:
            problems.append(("rules", "a logmetrics connector needs at least one rule"))
        for i, rule in enumerate(self.rules):
            problems += [(f"rules::{i}::mapping::{p}", m) for p, m in rule.mapping.validate(self.limits)]
            if rule.when.equals and not rule.when.field:
                problems.append(
                    (f"rules::{i}::when::equals", "values to compare need the field holding them")
                )
        if not 1 <= self.max_buckets <= 1 << 16:
            problems.append(("max_buckets", "must be between 1 and 65536"))
        if not exphist.MIN_SCALE <= self.max_scale <= exphist.MAX_SCALE:
            problems.append(("max_scale", f"must be between {exphist.MIN_SCALE} and {exphist.MAX_SCALE}"))
        if self.max_timestamp_age <= 0 or self.max_timestamp_ahead <= 0:
            problems.append(("max_timestamp_age", "both timestamp bounds must be greater than 0"))
        problems += [(f"limits::{p}", m) for p, m in self.limits.validate()]
        return problems


def put(event: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` in ``event``, also as a nested path when it is dotted (``http.route`` → ``http`` →
    ``route``), so mapping paths find it; a dotted key whose first part holds a non-map stays flat."""
    event[key] = value
    if "." not in key:
        return
    *parents, last = key.split(".")
    node = event
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif type(child) is not dict:
            return
        node = child
    node.setdefault(last, value)


def record_event(record: Any, resource: dict[str, Any]) -> dict[str, Any]:
    """The event (a dict) a ``LogRecord`` is to the mappings (see the module docs)."""
    event: dict[str, Any] = {}
    body = record.body
    which = body.WhichOneof("value")
    if which == "kvlist_value":
        found = json_value(body)
        for key, value in found.items():
            put(event, key, value)
    elif which == "string_value" and body.string_value.lstrip().startswith("{"):
        try:
            decoded = json.loads(body.string_value)
        except ValueError:
            decoded = None
        if type(decoded) is dict:
            for key, value in decoded.items():
                put(event, key, value)
    for kv in record.attributes:  # attributes win over the body's fields
        put(event, kv.key, json_value(kv.value))
    if record.severity_text:
        event.setdefault("severity_text", record.severity_text)
    if record.severity_number:
        event.setdefault("severity_number", int(record.severity_number))
    t_ns = record.time_unix_nano or record.observed_time_unix_nano
    if t_ns and "timestamp" not in event:
        event["timestamp"] = t_ns / 1e9
    event.setdefault("resource", resource)
    return event


class _Rule:
    __slots__ = ("equals", "get", "mapper")

    def __init__(self, rule: LogRuleConfig, config: LogMetricsConfig) -> None:
        self.mapper = EventMapper(
            rule.mapping,
            max_timestamp_age_s=float(config.max_timestamp_age),
            max_timestamp_ahead_s=float(config.max_timestamp_ahead),
            max_buckets=config.max_buckets,
            max_scale=config.max_scale,
            limits=config.limits,
        )
        parts = rule.when.field.split(".") if rule.when.field else []
        self.get = parts
        self.equals = frozenset(rule.when.equals)

    def takes(self, event: dict[str, Any]) -> bool:
        if not self.get:
            return True
        v: Any = event
        for part in self.get:
            if type(v) is not dict:
                return False
            v = v.get(part)
        if v is None:
            return False
        if not self.equals:
            return True
        text = ("true" if v else "false") if type(v) is bool else str(v)
        return text in self.equals


class LogMetrics:
    """Log records → metrics, one MetricBatch per logs batch (see the module docs)."""

    def __init__(self, settings: Settings, config: LogMetricsConfig, next_consumer: Consumer) -> None:
        self._next = next_consumer
        self._rules = [_Rule(rule, config) for rule in config.rules]
        self._keep = frozenset(config.resource_attributes)
        self._counts = ConnectorCounts(settings.telemetry)
        self._resources: dict[Labels, Resource] = {}
        """One Resource per kept attribute set (bounded), so points of one service share it."""

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def consume(self, batch: Batch) -> None:
        if not isinstance(batch, LogBatch):  # the factory offers logs → metrics only
            raise TypeError(f"logmetrics takes logs, got {type(batch).__name__}")
        now_ns = time.time_ns()
        points: list[Point] = []
        refused: Counter[str] = Counter()
        for rl in batch.resource_logs:
            attrs = [(kv.key, json_value(kv.value)) for kv in rl.resource.attributes]
            resource_fields: dict[str, Any] = {}
            for key, value in attrs:
                put(resource_fields, key, value)
            resource = self._resource(attrs)
            chosen: list[list[dict[str, Any]]] = [[] for _ in self._rules]
            for sl in rl.scope_logs:
                for record in sl.log_records:
                    event = record_event(record, resource_fields)
                    for i, rule in enumerate(self._rules):
                        if rule.takes(event):
                            chosen[i].append(event)
            for rule, events in zip(self._rules, chosen, strict=True):
                if not events:
                    continue
                parsed = rule.mapper.map(events, now_ns)
                refused.update(parsed.refused)
                points += [_with_resource(p, resource) for p in parsed.points]
        for reason, n in refused.items():
            self._counts.dropped(reason, n)
        if points:
            # A refusal downstream reaches the caller: the logs batch was not taken, and is counted
            # (incoming) only when it was.
            await self._next.consume(MetricBatch(tuple(points), context=batch.context))
            self._counts.outgoing(len(points))
        self._counts.incoming(len(batch))

    def _resource(self, attrs: list[tuple[str, Any]]) -> Resource | None:
        kept = tuple(sorted((k, _text(v)) for k, v in attrs if k in self._keep and v is not None))
        if not kept:
            return None
        found = self._resources.get(kept)
        if found is None:
            if len(self._resources) >= 4096:
                self._resources.clear()
            found = self._resources[kept] = Resource(kept)
        return found


def _text(v: Any) -> str:
    if type(v) is bool:
        return "true" if v else "false"
    return (
        v if type(v) is str else json.dumps(v, separators=(",", ":")) if type(v) in (dict, list) else str(v)
    )


def _with_resource(p: Point, resource: Resource | None) -> Point:
    if resource is None:
        return p
    return new_point(
        p.name, p.kind, p.labels, p.time_unix_nano, p.value, p.start_time_unix_nano, p.temporality,
        p.monotonic, p.histogram, p.unit, p.description, resource, p.scope, p.explicit, p.summary,
    )  # fmt: skip


def create(settings: Settings, config: LogMetricsConfig, next_consumer: Consumer) -> LogMetrics:
    return LogMetrics(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.CONNECTOR,
    config_class=LogMetricsConfig,
    create=create,
    signal_pairs=frozenset({(Signal.LOGS, Signal.METRICS)}),
    description="Turns log records into metrics with the http receiver's event mappings.",
)

__all__ = ["LogMetrics", "LogMetricsConfig", "LogRuleConfig", "LogWhenConfig", "factory"]
