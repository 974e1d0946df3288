"""A batch the remote-write exporter refuses (full_policy: block, its queue full) changes no series:
the client resends it once the queue drains, and its counter increments are counted once, not twice.
With tenant routing, a batch naming a tenant whose queue is full is refused whole: no tenant's series
change, and a batch naming only other tenants still passes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from agent.component import Backpressure, ComponentKind
from agent.confmodel import Duration
from agent.model import Kind, MetricBatch, Point
from agent.sending import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from exporters.prometheus_remote_write import (
    PrometheusRemoteWriteConfig,
    PrometheusRemoteWriteExporter,
    RemoteWriteTenantRoutingConfig,
    remote_pb2,
    wire,
)
from tests.conftest import component_settings, wait_until
from tests.exporters.conftest import Gate, serve


class Backend(Gate):
    """A remote-write endpoint that holds every request while ``open`` is clear, then keeps its
    samples per tenant (X-Scope-OrgID) and series name."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        await self.passage()
        tenant = request.headers.get("X-Scope-OrgID", "")
        write = remote_pb2.WriteRequest.FromString(wire.decompress(body))  # type: ignore[attr-defined]
        for ts in write.timeseries:
            name = next(lb.value for lb in ts.labels if lb.name == "__name__")
            self.samples.setdefault((tenant, name), []).extend(s.value for s in ts.samples)
        self.requests += 1
        return web.Response(status=204)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    app = web.Application()
    app.router.add_post("/api/v1/write", b.handle)
    runner, b.port = await serve(app)
    yield b
    b.open.set()
    await runner.cleanup()


Make = Callable[..., PrometheusRemoteWriteExporter]


@pytest.fixture
async def make(backend: Backend) -> AsyncIterator[Make]:
    made: list[PrometheusRemoteWriteExporter] = []

    def build(tenant: RemoteWriteTenantRoutingConfig | None = None) -> PrometheusRemoteWriteExporter:
        cfg = PrometheusRemoteWriteConfig(
            endpoint=f"http://127.0.0.1:{backend.port}/api/v1/write",
            retry_on_failure=RetryConfig(initial_interval=Duration(0.01), max_interval=Duration(0.05)),
            sending_queue=QueueConfig(queue_size=1, full_policy="block"),
            tenant=tenant,
        )
        assert cfg.validate() == []
        settings = component_settings(
            Telemetry(),
            ComponentKind.EXPORTER,
            "prometheus_remote_write",
            logger="test.prw.refused",
            shutdown_timeout_s=5.0,
        )
        exp = PrometheusRemoteWriteExporter(settings, cfg)
        made.append(exp)
        return exp

    yield build
    for exp in made:
        await exp.shutdown()


def increment(name: str, *labels: tuple[str, str]) -> Point:
    """A StatsD-style counter increment of 1 (delta)."""
    now = time.time_ns()
    return Point(name, Kind.SUM, tuple(sorted(labels)), now, value=1.0, start_time_unix_nano=now - 10**9)


async def fill(exp: PrometheusRemoteWriteExporter, backend: Backend, *labels: tuple[str, str]) -> None:
    """Close the backend and fill the queue (size 1): one request held in sending, one queued."""
    backend.open.clear()
    await exp.consume(MetricBatch((increment("first", *labels),)))
    await wait_until(lambda: backend.waiting == 1, "the first request held by the backend")
    await exp.consume(MetricBatch((increment("second", *labels),)))


async def test_a_refused_batch_resent_after_the_queue_drains_counts_once(
    make: Make, backend: Backend
) -> None:
    exp = make()
    await exp.start()
    await fill(exp, backend)
    refused = MetricBatch((increment("hits"), increment("misses")))
    for _ in range(3):  # the client resends while the queue stays full
        with pytest.raises(Backpressure):
            await exp.consume(refused)

    backend.open.set()
    await wait_until(lambda: backend.requests == 2, "first and second sent")
    await exp.consume(refused)  # the resend, taken now
    await wait_until(lambda: backend.requests == 3, "the resend sent")
    assert backend.samples[("", "hits_total")] == [1.0]
    assert backend.samples[("", "misses_total")] == [1.0]


async def test_a_tenant_with_a_full_queue_keeps_its_series_unchanged(make: Make, backend: Backend) -> None:
    exp = make(RemoteWriteTenantRoutingConfig(label="tenant"))
    await exp.start()
    await fill(exp, backend, ("tenant", "full"))
    batch = MetricBatch((increment("hits", ("tenant", "free")), increment("hits", ("tenant", "full"))))
    for _ in range(2):  # tenant "full" refuses the batch whole, resent while it stays full
        with pytest.raises(Backpressure):
            await exp.consume(batch)
    await exp.consume(MetricBatch((increment("misses", ("tenant", "free")),)))  # "free" alone passes

    backend.open.set()
    await wait_until(lambda: backend.requests == 3, "first, second and free's misses sent")
    assert ("free", "hits_total") not in backend.samples
    await exp.consume(batch)  # the resend, taken whole now
    await wait_until(lambda: backend.requests == 5, "the resend sent, one request per tenant")
    assert backend.samples[("free", "hits_total")] == [1.0]
    assert backend.samples[("full", "hits_total")] == [1.0]
