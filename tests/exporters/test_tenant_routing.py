"""Per-tenant routing in the remote-write and OTLP exporters: headers, URLs, queues, isolation."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from agent.component import ComponentKind, Settings, validate_config
from agent.model import Kind, MetricBatch, Point, SpanBatch
from agent.sending import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from exporters.otlp.config import OtlpHttpConfig, OtlpTenantRoutingConfig
from exporters.otlp.http import OtlpHttpExporter
from exporters.prometheus_remote_write import (
    PrometheusRemoteWriteConfig,
    PrometheusRemoteWriteExporter,
    RemoteWriteTenantRoutingConfig,
    remote_pb2,
    wire,
)
from processors.tenant import TenantConfig, TenantProcessor
from tests.conftest import component_settings, wait_until
from tests.exporters.conftest import serve
from tests.exporters.otlp_sink import Sink

FAST = RetryConfig(initial_interval=0.01, max_interval=0.05, max_elapsed_time=0)


class Receiver:
    """A remote-write endpoint recording (path, headers, series) and failing for some tenants."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], remote_pb2.WriteRequest]] = []
        self.failing: set[str] = set()
        self.refused: dict[str, int] = {}
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        tenant = request.headers.get("X-Scope-OrgID") or request.match_info.get("tenant", "")
        body = await request.read()
        if tenant in self.failing:
            self.refused[tenant] = self.refused.get(tenant, 0) + 1
            return web.Response(status=503, text="tenant's ingester is down")
        msg = remote_pb2.WriteRequest.FromString(wire.decompress(body))
        self.requests.append((request.path, dict(request.headers), msg))
        return web.Response(status=204)

    def series_by_tenant(self) -> dict[str, list[dict[str, str]]]:
        out: dict[str, list[dict[str, str]]] = {}
        for path, headers, msg in self.requests:
            tenant = headers.get("X-Scope-OrgID", path)
            for ts in msg.timeseries:
                out.setdefault(tenant, []).append({lb.name: lb.value for lb in ts.labels})
        return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/api/v1/push", rec.handle)
    app.router.add_post("/t/{tenant}/api/v1/push", rec.handle)
    runner, rec.port = await serve(app)
    yield rec
    await runner.cleanup()


def settings(tel: Telemetry, kind: ComponentKind, type_: str) -> Settings:
    return component_settings(tel, kind, type_, shutdown_timeout_s=0.5)


def remote_write(
    receiver: Receiver, tel: Telemetry, routing: RemoteWriteTenantRoutingConfig | None, **kw: Any
) -> PrometheusRemoteWriteExporter:
    config = PrometheusRemoteWriteConfig(
        endpoint=f"http://127.0.0.1:{receiver.port}/api/v1/push", tenant=routing, retry_on_failure=FAST, **kw
    )
    assert validate_config(config) == []
    return PrometheusRemoteWriteExporter(
        settings(tel, ComponentKind.EXPORTER, "prometheus_remote_write"), config
    )


def counter(name: str, tenant: str | None = None, **labels: str) -> Point:
    if tenant is not None:
        labels["tenant_id"] = tenant
    return Point(name, Kind.SUM, tuple(sorted(labels.items())), time.time_ns(), value=1.0)


