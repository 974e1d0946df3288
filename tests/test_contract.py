"""One contract over every registered component: the default config validates; create → start →
consume → shutdown works (twice-safe); the component's self-metrics move.

A new component type must add its stimulus here, or the test fails and says so.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from agent import exphist
from agent.component import ComponentKind, Factory, Signal, validate_config
from agent.model import Kind, LogBatch, MetricBatch, Point, SpanBatch
from agent.registry import builtin_factories
from agent.telemetry import Telemetry
from exporters.otlp.config import OtlpConfig
from tests.conftest import LOOP_BLOCK_LIMIT_S, Sink, component_settings, free_port, wait_until
from tests.exporters.otlp_sink import Sink as OtlpSink

pytestmark = pytest.mark.loop_block_limit(LOOP_BLOCK_LIMIT_S)

FACTORIES = builtin_factories()


def sample_batch() -> MetricBatch:
    now = time.time_ns()
    h = exphist.from_values(np.array([0.1, 0.2, 0.4]))
    return MetricBatch(
        (
            Point("c.hits", Kind.SUM, (("env", "dev"),), now, value=3.0, start_time_unix_nano=now - 10**9),
            Point("g.temp", Kind.GAUGE, (), now, value=21.5),
            Point("t.latency", Kind.HISTOGRAM, (), now, histogram=h, unit="s"),
        )
    )


# -- per-type stimulus: (config for this test, drive the component, the self-metric that must move) --


async def drive_statsd(component: Any, config: Any, sink: Sink) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"hits:1|c\nlat:5|ms\nbad", ("127.0.0.1", int(config.udp.rsplit(":", 1)[1])))
    await wait_until(lambda: len(sink.points()) >= 2, "the two good lines flushed")


async def drive_http(component: Any, config: Any, sink: Sink) -> None:
    import aiohttp

    url = f"http://{config.endpoint}/v1/metrics"
    body = [{"name": "hits", "value": 1, "type": "counter"}, {"name": "bad"}]
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["accepted"] == 1 and answer["rejected"] == 1
    assert len(sink.points()) == 1


async def drive_otlp(component: Any, config: Any, sink: Sink) -> None:
    import aiohttp
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

    request = metrics_service_pb2.ExportMetricsServiceRequest()
    metric = request.resource_metrics.add().scope_metrics.add().metrics.add(name="hits")
    metric.gauge.data_points.add(as_double=1.5, time_unix_nano=time.time_ns())
    bad = request.resource_metrics[0].scope_metrics[0].metrics.add(name="")  # refused: no name
    bad.gauge.data_points.add(as_double=1.0)
    url = f"http://{config.http}/v1/metrics"
    headers = {"Content-Type": "application/x-protobuf"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=request.SerializeToString(), headers=headers) as resp,
    ):
        assert resp.status == 200
        answer = metrics_service_pb2.ExportMetricsServiceResponse.FromString(await resp.read())
    assert answer.partial_success.rejected_data_points == 1
    assert [p.name for p in sink.points()] == ["hits"]


async def drive_exporter(component: Any, config: Any, sink: Sink) -> None:
    await component.consume(sample_batch())


async def drive_processor(component: Any, config: Any, sink: Sink) -> None:
    """A processor takes the sample batch; what it passes on depends on the processor."""
    await component.consume(sample_batch())


async def drive_spans(component: Any, config: Any, sink: Sink) -> None:
    """A traces → metrics connector takes one span and hands on metrics (at the latest on shutdown)."""
    from opentelemetry.proto.trace.v1 import trace_pb2

    rs = trace_pb2.ResourceSpans()
    rs.scope_spans.add().spans.add(name="GET /", start_time_unix_nano=1, end_time_unix_nano=2)
    await component.consume(SpanBatch((rs,), span_count=1))


async def drive_logs(component: Any, config: Any, sink: Sink) -> None:
    """A logs → metrics connector takes one log record and hands on metrics."""
    from opentelemetry.proto.logs.v1 import logs_pb2

    rl = logs_pb2.ResourceLogs()
    rl.scope_logs.add().log_records.add(severity_text="INFO").body.string_value = "started"
    await component.consume(LogBatch((rl,), record_count=1))
    assert sink.points(), "no metrics came of the log record"


class RemoteWriteSink:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            self.bodies.append(await request.read())
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/api/v1/write", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


class Peers:
    """The servers exporters send to in this test: a remote-write sink and an OTLP sink (HTTP and gRPC)."""

    def __init__(self) -> None:
        self.rw = RemoteWriteSink()
        self.otlp = OtlpSink()
        self.otlp_http = self.otlp_grpc = ""

    async def start(self) -> None:
        await self.rw.start()
        self.otlp_http = await self.otlp.start_http()
        self.otlp_grpc = await self.otlp.start_grpc()

    async def stop(self) -> None:
        await self.rw.stop()
        await self.otlp.stop()


R, P, E = ComponentKind.RECEIVER.value, ComponentKind.PROCESSOR.value, ComponentKind.EXPORTER.value
C = ComponentKind.CONNECTOR.value
PROCESSED = "headwater_processor_incoming_points_total"
STIMULUS: dict[
    tuple[str, str], tuple[Callable[[Any, Peers], Any], Callable[[Any, Any, Sink], Awaitable[None]], str]
] = {
    (R, "statsd"): (
        lambda cfg, _: replace(cfg, udp=f"127.0.0.1:{free_port()}", flush_interval=0.1),
        drive_statsd,
        "headwater_receiver_accepted_points_total",
    ),
    (R, "http"): (
        lambda cfg, _: replace(cfg, endpoint=f"127.0.0.1:{free_port()}"),
        drive_http,
        "headwater_receiver_accepted_points_total",
    ),
    (R, "otlp"): (
        lambda cfg, _: replace(cfg, http=f"127.0.0.1:{free_port()}", grpc=None),
        drive_otlp,
        "headwater_receiver_accepted_points_total",
    ),
    (P, "tenant"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "sample"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "percentiles"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "anomaly"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "drift"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "aggregate"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "threshold"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "filter"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "attributes"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "batch"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "memory_limiter"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (P, "cardinality"): (lambda cfg, _: cfg, drive_processor, PROCESSED),
    (E, "prometheus"): (
        lambda cfg, _: replace(cfg, endpoint=f"127.0.0.1:{free_port()}"),
        drive_exporter,
        "headwater_exporter_sent_points_total",
    ),
    (E, "prometheus_remote_write"): (
        lambda cfg, peers: replace(cfg, endpoint=f"http://127.0.0.1:{peers.rw.port}/api/v1/write"),
        drive_exporter,
        "headwater_exporter_sent_points_total",
    ),
    (E, "otlp"): (
        lambda cfg, peers: replace(cfg, endpoint=peers.otlp_grpc, tls=replace(cfg.tls, insecure=True)),
        drive_exporter,
        "headwater_exporter_sent_points_total",
    ),
    (E, "otlp_http"): (
        lambda cfg, peers: replace(cfg, endpoint=peers.otlp_http),
        drive_exporter,
        "headwater_exporter_sent_points_total",
    ),
    (E, "debug"): (lambda cfg, _: cfg, drive_exporter, "headwater_exporter_sent_points_total"),
    (E, "loadbalancing"): (
        lambda cfg, peers: replace(
            cfg,
            protocol=replace(cfg.protocol, otlp=OtlpConfig(tls=replace(OtlpConfig().tls, insecure=True))),
            resolver=replace(cfg.resolver, static=replace(cfg.resolver.static, hostnames=[peers.otlp_grpc])),
        ),
        drive_exporter,
        "headwater_loadbalancer_routed_points_total",
    ),
    (C, "forward"): (lambda cfg, _: cfg, drive_processor, "headwater_connector_incoming_points_total"),
    (C, "spanmetrics"): (lambda cfg, _: cfg, drive_spans, "headwater_connector_incoming_points_total"),
    (C, "logmetrics"): (lambda cfg, _: cfg, drive_logs, "headwater_connector_incoming_points_total"),
}
KEYS = sorted((kind.value, type_) for kind, type_ in FACTORIES)


def factory(key: tuple[str, str]) -> Factory:
    return FACTORIES[(ComponentKind(key[0]), key[1])]


@pytest.mark.parametrize("key", KEYS, ids=[f"{k}:{t}" for k, t in KEYS])
def test_default_config_validates(key: tuple[str, str]) -> None:
    assert validate_config(factory(key).config_class()) == []


def test_every_component_has_a_stimulus() -> None:
    missing = sorted(set(KEYS) - set(STIMULUS))
    assert not missing, f"add a contract stimulus for: {missing}"


@pytest.mark.parametrize("key", KEYS, ids=[f"{k}:{t}" for k, t in KEYS])
async def test_lifecycle_and_self_metrics(key: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    f = factory(key)
    type_ = key[1]
    tel = Telemetry()
    make_config, drive, metric = STIMULUS[key]
    peers = Peers()
    await peers.start()
    try:
        config = make_config(f.config_class(), peers)
        assert validate_config(config) == []
        sink = Sink()
        settings = component_settings(
            tel, f.kind, f.type, logger=f"contract.{f.type}", shutdown_timeout_s=5.0
        )

        def create() -> Any:
            if f.kind is ComponentKind.RECEIVER:
                return f.create(settings, config, {Signal.METRICS: sink})
            if f.kind in (ComponentKind.PROCESSOR, ComponentKind.CONNECTOR):
                return f.create(settings, config, sink)
            return f.create(settings, config)

        component = create()
        await component.shutdown()  # safe before start
        component = create()
        await component.start()
        await drive(component, config, sink)
        await component.shutdown()
        await component.shutdown()  # idempotent
        name = metric.removeprefix("headwater_")
        assert tel.value(name) > 0, f"{metric} did not move for {type_}"
        from prometheus_client import generate_latest

        assert metric.encode() in generate_latest(tel.registry)
        if type_ == "prometheus_remote_write":
            assert peers.rw.bodies, "nothing reached the remote-write sink"
        if type_.startswith(("otlp", "loadbalancing")) and f.kind is ComponentKind.EXPORTER:
            assert len(peers.otlp.metrics()) == 3, "the sample batch did not reach the OTLP sink"
    finally:
        await peers.stop()
