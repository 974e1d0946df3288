"""OTLP/HTTP metrics ingest: data points/s into the internal model, and latency at half capacity.

    python bench/otlp_ingest.py            # full run (~1 min)
    python bench/otlp_ingest.py --quick    # smoke run (~20 s)

Figures and method
------------------
1. Decode + convert cost per data point, in this process on one core: gunzip, ``FromString`` (shadow
   schema) and ``MetricsConverter.convert`` over prebuilt requests, best of several passes, with the
   share of each step. It is the ceiling of the receiver on one core.
2. End to end: the real receiver (aiohttp server, HTTP only, a consumer that only counts) in a
   process pinned to core 0; a client process pinned to core 1 posts prebuilt gzip protobuf bodies
   of 1,000 points over 8 keep-alive connections as fast as they are answered. Rate = points answered
   with 200 / elapsed, cross-checked with the receiver's accepted counter.
3. Receive-to-response latency: the same pair, the client sending 1,000-point requests at half the
   rate measured in 2 on an open-loop schedule (a request leaves at its time whether or not the
   previous one was answered); p50/p99 of send-to-answer times seen by the client.

Payloads are realistic and fixed by a seed: each request has one resource with 10 attributes and one
scope; its points are 45 % sums (cumulative, monotonic), 30 % gauges, 20 % explicit histograms (12
bounds) and 5 % exponential histograms, with 2-4 attributes each, drawn from 5,000 series so the
attribute cache sees the hit rate of a steady service. ``run(quick)`` returns (figure, value, budget)
rows for bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SEED = 20240611
POINTS_PER_REQUEST = 1000
SERIES = 5000
BUDGET_POINTS_S = 200_000
CONNECTIONS = 8


# -- payloads -----------------------------------------------------------------------------------------
def build_requests(n_requests: int, seed: int = SEED) -> list[bytes]:
    """Serialized (uncompressed) ExportMetricsServiceRequests of POINTS_PER_REQUEST points each."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as mpb

    rng = random.Random(seed)
    routes = [f"/api/v1/{w}" for w in ("users", "orders", "cart", "search", "login", "items", "pay", "me")]
    series = []
    for i in range(SERIES):
        kind = rng.choices(("sum", "gauge", "histogram", "exp"), weights=(45, 30, 20, 5))[0]
        attrs = [("http.route", rng.choice(routes)), ("http.method", rng.choice(("GET", "POST", "PUT")))]
        for key in ("http.status_code", "region")[: rng.randint(0, 2)]:
            attrs.append(
                (key, str(rng.choice((200, 201, 404, 500))) if key != "region" else rng.choice(("eu", "us")))
            )
        series.append((f"app.{kind}.metric_{i % 60}", kind, attrs))
    resource = [
        KeyValue(key=k, value=AnyValue(string_value=v))
        for k, v in {
            "service.name": "checkout",
            "service.version": "1.8.2",
            "service.instance.id": "checkout-7d9f8-abcde",
            "host.name": "node-17",
            "k8s.pod.name": "checkout-7d9f8-abcde",
            "k8s.namespace.name": "shop",
            "k8s.node.name": "node-17",
            "cloud.region": "eu-west-1",
            "telemetry.sdk.language": "python",
            "deployment.environment": "prod",
        }.items()
    ]
    bounds = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0]
    t0 = 1_700_000_000_000_000_000
    out = []
    for r in range(n_requests):
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(resource)
        sm = rm.scope_metrics.add()
        sm.scope.name, sm.scope.version = "io.opentelemetry.http", "0.46b0"
        chosen = rng.sample(range(SERIES), POINTS_PER_REQUEST)
        by_name: dict[str, Any] = {}
        now = t0 + r * 10**9
        for idx in sorted(chosen, key=lambda j: series[j][0]):
            name, kind, attrs = series[idx]
            metric = by_name.get(name)
            if metric is None:
                metric = by_name[name] = sm.metrics.add(
                    name=name, unit="s" if kind in ("histogram", "exp") else "1"
                )
            kvs = [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in attrs]
            if kind in ("sum", "gauge"):
                data = metric.sum if kind == "sum" else metric.gauge
                if kind == "sum":
                    data.aggregation_temporality = mpb.AGGREGATION_TEMPORALITY_CUMULATIVE
                    data.is_monotonic = True
                dp = data.data_points.add(time_unix_nano=now, start_time_unix_nano=t0, attributes=kvs)
                if rng.random() < 0.5:
                    dp.as_double = rng.random() * 1000
                else:
                    dp.as_int = rng.randint(0, 10**6)
            elif kind == "histogram":
                metric.histogram.aggregation_temporality = mpb.AGGREGATION_TEMPORALITY_CUMULATIVE
                counts = [rng.randint(0, 50) for _ in range(len(bounds) + 1)]
                metric.histogram.data_points.add(
                    time_unix_nano=now,
                    start_time_unix_nano=t0,
                    attributes=kvs,
                    count=sum(counts),
                    sum=rng.random() * 100,
                    bucket_counts=counts,
                    explicit_bounds=bounds,
                    min=0.001,
                    max=9.0,
                )
            else:
                metric.exponential_histogram.aggregation_temporality = mpb.AGGREGATION_TEMPORALITY_DELTA
                pos = [rng.randint(0, 20) for _ in range(rng.randint(5, 40))]
                dp = metric.exponential_histogram.data_points.add(
                    time_unix_nano=now,
                    start_time_unix_nano=now - 10**10,
                    attributes=kvs,
                    scale=3,
                    zero_count=1,
                    count=sum(pos) + 1,
                    sum=rng.random() * 100,
                    min=0.0,
                    max=100.0,
                )
                dp.positive.offset = -5
                dp.positive.bucket_counts.extend(pos)
        out.append(req.SerializeToString())
    return out


