"""The OTLP receiver over real gRPC and HTTP: the OpenTelemetry SDK's own exporters, raw aiohttp and
grpc.aio clients. Conversion rules are tested in test_otlp_convert.py."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import cramjam
import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry._logs import SeverityNumber
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2 as mpb
from prometheus_client import generate_latest

from agent.component import ComponentKind, Signal
from agent.confmodel import Decoder
from agent.model import Kind, LogBatch, SpanBatch, Temporality
from agent.telemetry import Telemetry
from receivers.otlp import FACTORY, OtlpConfig, OtlpReceiver, OtlpTLSConfig, factory
from tests.conftest import Certs, Sink, component_settings
from tests.receivers.conftest import Running

PROTO = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}
METRICS_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
TRACES_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
ALL = (Signal.METRICS, Signal.TRACES, Signal.LOGS)
T = TypeVar("T")


@dataclass
class Harness:
    receiver: OtlpReceiver
    sink: Sink
    tel: Telemetry
    session: aiohttp.ClientSession

    def url(self, signal: str = "metrics") -> str:
        return f"http://127.0.0.1:{self.receiver.http_port}/v1/{signal}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.receiver.grpc_port}"

    async def post(
        self, data: bytes, headers: dict[str, str] | None = None, signal: str = "metrics"
    ) -> tuple[int, bytes, Any]:
        async with self.session.post(self.url(signal), data=data, headers=headers or PROTO) as resp:
            return resp.status, await resp.read(), resp.headers

    def value(self, name: str, **labels: str) -> float:
        return self.tel.value(name, **labels)


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make(running: Running) -> AsyncIterator[Make]:

    async def build(signals: tuple[Signal, ...] = ALL, **cfg: Any) -> Harness:
        config = OtlpConfig(**{"grpc": "127.0.0.1:0", "http": "127.0.0.1:0", **cfg})
        assert config.validate() == []
        tel = Telemetry()
        sink = Sink()
        settings = component_settings(tel, ComponentKind.RECEIVER, "otlp")
        receiver = factory.create(settings, config, {s: sink for s in signals})
        return Harness(receiver, sink, tel, await running.start(receiver))

    yield build


def of(sink: Sink, kind: type[T]) -> list[T]:
    """The batches of type ``kind`` that ``sink`` took, in order."""
    return [b for b in sink.batches if isinstance(b, kind)]


def kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def metrics_request(*values: float | None, name: str = "requests") -> ExportMetricsServiceRequest:
    """One delta monotonic sum with one point per value (None: a point without a value)."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(kv("service.name", "shop"))
    m = rm.scope_metrics.add().metrics.add(name=name)
    m.sum.aggregation_temporality = mpb.AGGREGATION_TEMPORALITY_DELTA
    m.sum.is_monotonic = True
    for i, v in enumerate(values):
        dp = m.sum.data_points.add(time_unix_nano=1_700_000_000_000_000_000 + i)
        dp.attributes.append(kv("i", str(i)))
        if v is not None:
            dp.as_double = v
    return req


def parse_status(body: bytes) -> status_pb2.Status:
    return status_pb2.Status.FromString(body)


