"""The spanmetrics connector: calls and duration per service, span name, kind, status and dimensions;
renames and the red preset; the series cap and its overflow; delta and cumulative; explicit buckets;
flushing on its timer, on shutdown, and again after a refusal. Spans are real OTLP ``ResourceSpans``
built with the opentelemetry-proto classes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

from agent import exphist
from agent.component import Backpressure, ComponentKind, Signal, validate_config
from agent.model import IntValue, Kind, MetricBatch, Point, SpanBatch, Temporality
from agent.telemetry import Telemetry
from connectors.spanmetrics import (
    DimensionConfig,
    ExemplarsConfig,
    ExplicitConfig,
    ExponentialConfig,
    HistogramConfig,
    MetricSetConfig,
    SpanMetricsConfig,
    SpanMetricsConnector,
    factory,
)
from connectors.spanmetrics.aggregate import FOLD_AT
from tests.conftest import Sink, component_settings, wait_until

SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
INTERNAL = Span.SpanKind.SPAN_KIND_INTERNAL
OK = Status.StatusCode.STATUS_CODE_OK
ERROR = Status.StatusCode.STATUS_CODE_ERROR
T0 = 1_700_000_000_000_000_000


def _any(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=value)


def _kvs(attributes: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_any(v)) for k, v in attributes.items()]


def span(
    name: str = "GET /api/x",
    *,
    seconds: float = 0.1,
    kind: int = SERVER,
    status: int = OK,
    **attributes: Any,
) -> Span:
    """A span lasting ``seconds``; attribute names use ``__`` for dots (``http__route``)."""
    attrs = {k.replace("__", "."): v for k, v in attributes.items()}
    return Span(
        trace_id=b"\x01" * 16,
        span_id=b"\x02" * 8,
        name=name,
        kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=T0,
        end_time_unix_nano=T0 + round(seconds * 1e9),
        status=Status(code=status),  # type: ignore[arg-type]
        attributes=_kvs(attrs),
    )


def resource_spans(spans: Iterable[Span], service: str = "shop", **resource: Any) -> ResourceSpans:
    rs = ResourceSpans()
    rs.resource.attributes.extend(
        _kvs({"service.name": service, **{k.replace("__", "."): v for k, v in resource.items()}})
    )
    rs.scope_spans.add().spans.extend(spans)
    return rs


def batch(*groups: ResourceSpans) -> SpanBatch:
    return SpanBatch(tuple(groups), span_count=sum(len(ss.spans) for g in groups for ss in g.scope_spans))


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_100.0

    def __call__(self) -> float:
        return self.now


def make(
    config: SpanMetricsConfig, sink: Sink | None = None
) -> tuple[SpanMetricsConnector, Sink, Telemetry, Clock]:
    tel = Telemetry()
    sink = sink or Sink()
    clock = Clock()
    settings = component_settings(tel, ComponentKind.CONNECTOR, "spanmetrics")
    return SpanMetricsConnector(settings, config, sink, clock=clock, run_timer=False), sink, tel, clock


def points(sink: Sink) -> list[Point]:
    return [p for b in sink.batches for p in b.points]  # type: ignore[union-attr]


def by(pts: list[Point], name: str, **labels: str) -> list[Point]:
    """The points named ``name`` whose labels include ``labels`` (``__`` for dots in label names)."""
    want = {(k.replace("__", "."), v) for k, v in labels.items()}
    return [p for p in pts if p.name == name and want <= set(p.labels)]


def one(pts: list[Point], name: str, **labels: str) -> Point:
    found = by(pts, name, **labels)
    assert len(found) == 1, f"{name} {labels}: {found}"
    return found[0]


CALLS = "traces.span.metrics.calls"
DURATION = "traces.span.metrics.duration"


async def test_calls_and_duration_per_service_span_name_kind_and_status() -> None:
    conn, sink, _, clock = make(SpanMetricsConfig())
    await conn.consume(
        batch(
            resource_spans([span(seconds=0.1), span(seconds=0.2), span(seconds=0.3, status=ERROR)]),
            resource_spans([span("SELECT", kind=CLIENT, seconds=0.05)], service="db-user"),
        )
    )
    clock.now += 15
    await conn.flush()
    pts = points(sink)
    ok = one(pts, CALLS, service__name="shop", status__code="STATUS_CODE_OK")
    assert ok.labels == (
        ("service.name", "shop"),
        ("span.kind", "SPAN_KIND_SERVER"),
        ("span.name", "GET /api/x"),
        ("status.code", "STATUS_CODE_OK"),
    )
    assert (ok.kind, ok.value, ok.monotonic, ok.temporality) == (Kind.SUM, 2.0, True, Temporality.DELTA)
    assert ok.resource is not None and ok.resource.attributes == (("service.name", "shop"),)
    assert one(pts, CALLS, status__code="STATUS_CODE_ERROR").value == 1.0
    client = one(pts, CALLS, service__name="db-user")
    assert ("span.kind", "SPAN_KIND_CLIENT") in client.labels and client.value == 1.0
    d = one(pts, DURATION, service__name="shop", status__code="STATUS_CODE_OK")
    assert d.kind is Kind.HISTOGRAM and d.unit == "s" and d.explicit is None
    h = d.histogram
    assert h is not None and h.count == 2 and h.min == pytest.approx(0.1) and h.max == pytest.approx(0.2)
    assert h.sum == pytest.approx(0.3)
    assert len(pts) == 6  # 3 series × (calls, duration)
    assert {p.time_unix_nano for p in pts} == {int(clock.now * 1e9)}


async def test_dimensions_read_the_span_then_the_resource_then_the_default() -> None:
    config = SpanMetricsConfig(
        dimensions=[
            DimensionConfig("http.route"),
            DimensionConfig("deployment.environment", default="none"),
            DimensionConfig("customer.tier"),
        ]
    )
    conn, sink, _, _ = make(config)
    await conn.consume(
        batch(
            resource_spans(
                [span(http__route="/a", deployment__environment="canary")], deployment__environment="prod"
            ),
            resource_spans([span(http__route="/b")], deployment__environment="prod"),
            resource_spans([span(customer__tier=3)]),
        )
    )
    await conn.flush()
    pts = points(sink)
    assert one(pts, CALLS, http__route="/a").labels[0:1] == (("deployment.environment", "canary"),)
    assert ("deployment.environment", "prod") in one(pts, CALLS, http__route="/b").labels
    third = one(pts, CALLS, customer__tier="3")
    assert ("deployment.environment", "none") in third.labels
    assert all(k != "http.route" for k, _ in third.labels)  # absent, no default: left off
    # deployment.environment is a resource attribute the output resource does not key on
    assert all(p.resource is not None and p.resource.attributes == (("service.name", "shop"),) for p in pts)


async def test_renames_name_the_labels_and_the_namespace_prefixes_the_names() -> None:
    config = SpanMetricsConfig(
        dimensions=[DimensionConfig("http.route")], renames={"http.route": "route"}, namespace=""
    )
    conn, sink, _, _ = make(config)
    await conn.consume(batch(resource_spans([span(http__route="/a")])))
    await conn.flush()
    assert ("route", "/a") in one(points(sink), "calls").labels
    assert by(points(sink), "duration")


async def test_red_preset_gives_the_signoz_metrics_from_http_server_and_db_client_spans() -> None:
    conn, sink, _, _ = make(SpanMetricsConfig(preset="red", calls_and_duration=False))
    http_new = {"http__request__method": "GET", "http__route": "/api/x", "tenant__id": "acme"}
    http_old = {"http__method": "GET", "http__route": "/api/x", "tenant__id": "acme"}
    await conn.consume(
        batch(
            resource_spans(
                [
                    span(seconds=0.1, http__response__status_code=200, **http_new),
                    span(seconds=0.2, http__status_code=200, **http_old),
                    span(seconds=0.4, http__response__status_code=500, status=ERROR, **http_new),
                    span("internal", kind=INTERNAL, **http_new),  # not a server span
                    span("no-method", http__route="/api/x"),  # a server span that is not HTTP
                    span(
                        "SELECT orders",
                        kind=CLIENT,
                        seconds=0.01,
                        db__system="postgresql",
                        db__operation="SELECT",
                        db__sql__table="orders",
                        tenant__id="acme",
                    ),
                    span(
                        "find",
                        kind=CLIENT,
                        seconds=0.02,
                        db__system__name="mongodb",
                        db__operation__name="find",
                        db__collection__name="users",
                    ),
                    span("GET", kind=CLIENT, http__request__method="GET"),  # an HTTP client: neither
                ]
            )
        )
    )
    await conn.flush()
    pts = points(sink)
    assert {p.name for p in pts} == {
        "http_requests_total",
        "http_request_duration_seconds",
        "db_queries_total",
        "db_query_duration_seconds",
    }
    ok = one(pts, "http_requests_total", status_code="200")
    assert ok.labels == (
        ("method", "GET"),
        ("route", "/api/x"),
        ("status_code", "200"),
        ("tenant_id", "acme"),
    )
    assert ok.value == 2.0  # old and new conventions land in one series
    assert isinstance(dict(ok.labels)["status_code"], IntValue)  # the int attribute stays typed
    assert one(pts, "http_requests_total", status_code="500").value == 1.0
    duration = one(pts, "http_request_duration_seconds")  # no status_code: one series for both
    assert duration.labels == (("method", "GET"), ("route", "/api/x"), ("tenant_id", "acme"))
    assert duration.histogram is not None and duration.histogram.count == 3
    assert duration.histogram.max == pytest.approx(0.4)
    orders = one(pts, "db_queries_total", table="orders")
    assert orders.labels == (("query_type", "SELECT"), ("table", "orders"), ("tenant_id", "acme"))
    assert one(pts, "db_queries_total", table="users").labels == (("query_type", "find"), ("table", "users"))
    q = one(pts, "db_query_duration_seconds", table="orders").histogram
    assert q is not None and q.count == 1 and q.sum == pytest.approx(0.01)


async def test_metric_sets_filter_by_kind_and_attribute_and_may_use_span_intrinsics() -> None:
    config = SpanMetricsConfig(
        calls_and_duration=False,
        metric_sets=[
            MetricSetConfig(
                calls="rpc_calls_total",
                span_kinds=["SPAN_KIND_CLIENT", "SPAN_KIND_SERVER"],
                when_any=["rpc.system"],
                dimensions=[
                    DimensionConfig("span.name"),
                    DimensionConfig("status.code"),
                    DimensionConfig("span.kind"),
                ],
                renames={"span.name": "method", "status.code": "status", "span.kind": "kind"},
            )
        ],
    )
    conn, sink, _, _ = make(config)
    await conn.consume(
        batch(
            resource_spans(
                [
                    span("Get", kind=CLIENT, rpc__system="grpc"),
                    span("Get", kind=CLIENT, rpc__system="grpc", status=ERROR),
                    span("Get", kind=INTERNAL, rpc__system="grpc"),
                    span("Get", kind=CLIENT),
                ]
            )
        )
    )
    await conn.flush()
    pts = points(sink)
    assert [(p.labels, p.value) for p in pts] == [
        ((("kind", "SPAN_KIND_CLIENT"), ("method", "Get"), ("status", "STATUS_CODE_OK")), 1.0),
        ((("kind", "SPAN_KIND_CLIENT"), ("method", "Get"), ("status", "STATUS_CODE_ERROR")), 1.0),
    ]


async def test_series_beyond_max_series_go_to_one_counted_overflow_series() -> None:
    config = SpanMetricsConfig(dimensions=[DimensionConfig("http.route")], max_series=2)
    conn, sink, tel, _ = make(config)
    await conn.consume(
        batch(resource_spans([span(http__route=f"/r{i}", seconds=0.1 * (i + 1)) for i in range(5)]))
    )
    await conn.consume(batch(resource_spans([span(http__route="/r0"), span(http__route="/r4")])))
    await conn.flush()
    pts = points(sink)
    calls = by(pts, CALLS)
    assert sorted(p.value for p in calls) == [1.0, 2.0, 4.0]
    overflow = one(pts, CALLS, otel__metric__overflow="true")
    assert overflow.labels == (("otel.metric.overflow", "true"),) and overflow.value == 4.0
    assert one(pts, CALLS, http__route="/r0").value == 2.0
    assert sum(p.value for p in calls) == 7.0  # every span counted, overflow included
    overflow_hist = one(pts, DURATION, otel__metric__overflow="true").histogram
    assert overflow_hist is not None and overflow_hist.count == 4
    assert tel.value("spanmetrics_overflow_spans_total") == 4
    assert tel.value("connector_incoming_points_total") == 7


async def test_delta_sends_each_interval_and_forgets_idle_series() -> None:
    conn, sink, tel, clock = make(SpanMetricsConfig(dimensions=[DimensionConfig("http.route")]))
    first_start = int(clock.now * 1e9)
    await conn.consume(
        batch(resource_spans([span(http__route="/a"), span(http__route="/a"), span(http__route="/b")]))
    )
    clock.now += 15
    await conn.flush()
    first_end = int(clock.now * 1e9)
    a1 = one(points(sink), CALLS, http__route="/a")
    assert (a1.value, a1.start_time_unix_nano, a1.time_unix_nano) == (2.0, first_start, first_end)
    sink.batches.clear()
    await conn.consume(batch(resource_spans([span(http__route="/a")])))
    clock.now += 15
    await conn.flush()
    pts = points(sink)
    a2 = one(pts, CALLS, http__route="/a")
    assert (a2.value, a2.start_time_unix_nano) == (1.0, first_end)
    assert a2.temporality is Temporality.DELTA
    assert not by(pts, CALLS, http__route="/b")  # idle this interval: nothing sent
    assert tel.value("spanmetrics_series") == 1  # /a (calls and duration share it); /b is forgotten
    h = one(pts, DURATION, http__route="/a").histogram
    assert h is not None and h.count == 1
    sink.batches.clear()
    await conn.flush()
    assert sink.batches == []  # nothing counted, nothing sent


async def test_cumulative_sends_running_totals_of_every_series() -> None:
    config = SpanMetricsConfig(
        dimensions=[DimensionConfig("http.route")], aggregation_temporality="cumulative"
    )
    conn, sink, _, clock = make(config)
    start = int(clock.now * 1e9)
    await conn.consume(batch(resource_spans([span(http__route="/a", seconds=0.5), span(http__route="/b")])))
    clock.now += 15
    await conn.flush()
    sink.batches.clear()
    await conn.consume(batch(resource_spans([span(http__route="/a", seconds=2.0)])))
    clock.now += 15
    await conn.flush()
    pts = points(sink)
    a = one(pts, CALLS, http__route="/a")
    assert (a.value, a.start_time_unix_nano, a.temporality) == (2.0, start, Temporality.CUMULATIVE)
    assert one(pts, CALLS, http__route="/b").value == 1.0  # idle, still sent
    h = one(pts, DURATION, http__route="/a").histogram
    assert h is not None and (h.count, h.min, h.max) == (2, 0.5, 2.0)


async def test_explicit_buckets_count_each_duration_in_its_upper_bound_bucket() -> None:
    config = SpanMetricsConfig(histogram=HistogramConfig(explicit=ExplicitConfig(buckets=[0.1, 0.5, 1.0])))  # type: ignore[list-item]
    conn, sink, _, _ = make(config)
    await conn.consume(batch(resource_spans([span(seconds=s) for s in (0.1, 0.05, 0.3, 0.5, 2.0, 1.0)])))
    await conn.flush()
    d = one(points(sink), DURATION)
    assert d.histogram is None and d.explicit is not None
    e = d.explicit
    assert (e.bounds, e.counts) == ((0.1, 0.5, 1.0), (2, 2, 1, 1))
    assert (e.sum, e.min, e.max) == (pytest.approx(3.95), 0.05, 2.0)


@pytest.mark.parametrize("explicit", [False, True])
async def test_a_series_with_many_spans_folds_early_and_keeps_every_count(explicit: bool) -> None:
    histogram = (
        HistogramConfig(explicit=ExplicitConfig(buckets=[0.001, 0.01])) if explicit else HistogramConfig()
    )  # type: ignore[list-item]
    conn, sink, _, _ = make(SpanMetricsConfig(histogram=histogram))
    n = FOLD_AT * 2 + 7
    spans = [span(seconds=(i % 100 + 1) / 1000) for i in range(n)]
    await conn.consume(batch(resource_spans(spans[: n // 2])))
    await conn.consume(batch(resource_spans(spans[n // 2 :])))
    await conn.flush()
    assert one(points(sink), CALLS).value == n
    d = one(points(sink), DURATION)
    expected_sum = sum((i % 100 + 1) / 1000 for i in range(n))
    if explicit:
        assert (
            d.explicit is not None
            and d.explicit.count == n
            and d.explicit.counts[0] == sum(1 for i in range(n) if i % 100 == 0)
        )
        assert d.explicit.sum == pytest.approx(expected_sum)
    else:
        assert (
            d.histogram is not None
            and d.histogram.count == n
            and d.histogram.sum == pytest.approx(expected_sum)
        )
        assert (d.histogram.min, d.histogram.max) == (0.001, 0.1)


async def test_a_refused_delta_flush_is_sent_whole_with_the_next() -> None:
    sink = Sink(refuse_times=1)
    conn, sink, tel, clock = make(SpanMetricsConfig(), sink)
    start = int(clock.now * 1e9)
    await conn.consume(batch(resource_spans([span(seconds=0.1), span(seconds=0.2)])))
    clock.now += 15
    with pytest.raises(Backpressure):
        await conn.flush()
    await conn.consume(batch(resource_spans([span(seconds=0.3)])))
    clock.now += 15
    await conn.flush()
    calls = one(points(sink), CALLS)
    assert (calls.value, calls.start_time_unix_nano) == (3.0, start)
    h = one(points(sink), DURATION).histogram
    assert h is not None and h.count == 3 and h.sum == pytest.approx(0.6)
    assert tel.value("spanmetrics_refused_flushes_total") == 1
    assert tel.value("connector_outgoing_points_total") == 2


async def test_shutdown_flushes_what_is_held_once_and_is_idempotent() -> None:
    tel = Telemetry()
    sink = Sink()
    settings = component_settings(tel, ComponentKind.CONNECTOR, "spanmetrics")
    conn = SpanMetricsConnector(settings, SpanMetricsConfig(metrics_flush_interval=3600.0), sink)  # type: ignore[arg-type]
    await conn.start()
    await conn.consume(batch(resource_spans([span(), span()])))
    await conn.shutdown()
    await conn.shutdown()
    assert one(points(sink), CALLS).value == 2.0
    assert len(sink.batches) == 1


async def test_shutdown_before_start_sends_nothing() -> None:
    conn, sink, _, _ = make(SpanMetricsConfig())
    await conn.shutdown()
    assert sink.calls == 0


async def test_the_timer_flushes_every_interval() -> None:
    tel = Telemetry()
    sink = Sink()
    settings = component_settings(tel, ComponentKind.CONNECTOR, "spanmetrics")
    conn = SpanMetricsConnector(settings, SpanMetricsConfig(metrics_flush_interval=0.1), sink)  # type: ignore[arg-type]
    await conn.start()
    try:
        await conn.consume(batch(resource_spans([span()])))
        await wait_until(lambda: sink.batches, "a timed flush")
        await conn.consume(batch(resource_spans([span(), span()])))
        await wait_until(lambda: sum(p.value for p in by(points(sink), CALLS)) == 3.0, "the second flush")
    finally:
        await conn.shutdown()


async def test_negative_durations_count_as_zero() -> None:
    conn, sink, _, _ = make(SpanMetricsConfig())
    s = span()
    s.end_time_unix_nano = s.start_time_unix_nano - 5
    await conn.consume(batch(resource_spans([s])))
    await conn.flush()
    h = one(points(sink), DURATION).histogram
    assert h is not None and (h.count, h.zero_count, h.sum) == (1, 1, 0.0)


async def test_other_batches_are_ignored() -> None:
    conn, sink, tel, _ = make(SpanMetricsConfig())
    await conn.consume(MetricBatch(()))
    await conn.flush()
    assert sink.calls == 0 and tel.value("connector_incoming_points_total") == 0


def test_the_factory_is_a_traces_to_metrics_connector_with_a_valid_default() -> None:
    assert factory.kind is ComponentKind.CONNECTOR
    assert factory.signal_pairs == frozenset({(Signal.TRACES, Signal.METRICS)})
    assert validate_config(SpanMetricsConfig()) == []
    assert validate_config(SpanMetricsConfig(preset="red")) == []
    assert validate_config(SpanMetricsConfig(histogram=HistogramConfig(explicit=ExplicitConfig()))) == []


@pytest.mark.parametrize(
    ("config", "path", "words"),
    [
        (
            SpanMetricsConfig(
                histogram=HistogramConfig(exponential=ExponentialConfig(), explicit=ExplicitConfig())
            ),
            "histogram",
            "not both",
        ),
        (
            SpanMetricsConfig(histogram=HistogramConfig(exponential=ExponentialConfig(max_size=2))),
            "histogram::exponential::max_size",
            "at least 3",
        ),
        (
            SpanMetricsConfig(histogram=HistogramConfig(explicit=ExplicitConfig(buckets=[1.0, 0.5]))),
            "histogram::explicit::buckets",
            "increasing",
        ),  # type: ignore[list-item]
        (
            SpanMetricsConfig(histogram=HistogramConfig(explicit=ExplicitConfig(buckets=[]))),
            "histogram::explicit::buckets",
            "at least one",
        ),
        (SpanMetricsConfig(exemplars=ExemplarsConfig(enabled=True)), "exemplars::enabled", "not carried"),
        (SpanMetricsConfig(max_series=0), "max_series", "at least 1"),
        (SpanMetricsConfig(metrics_flush_interval=0.0), "metrics_flush_interval", "at least 100ms"),  # type: ignore[arg-type]
        (SpanMetricsConfig(calls_and_duration=False), "calls_and_duration", "emits nothing"),
        (SpanMetricsConfig(dimensions=[DimensionConfig("")]), "dimensions::0::name", "empty"),
        (SpanMetricsConfig(renames={"http.route": ""}), "renames::http.route", "give the label a name"),
        (SpanMetricsConfig(metric_sets=[MetricSetConfig()]), "metric_sets::0", "name calls, duration"),
        (
            SpanMetricsConfig(
                metric_sets=[MetricSetConfig(calls="c", duration="d", duration_exclude=["route"])]
            ),
            "metric_sets::0::duration_exclude::0",
            "'route' is not one of its labels",
        ),
    ],
)
def test_bad_config_is_refused_with_its_path(config: SpanMetricsConfig, path: str, words: str) -> None:
    problems = validate_config(config)
    assert any(p == path and words in m for p, m in problems), problems


async def test_duration_quantiles_stay_close_with_the_default_max_size() -> None:
    conn, sink, _, _ = make(SpanMetricsConfig())
    durations = [0.001 * 1.01**i for i in range(600)]  # 1 ms to ~390 ms: 8.6 octaves in 160 buckets
    await conn.consume(batch(resource_spans([span(seconds=d) for d in durations])))
    await conn.flush()
    h = one(points(sink), DURATION).histogram
    assert h is not None
    exact = sorted(durations)[math.ceil(0.99 * len(durations)) - 1]
    assert math.isclose(exphist.quantile(h, 0.99), exact, rel_tol=exphist.relative_error(h.scale) + 1e-9)


def test_a_yaml_config_decodes_into_the_collector_shaped_settings() -> None:
    from agent.component import ComponentId
    from agent.config import ConfigError, build_config, load_yaml
    from agent.registry import builtin_factories

    text = """
