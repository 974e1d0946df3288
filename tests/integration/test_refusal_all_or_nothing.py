"""Refusal is all or nothing, end to end: one pipeline, two ``otlp_http`` exporters, one of them full
(``full_policy: block``, its backend answering 503 until the test releases it). A JSON client (the
``http`` receiver), an OTLP/HTTP client and an OTLP/gRPC client send batches; the full exporter makes the
agent refuse (429 / UNAVAILABLE) and each client resends the refused batch — while the exporter is
still full, and again once it drains. In the end each point is in each backend exactly once: a refused
batch was taken by neither exporter, an accepted one by both.

The agent is the real one (a subprocess); the backends are aiohttp servers on this test's loop that
decode what they get with the generated OTLP classes; the clients are aiohttp and grpc.aio.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as ms_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, wait_until
from tests.integration.conftest import AgentProcess

CONFIG = """\
receivers:
  http:
    endpoint: 127.0.0.1:{http}
  otlp:
    grpc: 127.0.0.1:{otlp_grpc}
    http: 127.0.0.1:{otlp_http}
exporters:
  otlp_http/fast:
    endpoint: http://127.0.0.1:{fast}
    compression: none
    sending_queue: {{queue_size: 1000, full_policy: block}}
  otlp_http/full:
    endpoint: http://127.0.0.1:{full}
    compression: none
    sending_queue: {{queue_size: 2, full_policy: block}}
    retry_on_failure: {{initial_interval: 20ms, max_interval: 100ms, max_elapsed_time: 0s}}
service:
  shutdown_timeout: 2s
  telemetry: {{endpoint: 127.0.0.1:{telemetry}}}
  pipelines:
    metrics:
      receivers: [http, otlp]
      exporters: [otlp_http/fast, otlp_http/full]
"""

BATCHES = 6
"""Batches each client sends."""
POINTS = 3
"""Points in each batch, each a gauge with a name of its own."""


class Backend:
    """An OTLP/HTTP metrics backend: keeps the name of every data point it accepts (duplicates too);
    while ``refusing``, answers 503 and keeps nothing."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.refusing = False
        self.refused = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.refusing:
            self.refused += 1
            return web.Response(status=503)
        message = ms.ExportMetricsServiceRequest.FromString(body)
        for rm in message.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    self.names += [metric.name] * len(metric.gauge.data_points)
        return web.Response(
            body=ms.ExportMetricsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/metrics", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, Backend]]:
    found = {"fast": Backend(), "full": Backend()}
    for backend in found.values():
        await backend.start()
    yield found
    for backend in found.values():
        await backend.stop()


def names(client: str, batch: int) -> list[str]:
    return [f"{client}.b{batch}.p{i}" for i in range(POINTS)]


def otlp_request(client: str, batch: int) -> ms.ExportMetricsServiceRequest:
    now = time.time_ns()
    metrics = [
        metrics_pb2.Metric(
            name=name,
            gauge=metrics_pb2.Gauge(
                data_points=[metrics_pb2.NumberDataPoint(time_unix_nano=now, as_double=float(batch))]
            ),
        )
        for name in names(client, batch)
    ]
    return ms.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                scope_metrics=[
                    metrics_pb2.ScopeMetrics(
                        scope=common_pb2.InstrumentationScope(name="test"), metrics=metrics
                    )
                ],
            )
        ]
    )


class Clients:
    """The three clients; each ``send_*`` sends one batch once: True if taken, False if refused with
    backpressure (429 with Retry-After / UNAVAILABLE). ``refused`` counts the refusals per client."""

    def __init__(self, agent: AgentProcess, session: aiohttp.ClientSession, channel: grpc.aio.Channel):
        self.agent = agent
        self.session = session
        self.grpc = ms_grpc.MetricsServiceStub(channel)  # type: ignore[no-untyped-call]
        self.refused: collections.Counter[str] = collections.Counter()

    async def send_json(self, batch: int) -> bool:
        items = [{"name": n, "value": batch, "type": "gauge"} for n in names("json", batch)]
        async with self.session.post(self.agent.url("http", "/v1/metrics"), json=items) as resp:
            body = await resp.json()
            if resp.status == 429:
                assert body["code"] == "backpressure" and resp.headers["Retry-After"], body
                self.refused["json"] += 1
                return False
            assert resp.status == 200 and body["accepted"] == POINTS, body
            return True

    async def send_otlp_http(self, batch: int) -> bool:
        async with self.session.post(
            self.agent.url("otlp_http", "/v1/metrics"),
            data=otlp_request("otlp_http", batch).SerializeToString(),
            headers={"Content-Type": "application/x-protobuf"},
        ) as resp:
            await resp.read()
            if resp.status == 429:
                assert resp.headers["Retry-After"]
                self.refused["otlp_http"] += 1
                return False
            assert resp.status == 200, resp.status
            return True

    async def send_otlp_grpc(self, batch: int) -> bool:
        try:
            await self.grpc.Export(otlp_request("otlp_grpc", batch), timeout=30)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
            self.refused["otlp_grpc"] += 1
            return False
        return True

    def senders(self) -> dict[str, Callable[[int], Any]]:
        return {"json": self.send_json, "otlp_http": self.send_otlp_http, "otlp_grpc": self.send_otlp_grpc}


