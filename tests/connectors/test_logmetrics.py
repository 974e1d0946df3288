"""The logmetrics connector (connectors/logmetrics.py): OTLP log records become metrics through the
http receiver's event mappings. Records built with the opentelemetry-proto classes; end to end, the
OpenTelemetry SDK's OTLP log exporter sends to the real otlp receiver, the records cross logmetrics
into a metrics pipeline and are scraped from the real prometheus exporter."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
import yaml
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1 import logs_pb2
from prometheus_client.parser import text_string_to_metric_families

from agent.component import Backpressure, ComponentKind, Signal, validate_config
from agent.confmodel import Decoder
from agent.model import Kind, LogBatch
from agent.registry import builtin_factories
from agent.telemetry import Telemetry
from connectors.logmetrics import LogMetrics, LogMetricsConfig, factory
from tests.conftest import AgentGraph, Sink, component_settings, free_port, wait_until

NOW_S = time.time()

COMMANDS = """
rules:
  - when: {field: event.name, equals: [command_executed]}
    mapping:
      metrics:
        - {name: command_executions_total}
        - {name: command_execution_duration_seconds, type: histogram, field: execution_time_ms, unit: ms}
      labels: [command_name, status, http.route]
  - when: {field: severity_text, equals: [ERROR]}
    mapping:
      metrics: [{name: log_errors_total}]
      labels: [resource.service.name]
      label_names: {resource.service.name: service}
