"""``workers: N`` on the StatsD receiver (receivers/statsd/workers.py): N processes share the port and
their intervals merge into what one process makes of the same input; a killed worker is restarted and
its loss counted; a reload restarts the workers; shutdown flushes their last intervals.

Every comparison sends each datagram, from one client socket, to two receivers: one in-process and one
with 2 workers. The kernel spreads client sockets over the workers by address and port, so 24 clients
leave a worker without any with odds ~1e-7 (the tests check each worker took some)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import statsd
from datadog.dogstatsd.base import DogStatsd

from agent.component import ComponentId
from agent.model import Point
from agent.telemetry import Telemetry
from receivers.statsd import StatsdConfig, StatsdReceiver
from receivers.statsd.workers import WorkerPool, cpu_limit, worker_count
from tests.conftest import AgentGraph, free_port, wait_until
from tests.integration.conftest import free_tcp_udp_port
from tests.receivers.conftest import Make

CLIENTS = 24


class _TwinSocket:
    """One client socket sending every datagram to several receivers, in order; counts them."""

    def __init__(self, ports: list[int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addrs = [("127.0.0.1", port) for port in ports]
        self.sent = 0

    def send(self, data: bytes) -> int:
        for addr in self.addrs:
            self.sock.sendto(data, addr)
        self.sent += 1
        return len(data)

    def close(self) -> None:
        self.sock.close()


class _TwinStatsd(statsd.StatsClient):  # type: ignore[misc]
    """The `statsd` client, its datagrams going to every receiver from one socket."""

    def __init__(self, twin: _TwinSocket) -> None:
        super().__init__("127.0.0.1", twin.addrs[0][1])
        self.twin = twin

    def _send(self, data: str) -> None:
        self.twin.send(data.encode("ascii"))


class _TwinDog(DogStatsd):  # type: ignore[misc]
    """The `datadog` DogStatsD client, its datagrams going to every receiver from one socket."""

    def __init__(self, twin: _TwinSocket) -> None:
        super().__init__(
            host="127.0.0.1", port=twin.addrs[0][1], disable_telemetry=True, origin_detection_enabled=False
        )
        self.twin = twin

    def get_socket(self, telemetry: bool = False) -> _TwinSocket:
        return self.twin


class Clients:
    """CLIENTS sockets, each with a statsd and a DogStatsD client, sending to every port given."""

    def __init__(self, ports: list[int]) -> None:
        self.twins = [_TwinSocket(ports) for _ in range(CLIENTS)]
        self.statsd = [_TwinStatsd(t) for t in self.twins]
        self.dog = [_TwinDog(t) for t in self.twins]

    @property
    def sent(self) -> int:
        for dog in self.dog:
            dog.flush()
        return sum(t.sent for t in self.twins)

    def close(self) -> None:
        for dog in self.dog:
            dog.flush()
        for twin in self.twins:
            twin.close()


@pytest.fixture
def clients() -> Iterator[list[Clients]]:
    made: list[Clients] = []
    yield made
    for c in made:
        c.close()


def _interval_one(c: Clients) -> None:
    """Every kind of line, with sample rates, deltas and tags, from every client. Values are exact in
    binary (integers, k/8 s timers) so float sums do not depend on the order they are added in."""
    for i, (s, d) in enumerate(zip(c.statsd, c.dog, strict=True)):
        s.incr("hits", i % 3 + 1)
        s.incr("sampled", 2, rate=0.5)  # the client samples once: both receivers get the same lines
        s.decr("down", 1)  # -1|c: refused by both (a counter cannot go down)
        s.gauge("level", i)  # the last write (client 23's) wins
        s.gauge("queue", 1, delta=True)  # +1 from every client, on whichever worker
        s.gauge("temp", -3)  # the client sends 0|g then -3|g
        s.set("users", f"u{i % 5}")
        s.set("ids", f"id{i}")
        s.timing("lat", [125, 250, 500, 1000][i % 4], rate=0.5 if i % 2 else 1)
        d.distribution("dist", i, tags=[f"env:{'a' if i % 2 else 'b'}"])
        d.histogram("h", i * 2, tags=["x:y"], sample_rate=0.5)
        d.increment("dd.hits", tags=[f"pod:{i % 4}"])
        d.gauge("dd.g", i, tags=["x:y"])
        d.set("dd.s", i % 7, tags=["x:y"])
        d.timing("dd.t", 250, sample_rate=0.25)
        d.flush()
        c.twins[i].send(b"not a statsd line")
    # Deltas across workers on a value another worker set, in this order:
    c.statsd[0].gauge("mixed", 100)
    for s in c.statsd[1:16]:
        s.gauge("mixed", 2, delta=True)
    c.statsd[5].gauge("mixed", 7)
    c.statsd[9].gauge("mixed", -1, delta=True)  # 6
    c.statsd[17].gauge("mixed", 3, delta=True)  # 9


def _interval_two(c: Clients) -> None:
    """Deltas on the bases the first interval left (kept by the main process across flushes)."""
    for i, s in enumerate(c.statsd):
        s.gauge("queue", -1, delta=True)
        s.gauge("mixed", 1, delta=True)
        s.incr("hits")
        if i % 6 == 0:
            s.gauge("level", 1000 + i)


def _shape(points: list[Point]) -> list[tuple[Any, ...]]:
    """What must be equal between the two receivers: everything but the flush times."""
    out = []
    for p in points:
        h = p.histogram
        hist = None
        if h is not None:
            hist = (
                h.count,
                h.sum,
                h.min,
                h.max,
                h.scale,
                h.zero_count,
                h.positive_offset,
                tuple(h.positive_counts),
                h.negative_offset,
                tuple(h.negative_counts),
            )
        out.append((p.name, p.kind, p.labels, p.value, p.unit, hist))
    return sorted(out, key=repr)


async def _pending(pool: WorkerPool, datagrams: int) -> list[tuple[int, int]]:
    """Wait until the workers read ``datagrams`` since their last parts; their shares."""
    await wait_until(
        lambda: sum(n for _, n in pool.pending()) == datagrams, f"the workers read {datagrams} datagrams"
    )
    return pool.pending()


def _pool(r: StatsdReceiver) -> WorkerPool:
    assert r.pool is not None
    return r.pool


def _refusals(tel: Telemetry) -> dict[str, float]:
    return {
        reason: tel.value("receiver_refused_points_total", reason=reason)
        for reason in ("malformed_line", "negative_counter")
    }


async def test_two_workers_flush_what_one_process_makes_of_the_same_lines(
    make: Make, clients: list[Clients]
) -> None:
    one_port, two_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    one, one_sink, one_tel = make(udp=f"127.0.0.1:{one_port}")
    two, two_sink, two_tel = make(udp=f"127.0.0.1:{two_port}", workers="2")
    await one.start()
    await two.start()
    assert len(_pool(two).pids) == 2 and os.getpid() not in _pool(two).pids
    c = Clients([one_port, two_port])
    clients.append(c)

    sent = 0
    for step in (_interval_one, _interval_two):
        step(c)
        before, sent = sent, c.sent
        await wait_until(lambda n=sent: one_tel.value("receiver_datagrams_total") == n, "all read in-process")
        shares = await _pending(_pool(two), sent - before)
        assert all(datagrams > 0 for _, datagrams in shares), shares  # both workers took a share
        one_sink.batches.clear()
        two_sink.batches.clear()
        await one.flush()
        await two.flush()
        assert _shape(two_sink.points()) == _shape(one_sink.points())
        assert two_tel.value("receiver_accepted_points_total") == one_tel.value(
            "receiver_accepted_points_total"
        )
        assert _refusals(two_tel) == _refusals(one_tel)
        assert two_tel.value("receiver_datagrams_total") == sent
        assert two_tel.value("receiver_udp_kernel_drops_total") == 0
    assert sum(_pool(two).datagrams) == sent
    assert _refusals(one_tel) == {"malformed_line": CLIENTS, "negative_counter": CLIENTS}
    gauges = {p.name: p.value for p in one_sink.points() if p.name in ("queue", "mixed")}
    assert gauges == {"queue": 0.0, "mixed": 9.0 + CLIENTS}


async def test_tcp_lines_go_to_the_workers_too(make: Make) -> None:
    port = free_port()
    r, sink, _ = make(tcp=f"127.0.0.1:{port}", workers="2")
    await r.start()
    writers = []
    for i in range(8):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"t:{i}|c\nlast:{i}|g\n".encode())
        await writer.drain()
        writers.append(writer)
        # A stream chunk is stamped when a worker reads it: the next write goes after this one is read.
        await wait_until(
            lambda n=2 * (i + 1): sum(v for v, _ in _pool(r).pending()) == n, f"{2 * (i + 1)} values parsed"
        )
    for writer in writers:
        writer.close()
    await r.flush()
    assert sink.total("t") == sum(range(8))
    assert [p.value for p in sink.points() if p.name == "last"] == [7.0]  # the last write


async def test_transport_refusals_in_the_workers_are_counted(make: Make) -> None:
    port = free_tcp_udp_port()
    r, _, tel = make(
        udp=f"127.0.0.1:{port}",
        tcp=f"127.0.0.1:{port}",
        workers="2",
        max_datagram_size=512,
        tcp_max_connections=1,
    )
    await r.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x:1|c\n" + b"y" * 600, ("127.0.0.1", port))
        s.sendto(b"ok:1|c", ("127.0.0.1", port))
    await wait_until(lambda: sum(n for _, n in _pool(r).pending()) == 2, "both datagrams read")
    writers = []
    for _ in range(6):  # each worker holds one connection; the others are refused when accepted
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)

    async def refused_connections() -> bool:
        await r.flush()
        return tel.value("receiver_refused_points_total", reason="connection_limit") >= 4

    await wait_until(refused_connections, "the workers' connection refusals handed in")
    for writer in writers:
        writer.close()
    assert tel.value("receiver_refused_points_total", reason="datagram_truncated") == 1
    assert tel.value("receiver_accepted_points_total") == 1


async def test_idle_connections_the_workers_close_are_counted(make: Make) -> None:
    port = free_port()
    r, _, tel = make(tcp=f"127.0.0.1:{port}", workers="2", tcp_idle_timeout=0.2)
    await r.start()
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
    for reader, _ in connections:
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by a worker as idle
    for _, writer in connections:
        writer.close()
    await r.flush()
    assert tel.value("receiver_closed_connections_total", reason="idle") == 6


def _socket_drops(port: int) -> list[int]:
    """The kernel's drop count of each UDP socket bound to 127.0.0.1:``port`` (one per worker)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/udp", encoding="ascii") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return [int(cols[12]) for cols in rows if cols[1] == local]


