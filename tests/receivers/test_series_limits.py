"""Per-point size limits (agent/limits.py, the ``limits:`` block), control characters and nesting depth
in the OTLP and JSON (``http``) receivers, over real clients: the OpenTelemetry SDK's exporters (gRPC
and HTTP), grpc.aio and aiohttp with requests built from the opentelemetry-proto classes, for what the
SDK cannot produce. The conversion rules themselves are in test_otlp_convert.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.internal.encoder import _VarintBytes
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2 as mpb
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from agent.component import ComponentKind, Settings, Signal
from agent.config import load_yaml
from agent.confmodel import Decoder, Duration, Size
from agent.limits import REASONS, SeriesLimits
from agent.model import Batch
from agent.sending import RetryConfig
from agent.telemetry import Telemetry
from exporters.otlp.config import OtlpHttpConfig
from exporters.otlp.http import OtlpHttpExporter
from exporters.prometheus import PrometheusConfig, PrometheusExporter
from receivers.http import HttpConfig
from receivers.http import factory as http_factory
from receivers.otlp import OtlpConfig
from receivers.otlp import factory as otlp_factory
from receivers.otlp.convert import POINT_REASONS, ShadowMetricsRequest
from tests.conftest import Sink, component_settings, free_port, wait_until
from tests.exporters.otlp_sink import Sink as OtlpSink
from tests.receivers.conftest import Running

PROTO = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}
METRICS_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
T = 1_700_000_000_000_000_000
FAST_RETRY = RetryConfig(
    initial_interval=Duration(0.01), max_interval=Duration(0.05), max_elapsed_time=Duration(10.0)
)


class ForwardingSink(Sink):
    """Keeps every batch, then hands it to ``downstream`` consumers (exporters) in order."""

    def __init__(self, *downstream: Any) -> None:
        super().__init__()
        self.downstream = downstream

    async def consume(self, batch: Batch) -> None:
        await super().consume(batch)
        for consumer in self.downstream:
            await consumer.consume(batch)

    def names(self) -> list[str]:
        return [p.name for p in self.points()]


@dataclass
class Harness:
    receiver: Any
    sink: ForwardingSink
    tel: Telemetry
    session: aiohttp.ClientSession

    def url(self, signal: str = "metrics") -> str:
        port = getattr(self.receiver, "http_port", None) or self.receiver.port
        return f"http://127.0.0.1:{port}/v1/{signal}"

    def refused(self, reason: str) -> float:
        return self.tel.value("receiver_refused_points_total", reason=reason)

    def accepted(self) -> float:
        return self.tel.value("receiver_accepted_points_total")

    async def post(self, data: bytes, headers: dict[str, str], signal: str = "metrics") -> tuple[int, bytes]:
        async with self.session.post(self.url(signal), data=data, headers=headers) as resp:
            return resp.status, await resp.read()

    async def export(self, req: Any) -> ExportMetricsServiceResponse:
        """Post a metrics request as protobuf; the 200 answer."""
        status, body = await self.post(req.SerializeToString(), PROTO)
        assert status == 200, body
        return ExportMetricsServiceResponse.FromString(body)


Make = Callable[..., Awaitable[Harness]]


def exporter_settings(tel: Telemetry, name: str) -> Settings:
    return component_settings(tel, ComponentKind.EXPORTER, name, shutdown_timeout_s=10.0)


@pytest.fixture
async def make(running: Running) -> AsyncIterator[Make]:

    async def build(kind: str = "otlp", downstream: tuple[Any, ...] = (), **cfg: Any) -> Harness:
        config: Any
        if kind == "otlp":
            config = OtlpConfig(**{"grpc": "127.0.0.1:0", "http": "127.0.0.1:0", **cfg})
            factory, signals = otlp_factory, (Signal.METRICS, Signal.TRACES)
        else:
            config = HttpConfig(**{"endpoint": "127.0.0.1:0", **cfg})
            factory, signals = http_factory, (Signal.METRICS,)
        assert config.validate() == []
        tel = Telemetry()
        sink = ForwardingSink(*downstream)
        settings = component_settings(tel, ComponentKind.RECEIVER, kind)
        receiver = factory.create(settings, config, {s: sink for s in signals})
        return Harness(receiver, sink, tel, await running.start(receiver))

    yield build


def kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def gauge(name: str, *attribute_sets: dict[str, str], **fields: str) -> mpb.Metric:
    """A gauge with one point (value = its index) per attribute set."""
    m = mpb.Metric(name=name, **fields)
    for i, attrs in enumerate(attribute_sets or ({},)):
        dp = m.gauge.data_points.add(time_unix_nano=T, as_double=float(i))
        dp.attributes.extend(kv(k, v) for k, v in attrs.items())
    return m


def request(
    *metrics: mpb.Metric,
    resource: dict[str, str] | None = None,
    scope: dict[str, str] | None = None,
    req: ExportMetricsServiceRequest | None = None,
) -> ExportMetricsServiceRequest:
    """``metrics`` under one more resource (and scope) of ``req``."""
    req = req if req is not None else ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(kv(k, v) for k, v in (resource or {"service.name": "shop"}).items())
    sm = rm.scope_metrics.add()
    sm.scope.name = "lib"
    sm.scope.attributes.extend(kv(k, v) for k, v in (scope or {}).items())
    sm.metrics.extend(metrics)
    return req


# -- serialized KeyValues nested past the protobuf parser's depth limit (the classes cannot build them)
def _field(number: int, payload: bytes) -> bytes:
    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(payload)) + payload


def nested_kvlist(levels: int) -> bytes:
    """A serialized KeyValue ``deep`` whose value is ``levels`` kvlists inside each other."""
    value = _field(1, b"x")  # AnyValue.string_value
    for _ in range(levels):
        value = _field(6, _field(1, _field(1, b"k") + _field(2, value)))  # kvlist_value.values[0]
    return _field(1, b"deep") + _field(2, value)


def nested_array(levels: int) -> bytes:
    value = _field(1, b"x")
    for _ in range(levels):
        value = _field(5, _field(1, value))  # array_value.values[0]
    return _field(1, b"deep") + _field(2, value)


def with_raw_attribute(req: ExportMetricsServiceRequest, metric: int, raw: bytes) -> bytes:
    """``req`` serialized with ``raw`` (a serialized KeyValue) added to the first point of a metric."""
    shadow = ShadowMetricsRequest.FromString(req.SerializeToString())
    dp = shadow.resource_metrics[0].scope_metrics[0].metrics[metric].gauge.data_points[0]
    dp.attributes.append(raw)
    return bytes(shadow.SerializeToString())


# -- the OpenTelemetry SDK as the peer --------------------------------------------------------------------
def _sdk_export(transport: str, target: str, big_value: str) -> None:
    """Export, with the SDK's own exporter, ``orders`` (fine) and ``uploads`` whose attribute is
    ``big_value`` (blocking: run in a thread)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    exporter: Any
    if transport == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        exporter = GrpcExporter(endpoint=target, insecure=True, timeout=10)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        exporter = HttpExporter(endpoint=target, timeout=10)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(resource=Resource.create({"service.name": "checkout"}), metric_readers=[reader])
    meter = provider.get_meter("test.meter")
    meter.create_counter("orders").add(3, {"region": "eu"})
    meter.create_counter("uploads").add(1, {"file": big_value})
    meter.create_histogram("upload.size").record(5.0, {"region": "eu"})
    assert provider.force_flush(10_000)
    provider.shutdown()


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_sdk_attribute_over_the_limit_refuses_its_point_and_keeps_the_export(
    make: Make, transport: str
) -> None:
    h = await make()
    target = f"127.0.0.1:{h.receiver.grpc_port}" if transport == "grpc" else h.url()
    await asyncio.to_thread(_sdk_export, transport, target, "f" * 10_000)
    assert sorted(h.sink.names()) == ["orders", "upload.size"]
    assert h.refused("label_value_too_long") == 1
    assert h.accepted() == 2
    # Within the limit the same export is taken whole.
    await asyncio.to_thread(_sdk_export, transport, target, "f" * 4096)
    assert sorted(h.sink.names()) == ["orders", "orders", "upload.size", "upload.size", "uploads"]
    assert h.refused("label_value_too_long") == 1