"""


def decode(data: Any) -> LogMetricsConfig:
    decoder = Decoder(lambda path: None)
    cfg = decoder.decode(LogMetricsConfig, data, ("connectors", "logmetrics"))
    assert decoder.errors == []
    assert isinstance(cfg, LogMetricsConfig)
    return cfg


def config(text: str = COMMANDS) -> LogMetricsConfig:
    cfg = decode(yaml.safe_load(text))
    assert validate_config(cfg) == []
    return cfg


def value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, dict):
        out = AnyValue()
        out.kvlist_value.values.extend(KeyValue(key=k, value=value(x)) for k, x in v.items())
        return out
    return AnyValue(string_value=str(v))


def resource_logs(*records: dict[str, Any], service: str = "cli") -> logs_pb2.ResourceLogs:
    rl = logs_pb2.ResourceLogs()
    rl.resource.attributes.extend(
        [KeyValue(key="service.name", value=value(service)), KeyValue(key="host.name", value=value("h1"))]
    )
    scope = rl.scope_logs.add()
    for r in records:
        record = scope.log_records.add(time_unix_nano=int(r.get("t", NOW_S) * 1e9))
        if "severity" in r:
            record.severity_text = r["severity"]
        body = r.get("body")
        if body is not None:
            record.body.CopyFrom(value(body))
        record.attributes.extend(KeyValue(key=k, value=value(v)) for k, v in r.get("attributes", {}).items())
    return rl


def connector(tel: Telemetry, sink: Sink, cfg: LogMetricsConfig | None = None) -> LogMetrics:
    settings = component_settings(tel, ComponentKind.CONNECTOR, "logmetrics")
    made = factory.create(settings, cfg or config(), sink)
    assert isinstance(made, LogMetrics)
    return made


def by_name(sink: Sink) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
    return {(p.name, p.labels): p for p in sink.points()}


def test_logmetrics_turns_logs_into_metrics_only() -> None:
    assert factory.kind is ComponentKind.CONNECTOR
    assert factory.signal_pairs == {(Signal.LOGS, Signal.METRICS)}
    assert builtin_factories()[(ComponentKind.CONNECTOR, "logmetrics")] is factory


async def test_records_become_counters_and_histograms_from_attributes_and_bodies() -> None:
    tel, sink = Telemetry(), Sink()
    c = connector(tel, sink)
    rl = resource_logs(
        # Attributes, a dotted key read as a path.
        {"attributes": {"event.name": "command_executed", "command_name": "plan", "status": "success",
                        "execution_time_ms": 1500, "http.route": "/plan", "user_id": "u1"}},
        # A map body, with attributes winning over the body's fields.
        {"body": {"command_name": "plan", "status": "failure", "execution_time_ms": 500.0},
         "attributes": {"event.name": "command_executed", "status": "success", "http.route": "/plan"}},
        # A JSON string body.
        {"body": json.dumps({"event": {"name": "command_executed"}, "command_name": "ship",
                             "status": "success", "execution_time_ms": 20}),
         "attributes": {"http.route": "/ship"}},
        {"body": "a line nobody maps"},
    )  # fmt: skip
    await c.consume(LogBatch((rl,), record_count=4))
    points = by_name(sink)
    plan = (("command_name", "plan"), ("http_route", "/plan"), ("status", "success"))
    ship = (("command_name", "ship"), ("http_route", "/ship"), ("status", "success"))
    assert points["command_executions_total", plan].value == 2.0
    assert points["command_executions_total", ship].value == 1.0
    hist = points["command_execution_duration_seconds", plan]
    assert hist.kind is Kind.HISTOGRAM and hist.unit == "s"
    assert hist.histogram.count == 2 and hist.histogram.sum == pytest.approx(2.0)  # 1.5 s + 0.5 s
    assert all("user_id" not in dict(p.labels) for p in sink.points())  # not allow-listed
    assert {p.resource.attributes for p in sink.points()} == {
        (("service.name", "cli"),)
    }  # host.name not kept
    assert all(abs(p.time_unix_nano / 1e9 - NOW_S) < 1 for p in sink.points())  # the records' time
    assert tel.value("connector_incoming_points_total", connector="logmetrics") == 4
    assert tel.value("connector_outgoing_points_total", connector="logmetrics") == len(sink.points())


async def test_a_rule_selects_by_field_and_reads_resource_attributes() -> None:
    tel, sink = Telemetry(), Sink()
    c = connector(tel, sink)
    batch = LogBatch(
        (
            resource_logs({"severity": "ERROR", "body": "db down"}, {"severity": "INFO"}, service="api"),
            resource_logs({"severity": "ERROR"}, service="worker"),
        ),
        record_count=3,
    )
    await c.consume(batch)
    points = by_name(sink)
    assert points["log_errors_total", (("service", "api"),)].value == 1.0
    assert points["log_errors_total", (("service", "worker"),)].value == 1.0
    assert {p.resource.attributes for p in sink.points()} == {
        (("service.name", "api"),),
        (("service.name", "worker"),),
    }


async def test_a_refused_record_is_counted_and_the_rest_of_the_batch_still_counts() -> None:
    tel, sink = Telemetry(), Sink()
    c = connector(tel, sink)
    good = {"attributes": {"event.name": "command_executed", "command_name": "plan", "status": "ok",
                           "execution_time_ms": 10, "http.route": "/p"}}  # fmt: skip
    bad = {"attributes": {"event.name": "command_executed", "command_name": "plan", "status": "ok",
                          "execution_time_ms": "slow", "http.route": "/p"}}  # fmt: skip
    old = {**good, "t": NOW_S - 3 * 86400}
    await c.consume(LogBatch((resource_logs(good, bad, old),), record_count=3))
    assert [p.value for p in sink.points() if p.name == "command_executions_total"] == [1.0]
    assert tel.value("connector_dropped_points_total", connector="logmetrics", reason="invalid_value") == 1
    assert (
        tel.value("connector_dropped_points_total", connector="logmetrics", reason="timestamp_out_of_range")
        == 1
    )


async def test_the_default_counts_every_record() -> None:
    tel, sink = Telemetry(), Sink()
    cfg = LogMetricsConfig()
    assert validate_config(cfg) == []
    c = connector(tel, sink, cfg)
    await c.consume(LogBatch((resource_logs({"body": "a"}, {"body": "b"}),), record_count=2))
    assert [(p.name, p.value) for p in sink.points()] == [("log.record.count", 2.0)]


async def test_a_refusal_downstream_refuses_the_logs_batch_and_counts_nothing() -> None:
    tel, sink = Telemetry(), Sink(refuse_times=1, reason="queue_full", retry_after_s=1.0)
    c = connector(tel, sink, LogMetricsConfig())
    batch = LogBatch((resource_logs({"body": "a"}),), record_count=1)
    with pytest.raises(Backpressure):
        await c.consume(batch)
    assert tel.value("connector_incoming_points_total", connector="logmetrics") == 0
    await c.consume(batch)  # the resend, counted once
    assert tel.value("connector_incoming_points_total", connector="logmetrics") == 1
    assert [p.value for p in sink.points()] == [1.0]


def test_config_problems_name_their_paths() -> None:
    cfg = decode(
        {
            "rules": [
                {"mapping": {"metrics": [{"name": "x", "type": "gauge"}]}, "when": {"equals": ["a"]}},
                {"mapping": {"metrics": []}},
            ],
            "max_scale": 30,
        },
    )
    problems = dict(validate_config(cfg))
    assert "a gauge needs the field" in problems["rules::0::mapping::metrics::0::field"]
    assert "need the field" in problems["rules::0::when::equals"]
    assert "at least one metric" in problems["rules::1::mapping::metrics"]
    assert "max_scale" in problems
    assert dict(validate_config(decode({"rules": []})))["rules"].startswith("a logmetrics")


async def test_sdk_logs_cross_logmetrics_and_are_scraped_from_prometheus(agents: AgentGraph) -> None:
    from opentelemetry._logs import LogRecord, SeverityNumber
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource as SdkResource

    otlp_port, prom_port = free_port(), free_port()
    await agents.start(
        {
            "receivers": {"otlp": {"grpc": None, "http": f"127.0.0.1:{otlp_port}"}},
            "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{prom_port}"}},
            "connectors": {"logmetrics": yaml.safe_load(COMMANDS)},
            "service": {
                "pipelines": {
                    "logs": {"receivers": ["otlp"], "exporters": ["logmetrics"]},
                    "metrics": {"receivers": ["logmetrics"], "exporters": ["prometheus"]},
                }
            },
        }
    )
    provider = LoggerProvider(resource=SdkResource.create({"service.name": "planner"}))
    provider.add_log_record_processor(
        SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"http://127.0.0.1:{otlp_port}/v1/logs"))
    )
    logger = provider.get_logger("test.logmetrics")

    def emit() -> None:  # the SDK exports synchronously: off the event loop
        for ms in (120, 80, 100):
            attributes = {"event.name": "command_executed", "command_name": "plan", "status": "success",
                          "execution_time_ms": ms, "http.route": "/plan"}  # fmt: skip
            logger.emit(
                LogRecord(
                    timestamp=time.time_ns(), severity_text="INFO", severity_number=SeverityNumber.INFO,
                    body="command done", attributes=attributes,
                )
            )  # fmt: skip
        logger.emit(
            LogRecord(timestamp=time.time_ns(), severity_text="ERROR", severity_number=SeverityNumber.ERROR,
                      body="db down")
        )  # fmt: skip
        provider.shutdown()

    await asyncio.to_thread(emit)

    async with aiohttp.ClientSession() as session:

        async def scraped() -> str | None:
            async with session.get(f"http://127.0.0.1:{prom_port}/metrics") as resp:
                text = await resp.text()
            done = "command_execution_duration_seconds_count" in text and "log_errors_total" in text
            return text if done else None

        text = await wait_until(scraped, "the derived metrics scraped from prometheus")
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "instance"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    labels = (("command_name", "plan"), ("http_route", "/plan"), ("job", "planner"), ("status", "success"))
    assert samples["command_executions_total", labels] == 3
    assert samples["command_execution_duration_seconds_count", labels] == 3
    assert samples["command_execution_duration_seconds_sum", labels] == pytest.approx(0.3)
    assert samples["log_errors_total", (("job", "planner"), ("service", "planner"))] == 1
