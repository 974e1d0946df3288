"""The OpenTelemetry SDK sends HTTP-server and DB-client spans → the agent (otlp receiver, a traces
pipeline exporting to spanmetrics, another one sampling every trace away) → spanmetrics → a metrics
pipeline → prometheus_remote_write → a real Prometheus, queried with PromQL."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from tests.conftest import free_port
from tests.integration.conftest import AgentProcess, PrometheusServer

pytestmark = pytest.mark.integration

CONFIG = """\
receivers:
  otlp:
    grpc: 127.0.0.1:{grpc}
    http: 127.0.0.1:{http}
processors:
  sample:
    trace_rate: 0.0
connectors:
  spanmetrics:
    preset: red
    dimensions: [{{name: http.route}}]
    metrics_flush_interval: 500ms
exporters:
  prometheus_remote_write:
    endpoint: {write_url}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 1s}}
  debug:
    verbosity: basic
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [spanmetrics]
    traces/sampled:
      receivers: [otlp]
      processors: [sample]
      exporters: [debug]
    metrics:
      receivers: [spanmetrics]
      exporters: [prometheus_remote_write]
"""

X_DURATIONS_S = [0.01 * (i + 1) for i in range(20)]
"""GET /api/x answered 200 (10 ms ... 200 ms); five more answered 500 in 300 ms each."""


@pytest.fixture
def agent(prometheus: PrometheusServer, start_agent: Callable[..., AgentProcess]) -> Iterator[AgentProcess]:
    ports = {k: free_port() for k in ("grpc", "http", "telemetry")}
    yield start_agent(CONFIG.format(write_url=prometheus.write_url, **ports), ports)


def _send(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("shop")
    now = time.time_ns()

    def server(seconds: float, method: str, route: str, code: int) -> None:
        span = tracer.start_span(
            f"{method} {route}",
            kind=SpanKind.SERVER,
            start_time=now,
            attributes={
                "http.request.method": method,
                "http.route": route,
                "http.response.status_code": code,
                "url.scheme": "https",
                "tenant.id": "acme",
            },
        )
        if code >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=now + round(seconds * 1e9))

    def db(operation: str, table: str) -> None:
        span = tracer.start_span(
            f"{operation} {table}",
            kind=SpanKind.CLIENT,
            start_time=now,
            attributes={
                "db.system": "postgresql",
                "db.operation": operation,
                "db.sql.table": table,
                "db.statement": f"{operation} ... {table}",
                "tenant.id": "acme",
            },
        )
        span.end(end_time=now + 5_000_000)

    for seconds in X_DURATIONS_S:
        server(seconds, "GET", "/api/x", 200)
    for _ in range(5):
        server(0.3, "GET", "/api/x", 500)
    for _ in range(10):
        server(0.02, "POST", "/api/y", 201)
    for _ in range(8):
        db("SELECT", "orders")
    for _ in range(4):
        db("INSERT", "orders")
    assert provider.force_flush()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sdk_spans_become_red_metrics_in_prometheus(
    agent: AgentProcess, prometheus: PrometheusServer, transport: str
) -> None:
    if transport == "grpc":
        exporter = GrpcSpanExporter(endpoint=f"127.0.0.1:{agent.ports['grpc']}", insecure=True)
    else:
        exporter = HttpSpanExporter(endpoint=f"http://127.0.0.1:{agent.ports['http']}/v1/traces")
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    try:
        _send(provider)
    finally:
        provider.shutdown()

    # Every span counted, though the other traces pipeline samples every trace away.
    assert prometheus.wait_value('sum(http_requests_total{route="/api/x"})', 25.0) == 25.0
    errors = (
        'http_requests_total{job="checkout",method="GET",route="/api/x",status_code="500",tenant_id="acme"}'
    )
    assert prometheus.wait_value(errors, 5.0) == 5.0
    assert prometheus.wait_value('sum(http_requests_total{route="/api/y",status_code="201"})', 10.0) == 10.0
    assert prometheus.wait_value('sum(db_queries_total{table="orders",query_type="SELECT"})', 8.0) == 8.0
    assert prometheus.wait_value('sum(db_queries_total{table="orders",query_type="INSERT"})', 4.0) == 4.0
    db_count = 'db_query_duration_seconds_count{query_type="SELECT",table="orders",tenant_id="acme"}'
    assert prometheus.wait_value(db_count, 8.0) == 8.0

    # The duration histogram has no status_code: one series holds all 25 GET /api/x requests.
    assert prometheus.wait_value('http_request_duration_seconds_count{route="/api/x"}', 25.0) == 25.0
    total = sum(X_DURATIONS_S) + 5 * 0.3
    assert prometheus.value('http_request_duration_seconds_sum{route="/api/x"}') == pytest.approx(total)
    # The exact median is 130 ms: in the (100 ms, 250 ms] bucket, where histogram_quantile interpolates.
    median = prometheus.value(
        'histogram_quantile(0.5, sum by (le) (http_request_duration_seconds_bucket{route="/api/x"}))'
    )
    assert median is not None and 0.1 <= median <= 0.25
    p99 = prometheus.value(
        'histogram_quantile(0.99, sum by (le) (http_request_duration_seconds_bucket{route="/api/x"}))'
    )
    assert p99 is not None and 0.25 <= p99 <= 0.5  # the 300 ms errors

    # The Collector's own metrics, labelled by span name, kind and status.
    calls = (
        'traces_span_metrics_calls_total{job="checkout",span_name="GET /api/x",'
        'span_kind="SPAN_KIND_SERVER",status_code="STATUS_CODE_ERROR",http_route="/api/x"}'
    )
    assert prometheus.wait_value(calls, 5.0) == 5.0
    assert (
        prometheus.wait_value('sum(traces_span_metrics_calls_total{span_kind="SPAN_KIND_CLIENT"})', 12.0)
        == 12.0
    )
    assert (
        prometheus.wait_value('sum(traces_span_metrics_duration_seconds_count{job="checkout"})', 47.0) == 47.0
    )
    assert agent.self_metric("headwater_connector_incoming_points_total", connector="spanmetrics") == 47.0
    assert agent.self_metric("headwater_spanmetrics_overflow_spans_total") == 0
