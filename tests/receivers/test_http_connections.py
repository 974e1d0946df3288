"""Connections and request bytes of the HTTP receivers (agent/netguard.py): header-read and idle
timeouts against raw sockets sending half a request, connection caps, the request-bytes budget.
Every abuse test also checks that a legitimate request is answered while the abuse goes on."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from agent import netguard
from agent.component import ComponentKind, Signal
from agent.telemetry import Telemetry
from receivers.http import HttpConfig, HttpReceiver
from receivers.otlp import OtlpConfig, OtlpReceiver
from tests.conftest import Sink, component_settings, wait_until

JSON = {"Content-Type": "application/json"}
HALF_HEAD = b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: appl"
BOUND_S = 30.0
"""Safety bound on waits for the server to act: never reached unless the behaviour is broken."""


Build = Callable[..., Awaitable[HttpReceiver]]


@pytest.fixture
def tel() -> Telemetry:
    return Telemetry()


@pytest.fixture
async def http(tel: Telemetry) -> AsyncIterator[Build]:
    made: list[HttpReceiver] = []

    async def build(name: str = "http", **cfg: Any) -> HttpReceiver:
        config = HttpConfig(**{"endpoint": "127.0.0.1:0", **cfg})
        assert config.validate() == []
        receiver = HttpReceiver(
            component_settings(tel, ComponentKind.RECEIVER, name), config, {Signal.METRICS: Sink()}
        )
        made.append(receiver)
        await receiver.start()
        return receiver

    yield build
    for r in made:
        await r.shutdown()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def refused(tel: Telemetry, reason: str, receiver: str = "http") -> float:
    return tel.value("receiver_refused_points_total", reason=reason, receiver=receiver)


async def post(session: aiohttp.ClientSession, port: int | None, payload: Any = None) -> tuple[int, Any]:
    body = json.dumps(payload if payload is not None else {"name": "legit", "value": 1}).encode()
    url = f"http://127.0.0.1:{port}/v1/metrics"
    async with session.post(url, data=body, headers=JSON) as resp:
        return resp.status, await resp.json()


async def half_open(port: int | None, data: bytes = HALF_HEAD) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server closed the connection (EOF or reset), reading whatever it sent first."""
    try:
        async with asyncio.timeout(BOUND_S):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        pass
    return True


# -- header-read and idle timeouts ----------------------------------------------------------------------
async def test_half_sent_headers_are_closed_and_counted_while_legit_requests_are_answered(
    http: Build, tel: Telemetry, session: aiohttp.ClientSession
) -> None:
    r = await http(header_timeout=0.3)
    slow = [await half_open(r.port) for _ in range(50)]
    await wait_until(lambda: len(r._gate) == 50, "len(r._gate) == 50", BOUND_S)
    # Liveness during the abuse: a real client's request is answered.
    assert (await post(session, r.port))[0] == 200
    assert all(await asyncio.gather(*(closed_by_server(reader) for reader, _ in slow)))
    await wait_until(
        lambda: refused(tel, "header_timeout") == 50, "refused(tel, 'header_timeout') == 50", BOUND_S
    )
    assert len(r._gate) <= 1  # the aiohttp client may keep its connection
    for _, writer in slow:
        writer.close()


async def test_a_connection_that_never_sends_a_byte_is_closed_too(http: Build, tel: Telemetry) -> None:
    r = await http(header_timeout=0.2)
    reader, writer = await half_open(r.port, b"")
    assert await closed_by_server(reader)
    assert refused(tel, "header_timeout") == 1
    writer.close()