async def self_metrics(session: aiohttp.ClientSession, agent: AgentProcess) -> dict[tuple[str, str], float]:
    """(sample name, exporter label) → value of the agent's exporter self-metrics."""
    async with session.get(agent.url("telemetry", "/metrics")) as resp:
        text = await resp.text()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("headwater_exporter_") and "exporter" in sample.labels:
                key = (sample.name.removeprefix("headwater_"), sample.labels["exporter"])
                found[key] = found.get(key, 0.0) + sample.value
    return found


async def test_each_point_is_in_each_exporter_exactly_once_after_refusals_and_resends(
    start_agent: Callable[..., AgentProcess], backends: dict[str, Backend]
) -> None:
    ports = {
        "http": free_port(),
        "otlp_grpc": free_port(),
        "otlp_http": free_port(),
        "telemetry": free_port(),
        "fast": backends["fast"].port,
        "full": backends["full"].port,
    }
    backends["full"].refusing = True
    # In a thread: start_agent waits (synchronously) for the agent process to be ready.
    agent = await asyncio.to_thread(start_agent, CONFIG.format(**ports), ports)
    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.insecure_channel(f"127.0.0.1:{ports['otlp_grpc']}") as channel,
    ):
        clients = Clients(agent, session, channel)
        senders = clients.senders()

        # 1. The full exporter's backend refuses: one request is being retried, two wait in its queue
        # (queue_size 2), and from then on every batch is refused — each client's, resent twice more
        # while the exporter stays full.
        pending: dict[str, list[int]] = {name: list(range(BATCHES)) for name in senders}
        assert await clients.send_json(pending["json"].pop(0))
        await wait_until(lambda: backends["full"].refused > 0, "the full exporter sending its first")
        for name, send in senders.items():
            while pending[name] and clients.refused[name] == 0:
                if await send(pending[name][0]):
                    pending[name].pop(0)
            assert clients.refused[name] == 1, f"{name} was never refused"
            for _ in range(2):
                assert not await send(pending[name][0])
        metrics = await self_metrics(session, agent)
        assert metrics[("exporter_queue_size", "otlp_http/full")] == 2
        accepted = [
            n for name in senders for b in range(BATCHES) if b not in pending[name] for n in names(name, b)
        ]
        await wait_until(lambda: _delivered(session, agent, "fast", len(accepted)), "fast idle")
        # Nothing of a refused batch reached the other exporter.
        assert sorted(backends["fast"].names) == sorted(accepted)

        # 2. The backend takes again: the full exporter drains, the clients resend what was refused and
        # send the rest, each batch resent once the full exporter's queue has room again.
        backends["full"].refusing = False
        for name, send in senders.items():
            while pending[name]:
                if await send(pending[name][0]):
                    pending[name].pop(0)
                else:
                    await wait_until(lambda: _room(session, agent), "room in the full exporter's queue")

        want = sorted(n for name in senders for b in range(BATCHES) for n in names(name, b))
        for exporter in ("fast", "full"):
            await wait_until(
                lambda: _delivered(session, agent, exporter, len(want)),  # noqa: B023
                f"{exporter} delivered every point",
            )
            assert sorted(backends[exporter].names) == want, exporter  # each point exactly once
        assert min(clients.refused.values()) >= 3, clients.refused


async def _room(session: aiohttp.ClientSession, agent: AgentProcess) -> bool:
    metrics = await self_metrics(session, agent)
    return metrics.get(("exporter_queue_size", "otlp_http/full"), 0.0) < 2


async def _delivered(session: aiohttp.ClientSession, agent: AgentProcess, exporter: str, points: int) -> bool:
    """``points`` sent by ``exporter`` and nothing left in its queue nor being sent."""
    metrics = await self_metrics(session, agent)
    sent = metrics.get(("exporter_sent_points_total", f"otlp_http/{exporter}"), 0.0)
    left = metrics.get(("exporter_queue_points", f"otlp_http/{exporter}"), 0.0)
    return sent >= points and left == 0
