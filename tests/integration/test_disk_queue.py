"""The remote-write disk queue with a real Prometheus: data accepted while the backend is away waits on
disk across a restart of the agent, then arrives in order with counters continuous; two agents cannot
share a queue directory."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.component import ComponentKind
from agent.model import Kind, MetricBatch, Point
from agent.sending import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from exporters.prometheus_remote_write import PrometheusRemoteWriteConfig as RemoteWriteConfig
from exporters.prometheus_remote_write import PrometheusRemoteWriteExporter as RemoteWriteExporter
from tests.conftest import component_settings, free_port, wait_until
from tests.integration.conftest import ROOT, AgentProcess, PrometheusServer, launch_prometheus, wait_for_peer

pytestmark = pytest.mark.integration

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    flush_interval: 500ms
exporters:
  prometheus_remote_write:
    endpoint: {write_url}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 500ms}}
    sending_queue:
      storage: disk
      directory: {queue}
      fsync: batch
service:
  shutdown_timeout: 2s
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [prometheus_remote_write]
"""


def send(port: int, text: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), ("127.0.0.1", port))


def config(queue: Path, write_url: str) -> tuple[str, dict[str, int]]:
    ports = {"statsd": free_port(socket.SOCK_DGRAM), "telemetry": free_port()}
    return CONFIG.format(queue=queue, write_url=write_url, **ports), ports


def test_backlog_survives_a_restart_and_arrives_in_order(
    tmp_path: Path, prometheus: PrometheusServer, start_agent: Callable[..., AgentProcess]
) -> None:
    queue = tmp_path / "queue"
    nowhere = f"http://127.0.0.1:{free_port()}/api/v1/write"  # nothing listens: the backend is "down"
    text, ports = config(queue, nowhere)
    first = start_agent(text, ports)
    send(ports["statsd"], "jobs.done:5|c|#queue:mail\nqueue.depth:40|g")
    wait_for_peer(
        lambda: first.self_metric("headwater_exporter_disk_queue_records") >= 1,
        "a request waiting in the disk queue",
    )
    assert first.stop(signal.SIGTERM) == 0
    assert "stay in the disk queue" in first.logs()

    text, ports = config(queue, prometheus.write_url)
    second = start_agent(text, ports)
    assert "restored the cumulative state of 2 series" in wait_for_peer(
        lambda: second.logs() if "restored" in second.logs() else "", "state restored"
    )
    send(ports["statsd"], "jobs.done:2|c|#queue:mail\nqueue.depth:7|g")
    assert prometheus.wait_value('jobs_done_total{queue="mail"}', 7.0) == 7.0  # 5 + 2: continuous
    # The sample taken while Prometheus was away arrived too, before the new one, with no reset.
    assert prometheus.value('min_over_time(jobs_done_total{queue="mail"}[15m])') == 5.0
    assert prometheus.value('resets(jobs_done_total{queue="mail"}[15m])') == 0.0
    assert prometheus.value("max_over_time(queue_depth[15m])") == 40.0
    wait_for_peer(
        lambda: second.self_metric("headwater_exporter_disk_queue_records") == 0, "the disk queue drained"
    )
    assert second.self_metric("headwater_exporter_dropped_points_total") == 0
    assert second.stop(signal.SIGTERM) == 0


