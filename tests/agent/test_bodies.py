"""The capped body reader (agent/bodies.py): hostile bodies against the reader behind a real aiohttp
server, then against each HTTP-serving receiver (http JSON, OTLP/HTTP) through a real aiohttp client.

Every refusal is checked for its status, its reason (the ``refused{reason}`` label), its message and
the request bytes given back; every receiver test then sends a good body to show the port still works.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import cramjam
import numpy as np
import pytest
from aiohttp import web
from google.protobuf import json_format
from google.rpc import code_pb2
from multidict import CIMultiDict
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

import receivers.http
import receivers.otlp
from agent import bodies, netguard
from agent.component import ComponentId, ComponentKind, Settings, Signal
from agent.model import Batch, MetricBatch
from agent.telemetry import ComponentTelemetry, Telemetry

CAP = 2**20
"""The body cap of every server in these tests."""
BOUND_S = 30.0
"""Safety bound on waits for an answer: never reached unless the behaviour is broken."""


def gz(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, level)


def zst(data: bytes, level: int = 3) -> bytes:
    return bytes(cramjam.zstd.compress(data, level))


@functools.cache
def bomb(encoding: str) -> bytes:
    """64 MiB of zeros (64 times the cap) in a body well under the cap."""
    zeros = bytes(64 * CAP)
    packed = gz(zeros, 9) if encoding == "gzip" else zst(zeros, 19)
    assert len(packed) < CAP // 8
    return packed


@functools.cache
def noise(n: int) -> bytes:
    """``n`` incompressible bytes (a compressed body about as large as the raw one)."""
    return np.random.default_rng(12).integers(0, 256, n, dtype=np.uint8).tobytes()


def compress(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gz(data)
    return zst(data) if encoding == "zstd" else data


# -- the codings, unit by unit -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "coding"),
    [
        ([], ""),
        ([""], ""),
        (["identity"], ""),
        (["gzip"], "gzip"),
        (["x-gzip"], "gzip"),
        ([" GZip "], "gzip"),
        (["zstd"], "zstd"),
        (["ZSTD"], "zstd"),
    ],
)
def test_content_encodings_taken(values: list[str], coding: str) -> None:
    assert bodies.content_encoding(values) == coding


@pytest.mark.parametrize(
    "values",
    [["deflate"], ["br"], ["compress"], ["snappy"], ["gzip, zstd"], ["gzip, gzip"], ["identity", "gzip"]],
)
def test_other_and_stacked_content_encodings_are_refused(values: list[str]) -> None:
    with pytest.raises(bodies.BodyRefused) as info:
        bodies.content_encoding(values)
    assert (info.value.status, info.value.reason) == (415, "unsupported_encoding")
    assert info.value.message.endswith("is not supported: send gzip, zstd or none")
    assert json.dumps(", ".join(v.strip() for v in values)) in info.value.message


def test_an_unsupported_encoding_is_quoted_and_cut_in_the_message() -> None:
    with pytest.raises(bodies.BodyRefused) as info:
        bodies.content_encoding(['x"' * 100])
    shown = info.value.message.removeprefix("Content-Encoding ").removesuffix(
        " is not supported: send gzip, zstd or none"
    )
    assert json.loads(shown) == 'x"' * 20 + "…"  # quoted as a JSON string, cut at 40 characters


def test_gzip_across_chunks_and_member_boundaries() -> None:
    data = gz(b"[1,") + gz(b"2]")
    for cut in range(1, len(data)):
        inflater = bodies.GzipInflater(1024)
        inflater.feed(data[:cut])
        inflater.feed(data[cut:])
        assert inflater.finish() == b"[1,2]"


def test_gzip_bomb_never_inflates_past_the_cap() -> None:
    cap = 100_000
    inflater = bodies.GzipInflater(cap)
    packed = bomb("gzip")
    with pytest.raises(bodies.BodyRefused) as info:
        for i in range(0, len(packed), 4096):
            inflater.feed(packed[i : i + 4096])
    assert (info.value.status, info.value.reason) == (413, "body_too_large")
    assert info.value.message == "body inflates past max_request_body_size (100000B)"
    assert inflater.inflated == cap + 1


def test_gzip_inflater_refuses_zlib_and_raw_deflate_streams() -> None:
    """A ``deflate`` body sent as gzip is refused as invalid, never read as something else."""
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    for data in (zlib.compress(b"x" * 10), raw_deflate.compress(b"x" * 10) + raw_deflate.flush()):
        with pytest.raises(bodies.BodyRefused) as info:
            bodies.GzipInflater(1000).feed(data)
        assert (info.value.status, info.value.reason) == (400, "invalid_compression")


def test_zstd_limits() -> None:
    frame = zst(b"abc" * 1000)
    assert bodies.zstd_decompress(frame, 3000) == b"abc" * 1000
    assert bodies.zstd_decompress(frame + frame, 6000) == b"abc" * 2000  # concatenated frames
    with pytest.raises(bodies.BodyRefused) as over:
        bodies.zstd_decompress(frame, 2999)
    assert (over.value.status, over.value.reason) == (413, "body_too_large")
    with pytest.raises(bodies.BodyRefused) as bomb_refused:
        bodies.zstd_decompress(bomb("zstd"), CAP)
    assert "inflates past max_request_body_size (1MiB)" in bomb_refused.value.message
    for broken in (frame[:-4], frame + b"junk", b"not zstd at all", b""):
        with pytest.raises(bodies.BodyRefused) as info:
            bodies.zstd_decompress(broken, 10_000)
        assert (info.value.status, info.value.reason) == (400, "invalid_compression")
        assert info.value.message.startswith("body is not valid zstd: ")


# -- the reader behind a real aiohttp server ---------------------------------------------------------
@dataclass
class Reader:
    """An aiohttp server whose one handler reads its body with :func:`bodies.read_body` and echoes it,
    or answers the refusal's status with ``{"reason", "message"}``."""

    url: str
    budget: netguard.ByteBudget
    session: aiohttp.ClientSession
    outcomes: list[bytes | bodies.BodyRefused] = field(default_factory=list)

    async def post(
        self, data: Any, encoding: str = "", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes | dict[str, Any], CIMultiDict[str]]:
        sent = {"Content-Encoding": encoding} if encoding else {}
        async with self.session.post(self.url, data=data, headers={**sent, **(headers or {})}) as resp:
            answer: bytes | dict[str, Any] = await resp.json() if resp.status != 200 else await resp.read()
            return resp.status, answer, CIMultiDict(resp.headers)

    async def refused(self, data: Any, encoding: str = "", **kwargs: Any) -> tuple[int, str, str]:
        """(status, reason, message) of a body that must be refused; checks its bytes were given back."""
        status, answer, headers = await self.post(data, encoding, **kwargs)
        assert isinstance(answer, dict), f"accepted: {status}"
        assert isinstance(self.outcomes[-1], bodies.BodyRefused)
        assert self.budget.in_use == 0
        if status == 429:
            assert headers["Retry-After"] == "1"
        else:
            assert "Retry-After" not in headers
        return status, answer["reason"], answer["message"]


