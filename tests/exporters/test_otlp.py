"""The otlp (gRPC) and otlp_http exporters against an independent sink (tests/exporters/otlp_sink.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from agent import exphist
from agent.component import ComponentKind, RetryableError, Settings, Signal
from agent.model import (
    ExplicitHistogram,
    Kind,
    LogBatch,
    MetricBatch,
    Point,
    Resource,
    SpanBatch,
    Summary,
    Temporality,
)
from agent.sending import Request, RetryConfig
from agent.telemetry import Telemetry
from agent.tls import ClientTLSConfig
from exporters.otlp import FACTORIES
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig
from exporters.otlp.grpc import OtlpGrpcExporter
from exporters.otlp.http import OtlpHttpExporter
from tests.conftest import Certs, component_settings, wait_until
from tests.exporters.conftest import serve
from tests.exporters.otlp_sink import Answer, Sink

DELTA = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
FAST = RetryConfig(initial_interval=0.01, max_interval=0.05, max_elapsed_time=10.0)
S = 10**9

Exporter = OtlpGrpcExporter | OtlpHttpExporter
Make = Callable[..., tuple[Exporter, Telemetry, Sink]]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "HEADWATER_DEPLOYMENT_ENVIRONMENT",
        "K8S_CLUSTER_NAME",
        "K8S_NODE_NAME",
        "K8S_NAMESPACE_NAME",
        "K8S_POD_NAME",
        "K8S_POD_UID",
        "K8S_CONTAINER_NAME",
        "K8S_DEPLOYMENT_NAME",
    ):
        monkeypatch.delenv(name, raising=False)


def settings(tel: Telemetry, name: str = "otlp") -> Settings:
    """The exporter otlp/<name>: telemetry labelled ``name``, logger ``test.otlp.<name>``."""
    return component_settings(
        tel,
        ComponentKind.EXPORTER,
        f"otlp/{name}",
        telemetry_id=name,
        logger=f"test.otlp.{name}",
        shutdown_timeout_s=10.0,
    )


@pytest.fixture
async def make() -> AsyncIterator[Any]:
    made: list[Exporter] = []
    sinks: list[Sink] = []

    async def build(transport: str, **overrides: Any) -> tuple[Exporter, Telemetry, Sink]:
        sink = Sink()
        sinks.append(sink)
        tel = Telemetry()
        exp: Exporter
        if transport == "grpc":
            target = await sink.start_grpc()
            cfg: Any = OtlpConfig(endpoint=target, tls=ClientTLSConfig(insecure=True), retry_on_failure=FAST)
            cfg = replace(cfg, **overrides)
            assert cfg.validate() == []
            exp = OtlpGrpcExporter(settings(tel), cfg)
        else:
            base = await sink.start_http()
            cfg = OtlpHttpConfig(endpoint=base, retry_on_failure=FAST)
            cfg = replace(cfg, **overrides)
            assert cfg.validate() == []
            exp = OtlpHttpExporter(settings(tel), cfg)
        made.append(exp)
        await exp.start()
        return exp, tel, sink

    yield build
    for exp in made:
        await exp.shutdown()
    for sink in sinks:
        await sink.stop()


async def drain(exp: Exporter) -> None:
    await exp._sender.shutdown(10.0)


def counter(
    value: float, start: int, end: int, name: str = "hits", labels: Any = (("route", "/a"),)
) -> Point:
    """A StatsD-like delta monotonic counter point over (start, end]."""
    return Point(name, Kind.SUM, labels, end, value, start, Temporality.DELTA, True)


def cumulative(value: float, start: int, t: int, monotonic: bool = True, name: str = "total") -> Point:
    return Point(name, Kind.SUM, (), t, value, start, Temporality.CUMULATIVE, monotonic)


def attrs(kvs: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in kvs}


TRANSPORTS = pytest.mark.parametrize("transport", ["grpc", "http"])


# -- wire and headers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_http_headers_paths_and_compression(make: Any, compression: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("SIGNOZ_INGESTION_KEY", "key-123")
    import os

    exp, tel, sink = await make(
        "http", compression=compression, headers={"signoz-ingestion-key": os.environ["SIGNOZ_INGESTION_KEY"]}
    )
    t = time.time_ns()
    await exp.consume(MetricBatch((counter(3, t - 10 * S, t),)))
    await drain(exp)
    (rec,) = sink.received
    assert rec.path == "/v1/metrics"
    assert rec.headers["Content-Type"] == "application/x-protobuf"
    assert rec.headers["signoz-ingestion-key"] == "key-123"
    assert rec.headers["User-Agent"].startswith("headwater/")
    if compression == "none":
        assert "Content-Encoding" not in rec.headers
    else:
        assert rec.headers["Content-Encoding"] == compression
        magic = b"\x1f\x8b" if compression == "gzip" else b"\x28\xb5\x2f\xfd"
        assert rec.raw.startswith(magic)
    ((_, scope, metric, dp),) = sink.metrics()
    assert scope.name == "headwater"
    assert metric.name == "hits" and dp.as_double == 3
    assert tel.value("exporter_sent_points_total") == 1


async def test_grpc_metadata_and_user_agent(make: Any) -> None:
    exp, tel, sink = await make("grpc", headers={"Signoz-Ingestion-Key": "abc"})
    t = time.time_ns()
    await exp.consume(MetricBatch((counter(1, t - S, t),)))
    await drain(exp)
    (rec,) = sink.received
    assert rec.headers["signoz-ingestion-key"] == "abc"  # metadata names are lower-cased
    assert "headwater/" in rec.headers["user-agent"]
    assert tel.value("exporter_sent_points_total") == 1


async def test_http_per_signal_endpoint_used_as_given(make: Any) -> None:
    _, _, sink = await make("http")
    exp2 = OtlpHttpExporter(
        settings(Telemetry(), "custom"),
        OtlpHttpConfig(
            endpoint="http://127.0.0.1:9/unused",
            metrics_endpoint=f"http://127.0.0.1:{sink.port}/custom/metrics/path",
            retry_on_failure=FAST,
        ),
    )
    assert exp2.urls[Signal.TRACES] == "http://127.0.0.1:9/unused/v1/traces"
    await exp2.start()
    try:
        t = time.time_ns()
        await exp2.consume(MetricBatch((counter(1, t - S, t),)))
        await drain(exp2)
    finally:
        await exp2.shutdown()
    assert [r.path for r in sink.received] == ["/custom/metrics/path"]


# -- temporality --------------------------------------------------------------------------------------
@TRANSPORTS
async def test_statsd_delta_counters_become_cumulative(make: Any, transport: str) -> None:
    exp, _, sink = await make(transport, temporality="cumulative")
    t0 = time.time_ns()
    for i, value in enumerate((5.0, 3.0, 2.0)):
        await exp.consume(MetricBatch((counter(value, t0 + i * 10 * S, t0 + (i + 1) * 10 * S),)))
    await drain(exp)
    points = sink.metrics()
    assert [dp.as_double for *_, dp in points] == [5, 8, 10]
    assert {dp.start_time_unix_nano for *_, dp in points} == {t0}  # stable start time
    assert [dp.time_unix_nano for *_, dp in points] == [t0 + 10 * S, t0 + 20 * S, t0 + 30 * S]
    for _, _, metric, _ in points:
        assert metric.sum.aggregation_temporality == CUMULATIVE and metric.sum.is_monotonic


@TRANSPORTS
async def test_delta_counters_stay_delta_by_default(make: Any, transport: str) -> None:
    exp, _, sink = await make(transport)
    t0 = time.time_ns()
    for i, value in enumerate((5.0, 3.0)):
        await exp.consume(MetricBatch((counter(value, t0 + i * 10 * S, t0 + (i + 1) * 10 * S),)))
    await drain(exp)
    points = sink.metrics()
    assert [dp.as_double for *_, dp in points] == [5, 3]
    assert [dp.start_time_unix_nano for *_, dp in points] == [t0, t0 + 10 * S]
    assert all(m.sum.aggregation_temporality == DELTA and m.sum.is_monotonic for _, _, m, _ in points)


async def test_cumulative_to_delta_baseline_resets_and_first_point(make: Any) -> None:
    exp, tel, sink = await make("http")
    now = time.time_ns()
    old_start = now - 3600 * S  # began long before the exporter: its history may have been sent already
    batches = [
        cumulative(10, old_start, now),  # baseline only
        cumulative(15, old_start, now + 10 * S),  # +5
        cumulative(3, old_start, now + 20 * S),  # value went down: reset, whole value
        cumulative(4, now + 25 * S, now + 30 * S),  # new start time: reset, whole value from it
        cumulative(6, now + 25 * S, now + 30 * S),  # not later than the previous point: dropped
    ]
    for p in batches:
        await exp.consume(MetricBatch((p,)))
    fresh_start = time.time_ns() + S  # began after the exporter started: sent whole
    await exp.consume(MetricBatch((cumulative(7, fresh_start, fresh_start + 5 * S, name="fresh"),)))
    await drain(exp)
    got = [
        (m.name, dp.as_double, dp.start_time_unix_nano, dp.time_unix_nano) for _, _, m, dp in sink.metrics()
    ]
    assert got == [
        ("total", 5, now, now + 10 * S),
        ("total", 3, now + 10 * S, now + 20 * S),
        ("total", 4, now + 25 * S, now + 30 * S),
        ("fresh", 7, fresh_start, fresh_start + 5 * S),
    ]
    assert all(m.sum.aggregation_temporality == DELTA for _, _, m, _ in sink.metrics())
    assert tel.value("exporter_otlp_baseline_points_total") == 1
    assert tel.value("exporter_dropped_points_total", reason="out_of_order") == 1


async def test_non_monotonic_cumulative_to_delta_goes_down_without_reset(make: Any) -> None:
    exp, _, sink = await make("grpc")
    now = time.time_ns()
    start = now - 3600 * S
    for i, v in enumerate((10.0, 4.0, 7.0)):
        await exp.consume(MetricBatch((cumulative(v, start, now + i * S, monotonic=False),)))
    await drain(exp)
    points = sink.metrics()
    assert [dp.as_double for *_, dp in points] == [-6, 3]
    assert not points[0][2].sum.is_monotonic


async def test_idle_series_expire_and_restart_their_total(make: Any) -> None:
    exp, tel, sink = await make("http", temporality="cumulative", series_idle_timeout=0.2)
    t0 = time.time_ns()
    await exp.consume(MetricBatch((counter(5, t0, t0 + S),)))
    assert tel.value("exporter_series") == 1
    # Letting the idle timeout pass is the behaviour under test (series expire at the next batch).
    await asyncio.sleep(0.5)
    await exp.consume(MetricBatch((counter(2, t0 + 5 * S, t0 + 6 * S),)))
    await drain(exp)
    got = [(dp.as_double, dp.start_time_unix_nano) for *_, dp in sink.metrics()]
    assert got == [(5, t0), (2, t0 + 5 * S)]  # forgotten: a new total with a new start time


# -- histograms, summaries, gauges ----------------------------------------------------------------------
VALUES = np.array([0.003, 0.02, 0.02, 0.3, 4.0, 100.0])


def timer(
    t: int, values: np.ndarray = VALUES, temporality: Temporality = Temporality.DELTA, start: int = 0
) -> Point:
    h = exphist.from_values(values)
    return Point(
        "lat", Kind.HISTOGRAM, (("op", "get"),), t, 0.0, start or t - 10 * S, temporality, False, h, "s"
    )


@TRANSPORTS
async def test_exponential_histogram_sent_as_exponential(make: Any, transport: str) -> None:
    exp, _, sink = await make(transport)
    t = time.time_ns()
    p = timer(t)
    await exp.consume(MetricBatch((p,)))
    await drain(exp)
    ((_, _, metric, dp),) = sink.metrics()
    h = p.histogram
    assert h is not None
    assert metric.WhichOneof("data") == "exponential_histogram" and metric.unit == "s"
    assert metric.exponential_histogram.aggregation_temporality == DELTA
    assert dp.count == 6 and dp.sum == pytest.approx(VALUES.sum())
    assert (dp.min, dp.max) == (0.003, 100.0)
    assert dp.scale == h.scale and dp.positive.offset == h.positive_offset
    assert list(dp.positive.bucket_counts) == h.positive_counts.astype(int).tolist()
    assert attrs(dp.attributes) == {"op": "get"}


@TRANSPORTS
async def test_exponential_histogram_sent_as_explicit(make: Any, transport: str) -> None:
    exp, _, sink = await make(transport, histograms="explicit")
    t = time.time_ns()
    await exp.consume(MetricBatch((timer(t),)))
    await drain(exp)
    ((_, _, metric, dp),) = sink.metrics()
    assert metric.WhichOneof("data") == "histogram"
    from exporters.otlp.config import DEFAULT_EXPLICIT_BUCKETS

    assert list(dp.explicit_bounds) == list(DEFAULT_EXPLICIT_BUCKETS)
    expected = np.histogram(VALUES, bins=[-np.inf, *DEFAULT_EXPLICIT_BUCKETS, np.inf])[0].tolist()
    assert list(dp.bucket_counts) == expected  # no value sits near a bound, so the split is exact
    assert dp.count == 6 and dp.sum == pytest.approx(VALUES.sum())
    assert (dp.min, dp.max) == (0.003, 100.0)


async def test_histograms_delta_to_cumulative_both_forms(make: Any) -> None:
    exp, _, sink = await make("grpc", temporality="cumulative")
    exp2, _, sink2 = await make(
        "http", temporality="cumulative", histograms="explicit", explicit_buckets=[0.1, 1.0]
    )
    t = time.time_ns()
    for e in (exp, exp2):
        await e.consume(MetricBatch((timer(t, np.array([0.05, 0.5])),)))
        await e.consume(MetricBatch((timer(t + 10 * S, np.array([0.05, 5.0, 6.0])),)))
        await drain(e)
    exponential = [dp for *_, dp in sink.metrics()]
    assert [dp.count for dp in exponential] == [2, 5]
    assert exponential[1].min == 0.05 and exponential[1].max == 6.0
    assert exponential[1].sum == pytest.approx(11.6)
    assert len({dp.start_time_unix_nano for dp in exponential}) == 1
    explicit = [dp for *_, dp in sink2.metrics()]
    assert [list(dp.bucket_counts) for dp in explicit] == [[1, 1, 0], [2, 1, 2]]
    assert (
        explicit[1].metric if False else sink2.metrics()[1][2].histogram.aggregation_temporality == CUMULATIVE
    )


async def test_cumulative_histogram_to_delta(make: Any) -> None:
    exp, _, sink = await make("http")
    t = time.time_ns()
    first = np.array([0.05, 0.5])
    start = t - 3600 * S
    await exp.consume(MetricBatch((timer(t, first, Temporality.CUMULATIVE, start),)))  # baseline
    later = np.concatenate([first, [0.05, 2.0]])
    await exp.consume(MetricBatch((timer(t + 10 * S, later, Temporality.CUMULATIVE, start),)))
    await drain(exp)
    ((_, _, metric, dp),) = sink.metrics()
    assert metric.exponential_histogram.aggregation_temporality == DELTA
    assert dp.count == 2 and dp.sum == pytest.approx(2.05)
    assert not dp.HasField("min")  # a difference has no known min/max
    assert sum(dp.positive.bucket_counts) == 2


@pytest.mark.parametrize("temporality", ["delta", "cumulative"])
async def test_summaries_gauges_and_explicit_histograms_pass_through(make: Any, temporality: str) -> None:
    exp, _, sink = await make("http", temporality=temporality)
    t = time.time_ns()
    batch = MetricBatch(
        (
            Point("temp", Kind.GAUGE, (("room", "a"),), t, 21.5),
            Point("rpc", Kind.SUMMARY, (), t, start_time_unix_nano=t - S, temporality=Temporality.CUMULATIVE,
                  summary=Summary(10, 4.5, ((0.5, 0.3), (0.99, 1.2)))),
            Point("size", Kind.HISTOGRAM, (), t, start_time_unix_nano=t - S,
                  temporality=Temporality(DELTA if temporality == "delta" else CUMULATIVE),
                  explicit=ExplicitHistogram((1.0, 10.0), (2, 3, 1), 30.0, 0.5, 12.0)),
        )
    )  # fmt: skip
    await exp.consume(batch)
    await drain(exp)
    got = {m.name: (m, dp) for _, _, m, dp in sink.metrics()}
    gauge, gdp = got["temp"]
    assert (
        gauge.WhichOneof("data") == "gauge"
        and gdp.as_double == 21.5
        and attrs(gdp.attributes) == {"room": "a"}
    )
    summary, sdp = got["rpc"]
    assert summary.WhichOneof("data") == "summary"
    assert (sdp.count, sdp.sum) == (10, 4.5)
    assert [(q.quantile, q.value) for q in sdp.quantile_values] == [(0.5, 0.3), (0.99, 1.2)]
    hist, hdp = got["size"]
    assert hist.WhichOneof("data") == "histogram"
    assert list(hdp.explicit_bounds) == [1.0, 10.0] and list(hdp.bucket_counts) == [2, 3, 1]
    assert (hdp.count, hdp.sum, hdp.min, hdp.max) == (6, 30.0, 0.5, 12.0)


async def test_histogram_without_sum_is_sent_without_sum(make: Any) -> None:
    """A histogram whose sum is unknown (NaN, e.g. an OTLP point without ``sum``) must leave the
    optional ``sum`` field out, not send NaN as if it were the sum."""
    exp, _, sink = await make("http")
    t = time.time_ns()
    unknown = float("nan")
    explicit = ExplicitHistogram((1.0,), (1, 1), unknown, None, None)
    exponential = replace(exphist.from_values(np.array([0.5, 2.0])), sum=unknown)
    size = Point("size", Kind.HISTOGRAM, (), t, start_time_unix_nano=t - S, explicit=explicit)
    lat = Point("lat", Kind.HISTOGRAM, (), t, start_time_unix_nano=t - S, histogram=exponential)
    await exp.consume(MetricBatch((size, lat)))
    await drain(exp)
    got = {m.name: dp for _, _, m, dp in sink.metrics()}
    assert got["size"].count == 2 and not got["size"].HasField("sum")
    assert got["lat"].count == 2 and not got["lat"].HasField("sum")


# -- resource attributes ------------------------------------------------------------------------------
async def test_resource_attributes_from_config_env_and_points(make: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=payments,region=eu%2Dwest,service.name=ignored")
    monkeypatch.setenv("K8S_POD_NAME", "checkout-7d9f")
    monkeypatch.setenv("K8S_NAMESPACE_NAME", "shop")
    monkeypatch.setenv("K8S_NODE_NAME", "node-1")
    exp, _, sink = await make(
        "grpc", resource={"team": "core", "cluster": "prod-1"}, deployment_environment="production"
    )
    t = time.time_ns()
    own = Resource((("service.name", "from-otlp"), ("k8s.pod.name", "app-pod")))
    await exp.consume(MetricBatch((counter(1, t - S, t), replace(counter(2, t - S, t), resource=own))))
    await drain(exp)
    resources = [attrs(r.attributes) for r, *_ in sink.metrics()]
    assert resources[0] == {
        "service.name": "checkout",  # OTEL_SERVICE_NAME wins over OTEL_RESOURCE_ATTRIBUTES
        "team": "core",  # config over environment
        "region": "eu-west",  # percent-decoded
        "cluster": "prod-1",
        "deployment.environment": "production",
        "deployment.environment.name": "production",
        "k8s.pod.name": "checkout-7d9f",
        "k8s.namespace.name": "shop",
        "k8s.node.name": "node-1",
    }
    assert resources[1]["service.name"] == "from-otlp"  # the point's own resource wins
    assert resources[1]["k8s.pod.name"] == "app-pod"
    assert resources[1]["team"] == "core"


async def test_default_service_name_and_environment_off(make: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "not-read")
    exp, _, sink = await make("http", resource_from_environment=False)
    t = time.time_ns()
    await exp.consume(MetricBatch((counter(1, t - S, t),)))
    await drain(exp)
    ((res, *_),) = sink.metrics()
    assert attrs(res.attributes) == {"service.name": "unknown_service:headwater"}


# -- retries ------------------------------------------------------------------------------------------
async def test_http_retryable_statuses_and_retry_after(make: Any, caplog: Any) -> None:
    exp, tel, sink = await make("http")
    sink.script = [
        Answer("http", 503),
        Answer("http", 502),
        Answer("http", 504),
        Answer("http", 429, headers={"Retry-After": "1"}),
    ]
    caplog.set_level(logging.DEBUG, logger="test.otlp.otlp")
    t = time.time_ns()
    await exp.consume(MetricBatch((counter(1, t - S, t),)))
    await drain(exp)
    assert sink.attempts == ["metrics"] * 5 and len(sink.received) == 1
    for status in (503, 502, 504, 429):
        assert tel.value("exporter_failed_points_total", reason=f"http_{status}") == 1
    delays = [
        r.args[1] for r in caplog.records if r.msg.startswith("send failed") and r.args[0] == "http_429"
    ]
    assert delays and delays[0] >= 1.0  # the server's Retry-After, not the 10-50 ms backoff
    assert tel.value("exporter_sent_points_total") == 1


async def test_retry_after_http_date_becomes_the_requested_delay(make: Any) -> None:
    exp, _, sink = await make("http")
    when = time.time() + 30
    import email.utils

    sink.script = [Answer("http", 429, headers={"Retry-After": email.utils.formatdate(when, usegmt=True)})]
    request = Request(b"", 0, kind=Signal.METRICS.value)
    with pytest.raises(RetryableError) as raised:
        await exp._send(request)
    assert raised.value.reason == "http_429"
    assert raised.value.retry_after_s is not None and 25 <= raised.value.retry_after_s <= 31


@pytest.mark.parametrize("status", [400, 401, 404, 413, 500])
async def test_http_other_errors_are_dropped_and_counted(make: Any, status: int) -> None:
    exp, tel, sink = await make("http")
    sink.script = [Answer("http", status)]
    t = time.time_ns()
    await exp.consume(MetricBatch((counter(1, t - S, t, name="poison"), counter(1, t - S, t, name="b"))))
    await exp.consume(MetricBatch((counter(1, t - S, t, name="after"),)))
    await drain(exp)
    assert sink.attempts == ["metrics", "metrics"]  # not retried
    assert tel.value("exporter_dropped_points_total", reason=f"http_{status}") == 2
    assert [m.name for _, _, m, _ in sink.metrics()] == ["after"]


@TRANSPORTS
async def test_partial_success_counted_not_retried(make: Any, transport: str, caplog: Any) -> None:
    exp, tel, sink = await make(transport)
    sink.script = [Answer("partial", rejected=2, message="2 points had bad names")]
    t = time.time_ns()
    await exp.consume(MetricBatch(tuple(counter(1, t - S, t, name=f"m{i}") for i in range(5))))
    await drain(exp)
    assert sink.attempts == ["metrics"]
    assert tel.value("exporter_dropped_points_total", reason="partial_success") == 2
    assert tel.value("exporter_sent_points_total") == 3
    assert tel.value("exporter_otlp_partial_success_total") == 1
    assert any("2 points had bad names" in r.getMessage() for r in caplog.records)


async def test_grpc_retryable_codes_and_retry_info(make: Any, caplog: Any) -> None:
    exp, tel, sink = await make("grpc")
    sink.script = [
        Answer("grpc", code=grpc.StatusCode.UNAVAILABLE),
        Answer("grpc", code=grpc.StatusCode.DEADLINE_EXCEEDED),
        Answer("grpc", code=grpc.StatusCode.ABORTED),
        Answer("grpc", code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=1.25),
    ]
    caplog.set_level(logging.DEBUG, logger="test.otlp.otlp")
    t = time.time_ns()
    await exp.consume(MetricBatch((counter(1, t - S, t),)))
    await drain(exp)
    assert len(sink.attempts) == 5 and len(sink.received) == 1
    for reason in ("grpc_unavailable", "grpc_deadline_exceeded", "grpc_aborted", "grpc_resource_exhausted"):
        assert tel.value("exporter_failed_points_total", reason=reason) == 1
    delays = [
        r.args[1]
        for r in caplog.records
        if r.msg.startswith("send failed") and r.args[0] == "grpc_resource_exhausted"
    ]
    assert delays and delays[0] >= 1.25  # RetryInfo.retry_delay was honoured


@pytest.mark.parametrize(
    ("code", "retry_delay_s"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, None),
        (grpc.StatusCode.INVALID_ARGUMENT, None),
        (grpc.StatusCode.PERMISSION_DENIED, None),
        (grpc.StatusCode.UNAUTHENTICATED, None),
        (grpc.StatusCode.INTERNAL, 1.0),  # RetryInfo does not make a non-retryable code retryable
    ],
)
async def test_grpc_permanent_codes_dropped(make: Any, code: grpc.StatusCode, retry_delay_s: Any) -> None:
    exp, tel, sink = await make("grpc")
    sink.script = [Answer("grpc", code=code, retry_delay_s=retry_delay_s)]
    t = time.time_ns()
    await exp.consume(MetricBatch((counter(1, t - S, t),)))
    await exp.consume(MetricBatch((counter(1, t - S, t, name="after"),)))
    await drain(exp)
    assert len(sink.attempts) == 2
    assert tel.value("exporter_dropped_points_total", reason=f"grpc_{code.name.lower()}") == 1
    assert [m.name for _, _, m, _ in sink.metrics()] == ["after"]


@TRANSPORTS
async def test_response_over_4mib_is_not_parsed(make: Any, transport: str) -> None:
    exp, tel, sink = await make(transport)
    sink.script = [Answer("huge")]
    t = time.time_ns()
    await exp.consume(MetricBatch((counter(1, t - S, t),)))
    await drain(exp)
    assert sink.attempts == ["metrics"]  # not retried
    reason = "response_too_large" if transport == "http" else "grpc_resource_exhausted"
    assert tel.value("exporter_dropped_points_total", reason=reason) == 1
    assert tel.value("exporter_otlp_partial_success_total") == 0  # its content was never read


@TRANSPORTS
async def test_unreachable_backend_is_retried(transport: str) -> None:
    tel = Telemetry()
    fast = RetryConfig(initial_interval=0.01, max_interval=0.02, max_elapsed_time=0.3)
    exp: Exporter
    if transport == "grpc":
        exp = OtlpGrpcExporter(
            settings(tel),
            OtlpConfig(endpoint="127.0.0.1:9", tls=ClientTLSConfig(insecure=True), retry_on_failure=fast),
        )
    else:
        exp = OtlpHttpExporter(
            settings(tel), OtlpHttpConfig(endpoint="http://127.0.0.1:9", retry_on_failure=fast)
        )
    await exp.start()
    try:
        t = time.time_ns()
        await exp.consume(MetricBatch((counter(1, t - S, t),)))
        await drain(exp)
    finally:
        await exp.shutdown()
    failed = tel.value("exporter_failed_points_total")
    assert failed >= 2  # tried again after the first failure
    reason = "grpc_unavailable" if transport == "grpc" else "connection_error"
    assert tel.value("exporter_failed_points_total", reason=reason) == failed
    assert tel.value("exporter_dropped_points_total", reason="retries_exhausted") == 1


# -- splitting ----------------------------------------------------------------------------------------
@TRANSPORTS
async def test_batch_over_max_request_size_is_split(make: Any, transport: str) -> None:
    exp, tel, sink = await make(transport, max_request_size=8192)
    t = time.time_ns()
    h = exphist.from_values(VALUES)
    points = []
    for i in range(600):
        labels = (("host", f"web-{i % 7}"), ("route", f"/items/{i}"))
        if i % 10 == 9:
            points.append(Point(f"lat.{i % 3}", Kind.HISTOGRAM, labels, t, 0.0, t - S, histogram=h, unit="s"))
        else:
            points.append(counter(float(i), t - S, t, name=f"m.{i % 5}", labels=labels))
    await exp.consume(MetricBatch(tuple(points)))
    await drain(exp)
    sizes = [len(r.message.SerializeToString()) for r in sink.received]
    assert len(sizes) >= 3 and max(sizes) <= 8192
    assert min(sizes[:-1]) > 8192 // 2  # requests are filled, not cut early
    got = sorted((m.name, tuple(sorted(attrs(dp.attributes).items()))) for _, _, m, dp in sink.metrics())
    want = sorted((p.name, p.labels) for p in points)
    assert got == want  # the union of the requests is the whole batch, each point once
    assert tel.value("exporter_sent_points_total") == 600


# -- TLS ----------------------------------------------------------------------------------------------
@TRANSPORTS
async def test_tls_with_test_ca(transport: str, tls_certs: Certs) -> None:
    import ssl

    ca, crt, key = tls_certs.ca, tls_certs.cert, tls_certs.key
    sink = Sink()
    fast = RetryConfig(initial_interval=0.01, max_interval=0.02, max_elapsed_time=0.3)
    tel = Telemetry()
    good: Exporter
    untrusted: Exporter
    if transport == "grpc":
        with open(key, "rb") as k, open(crt, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        target = await sink.start_grpc(creds)
        good = OtlpGrpcExporter(
            settings(tel, "good"), OtlpConfig(endpoint=target, tls=ClientTLSConfig(ca_file=ca))
        )
        untrusted = OtlpGrpcExporter(
            settings(tel, "untrusted"), OtlpConfig(endpoint=target, retry_on_failure=fast)
        )
    else:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(crt, key)
        base = await sink.start_http(ctx)
        good = OtlpHttpExporter(
            settings(tel, "good"), OtlpHttpConfig(endpoint=base, tls=ClientTLSConfig(ca_file=ca))
        )
        untrusted = OtlpHttpExporter(
            settings(tel, "untrusted"), OtlpHttpConfig(endpoint=base, retry_on_failure=fast)
        )
    try:
        t = time.time_ns()
        for exp in (good, untrusted):
            await exp.start()
            await exp.consume(MetricBatch((counter(1, t - S, t),)))
            await drain(exp)
        assert len(sink.received) == 1  # only the exporter that trusts the CA got through
        assert tel.value("exporter_sent_points_total", exporter="good") == 1
        assert (
            tel.value("exporter_dropped_points_total", exporter="untrusted", reason="retries_exhausted") == 1
        )
    finally:
        await good.shutdown()
        await untrusted.shutdown()
        await sink.stop()


# -- traces and logs ----------------------------------------------------------------------------------
def _resource(**kv: str) -> PbResource:
    r = PbResource()
    for k, v in kv.items():
        r.attributes.add(key=k.replace("_", "."), value=KeyValue(key="x").value.__class__(string_value=v))
    return r


@TRANSPORTS
async def test_traces_and_logs_pass_through(make: Any, transport: str) -> None:
    exp, tel, sink = await make(transport, resource={"deployment.environment": "staging"})
    own = ResourceSpans(
        resource=_resource(service_name="api"),
        scope_spans=[ScopeSpans(spans=[Span(trace_id=b"t" * 16, span_id=b"s" * 8, name="GET /")])],
        schema_url="https://opentelemetry.io/schemas/1.21.0",
    )
    bare = ResourceSpans(scope_spans=[ScopeSpans(spans=[Span(name="job"), Span(name="job2")])])
    logs = ResourceLogs(
        resource=_resource(deployment_environment_name="prod"),
        scope_logs=[ScopeLogs(log_records=[LogRecord(severity_text="WARN")])],
    )
    await exp.consume(SpanBatch((own, bare), span_count=3))
    await exp.consume(LogBatch((logs,), record_count=1))
    await exp.consume(SpanBatch((), span_count=0))  # nothing to send: no request
    await drain(exp)
    assert [r.signal for r in sink.received] == ["traces", "logs"]
    traces = sink.received[0].message.resource_spans
    assert [attrs(rs.resource.attributes) for rs in traces] == [
        {
            "service.name": "api",
            "deployment.environment": "staging",
            "deployment.environment.name": "staging",
        },
        {
            "service.name": "unknown_service:headwater",
            "deployment.environment": "staging",
            "deployment.environment.name": "staging",
        },
    ]
    assert traces[0].schema_url == "https://opentelemetry.io/schemas/1.21.0"
    assert traces[0].scope_spans[0].spans[0] == own.scope_spans[0].spans[0]
    assert [s.name for s in traces[1].scope_spans[0].spans] == ["job", "job2"]
    (rl,) = sink.received[1].message.resource_logs
    # The data named its environment: it is mirrored, ours is not mixed in.
    assert attrs(rl.resource.attributes)["deployment.environment"] == "prod"
    assert attrs(rl.resource.attributes)["deployment.environment.name"] == "prod"
    assert rl.scope_logs[0].log_records[0].severity_text == "WARN"
    assert own.resource.attributes[0].key == "service.name" and len(own.resource.attributes) == 1  # untouched
    assert tel.value("exporter_sent_points_total") == 4


async def test_large_span_batch_split_at_span_boundaries(make: Any) -> None:
    exp, tel, sink = await make("http", max_request_size=4096)
    spans = [Span(name=f"span-{i}", trace_id=bytes([i % 256]) * 16, span_id=b"s" * 8) for i in range(300)]
    rs = ResourceSpans(resource=_resource(service_name="big"), scope_spans=[ScopeSpans(spans=spans)])
    await exp.consume(SpanBatch((rs,), span_count=300))
    await drain(exp)
    sizes = [len(r.message.SerializeToString()) for r in sink.received]
    assert len(sizes) >= 3 and max(sizes) <= 4096
    assert min(sizes[:-1]) > 4096 // 2
    names = [
        s.name
        for r in sink.received
        for rs2 in r.message.resource_spans
        for ss in rs2.scope_spans
        for s in ss.spans
    ]
    assert names == [f"span-{i}" for i in range(300)]
    assert tel.value("exporter_sent_points_total") == 300


# -- config -------------------------------------------------------------------------------------------
def test_config_validation() -> None:
    assert OtlpConfig().validate() == []
    assert OtlpHttpConfig().validate() == []
    bad = OtlpHttpConfig(
        headers={"Content-Type": "x", "signoz-ingestion-key": "k"},
        compression_level=9,
        endpoint="127.0.0.1:4318",
        explicit_buckets=[1.0, 0.5],
    )
    assert sorted(p for p, _ in bad.validate()) == [
        "compression_level",
        "endpoint",
        "explicit_buckets",
        "headers::Content-Type",
    ]
    grpc_bad = OtlpConfig(
        endpoint="collector:4317/v1",
        tls=ClientTLSConfig(insecure_skip_verify=True),
        headers={"grpc-timeout": "1"},
    )
    assert sorted(p for p, _ in grpc_bad.validate()) == [
        "endpoint",
        "headers::grpc-timeout",
        "tls::insecure_skip_verify",
    ]
    assert OtlpConfig(endpoint="https://ingest.us.signoz.cloud:443").validate() == []
    assert {f.type for f in FACTORIES} == {"otlp", "otlp_http"}
    assert all(f.signals == {Signal.METRICS, Signal.TRACES, Signal.LOGS} for f in FACTORIES)


async def test_shutdown_is_safe_before_start_and_idempotent() -> None:
    for exp in (
        OtlpGrpcExporter(settings(Telemetry()), OtlpConfig()),
        OtlpHttpExporter(settings(Telemetry()), OtlpHttpConfig()),
    ):
        await exp.shutdown()
        await exp.shutdown()


# -- tenants: a connection each, and what a reload does to their queues -------------------------------
async def test_a_stuck_tenant_does_not_hold_the_connection_of_another() -> None:
    """Tenants with a header each have their own sender; they must not share one pooled connection
    (num_consumers: 1), or a tenant whose request hangs blocks every other tenant's sends."""
    from aiohttp import web

    from agent.confmodel import Duration
    from exporters.otlp.config import OtlpTenantRoutingConfig

    release = asyncio.Event()
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        tenant = request.headers.get("X-Scope-OrgID", "")
        seen.append(tenant)
        if tenant == "stuck":
            await release.wait()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/metrics", handle)
    runner, port = await serve(app)
    config = OtlpHttpConfig(
        endpoint=f"http://127.0.0.1:{port}",
        compression="none",
        timeout=Duration(60.0),
        retry_on_failure=FAST,
        tenant=OtlpTenantRoutingConfig(header="X-Scope-OrgID"),
    )
    assert config.validate() == []
    exp = OtlpHttpExporter(settings(Telemetry()), config)
    await exp.start()
    try:
        t = time.time_ns()
        await exp.consume(MetricBatch((counter(1, t - S, t, labels=(("tenant_id", "stuck"),)),)))
        await wait_until(lambda: "stuck" in seen, "the stuck tenant's request", timeout_s=20)
        await exp.consume(MetricBatch((counter(1, t - S, t, labels=(("tenant_id", "healthy"),)),)))
        await wait_until(
            lambda: "healthy" in seen,
            "the healthy tenant's request (it waited behind the stuck tenant's connection)",
            timeout_s=20,
        )
    finally:
        release.set()
        await exp.shutdown()
        await runner.cleanup()