async def test_partial_success_over_grpc_names_the_limit_and_where(make: Make) -> None:
    h = await make()
    req = request(gauge("ok", {"a": "1"}), gauge("bad", {"a": "1"}, {"a": "v" * 5000}))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.receiver.grpc_port}") as channel:
        call = channel.unary_unary(
            METRICS_EXPORT,
            request_serializer=ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )
        response = await call(req, timeout=10)
    partial = response.partial_success
    assert partial.rejected_data_points == 1
    assert partial.error_message == (
        '1 data point(s) rejected: metric "bad" data point 1: a label value is over the limit of 4096 '
        "bytes (limits::max_label_value_length) (resource 0, scope 0, metric 1)"
    )
    assert [(p.name, p.value) for p in h.sink.points()] == [("ok", 0.0), ("bad", 0.0)]


# -- each limit, from the limits: block -------------------------------------------------------------------
LIMITS = SeriesLimits(
    max_name_length=20, max_labels=4, max_label_name_length=12, max_label_value_length=16, max_series_bytes=60
)


@pytest.mark.parametrize(
    ("metric", "reason"),
    [
        (gauge("n" * 21), "name_too_long"),
        (gauge("m", {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}), "too_many_labels"),
        (gauge("m", {"k" * 13: "1"}), "label_name_too_long"),
        (gauge("m", {"a": "v" * 17}), "label_value_too_long"),
        (gauge("m" * 20, {"a": "v" * 16, "b": "v" * 16, "c": "v" * 6}), "series_too_large"),  # 61 bytes
        (gauge("esc\x1b[2J"), "control_character"),
        (gauge("m", {"nul\x00": "1"}), "control_character"),
        (gauge("m", unit="u" * 64), "invalid_unit"),
        (gauge("m", description="d" * 4097), "invalid_description"),
    ],
)
async def test_each_limit_refuses_its_point_only(make: Make, metric: mpb.Metric, reason: str) -> None:
    h = await make(limits=LIMITS)
    response = await h.export(request(gauge("before", {"a": "1"}), metric, gauge("after")))
    assert h.sink.names() == ["before", "after"]
    assert response.partial_success.rejected_data_points == 1
    assert h.refused(reason) == 1 and h.accepted() == 2
    assert "(resource 0, scope 0, metric 1)" in response.partial_success.error_message