StartReader = Callable[..., Awaitable[Reader]]


@pytest.fixture
async def reader() -> AsyncIterator[StartReader]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(max_bytes: int = CAP, timeout_s: float = BOUND_S, budget_bytes: int = 64 * CAP) -> Reader:
        budget = netguard.ByteBudget(budget_bytes)
        session = aiohttp.ClientSession()
        sessions.append(session)

        async def handle(request: web.Request) -> web.StreamResponse:
            with budget.lease() as lease:
                try:
                    body = await bodies.read_body(request, lease, max_bytes=max_bytes, timeout_s=timeout_s)
                except bodies.BodyRefused as exc:
                    served.outcomes.append(exc)
                    return web.json_response(
                        {"reason": exc.reason, "message": exc.message},
                        status=exc.status,
                        headers=exc.retry_after_header,
                    )
            served.outcomes.append(body)
            return web.Response(body=body)

        app = web.Application()
        app.router.add_post("/", handle)
        # As the receivers do: aiohttp would inflate bodies itself, uncapped.
        runner = web.AppRunner(app, auto_decompress=False, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        served = Reader(f"http://127.0.0.1:{port}/", budget, session)
        return served

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("encoding", ["", "gzip", "zstd"])
async def test_bodies_are_read_whole_and_the_bytes_given_back(reader: StartReader, encoding: str) -> None:
    r = await reader()
    small = b'{"name": "a", "value": 1}'
    large = noise(CAP - 1000)  # zstd: past ZSTD_THREAD_BYTES raw, so inflated in a worker thread
    assert len(compress(encoding, large)) >= bodies.ZSTD_THREAD_BYTES
    for data in (small, large, b""):
        if encoding and not data:
            continue  # an empty gzip or zstd body is no stream at all (below)
        status, answer, _ = await r.post(compress(encoding, data), encoding)
        assert (status, answer) == (200, data)
        assert r.budget.in_use == 0


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_concatenated_members_and_frames_are_one_body(reader: StartReader, encoding: str) -> None:
    r = await reader()
    data = compress(encoding, b"[1,") + compress(encoding, b"2]")
    status, answer, _ = await r.post(data, encoding)
    assert (status, answer) == (200, b"[1,2]")


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_a_bomb_is_refused_413_and_never_inflated_past_the_cap(
    reader: StartReader, encoding: str
) -> None:
    r = await reader()
    status, reason, message = await r.refused(bomb(encoding), encoding)
    assert (status, reason) == (413, "body_too_large")
    assert message == "body inflates past max_request_body_size (1MiB)"


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_the_cap_holds_after_inflation_to_the_byte(reader: StartReader, encoding: str) -> None:
    r = await reader(max_bytes=100_000)
    exact = b"0123456789" * 10_000  # compressible: raw well under the cap, inflated exactly at it
    status, answer, _ = await r.post(compress(encoding, exact), encoding)
    assert (status, answer) == (200, exact)
    status, reason, message = await r.refused(compress(encoding, exact + b"!"), encoding)
    assert (status, reason) == (413, "body_too_large") and "inflates past" in message


@pytest.mark.parametrize("encoding", ["", "gzip", "zstd"])
async def test_a_raw_body_over_the_cap_is_refused_by_length_or_while_streaming(
    reader: StartReader, encoding: str
) -> None:
    r = await reader(max_bytes=100_000)
    over = compress(encoding, noise(200_000))
    assert len(over) > 100_000
    status, reason, message = await r.refused(over, encoding)  # by Content-Length, nothing read
    assert (status, reason) == (413, "body_too_large")
    assert message == "body is larger than max_request_body_size (100000B)"

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to check up front
        for i in range(0, len(over), 8192):
            yield over[i : i + 8192]

    assert await r.refused(chunks(), encoding) == (413, "body_too_large", message)


async def test_a_content_length_over_the_cap_is_refused_before_the_body_arrives(
    reader: StartReader,
) -> None:
    r = await reader(max_bytes=100_000)
    port = r.url.split(":")[2].rstrip("/")
    # A raw socket: aiohttp's client holds the request head back until the first body byte.
    stream, writer = await asyncio.open_connection("127.0.0.1", int(port))
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100001\r\n\r\n")
    await writer.drain()
    try:
        head = await asyncio.wait_for(stream.readuntil(b"\r\n"), BOUND_S)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    refusal = r.outcomes[-1]
    assert isinstance(refusal, bodies.BodyRefused) and "is larger than" in refusal.message


async def test_empty_gzip_members_count_against_the_raw_cap(reader: StartReader) -> None:
    """Members that inflate to nothing cost no inflated bytes: the raw count stops them."""
    r = await reader(max_bytes=100_000)
    empties = gz(b"") * (100_000 // len(gz(b"")) + 1)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(empties), 8192):
            yield empties[i : i + 8192]

    status, reason, message = await r.refused(chunks(), "gzip")
    assert (status, reason) == (413, "body_too_large") and "is larger than" in message


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", b"not gzip at all"),
        ("gzip", gz(b'[{"name": "a", "value": 1}]')[:-6]),  # truncated
        ("gzip", gz(b'[{"name": "a", "value": 1}]') + b"trailing junk"),
        ("gzip", zlib.compress(b"[1]")),  # a zlib ("deflate") stream labelled gzip
        ("gzip", b""),
        ("zstd", b"not zstd at all"),
        ("zstd", zst(b'[{"name": "a", "value": 1}]')[:-4]),  # truncated
        ("zstd", zst(b'[{"name": "a", "value": 1}]') + b"trailing junk"),
        ("zstd", b""),
    ],
)
async def test_corrupt_and_truncated_streams_are_refused_400(
    reader: StartReader, encoding: str, data: bytes
) -> None:
    r = await reader()
    status, reason, message = await r.refused(data, encoding)
    assert (status, reason) == (400, "invalid_compression")
    assert message.startswith(f"body is not valid {encoding}: ")


