"""Native histograms from the hand encoder, written to a real Prometheus (2.42+) and read back; and
OTLP's explicit-bucket histograms and summaries sent by the exporter itself.

Starts `prometheus --enable-feature=native-histograms --web.enable-remote-write-receiver` on a free
loopback port with a temporary TSDB, posts snappy-compressed WriteRequests built by wire.py (or lets
the exporter post them), and queries them through the HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.component import ComponentKind
from agent.exphist import ExpHistogram
from agent.model import ExplicitHistogram, Kind, MetricBatch, Point, Summary, Temporality
from agent.sending import RetryConfig
from agent.telemetry import Telemetry
from exporters.prometheus_remote_write import (
    PrometheusRemoteWriteConfig,
    PrometheusRemoteWriteExporter,
    wire,
)
from tests.conftest import component_settings, free_port, wait_until_sync

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Server:
    url: str


@pytest.fixture
def prometheus() -> Iterator[Server]:
    if shutil.which("prometheus") is None:  # a missing install step must fail CI, not skip quietly
        pytest.fail("prometheus is not installed: run ./scripts/install-test-deps (make install)")
    workdir = Path(tempfile.mkdtemp(prefix="headwater-prom-"))
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1h\n")
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=native-histograms",
            "--web.enable-remote-write-receiver",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            log_text = (workdir / "prometheus.log").read_text()
            pytest.fail(f"prometheus exited with {proc.returncode}: {log_text}")
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
            return True

    try:
        wait_until_sync(
            ready, "prometheus to become ready", READY_TIMEOUT_S, every_s=0.1, retry_on=(OSError,)
        )
        yield Server(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def post(server: Server, series: list[bytes]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{server.url}/api/v1/write",
        data=wire.compress(wire.encode_write_request(series)),
        method="POST",
        headers={
            "Content-Encoding": "snappy",
            "Content-Type": "application/x-protobuf",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
            "User-Agent": "headwater-tests/0",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def query(server: Server, promql: str, at_ms: int) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": promql, "time": f"{at_ms / 1000:.3f}"})
    with urllib.request.urlopen(f"{server.url}/api/v1/query?{params}", timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def histogram(
    scale: int,
    positive: list[float],
    positive_offset: int,
    negative: list[float],
    negative_offset: int,
    zero_count: float,
    sum_: float,
) -> ExpHistogram:
    return ExpHistogram(
        scale=scale,
        zero_count=zero_count,
        positive_offset=positive_offset,
        positive_counts=np.array(positive, dtype=np.float64),
        negative_offset=negative_offset,
        negative_counts=np.array(negative, dtype=np.float64),
        count=float(sum(positive) + sum(negative) + zero_count),
        sum=sum_,
        min=-1.0,
        max=10.0,
    )


def expected_buckets(h: ExpHistogram) -> list[tuple[float, float, float]]:
    """(lower, upper, count) of every non-empty bucket as Prometheus reports them, in its order."""
    base = 2.0 ** (2.0**-h.scale)
    negative = [
        (-(base ** (h.negative_offset + k + 1)), -(base ** (h.negative_offset + k)), c)
        for k, c in enumerate(h.negative_counts.tolist())
        if c
    ]
    positive = [
        (base ** (h.positive_offset + k), base ** (h.positive_offset + k + 1), c)
        for k, c in enumerate(h.positive_counts.tolist())
        if c
    ]
    zero = [(0.0, 0.0, h.zero_count)] if h.zero_count else []
    return sorted(negative, key=lambda b: b[0]) + zero + positive


def reported_buckets(answer: dict[str, Any]) -> list[tuple[float, float, float]]:
    return [(float(lo), float(hi), float(c)) for _rule, lo, hi, c in answer["histogram"][1]["buckets"]]


Bucket = tuple[float, float, float]


def assert_buckets_match(got: list[Bucket], want: list[Bucket]) -> None:
    assert len(got) == len(want), (got, want)
    for (glo, ghi, gc), (wlo, whi, wc) in zip(got, want, strict=True):
        assert glo == pytest.approx(wlo, rel=1e-12, abs=0.0)
        assert ghi == pytest.approx(whi, rel=1e-12, abs=0.0)
        assert gc == wc


@pytest.mark.parametrize(
    ("name", "first", "second"),
    [
        pytest.param(
            "headwater_int_histogram",
            histogram(1, [1, 0, 3], -2, [2], 0, zero_count=1, sum_=4.5),
            histogram(1, [2, 0, 5, 0, 0, 0, 4], -2, [3], 0, zero_count=2, sum_=30.25),
            id="integer counts",
        ),
        pytest.param(
            "headwater_float_histogram",
            histogram(0, [0.5, 1.5], 0, [], 0, zero_count=0.25, sum_=1.0),
            histogram(0, [1.5, 2.5, 0, 0, 0, 0.75], 0, [0.5], -1, zero_count=0.25, sum_=9.5),
            id="float counts",
        ),
    ],
)
def test_prometheus_stores_native_histograms(
    prometheus: Server, name: str, first: ExpHistogram, second: ExpHistogram
) -> None:
    labels = wire.encode_labels((("__name__", name), ("job", "headwater")))
    now_ms = int(time.time() * 1000)
    t1, t2 = now_ms - 30_000, now_ms
    assert post(prometheus, [wire.encode_histogram_series(labels, first, t1)]) == (204, b"")
    assert post(prometheus, [wire.encode_histogram_series(labels, second, t2)]) == (204, b"")

    [stored] = query(prometheus, name, t2)
    assert stored["metric"] == {"__name__": name, "job": "headwater"}
    assert float(stored["histogram"][1]["count"]) == second.count
    assert float(stored["histogram"][1]["sum"]) == second.sum
    assert_buckets_match(reported_buckets(stored), expected_buckets(second))

    [count] = query(prometheus, f"histogram_count({name})", t2)
    assert float(count["value"][1]) == second.count
    [rate] = query(prometheus, f"histogram_count(rate({name}[1m]))", t2)
    rate_per_s = float(rate["value"][1])
    # 2.42 answers exactly the increase over the 30 s between the two writes; extrapolation rules
    # differ between versions, hence the tolerance.
    assert math.isfinite(rate_per_s)
    assert rate_per_s == pytest.approx((second.count - first.count) / 30, rel=0.5)


async def test_prometheus_reads_explicit_histograms_and_summaries_from_the_exporter(
    prometheus: Server,
) -> None:
    tel = Telemetry()
    settings = component_settings(
        tel,
        ComponentKind.EXPORTER,
        "prometheus_remote_write",
        logger="test.prw.prometheus",
        shutdown_timeout_s=10.0,
    )
    # Native histograms on: explicit histograms must still arrive as classic series.
    config = PrometheusRemoteWriteConfig(
        endpoint=f"{prometheus.url}/api/v1/write",
        send_native_histograms=True,
        retry_on_failure=RetryConfig(initial_interval=0.05, max_interval=0.2),  # type: ignore[arg-type]
    )
    exporter = PrometheusRemoteWriteExporter(settings, config)
    now_ns = time.time_ns()
    t1, t2 = now_ns - 30 * 10**9, now_ns
    labels = (("job", "headwater"),)
    bounds = (0.1, 0.5, 1.0)

    def delta(counts: tuple[int, ...], total: float, t: int) -> Point:
        return Point(
            "rpc.duration",
            Kind.HISTOGRAM,
            labels,
            t,
            unit="s",
            explicit=ExplicitHistogram(bounds, counts, total),
        )

    quantiles = ((0.5, 0.2), (0.99, 0.8))
    await exporter.start()
    try:
        await exporter.consume(MetricBatch((delta((2, 4, 2, 0), 2.5, t1),)))
        await exporter.consume(
            MetricBatch(
                (
                    delta((0, 2, 2, 0), 1.5, t2),
                    Point(
                        "rpc.latency",
                        Kind.SUMMARY,
                        labels,
                        t2,
                        unit="s",
                        temporality=Temporality.CUMULATIVE,
                        summary=Summary(40, 12.5, quantiles),
                    ),
                )
            )
        )
        await exporter._sender.shutdown(10.0)  # delivers everything queued
    finally:
        await exporter.shutdown()
    assert tel.value("exporter_sent_points_total") == 3
    at_ms = t2 // 1_000_000

    async def query_at(promql: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(query, prometheus, promql, at_ms)  # off the loop: a blocking HTTP call

    async def scalar(promql: str) -> float:
        [answer] = await query_at(promql)
        return float(answer["value"][1])

    # Cumulative buckets now: le=0.1 → 2, 0.5 → 8, 1 → 12, +Inf → 12. The median (rank 6) lies in
    # (0.1, 0.5]: 0.1 + (6 - 2) / (8 - 2) * 0.4.
    assert await scalar("histogram_quantile(0.5, rpc_duration_seconds_bucket)") == pytest.approx(
        0.1 + 4 / 6 * 0.4
    )
    # Over the last minute only the second delta counts (0, 2, 4, 4): its median is at le=0.5.
    assert await scalar("histogram_quantile(0.5, rate(rpc_duration_seconds_bucket[1m]))") == pytest.approx(
        0.5
    )
    assert await scalar("rpc_duration_seconds_count") == 12
    assert await scalar("rpc_duration_seconds_sum") == 4.0
    les = {r["metric"]["le"] for r in await query_at("rpc_duration_seconds_bucket")}
    assert les == {"0.1", "0.5", "1", "+Inf"}
    assert await query_at("rpc_duration_seconds") == []  # no native series

    assert await scalar('rpc_latency_seconds{quantile="0.5"}') == 0.2
    assert await scalar('rpc_latency_seconds{quantile="0.99"}') == 0.8
    assert await scalar("rpc_latency_seconds_sum") == 12.5
    assert await scalar("rpc_latency_seconds_count") == 40
