"""SIGTERM and SIGHUP on a real agent process while its remote-write backend hangs or is gone.

Shutdown: every round exits 0 within shutdown_timeout plus the stated margin (cli.STOP_MARGIN_S) and
the points queued at SIGTERM are exactly the ones counted dropped{shutdown}. Reload: intake never
pauses (no TCP connection refused, every accepted point arrives), and a changed exporter's queue —
in memory or on disk — reaches the new endpoint (a real Prometheus).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import statsd

from tests.conftest import free_port
from tests.integration.conftest import AgentProcess, PrometheusServer, free_tcp_udp_port, wait_for_peer

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("HEADWATER_SHUTDOWN_ROUNDS", "6"))
"""Shutdown rounds (each ~4 s); raise it locally for the heavy version, e.g. 50."""

SHUTDOWN_TIMEOUT_S = 2.0
HANG_LIMIT_S = 60.0
"""Only a shutdown that does not end reaches this (the deadline is SHUTDOWN_TIMEOUT_S + STOP_MARGIN_S)."""

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    tcp: 127.0.0.1:{statsd}
    flush_interval: 100ms
exporters:
  debug:
    path: {out}
  prometheus_remote_write:
    endpoint: {endpoint}
    timeout: 60s
    max_samples_per_request: 10
    sending_queue: {queue}
service:
  shutdown_timeout: {shutdown}s
  telemetry: {{endpoint: 127.0.0.1:{telemetry}}}
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [debug, prometheus_remote_write]
"""