# -- the OpenTelemetry SDK as the peer ----------------------------------------------------------------------
def _sdk_metrics(transport: str, target: str, temporality: str) -> None:
    """Record one of each instrument kind and export once with the SDK's own OTLP exporter (blocking)."""
    from opentelemetry.sdk.metrics import (
        Counter,
        Histogram,
        MeterProvider,
        ObservableGauge,
        UpDownCounter,
    )
    from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
    from opentelemetry.sdk.resources import Resource

    chosen = AggregationTemporality.DELTA if temporality == "delta" else AggregationTemporality.CUMULATIVE
    preferred: dict[type, AggregationTemporality] = {
        Counter: chosen,
        UpDownCounter: chosen,
        Histogram: chosen,
        ObservableGauge: chosen,
    }
    exporter: Any
    if transport == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        exporter = GrpcExporter(endpoint=target, insecure=True, preferred_temporality=preferred, timeout=10)
    else:
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        exporter = HttpExporter(
            endpoint=target, preferred_temporality=preferred, compression=Compression.Gzip, timeout=10
        )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(
        resource=Resource.create({"service.name": "checkout", "deployment.environment": "test"}),
        metric_readers=[reader],
        views=[View(instrument_name="exp.latency", aggregation=ExponentialBucketHistogramAggregation())],
    )
    meter = provider.get_meter("test.meter", "1.2")
    counter = meter.create_counter("orders", unit="1", description="Orders placed")
    counter.add(5, {"region": "eu"})
    counter.add(7, {"region": "eu"})
    counter.add(1, {"region": "us", "express": True})
    updown = meter.create_up_down_counter("queue.depth")
    updown.add(10)
    updown.add(-3)

    def observe(_: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        return [Observation(42.5, {"sensor": "a"})]

    meter.create_observable_gauge("temperature", callbacks=[observe], unit="Cel")
    hist = meter.create_histogram("http.duration", unit="ms")
    for v in (0.5, 3.0, 30.0):
        hist.record(v)
    exp = meter.create_histogram("exp.latency", unit="s")
    for v in (1.0, 2.0, 4.0, 1000.0):
        exp.record(v)
    assert provider.force_flush(10_000)
    provider.shutdown()


@pytest.mark.parametrize("temporality", ["delta", "cumulative"])
@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_sdk_metrics_arrive_intact(make: Make, transport: str, temporality: str) -> None:
    h = await make()
    target = h.grpc_target if transport == "grpc" else h.url("metrics")
    await asyncio.to_thread(_sdk_metrics, transport, target, temporality)
    points = {(p.name, p.labels): p for p in h.sink.points()}  # the last point of each series
    expected = Temporality.DELTA if temporality == "delta" else Temporality.CUMULATIVE

    eu = points["orders", (("region", "eu"),)]
    assert (eu.kind, eu.value, eu.monotonic, eu.temporality) == (Kind.SUM, 12.0, True, expected)
    assert (eu.unit, eu.description) == ("1", "Orders placed")
    assert points["orders", (("express", "true"), ("region", "us"))].value == 1.0
    depth = points["queue.depth", ()]
    assert (depth.kind, depth.value, depth.monotonic, depth.temporality) == (Kind.SUM, 7.0, False, expected)
    temp = points["temperature", (("sensor", "a"),)]
    assert (temp.kind, temp.value, temp.unit) == (Kind.GAUGE, 42.5, "Cel")

    duration = points["http.duration", ()]
    assert duration.kind is Kind.HISTOGRAM and duration.temporality is expected
    assert duration.explicit is not None and duration.histogram is None
    assert duration.explicit.count == 3 and duration.explicit.sum == 33.5
    assert (duration.explicit.min, duration.explicit.max) == (0.5, 30.0)
    assert len(duration.explicit.counts) == len(duration.explicit.bounds) + 1
    bounds, counts = duration.explicit.bounds, duration.explicit.counts
    assert counts[bounds.index(5.0)] == 2 and counts[bounds.index(50.0)] == 1  # (0, 5] and (25, 50]

    exp = points["exp.latency", ()]
    assert exp.kind is Kind.HISTOGRAM and exp.explicit is None and exp.histogram is not None
    h_ = exp.histogram
    assert (h_.count, h_.sum, h_.min, h_.max) == (4.0, 1007.0, 1.0, 1000.0)
    assert h_.positive_counts.sum() + h_.zero_count == 4.0

    resource = eu.resource
    assert resource is not None
    attrs = dict(resource.attributes)
    assert attrs["service.name"] == "checkout" and attrs["deployment.environment"] == "test"
    assert "telemetry.sdk.language" in attrs
    assert eu.scope is not None and (eu.scope.name, eu.scope.version) == ("test.meter", "1.2")
    assert all(p.resource is resource for p in h.sink.points())
    assert h.value("receiver_accepted_points_total") == len(h.sink.points())


def _sdk_traces_and_logs(transport: str, traces_target: str, logs_target: str) -> None:
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    span_exporter: Any
    log_exporter: Any
    if transport == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogs
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

        span_exporter = GrpcSpans(endpoint=traces_target, insecure=True, timeout=10)
        log_exporter = GrpcLogs(endpoint=logs_target, insecure=True, timeout=10)
    else:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogs
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

        span_exporter = HttpSpans(endpoint=traces_target, timeout=10)
        log_exporter = HttpLogs(endpoint=logs_target, timeout=10)
    resource = Resource.create({"service.name": "checkout"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    tracer = tracer_provider.get_tracer("test.tracer")
    with tracer.start_as_current_span("parent"):
        with tracer.start_as_current_span("child-1"):
            pass
        with tracer.start_as_current_span("child-2"):
            pass
    tracer_provider.force_flush()
    tracer_provider.shutdown()

    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
    logger = logger_provider.get_logger("test.logger")
    logger.emit(body="disk almost full", severity_number=SeverityNumber.WARN, attributes={"disk": "sda"})
    logger.emit(body="payment failed", severity_number=SeverityNumber.ERROR)
    logger_provider.force_flush()
    logger_provider.shutdown()


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_sdk_traces_and_logs_pass_through(make: Make, transport: str) -> None:
    h = await make()
    grpc_targets = (h.grpc_target, h.grpc_target)
    targets = grpc_targets if transport == "grpc" else (h.url("traces"), h.url("logs"))
    await asyncio.to_thread(_sdk_traces_and_logs, transport, *targets)
    span_batches: list[SpanBatch] = of(h.sink, SpanBatch)
    spans = [s for b in span_batches for rs in b.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert sorted(s.name for s in spans) == ["child-1", "child-2", "parent"]
    assert sum(b.span_count for b in span_batches) == 3
    assert len({s.trace_id for s in spans}) == 1 and all(len(s.span_id) == 8 for s in spans)
    assert span_batches[0].resource_spans[0].scope_spans[0].scope.name == "test.tracer"
    log_batches: list[LogBatch] = of(h.sink, LogBatch)
    records = [
        r for b in log_batches for rl in b.resource_logs for sl in rl.scope_logs for r in sl.log_records
    ]
    assert [r.body.string_value for r in records] == ["disk almost full", "payment failed"]
    assert records[0].severity_number == SeverityNumber.WARN.value and records[0].attributes[0].key == "disk"
    assert sum(b.record_count for b in log_batches) == 2
    assert h.value("receiver_accepted_spans_total") == 3
    assert h.value("receiver_accepted_log_records_total") == 2
    assert h.value("receiver_accepted_points_total") == 0


# -- raw HTTP -----------------------------------------------------------------------------------------------
def json_metrics_request() -> dict[str, Any]:
    return {
        "resourceMetrics": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "cart"}}]},
                "scopeMetrics": [
                    {
                        "scope": {"name": "hand.made", "version": "0.1"},
                        "metrics": [
                            {
                                "name": "cart.items",
                                "unit": "1",
                                "sum": {
                                    "aggregationTemporality": 2,
                                    "isMonotonic": True,
                                    "dataPoints": [
                                        {
                                            "attributes": [
                                                {"key": "shard", "value": {"intValue": "3"}},
                                                {"key": "ok", "value": {"boolValue": True}},
                                            ],
                                            "startTimeUnixNano": "1700000000000000000",
                                            "timeUnixNano": "1700000060000000000",
                                            "asInt": "9007199254740993",
                                            "exemplars": [
                                                {
                                                    "asDouble": 1.0,
                                                    "timeUnixNano": 1700000001000000000,
                                                    "traceId": "5B8EFFF798038103D269B633813FC60C",
                                                    "spanId": "eee19b7ec3c1b174",
                                                }
                                            ],
                                            "someFutureField": {"x": 1},
                                        }
                                    ],
                                },
                            },
                            {
                                "name": "mem.used",
                                "gauge": {
                                    "dataPoints": [{"timeUnixNano": 1700000060000000000, "asDouble": 0.5}]
                                },
                            },
                        ],
                    }
                ],
            }
        ]
    }