def test_two_agents_cannot_share_a_queue_directory(
    tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    queue = tmp_path / "queue"
    nowhere = f"http://127.0.0.1:{free_port()}/api/v1/write"
    text, ports = config(queue, nowhere)
    first = start_agent(text, ports)
    text2, _ = config(queue, nowhere)
    path = tmp_path / "second.yaml"
    path.write_text(text2)
    validate = subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-c", str(path)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert validate.returncode != 0
    assert b"locked by another process" in validate.stderr
    second = subprocess.run(
        [sys.executable, "-m", "agent", "run", "-c", str(path)], cwd=ROOT, capture_output=True, timeout=60
    )
    assert second.returncode != 0
    assert b"locked by another process" in second.stderr
    assert first.proc.poll() is None  # the first agent is unaffected
    assert first.stop(signal.SIGTERM) == 0


KILL_CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    flush_interval: 200ms
exporters:
  prometheus_remote_write:
    endpoint: {write_url}
    retry_on_failure: {{initial_interval: 50ms, max_interval: 300ms}}
    sending_queue: {{storage: disk, directory: {queue}, fsync: batch}}
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [prometheus_remote_write]
"""
ROUNDS = 20
EARLY = 5


def test_kill_9_in_a_loop_loses_nothing_fsynced_and_counters_stay_continuous(
    tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    rng = random.Random(20261129)
    queue = tmp_path / "queue"
    prom_port = free_port()
    prom = launch_prometheus(tmp_path / "prometheus", prom_port)
    write_url = f"http://127.0.0.1:{prom_port}/api/v1/write"
    try:
        for r in range(ROUNDS):
            if r % 5 == 1:
                prom.stop()  # down for this round and the next: the backlog waits on disk
            elif r % 5 == 3:
                prom = launch_prometheus(tmp_path / "prometheus", prom_port)
            ports = {"statsd": free_port(socket.SOCK_DGRAM), "telemetry": free_port()}
            agent = start_agent(KILL_CONFIG.format(queue=queue, write_url=write_url, **ports), ports)
            lines = "\n".join([f"crash.hits:1|c|#round:{r}", "crash.total:1|c"] * EARLY)
            send(ports["statsd"], lines)
            # Both series' points fsynced (fsync: batch) before the agent is answered: from here on,
            # a kill must not lose them.
            wait_for_peer(
                lambda a=agent: a.self_metric("headwater_exporter_durable_points_total") >= 2,
                f"round {r}: points durable",
            )
            for _ in range(rng.randrange(1, 4)):  # more load that the kill may or may not catch
                send(ports["statsd"], f"crash.late:1|c|#round:{r}")
                # Not a wait: a random pause, so the kill below lands at a different point of the
                # agent's work each round (receiving, flushing, writing or fsyncing the late points).
                time.sleep(rng.uniform(0.0, 0.2))
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait(30)

        # One last run with Prometheus up drains every backlog left by the kills.
        ports = {"statsd": free_port(socket.SOCK_DGRAM), "telemetry": free_port()}
        last = start_agent(KILL_CONFIG.format(queue=queue, write_url=write_url, **ports), ports)
        wait_for_peer(
            lambda: last.self_metric("headwater_exporter_disk_queue_records") == 0, "the disk queue drained"
        )
        for r in range(ROUNDS):
            assert prom.wait_value(f'crash_hits_total{{round="{r}"}}', EARLY) == EARLY
        # One series through all 20 kills: its total is every fsynced increment, and it never reset.
        assert prom.wait_value("crash_total", ROUNDS * EARLY) == ROUNDS * EARLY
        assert prom.value("resets(crash_total[1h])") == 0.0
        assert last.self_metric("headwater_exporter_dropped_points_total") == 0
        assert last.stop(signal.SIGTERM) == 0
    finally:
        prom.stop()


async def test_backend_503_for_a_while_then_back_loses_nothing_and_keeps_order(
    tmp_path: Path, prometheus: PrometheusServer
) -> None:
    """A proxy in front of the real Prometheus answers 503 for a while (the outage), then forwards.
    Samples keep coming meanwhile; afterwards every one is in Prometheus, in order (Prometheus refuses
    a sample older than the newest of its series, so any reordering would show as a missing sample),
    and the exporter's attempts during the outage stay bounded by its backoff."""
    outage = {"on": True}
    attempts: list[bool] = []

    async def proxy(request: web.Request) -> web.Response:
        attempts.append(outage["on"])
        if outage["on"]:
            return web.Response(status=503, text="down for maintenance")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with (
            aiohttp.ClientSession() as session,
            session.post(prometheus.write_url, data=body, headers=headers) as resp,
        ):
            return web.Response(status=resp.status, body=await resp.read())

    app = web.Application()
    app.router.add_post("/api/v1/write", proxy)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    tel = Telemetry()
    settings = component_settings(
        tel,
        ComponentKind.EXPORTER,
        "prometheus_remote_write",
        logger="test.outage",
        shutdown_timeout_s=30.0,
    )
    retry = RetryConfig(initial_interval=0.05, max_interval=0.4, max_elapsed_time=1.0)
    config = RemoteWriteConfig(
        endpoint=f"http://127.0.0.1:{port}/api/v1/write",
        retry_on_failure=retry,
        sending_queue=QueueConfig(storage="disk", directory=str(tmp_path / "queue")),
    )
    exporter = RemoteWriteExporter(settings, config)
    await exporter.start()
    batches = 40
    try:
        start_ns = time.time_ns() - 60 * 10**9
        for i in range(batches):
            if i == batches // 2:
                outage["on"] = False  # the backend is back halfway through
                outage_attempts = len(attempts)
            t = start_ns + i * 10**9
            await exporter.consume(
                MetricBatch(
                    (Point("outage.hits", Kind.SUM, (), t, value=1.0, start_time_unix_nano=t - 10**9),)
                )
            )
            # Not a wait: samples 0.1 s apart, so the outage lasts ~2 s of the exporter's retrying
            # (its attempts bounded below) while samples keep coming.
            await asyncio.sleep(0.1)
        await wait_until(lambda: tel.value("exporter_sent_points_total") >= batches, "every point sent", 60.0)
    finally:
        await exporter.shutdown()
        await runner.cleanup()
    assert prometheus.value("outage_hits_total") == batches
    assert prometheus.value("count_over_time(outage_hits_total[1h])") == batches  # none lost, none refused
    assert tel.value("exporter_dropped_points_total") == 0  # max_elapsed_time does not apply on disk
    # ~2 s of outage with a backoff capped at 0.4 s (jitter ±50 %): a few dozen attempts, not thousands.
    assert 2 <= outage_attempts <= 60
