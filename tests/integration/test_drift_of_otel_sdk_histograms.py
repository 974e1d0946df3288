"""Drift of a histogram an application records with the OpenTelemetry SDK: the SDK's
OTLPMetricExporter (HTTP, exponential aggregation, the SDK's default CUMULATIVE temporality) → the
agent's otlp receiver → ``drift`` (learning a baseline, then each window against it) → remote-write
into a real Prometheus, read back with PromQL. The drift gauges stay low while the distribution is
the baseline's and rise when it shifts."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import aiohttp
import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from processors.drift import TESTS
from tests.conftest import AgentGraph, free_port, wait_until
from tests.integration.conftest import PrometheusServer, prom_value, to_remote_write

pytestmark = pytest.mark.integration


async def test_sdk_histogram_drift_rises_in_prometheus_after_a_shift(
    agents: AgentGraph, prometheus: PrometheusServer
) -> None:
    port = free_port()
    await agents.start(
        to_remote_write(
            prometheus,
            {"otlp": {"http": f"127.0.0.1:{port}", "grpc": None}},
            {"drift": {"include": ["checkout.duration"], "window": "1s", "baseline": "2s"}},
        )
    )
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"http://127.0.0.1:{port}/v1/metrics"),
        export_interval_millis=math.inf,  # exported only by force_flush below
    )
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({"service.name": "checkout"}),
        views=[View(instrument_type=Histogram, aggregation=ExponentialBucketHistogramAggregation())],
    )
    histogram = provider.get_meter("checkout").create_histogram("checkout.duration", unit="ms")
    rng = np.random.default_rng(21)
    mu = 3.0  # log-mean of the duration: e**3 ≈ 20 ms, then e**3.7 ≈ 40 ms
    try:
        async with aiohttp.ClientSession() as session:

            async def query(expr: str) -> float | None:
                return await prom_value(session, prometheus, expr)

            async def record_then(expr: str, done: Callable[[float], bool]) -> float | None:
                """Record 400 durations of the current distribution and export (the SDK blocks: off
                the loop), then read `expr` (None until `done`). 400 a round: a window holding a
                single round still has enough observations for PSI's sampling noise to stay small."""
                for ms in rng.lognormal(mu, 0.4, 400):
                    histogram.record(float(ms))
                assert await asyncio.to_thread(reader.force_flush, 10_000)
                value = await query(expr)
                return value if value is not None and done(value) else None

            psi = 'checkout_duration_drift{test="psi",window="1s"}'
            quiet = await wait_until(
                lambda: record_then(psi, lambda v: True), "a first drift gauge in Prometheus", timeout_s=60
            )
            assert quiet < 0.2  # the baseline's distribution: the cumulative points differenced right
            mu = 3.7
            loud = await wait_until(
                lambda: record_then(psi, lambda v: v > 1.0), "PSI above 1 after the shift", timeout_s=60
            )
            assert loud > 5 * quiet
            ks_p = await query('checkout_duration_drift{test="ks_pvalue"}')
            assert ks_p is not None and ks_p < 1e-3
            count = await query('count(checkout_duration_drift{window="1s"})')
            assert count == len(TESTS)
    finally:
        await asyncio.to_thread(provider.shutdown)
