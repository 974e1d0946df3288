"""Per-point size limits (agent/limits.py, the ``limits:`` block), control characters and nesting depth
in the OTLP and JSON (``http``) receivers, over real clients: the OpenTelemetry SDK's exporters (gRPC
and HTTP), grpc.aio and aiohttp with requests built from the opentelemetry-proto classes, for what the
SDK cannot produce. The conversion rules themselves are in test_otlp_convert.py."""

from __future__ import annotations

import asyncio
import json
import logging
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

from agent.component import ComponentId, ComponentKind, Settings, Signal
from agent.config import load_yaml
from agent.confmodel import Decoder
from agent.limits import REASONS, SeriesLimits
from agent.model import Batch, MetricBatch, Point
from agent.telemetry import ComponentTelemetry, Telemetry
from receivers.http import HttpConfig
from receivers.http import factory as http_factory
from receivers.otlp import OtlpConfig
from receivers.otlp import factory as otlp_factory
from receivers.otlp.convert import ShadowMetricsRequest

PROTO = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}
METRICS_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
T = 1_700_000_000_000_000_000


class Sink:
    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def consume(self, batch: Batch) -> None:
        self.batches.append(batch)

    @property
    def points(self) -> list[Point]:
        return [p for b in self.batches if isinstance(b, MetricBatch) for p in b.points]

    def names(self) -> list[str]:
        return [p.name for p in self.points]


@dataclass
class Harness:
    receiver: Any
    sink: Sink
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


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[Harness] = []

    async def build(kind: str = "otlp", **cfg: Any) -> Harness:
        config: Any
        if kind == "otlp":
            config = OtlpConfig(**{"grpc": "127.0.0.1:0", "http": "127.0.0.1:0", **cfg})
            factory, signals = otlp_factory, (Signal.METRICS, Signal.TRACES)
        else:
            config = HttpConfig(**{"endpoint": "127.0.0.1:0", **cfg})
            factory, signals = http_factory, (Signal.METRICS,)
        assert config.validate() == []
        tel = Telemetry()
        sink = Sink()
        settings = Settings(
            id=ComponentId(kind),
            kind=ComponentKind.RECEIVER,
            telemetry=ComponentTelemetry(tel, "receiver", kind),
            logger=logging.getLogger(f"test.{kind}"),
        )
        receiver = factory.create(settings, config, {s: sink for s in signals})
        harness = Harness(receiver, sink, tel, aiohttp.ClientSession())
        made.append(harness)
        await receiver.start()
        return harness

    yield build
    for h in made:
        await h.session.close()
        await h.receiver.shutdown()


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
    assert [(p.name, p.value) for p in h.sink.points] == [("ok", 0.0), ("bad", 0.0)]


# -- each limit, from the limits: block -------------------------------------------------------------------
LIMITS = SeriesLimits(
    max_name_length=20, max_labels=4, max_label_name_length=12, max_label_value_length=16, max_series_bytes=60
)


@pytest.mark.parametrize(
    ("metric", "reason"),
    [
        (gauge("n" * 21), "name_too_long"),
        (gauge("m", {"a": "1", "b": "2", "c": "3", "d": "4"}), "too_many_labels"),  # + service.name
        (gauge("m", {"k" * 13: "1"}), "label_name_too_long"),
        (gauge("m", {"a": "v" * 17}), "label_value_too_long"),
        (gauge("m" * 10, {"a": "v" * 16, "b": "v" * 16}), "series_too_large"),  # + service.name, lib
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


async def test_resource_and_scope_attributes_count_towards_the_series(make: Make) -> None:
    h = await make(limits=LIMITS)
    req = request(gauge("a", {"x": "1"}), resource={"service.name": "s", "k1": "1", "k2": "2"})
    request(gauge("b", {"x": "1"}, {}), resource={"service.name": "s"}, scope={"s1": "1", "s2": "2"}, req=req)
    request(gauge("c", {"x": "1"}), resource={"service.name": "s" * 17}, req=req)
    request(gauge("d", {}, {}, {}), resource={f"r{i}": "1" for i in range(5)}, req=req)
    response = await h.export(req)
    # a: 3 resource + 1 point attributes = 4, fine. b: 1 + 2 scope + 1 = 4 fine, and without point
    # attributes also fine. c: the resource's value is too long. d: 5 resource attributes.
    assert h.sink.names() == ["a", "b", "b"]
    assert h.refused("label_value_too_long") == 1 and h.refused("too_many_labels") == 3
    message = response.partial_success.error_message
    assert response.partial_success.rejected_data_points == 4
    assert "resource 2: a label value is over the limit of 16 bytes" in message
    assert "resource 3: the label count is over the limit of 4 labels (limits::max_labels) (3 data" in message


async def test_a_point_over_the_label_count_only_with_the_resource_is_refused(make: Make) -> None:
    h = await make(limits=LIMITS)
    resource = {"service.name": "s", "r": "1", "q": "2"}
    req = request(gauge("m", {"a": "1", "b": "2"}, {"a": "1"}), resource=resource)
    response = await h.export(req)
    assert [p.labels for p in h.sink.points] == [(("a", "1"),)]
    assert "counting the resource's and the scope's attributes" in response.partial_success.error_message
    # The same attributes under a smaller resource are fine: the first answer was not cached...
    await h.export(request(gauge("m", {"a": "1", "b": "2"}), resource={"service.name": "s"}))
    assert [p.labels for p in h.sink.points][-1] == (("a", "1"), ("b", "2"))
    # ...and, now that they are cached, a hit under the larger resource is still checked.
    response = await h.export(req)
    assert response.partial_success.rejected_data_points == 1 and len(h.sink.points) == 3


async def test_control_characters_in_values_are_kept(make: Make) -> None:
    h = await make()
    await h.export(request(gauge("m", {"sql": "select 1\n\tfrom t", "raw": "a\x00b\x1b"})))
    assert h.sink.points[0].labels == (("raw", "a\x00b\x1b"), ("sql", "select 1\n\tfrom t"))
    assert h.refused("control_character") == 0


async def test_limits_block_is_read_from_yaml_and_validated() -> None:
    data, _ = load_yaml("limits: {max_labels: 3, max_series_bytes: 1KiB}\n")
    decoder = Decoder(lambda _: None)
    config = decoder.decode(OtlpConfig, data, ("receivers", "otlp"))
    assert decoder.errors == []
    assert config.limits == SeriesLimits(max_labels=3, max_series_bytes=1024)  # type: ignore[arg-type]
    decoder.decode(HttpConfig, load_yaml("limits: {max_label_count: 3}\n")[0], ("receivers", "http"))
    assert [path for path, _ in decoder.errors] == [("receivers", "http", "limits", "max_label_count")]
    assert OtlpConfig(limits=SeriesLimits(max_labels=0)).validate() == [
        ("limits::max_labels", "must be between 1 and 16777216")
    ]
    assert HttpConfig(limits=SeriesLimits(max_name_length=0)).validate() == [
        ("limits::max_name_length", "must be between 1 and 16777216")
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
    assert h.refused(code) == 1 and [p.value for p in h.sink.points] == [1.0, 3.0]


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
    assert h.sink.points[0].labels == (("query", "select 1\n\tfrom t"),)
