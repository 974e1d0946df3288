"""A huge OTLP metrics request is taken chunk by chunk (receivers/otlp ``CHUNK_POINTS``): every point
arrives once and in order, one chunk of converted points is alive at a time, and backpressure is
answered without duplicates (429 / UNAVAILABLE before anything is taken; afterwards the chunk is
offered again, then the rest reported in ``partial_success``). Requests are built with the
opentelemetry-proto classes (the SDK cannot make 1 M points) and sent with aiohttp and grpc.aio."""

from __future__ import annotations

import asyncio
import gc
import logging
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2 as mpb

from agent.component import Backpressure, ComponentKind, Signal
from agent.model import Batch, MetricBatch, Point
from agent.telemetry import Telemetry
from receivers.otlp import CHUNK_POINTS, LATER_CHUNK_RETRY_S, OtlpConfig, OtlpReceiver, factory
from receivers.otlp.convert import Converted, MetricsConverter, ShadowMetricsRequest
from tests.conftest import component_settings

PROTO = {"Content-Type": "application/x-protobuf"}
METRICS_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
MILLION = 1_000_000
T0 = 1_700_000_000_000_000_000
NO_RECORDED_VALUE = 1  # DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK

Refusal = Callable[[int, int], Exception | None]
"""(consume calls so far including this one, chunks taken so far) -> what to raise, or None."""