@pytest.mark.parametrize("encoding", ["deflate", "br", "gzip, zstd", "identity, gzip"])
async def test_unknown_encodings_are_refused_415(reader: StartReader, encoding: str) -> None:
    r = await reader()
    status, reason, message = await r.refused(b"[]", encoding)
    assert (status, reason) == (415, "unsupported_encoding") and encoding in message


async def test_a_repeated_content_encoding_header_is_refused_415(reader: StartReader) -> None:
    r = await reader()
    headers = CIMultiDict([("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")])
    async with r.session.post(r.url, data=gz(gz(b"[]")), headers=headers) as resp:
        assert resp.status == 415 and (await resp.json())["reason"] == "unsupported_encoding"


@pytest.mark.parametrize("encoding", ["", "gzip", "zstd"])
async def test_a_body_that_stops_arriving_is_refused_408(reader: StartReader, encoding: str) -> None:
    r = await reader(timeout_s=0.2)
    data = compress(encoding, b'[{"name": "a", "value": 1}]' * 100)
    stop = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield data[: len(data) // 2]
        await stop.wait()  # the client sends nothing more until the test is over
        yield data[len(data) // 2 :]

    try:
        # The answer comes while the client is still "sending": aiohttp reads it concurrently.
        status, reason, message = await asyncio.wait_for(r.refused(stalls(), encoding), BOUND_S)
    finally:
        stop.set()
    assert (status, reason) == (408, "read_timeout")
    assert message == "the body did not arrive within 200ms"


@pytest.mark.parametrize("encoding", ["", "gzip", "zstd"])
async def test_bytes_past_the_budget_are_refused_429_as_they_arrive_or_inflate(
    reader: StartReader, encoding: str
) -> None:
    r = await reader(budget_bytes=150_000)
    with r.budget.lease() as other:  # another request holds 100 kB: 50 kB are left
        assert other.cover(100_000)
        data = b'{"name": "a", "value": 1}' * 4000  # 100 kB, under the cap, over what is left

        async def chunks() -> AsyncIterator[bytes]:  # chunked: the bytes are taken as they come
            for i in range(0, len(data), 8192):
                yield data[i : i + 8192]

        # gzip and zstd: a small body, under the budget by Content-Length, that inflates past it.
        sent = compress(encoding, data) if encoding else chunks()
        status, answer, headers = await r.post(sent, encoding)
        assert status == 429 and isinstance(answer, dict) and answer["reason"] == "memory_budget"
        assert headers["Retry-After"] == "1"
        assert r.budget.in_use == 100_000
    assert r.budget.in_use == 0
    status, body, _ = await r.post(compress(encoding, data), encoding)  # the budget free again
    assert (status, body) == (200, data)


# -- each HTTP-serving receiver, through a real aiohttp client ---------------------------------------
class Sink:
    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def consume(self, batch: Batch) -> None:
        self.batches.append(batch)

    @property
    def points(self) -> int:
        return sum(len(b.points) for b in self.batches if isinstance(b, MetricBatch))


def _otlp_json(value: float) -> bytes:
    request = ExportMetricsServiceRequest()
    metric = request.resource_metrics.add().scope_metrics.add().metrics.add(name="m")
    metric.gauge.data_points.add(time_unix_nano=1, as_double=value)
    return json.dumps(json_format.MessageToDict(request)).encode()


@dataclass
class Served:
    """A receiver under test: its kind, a good JSON body it takes (one point), its counters."""

    kind: str
    url: str
    good: bytes
    tel: Telemetry
    sink: Sink
    session: aiohttp.ClientSession

    async def post(self, data: Any, encoding: str = "") -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if encoding:
            headers["Content-Encoding"] = encoding
        async with self.session.post(self.url, data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    def refused(self, reason: str) -> float:
        return self.tel.value("receiver_refused_points_total", reason=reason)

    async def takes_a_good_body(self, encoding: str = "") -> None:
        before = self.sink.points
        status, _ = await self.post(compress(encoding, self.good), encoding)
        assert status == 200 and self.sink.points == before + 1

    def says(self, answer: dict[str, Any], reason: str, grpc_code: int) -> bool:
        """Whether the JSON error answer names the refusal: the reason (http), the gRPC code (otlp)."""
        if self.kind == "http":
            return bool(answer["code"] == reason and answer["error"])
        return bool(answer["code"] == grpc_code and answer["message"])


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture(params=["http", "otlp"])
async def serve(request: pytest.FixtureRequest) -> AsyncIterator[Serve]:
    kind: str = request.param
    started: list[tuple[Any, aiohttp.ClientSession]] = []

    async def start(**cfg: Any) -> Served:
        tel, sink = Telemetry(), Sink()
        settings = Settings(
            id=ComponentId(kind),
            kind=ComponentKind.RECEIVER,
            telemetry=ComponentTelemetry(tel, "receiver", kind),
            logger=logging.getLogger(f"test.{kind}"),
        )
        receiver: Any
        if kind == "http":
            http_config = receivers.http.HttpConfig(endpoint="127.0.0.1:0", **cfg)
            assert http_config.validate() == []
            receiver = receivers.http.factory.create(settings, http_config, {Signal.METRICS: sink})
        else:
            otlp_config = receivers.otlp.OtlpConfig(grpc=None, http="127.0.0.1:0", **cfg)
            assert otlp_config.validate() == []
            receiver = receivers.otlp.factory.create(settings, otlp_config, {Signal.METRICS: sink})
        session = aiohttp.ClientSession()
        started.append((receiver, session))
        await receiver.start()
        port = receiver.port if kind == "http" else receiver.http_port
        good = b'{"name": "m", "value": 1}' if kind == "http" else _otlp_json(1.0)
        return Served(kind, f"http://127.0.0.1:{port}/v1/metrics", good, tel, sink, session)

    yield start
    for receiver, session in started:
        await session.close()
        await receiver.shutdown()


def test_every_body_reason_is_a_request_reason_of_both_receivers() -> None:
    """The receivers create a counter per reason up front and count with a lookup."""
    assert set(bodies.REASONS) <= set(receivers.http.REQUEST_REASONS)
    assert set(bodies.REASONS) <= set(receivers.otlp.REQUEST_REASONS)


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_receivers_take_gzip_and_zstd(serve: Serve, encoding: str) -> None:
    s = await serve()
    await s.takes_a_good_body(encoding)
    assert s.sink.points == 1


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_receivers_refuse_bombs_413(serve: Serve, encoding: str) -> None:
    s = await serve(max_request_body_size=CAP)
    status, answer = await s.post(bomb(encoding), encoding)
    assert status == 413 and s.says(answer, "body_too_large", code_pb2.RESOURCE_EXHAUSTED)
    assert "inflates past max_request_body_size (1MiB)" in (answer.get("error") or answer["message"])
    assert s.refused("body_too_large") == 1 and s.sink.points == 0
    await s.takes_a_good_body(encoding)


@pytest.mark.parametrize("encoding", ["", "gzip", "zstd"])
async def test_receivers_refuse_bodies_over_the_cap_raw_413(serve: Serve, encoding: str) -> None:
    s = await serve(max_request_body_size=64 * 1024)
    status, answer = await s.post(compress(encoding, noise(100_000)), encoding)
    assert status == 413 and s.says(answer, "body_too_large", code_pb2.RESOURCE_EXHAUSTED)
    assert s.refused("body_too_large") == 1
    await s.takes_a_good_body(encoding)


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", b"not gzip at all"),
        ("gzip", gz(b"[1, 2, 3]")[:-6]),
        ("zstd", b"not zstd at all"),
        ("zstd", zst(b"[1, 2, 3]")[:-4]),
    ],
)
async def test_receivers_refuse_corrupt_and_truncated_streams_400(
    serve: Serve, encoding: str, data: bytes
) -> None:
    s = await serve()
    status, answer = await s.post(data, encoding)
    assert status == 400 and s.says(answer, "invalid_compression", code_pb2.INVALID_ARGUMENT)
    assert s.refused("invalid_compression") == 1
    await s.takes_a_good_body(encoding)


@pytest.mark.parametrize("encoding", ["deflate", "br", "gzip, zstd"])
async def test_receivers_refuse_unknown_encodings_415(serve: Serve, encoding: str) -> None:
    s = await serve()
    status, answer = await s.post(b"{}", encoding)
    assert status == 415 and s.says(answer, "unsupported_encoding", code_pb2.INVALID_ARGUMENT)
    assert s.refused("unsupported_encoding") == 1
    await s.takes_a_good_body()


async def test_receivers_refuse_a_body_that_stops_arriving_408(serve: Serve) -> None:
    s = await serve(read_timeout=0.2)
    stop = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield s.good[:5]
        await stop.wait()  # the client sends nothing more until the test is over
        yield s.good[5:]

    try:
        status, answer = await asyncio.wait_for(s.post(stalls()), BOUND_S)
    finally:
        stop.set()
    assert status == 408 and s.says(answer, "read_timeout", code_pb2.DEADLINE_EXCEEDED)
    assert s.refused("read_timeout") == 1
    await s.takes_a_good_body()