async def test_resource_and_scope_are_not_series_labels_but_bounded_in_bytes(make: Make) -> None:
    h = await make(limits=dataclasses.replace(LIMITS, max_resource_bytes=Size(200)))
    # Four point attributes (the limit) under a resource and scope of many labels, long values.
    resource = {"service.name": "s", "cmd.line": "java " + "x" * 100, "r1": "1", "r2": "2"}  # 5 labels
    req = request(gauge("a", {"w": "1", "x": "2", "y": "3", "z": "4"}), resource=resource, scope={"s1": "1"})
    request(gauge("b", {"x": "1"}), resource={"service.name": "s", "blob": "x" * 200}, req=req)
    request(
        gauge("c", {}, {}), resource={"service.name": "s", "blob": "x" * 150}, scope={"s": "y" * 50}, req=req
    )
    request(gauge("d"), resource={"service.name": "s", "k" * 13: "1"}, req=req)
    response = await h.export(req)
    assert h.sink.names() == ["a"]
    assert h.refused("resource_too_large") == 3 and h.refused("label_name_too_long") == 1
    assert response.partial_success.rejected_data_points == 4
    assert response.partial_success.error_message == (
        "4 data point(s) rejected: resource 1: the resource is 217 bytes: the resource plus scope "
        "(attributes, scope name and version) is over the limit of 200 bytes (limits::max_resource_bytes) "
        "(1 data point(s)); resource 2, scope 0: the resource and this scope are 221 bytes: the resource "
        "plus scope (attributes, scope name and version) is over the limit of 200 bytes "
        "(limits::max_resource_bytes) (2 data point(s)); resource 3: the attribute key "
        f'"{"k" * 13}" is 13 bytes long: a label name is over the limit of 12 bytes '
        "(limits::max_label_name_length) (1 data point(s))"
    )
    point = h.sink.points()[0]
    assert point.resource is not None and dict(point.resource.attributes) == resource