receivers:
  otlp: {http: "127.0.0.1:4318"}
connectors:
  spanmetrics:
    histogram: {explicit: {buckets: [5ms, 100ms, 1s]}}
    dimensions: [{name: http.route}, {name: deployment.environment, default: none}]
    renames: {http.route: route}
    preset: red
    aggregation_temporality: cumulative
    metrics_flush_interval: 30s
    metric_sets:
      - {calls: rpc_calls_total, span_kinds: [SPAN_KIND_CLIENT], when_any: [rpc.system],
         dimensions: [{name: rpc.method}], renames: {rpc.method: method}}
exporters:
  debug: {}
service:
  pipelines:
    traces: {receivers: [otlp], exporters: [spanmetrics]}
    metrics: {receivers: [spanmetrics], exporters: [debug]}
"""
    data, lines = load_yaml(text)
    config = build_config(data, builtin_factories(), lines)
    sm = config.connectors[ComponentId("spanmetrics")].config
    assert isinstance(sm, SpanMetricsConfig)
    assert sm.histogram.explicit is not None and list(sm.histogram.explicit.buckets) == [0.005, 0.1, 1.0]
    assert sm.dimensions[1] == DimensionConfig("deployment.environment", "none")
    assert dict(sm.renames) == {"http.route": "route"} and sm.preset == "red"
    assert sm.metrics_flush_interval == 30.0 and sm.aggregation_temporality == "cumulative"
    assert sm.metric_sets[0].span_kinds == ("SPAN_KIND_CLIENT",)
    bad = text.replace("buckets: [5ms, 100ms, 1s]", "buckets: [1s, 5ms]")
    data, lines = load_yaml(bad)
    with pytest.raises(
        ConfigError, match=r"connectors::spanmetrics::histogram::explicit::buckets.*increasing"
    ):
        build_config(data, builtin_factories(), lines)


class ReentrantSink(Sink):
    """Takes a flush's batch while more spans arrive (as they would while an exporter awaits)."""

    def __init__(self) -> None:
        super().__init__()
        self.during: list[SpanBatch] = []
        self.conn: SpanMetricsConnector | None = None

    async def consume(self, batch: Any) -> None:
        assert self.conn is not None
        while self.during:
            await self.conn.consume(self.during.pop())
        await super().consume(batch)


