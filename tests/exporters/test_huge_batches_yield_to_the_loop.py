"""A huge batch through the network exporters: the event loop runs while it is applied (in slices,
``agent.slicing``), and what reaches the backend is exactly what one unsliced pass sends, in order.

The causality check is a task that notes, at each turn the loop gives it, how many series the exporter
holds: some turn must come while the batch is half applied. No timing is asserted: the slices end at
every clock check (``slice_every_check``), and the reference run never yields (``SLICE_S`` infinite).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from agent import exphist, slicing
from agent.component import ComponentKind, Settings
from agent.model import ExplicitHistogram, Kind, MetricBatch, Point, Summary, Temporality
from agent.sending import Request
from agent.telemetry import Telemetry
from exporters.otlp.config import OtlpHttpConfig
from exporters.otlp.http import OtlpHttpExporter
from exporters.prometheus_remote_write import (
    PrometheusRemoteWriteConfig,
    PrometheusRemoteWriteExporter,
    remote_pb2,
    wire,
)
from tests.conftest import component_settings
from tests.exporters.conftest import Ticker, serve
from tests.exporters.otlp_sink import Sink

POINTS = 300_000
SERIES = 100_000
BOUND_S = 300.0
"""Only a hang reaches this: each run takes a few seconds."""
T0 = 1_700_000_000 * 10**9
REFERENCE = pytest.mark.loop_block_limit(60.0)
"""The loop-block guard's limit for a test with a one-pass reference run (SLICE_S = inf): that run blocks
the loop on purpose, the test's own doing, for 1-3 s here. Whether the sliced run lets the loop in is
what each test asserts itself (the turns seen half-way)."""


def huge_batch() -> MetricBatch:
    """POINTS points over SERIES series (each series three times, later each time): delta counters,
    gauges, exponential and explicit histograms and summaries."""
    hist = exphist.from_values(np.random.default_rng(3).lognormal(-3.0, 1.0, 40))
    explicit = ExplicitHistogram((0.1, 1.0), (1, 2, 3), 4.5, 0.01, 2.0)
    summary = Summary(6, 9.0, ((0.5, 1.0), (0.99, 3.0)))
    out = []
    for i in range(POINTS):
        s = i % SERIES
        labels = (("host", f"h{s % 100}"), ("route", f"/r/{s}"))
        t = T0 + (i // SERIES) * 10**9
        pick = s % 50
        if pick < 40:
            p = Point(f"app.hits.{s % 7}", Kind.SUM, labels, t, float(i % 5), t - 10**9, Temporality.DELTA)
        elif pick < 47:
            p = Point(f"app.depth.{s % 3}", Kind.GAUGE, labels, t, float(i % 11))
        elif pick < 48:
            p = Point("app.latency", Kind.HISTOGRAM, labels, t, 0.0, t - 10**9, Temporality.DELTA, False,
                      hist)  # fmt: skip
        elif pick < 49:
            p = Point("app.size", Kind.HISTOGRAM, labels, t, 0.0, t - 10**9, Temporality.DELTA, False,
                      explicit=explicit)  # fmt: skip
        else:
            p = Point("app.rtt", Kind.SUMMARY, labels, t, 0.0, T0, Temporality.CUMULATIVE, summary=summary)
        out.append(p)
    return MetricBatch(tuple(out))


@pytest.fixture(scope="module")
def batch() -> MetricBatch:
    return huge_batch()


def settings(kind: str) -> Settings:
    return component_settings(
        Telemetry(), ComponentKind.EXPORTER, kind, logger=f"test.huge.{kind}", shutdown_timeout_s=60.0
    )


async def consume_watched(exp: Any, batch: MetricBatch, series: Callable[[], int]) -> list[object]:
    """Consume ``batch``; the series count the exporter held at each turn the loop gave another task."""
    ticker = Ticker(series)
    async with asyncio.timeout(BOUND_S):
        await exp.consume(batch)
    await ticker.stop()
    return ticker.seen


def assert_ran_half_way(seen: list[object], final: int) -> None:
    assert len(seen) > 1, "the loop got no turn while the batch was applied"
    assert any(0 < n < final for n in seen if isinstance(n, int)), "no turn came while half applied"


# -- remote-write ------------------------------------------------------------------------------------
class WriteSink:
    """A remote-write endpoint keeping each request's decompressed body, in arrival order."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _take(self, request: web.Request) -> web.Response:
        self.bodies.append(wire.decompress(await request.read()))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/api/v1/write", self._take)
        self._runner, port = await serve(app, access_log=None)
        self.url = f"http://127.0.0.1:{port}/api/v1/write"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def write_sink() -> AsyncIterator[WriteSink]:
    sink = WriteSink()
    await sink.start()
    yield sink
    await sink.stop()


async def remote_write_run(url: str, batch: MetricBatch) -> tuple[list[object], int]:
    """(series counts seen at the loop's turns, series held at the end); requests land at ``url``."""
    exp = PrometheusRemoteWriteExporter(settings("prometheus_remote_write"), PrometheusRemoteWriteConfig(url))
    await exp.start()
    try:
        seen = await consume_watched(exp, batch, lambda: exp._store.size)
        held = exp._store.size
    finally:
        await exp.shutdown()  # drains the queue to the sink
    return seen, held


