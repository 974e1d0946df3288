"""A batch naming several tenants is refused whole when one of their queues is full (``full_policy:
block``): the exporter's admission check asks the queues of the tenants the batch names before any of
them takes its part, so a client resending the refused batch never duplicates the other tenants' data.
Batches naming only other tenants still pass.

The agent runs in process, built from config with the built-in components: the JSON ``http`` receiver
(a real aiohttp client sends and resends after 429) into ``otlp_http`` or ``prometheus_remote_write``
with a queue per tenant; the backend is an aiohttp server that decodes what it gets with the generated
classes and answers 503 to the tenants it is told to refuse.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from agent.component import Backpressure, ComponentKind
from agent.confmodel import Duration
from agent.model import Kind, MetricBatch, Point
from agent.sending import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from exporters.otlp.config import OtlpHttpConfig, OtlpTenantRoutingConfig
from exporters.otlp.http import OtlpHttpExporter
from exporters.prometheus_remote_write import remote_pb2, wire
from tests.conftest import AgentGraph, component_settings, free_port, wait_until
from tests.exporters.conftest import Gate, serve

QUEUE = {"queue_size": 1, "full_policy": "block"}
RETRY = {"initial_interval": "10ms", "max_interval": "50ms", "max_elapsed_time": "0s"}


class Backend(Gate):
    """OTLP/HTTP and remote-write endpoints keeping every (tenant, metric name) of each point they
    accept, duplicates included; tenants in ``refusing`` get 503 and nothing is kept. While ``open``
    is clear every request waits (``waiting`` counts them)."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[str, str]] = []
        self.refusing: set[str] = set()
        self.refused = 0
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        await self.passage()
        tenant = request.headers.get("X-Scope-OrgID", "")
        if tenant in self.refusing:
            self.refused += 1
            return web.Response(status=503)
        if request.path == "/v1/metrics":
            message = ms.ExportMetricsServiceRequest.FromString(body)
            for rm in message.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        self.got += [(tenant, metric.name)] * len(metric.gauge.data_points)
            return web.Response(
                body=ms.ExportMetricsServiceResponse().SerializeToString(),
                content_type="application/x-protobuf",
            )
        write = remote_pb2.WriteRequest.FromString(wire.decompress(body))
        for series in write.timeseries:
            name = next(label.value for label in series.labels if label.name == "__name__")
            self.got += [(tenant, name)] * len(series.samples)
        return web.Response(status=204)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    found = Backend()
    app = web.Application()
    app.router.add_post("/v1/metrics", found.handle)
    app.router.add_post("/api/v1/write", found.handle)
    runner, found.port = await serve(app)
    yield found
    found.open.set()
    await runner.cleanup()


@pytest.fixture
async def graph() -> AsyncIterator[AgentGraph]:
    built = AgentGraph()
    yield built
    await built.close()


def exporter(kind: str, port: int) -> dict[str, Any]:
    if kind == "otlp_http":
        return {
            "endpoint": f"http://127.0.0.1:{port}",
            "compression": "none",
            "tenant": {"header": "X-Scope-OrgID"},
            "sending_queue": QUEUE,
            "retry_on_failure": RETRY,
        }
    return {
        "endpoint": f"http://127.0.0.1:{port}/api/v1/write",
        "tenant": {},
        "sending_queue": QUEUE,
        "retry_on_failure": RETRY,
    }