async def test_kernel_drops_never_go_back_when_a_worker_is_restarted(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, _, tel = make(udp=f"127.0.0.1:{port}", workers="2", receive_buffer=4096)
    await r.start()
    pool = _pool(r)
    pids = pool.pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # nobody reads: the small buffers overflow
    try:
        packet = b"full:1|c\n" * 100
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(CLIENTS)]
        for s in senders:
            for _ in range(40):
                s.sendto(packet, ("127.0.0.1", port))
            s.close()
        drops = _socket_drops(port)
        assert len(drops) == 2 and all(d > 0 for d in drops), drops  # both workers' sockets dropped
        before = tel.value("receiver_udp_kernel_drops_total")  # a scrape
        assert before == sum(drops)
        os.kill(pids[0], signal.SIGKILL)
    finally:
        for pid in pids:  # the killed one too, if an assertion above stopped the test before its kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    await wait_until(
        lambda: tel.value("receiver_worker_restarts_total") == 1 and len(pool.pids) == 2,
        "the worker restarted",
    )
    assert pids[0] not in pool.pids
    assert tel.value("receiver_udp_kernel_drops_total") == before  # the dead socket's drops kept


async def test_a_killed_worker_is_restarted_and_its_loss_counted(make: Make, clients: list[Clients]) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, tel = make(udp=f"127.0.0.1:{port}", workers="2")
    await r.start()
    pool = _pool(r)
    c = Clients([port])
    clients.append(c)
    for s in c.statsd:
        s.incr("hits")
    shares = await _pending(pool, CLIENTS)
    slot = max(range(2), key=lambda i: shares[i][0])
    victim = pool.pids[slot]
    lost = shares[slot][0]
    assert lost > 0
    os.kill(victim, signal.SIGKILL)
    await wait_until(
        lambda: tel.value("receiver_worker_restarts_total") == 1 and len(pool.pids) == 2,
        "the worker restarted",
    )
    assert victim not in pool.pids
    assert tel.value("receiver_dropped_points_total", reason="worker_died") == lost
    # The agent keeps taking data, on the new worker too.
    after = Clients([port])
    clients.append(after)
    for s in after.statsd:
        s.incr("hits")
    shares = await _pending(pool, 2 * CLIENTS - lost)
    assert all(datagrams > 0 for _, datagrams in shares), shares
    await r.flush()
    assert sink.total("hits") == 2 * CLIENTS - lost
    assert tel.value("receiver_accepted_points_total") == 2 * CLIENTS  # the lost ones were accepted


