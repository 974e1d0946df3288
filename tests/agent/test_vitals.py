"""The agent's vital signs on /metrics, with real traffic: JSON posted to the http receiver with aiohttp,
sent by the real remote-write exporter to an aiohttp remote-write backend that answers as scripted,
and /metrics scraped over HTTP from the admin endpoint; StatsD lines from the statsd client sent on to
a real Prometheus, whose own count of the writes it answered is checked against the histograms.

Latency bounds are causal, never timed: an observation is compared with instants the test took
before the data was received and after it was acknowledged (or that the backend took around a request
it held), on the same monotonic clock.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import statsd
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from agent import vitals
from agent.admin import AdminServer
from agent.component import ComponentKind, Consumer, Factory, RetryableError, Settings
from agent.registry import builtin_factories
from agent.sending import QueueConfig, Request, RetryConfig, Sender
from agent.service import Agent
from agent.telemetry import Telemetry
from exporters.prometheus_remote_write import remote_pb2, wire
from tests.conftest import AgentGraph, component_settings, free_port, wait_until
from tests.exporters.conftest import Gate, serve
from tests.integration.conftest import PrometheusServer, free_tcp_udp_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def pick(samples: Samples, name: str, **labels: str) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    found = [v for (n, lb), v in samples.items() if n == name and set(labels.items()) <= set(lb)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


class Backend:
    """A remote-write endpoint answering from ``script`` (then 204), counting its answers by status;
    with ``gate`` closed it holds each request, noting when it arrived and when it was let go."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.answers: dict[int, int] = {}
        self.points = 0
        self.gate = Gate()
        self.held: list[tuple[float, float]] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.monotonic()
        await self.gate.passage()
        self.held.append((arrived, time.monotonic()))
        status = self.script.pop(0) if self.script else 204
        self.answers[status] = self.answers.get(status, 0) + 1
        if status == 204:
            self.points += len(remote_pb2.WriteRequest.FromString(wire.decompress(body)).timeseries)
        return web.Response(status=status, text="" if status == 204 else "scripted")


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    app = web.Application()
    app.router.add_post("/api/v1/write", b.handle)
    runner, b.port = await serve(app)
    yield b
    b.gate.open.set()
    await runner.cleanup()


@dataclass(frozen=True)
class HoldConfig:
    pass


class Hold:
    """A processor that holds each batch while its gate is closed: a stage taking its time."""

    gate = Gate()

    def __init__(self, settings: Settings, config: HoldConfig, next_consumer: Consumer) -> None:
        self._next = next_consumer

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def consume(self, batch: Any) -> None:
        await self.gate.passage()
        await self._next.consume(batch)


class WithHold(AgentGraph):
    def factories(self) -> Mapping[tuple[ComponentKind, str], Factory]:
        hold = Factory("hold", ComponentKind.PROCESSOR, HoldConfig, Hold)
        return {**builtin_factories(), (ComponentKind.PROCESSOR, "hold"): hold}


class Running:
    def __init__(self, agent: Agent, admin: AdminServer, http_port: int, session: aiohttp.ClientSession):
        self.agent = agent
        self.admin = admin
        self.http_port = http_port
        self.session = session

    async def post(self, name: str, value: float) -> None:
        url = f"http://127.0.0.1:{self.http_port}/v1/metrics"
        async with self.session.post(url, json={"name": name, "value": value}) as resp:
            assert resp.status == 200, await resp.text()

    async def metrics(self) -> Samples:
        async with self.session.get(f"http://127.0.0.1:{self.admin.port}/metrics") as resp:
            assert resp.status == 200
            return parse(await resp.text())