def items(points: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """JSON items: one gauge per (tenant, name)."""
    return [{"name": name, "value": 1, "type": "gauge", "tags": {"tenant_id": t}} for t, name in points]


@pytest.mark.parametrize("kind", ["otlp_http", "prometheus_remote_write"])
async def test_a_batch_is_refused_whole_when_one_of_its_tenants_queues_is_full(
    kind: str, backend: Backend, graph: AgentGraph
) -> None:
    port = free_port()
    await graph.start(
        {
            "receivers": {"http": {"endpoint": f"127.0.0.1:{port}"}},
            "exporters": {kind: exporter(kind, backend.port)},
            "service": {
                "shutdown_timeout": "2s",
                "pipelines": {"metrics": {"receivers": ["http"], "exporters": [kind]}},
            },
        }
    )
    url = f"http://127.0.0.1:{port}/v1/metrics"
    backend.refusing.add("a")
    refusals = 0

    async with aiohttp.ClientSession() as session:

        async def send(points: list[tuple[str, str]]) -> bool:
            """One attempt: True if taken, False if refused with backpressure (429, Retry-After)."""
            nonlocal refusals
            async with session.post(url, json=items(points)) as resp:
                body = await resp.json()
                if resp.status == 429:
                    assert body["code"] == "backpressure" and resp.headers["Retry-After"], body
                    refusals += 1
                    return False
                assert resp.status == 200 and body["accepted"] == len(points), body
                return True

        # 1. Tenant a's backend refuses: a's queue fills (one request retried, one waiting) until a
        # batch of a's is refused.
        taken: list[tuple[str, str]] = []
        for i in range(10):
            only_a = [("a", f"a_only{i}")]
            if not await send(only_a):
                break
            taken += only_a
        assert refusals == 1, "tenant a's queue never filled"
        await wait_until(lambda: backend.refused > 0, "tenant a's backend refusing")

        # 2. Tenant b alone still passes: its queue is its own.
        assert await send([("b", "b_alone")])
        taken.append(("b", "b_alone"))

        # 3. A batch naming b (first) and a is refused, and resent while a stays full: each time
        # nothing of it is taken, b's part included.
        mixed = [("b", "b_mixed0"), ("b", "b_mixed1"), ("a", "a_mixed")]
        for _ in range(3):
            assert not await send(mixed)
        await wait_until(lambda: ("b", "b_alone") in backend.got, "b's own batch delivered")
        assert ("b", "b_mixed0") not in backend.got

        # 4. a's backend takes again: once a's queue has drained, the resent batch is taken whole.
        backend.refusing.clear()
        await wait_until(lambda: all(p in backend.got for p in taken), "a's queue drained")
        assert await send(mixed)
        want = taken + mixed
        await wait_until(lambda: all(p in backend.got for p in want), "every point delivered")

    assert refusals == 4
    assert collections.Counter(backend.got) == collections.Counter(want), "a point is missing or twice"


def gauge(tenant: str, name: str) -> Point:
    return Point(name, Kind.GAUGE, (("tenant_id", tenant),), time.time_ns(), value=1.0)


async def test_called_without_a_fan_out_the_exporter_asks_the_tenants_queues_itself(backend: Backend) -> None:
    config = OtlpHttpConfig(
        endpoint=f"http://127.0.0.1:{backend.port}",
        compression="none",
        tenant=OtlpTenantRoutingConfig(header="X-Scope-OrgID"),
        sending_queue=QueueConfig(queue_size=1, full_policy="block"),
        retry_on_failure=RetryConfig(initial_interval=Duration(0.01), max_interval=Duration(0.05)),
    )
    assert config.validate() == []
    exp = OtlpHttpExporter(
        component_settings(Telemetry(), ComponentKind.EXPORTER, "otlp_http", shutdown_timeout_s=2.0), config
    )
    await exp.start()
    try:
        # Tenant a's queue fills: one request held by the backend, one waiting.
        backend.open.clear()
        await exp.consume(MetricBatch((gauge("a", "a_first"),)))
        await wait_until(lambda: backend.waiting == 1, "a's first request held by the backend")
        await exp.consume(MetricBatch((gauge("a", "a_second"),)))

        mixed = MetricBatch((gauge("b", "b_mixed"), gauge("a", "a_mixed")))
        for _ in range(2):
            with pytest.raises(Backpressure):
                await exp.consume(mixed)
        await exp.consume(MetricBatch((gauge("b", "b_alone"),)))  # b alone passes
        await wait_until(lambda: backend.waiting == 2, "b's request at the backend too")

        backend.open.set()
        await wait_until(lambda: len(backend.got) == 3, "a's two and b's one delivered")
        await exp.consume(mixed)
        await wait_until(lambda: len(backend.got) == 5, "the resent batch delivered")
    finally:
        await exp.shutdown()
    assert collections.Counter(backend.got) == collections.Counter(
        [("a", "a_first"), ("a", "a_second"), ("b", "b_alone"), ("b", "b_mixed"), ("a", "a_mixed")]
    )
