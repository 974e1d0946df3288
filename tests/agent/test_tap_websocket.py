"""``/api/tap`` on the telemetry endpoint: a real aiohttp WebSocket client watches StatsD lines sent
with the ``statsd`` client and a span sent with the OpenTelemetry SDK; filters in the query; a bad
query is refused naming the parameter; with a token configured the stream needs it; and a client that
stops reading neither slows nor blocks the pipeline (its buffer is bounded, the rest dropped)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import statsd

from agent.admin import AdminServer
from agent.config import build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port, wait_until

SAFETY_S = 30.0
"""Bounds a wait for a message that is failing to come anyway."""


class Running:
    def __init__(self, agent: Agent, admin: AdminServer, statsd_port: int, otlp_http: int) -> None:
        self.agent, self.admin, self.statsd_port, self.otlp_http = agent, admin, statsd_port, otlp_http

    def url(self, query: str = "") -> str:
        return f"http://127.0.0.1:{self.admin.port}/api/tap{query}"


def config_data(statsd_port: int, otlp_http: int, telemetry: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "receivers": {
            "statsd": {"udp": f"127.0.0.1:{statsd_port}", "flush_interval": "50ms"},
            "otlp": {"grpc": None, "http": f"127.0.0.1:{otlp_http}"},
        },
        "exporters": {"debug": {"verbosity": "basic"}},
        "service": {
            "telemetry": {"endpoint": "127.0.0.1:0", **(telemetry or {})},
            "pipelines": {
                "metrics": {"receivers": ["statsd"], "exporters": ["debug"]},
                "traces": {"receivers": ["otlp"], "exporters": ["debug"]},
                "logs": {"receivers": ["otlp"], "exporters": ["debug"]},
            },
        },
    }


async def start(telemetry: dict[str, Any] | None = None) -> Running:
    statsd_port, otlp_http = free_port(socket.SOCK_DGRAM), free_port()
    agent = Agent(build_config(config_data(statsd_port, otlp_http, telemetry), builtin_factories()))
    admin = AdminServer(agent, "127.0.0.1:0")
    await admin.start()
    await agent.start()
    return Running(agent, admin, statsd_port, otlp_http)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    r = await start()
    yield r
    await r.agent.stop()
    await r.admin.shutdown()


async def _subscribed(ws: aiohttp.ClientWebSocketResponse) -> list[str]:
    hello = await ws.receive_json(timeout=SAFETY_S)
    assert hello["type"] == "subscribed"
    edges: list[str] = hello["edges"]
    return edges


async def _until(ws: aiohttp.ClientWebSocketResponse, want: int, kind: str = "point") -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len([m for m in got if m["type"] == kind]) < want:
        got.append(await ws.receive_json(timeout=SAFETY_S))
    return got


async def test_statsd_points_stream_with_their_filters(running: Running) -> None:
    client = statsd.StatsClient("127.0.0.1", running.statsd_port)
    query = "?component=statsd&metric=shop.*&match=env%3Dprod&signal=metrics&format=json"
    async with aiohttp.ClientSession() as http, http.ws_connect(running.url(query)) as ws:
        assert await _subscribed(ws) == ["statsd out"]
        client.incr("shop.orders,env=dev")  # InfluxDB-style tags in the name
        client.timing("shop.latency,env=prod", 12)
        client.incr("shop.orders,env=prod", 2)
        client.gauge("other.gauge,env=prod", 3)
        points = [m for m in await _until(ws, 2) if m["type"] == "point"]
    assert {(p["name"], p["labels"]["env"]) for p in points} == {
        ("shop.latency", "prod"),
        ("shop.orders", "prod"),
    }
    orders = next(p for p in points if p["name"] == "shop.orders")
    assert orders["value"] == 2.0 and orders["kind"] == "sum" and orders["component"] == "statsd"
    latency = next(p for p in points if p["name"] == "shop.latency")
    assert latency["kind"] == "histogram" and latency["histogram"]["count"] == 1
    assert latency["histogram"]["sum"] == pytest.approx(0.012)


def _send_span(url: str) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=url, timeout=10)))
    with provider.get_tracer("t").start_as_current_span("charge", attributes={"card": "4111"}):
        pass
    provider.shutdown()


async def test_an_sdk_span_streams_with_its_main_fields(running: Running) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(running.url("?signal=traces")) as ws:
        assert "otlp out" in await _subscribed(ws)
        await asyncio.to_thread(_send_span, f"http://127.0.0.1:{running.otlp_http}/v1/traces")
        [span] = [m for m in await _until(ws, 1, "span") if m["type"] == "span"]
    assert span["name"] == "charge" and span["component"] == "otlp" and span["signal"] == "traces"
    assert span["attributes"] == {"card": "4111"} and span["resource"]["service.name"] == "checkout"
    assert len(span["trace_id"]) == 32 and len(span["span_id"]) == 16 and span["duration_ms"] >= 0


def _send_log(url: str) -> None:
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    provider = LoggerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=url, timeout=10)))
    logger = provider.get_logger("t")
    logger.emit(body="disk almost full", severity_number=SeverityNumber.WARN, attributes={"disk": "sda"})
    logger.emit(body="payment failed", severity_number=SeverityNumber.ERROR, attributes={"disk": "sdb"})
    provider.shutdown()


async def test_sdk_log_records_stream_filtered_by_attribute(running: Running) -> None:
    url = running.url("?signal=logs&match=disk%3Dsdb")
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        assert "otlp out" in await _subscribed(ws)
        await asyncio.to_thread(_send_log, f"http://127.0.0.1:{running.otlp_http}/v1/logs")
        [record] = [m for m in await _until(ws, 1, "log") if m["type"] == "log"]
    assert record["body"] == "payment failed" and record["name"] == "payment failed"
    assert record["severity_number"] == 17 and record["attributes"] == {"disk": "sdb"}
    assert record["resource"]["service.name"] == "checkout" and record["signal"] == "logs"


@pytest.mark.parametrize(
    ("query", "named"),
    [("?match=nomatcher", "not a label matcher"), ("?signal=spans", "signal"), ("?format=text", "format")],
)
async def test_a_bad_query_is_refused_naming_the_parameter(running: Running, query: str, named: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(running.url(query)) as resp:
        assert resp.status == 400
        assert named in await resp.text()


async def test_with_a_token_the_stream_needs_it_and_redacts() -> None:
    r = await start({"auth": {"bearer_token": "t0k"}, "tap": {"redact": ["card", "user"]}})
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(r.url()) as resp:
                assert resp.status == 401
            async with http.get(r.url(), headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401
            auth = {"Authorization": "Bearer t0k"}
            async with http.ws_connect(r.url("?signal=traces,metrics"), headers=auth) as ws:
                await _subscribed(ws)
                await asyncio.to_thread(_send_span, f"http://127.0.0.1:{r.otlp_http}/v1/traces")
                statsd.StatsClient("127.0.0.1", r.statsd_port).incr("login,user=alice")
                got = await _until(ws, 1, "span")
                while not any(m["type"] == "point" for m in got):
                    got.append(await ws.receive_json(timeout=SAFETY_S))
        span = next(m for m in got if m["type"] == "span")
        point = next(m for m in got if m["type"] == "point")
        assert span["attributes"] == {"card": "<redacted>"}
        assert point["labels"] == {"user": "<redacted>"}
    finally:
        await r.agent.stop()
        await r.admin.shutdown()


def _stalled_client(port: int) -> socket.socket:
    """A WebSocket client that opens a stream and never reads: a tiny receive buffer, so the
    server's writes stall soon (the client's own socket option; no sysctl)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"GET /api/tap?component=statsd HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    return sock


