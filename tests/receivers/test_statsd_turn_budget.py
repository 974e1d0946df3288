"""The StatsD receiver's work per event-loop turn is bounded by the work (slices of lines), not by the
datagram count: a large datagram or read is parsed over several turns, the other callbacks run in
between, and every line still counts once, in order. The turn budget is set to zero here, so each turn
parses exactly one slice and the test needs no clock."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import statsd

import receivers.statsd as statsd_receiver
from tests.conftest import free_port, wait_until
from tests.receivers.conftest import Make


@pytest.fixture(autouse=True)
def one_slice_per_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statsd_receiver, "_TURN_BUDGET_S", 0.0)


async def states_until(value: Callable[[], int], final: int, max_turns: int = 100_000) -> set[int]:
    """The values seen at each loop turn until ``value()`` reaches ``final``."""
    seen = set()
    for _ in range(max_turns):
        current = value()
        seen.add(current)
        if current == final:
            return seen
        await asyncio.sleep(0)
    raise AssertionError(f"stuck at {value()} of {final}")


def gauge_lines(first: int, count: int) -> bytes:
    return b"".join(b"g:%d|g\n" % i for i in range(first, first + count))


async def test_a_large_datagram_is_parsed_over_several_turns_in_order(make: Make, tmp_path: Path) -> None:
    path = str(tmp_path / "dsd.socket")
    r, sink, tel = make(unixgram=path)
    await r.start()
    big = gauge_lines(0, 6000)  # ~52 KB: 13 slices of 4 KiB
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.sendto(big, path)
        s.sendto(b"next:1|c", path)
    seen = await states_until(lambda: r.agg.accepted, 6001)
    assert len(seen) >= 10  # one slice a turn: many partial states, no datagram parsed in one go
    assert tel.value("receiver_datagrams_total") == 2
    await r.flush()
    assert {p.name: p.value for p in sink.points()} == {"g": 5999.0, "next": 1.0}  # the last gauge wins


async def test_a_large_stream_read_pauses_reading_until_parsed(make: Make) -> None:
    port = free_port()
    r, sink, _ = make(tcp=f"127.0.0.1:{port}")
    await r.start()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(gauge_lines(0, 20_000))  # ~190 KB
    await writer.drain()
    seen = await states_until(lambda: r.agg.accepted, 20_000)
    assert len(seen) >= 20
    client = statsd.TCPStatsClient("127.0.0.1", port)  # another connection meanwhile
    client.incr("other")
    client.close()
    writer.write(b"g:-1|g\nafter:1|c\n")  # reading was resumed after the backlog
    writer.close()
    await wait_until(lambda: r.agg.accepted == 20_003, "r.agg.accepted == 20_003")
    await r.flush()
    assert {p.name: p.value for p in sink.points()} == {"g": 19_998.0, "after": 1.0, "other": 1.0}


async def test_shutdown_parses_a_backlog_left_at_the_budget(make: Make, tmp_path: Path) -> None:
    path = str(tmp_path / "dsd.socket")
    r, sink, _ = make(unixgram=path)
    await r.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.sendto(b"c:1|c\n" * 10_000, path)
    for _ in range(100_000):  # turn by turn until the first slice is parsed
        if r.agg.accepted:
            break
        await asyncio.sleep(0)
    assert 0 < r.agg.accepted < 10_000
    await r.shutdown()
    assert sink.total("c") == 10_000