@pytest.fixture
async def running(backend: Backend) -> AsyncIterator[Running]:
    Hold.gate = Gate()
    agents = WithHold()
    http_port = free_port()
    agent = await agents.start(
        {
            "receivers": {"http": {"endpoint": f"127.0.0.1:{http_port}"}},
            "processors": {"hold": {}},
            "exporters": {
                "prometheus_remote_write": {
                    "endpoint": f"http://127.0.0.1:{backend.port}/api/v1/write",
                    "retry_on_failure": {"initial_interval": "10ms", "max_interval": "50ms"},
                }
            },
            "service": {
                "pipelines": {
                    "metrics": {
                        "receivers": ["http"],
                        "processors": ["hold"],
                        "exporters": ["prometheus_remote_write"],
                    }
                }
            },
        }
    )
    admin = AdminServer(agent, "127.0.0.1:0")
    try:
        await admin.start()
        async with aiohttp.ClientSession() as session:
            yield Running(agent, admin, http_port, session)
    finally:
        Hold.gate.open.set()
        await admin.shutdown()
        await agents.close()


EXPORTER = {"exporter": "prometheus_remote_write"}
SEND = "headwater_exporter_send_duration_seconds"
LATENCY = "headwater_pipeline_latency_seconds"


async def test_send_duration_counts_every_attempt_under_its_outcome(
    running: Running, backend: Backend
) -> None:
    # 503 is retried (the request then goes through), 400 is dropped for good.
    backend.script = [503, 503, 204, 400, 204, 503, 204]
    tel = running.agent.telemetry
    for i in range(1, 6):  # one at a time: each batch is one request, finished before the next
        await running.post(f"job_{i}", i)
        await wait_until(
            lambda n=i: (
                tel.value("exporter_sent_points_total") + tel.value("exporter_dropped_points_total") == n
            ),
            f"batch {i} sent or dropped",
        )
    assert backend.answers == {503: 3, 204: 4, 400: 1}
    m = await running.metrics()
    assert pick(m, SEND + "_count", outcome="success", **EXPORTER) == 4
    assert pick(m, SEND + "_count", outcome="retryable", **EXPORTER) == 3
    assert pick(m, SEND + "_count", outcome="permanent", **EXPORTER) == 1
    assert pick(m, SEND + "_bucket", outcome="permanent", le="+Inf", **EXPORTER) == 1
    # One latency observation per acknowledged request: dropped and retried attempts are not acknowledged.
    assert pick(m, LATENCY + "_count", **EXPORTER) == 4
    assert backend.points == 4


async def test_latency_runs_from_receipt_to_acknowledgement_queueing_included(
    running: Running, backend: Backend
) -> None:
    backend.gate.open.clear()
    t0 = time.monotonic()
    await running.post("first", 1)
    await wait_until(lambda: backend.gate.waiting == 1, "the backend holds the first request")
    await running.post("second", 2)  # queued behind the first (one consumer)
    second_answered = time.monotonic()  # the second batch was received before this
    backend.gate.open.set()
    await wait_until(lambda: backend.points == 2, "both delivered")
    m = await wait_until(
        lambda: _when(running.metrics(), lambda m: pick(m, LATENCY + "_count", **EXPORTER) == 2),
        "both latencies observed",
    )
    t1 = time.monotonic()
    latency = pick(m, LATENCY + "_sum", **EXPORTER)
    sending = pick(m, SEND + "_sum", outcome="success", **EXPORTER)
    (first_arrived, first_released), _ = backend.held
    # Each received after t0 and acknowledged before t1; the first was held longer than the backend held it.
    assert first_released - first_arrived <= latency <= 2 * (t1 - t0)
    # The second waited in the queue from its receipt until the first was let go: not a send's duration.
    assert latency - sending >= first_released - second_answered > 0


async def test_latency_counts_from_receipt_not_from_the_queue(running: Running) -> None:
    Hold.gate.open.clear()
    posted = asyncio.create_task(running.post("slow", 1))
    await wait_until(lambda: Hold.gate.waiting == 1, "a stage holds the batch")
    held = time.monotonic()  # the batch was received before this
    # Hold it for five ticks of the loop watcher (20 ms each): a stage's time, before any exporter.
    ticks = running.agent.telemetry.value("event_loop_lag_seconds")
    await wait_until(lambda: running.agent.telemetry.value("event_loop_lag_seconds") >= ticks + 5, "ticks")
    let_go = time.monotonic()
    Hold.gate.open.set()
    await posted
    m = await wait_until(
        lambda: _when(running.metrics(), lambda m: pick(m, LATENCY + "_count", **EXPORTER) == 1),
        "the latency observed",
    )
    latency = pick(m, LATENCY + "_sum", **EXPORTER)
    sending = pick(m, SEND + "_sum", outcome="success", **EXPORTER)
    # The request was offered after let_go and sent after that: what precedes the send is the stage's.
    assert latency - sending >= let_go - held >= 0.08