async def test_otlp_json_metrics(make: Make) -> None:
    h = await make()
    status, body, headers = await h.post(json.dumps(json_metrics_request()).encode(), JSON)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {}
    items, mem = h.sink.points()
    assert items.name == "cart.items" and items.labels == (("ok", "true"), ("shard", "3"))
    assert items.value == float(9007199254740993) and items.temporality is Temporality.CUMULATIVE
    assert (items.start_time_unix_nano, items.time_unix_nano) == (1700000000000000000, 1700000060000000000)
    assert items.scope is not None and items.scope.name == "hand.made"
    assert items.resource is not None and items.resource.attributes == (("service.name", "cart"),)
    assert (mem.kind, mem.value) == (Kind.GAUGE, 0.5)


async def test_otlp_json_traces_hex_ids(make: Make) -> None:
    h = await make()
    payload = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "5B8EFFF798038103D269B633813FC60C",
                                "spanId": "EEE19B7EC3C1B174",
                                "parentSpanId": "",
                                "name": "GET /",
                                "kind": 2,
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": 1544712661000000000,
                                "links": [
                                    {
                                        "traceId": "00000000000000000000000000000001",
                                        "spanId": "0000000000000002",
                                    }
                                ],
                            }
                        ]
                    }
                ]
            }
        ]
    }
    status, body, _ = await h.post(json.dumps(payload).encode(), JSON, signal="traces")
    assert status == 200 and json.loads(body) == {}
    (batch,) = of(h.sink, SpanBatch)
    span = batch.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id == bytes.fromhex("5b8efff798038103d269b633813fc60c")
    assert span.span_id == bytes.fromhex("eee19b7ec3c1b174") and span.parent_span_id == b""
    assert span.kind == 2 and span.end_time_unix_nano == 1544712661000000000
    assert span.links[0].span_id == bytes.fromhex("0000000000000002")
    status, body, _ = await h.post(
        b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}', JSON, "traces"
    )
    assert status == 400 and "hex" in json.loads(body)["message"]


