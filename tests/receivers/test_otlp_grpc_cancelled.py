"""OTLP/gRPC calls that end cancelled are counted, wherever they end: in gRPC's queue before the
receiver takes them (``cancelled_in_queue``), or in the receiver while it waits for their message
(``cancelled``, not ``invalid_request``). Real grpcio clients against the receiver's grpc.aio server."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent.component import ComponentKind, Signal
from agent.telemetry import Telemetry
from receivers.otlp import OtlpConfig, OtlpReceiver, _channelz_calls_started
from tests.conftest import Sink, component_settings, wait_until, wait_until_sync

EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
BOUND_S = 60.0
GRPC_QUEUE_HARD_LIMIT = 3000
"""gRPC core's default ``grpc.server.max_pending_requests_hard_limit``: calls queued past it are all
cancelled before the receiver sees them."""


def request() -> bytes:
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="calls")
    m.gauge.data_points.add(time_unix_nano=1_700_000_000_000_000_000, as_double=1.0)
    return req.SerializeToString()


Build = Callable[..., Awaitable[tuple[OtlpReceiver, Sink, Telemetry]]]


@pytest.fixture
async def otlp() -> AsyncIterator[Build]:
    made: list[OtlpReceiver] = []

    async def build(**cfg: Any) -> tuple[OtlpReceiver, Sink, Telemetry]:
        tel, sink = Telemetry(), Sink()
        config = OtlpConfig(**{"grpc": "127.0.0.1:0", "http": None, **cfg})
        assert config.validate() == []
        settings = component_settings(tel, ComponentKind.RECEIVER, "otlp")
        receiver = OtlpReceiver(settings, config, {Signal.METRICS: sink})
        made.append(receiver)
        await receiver.start()
        return receiver, sink, tel

    yield build
    for r in made:
        await r.shutdown()


def answered(tel: Telemetry) -> float:
    return tel.value("receiver_grpc_requests_total")


async def test_calls_grpc_cancels_in_its_queue_are_counted_exactly(otlp: Build) -> None:
    # The event loop is held while a real client starts more calls than gRPC queues for the
    # receiver (past GRPC_QUEUE_HARD_LIMIT it cancels every new one): none reach Python code, and
    # each must still be counted once, as CANCELLED, exactly as many as the client saw.
    r, sink, tel = await otlp()
    assert r.grpc_channelz_id is not None
    server_id = r.grpc_channelz_id
    count = GRPC_QUEUE_HARD_LIMIT + 1000
    body = request()
    channel = grpc.insecure_channel(f"127.0.0.1:{r.grpc_port}")
    try:
        export = channel.unary_unary(EXPORT)
        futures: list[grpc.Future] = []

        def fire() -> None:  # the synchronous client runs its calls in gRPC's own threads
            futures.extend(export.future(body, timeout=BOUND_S) for _ in range(count))

        firing = threading.Thread(target=fire)
        firing.start()
        # Held on purpose: grpc.aio takes no call from gRPC's queue until every call has started.
        wait_until_sync(
            lambda: (_channelz_calls_started(server_id) or 0) >= count, "all calls started", BOUND_S
        )
        firing.join()

        def outcomes() -> Counter[str]:
            seen: Counter[str] = Counter()
            for f in futures:
                exc = f.exception(timeout=BOUND_S)
                seen["OK" if exc is None else exc.code().name] += 1  # type: ignore[attr-defined]
            return seen

        seen = await asyncio.to_thread(outcomes)
    finally:
        channel.close()
    assert seen["CANCELLED"] >= count - GRPC_QUEUE_HARD_LIMIT - 1, seen
    assert set(seen) == {"OK", "CANCELLED"}, seen
    await wait_until(lambda: answered(tel) >= count, "answered(tel) >= count", timeout_s=BOUND_S)
    assert tel.value("receiver_refused_points_total", reason="cancelled_in_queue") == seen["CANCELLED"]
    assert tel.value("receiver_grpc_requests_total", code="CANCELLED") == seen["CANCELLED"]
    assert tel.value("receiver_grpc_requests_total", code="OK") == seen["OK"] == len(sink.batches)
    assert answered(tel) == count


async def test_every_call_handed_over_is_tallied_unknown_methods_too(otlp: Build) -> None:
    r, sink, tel = await otlp()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc_port}") as channel:
        export = channel.unary_unary(EXPORT)
        await asyncio.gather(*(export(request(), timeout=BOUND_S) for _ in range(50)))
        # An unknown method is handed to the receiver too (gRPC answers it UNIMPLEMENTED).
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")(b"")
        assert unknown.value.code() is grpc.StatusCode.UNIMPLEMENTED
    # Every call gRPC started was handed to the receiver: there is nothing the queue could have lost.
    assert r.grpc_channelz_id is not None
    assert _channelz_calls_started(r.grpc_channelz_id) == r._grpc_tally.taken == 51
    assert tel.value("receiver_refused_points_total", reason="cancelled_in_queue") == 0
    assert tel.value("receiver_grpc_requests_total", code="OK") == 50 == len(sink.batches)


async def _never() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""


async def test_a_call_cancelled_while_its_message_is_awaited_counts_as_cancelled(otlp: Build) -> None:
    # One read slot (the budget holds one largest message), so ``locked`` says the handler is reading.
    r, _, tel = await otlp(max_request_body_size=2**20, max_request_bytes_in_flight=2**20)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc_port}") as channel:
        call = channel.stream_unary(EXPORT)(_never(), timeout=BOUND_S)
        await wait_until(r._grpc_reads.locked, "r._grpc_reads.locked", timeout_s=BOUND_S)
        call.cancel()
        await wait_until(lambda: answered(tel) == 1, "answered(tel) == 1", timeout_s=BOUND_S)
    assert tel.value("receiver_refused_points_total", reason="cancelled") == 1
    assert tel.value("receiver_refused_points_total", reason="invalid_request") == 0
    assert tel.value("receiver_grpc_requests_total", code="CANCELLED") == 1
    await wait_until(lambda: not r._grpc_reads.locked(), "not r._grpc_reads.locked()", timeout_s=BOUND_S)


async def test_a_call_whose_deadline_passes_before_its_message_counts_as_deadline_exceeded(
    otlp: Build,
) -> None:
    r, _, tel = await otlp(max_request_body_size=2**20, max_request_bytes_in_flight=2**20)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc_port}") as channel:
        call = channel.stream_unary(EXPORT)(_never(), timeout=2.0)
        await wait_until(r._grpc_reads.locked, "r._grpc_reads.locked", timeout_s=BOUND_S)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await call
        assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: answered(tel) == 1, "answered(tel) == 1", timeout_s=BOUND_S)
    assert tel.value("receiver_refused_points_total", reason="cancelled") == 1
    assert tel.value("receiver_grpc_requests_total", code="DEADLINE_EXCEEDED") == 1


def _no_message() -> Iterator[bytes]:
    return iter(())


async def test_a_call_that_sends_no_message_is_still_an_invalid_request(otlp: Build) -> None:
    r, _, tel = await otlp()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.stream_unary(EXPORT)(_no_message(), timeout=BOUND_S)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "no request message"
    assert tel.value("receiver_refused_points_total", reason="invalid_request") == 1
    assert tel.value("receiver_refused_points_total", reason="cancelled") == 0