# -- resources: an app under the OpenTelemetry Java agent -------------------------------------------------
def java_agent_resource() -> dict[str, Any]:
    """Resource attributes like the OpenTelemetry Java agent's for a Spring Boot app: the whole command
    line (a long classpath: over 20 KB) and its 300 arguments, with service.name and instance id."""
    classpath = ":".join(f"/app/BOOT-INF/lib/dependency-{i:03d}-2.7.18.jar" for i in range(300))
    options = [f"-Dapp.setting.{i:03d}=value-{i:03d}" for i in range(295)]
    java, agent = "/usr/lib/jvm/java-17-openjdk/bin/java", "-javaagent:/otel/opentelemetry-javaagent.jar"
    args = (java, agent, *options, "-cp", classpath, "com.example.shop.Application")
    return {
        "service.name": "checkout",
        "service.instance.id": "checkout-7d9f-1",
        "process.command_line": " ".join(args),
        "process.command_args": args,
    }


def _sdk_export_java_app(transport: str, target: str, resource: dict[str, Any]) -> None:
    """Export a few instruments with the SDK's own exporter, ``resource`` set on the MeterProvider."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    exporter: Any
    if transport == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        exporter = GrpcExporter(endpoint=target, insecure=True, timeout=10)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        exporter = HttpExporter(endpoint=target, timeout=10)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(resource=Resource.create(resource), metric_readers=[reader])
    meter = provider.get_meter("io.opentelemetry.spring-webmvc-6.0", "2.10.0")
    orders = meter.create_counter("orders")
    orders.add(3, {"region": "eu"})
    orders.add(2, {"region": "us"})
    meter.create_histogram("http.server.request.duration", unit="s").record(0.25, {"http.route": "/cart"})
    meter.create_up_down_counter("jobs.queued").add(7)
    assert provider.force_flush(10_000)
    provider.shutdown()


def _any_value(v: AnyValue) -> Any:
    """An AnyValue as Python: arrays as lists; a JSON-rendered array (a string) as the list it holds."""
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if which == "string_value" and v.string_value.startswith("["):
        return json.loads(v.string_value)
    return getattr(v, which) if which else None


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_a_java_agent_resource_is_taken_and_exported_whole(make: Make, transport: str) -> None:
    """Resource attributes are not series labels: a 20 KB command line is over max_label_value_length
    and max_series_bytes, yet every point is taken; the Prometheus page gets job/instance only, the
    OTLP backend the whole resource."""
    resource = java_agent_resource()
    assert len(resource["process.command_line"]) > 20_000 and len(resource["process.command_args"]) == 300
    tel = Telemetry()
    backend = OtlpSink()
    prometheus_config = PrometheusConfig(endpoint=f"127.0.0.1:{free_port()}")
    prometheus = PrometheusExporter(exporter_settings(tel, "prometheus"), prometheus_config)
    otlp = OtlpHttpExporter(
        exporter_settings(tel, "otlp_http"),
        OtlpHttpConfig(endpoint=await backend.start_http(), retry_on_failure=FAST_RETRY),
    )
    await prometheus.start()
    await otlp.start()
    try:
        h = await make(downstream=(prometheus, otlp))
        target = f"127.0.0.1:{h.receiver.grpc_port}" if transport == "grpc" else h.url()
        await asyncio.to_thread(_sdk_export_java_app, transport, target, resource)

        assert h.accepted() == 4
        assert {r: h.refused(r) for r in POINT_REASONS if h.refused(r)} == {}
        assert sorted(h.sink.names()) == ["http.server.request.duration", "jobs.queued", "orders", "orders"]
        for point in h.sink.points():
            assert point.resource is not None
            got = dict(point.resource.attributes)
            assert got["process.command_line"] == resource["process.command_line"]

        async with h.session.get(f"http://{prometheus_config.endpoint}/metrics") as answer:
            page = await answer.text()
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(page)
            for s in family.samples
        }
        who = {("job", "checkout"), ("instance", "checkout-7d9f-1")}
        assert samples[("orders_total", frozenset({*who, ("region", "eu")}))] == 3
        assert samples[("orders_total", frozenset({*who, ("region", "us")}))] == 2
        assert samples[("jobs_queued", frozenset(who))] == 7
        assert "process" not in page and len(page) < 10_000  # no resource attribute became a label

        def exported() -> list[Any]:
            return [
                rm for r in backend.received if r.signal == "metrics" for rm in r.message.resource_metrics
            ]

        def points(rms: list[Any]) -> int:
            return sum(
                len(getattr(m, m.WhichOneof("data")).data_points)
                for rm in rms
                for sm in rm.scope_metrics
                for m in sm.metrics
            )

        await wait_until(lambda: points(exported()) == 4, "points(exported()) == 4")
        for rm in exported():
            sent = {kv.key: kv.value for kv in rm.resource.attributes}
            assert sent["process.command_line"].string_value == resource["process.command_line"]
            assert _any_value(sent["process.command_args"]) == list(resource["process.command_args"])
    finally:
        await otlp.shutdown()
        await prometheus.shutdown()
        await backend.stop()


async def test_a_resource_over_max_resource_bytes_refuses_its_points_only(make: Make) -> None:
    h = await make()
    req = request(gauge("kept.before", {"a": "1"}), resource={"service.name": "a"})
    request(
        gauge("dropped", {"a": "1"}, {"a": "2"}),
        resource={"service.name": "b", "blob": "x" * 100_000},
        req=req,
    )
    request(gauge("kept.after"), resource={"service.name": "c", "blob": "x" * 60_000}, req=req)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.receiver.grpc_port}") as channel:
        call = channel.unary_unary(
            METRICS_EXPORT,
            request_serializer=ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )
        response = await call(req, timeout=10)
    assert response.partial_success.rejected_data_points == 2
    assert response.partial_success.error_message == (
        "2 data point(s) rejected: resource 1: the resource is 100017 bytes: the resource plus scope "
        "(attributes, scope name and version) is over the limit of 65536 bytes (limits::max_resource_bytes) "
        "(2 data point(s))"
    )
    assert h.sink.names() == ["kept.before", "kept.after"]
    assert h.refused("resource_too_large") == 2 and h.accepted() == 2


async def test_ten_mib_attributes_are_refused_on_resources_scopes_and_points(make: Make) -> None:
    """The hostile case of issue 10 (60 requests of 10 MiB labels took 941 MB): each is refused."""
    h = await make()
    filler = "x" * (10 * 2**20)
    for where in ("resource", "scope", "point"):
        req = request(gauge("fine"), resource={"service.name": "ok"})
        if where == "point":
            request(gauge("big", {"v": filler}), req=req)
        else:
            request(gauge("big"), req=req, **{where: {"service.name": "big", "v": filler}})
        response = await h.export(req)
        assert response.partial_success.rejected_data_points == 1, where
    assert h.refused("resource_too_large") == 2 and h.refused("label_value_too_long") == 1
    assert h.sink.names() == ["fine"] * 3


async def test_control_characters_in_values_are_kept(make: Make) -> None:
    h = await make()
    await h.export(request(gauge("m", {"sql": "select 1\n\tfrom t", "raw": "a\x00b\x1b"})))
    assert h.sink.points()[0].labels == (("raw", "a\x00b\x1b"), ("sql", "select 1\n\tfrom t"))
    assert h.refused("control_character") == 0


async def test_limits_block_is_read_from_yaml_and_validated() -> None:
    data, _ = load_yaml("limits: {max_labels: 3, max_series_bytes: 1KiB, max_resource_bytes: 1MiB}\n")
    decoder = Decoder(lambda _: None)
    config = decoder.decode(OtlpConfig, data, ("receivers", "otlp"))
    assert decoder.errors == []
    assert config.limits == SeriesLimits(
        max_labels=3, max_series_bytes=Size(1024), max_resource_bytes=Size(2**20)
    )
    decoder.decode(HttpConfig, load_yaml("limits: {max_label_count: 3}\n")[0], ("receivers", "http"))
    assert [path for path, _ in decoder.errors] == [("receivers", "http", "limits", "max_label_count")]
    assert OtlpConfig(limits=SeriesLimits(max_labels=0)).validate() == [
        ("limits::max_labels", "must be between 1 and 16777216")
    ]
    assert HttpConfig(limits=SeriesLimits(max_name_length=0)).validate() == [
        ("limits::max_name_length", "must be between 1 and 16777216")
    ]
    assert OtlpConfig(limits=SeriesLimits(max_resource_bytes=Size(2**26 + 1))).validate() == [
        ("limits::max_resource_bytes", "must be between 1B and 64MiB")
    ]


async def test_every_limit_reason_is_exported_at_zero_before_it_happens(make: Make) -> None:
    for kind in ("otlp", "http"):
        h = await make(kind)
        names = {
            s.labels.get("reason")
            for m in h.tel.collect()
            if m.name.endswith("receiver_refused_points")
            for s in m.samples
        }
        assert set(REASONS) | {"control_character"} <= names, kind
        assert ("resource_too_large" in names) == (kind == "otlp")


# -- depth -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "deepest_accepted"), [(nested_kvlist, 33), (nested_array, 49)])
async def test_attributes_nested_past_the_parser_limit_are_refused_as_too_deep(
    make: Make, build: Callable[[int], bytes], deepest_accepted: int
) -> None:
    h = await make()
    for levels in (deepest_accepted, deepest_accepted + 1, 50 if build is nested_kvlist else 80):
        req = request(gauge("nested"), gauge("plain"))
        status, body = await h.post(with_raw_attribute(req, 0, build(levels)), PROTO)
        assert status == 200
        partial = ExportMetricsServiceResponse.FromString(body).partial_success
        if levels == deepest_accepted:
            assert partial.rejected_data_points == 0
            continue
        assert partial.rejected_data_points == 1
        assert partial.error_message == (
            '1 data point(s) rejected: metric "nested" data point 0: attributes are nested more than '
            "100 protobuf messages deep (the parser's limit: at most 33 nested kvlists or 49 nested "
            "arrays) (resource 0, scope 0, metric 0)"
        )
    assert h.refused("attributes_too_deep") == 2 and h.refused("invalid_attributes") == 0
    assert h.sink.names() == ["nested", "plain", "plain", "plain"]


def _deep_json_metrics(levels: int) -> bytes:
    value: dict[str, Any] = {"stringValue": "x"}
    for _ in range(levels):
        value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    doc = json_format.MessageToDict(request(gauge("nested"), gauge("plain")))
    doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["gauge"]["dataPoints"][0]["attributes"] = [
        {"key": "deep", "value": value}
    ]
    return json.dumps(doc).encode()


async def test_otlp_json_depth_is_refused_per_point_then_per_request_saying_depth(make: Make) -> None:
    h = await make()
    status, body = await h.post(_deep_json_metrics(50), JSON)
    assert status == 200
    partial = json.loads(body)["partialSuccess"]
    assert partial["rejectedDataPoints"] == "1" and "100 protobuf messages deep" in partial["errorMessage"]
    assert h.sink.names() == ["plain"]
    # Past twice the protobuf limit the JSON parser refuses the request whole, still saying depth.
    status, body = await h.post(_deep_json_metrics(70), JSON)
    assert status == 400
    message = json.loads(body)["message"]
    assert message == (
        "the body is not a valid ExportMetricsServiceRequest (OTLP/JSON): nested more than 200 messages "
        "deep (the OTLP/JSON parser's limit for this signal)"
    )
    status, body = await h.post(b"[" * 100_000, JSON)
    assert status == 400 and "nested deeper than the decoder allows" in json.loads(body)["message"]


def trace_request(levels: int) -> bytes:
    """An ExportTraceServiceRequest of one span whose attribute nests ``levels`` kvlists."""
    span = Span(name="s", trace_id=b"\x01" * 16, span_id=b"\x02" * 8).SerializeToString()
    span += _field(9, nested_kvlist(levels))  # Span.attributes
    return _field(1, _field(2, _field(2, span)))  # resource_spans[0].scope_spans[0].spans[0]


async def test_deep_span_attributes_refuse_the_trace_request_saying_depth(make: Make) -> None:
    h = await make()
    status, _ = await h.post(trace_request(3), PROTO, signal="traces")
    assert status == 200 and len(h.sink.batches) == 1
    status, answer = await h.post(trace_request(40), PROTO, signal="traces")
    assert status == 400
    message = status_pb2.Status.FromString(answer).message
    assert message == (
        "the body is not a valid ExportTraceServiceRequest (protobuf): nested more than 100 messages "
        "deep (the protobuf parser's limit)"
    )
    assert len(h.sink.batches) == 1


# -- the JSON (http) receiver ------------------------------------------------------------------------------
async def post_items(h: Harness, items: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    status, body = await h.post(json.dumps(items).encode(), JSON)
    return status, json.loads(body)


@pytest.mark.parametrize(
    ("item", "code", "reason"),
    [
        (
            {"name": "n" * 21},
            "name_too_long",
            "name: is 21 bytes long; the limit is 20 (limits::max_name_length)",
        ),
        (
            {"name": "m", "tags": {f"k{i}": "v" for i in range(5)}},
            "too_many_labels",
            "tags: has 5 labels; the limit is 4 (limits::max_labels)",
        ),
        ({"name": "m", "tags": {"k" * 13: "v"}}, "label_name_too_long", "(limits::max_label_name_length)"),
        ({"name": "m", "labels": {"k": "é" * 9}}, "label_value_too_long", "labels.k: is 18 bytes long"),
        (
            {"name": "m" * 20, "tags": {"a": "v" * 16, "b": "v" * 16, "c": "v" * 6}},
            "series_too_large",
            "tags: the name and labels come to more than 60 bytes (limits::max_series_bytes)",
        ),
        ({"name": "esc\x1b"}, "control_character", 'name: "esc\\u001b" holds a control character'),
        ({"name": "m", "tags": {"a\x7f": "v"}}, "control_character", "tags: label name"),
    ],
)
async def test_json_items_over_a_limit_are_refused_with_index_and_reason(
    make: Make, item: dict[str, Any], code: str, reason: str
) -> None:
    h = await make("http", limits=LIMITS)
    status, body = await post_items(
        h, [{"name": "ok", "value": 1}, {**item, "value": 2}, {"name": "ok", "value": 3}]
    )
    assert status == 200 and body["accepted"] == 2
    assert len(body["errors"]) == 1
    error = body["errors"][0]
    assert error["index"] == 1 and error["code"] == code and reason in error["reason"], error
    assert h.refused(code) == 1 and [p.value for p in h.sink.points()] == [1.0, 3.0]


async def test_json_label_values_keep_tabs_and_newlines_and_default_limits_apply(make: Make) -> None:
    h = await make("http")
    status, body = await post_items(
        h,
        [
            {"name": "m", "value": 1, "tags": {"query": "select 1\n\tfrom t"}},
            {"name": "m", "value": 2, "tags": {"k": "v" * 4097}},
            {"name": "m", "value": 3, "tags": {f"k{i}": "v" * 125 for i in range(128)}},  # over 16 KiB
        ],
    )
    assert status == 200 and [e["code"] for e in body["errors"]] == [
        "label_value_too_long",
        "series_too_large",
    ]
    assert h.sink.points()[0].labels == (("query", "select 1\n\tfrom t"),)