async def test_header_timeout_restarts_with_each_request_on_a_kept_alive_connection(
    http: Build, tel: Telemetry
) -> None:
    r = await http(header_timeout=0.3, idle_timeout=60)
    reader, writer = await half_open(r.port, b"")
    body = b'{"name":"a","value":1}'
    request = (
        b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    for _ in range(3):  # whole requests, each well within the timeout, keep the connection
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    assert refused(tel, "header_timeout") == 0
    writer.write(HALF_HEAD)  # then half of a fourth one
    assert await closed_by_server(reader)
    assert refused(tel, "header_timeout") == 1
    writer.close()


async def test_an_idle_kept_alive_connection_closes_after_idle_timeout_uncounted(
    http: Build, tel: Telemetry
) -> None:
    r = await http(header_timeout=60, idle_timeout=0.3)
    reader, writer = await half_open(r.port, b"")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await closed_by_server(reader)
    assert refused(tel, "header_timeout") == 0
    writer.close()


async def test_slow_bodies_still_get_read_timeout_not_header_timeout(http: Build, tel: Telemetry) -> None:
    r = await http(header_timeout=0.2, read_timeout=0.5)
    reader, writer = await half_open(
        r.port,
        b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{",
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
    assert head.startswith(b"HTTP/1.1 408")
    assert refused(tel, "read_timeout") == 1 and refused(tel, "header_timeout") == 0
    writer.close()


# -- connection caps ------------------------------------------------------------------------------------
async def test_at_max_connections_the_oldest_idle_connection_makes_room(
    http: Build, tel: Telemetry, session: aiohttp.ClientSession
) -> None:
    r = await http(max_connections=5, header_timeout=60)
    slow = [await half_open(r.port) for _ in range(5)]
    await wait_until(lambda: len(r._gate) == 5, "len(r._gate) == 5", BOUND_S)
    assert (await post(session, r.port))[0] == 200  # answered: the oldest half-open one was closed
    assert await closed_by_server(slow[0][0])
    assert refused(tel, "too_many_connections") == 1
    assert len(r._gate) == 5
    for _, writer in slow:
        writer.close()


async def test_when_every_connection_is_inside_a_request_the_new_one_is_refused(
    http: Build, tel: Telemetry
) -> None:
    r = await http(max_connections=3, header_timeout=60)
    busy_head = (
        b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n["
    )
    busy = [await half_open(r.port, busy_head) for _ in range(3)]
    await wait_until(lambda: r._bytes.in_use == 3000, "all three reading their bodies", BOUND_S)
    reader, writer = await half_open(r.port, b"")
    assert await closed_by_server(reader)
    assert refused(tel, "too_many_connections") == 1
    assert len(r._gate) == 3
    writer.close()
    for _, w in busy:
        w.close()


async def test_the_process_fd_budget_spans_receivers(
    http: Build, tel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    fds = netguard.fd_budget()
    monkeypatch.setattr(fds, "limit", fds.in_use + 3)
    one = await http("http/one", header_timeout=60)
    two = await http("http/two", header_timeout=60)
    busy_head = (
        b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10\r\n\r\n["
    )
    busy = [await half_open(one.port, busy_head) for _ in range(3)]
    await wait_until(lambda: one._bytes.in_use == 30, "one._bytes.in_use == 30", BOUND_S)
    reader, writer = await half_open(two.port, b"")
    assert await closed_by_server(reader)
    assert refused(tel, "too_many_connections", "http/two") == 1
    assert refused(tel, "too_many_connections", "http/one") == 0
    writer.close()
    for _, w in busy:
        w.close()


# -- request bytes in flight ----------------------------------------------------------------------------
async def test_bodies_over_the_budget_get_429_before_they_are_read(
    http: Build, tel: Telemetry, session: aiohttp.ClientSession
) -> None:
    r = await http(max_request_body_size=40_000, max_request_bytes_in_flight=64_000)
    holder_head = (
        b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 40000\r\n\r\n["
    )
    _reader, writer = await half_open(r.port, holder_head)
    await wait_until(lambda: r._bytes.in_use == 40_000, "r._bytes.in_use == 40_000", BOUND_S)
    big = [{"name": "m", "value": 1, "tags": {"pad": "x" * 3000}}] * 10  # ~33 kB
    url = f"http://127.0.0.1:{r.port}/v1/metrics"
    async with session.post(url, data=json.dumps(big).encode(), headers=JSON) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["code"] == "memory_budget"
    assert refused(tel, "memory_budget") == 1
    assert (await post(session, r.port))[0] == 200  # a small one still fits
    writer.close()
    await wait_until(lambda: r._bytes.in_use == 0, "r._bytes.in_use == 0", BOUND_S)
    status, answer = await post(session, r.port, big)
    assert status == 200 and answer["accepted"] == 10


async def test_chunked_and_inflating_bodies_are_held_as_they_arrive(
    http: Build, tel: Telemetry, session: aiohttp.ClientSession
) -> None:
    r = await http(max_request_body_size=200_000, max_request_bytes_in_flight=200_000)
    holder_head = (
        b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 150000\r\n\r\n["
    )
    _reader, writer = await half_open(r.port, holder_head)
    await wait_until(lambda: r._bytes.in_use == 150_000, "r._bytes.in_use == 150_000", BOUND_S)
    payload = json.dumps([{"name": "m", "value": 1, "tags": {"pad": "x" * 3000}}] * 30).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    url = f"http://127.0.0.1:{r.port}/v1/metrics"
    async with session.post(url, data=chunks(), headers=JSON) as resp:  # no Content-Length
        assert resp.status == 429 and (await resp.json())["code"] == "memory_budget"
    packed = gzip.compress(payload)  # ~1 kB on the wire, 90 kB inflated
    assert len(packed) < 50_000
    async with session.post(url, data=packed, headers={**JSON, "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 429 and (await resp.json())["code"] == "memory_budget"
    assert refused(tel, "memory_budget") == 2
    writer.close()
    await wait_until(lambda: r._bytes.in_use == 0, "r._bytes.in_use == 0", BOUND_S)
    async with session.post(url, data=packed, headers={**JSON, "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 200


async def test_the_request_byte_budget_is_process_wide_across_http_and_otlp(
    http: Build, tel: Telemetry, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netguard.request_bytes(), "limit", 64_000)
    r = await http(max_request_body_size=40_000)
    otlp = OtlpReceiver(
        component_settings(tel, ComponentKind.RECEIVER, "otlp"),
        OtlpConfig(grpc=None, http="127.0.0.1:0", max_request_body_size=40_000),
        {Signal.METRICS: Sink()},
    )
    await otlp.start()
    try:
        holder_head = (
            b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 40000\r\n\r\n["
        )
        _reader, writer = await half_open(r.port, holder_head)
        await wait_until(
            lambda: netguard.request_bytes().in_use == 40_000,
            "netguard.request_bytes().in_use == 40_000",
            BOUND_S,
        )
        url = f"http://127.0.0.1:{otlp.http_port}/v1/metrics"
        async with session.post(url, data=b"{" + b" " * 30_000 + b"}", headers=JSON) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        assert refused(tel, "memory_budget", "otlp") == 1
        writer.close()
        await wait_until(
            lambda: netguard.request_bytes().in_use == 0, "netguard.request_bytes().in_use == 0", BOUND_S
        )
        async with session.post(url, data=b"{" + b" " * 30_000 + b"}", headers=JSON) as resp:
            assert resp.status == 200
    finally:
        await otlp.shutdown()


def test_config_checks() -> None:
    problems = dict(
        HttpConfig(max_request_bytes_in_flight=1024, max_connections=0, header_timeout=0).validate()
    )
    assert "max_request_bytes_in_flight" in problems and "max_connections" in problems
    assert problems["header_timeout"] == "must be greater than 0"
    otlp = dict(OtlpConfig(max_request_bytes_in_flight=1024, idle_timeout=0).validate())
    assert "max_request_bytes_in_flight" in otlp and "idle_timeout" in otlp
