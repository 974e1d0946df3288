"""No silent damage on the StatsD transports: truncated datagrams, over-long lines, cut connections,
control characters, limits — each refused whole and counted while legitimate traffic from the real
``statsd`` and ``datadog`` clients still arrives (real sockets: UDP, TCP, Unix datagram and stream)."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest
import statsd
from datadog.dogstatsd import DogStatsd

from agent.limits import SeriesLimits
from receivers.statsd import StatsdConfig
from tests.conftest import free_port, wait_until
from tests.receivers.conftest import Make


def refused(tel: object, reason: str) -> float:
    return tel.value("receiver_refused_points_total", reason=reason)  # type: ignore[attr-defined,no-any-return]


def accepted(tel: object) -> float:
    return tel.value("receiver_accepted_points_total")  # type: ignore[attr-defined,no-any-return]


def names(points: list) -> set[tuple[str, tuple[tuple[str, str], ...]]]:  # type: ignore[type-arg]
    return {(p.name, p.labels) for p in points}


async def test_unix_datagram_longer_than_the_buffer_is_refused_whole(make: Make, tmp_path: Path) -> None:
    path = str(tmp_path / "dsd.socket")
    r, sink, tel = make(unixgram=path)
    await r.start()
    pad = b"pad:1|c\n" * 8190
    big = pad + b"cut:1|c|#env:production\n" + b"after:1|c\n" * 99  # 66.6 KB > 65535
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.sendto(big, path)
        s.sendto(b"whole:1|c|#env:production", path)
    dd = DogStatsd(socket_path=path, disable_telemetry=True, origin_detection_enabled=False)
    try:
        dd.increment("dd.hits", tags=["env:dev"])
        dd.flush()
    finally:
        dd.close_socket()
    await wait_until(lambda: accepted(tel) == 2, "accepted(tel) == 2")
    assert refused(tel, "datagram_truncated") == 1  # one per datagram: its lines are unknown
    await r.flush()
    assert names(sink.points()) == {("whole", (("env", "production"),)), ("dd.hits", (("env", "dev"),))}


async def test_udp_datagram_over_max_datagram_size_is_refused_whole(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, tel = make(udp=f"127.0.0.1:{port}", max_datagram_size=1024)
    await r.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"a:1|c\n" * 200, ("127.0.0.1", port))  # 1,200 bytes
        s.sendto(b"b:1|c\n" * 170 + b"c:1|c", ("127.0.0.1", port))  # 1,025 bytes: one over
        s.sendto(b"x" * 1020 + b":1|c", ("127.0.0.1", port))  # 1,024 bytes: taken
    statsd.StatsClient("127.0.0.1", port).incr("ok")
    await wait_until(
        lambda: accepted(tel) == 2 and refused(tel, "datagram_truncated") == 2,
        "accepted(tel) == 2 and refused(tel, 'datagram_truncated') == 2",
    )
    assert tel.value("receiver_refused_points_total") == 2
    await r.flush()
    assert {p.name for p in sink.points()} == {"ok", "x" * 1020}


@pytest.mark.parametrize("size", [80_000, 120_000])
async def test_tcp_line_over_the_limit_in_one_read_is_refused(make: Make, size: int) -> None:
    port = free_port()
    r, sink, tel = make(tcp=f"127.0.0.1:{port}")
    await r.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    long_line = b"long:" + b"1:" * (size // 2) + b"1|ms\n"
    writer.write(b"before:1|c\n" + long_line + b"after:1|c\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the agent closed the connection
    writer.close()
    assert refused(tel, "line_too_long") == 1
    assert accepted(tel) == 1  # "before"; "after" followed the long line and was not read
    client = statsd.TCPStatsClient("127.0.0.1", port)
    client.incr("legit")
    client.close()
    await wait_until(lambda: accepted(tel) == 2, "accepted(tel) == 2")
    await r.flush()
    assert {p.name for p in sink.points()} == {"before", "legit"}


async def test_tcp_line_at_the_limit_is_accepted(make: Make) -> None:
    port = free_port()
    r, _, tel = make(tcp=f"127.0.0.1:{port}", tcp_max_line_length=1000)
    await r.start()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    line = b"m:" + b"1:" * 497 + b"1|c"  # 1,000 bytes
    writer.write(b"a:1|c\n" * 300 + line + b"\n" + b"a:1|c\n" * 300)  # one read, newlines around
    await writer.drain()
    writer.close()
    await wait_until(lambda: accepted(tel) == 600 + 498, "accepted(tel) == 600 + 498")
    assert refused(tel, "line_too_long") == 0


async def test_unix_stream_line_over_the_limit_is_refused(make: Make, tmp_path: Path) -> None:
    path = str(tmp_path / "statsd.sock")
    r, _, tel = make(unix=path, tcp_max_line_length=4096)
    await r.start()
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"ok:1|c\n" + b"m:1|c|#k:" + b"v" * 5000 + b"\nafter:1|c\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert (refused(tel, "line_too_long"), accepted(tel)) == (1, 1)
    client = statsd.UnixSocketStatsClient(path)
    client.incr("legit")
    client.close()
    await wait_until(lambda: accepted(tel) == 2, "accepted(tel) == 2")


async def test_partial_line_of_a_reset_connection_is_refused(make: Make) -> None:
    port = free_port()
    r, sink, tel = make(tcp=f"127.0.0.1:{port}")
    await r.start()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"whole:1|c\npartial:1|c|#env:pro")
    await wait_until(lambda: accepted(tel) == 1, "accepted(tel) == 1")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    s.close()
    await wait_until(lambda: refused(tel, "connection_reset") == 1, "refused(tel, 'connection_reset') == 1")
    await r.flush()
    assert [p.name for p in sink.points()] == ["whole"]


async def test_partial_line_at_a_clean_end_of_stream_counts(make: Make) -> None:
    port = free_port()
    r, sink, tel = make(tcp=f"127.0.0.1:{port}")
    await r.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"whole:1|c\nlast:1|c|#env:prod")
    writer.write_eof()  # EOF: the client says it is done
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await wait_until(lambda: accepted(tel) == 2, "accepted(tel) == 2")
    assert refused(tel, "connection_reset") == refused(tel, "connection_closed") == 0
    await r.flush()
    assert names(sink.points()) == {("whole", ()), ("last", (("env", "prod"),))}


async def test_partial_line_of_a_connection_the_agent_closes_is_refused(make: Make, tmp_path: Path) -> None:
    path = str(tmp_path / "statsd.sock")
    r, _, tel = make(unix=path, tcp_idle_timeout=0.2)
    await r.start()
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"whole:1|c\npartial:1|")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed as idle
    writer.close()
    await wait_until(lambda: refused(tel, "connection_closed") == 1, "refused(tel, 'connection_closed') == 1")
    assert accepted(tel) == 1


async def test_control_characters_refused_in_names_and_keys_through_sockets(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, tel = make(udp=f"127.0.0.1:{port}")
    await r.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"esc\x1bx:1|c\nnul:1|c|#k\x00:v\nval:1|c|#k:a\x00b\x1b", ("127.0.0.1", port))
    await wait_until(
        lambda: accepted(tel) + refused(tel, "control_character") == 3,
        "accepted(tel) + refused(tel, 'control_character') == 3",
    )
    assert refused(tel, "control_character") == 2
    await r.flush()
    assert names(sink.points()) == {("val", (("k", "a\x00b\x1b"),))}  # the Prometheus edge escapes it


async def test_series_limits_from_the_config(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    limits = SeriesLimits(max_name_length=16, max_labels=2, max_label_value_length=8)
    r, sink, tel = make(udp=f"127.0.0.1:{port}", limits=limits)
    await r.start()
    dd = DogStatsd(host="127.0.0.1", port=port, disable_telemetry=True, origin_detection_enabled=False)
    try:
        dd.increment("a.very.long.metric.name")
        dd.increment("ok", tags=["a:1", "b:2", "c:3"])
        dd.increment("ok", tags=["a:123456789"])
        dd.increment("ok", tags=["a:12345678", "b:2"])
        dd.flush()
    finally:
        dd.close_socket()
    await wait_until(
        lambda: tel.value("receiver_refused_points_total") == 3 and accepted(tel) == 1,
        "tel.value('receiver_refused_points_total') == 3 and accepted(tel) == 1",
    )
    assert refused(tel, "name_too_long") == refused(tel, "too_many_labels") == 1
    assert refused(tel, "label_value_too_long") == 1
    await r.flush()
    assert names(sink.points()) == {("ok", (("a", "12345678"), ("b", "2")))}


def test_limits_are_validated_with_their_path() -> None:
    problems = StatsdConfig(limits=SeriesLimits(max_labels=0)).validate()
    assert [p for p, _ in problems] == ["limits::max_labels"]
    assert StatsdConfig(max_set_members_total=0).validate()[0][0] == "max_set_members_total"