async def test_workers_outlive_sigint_and_sigterm(make: Make, clients: list[Clients]) -> None:
    # Ctrl-C and systemd's stop signal every process of the group: the agent stops its workers in order.
    port = free_port(socket.SOCK_DGRAM)
    r, sink, tel = make(udp=f"127.0.0.1:{port}", workers="2")
    await r.start()
    pool = _pool(r)
    c = Clients([port])
    clients.append(c)
    for s in c.statsd:
        s.incr("hits")
    await _pending(pool, CLIENTS)
    pids = pool.pids
    for pid in pids:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    await r.flush()  # each worker answers after the signals reached it
    assert sink.total("hits") == CLIENTS
    assert tel.value("receiver_worker_restarts_total") == 0 and pool.pids == pids


async def test_shutdown_flushes_the_workers_last_intervals(make: Make, clients: list[Clients]) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, _ = make(udp=f"127.0.0.1:{port}", workers="2")
    await r.start()
    pids = _pool(r).pids
    c = Clients([port])
    clients.append(c)
    for i, s in enumerate(c.statsd):
        s.incr("late")
        s.set("who", str(i))
    await r.shutdown()  # each worker parses what its socket holds and hands in its last part
    assert sink.total("late") == CLIENTS
    assert [p.value for p in sink.points() if p.name == "who"] == [CLIENTS]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_flush_cancelled_midway_loses_no_part(make: Make, clients: list[Clients]) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, _ = make(udp=f"127.0.0.1:{port}", workers="2")
    await r.start()
    pool = _pool(r)
    c = Clients([port])
    clients.append(c)
    for s in c.statsd:
        s.incr("taken")
    await _pending(pool, CLIENTS)
    flush = asyncio.ensure_future(r.flush())
    # Two loop turns (FIFO): the flush gathers its requests, then each request starts its exchange.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    flush.cancel()  # as shutdown cancels the flush loop
    with pytest.raises(asyncio.CancelledError):
        await flush
    await wait_until(lambda: pool.pending() == [(0, 0), (0, 0)], "the workers handed in their parts")
    assert sink.total("taken") == 0  # taken from the workers by the cancelled flush...
    await r.shutdown()
    assert sink.total("taken") == CLIENTS  # ...and handed on by the next one