async def _when(scrape: Any, ok: Any) -> Samples | None:
    m = await scrape
    return m if ok(m) else None


@pytest.mark.loop_block_limit(None)  # blocks the agent's loop on purpose: the lag is what is measured
async def test_event_loop_lag_sees_a_stall(running: Running) -> None:
    tel = running.agent.telemetry
    await wait_until(lambda: tel.value("event_loop_lag_seconds") > 0, "the watcher runs")
    before = tel.value("event_loop_lag_seconds")
    stalled = time.monotonic()
    while time.monotonic() - stalled < 0.2:  # the watcher's timer was armed before this: it wakes 0.18 s late
        pass
    await wait_until(lambda: tel.value("event_loop_lag_seconds") > before, "the watcher woke")
    m = await running.metrics()
    late = pick(m, "headwater_event_loop_lag_seconds_count") - pick(
        m, "headwater_event_loop_lag_seconds_bucket", le="0.1"
    )
    assert late >= 1
    assert pick(m, "headwater_event_loop_lag_max_seconds") >= 0.18


def test_the_latest_lag_is_read_at_scrape_and_never_negative() -> None:
    tel = Telemetry()
    v = vitals.Vitals(tel)
    v.observe_loop_lag(0.003)
    assert v.loop_lag_s() == 0.003
    assert pick(parse(_render(tel)), "headwater_event_loop_lag_latest_seconds") == 0.003
    v.observe_loop_lag(-1e-9)  # a timer may fire within the clock's resolution before its time
    assert v.loop_lag_s() == 0.0
    assert pick(parse(_render(tel)), "headwater_event_loop_lag_seconds_bucket", le="0.001") == 1


async def test_gc_pauses_are_timed_per_generation_while_the_agent_runs(running: Running) -> None:
    tel = running.agent.telemetry
    before = tel.value("gc_pause_seconds", generation="2")
    gc.collect()
    gc.collect(0)
    assert tel.value("gc_pause_seconds", generation="2") == before + 1
    m = await running.metrics()
    assert pick(m, "headwater_gc_pause_seconds_count", generation="2") >= 1
    assert pick(m, "headwater_gc_pause_seconds_count", generation="0") >= 1
    assert pick(m, "headwater_gc_pause_seconds_sum", generation="2") > 0


async def test_the_gc_hook_goes_with_the_agent(agents: AgentGraph) -> None:
    agent = await agents.start(
        {
            "receivers": {"http": {"endpoint": f"127.0.0.1:{free_port()}"}},
            "exporters": {"debug": {}},
            "service": {"pipelines": {"metrics": {"receivers": ["http"], "exporters": ["debug"]}}},
        }
    )
    hooks = len(gc.callbacks)
    await agent.stop()
    assert len(gc.callbacks) == hooks - 1
    counted = agent.telemetry.value("gc_pause_seconds")
    gc.collect()
    assert agent.telemetry.value("gc_pause_seconds") == counted


async def test_process_figures_are_read_at_scrape(running: Running) -> None:
    m = await running.metrics()
    assert pick(m, "headwater_process_resident_memory_bytes") > 0
    assert pick(m, "headwater_process_cpu_seconds_total") > 0
    assert 0 < pick(m, "headwater_process_open_fds") <= pick(m, "headwater_process_max_fds")
    assert pick(m, "headwater_process_threads") >= 2  # the agent's and the admin endpoint's
    extra = [open(__file__, "rb") for _ in range(20)]  # noqa: SIM115 - closed below
    try:
        # Another thread may open or close a descriptor meanwhile, not twenty of ours.
        assert pick(await running.metrics(), "headwater_process_open_fds") >= 20
    finally:
        for f in extra:
            f.close()