async def test_otlp_json_logs(make: Make) -> None:
    h = await make()
    payload = {
        "resourceLogs": [
            {
                "scopeLogs": [
                    {
                        "logRecords": [
                            {"body": {"stringValue": "hi"}, "severityNumber": 9, "spanId": "0102030405060708"}
                        ]
                    }
                ]
            }
        ]
    }
    status, _, _ = await h.post(json.dumps(payload).encode(), JSON, signal="logs")
    assert status == 200
    (batch,) = of(h.sink, LogBatch)
    record = batch.resource_logs[0].scope_logs[0].log_records[0]
    assert (record.body.string_value, record.severity_number, batch.record_count) == ("hi", 9, 1)
    assert record.span_id == bytes(range(1, 9))


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_compressed_protobuf(make: Make, encoding: str) -> None:
    h = await make()
    raw = metrics_request(1.0, 2.0).SerializeToString()
    data = gzip.compress(raw) if encoding == "gzip" else bytes(cramjam.zstd.compress(raw))
    status, body, headers = await h.post(data, {**PROTO, "Content-Encoding": encoding})
    assert status == 200 and headers["Content-Type"] == "application/x-protobuf"
    assert not ExportMetricsServiceResponse.FromString(body).HasField("partial_success")
    assert [p.value for p in h.sink.points()] == [1.0, 2.0]


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_compression_bomb_is_refused_with_413(make: Make, encoding: str) -> None:
    h = await make(max_request_body_size=2**20)
    zeros = b"\0" * (64 * 2**20)
    bomb = gzip.compress(zeros, 9) if encoding == "gzip" else bytes(cramjam.zstd.compress(zeros, 19))
    assert len(bomb) < 2**20  # only the inflated size is over the cap
    status, body, _ = await h.post(bomb, {**PROTO, "Content-Encoding": encoding})
    assert status == 413
    st = parse_status(body)
    assert st.code == code_pb2.RESOURCE_EXHAUSTED and "inflates past" in st.message
    assert h.value("receiver_refused_points_total", reason="body_too_large") == 1
    assert h.sink.batches == []


