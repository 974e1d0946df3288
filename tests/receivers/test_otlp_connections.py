"""OTLP/gRPC under load (agent/netguard.py): the request-bytes budget, many concurrent calls over few
read slots, cancelled calls counted, and the OTLP/HTTP header timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from agent import netguard
from agent.component import ComponentKind, Signal
from agent.model import Batch
from agent.telemetry import Telemetry
from receivers.otlp import OtlpConfig, OtlpReceiver
from tests.conftest import Sink, component_settings, wait_until

EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
BOUND_S = 30.0


class GatedSink(Sink):
    """Holds every batch until ``open`` is set, so calls stay inside the receiver."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()
        self.waiting = 0

    async def consume(self, batch: Batch) -> None:
        self.waiting += 1
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1
        await super().consume(batch)


def request(n: int = 1, pad: int = 0) -> bytes:
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="requests")
    m.gauge.SetInParent()
    for i in range(n):
        dp = m.gauge.data_points.add(time_unix_nano=1_700_000_000_000_000_000 + i, as_double=1.0)
        if pad:
            dp.attributes.append(KeyValue(key="pad", value=AnyValue(string_value="x" * pad)))
    return req.SerializeToString()


Build = Callable[..., Awaitable[tuple[OtlpReceiver, GatedSink, Telemetry]]]


@pytest.fixture
async def otlp() -> AsyncIterator[Build]:
    made: list[OtlpReceiver] = []

    async def build(**cfg: Any) -> tuple[OtlpReceiver, GatedSink, Telemetry]:
        tel, sink = Telemetry(), GatedSink()
        config = OtlpConfig(**{"grpc": "127.0.0.1:0", "http": "127.0.0.1:0", **cfg})
        assert config.validate() == []
        settings = component_settings(tel, ComponentKind.RECEIVER, "otlp")
        receiver = OtlpReceiver(settings, config, {Signal.METRICS: sink})
        made.append(receiver)
        await receiver.start()
        return receiver, sink, tel

    yield build
    for r in made:
        await r.shutdown()


async def test_many_concurrent_calls_share_few_read_slots_and_all_arrive(otlp: Build) -> None:
    # Budget for 2 largest messages: 2 read slots, yet 40 concurrent small calls all get in.
    r, sink, tel = await otlp(max_request_body_size=2**20, max_request_bytes_in_flight=2 * 2**20)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc_port}") as channel:
        export = channel.unary_unary(EXPORT)
        calls = [asyncio.ensure_future(export(request(), timeout=BOUND_S)) for _ in range(40)]
        await wait_until(lambda: sink.waiting == 40, "every call read and inside the pipeline", BOUND_S)
        assert r._bytes.in_use == 40 * len(request())
        sink.open.set()
        answers = await asyncio.gather(*calls)
    assert all(ExportMetricsServiceResponse.FromString(a) == ExportMetricsServiceResponse() for a in answers)
    assert len(sink.batches) == 40 and r._bytes.in_use == 0
    assert tel.value("receiver_grpc_requests_total", code="OK") == 40


async def test_a_call_over_the_byte_budget_is_unavailable_with_retry_info(
    otlp: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netguard.request_bytes(), "limit", 150_000)
    r, sink, tel = await otlp(max_request_body_size=200_000, max_request_bytes_in_flight=200_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc_port}") as channel:
        export = channel.unary_unary(EXPORT)
        holder = asyncio.ensure_future(export(request(700, pad=100), timeout=BOUND_S))
        await wait_until(lambda: sink.waiting == 1, "sink.waiting == 1", BOUND_S)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await export(request(500, pad=100), timeout=BOUND_S)
        err = refused.value
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        details = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
        st = status_pb2.Status.FromString(details)
        assert st.code == code_pb2.UNAVAILABLE
        info = error_details_pb2.RetryInfo()
        assert st.details[0].Unpack(info) and info.retry_delay.seconds == 1
        assert tel.value("receiver_refused_points_total", reason="memory_budget") == 1
        # A small call still fits beside the held one.
        small = asyncio.ensure_future(export(request(), timeout=BOUND_S))
        await wait_until(lambda: sink.waiting == 2, "sink.waiting == 2", BOUND_S)
        sink.open.set()
        await holder
        await small
    assert r._bytes.in_use == 0 and netguard.request_bytes().in_use == 0


async def test_cancelled_calls_are_counted(otlp: Build) -> None:
    r, sink, tel = await otlp()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.grpc_port}") as channel:
        call = channel.unary_unary(EXPORT)(request(), timeout=BOUND_S)
        await wait_until(lambda: sink.waiting == 1, "sink.waiting == 1", BOUND_S)
        call.cancel()
        await wait_until(
            lambda: tel.value("receiver_refused_points_total", reason="cancelled") == 1,
            "tel.value('receiver_refused_points_total', reason='cancelled') == 1",
            BOUND_S,
        )
    assert tel.value("receiver_grpc_requests_total", code="CANCELLED") == 1
    assert sink.batches == [] and r._bytes.in_use == 0


async def test_otlp_http_closes_half_sent_headers(otlp: Build) -> None:
    r, _, tel = await otlp(header_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", r.http_port)
    writer.write(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n")
    async with asyncio.timeout(BOUND_S):
        assert await reader.read() == b""
    assert tel.value("receiver_refused_points_total", reason="header_timeout") == 1
    writer.close()