class Recorder:
    """A consumer keeping each taken batch's size and its points' values (not the points, so that
    the points alive are the receiver's); ``refusal`` may refuse calls, ``hold_at`` holds the call
    taking that chunk (1-based) until ``release`` is set."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.values = array("d")
        self.times: list[int] = []
        self.calls = 0
        self.refusal: Refusal = lambda calls, taken: None
        self.hold_at: int | None = None
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def consume(self, batch: Batch) -> None:
        assert isinstance(batch, MetricBatch)
        self.calls += 1
        exc = self.refusal(self.calls, len(self.sizes))
        if exc is not None:
            raise exc
        if self.hold_at == len(self.sizes) + 1:
            self.held.set()
            await self.release.wait()
        self.sizes.append(len(batch))
        self.values.extend(p.value for p in batch.points)
        if len(self.times) < 3 * CHUNK_POINTS:  # enough to check the order of the smaller requests
            self.times.extend(p.time_unix_nano for p in batch.points)


@dataclass
class Harness:
    receiver: OtlpReceiver
    sink: Recorder
    tel: Telemetry
    session: aiohttp.ClientSession

    async def post(self, body: bytes) -> tuple[int, bytes, Any]:
        url = f"http://127.0.0.1:{self.receiver.http_port}/v1/metrics"
        async with self.session.post(url, data=body, headers=PROTO) as resp:
            return resp.status, await resp.read(), resp.headers

    async def grpc_export(self, body: bytes) -> ExportMetricsServiceResponse:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.receiver.grpc_port}") as channel:
            export = channel.unary_unary(
                METRICS_EXPORT,
                request_serializer=lambda b: b,
                response_deserializer=ExportMetricsServiceResponse.FromString,
            )
            response: ExportMetricsServiceResponse = await export(body, timeout=300)
            return response

    def value(self, name: str, **labels: str) -> float:
        return self.tel.value(name, **labels)

    def refused(self, reason: str) -> float:
        return self.value("receiver_refused_points_total", reason=reason)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.RECEIVER, "otlp")
    sink = Recorder()
    receiver = factory.create(
        settings, OtlpConfig(grpc="127.0.0.1:0", http="127.0.0.1:0"), {Signal.METRICS: sink}
    )
    h = Harness(receiver, sink, tel, aiohttp.ClientSession())
    await receiver.start()
    yield h
    await h.session.close()
    await receiver.shutdown()


def gauge_request(n: int) -> ExportMetricsServiceRequest:
    """One gauge series of ``n`` points with distinct timestamps; point i has the value i."""
    request = ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    rm.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="huge")))
    metric = rm.scope_metrics.add().metrics.add(name="million.points")
    points = metric.gauge.data_points
    for i in range(n):
        points.add(time_unix_nano=T0 + i, as_double=float(i))
    return request


@pytest.fixture(scope="module")
def million_body() -> bytes:
    body = gauge_request(MILLION).SerializeToString()
    assert len(body) < OtlpConfig().max_request_body_size  # a valid request, within the default cap
    return body


@pytest.fixture(scope="module")
def chunks_body() -> bytes:
    """Two and a half chunks (three batches) of one gauge series."""
    return gauge_request(CHUNK_POINTS * 5 // 2).SerializeToString()


def assert_all_in_order(sink: Recorder, n: int) -> None:
    assert len(sink.values) == n
    assert sink.values == array("d", map(float, range(n)))  # each point once, in request order


def retry_delay_s(trailers: Any) -> int:
    st = status_pb2.Status.FromString(dict(trailers)["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert st.code == code_pb2.UNAVAILABLE and st.details[0].Unpack(retry)
    return retry.retry_delay.seconds


# -- a million points --------------------------------------------------------------------------------
async def test_a_million_points_over_http_arrive_whole_in_chunks(
    harness: Harness, million_body: bytes
) -> None:
    status, body, _ = await harness.post(million_body)
    assert status == 200
    assert not ExportMetricsServiceResponse.FromString(body).HasField("partial_success")
    assert_all_in_order(harness.sink, MILLION)
    assert harness.sink.sizes == [CHUNK_POINTS] * (MILLION // CHUNK_POINTS)
    assert harness.value("receiver_accepted_points_total") == MILLION


async def test_a_million_points_over_grpc_arrive_whole_in_chunks(
    harness: Harness, million_body: bytes
) -> None:
    response = await harness.grpc_export(million_body)
    assert not response.HasField("partial_success")
    assert_all_in_order(harness.sink, MILLION)
    assert max(harness.sink.sizes) == CHUNK_POINTS and len(harness.sink.sizes) == MILLION // CHUNK_POINTS
    assert harness.value("receiver_accepted_points_total") == MILLION
    assert harness.value("receiver_grpc_requests_total", code="OK") == 1


def live_points() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Point)


async def test_one_chunk_of_points_is_alive_at_a_time(harness: Harness, million_body: bytes) -> None:
    harness.sink.hold_at = 3
    before = live_points()
    post = asyncio.create_task(harness.post(million_body))
    held = asyncio.create_task(harness.sink.held.wait())
    try:
        await asyncio.wait((post, held), timeout=300, return_when=asyncio.FIRST_COMPLETED)
        assert held.done(), "the request was answered before its third chunk was handed on"
        # Two chunks taken, the third being handed on: the points of the request alive now are
        # that chunk's, not the million (nor the chunks already taken, the recorder kept values).
        assert live_points() - before <= CHUNK_POINTS
        assert len(harness.sink.values) == 2 * CHUNK_POINTS
    finally:
        harness.sink.release.set()
        held.cancel()
        status, _, _ = await post
    assert status == 200
    assert_all_in_order(harness.sink, MILLION)


# -- the chunks equal one pass --------------------------------------------------------------------------
def mixed_request(n_gauge: int) -> ExportMetricsServiceRequest:
    """A resource refused whole (an attribute key over max_label_name_length), then one whose metrics span
    chunks: a gauge with points refused in several chunks (no value) and skipped ones (no recorded
    value), a sum with an unknown temporality, small histograms and summaries between them."""
    request = ExportMetricsServiceRequest()
    bad = request.resource_metrics.add()
    bad.resource.attributes.append(KeyValue(key="k" * 2000, value=AnyValue(string_value="v")))
    bad.scope_metrics.add().metrics.add(name="lost").gauge.data_points.add(as_double=1.0)
    rm = request.resource_metrics.add()
    sm = rm.scope_metrics.add()
    sm.scope.name = "huge"
    sm.metrics.add(name="small.before").gauge.data_points.add(time_unix_nano=T0, as_int=7)
    gauge = sm.metrics.add(name="big.gauge").gauge.data_points
    for i in range(n_gauge):
        dp = gauge.add(time_unix_nano=T0 + i)
        if i % 40_000 == 39_999:
            continue  # no value: refused with its index
        if i % 70_001 == 70_000:
            dp.flags = NO_RECORDED_VALUE
        dp.as_double = float(i)
        if i % 3 == 0:
            dp.attributes.append(KeyValue(key="third", value=AnyValue(int_value=i % 5)))
    wrong = sm.metrics.add(name="wrong.temporality").sum
    for i in range(3):
        wrong.data_points.add(time_unix_nano=T0 + i, as_double=1.0)
    histogram = sm.metrics.add(name="latency", unit="s").histogram
    histogram.aggregation_temporality = mpb.AGGREGATION_TEMPORALITY_CUMULATIVE
    for i in range(5):
        histogram.data_points.add(
            time_unix_nano=T0 + i, count=3 if i != 2 else 4, bucket_counts=[1, 2], explicit_bounds=[0.5]
        )
    summary = sm.metrics.add(name="sizes").summary
    summary.data_points.add(time_unix_nano=T0, count=1, sum=2.0)
    total = sm.metrics.add(name="total").sum
    total.aggregation_temporality = mpb.AGGREGATION_TEMPORALITY_DELTA
    for i in range(CHUNK_POINTS + 10):
        total.data_points.add(time_unix_nano=T0 + i, as_int=i)
    return request


def identity(p: Point) -> tuple[Any, ...]:
    return (p.name, p.kind, p.labels, p.time_unix_nano, p.value, p.temporality, p.explicit, p.summary)


@pytest.mark.parametrize("max_points", [1, 7, 49_999, CHUNK_POINTS])
def test_chunks_equal_one_pass(max_points: int) -> None:
    request = ShadowMetricsRequest.FromString(mixed_request(130_001).SerializeToString())
    whole = MetricsConverter().convert(request, T0)
    out = Converted()
    chunks = list(MetricsConverter().chunks(request, T0, max_points, out))
    assert all(0 < len(c) <= max_points for c in chunks)
    assert all(len(c) == max_points for c in chunks[:-1])  # only the last one is short
    assert [identity(p) for c in chunks for p in c] == [identity(p) for p in whole.points]
    assert out.points == []
    assert (out.rejected, out.refused, out.error_message) == (
        whole.rejected,
        whole.refused,
        whole.error_message,
    )
    assert 'metric "big.gauge" data point 119999' in out.error_message  # indices in the request


async def test_refusals_over_http_are_summed_over_the_chunks(harness: Harness) -> None:
    message = mixed_request(130_001)
    reference = MetricsConverter().convert(ShadowMetricsRequest.FromString(message.SerializeToString()), T0)
    status, body, _ = await harness.post(message.SerializeToString())
    assert status == 200
    partial = ExportMetricsServiceResponse.FromString(body).partial_success
    assert partial.rejected_data_points == reference.rejected > 0
    assert partial.error_message == reference.error_message
    assert 'metric "big.gauge" data point 79999' in partial.error_message  # an index in chunk 2
    assert sum(harness.sink.sizes) == len(reference.points) and len(harness.sink.sizes) > 2
    assert harness.sink.values == array("d", (p.value for p in reference.points))
    assert harness.refused("no_value") == reference.refused["no_value"]
    assert harness.refused("no_recorded_value") == reference.refused["no_recorded_value"]
    assert harness.refused("invalid_temporality") == 3
    assert harness.value("receiver_accepted_points_total") == len(reference.points)


# -- backpressure --------------------------------------------------------------------------------------
async def test_backpressure_on_the_first_chunk_refuses_the_request_over_http(
    harness: Harness, chunks_body: bytes
) -> None:
    harness.sink.refusal = lambda calls, taken: Backpressure("memory_limit", retry_after_s=2)
    status, body, headers = await harness.post(chunks_body)
    assert status == 429 and headers["Retry-After"] == "2"
    assert b"memory_limit" in body
    assert harness.sink.sizes == [] and harness.sink.calls == 1  # nothing taken, not offered again
    assert harness.refused("backpressure") == CHUNK_POINTS * 5 // 2  # every point of the request
    assert harness.value("receiver_accepted_points_total") == 0


async def test_backpressure_on_the_first_chunk_is_unavailable_over_grpc(
    harness: Harness, chunks_body: bytes
) -> None:
    harness.sink.refusal = lambda calls, taken: Backpressure("queue full", retry_after_s=3)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await harness.grpc_export(chunks_body)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert retry_delay_s(info.value.trailing_metadata()) == 3
    assert harness.sink.sizes == [] and harness.sink.calls == 1
    assert harness.refused("backpressure") == CHUNK_POINTS * 5 // 2


async def test_a_later_chunk_refused_for_a_while_is_offered_again(
    harness: Harness, chunks_body: bytes
) -> None:
    # Chunk 2 is refused twice, then taken: the request is taken whole, each point once.
    harness.sink.refusal = lambda calls, taken: (
        Backpressure("memory_limit", retry_after_s=0.01) if taken == 1 and calls <= 3 else None
    )
    status, body, _ = await harness.post(chunks_body)
    assert status == 200
    assert not ExportMetricsServiceResponse.FromString(body).HasField("partial_success")
    assert harness.sink.calls == 5 and harness.sink.sizes == [CHUNK_POINTS, CHUNK_POINTS, CHUNK_POINTS // 2]
    assert_all_in_order(harness.sink, CHUNK_POINTS * 5 // 2)
    assert harness.sink.times == [T0 + i for i in range(CHUNK_POINTS * 5 // 2)]
    assert harness.refused("backpressure") == 0
    assert harness.value("receiver_accepted_points_total") == CHUNK_POINTS * 5 // 2


async def test_a_later_chunk_refused_for_good_is_reported_not_resent(
    harness: Harness, chunks_body: bytes
) -> None:
    harness.sink.refusal = lambda calls, taken: (
        Backpressure("memory_limit", retry_after_s=1) if taken >= 1 else None
    )
    rest = CHUNK_POINTS * 5 // 2 - CHUNK_POINTS
    response = await harness.grpc_export(chunks_body)  # answered OK: a retry would duplicate chunk 1
    partial = response.partial_success
    assert partial.rejected_data_points == rest
    assert partial.error_message.startswith(f"{rest} data point(s) rejected: the last {rest} data point(s)")
    assert "memory_limit" in partial.error_message and f"first {CHUNK_POINTS}" in partial.error_message
    assert harness.sink.sizes == [CHUNK_POINTS]  # chunk 1, once
    assert_all_in_order(harness.sink, CHUNK_POINTS)
    # Offered again about once a second (the refusal's delay) for LATER_CHUNK_RETRY_S, then given up.
    assert 2 <= harness.sink.calls - 1 <= LATER_CHUNK_RETRY_S + 2
    assert harness.refused("backpressure") == rest
    assert harness.value("receiver_accepted_points_total") == CHUNK_POINTS
    assert harness.value("receiver_grpc_requests_total", code="OK") == 1


async def test_a_pipeline_failure_on_a_later_chunk_is_reported_not_resent(
    harness: Harness, chunks_body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    harness.sink.refusal = lambda calls, taken: RuntimeError("bug") if taken == 2 else None
    with caplog.at_level(logging.ERROR, logger="test.otlp.huge"):
        status, body, _ = await harness.post(chunks_body)
    assert status == 200
    partial = ExportMetricsServiceResponse.FromString(body).partial_success
    rest = CHUNK_POINTS // 2
    assert partial.rejected_data_points == rest and f"the last {rest} data point(s)" in partial.error_message
    assert harness.sink.sizes == [CHUNK_POINTS, CHUNK_POINTS] and harness.sink.calls == 3
    assert harness.refused("pipeline_error") == rest
    assert "the pipeline failed" in caplog.text
