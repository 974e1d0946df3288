"""The OpenTelemetry SDK → the agent (otlp receiver) → a real Prometheus (remote-write) and the pull
endpoint; traces, logs and DogStatsD events → the otlp_http exporter → an independent OTLP sink."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from datadog.dogstatsd import DogStatsd
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.conftest import free_port
from tests.exporters.otlp_sink import Sink
from tests.integration.conftest import AgentProcess, PrometheusServer, wait_for_peer
from tests.integration.otlp_sinks import ThreadedOtlpSinks, received

pytestmark = pytest.mark.integration

CONFIG = """\
receivers:
  otlp:
    grpc: 127.0.0.1:{grpc}
    http: 127.0.0.1:{http}
  statsd:
    udp: 127.0.0.1:{statsd}
    flush_interval: 1s
exporters:
  prometheus_remote_write:
    endpoint: {write_url}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 1s}}
  prometheus:
    endpoint: 127.0.0.1:{pull}
  otlp_http/sink:
    endpoint: {sink_url}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 1s}}
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [otlp, statsd]
      exporters: [prometheus_remote_write, prometheus]
    traces:
      receivers: [otlp]
      exporters: [otlp_http/sink]
    logs:
      receivers: [otlp, statsd]
      exporters: [otlp_http/sink]
"""


@pytest.fixture
def sink() -> Iterator[tuple[Sink, str]]:
    """The independent OTLP/HTTP sink the agent's otlp_http/sink exporter sends to, and its URL."""
    with ThreadedOtlpSinks() as sinks:
        yield sinks.http()


@pytest.fixture
def agent(
    prometheus: PrometheusServer, sink: tuple[Sink, str], start_agent: Callable[..., AgentProcess]
) -> Iterator[AgentProcess]:
    ports = {k: free_port() for k in ("grpc", "http", "pull", "telemetry")}
    ports["statsd"] = free_port(socket.SOCK_DGRAM)
    config = CONFIG.format(write_url=prometheus.write_url, sink_url=sink[1], **ports)
    yield start_agent(config, ports)


def test_sdk_metrics_arrive_in_prometheus(agent: AgentProcess, prometheus: PrometheusServer) -> None:
    resource = Resource.create({"service.name": "checkout"})
    # gRPC, cumulative (the SDK's default): the agent passes totals through.
    grpc_reader = PeriodicExportingMetricReader(
        GrpcMetricExporter(endpoint=f"127.0.0.1:{agent.ports['grpc']}", insecure=True),
        export_interval_millis=3_600_000,
    )
    # HTTP, delta: the agent must accumulate the deltas into a Prometheus counter.
    http_reader = PeriodicExportingMetricReader(
        HttpMetricExporter(
            endpoint=f"http://127.0.0.1:{agent.ports['http']}/v1/metrics",
            preferred_temporality={Counter: AggregationTemporality.DELTA},
        ),
        export_interval_millis=3_600_000,
    )
    cumulative = MeterProvider(metric_readers=[grpc_reader], resource=resource)
    delta = MeterProvider(metric_readers=[http_reader], resource=resource)
    try:
        orders = cumulative.get_meter("shop").create_counter("orders", unit="1")
        inflight = cumulative.get_meter("shop").create_up_down_counter("requests.inflight")

        def temperature(_: CallbackOptions) -> list[Observation]:
            return [Observation(21.5, {"room": "lab"})]

        cumulative.get_meter("shop").create_observable_gauge("room.temperature", [temperature])
        jobs = delta.get_meter("worker").create_counter("jobs")
        duration = cumulative.get_meter("shop").create_histogram("checkout.duration", unit="s")
        for seconds in (0.2, 0.4, 3.0):
            duration.record(seconds)

        orders.add(5, {"shop": "eu"})
        inflight.add(4)
        inflight.add(-1)
        jobs.add(2, {"queue": "mail"})
        assert grpc_reader.force_flush() and http_reader.force_flush()
        orders.add(2, {"shop": "eu"})
        jobs.add(3, {"queue": "mail"})
        assert grpc_reader.force_flush() and http_reader.force_flush()
    finally:
        cumulative.shutdown()
        delta.shutdown()

    assert prometheus.wait_value('orders_total{shop="eu",job="checkout"}', 7.0) == 7.0
    assert prometheus.wait_value('jobs_total{queue="mail"}', 5.0) == 5.0
    assert prometheus.wait_value("requests_inflight", 3.0) == 3.0
    assert prometheus.wait_value('room_temperature{room="lab"}', 21.5) == 21.5
    # An explicit-bucket histogram (the SDK's default) keeps its own bounds (0, 5, 10, 25, ...).
    assert prometheus.wait_value("checkout_duration_seconds_count", 3.0) == 3.0
    assert prometheus.value("checkout_duration_seconds_sum") == pytest.approx(3.6)
    assert prometheus.value('checkout_duration_seconds_bucket{le="0"}') == 0.0
    assert prometheus.value('checkout_duration_seconds_bucket{le="5"}') == 3.0
    assert agent.self_metric("headwater_receiver_refused_points_total") == 0


def test_traces_logs_and_statsd_events_pass_through(agent: AgentProcess, sink: tuple[Sink, str]) -> None:
    otlp, _ = sink
    resource = Resource.create({"service.name": "checkout"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{agent.ports['http']}/v1/traces"))
    )
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(
        SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"http://127.0.0.1:{agent.ports['http']}/v1/logs"))
    )
    try:
        tracer = tracer_provider.get_tracer("shop")
        with tracer.start_as_current_span("checkout") as parent:
            with tracer.start_as_current_span("charge card"):
                pass
            trace_id = parent.get_span_context().trace_id
        logger_provider.get_logger("shop").emit(
            LogRecord(body="card declined", severity_text="WARN", severity_number=SeverityNumber.WARN)
        )
    finally:
        tracer_provider.shutdown()
        logger_provider.shutdown()
    dogstatsd = DogStatsd(host="127.0.0.1", port=agent.ports["statsd"])
    dogstatsd.event("Deploy", "v2 is out", alert_type="success", tags=["env:dev"])
    dogstatsd.service_check("db.up", DogStatsd.CRITICAL, message="replica lag")
    dogstatsd.close_socket()

    def spans() -> list[Any] | None:
        found = [s for m in received(otlp, "traces") for rs in m.resource_spans for ss in rs.scope_spans
                 for s in ss.spans]  # fmt: skip
        return found if len(found) == 2 else None

    names = {s.name: s for s in wait_for_peer(spans, "2 spans at the sink")}
    assert set(names) == {"checkout", "charge card"}
    assert int.from_bytes(names["checkout"].trace_id, "big") == trace_id
    assert names["charge card"].parent_span_id == names["checkout"].span_id

    def records() -> list[Any] | None:
        found = [r for m in received(otlp, "logs") for rl in m.resource_logs for sl in rl.scope_logs
                 for r in sl.log_records]  # fmt: skip
        return found if len(found) >= 3 else None

    by_body = {r.body.string_value: r for r in wait_for_peer(records, "3 log records at the sink")}
    assert set(by_body) == {"card declined", "v2 is out", "replica lag"}
    assert by_body["card declined"].severity_text == "WARN"
    assert by_body["replica lag"].severity_text == "ERROR"
    resources = [
        {kv.key: kv.value.string_value for kv in rl.resource.attributes}
        for m in received(otlp, "logs")
        for rl in m.resource_logs
    ]
    assert any(r.get("service.name") == "checkout" for r in resources)
    assert agent.self_metric("headwater_exporter_sent_points_total") >= 5