# -- 1. decode + convert in process -------------------------------------------------------------------
def measure_decode(bodies: list[bytes], passes: int) -> dict[str, float]:
    """µs per point for gunzip, FromString and convert: best pass of each."""
    from receivers.otlp.convert import MetricsConverter, ShadowMetricsRequest

    gz = [gzip.compress(b, 6) for b in bodies]
    converter = MetricsConverter()
    points = len(bodies) * POINTS_PER_REQUEST
    best = {"inflate": float("inf"), "parse": float("inf"), "convert": float("inf")}
    for _ in range(passes):
        t0 = time.perf_counter()
        raw = [gzip.decompress(b) for b in gz]
        t1 = time.perf_counter()
        reqs = [ShadowMetricsRequest.FromString(b) for b in raw]
        t2 = time.perf_counter()
        n = 0
        for req in reqs:
            n += len(converter.convert(req, 1).points)
        t3 = time.perf_counter()
        assert n == points, (n, points)
        best["inflate"] = min(best["inflate"], (t1 - t0) / points * 1e6)
        best["parse"] = min(best["parse"], (t2 - t1) / points * 1e6)
        best["convert"] = min(best["convert"], (t3 - t2) / points * 1e6)
    best["total"] = best["inflate"] + best["parse"] + best["convert"]
    return best


# -- 2 and 3. the server and the client in their own processes ----------------------------------------
def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > core:
        os.sched_setaffinity(0, {core})


def _server(conn: Connection) -> None:
    _pin(0)
    import logging

    from agent.component import ComponentId, ComponentKind, Settings, Signal
    from agent.model import Batch
    from agent.telemetry import ComponentTelemetry, Telemetry
    from receivers.otlp import OtlpConfig, OtlpReceiver

    class Count:
        def __init__(self) -> None:
            self.points = 0

        async def consume(self, batch: Batch) -> None:
            self.points += len(batch)

    async def main() -> None:
        tel = Telemetry()
        sink = Count()
        settings = Settings(
            ComponentId("otlp"),
            ComponentKind.RECEIVER,
            ComponentTelemetry(tel, "receiver", "otlp"),
            logging.getLogger("bench.otlp"),
        )
        receiver = OtlpReceiver(settings, OtlpConfig(grpc=None, http="127.0.0.1:0"), {Signal.METRICS: sink})
        await receiver.start()
        conn.send(receiver.http_port)
        loop = asyncio.get_running_loop()
        while (await loop.run_in_executor(None, conn.recv)) != "stop":
            conn.send(sink.points)
        conn.send(sink.points)
        await receiver.shutdown()

    asyncio.run(main())