@pytest.fixture
def hung_backend() -> Iterator[Callable[[], str]]:
    """Write URLs of backends that accept connections and never answer."""
    listeners: list[socket.socket] = []
    held: list[socket.socket] = []

    def serve(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            held.append(conn)

    def start() -> str:
        sock = socket.create_server(("127.0.0.1", 0), backlog=1000)
        listeners.append(sock)
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1/write"

    yield start
    for s in listeners + held:
        s.close()


def write_config(path: Path, **values: object) -> None:
    path.write_text(CONFIG.format(**values))


def stable(agent: AgentProcess) -> tuple[float, float]:
    """(points queued, points dropped{queue_full}) once two reads a few flush intervals apart agree."""
    last: list[tuple[float, float]] = []

    def settled() -> tuple[float, float] | None:
        now = (
            agent.self_metric("headwater_exporter_queue_points"),
            agent.self_metric("headwater_exporter_dropped_points_total", reason="queue_full"),
        )
        done = bool(last) and last[-1] == now
        last.append(now)
        return now if done else None

    # Reads 0.5 s apart (five flush intervals): two that agree mean nothing moved in between.
    return wait_for_peer(settled, "the self-metrics to settle", every_s=0.5)


def final_drops(agent: AgentProcess) -> dict[str, int]:
    """The remote-write exporter's drops by reason, from the agent's last log line."""
    match = re.search(r"stopped \(points dropped by exporters over the run: (.*)\)", agent.logs())
    assert match, agent.logs()
    found = re.search(r"prometheus_remote_write\{([^}]*)\}", match.group(1))
    pairs = (item.split("=") for item in found.group(1).split(",")) if found else ()
    return {reason: int(n) for reason, n in pairs}


def debug_points(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_with_the_backend_hung_or_gone_exits_within_the_deadline(
    tmp_path: Path, start_agent: Callable[..., AgentProcess], hung_backend: Callable[[], str]
) -> None:
    for round_ in range(ROUNDS):
        gone = f"http://127.0.0.1:{free_port()}/api/v1/write"  # nothing listens: connection refused
        ports = {"statsd": free_tcp_udp_port(), "telemetry": free_port()}
        agent = start_agent(
            CONFIG.format(
                out=tmp_path / f"points-{round_}.jsonl",
                endpoint=hung_backend() if round_ % 2 == 0 else gone,
                queue="{queue_size: 100}",
                shutdown=SHUTDOWN_TIMEOUT_S,
                **ports,
            ),
            ports,
        )
        client = statsd.StatsClient("127.0.0.1", ports["statsd"])
        for i in range(20_000):  # 2,000 series: ~200 requests a flush fill the 100-request queue
            client.incr(f"load.m{i % 2000}")
        queued, queue_full = stable(agent)
        out = tmp_path / f"points-{round_}.jsonl"
        written = debug_points(out)
        assert agent.stop(signal.SIGTERM, HANG_LIMIT_S) == 0
        assert "shutdown deadline (shutdown_timeout" not in agent.logs()  # nothing had to be abandoned
        # Every point queued at SIGTERM, and every point of the receiver's last flush (the debug exporter
        # got the same batches), was either dropped{shutdown} or pushed out by it (queue_full).
        drops = final_drops(agent)
        last_flush = debug_points(out) - written
        assert queued > 0
        assert drops["shutdown"] == queued + last_flush - (drops.get("queue_full", 0) - queue_full)


def tcp_and_udp_load(port: int, stop: threading.Event, limit: int = 200_000) -> dict[str, int]:
    """StatsD over UDP and over short TCP connections until ``stop`` (or ``limit`` lines each)."""
    counts = {"udp": 0, "tcp": 0, "refused": 0}
    udp = statsd.StatsClient("127.0.0.1", port)
    while not stop.is_set() and counts["tcp"] < limit:
        try:
            tcp = statsd.TCPStatsClient("127.0.0.1", port, timeout=10)
            tcp.connect()
        except ConnectionRefusedError:
            counts["refused"] += 1
            continue
        with tcp.pipeline() as pipe:
            for _ in range(20):
                pipe.incr("tcp_load")
        tcp.close()
        counts["tcp"] += 20
        for _ in range(20):
            udp.incr("udp_load")
        counts["udp"] += 20
    return counts


def test_sighup_with_a_hung_backend_keeps_intake(
    tmp_path: Path, start_agent: Callable[..., AgentProcess], hung_backend: Callable[[], str]
) -> None:
    ports = {"statsd": free_tcp_udp_port(), "telemetry": free_port()}
    out = tmp_path / "points.jsonl"
    values = {"out": out, "queue": "{queue_size: 100000}", "shutdown": 1, **ports}
    agent = start_agent(CONFIG.format(endpoint=hung_backend(), **values), ports)
    stop = threading.Event()
    result: dict[str, int] = {}
    loader = threading.Thread(target=lambda: result.update(tcp_and_udp_load(ports["statsd"], stop)))
    loader.start()
    try:
        wait_for_peer(lambda: "tcp_load" in (out.read_text() if out.exists() else ""), "load flowing")
        write_config(agent.config_path, endpoint=hung_backend(), **values)  # a changed exporter
        agent.proc.send_signal(signal.SIGHUP)
        wait_for_peer(lambda: "reloaded" in agent.logs(), "reloaded")
        before = agent.self_metric("headwater_receiver_accepted_points_total")
        wait_for_peer(
            lambda: agent.self_metric("headwater_receiver_accepted_points_total") > before,
            "load after the reload",
        )
    finally:
        stop.set()
        loader.join()
    assert result["refused"] == 0

    def arrived(name: str) -> float:
        import json

        return sum(p["value"] for p in map(json.loads, out.read_text().splitlines()) if p["name"] == name)

    wait_for_peer(lambda: arrived("tcp_load") == result["tcp"], "every TCP line written")

    # UDP: what the kernel dropped from a full receive buffer never reached the agent (counted apart);
    # every datagram it read was accepted and written.
    def udp_accounted() -> bool:
        dropped = agent.self_metric("headwater_receiver_udp_kernel_drops_total")
        return arrived("udp_load") + dropped == result["udp"]

    wait_for_peer(udp_accounted, "every UDP line read written")
    assert agent.self_metric("headwater_receiver_refused_points_total") == 0
    assert agent.self_metric("headwater_exporter_dropped_points_total") == 0
    assert agent.stop() == 0


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_a_changed_endpoint_hands_the_queue_to_the_new_one(
    storage: str,
    tmp_path: Path,
    start_agent: Callable[..., AgentProcess],
    hung_backend: Callable[[], str],
    prometheus: PrometheusServer,
) -> None:
    ports = {"statsd": free_tcp_udp_port(), "telemetry": free_port()}
    queue = "{queue_size: 1000}" if storage == "memory" else f"{{storage: disk, directory: {tmp_path / 'q'}}}"
    values = {"out": tmp_path / "points.jsonl", "queue": queue, "shutdown": 5, **ports}
    agent = start_agent(CONFIG.format(endpoint=hung_backend(), **values), ports)
    client = statsd.StatsClient("127.0.0.1", ports["statsd"])
    for i in range(300):
        client.incr(f"handoff.s{i % 30}")
    wait_for_peer(
        lambda: agent.self_metric("headwater_receiver_accepted_points_total") == 300, "all accepted"
    )
    wait_for_peer(lambda: agent.self_metric("headwater_exporter_queue_size") > 0, "queued")
    write_config(agent.config_path, endpoint=prometheus.write_url, **values)
    agent.proc.send_signal(signal.SIGHUP)
    wait_for_peer(lambda: "reloaded" in agent.logs(), "reloaded")
    prometheus.wait_value("sum(handoff_s0_total)", 10.0)
    prometheus.wait_value("sum(last_over_time({__name__=~'handoff_s.*_total'}[10m]))", 300.0)
    assert agent.self_metric("headwater_exporter_dropped_points_total") == 0
    assert agent.stop() == 0
