"""The agent's own endpoint answers from its own thread: work on the agent's loop cannot starve the
probes, and /healthz still fails when that loop is really stuck.

Each test blocks the agent's event loop (a busy loop in the loop's own thread, never yielding) until
a client in another thread has seen the answer it waits for. Had the endpoint been served on the
agent's loop, that answer could only come after the block ends, and the block ends only when the
answer came (or at a safety cap, which fails the test): causality, not timing.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from agent.admin import MAX_CONNECTIONS, AdminServer
from agent.config import ConfigError, build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import wait_until

SAFETY_CAP_S = 30.0


def _agent() -> Agent:
    cfg = yaml.safe_load(
        """
        receivers: {http: {endpoint: "127.0.0.1:0"}}
        exporters: {debug: {}}
        service: {pipelines: {metrics: {receivers: [http], exporters: [debug]}}}
        """
    )
    return Agent(build_config(cfg, builtin_factories()))


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=SAFETY_CAP_S) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _block_loop_until(done: threading.Event) -> bool:
    """Busy pure-Python work on the calling (the agent's) loop until ``done``; False at the cap."""
    end = time.monotonic() + SAFETY_CAP_S
    x = 0
    while not done.is_set():
        for i in range(10_000):  # pure-Python work: holds the GIL but for the interpreter's switches
            x += i
        if time.monotonic() > end:
            return False
    return True


async def _answers_while_blocked(admin: AdminServer, path: str, want_status: int) -> tuple[int, str]:
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            status, body = _get(admin.port, path)
            if status == want_status:
                seen.append((status, body))
                done.set()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    assert _block_loop_until(done), f"{path} never answered {want_status} while the agent's loop was busy"
    thread.join(SAFETY_CAP_S)
    return seen[0]


@pytest.mark.loop_block_limit(None)  # blocks the agent's loop on purpose: that is the case under test
async def test_probes_and_metrics_answer_while_the_agents_loop_is_busy() -> None:
    agent = _agent()
    admin = AdminServer(agent, "127.0.0.1:0", health_stall_timeout_s=3600)
    await agent.start()
    await admin.start()
    try:
        assert (await _answers_while_blocked(admin, "/healthz", 200))[1] == "ok\n"
        assert (await _answers_while_blocked(admin, "/readyz", 200))[1] == "ready\n"
        _, page = await _answers_while_blocked(admin, "/metrics", 200)
        assert "headwater_event_loop_lag_max_seconds" in page
        _, status = await _answers_while_blocked(admin, "/status", 200)
        assert '"ready": true' in status
    finally:
        await admin.shutdown()
        await agent.stop()


@pytest.mark.loop_block_limit(None)  # blocks the agent's loop on purpose: that is the case under test
async def test_healthz_fails_once_the_agents_loop_is_stuck_and_recovers_after() -> None:
    agent = _agent()
    admin = AdminServer(agent, "127.0.0.1:0", health_stall_timeout_s=0.2)
    await agent.start()
    await admin.start()
    try:
        _, body = await _answers_while_blocked(admin, "/healthz", 503)
        assert "event loop has not run for" in body and "health_stall_timeout" in body

        # Once the loop runs again, the heartbeat is fresh and /healthz is ok.
        async def healthy() -> bool:
            status, _ = await asyncio.to_thread(_get, admin.port, "/healthz")
            return status == 200

        await wait_until(healthy, "/healthz to answer 200 once the loop runs again")
    finally:
        await admin.shutdown()
        await agent.stop()


async def test_a_taken_port_fails_start_and_shutdown_is_idempotent() -> None:
    agent = _agent()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = AdminServer(agent, f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(OSError):
            await admin.start()
    await admin.shutdown()
    await admin.shutdown()
    never_started = AdminServer(agent, "127.0.0.1:0")
    await never_started.shutdown()


async def test_attach_switches_the_agent_reported_on_without_closing_the_listener() -> None:
    first, second = _agent(), _agent()
    admin = AdminServer(first, "127.0.0.1:0")
    await first.start()
    await admin.start()
    try:
        assert (await asyncio.to_thread(_get, admin.port, "/readyz"))[0] == 200
        await first.stop()
        assert (await asyncio.to_thread(_get, admin.port, "/readyz"))[0] == 503
        await second.start()
        admin.attach(second)
        assert (await asyncio.to_thread(_get, admin.port, "/readyz"))[0] == 200
    finally:
        await admin.shutdown()
        await second.stop()


async def test_a_flood_of_idle_connections_to_the_endpoint_does_not_shut_out_the_probes() -> None:
    agent = _agent()
    admin = AdminServer(agent, "127.0.0.1:0")
    await agent.start()
    await admin.start()
    flood: list[socket.socket] = []
    try:
        for _ in range(4 * MAX_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", admin.port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # half a request head, never finished
            flood.append(s)
        status, body = await asyncio.to_thread(_get, admin.port, "/healthz")
        assert (status, body) == (200, "ok\n")
        assert admin.refused_connections.value >= 3 * MAX_CONNECTIONS
    finally:
        for s in flood:
            s.close()
        await admin.shutdown()
        await agent.stop()


def test_health_stall_timeout_comes_from_the_config_and_is_checked() -> None:
    cfg = yaml.safe_load(
        """
        receivers: {http: {endpoint: "127.0.0.1:0"}}
        exporters: {debug: {}}
        service:
          telemetry: {health_stall_timeout: 100ms}
          pipelines: {metrics: {receivers: [http], exporters: [debug]}}
        """
    )
    with pytest.raises(ConfigError, match=r"service::telemetry::health_stall_timeout.*at least 500ms"):
        build_config(cfg, builtin_factories())
    cfg["service"]["telemetry"]["health_stall_timeout"] = "3s"
    assert build_config(cfg, builtin_factories()).service.telemetry.health_stall_timeout == 3.0


async def test_a_client_that_does_not_read_its_metrics_cannot_hold_the_endpoints_stop() -> None:
    # A local client asks for /metrics and never reads the page: the handler waits on a full socket.
    # Stopping the endpoint used to wait for that handler up to aiohttp's shutdown_timeout twice over
    # (2 x 60 s) — and the process's exit waited for the admin thread with it.
    agent = _agent()
    for i in range(100_000):  # a page of ~9 MB: more than the kernel buffers of a connection (<= 4 MB)
        agent.telemetry.gauge("filler", "Pads the page.", lambda: 1.0, tenant=f"tenant-{i:06d}-{'x' * 50}")
    admin = AdminServer(agent, "127.0.0.1:0", health_stall_timeout_s=3600)
    await agent.start()
    await admin.start()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(SAFETY_CAP_S)
    try:
        client.connect(("127.0.0.1", admin.port))
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.to_thread(client.recv, 1, socket.MSG_PEEK)  # the page is being written
        async with asyncio.timeout(SAFETY_CAP_S):
            await admin.shutdown()
        assert not [t for t in threading.enumerate() if t.name == "headwater-admin"]
    finally:
        client.close()
        await admin.shutdown()
        await agent.stop()