def _client(conn: Connection, port: int, bodies: list[bytes], mode: str, seconds: float, rate: float) -> None:
    _pin(1)
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/metrics"
    headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}

    async def main() -> dict[str, Any]:
        ok = failed = 0
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=CONNECTIONS if mode == "max" else 64)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def post(body: bytes) -> None:
                nonlocal ok, failed
                t = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok += 1
                    else:
                        failed += 1
                latencies.append(time.perf_counter() - t)

            for body in bodies[:CONNECTIONS]:  # warm up connections and caches
                await post(body)
            ok = failed = 0
            latencies.clear()
            start = time.perf_counter()
            deadline = start + seconds
            if mode == "max":

                async def worker(k: int) -> None:
                    i = k
                    while time.perf_counter() < deadline:
                        await post(bodies[i % len(bodies)])
                        i += CONNECTIONS

                await asyncio.gather(*(worker(k) for k in range(CONNECTIONS)))
            else:
                tasks = []
                interval = 1.0 / rate
                i = 0
                while (next_at := start + i * interval) < deadline:
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.ensure_future(post(bodies[i % len(bodies)])))
                    i += 1
                await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start
        return {"ok": ok, "failed": failed, "elapsed": elapsed, "latencies": latencies}

    conn.send(asyncio.run(main()))


def _run_pair(bodies: list[bytes], mode: str, seconds: float, rate: float = 0.0) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    server_end, server_conn = ctx.Pipe()
    server = ctx.Process(target=_server, args=(server_conn,), daemon=True)
    server.start()
    try:
        if not server_end.poll(60):
            raise RuntimeError("the receiver did not start")
        port = server_end.recv()
        client_end, client_conn = ctx.Pipe()
        client = ctx.Process(
            target=_client, args=(client_conn, port, bodies, mode, seconds, rate), daemon=True
        )
        client.start()
        if not client_end.poll(seconds + 120):
            raise RuntimeError("the client did not finish")
        result: dict[str, Any] = client_end.recv()
        client.join(10)
        server_end.send("stop")
        result["server_points"] = server_end.recv() if server_end.poll(30) else -1
        return result
    finally:
        server.join(10)
        if server.is_alive():
            server.terminate()


def run(quick: bool) -> list[tuple[str, str, str]]:
    """The figures as (figure, value, budget) rows."""
    n_requests = 20 if quick else 60
    bodies = build_requests(n_requests)
    decode = measure_decode(bodies, passes=2 if quick else 5)
    gz_bodies = [gzip.compress(b, 6) for b in bodies]
    seconds = 4.0 if quick else 12.0
    top = _run_pair(gz_bodies, "max", seconds)
    rate_points = top["ok"] * POINTS_PER_REQUEST / top["elapsed"]
    half = max(1.0, top["ok"] / top["elapsed"] / 2)
    lat = _run_pair(gz_bodies, "paced", seconds, rate=half)
    latencies = sorted(lat["latencies"])
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")
    p50 = statistics.median(latencies) if latencies else float("nan")
    body_kib = statistics.mean(len(b) for b in gz_bodies) / 1024
    return [
        (
            "decode+convert per point (gunzip / parse / convert), in process",
            f"{decode['total']:.2f} µs ({decode['inflate']:.2f} / {decode['parse']:.2f} / "
            f"{decode['convert']:.2f}) = {1e6 / decode['total']:,.0f} points/s",
            f"≤ {1e6 / BUDGET_POINTS_S:.0f} µs",
        ),
        (
            f"OTLP/HTTP protobuf+gzip end to end, 1 core ({body_kib:.0f} KiB bodies, {CONNECTIONS} conns)",
            f"{rate_points:,.0f} points/s ({top['failed']} non-200; "
            f"receiver counted {top['server_points']:,})",
            f"≥ {BUDGET_POINTS_S:,} points/s",
        ),
        (
            f"receive-to-response at half capacity ({half:.0f} req/s of 1,000 points)",
            f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms "
            f"({len(latencies)} requests, {lat['failed']} non-200)",
            "no budget set (reported)",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    args = parser.parse_args()
    rows = run(args.quick)
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'figure':<{width}}  {'value':<{vwidth}}  budget")
    for figure, value, budget in rows:
        print(f"{figure:<{width}}  {value:<{vwidth}}  {budget}")


if __name__ == "__main__":
    main()