async def test_a_disk_queue_record_counts_from_its_write_across_a_restart(tmp_path: Path) -> None:
    queue = QueueConfig(storage="disk", directory=str(tmp_path), fsync="batch")
    retry = RetryConfig(initial_interval=0.01, max_interval=0.05)

    async def failing(req: Request) -> None:
        raise RetryableError("backend down", reason="http_503")

    first_tel = Telemetry()
    first = Sender(
        component_settings(first_tel, ComponentKind.EXPORTER, "rw", logger="test.vitals"),
        failing,
        queue,
        retry,
        5.0,
        rng=random.Random(1),
    )
    await first.start()
    first.offer(Request(b"payload", 3))
    await first.commit()
    written = time.monotonic()
    await wait_until(
        lambda: first_tel.value("exporter_send_duration_seconds", outcome="retryable") >= 1, "tried"
    )
    await first.shutdown(0.1)  # stays on disk for the next run

    delivered = asyncio.Event()

    async def working(req: Request) -> None:
        delivered.set()

    tel = Telemetry()
    restarted = time.monotonic()
    second = Sender(
        component_settings(tel, ComponentKind.EXPORTER, "rw", logger="test.vitals"),
        working,
        queue,
        retry,
        5.0,
        rng=random.Random(1),
    )
    await second.start()
    await wait_until(lambda: tel.value("exporter_sent_points_total") == 3, "delivered after the restart")
    await second.shutdown(1.0)
    latency = _sum(tel, "pipeline_latency_seconds")
    # Written before `written`, sent after `restarted`: counted from the write, not from the dequeue.
    assert latency - _sum(tel, "exporter_send_duration_seconds") >= restarted - written > 0


def _sum(tel: Telemetry, name: str) -> float:
    samples = parse(_render(tel))
    return sum(v for (n, _), v in samples.items() if n == f"headwater_{name}_sum")


def _render(tel: Telemetry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(tel.registry).decode()


async def test_a_receipt_closes_when_its_hand_over_returns() -> None:
    outer = vitals.open_receipt()
    stamped = vitals.received_s()
    assert vitals.open_receipt() is None  # a Link further down the same call keeps the first stamp
    assert vitals.received_s() == stamped
    go = asyncio.Event()

    async def spawned_inside() -> float:
        await go.wait()
        return vitals.received_s()

    task = asyncio.create_task(spawned_inside())  # inherits the open receipt with the context
    vitals.close_receipt(outer)
    closed = time.monotonic()
    go.set()
    # Later batches of that task are stamped when they are handed on, not with the old receipt.
    assert await task >= closed > stamped
    assert vitals.received_s() >= closed


async def test_statsd_to_a_real_prometheus_each_write_it_answered_is_one_success(
    prometheus: PrometheusServer, agents: AgentGraph
) -> None:
    port = free_tcp_udp_port()
    agent = await agents.start(
        {
            "receivers": {"statsd": {"udp": f"127.0.0.1:{port}", "flush_interval": "100ms"}},
            "exporters": {"prometheus_remote_write": {"endpoint": prometheus.write_url}},
            "service": {
                "pipelines": {"metrics": {"receivers": ["statsd"], "exporters": ["prometheus_remote_write"]}}
            },
        }
    )
    tel = agent.telemetry
    client = statsd.StatsClient("127.0.0.1", port, prefix="app")
    for i in range(1, 4):  # a flush each: three requests at least
        client.incr("requests", i)
        client.timing("latency", 12.5)
        await wait_until(lambda n=i: tel.value("exporter_sent_requests_total") >= n, f"request {i} sent")
    await agent.stop()
    sent = tel.value("exporter_sent_requests_total")
    async with aiohttp.ClientSession() as session, session.get(f"{prometheus.url}/metrics") as resp:
        theirs = parse(await resp.text())
    answered = pick(theirs, "prometheus_http_requests_total", handler="/api/v1/write", code="204")
    assert answered == sent == tel.value("exporter_send_duration_seconds", outcome="success")
    assert tel.value("pipeline_latency_seconds") == sent
    assert tel.value("exporter_send_duration_seconds", outcome="retryable") == 0