async def test_over_cap_plain_body_is_refused_with_413(make: Make) -> None:
    h = await make(max_request_body_size=4096)
    status, body, _ = await h.post(metrics_request(*[1.0] * 200).SerializeToString())
    assert status == 413 and parse_status(body).code == code_pb2.RESOURCE_EXHAUSTED
    status, body, _ = await h.post(b"{" + b" " * 5000 + b"}", JSON)
    assert status == 413 and json.loads(body)["code"] == code_pb2.RESOURCE_EXHAUSTED


async def test_truncated_gzip_is_400(make: Make) -> None:
    h = await make()
    data = gzip.compress(metrics_request(1.0).SerializeToString())[:-10]
    status, body, _ = await h.post(data, {**PROTO, "Content-Encoding": "gzip"})
    assert status == 400 and "not valid gzip" in parse_status(body).message
    assert h.value("receiver_refused_points_total", reason="invalid_compression") == 1


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Content-Type": "text/plain"}, "unsupported_media_type"),
        ({"Content-Type": "application/json; charset=latin-1"}, "unsupported_media_type"),
        ({**PROTO, "Content-Encoding": "br"}, "unsupported_encoding"),
        ({**PROTO, "Content-Encoding": "gzip, zstd"}, "unsupported_encoding"),
    ],
)
async def test_unsupported_type_or_encoding_is_415(make: Make, headers: dict[str, str], reason: str) -> None:
    h = await make()
    status, body, resp_headers = await h.post(metrics_request(1.0).SerializeToString(), headers)
    assert status == 415 and resp_headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["message"]
    assert h.value("receiver_refused_points_total", reason=reason) == 1
    assert h.value("receiver_requests_total", status="415") == 1


async def test_garbage_is_400_with_a_status_body(make: Make) -> None:
    h = await make()
    status, body, headers = await h.post(b"\xff\xff\xff\xff garbage")
    assert status == 400 and headers["Content-Type"] == "application/x-protobuf"
    st = parse_status(body)
    assert st.code == code_pb2.INVALID_ARGUMENT and "ExportMetricsServiceRequest" in st.message
    bad_request = error_details_pb2.BadRequest()
    assert st.details[0].Unpack(bad_request) and bad_request.field_violations[0].field == "body"
    status, body, headers = await h.post(b'{"resourceMetrics": [', JSON)
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    st_json = json.loads(body)
    assert st_json["code"] == code_pb2.INVALID_ARGUMENT and "OTLP/JSON" in st_json["message"]
    status, _, _ = await h.post(b'{"resourceMetrics": 5}', JSON)
    assert status == 400
    assert h.value("receiver_refused_points_total", reason="invalid_request") == 3


async def test_backpressure_is_429_with_retry_after(make: Make) -> None:
    h = await make()
    h.sink.refuse, h.sink.reason, h.sink.retry_after_s = True, "queue full", 2.5
    status, body, headers = await h.post(metrics_request(1.0, 2.0).SerializeToString())
    assert status == 429 and headers["Retry-After"] == "3"
    st = parse_status(body)
    assert st.code == code_pb2.UNAVAILABLE and "queue full" in st.message
    retry = error_details_pb2.RetryInfo()
    assert st.details[0].Unpack(retry) and retry.retry_delay.seconds == 3
    assert h.value("receiver_refused_points_total", reason="backpressure") == 2
    assert h.value("receiver_accepted_points_total") == 0
    h.sink.reason, h.sink.retry_after_s = "memory limit", None  # no delay asked: 1 s
    status, _, headers = await h.post(json.dumps(json_metrics_request()).encode(), JSON)
    assert status == 429 and headers["Retry-After"] == "1"