async def test_a_client_that_stops_reading_does_not_hold_the_pipeline() -> None:
    r = await start({"tap": {"buffer": 10, "rate_limit_per_s": 1_000_000}})
    t = r.agent.telemetry
    stalled = await asyncio.to_thread(_stalled_client, r.admin.port)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await wait_until(lambda: r.agent.tap.subscribers == 1, "the stalled stream to subscribe")
        async with aiohttp.ClientSession() as http, http.ws_connect(r.url("?metric=last.*")) as reader:
            await _subscribed(reader)

            def dropped() -> float:
                return sum(t.value("tap_dropped_total", reason=x) for x in ("buffer", "behind", "rate"))

            # Flushes of 200 new series each until the stalled stream drops (its writes stall once the
            # socket buffers are full); bounded in count. Every point still reaches the exporter.
            sent = 0
            for round_ in range(400):
                lines = "\n".join(f"r{round_}.s{i}:1|c" for i in range(200)).encode()
                udp.sendto(lines, ("127.0.0.1", r.statsd_port))
                sent += 200
                await wait_until(
                    lambda sent=sent: t.value("exporter_sent_points_total", exporter="debug") >= sent,
                    "the flush to reach the exporter",
                )
                if dropped() > 0:
                    break
            assert dropped() > 0, "the stalled stream never dropped: its buffer would be unbounded"
            [stuck] = [s for s in r.agent.tap._subs if s.filter.component == "statsd"]
            assert len(stuck.items) <= 10
            # A stream that reads still gets what comes next, while the stalled one holds nothing up.
            udp.sendto(b"last.one:1|c", ("127.0.0.1", r.statsd_port))
            [point] = [m for m in await _until(reader, 1) if m["type"] == "point"]
            assert point["name"] == "last.one"
    finally:
        udp.close()
        stalled.close()
        await r.agent.stop()
        await r.admin.shutdown()


async def test_closing_the_stream_removes_the_taps(running: Running) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(running.url()) as ws:
        await _subscribed(ws)
        assert running.agent.tap.subscribers == 1
        assert any(e.link.tap is not None for e in running.agent._tap_edges())
    await wait_until(lambda: running.agent.tap.subscribers == 0, "the subscription to end")
    await wait_until(
        lambda: all(e.link.tap is None for e in running.agent._tap_edges()), "the taps to be removed"
    )
    assert json.dumps(running.agent.status())  # still answers


async def _upgrade_status(url: str, origin: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(url, origin=origin, headers=headers) as ws:
                await _subscribed(ws)
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def test_a_page_from_another_origin_is_refused_without_a_token(running: Running) -> None:
    # A browser sends its page's Origin: any web page could otherwise read the stream of a local agent.
    assert await _upgrade_status(running.url(), "http://evil.example") == 403
    assert await _upgrade_status(running.url(), "null") == 403  # a file:// page
    assert await _upgrade_status(running.url(), f"http://127.0.0.1:{running.admin.port}") == 101
    async with aiohttp.ClientSession() as http, http.get(running.url(), headers={"Origin": "null"}) as resp:
        assert "allowed_origins" in await resp.text()


async def test_allowed_origins_and_a_token_let_pages_in() -> None:
    r = await start({"tap": {"allowed_origins": ["http://dash.example:3000"]}})
    try:
        assert await _upgrade_status(r.url(), "http://dash.example:3000") == 101
        assert await _upgrade_status(r.url(), "http://other.example") == 403
    finally:
        await r.agent.stop()
        await r.admin.shutdown()
    r = await start({"auth": {"bearer_token": "t0k"}})
    try:
        assert await _upgrade_status(r.url("?access_token=t0k"), "null") == 101
        assert await _upgrade_status(r.url(), "null") == 401
    finally:
        await r.agent.stop()
        await r.admin.shutdown()