@pytest.mark.parametrize("refuse", [False, True])
async def test_spans_arriving_while_a_flush_is_handed_on_go_to_the_next_flush(refuse: bool) -> None:
    sink = ReentrantSink()
    conn, _, _, _ = make(SpanMetricsConfig(), sink)
    sink.conn = conn
    await conn.consume(batch(resource_spans([span(seconds=1.0)] * 3)))
    # more than FOLD_AT for the same series: folding them into what is being sent would lose them
    sink.during.append(batch(resource_spans([span(seconds=2.0)] * (FOLD_AT + 10))))
    sink.refuse_times = 1 if refuse else 0
    if refuse:
        with pytest.raises(Backpressure):
            await conn.flush()
    else:
        await conn.flush()
        assert one(points(sink), CALLS).value == 3.0
        sink.batches.clear()
    await conn.flush()
    calls = one(points(sink), CALLS)
    assert calls.value == (FOLD_AT + 10) + (3 if refuse else 0)
    h = one(points(sink), DURATION).histogram
    assert h is not None and h.count == calls.value and h.max == 2.0


async def test_the_authenticated_tenant_labels_every_metric_and_wins_over_a_tenant_attribute() -> None:
    conn, sink, _, _ = make(SpanMetricsConfig(preset="red"))
    http = {"http__request__method": "GET", "http__route": "/a", "http__response__status_code": 200}
    authenticated = SpanBatch(
        (resource_spans([span(tenant__id="someone-else", **http)]),), {"auth.tenant": "team-a"}, 1
    )
    await conn.consume(authenticated)
    await conn.consume(batch(resource_spans([span(tenant__id="acme", **http), span(**http)])))
    await conn.flush()
    pts = points(sink)
    assert one(pts, "http_requests_total", tenant_id="team-a").value == 1.0  # not someone-else's
    assert not by(pts, "http_requests_total", tenant_id="someone-else")
    assert one(pts, "http_requests_total", tenant_id="acme").value == 1.0  # unauthenticated: the attribute
    assert one(pts, CALLS, tenant_id="team-a").value == 1.0  # the Collector's metrics keep tenants apart too
    untenanted = [p for p in by(pts, CALLS) if "tenant_id" not in dict(p.labels)]
    assert len(untenanted) == 1 and untenanted[0].value == 2.0