async def test_a_failing_tenant_does_not_delay_a_healthy_one(receiver: Receiver) -> None:
    """End to end: the tenant processor labels by X-Scope-OrgID, remote-write routes per tenant; the
    backend answers 503 for tenant "down" only."""
    receiver.failing.add("down")
    tel = Telemetry()
    exporter = remote_write(receiver, tel, RemoteWriteTenantRoutingConfig(header="X-Scope-OrgID"))
    processor = TenantProcessor(settings(tel, ComponentKind.PROCESSOR, "tenant"), TenantConfig(), exporter)
    await exporter.start()
    try:
        # The failing tenant first, so its requests are queued (and retried) before the healthy ones.
        await processor.consume(MetricBatch((counter("a"), counter("b")), context={"x-scope-orgid": "down"}))
        await wait_until(lambda: receiver.refused.get("down", 0) >= 2)  # it is retrying
        for i in range(5):
            await processor.consume(MetricBatch((counter(f"m{i}"),), context={"x-scope-orgid": "up"}))
        await wait_until(lambda: len(receiver.series_by_tenant().get("up", [])) == 5)
        # While "up" got everything, "down" is still stuck retrying with its points queued.
        assert "down" not in receiver.series_by_tenant()
        assert tel.value("exporter_tenant_sent_points_total", tenant="down") == 0
        assert tel.value("exporter_tenant_failed_points_total", tenant="down") >= 4
        assert tel.value("exporter_tenant_sent_points_total", tenant="up") == 5
        refused_before = receiver.refused["down"]
        await wait_until(lambda: receiver.refused["down"] > refused_before)  # and keeps retrying
        receiver.failing.clear()
        await wait_until(lambda: len(receiver.series_by_tenant().get("down", [])) == 2)
    finally:
        await exporter.shutdown()
    up = receiver.series_by_tenant()["up"]
    assert all(s["tenant_id"] == "up" for s in up)
    for _, headers, _ in receiver.requests:
        assert headers["X-Scope-OrgID"] in ("up", "down")


async def test_url_template_drop_label_context_and_default(receiver: Receiver) -> None:
    tel = Telemetry()
    routing = RemoteWriteTenantRoutingConfig(
        header="",
        url_template=f"http://127.0.0.1:{receiver.port}/t/{{tenant}}/api/v1/push",
        drop_label=True,
        default="fallback",
    )
    exporter = remote_write(receiver, tel, routing)
    await exporter.start()
    try:
        # The label wins over the context; the context over the default.
        await exporter.consume(
            MetricBatch((counter("x", "t1"), counter("x"), counter("y")), context={"tenant": "t2"})
        )
        await exporter.consume(MetricBatch((counter("z"),)))
        await wait_until(lambda: sum(len(m.timeseries) for _, _, m in receiver.requests) == 4)
    finally:
        await exporter.shutdown()
    got = {
        path: sorted(s["__name__"] for s in series) for path, series in receiver.series_by_tenant().items()
    }
    assert got == {
        "/t/t1/api/v1/push": ["x_total"],
        "/t/t2/api/v1/push": ["x_total", "y_total"],
        "/t/fallback/api/v1/push": ["z_total"],
    }
    assert all("tenant_id" not in s for series in receiver.series_by_tenant().values() for s in series)


async def test_same_series_of_two_tenants_keep_separate_cumulative_totals(receiver: Receiver) -> None:
    tel = Telemetry()
    exporter = remote_write(receiver, tel, RemoteWriteTenantRoutingConfig(drop_label=True))
    await exporter.start()
    try:
        for _ in range(3):
            await exporter.consume(MetricBatch((counter("hits"),), context={"tenant": "a"}))
        await exporter.consume(MetricBatch((counter("hits"),), context={"tenant": "b"}))
        await wait_until(lambda: len(receiver.requests) == 4)
    finally:
        await exporter.shutdown()
    last: dict[str, float] = {}
    for _, headers, msg in receiver.requests:
        for ts in msg.timeseries:
            last[headers["X-Scope-OrgID"]] = ts.samples[-1].value
    assert last == {"a": 3.0, "b": 1.0}


