"""How long a network exporter holds the event loop while it takes one huge metric batch.

    python3 bench/exporter_stall.py [--points 1000000 200000] [--series 100000]
                                    [--exporters prometheus_remote_write,otlp_http,prometheus]
    python3 bench/exporter_stall.py --src /tmp/hw-before   # an older checkout (git worktree add ...)

Each exporter is started against a sink on 127.0.0.1 that takes every request (remote-write 204,
OTLP 200; on a loop of its own in a thread, so that its work is not counted as the exporter's) and is
handed one ``MetricBatch`` of ``--points`` points over ``--series`` series (80 % StatsD-like delta
counters, 15 % gauges, 5 % delta exponential histograms of 40 values; the first batch of a fresh
exporter, so every series is new: the costly case), with ``max_series`` raised to ``--series``
so that every point is really processed. Meanwhile a monitor coroutine sleeps 5 ms in a
loop and records how late it wakes: the longest overshoot is the longest stall of the loop during
``consume`` (what a /healthz on the loop or any other connection would have waited). The consume time
and the monitor's wake-ups during it are printed as well. Then the exporter is shut down (its queue
drained to the sink), which is not measured.

Noise: the machine is shared; run twice and compare rows of the same run. A full (generation 2)
garbage collection walks every object of the process, and the millions a 1M batch makes hold the loop
for hundreds of ms whatever the exporter does: the longest collection during ``consume`` is printed
too (``gc.callbacks``), and ``--no-gc`` measures without the collector, to tell the two apart.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

_parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_parser.add_argument("--points", type=int, nargs="+", default=[1_000_000, 200_000])
_parser.add_argument("--series", type=int, default=100_000)
_parser.add_argument("--exporters", default="prometheus_remote_write,otlp_http,prometheus")
_parser.add_argument("--src", default="", help="import the agent from this checkout instead of this one")
_parser.add_argument("--no-gc", action="store_true", help="disable the garbage collector while measuring")
ARGS = _parser.parse_args()
sys.path.insert(0, ARGS.src or str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from aiohttp import web  # noqa: E402

from agent import exphist  # noqa: E402
from agent.component import ComponentId, ComponentKind, Settings  # noqa: E402
from agent.model import Kind, MetricBatch, Point, Temporality  # noqa: E402
from agent.telemetry import ComponentTelemetry, Telemetry  # noqa: E402

TICK_S = 0.005


def make_points(n: int, series: int) -> tuple[Point, ...]:
    rng = np.random.default_rng(7)
    hists = [exphist.from_values(rng.lognormal(-3.0, 1.0, 40)) for _ in range(16)]
    now = time.time_ns()
    start = now - 10 * 10**9
    out = []
    for i in range(n):
        s = i % series
        labels = (
            ("env", "production"),
            ("host", f"web-{s % 200:03d}"),
            ("route", f"/api/v1/items/{s}"),
            ("service", f"svc-{s % 20}"),
        )
        t = now + (i // series) * 10**6  # repeats of a series come later
        pick = s % 20
        if pick < 16:
            p = Point(f"app.requests.{s % 50}", Kind.SUM, labels, t, float(i % 13), start, Temporality.DELTA)
        elif pick < 19:
            p = Point(f"app.queue.depth.{s % 20}", Kind.GAUGE, labels, t, float(i % 97))
        else:
            p = Point(
                f"app.latency.{s % 10}", Kind.HISTOGRAM, labels, t, 0.0, start, Temporality.DELTA, False,
                hists[i % 16], "s",
            )  # fmt: skip
        out.append(p)
    return tuple(out)


class Sink:
    """Takes every request, on a loop of its own in a thread: its work is not the exporter's stall."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),))
        self._thread.start()
        self._ready.wait()

    async def _serve(self) -> None:
        async def take(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=204 if request.path == "/api/v1/write" else 200)

        app = web.Application(client_max_size=256 << 20)
        app.router.add_post("/{tail:.*}", take)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._loop.close()


def make_exporter(kind: str, port: int, series: int) -> Any:
    tel = Telemetry()
    settings = Settings(
        id=ComponentId(kind),
        kind=ComponentKind.EXPORTER,
        telemetry=ComponentTelemetry(tel, "exporter", kind),
        logger=logging.getLogger(f"bench.{kind}"),
        shutdown_timeout_s=120.0,
    )
    if kind == "prometheus_remote_write":
        from exporters.prometheus_remote_write import (
            PrometheusRemoteWriteConfig,
            PrometheusRemoteWriteExporter,
        )

        return PrometheusRemoteWriteExporter(
            settings,
            PrometheusRemoteWriteConfig(endpoint=f"http://127.0.0.1:{port}/api/v1/write", max_series=series),
        )
    if kind == "otlp_http":
        # Through the factory in the package entry, which every checkout has (before and after
        # exporters/otlp was split into modules), so that --src can name an older tree.
        from exporters.otlp import http_factory

        return http_factory.create(
            settings,
            http_factory.config_class(
                endpoint=f"http://127.0.0.1:{port}", max_series=series, temporality="cumulative"
            ),
        )
    if kind == "prometheus":
        from exporters.prometheus import PrometheusConfig, PrometheusExporter

        return PrometheusExporter(settings, PrometheusConfig(endpoint="127.0.0.1:0", max_series=series))
    raise SystemExit(f"unknown exporter {kind!r}")


class GcPauses:
    """The longest garbage collection (any generation) while active."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._started)

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


async def measure(kind: str, points: tuple[Point, ...], port: int, series: int) -> tuple[float, ...]:
    """(longest loop stall s, longest gc s, consume time s, monitor wake-ups during consume)."""
    exp = make_exporter(kind, port, series)
    await exp.start()
    lags: list[float] = []
    done = asyncio.Event()

    async def monitor() -> None:
        clock = time.perf_counter
        while not done.is_set():
            t0 = clock()
            await asyncio.sleep(TICK_S)
            lags.append(clock() - t0 - TICK_S)

    mon = asyncio.create_task(monitor())
    await asyncio.sleep(TICK_S * 2)  # the monitor runs before the batch comes
    lags.clear()
    if ARGS.no_gc:
        gc.disable()
    pauses = GcPauses()
    t0 = time.perf_counter()
    try:
        await exp.consume(MetricBatch(points))
        elapsed = time.perf_counter() - t0
        pauses.close()
        wakeups = len(lags)
        done.set()
        await mon
    finally:
        gc.enable()
        await exp.shutdown()
    return max(lags, default=elapsed), pauses.longest, elapsed, wakeups


async def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    sink = Sink()
    port = sink.port
    try:
        head = f"{'exporter':26} {'points':>9} {'longest stall':>14} {'longest gc':>11} {'consume':>9}"
        print(head + f" {'wake-ups':>9}")
        for n in ARGS.points:
            points = make_points(n, ARGS.series)
            for kind in ARGS.exporters.split(","):
                gc.collect()
                stall, gc_s, elapsed, wakeups = await measure(kind, points, port, ARGS.series)
                row = f"{kind:26} {n:>9,} {stall * 1000:>11.1f} ms {gc_s * 1000:>8.1f} ms"
                print(row + f" {elapsed:>7.2f} s {wakeups:>9.0f}", flush=True)
            del points
    finally:
        sink.close()


if __name__ == "__main__":
    asyncio.run(main())