async def test_a_reload_that_ends_tenant_headers_does_not_send_a_tenants_queue_as_nobodys(
    make: Any,
) -> None:
    """A tenant's queued requests carry their tenant only in the header their sender adds. Adopted by
    a successor without tenant headers they would go out through its own queue with no tenant — into
    the wrong tenant: they are dropped and counted (tenant_routing_changed), as remote-write does."""
    from aiohttp import web

    from agent.confmodel import Duration
    from exporters.otlp.config import OtlpTenantRoutingConfig

    sending = asyncio.Event()
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        sending.set()
        await release.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_post("/v1/metrics", hang)
    runner, port = await serve(app)
    config = OtlpHttpConfig(
        endpoint=f"http://127.0.0.1:{port}",
        timeout=Duration(60.0),
        retry_on_failure=FAST,
        tenant=OtlpTenantRoutingConfig(header="X-Scope-OrgID"),
    )
    old = OtlpHttpExporter(settings(Telemetry()), config)
    await old.start()
    try:
        t = time.time_ns()
        await old.consume(MetricBatch((counter(1, t - S, t, labels=(("tenant_id", "acme"),)),)))
        await sending.wait()
        handed = await old.hand_over()
        assert set(handed[1]) == {"acme"}
    finally:
        await old.shutdown()
        release.set()
        await runner.cleanup()

    new, tel, sink = await make("http")  # no tenant routing
    await new.adopt(handed)
    await drain(new)
    assert sink.received == []
    assert tel.value("exporter_dropped_points_total", reason="tenant_routing_changed") == 1
