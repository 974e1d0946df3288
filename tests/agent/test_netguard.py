"""agent/netguard.py: the fd reserve, the connection gate, the byte budget and the accept-error throttle."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import subprocess
import sys
import textwrap

import pytest

from agent import netguard
from agent.netguard import AcceptErrorThrottle, ByteBudget, ConnectionGate, FdBudget, fd_reserve
from agent.telemetry import Cell


def test_fd_reserve_is_256_or_ten_percent_and_never_more_than_half() -> None:
    assert fd_reserve(4096) == 409
    assert fd_reserve(1024) == 256
    assert fd_reserve(65536) == 6553
    assert fd_reserve(300) == 150
    assert FdBudget(limit=2).acquire() and FdBudget(limit=0).acquire() is False


class Conn:
    def __init__(self, name: str, evictable: bool = True) -> None:
        self.name = name
        self.evictable = evictable
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


def test_gate_evicts_the_oldest_idle_connection_and_refuses_when_all_are_busy() -> None:
    refused = Cell()
    fds = FdBudget(limit=100)
    gate = ConnectionGate(3, refused, fds)
    a, b, c = Conn("a", evictable=False), Conn("b"), Conn("c")
    assert all(gate.admit(x) for x in (a, b, c)) and len(gate) == 3 and fds.in_use == 3
    d = Conn("d")
    assert gate.admit(d)  # b is the oldest connection not inside a request
    assert b.evicted and not a.evicted and not c.evicted and refused.value == 1
    assert len(gate) == 3 and fds.in_use == 3
    gate.release(b)  # the evicted connection's close comes later: releasing again is a no-op
    assert fds.in_use == 3
    c.evictable = d.evictable = False
    e = Conn("e")
    assert not gate.admit(e) and refused.value == 2 and len(gate) == 3
    gate.release(a)
    assert gate.admit(e) and fds.in_use == 3


def test_the_process_budget_caps_every_gate_together() -> None:
    fds = FdBudget(limit=3)
    one, two = ConnectionGate(10, Cell(), fds), ConnectionGate(10, Cell(), fds)
    busy = [Conn(str(i), evictable=False) for i in range(3)]
    assert all(one.admit(x) for x in busy)
    assert not two.admit(Conn("new"))  # the other server holds every descriptor, none idle here
    assert two._refused.value == 1
    one.release(busy[0])
    assert two.admit(Conn("new")) and fds.in_use == 3


def test_byte_budget_is_all_or_nothing_across_receiver_and_process() -> None:
    process = ByteBudget(100)
    a, b = ByteBudget(80, process), ByteBudget(80, process)
    la, lb = a.lease(), b.lease()
    assert la.cover(60) and process.in_use == 60
    assert not lb.cover(50) and b.in_use == 0 and process.in_use == 60  # the process total refuses
    assert lb.cover(40) and process.in_use == 100
    assert not la.cover(61)  # one more byte: nothing taken from either
    assert la.held == 60 and a.in_use == 60 and process.in_use == 100
    la.close()
    lb.close()
    assert process.in_use == a.in_use == b.in_use == 0
    # An empty budget admits a request larger than its limit: serialised, never refused forever.
    with ByteBudget(10, process).lease() as big:
        assert big.cover(50)
    assert process.in_use == 0


def accept_error(fd_errno: int = errno.EMFILE) -> dict[str, object]:
    return {
        "message": "socket.accept() out of system resource",
        "exception": OSError(fd_errno, "Too many open files"),
    }


def test_accept_errors_become_one_line_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    passed: list[dict[str, object]] = []
    throttle = AcceptErrorThrottle(
        lambda loop, ctx: passed.append(ctx),
        interval_s=10.0,
        logger=logging.getLogger("test.netguard"),
        clock=lambda: now[0],
    )
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="test.netguard"):
            for i in range(1000):
                now[0] = i * 0.01  # 1000 errors in 10 s
                throttle(loop, accept_error(errno.ENFILE if i % 2 else errno.EMFILE))
            now[0] = 10.5
            throttle(loop, accept_error())
        other = {"message": "Task exception was never retrieved", "exception": ValueError("x")}
        throttle(loop, other)
        throttle(loop, {"message": "socket.accept() failed", "exception": OSError(errno.EBADF, "x")})
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "1 times" in lines[0] and "1000 times" in lines[1]
    assert throttle.count == 1001
    assert [c["message"] for c in passed] == ["Task exception was never retrieved", "socket.accept() failed"]


CHILD = textwrap.dedent(
    """
    import asyncio, logging, resource, sys
    from agent import netguard

    async def main():
        loop = asyncio.get_running_loop()
        throttle = netguard.install_loop_guards(loop, raise_limit=False)
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        while throttle.count < 20:  # asyncio retries accept once a second
            await asyncio.sleep(0.05)
        print("done", throttle.count, flush=True)

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    asyncio.run(main())
    """
)


def test_a_process_out_of_descriptors_logs_accept_errors_once_per_interval() -> None:
    """A real loop at its fd limit with connections waiting: a count, not a traceback per attempt."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    clients: list[socket.socket] = []
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        for _ in range(80):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        out, err = child.communicate(timeout=120)
    finally:
        for s in clients:
            s.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert out.startswith("done"), (out, err)
    assert err.count("cannot accept connections") == 1, err
    assert "Traceback" not in err and "Too many open files" in err


def test_raise_nofile_lifts_the_soft_limit_to_the_hard_one() -> None:
    code = textwrap.dedent(
        """
        import resource
        from agent import netguard
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert netguard.raise_nofile() == hard, hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert netguard.fd_budget().limit == hard - netguard.fd_reserve(hard)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_parse_slots_are_per_loop() -> None:
    async def slots() -> asyncio.Semaphore:
        return netguard.parse_slots()

    first = asyncio.run(slots())
    second = asyncio.run(slots())
    assert first is not second