async def test_pipeline_error_is_500(make: Make) -> None:
    h = await make()
    h.sink.fail = True
    status, body, _ = await h.post(metrics_request(1.0).SerializeToString())
    assert status == 500 and parse_status(body).code == code_pb2.INTERNAL
    assert h.value("receiver_refused_points_total", reason="pipeline_error") == 1


async def test_partial_success_over_http(make: Make) -> None:
    h = await make()
    status, body, _ = await h.post(metrics_request(1.0, None, 3.0, name="jobs").SerializeToString())
    assert status == 200
    partial = ExportMetricsServiceResponse.FromString(body).partial_success
    assert partial.rejected_data_points == 1
    assert 'metric "jobs" data point 1' in partial.error_message and "as_double" in partial.error_message
    assert [p.value for p in h.sink.points()] == [1.0, 3.0]
    assert h.value("receiver_refused_points_total", reason="no_value") == 1
    assert h.value("receiver_accepted_points_total") == 2
    # The same over JSON: the partial success is OTLP/JSON with the count as a string.
    doc = json_metrics_request()
    doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][1]["gauge"]["dataPoints"][0].pop("asDouble")
    status, body, _ = await h.post(json.dumps(doc).encode(), JSON)
    answer = json.loads(body)
    assert status == 200 and answer["partialSuccess"]["rejectedDataPoints"] == "1"
    assert 'metric \\"mem.used\\"' not in answer["partialSuccess"]["errorMessage"]
    assert 'metric "mem.used" data point 0' in answer["partialSuccess"]["errorMessage"]


@pytest.mark.parametrize("signal", ["metrics", "traces", "logs"])
async def test_empty_requests_succeed(make: Make, signal: str) -> None:
    h = await make()
    status, body, _ = await h.post(b"", signal=signal)
    assert status == 200 and body == b""
    status, body, _ = await h.post(b"{}", JSON, signal=signal)
    assert status == 200 and json.loads(body) == {}
    assert h.sink.batches == []


async def test_context_carries_headers_without_secrets(make: Make) -> None:
    h = await make()
    headers = {
        **PROTO,
        "X-Scope-OrgID": "team-a",
        "Authorization": "Bearer secret",
        "Cookie": "s=1",
        "auth.tenant": "forged",
    }
    status, _, _ = await h.post(metrics_request(1.0).SerializeToString(), headers)
    assert status == 200
    (batch,) = h.sink.batches
    assert batch.context["x-scope-orgid"] == "team-a"
    assert not {"authorization", "cookie", "auth.tenant"} & set(batch.context)