CONFIG: dict[str, Any] = {
    "receivers": {"statsd": {"flush_interval": "1h", "workers": "2"}},
    "exporters": {"debug": {}},
    "service": {"pipelines": {"metrics": {"receivers": ["statsd"], "exporters": ["debug"]}}},
}


def _config(port: int, out: Path, **statsd_settings: str) -> dict[str, Any]:
    receivers = {"statsd": {**CONFIG["receivers"]["statsd"], "udp": f"127.0.0.1:{port}", **statsd_settings}}
    return {**CONFIG, "receivers": receivers, "exporters": {"debug": {"path": str(out)}}}


def _total(out: Path, name: str) -> float:
    if not out.exists():
        return 0.0
    lines = [json.loads(line) for line in out.read_text().splitlines() if line]
    return float(sum(p["value"] for p in lines if p.get("name") == name))


async def test_a_reload_restarts_the_workers_and_loses_nothing(
    agents: AgentGraph, tmp_path: Path, clients: list[Clients]
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    out = tmp_path / "points.jsonl"
    agent = await agents.start(_config(port, out))
    old = agent._receivers[ComponentId("statsd")].instance
    old_pids = _pool(old).pids
    c = Clients([port])
    clients.append(c)
    for s in c.statsd:
        s.incr("before")
    await _pending(_pool(old), CLIENTS)
    assert await agent.reload(agents.config(_config(port, out, workers="3")))
    new = agent._receivers[ComponentId("statsd")].instance
    assert new is not old and len(_pool(new).pids) == 3
    assert not set(old_pids) & set(_pool(new).pids)
    await wait_until(lambda: _total(out, "before") == CLIENTS, "the old workers' interval flushed")
    for s in c.statsd:
        s.incr("after")
    await _pending(_pool(new), CLIENTS)
    await new.flush()
    await wait_until(lambda: _total(out, "after") == CLIENTS, "the new workers' interval flushed")


def test_workers_setting() -> None:
    assert StatsdConfig().workers == "1"
    assert StatsdConfig(workers="auto").validate() == []
    assert worker_count("auto", lambda: 3) == 3 and worker_count("4") == 4
    assert 1 <= cpu_limit() <= (os.cpu_count() or 1)
    for bad in ("0", "two", "-1", "300"):
        assert [p for p, _ in StatsdConfig(workers=bad).validate()] == ["workers"]
    ((path, message),) = StatsdConfig(workers="2", unixgram="/tmp/x.sock").validate()
    assert path == "workers" and "Unix socket" in message


def test_auto_is_the_cgroup_cpu_limit(tmp_path: Path) -> None:
    available = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("100000 100000\n")
    assert cpu_limit(str(v2)) == 1
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: one worker, not two throttled ones
    assert cpu_limit(str(v2)) == 1
    (v2 / "cpu.max").write_text(f"{available * 200000} 100000\n")  # more than the machine has
    assert cpu_limit(str(v2)) == available
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_limit(str(v2)) == available
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_limit(str(tmp_path / "v1")) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert cpu_limit(str(tmp_path / "v1")) == available
    assert cpu_limit(str(tmp_path / "none")) == available


async def test_one_worker_is_the_receiver_itself(make: Make) -> None:
    r, _, _ = make(workers="1")
    assert r.pool is None and not r.reuse_port