async def test_invalid_and_excess_tenants_are_dropped_and_counted(receiver: Receiver) -> None:
    tel = Telemetry()
    exporter = remote_write(receiver, tel, RemoteWriteTenantRoutingConfig(max_tenants=1))
    await exporter.start()
    try:
        await exporter.consume(MetricBatch((counter("a", "ok"), counter("b", "bad\r\nX-Evil: 1"))))
        await exporter.consume(MetricBatch((counter("c", "second"),)))
        await exporter.consume(MetricBatch((counter("d"),)))  # no tenant: the exporter's own queue
        await wait_until(lambda: len(receiver.requests) == 2)
    finally:
        await exporter.shutdown()
    assert tel.value("exporter_dropped_points_total", reason="invalid_tenant") == 1
    assert tel.value("exporter_dropped_points_total", reason="tenant_limit") == 1
    assert sorted(h.get("X-Scope-OrgID", "-") for _, h, _ in receiver.requests) == ["-", "ok"]


async def test_disk_queue_partitions_per_tenant_and_backlogs_reopen(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.failing.add("b")
    queue = QueueConfig(storage="disk", directory=str(tmp_path), max_bytes=1 << 20)
    tel = Telemetry()
    exporter = remote_write(receiver, tel, RemoteWriteTenantRoutingConfig(), sending_queue=queue)
    await exporter.start()
    try:
        await exporter.consume(MetricBatch((counter("x", "a"),)))
        await exporter.consume(MetricBatch((counter("x", "b"),)))
        await wait_until(lambda: len(receiver.requests) == 1 and receiver.refused.get("b", 0) >= 1)
    finally:
        await exporter.shutdown()
    assert sorted(d for d in os.listdir(tmp_path) if (tmp_path / d).is_dir()) == [
        "prometheus_remote_write",
        "prometheus_remote_write@a",
        "prometheus_remote_write@b",
    ]
    # The next run sends b's backlog at start, before b sends anything new.
    receiver.failing.clear()
    exporter = remote_write(receiver, Telemetry(), RemoteWriteTenantRoutingConfig(), sending_queue=queue)
    await exporter.start()
    try:
        await wait_until(lambda: "b" in receiver.series_by_tenant())
    finally:
        await exporter.shutdown()


def test_routing_config_validation() -> None:
    bad = PrometheusRemoteWriteConfig(
        headers={"x-scope-orgid": "fixed"},
        tenant=RemoteWriteTenantRoutingConfig(
            url_template="http://mimir/api/v1/push", label="tenant.id", default=".."
        ),
    )
    paths = {p for p, _ in validate_config(bad)}
    assert paths == {"tenant::url_template", "tenant::label", "tenant::default", "tenant::header"}


async def test_otlp_http_header_and_resource_attribute_per_tenant() -> None:
    sink = Sink()
    endpoint = await sink.start_http()
    tel = Telemetry()
    config = OtlpHttpConfig(
        endpoint=endpoint,
        compression="none",
        resource_from_environment=False,
        retry_on_failure=FAST,
        tenant=OtlpTenantRoutingConfig(header="X-Scope-OrgID"),
    )
    assert validate_config(config) == []
    exporter = OtlpHttpExporter(settings(tel, ComponentKind.EXPORTER, "otlp_http"), config)
    await exporter.start()
    try:
        await exporter.consume(MetricBatch((counter("m", "t1"), counter("m")), context={"tenant": "t2"}))
        rs = ResourceSpans()
        rs.scope_spans.add().spans.add(name="s", trace_id=bytes(range(16)), span_id=bytes(8))
        await exporter.consume(SpanBatch((rs,), context={"tenant": "t3"}, span_count=1))
        await wait_until(lambda: len(sink.received) == 3)
    finally:
        await exporter.shutdown()
        await sink.stop()
    seen = {}
    for rec in sink.received:
        resources = rec.message.resource_metrics if rec.signal == "metrics" else rec.message.resource_spans
        (res,) = resources
        attrs = {kv.key: kv.value.string_value for kv in res.resource.attributes}
        seen[rec.headers["X-Scope-OrgID"]] = (rec.signal, attrs["tenant.id"])
    assert seen == {"t1": ("metrics", "t1"), "t2": ("metrics", "t2"), "t3": ("traces", "t3")}
    assert rs.resource.attributes == []  # the batch's message was not touched