async def test_only_signals_in_pipelines_are_served(make: Make) -> None:
    h = await make(signals=(Signal.METRICS,))
    status, _, _ = await h.post(ExportTraceServiceRequest().SerializeToString(), signal="traces")
    assert status == 404
    status, _, _ = await h.post(ExportLogsServiceRequest().SerializeToString(), signal="logs")
    assert status == 404
    async with grpc.aio.insecure_channel(h.grpc_target) as channel:
        export = channel.unary_unary(
            TRACES_EXPORT, request_serializer=_serialize, response_deserializer=bytes
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await export(ExportTraceServiceRequest())
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        status, _, _ = await h.post(metrics_request(1.0).SerializeToString())
        assert status == 200


# -- raw gRPC -----------------------------------------------------------------------------------------------
def _serialize(message: Message) -> bytes:
    return bytes(message.SerializeToString())


async def grpc_export(
    target: str, request: Message, metadata: tuple[tuple[str, str | bytes], ...] = ()
) -> ExportMetricsServiceResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        export = channel.unary_unary(
            METRICS_EXPORT,
            request_serializer=_serialize,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )
        response: ExportMetricsServiceResponse = await export(request, metadata=metadata, timeout=10)
        return response


async def test_grpc_backpressure_is_unavailable_with_retry_info(make: Make) -> None:
    h = await make()
    h.sink.refuse, h.sink.reason, h.sink.retry_after_s = True, "queue full", 4
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_export(h.grpc_target, metrics_request(1.0, 2.0))
    err = info.value
    assert err.code() is grpc.StatusCode.UNAVAILABLE and "queue full" in (err.details() or "")
    trailers = dict(err.trailing_metadata() or ())
    st = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert st.code == code_pb2.UNAVAILABLE and st.details[0].Unpack(retry)
    assert retry.retry_delay.seconds == 4
    assert h.value("receiver_refused_points_total", reason="backpressure") == 2
    assert h.value("receiver_grpc_requests_total", code="UNAVAILABLE") == 1


async def test_grpc_over_size_is_resource_exhausted(make: Make) -> None:
    h = await make(max_request_body_size=4096)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_export(h.grpc_target, metrics_request(*[1.0] * 300))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert h.sink.batches == []
    response = await grpc_export(h.grpc_target, metrics_request(1.0))  # a small one still goes through
    assert not response.HasField("partial_success") and len(h.sink.points()) == 1


async def test_grpc_partial_success_and_context(make: Make) -> None:
    h = await make()
    response = await grpc_export(
        h.grpc_target,
        metrics_request(None, 2.0, name="jobs"),
        metadata=(("x-scope-orgid", "team-b"), ("authorization", "Bearer s"), ("trace-bin", b"x")),
    )
    assert response.partial_success.rejected_data_points == 1
    assert 'metric "jobs" data point 0' in response.partial_success.error_message
    (batch,) = h.sink.batches
    assert [p.value for p in batch.points] == [2.0]  # type: ignore[union-attr]
    assert batch.context["x-scope-orgid"] == "team-b"
    assert "authorization" not in batch.context and "trace-bin" not in batch.context
    assert h.value("receiver_grpc_requests_total", code="OK") == 1


async def test_grpc_garbage_is_invalid_argument(make: Make) -> None:
    h = await make()
    async with grpc.aio.insecure_channel(h.grpc_target) as channel:
        export = channel.unary_unary(METRICS_EXPORT, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await export(b"\xff\xff\xff\xff", timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert h.value("receiver_refused_points_total", reason="invalid_request") == 1


async def test_grpc_empty_request_succeeds(make: Make) -> None:
    h = await make()
    response = await grpc_export(h.grpc_target, ExportMetricsServiceRequest())
    assert not response.HasField("partial_success") and h.sink.batches == []


# -- TLS, lifecycle, config ---------------------------------------------------------------------------------
async def test_tls_on_both_endpoints(make: Make, tls_certs: Certs) -> None:
    ca, crt, key = Path(tls_certs.ca), Path(tls_certs.cert), Path(tls_certs.key)
    h = await make(tls=OtlpTLSConfig(cert_file=str(crt), key_file=str(key)))
    url = f"https://127.0.0.1:{h.receiver.http_port}/v1/metrics"
    client_ctx = ssl.create_default_context(cafile=str(ca))
    data = metrics_request(1.0).SerializeToString()
    async with h.session.post(url, data=data, headers=PROTO, ssl=client_ctx) as resp:
        assert resp.status == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with h.session.post(url, data=data, headers=PROTO) as resp:
            pass
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    async with grpc.aio.secure_channel(h.grpc_target, creds) as channel:
        export = channel.unary_unary(
            METRICS_EXPORT,
            request_serializer=_serialize,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )
        await export(metrics_request(2.0), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await grpc_export(h.grpc_target, metrics_request(3.0))  # plaintext to the TLS port
    assert [p.value for p in h.sink.points()] == [1.0, 2.0]


async def test_one_endpoint_can_be_disabled(make: Make) -> None:
    h = await make(grpc=None)
    assert h.receiver.grpc_port is None and h.receiver.http_port
    status, _, _ = await h.post(metrics_request(1.0).SerializeToString())
    assert status == 200
    g = await make(http=None)
    assert g.receiver.http_port is None
    await grpc_export(g.grpc_target, metrics_request(1.0))
    assert len(g.sink.points()) == 1


async def test_shutdown_is_idempotent_and_safe_before_start(make: Make) -> None:
    h = await make()
    port = h.receiver.http_port
    await h.receiver.shutdown()
    await h.receiver.shutdown()
    with pytest.raises(aiohttp.ClientConnectionError):
        await h.post(b"")
    settings = component_settings(Telemetry(), ComponentKind.RECEIVER, "otlp")
    never_started = FACTORY.create(settings, OtlpConfig(), {Signal.METRICS: Sink()})
    await never_started.shutdown()
    assert port


async def test_a_busy_port_fails_start(make: Make) -> None:
    h = await make()
    with pytest.raises(Exception, match=r"(?i)address|bind|port"):
        await make(grpc=f"127.0.0.1:{h.receiver.grpc_port}", http=None)


def test_default_config_and_factory() -> None:
    config = OtlpConfig()
    assert (config.grpc, config.http, config.max_request_body_size) == (
        "127.0.0.1:4317",
        "127.0.0.1:4318",
        20 * 2**20,
    )
    assert config.validate() == []
    assert FACTORY is factory and factory.type == "otlp"
    assert factory.signals == frozenset({Signal.METRICS, Signal.TRACES, Signal.LOGS})


def test_config_from_yaml_shape() -> None:
    decoder = Decoder(lambda path: None)
    config = decoder.decode(
        OtlpConfig,
        {"grpc": None, "http": "0.0.0.0:4318", "max_request_body_size": "4MiB"},
        ("receivers", "otlp"),
    )
    assert decoder.errors == []
    assert (config.grpc, config.http, config.max_request_body_size) == (None, "0.0.0.0:4318", 4 * 2**20)


@pytest.mark.parametrize(
    ("cfg", "path", "message"),
    [
        ({"grpc": None, "http": None}, "", "enable at least one"),
        ({"grpc": "4317"}, "grpc", "not host:port"),
        ({"http": ":4318"}, "http", "no host"),
        ({"max_request_body_size": 10}, "max_request_body_size", "at least 1KiB"),
        ({"read_timeout": 0.0}, "read_timeout", "greater than 0"),
        ({"tls": OtlpTLSConfig(cert_file="c.pem")}, "tls", "go together"),
        ({"tls": OtlpTLSConfig(client_ca_file="ca.pem")}, "tls::client_ca_file", "needs cert_file"),
    ],
)
def test_config_validation(cfg: dict[str, Any], path: str, message: str) -> None:
    problems = OtlpConfig(**cfg).validate()
    assert [p for p, _ in problems] == [path] and message in problems[0][1]


def test_environment_problems(tmp_path: Path) -> None:
    config = OtlpConfig(
        grpc="127.0.0.1:0",
        http="127.0.0.1:0",
        tls=OtlpTLSConfig(cert_file=str(tmp_path / "missing.crt"), key_file=str(tmp_path / "missing.key")),
    )
    assert {p for p, _ in config.environment_problems()} == {"tls::cert_file", "tls::key_file"}


async def test_self_metrics_are_exposed(make: Make) -> None:
    h = await make()
    await h.post(metrics_request(1.0).SerializeToString())
    text = generate_latest(h.tel.registry).decode()
    assert 'headwater_receiver_accepted_points_total{receiver="otlp"} 1.0' in text
    assert 'headwater_receiver_refused_spans_total{reason="backpressure",receiver="otlp"} 0.0' in text
    assert 'headwater_receiver_requests_total{receiver="otlp",status="200"} 1.0' in text


async def test_large_bodies_are_decoded_off_the_loop(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    h = await make()
    threads: list[str] = []
    original = h.receiver._decode

    def spy(*args: Any) -> Any:
        import threading

        threads.append(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(h.receiver, "_decode", spy)
    await h.post(metrics_request(1.0).SerializeToString())
    big = metrics_request(*[float(i) for i in range(40_000)])
    assert len(big.SerializeToString()) >= 2**20
    status, _, _ = await h.post(
        gzip.compress(big.SerializeToString(), 1), {**PROTO, "Content-Encoding": "gzip"}
    )
    assert status == 200 and len(h.sink.points()) == 40_001
    assert threads[0] == "MainThread" and threads[1] != "MainThread"