@REFERENCE
@pytest.mark.usefixtures("slice_every_check")
async def test_remote_write_takes_a_huge_batch_in_slices_and_sends_what_one_pass_sends(
    write_sink: WriteSink, batch: MetricBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, held = await remote_write_run(write_sink.url, batch)
    assert held == SERIES
    assert_ran_half_way(seen, SERIES)
    sliced, write_sink.bodies = write_sink.bodies, []

    monkeypatch.setattr(slicing, "SLICE_S", math.inf)  # the reference: one pass, never yielding
    seen, _ = await remote_write_run(write_sink.url, batch)
    assert not any(0 < n < SERIES for n in seen if isinstance(n, int))  # the reference never yields
    reference = write_sink.bodies

    got = [remote_pb2.WriteRequest.FromString(b) for b in sliced]
    want = [remote_pb2.WriteRequest.FromString(b) for b in reference]
    assert sum(len(r.timeseries) for r in want) >= POINTS  # histograms and summaries: several each
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"request {i} differs"


# -- OTLP --------------------------------------------------------------------------------------------
async def otlp_run(sink: Sink, base: str, batch: MetricBatch) -> tuple[list[object], int]:
    """(series counts seen at the loop's turns, series held at the end); requests land in ``sink``."""
    cfg = OtlpHttpConfig(endpoint=base, temporality="cumulative", resource_from_environment=False)
    exp = OtlpHttpExporter(settings("otlp_http"), cfg)
    await exp.start()
    try:
        seen = await consume_watched(exp, batch, lambda: exp._encoder.series)
        held = exp._encoder.series
    finally:
        await exp.shutdown()
    return seen, held


@REFERENCE
@pytest.mark.usefixtures("slice_every_check")
async def test_otlp_converts_and_encodes_a_huge_batch_in_slices_and_sends_what_one_pass_sends(
    batch: MetricBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = Sink()
    base = await sink.start_http()
    try:
        seen, held = await otlp_run(sink, base, batch)
        assert held == SERIES
        assert_ran_half_way(seen, SERIES)
        sliced, sink.received = sink.received, []

        monkeypatch.setattr(slicing, "SLICE_S", math.inf)
        await otlp_run(sink, base, batch)
        reference = sink.received
    finally:
        await sink.stop()

    points = sum(
        len(getattr(m, m.WhichOneof("data")).data_points)
        for r in reference
        for rm in r.message.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    )
    assert points == POINTS  # delta → cumulative sends every point
    assert len(sliced) == len(reference) > 1
    for i, (g, w) in enumerate(zip(sliced, reference, strict=True)):
        assert g.message == w.message, f"request {i} differs"


async def stale_markers_run(url: str, batch: MetricBatch) -> tuple[list[object], int]:
    """Expire every series of ``batch`` at once: (requests offered, seen at the loop's turns during
    expiry; requests offered in all)."""
    cfg = PrometheusRemoteWriteConfig(url, series_expiration=3600.0)
    exp = PrometheusRemoteWriteExporter(settings("prometheus_remote_write"), cfg)
    await exp.start()
    try:
        await exp.consume(batch)
        offered = 0
        offer = exp._sender.offer

        def counting(request: Request) -> None:
            nonlocal offered
            offered += 1
            offer(request)

        exp._sender.offer = counting  # type: ignore[method-assign]
        ticker = Ticker(lambda: offered)
        async with asyncio.timeout(BOUND_S), exp._applying:
            await exp._expire(0.0)  # everything is idle: every series gets its stale markers
        await ticker.stop()
        assert exp._store.size == 0
    finally:
        await exp.shutdown()
    return ticker.seen, offered


@REFERENCE
@pytest.mark.usefixtures("slice_every_check")
async def test_stale_markers_of_many_expired_series_are_encoded_in_slices(
    write_sink: WriteSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Far-future samples: each stale marker is stamped just after its series' last sample, not with the
    # wall clock, so both runs send the same bytes.
    t = 4_000_000_000 * 10**9
    batch = MetricBatch(
        tuple(Point("gone", Kind.GAUGE, (("i", str(i)),), t, float(i)) for i in range(SERIES))
    )
    seen, offered = await stale_markers_run(write_sink.url, batch)
    markers = [remote_pb2.WriteRequest.FromString(b) for b in write_sink.bodies][-offered:]
    assert any(isinstance(n, int) and 0 < n < offered for n in seen), "no turn came while half encoded"
    write_sink.bodies = []

    monkeypatch.setattr(slicing, "SLICE_S", math.inf)
    _, offered_once = await stale_markers_run(write_sink.url, batch)
    reference = [remote_pb2.WriteRequest.FromString(b) for b in write_sink.bodies][-offered_once:]
    assert sum(len(r.timeseries) for r in reference) == SERIES
    assert all(wire.is_stale_nan(ts.samples[0].value) for r in reference for ts in r.timeseries)
    assert markers == reference