async def test_an_empty_auth_tenant_label_leaves_the_context_tenant_out() -> None:
    conn, sink, _, _ = make(SpanMetricsConfig(auth_tenant_label=""))
    await conn.consume(SpanBatch((resource_spans([span()]),), {"auth.tenant": "team-a"}, 1))
    await conn.flush()
    assert all(k != "tenant_id" for k, _ in one(points(sink), CALLS).labels)


async def test_cumulative_series_without_spans_expire_and_restart_from_zero() -> None:
    config = SpanMetricsConfig(
        dimensions=[DimensionConfig("http.route")],
        aggregation_temporality="cumulative",
        metrics_expiration=20.0,  # type: ignore[arg-type]
    )
    conn, sink, tel, clock = make(config)

    async def interval(*routes: str) -> dict[str, Point]:
        await conn.consume(batch(resource_spans([span(http__route=r) for r in routes])))
        clock.now += 15
        sink.batches.clear()
        await conn.flush()
        return {dict(p.labels)["http.route"]: p for p in by(points(sink), CALLS)}

    assert {r: p.value for r, p in (await interval("/a", "/b")).items()} == {"/a": 1.0, "/b": 1.0}
    assert {r: p.value for r, p in (await interval("/a")).items()} == {"/a": 2.0, "/b": 1.0}  # idle 15 s
    assert {r: p.value for r, p in (await interval("/a")).items()} == {"/a": 3.0, "/b": 1.0}  # then gone
    assert tel.value("spanmetrics_series") == 1
    came_back_ns = int(clock.now * 1e9)
    again = await interval("/b")
    assert again["/b"].value == 1.0 and again["/b"].start_time_unix_nano == came_back_ns
    assert again["/a"].value == 3.0
