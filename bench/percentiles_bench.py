"""Percentiles processor benchmark: CPU per point at a StatsD-like load, and RSS with 10,000 series.

    python bench/percentiles_bench.py [--quick]

1. Cost per point. 1,000 timer series; every 10 s "flush" each gets one DELTA exponential histogram
   (160 buckets, like the StatsD receiver's) of ~100 lognormal values in seconds. Simulated time (an
   injected clock, no sleeping) through 60 flushes (10 min; 20 with --quick), after a 6-flush warm-up.
   Reported: ``consume`` per point (series lookup + ingest into the base slice), the emit per series
   per flush (rotation + 1m/5m/1h windows × 4 quantiles, building the 12 gauges per series and handing
   them to a null consumer), and both together per incoming point. Best of 3 runs.
2. RSS. In a fresh subprocess: VmRSS (/proc/self/status) after imports and building the test data,
   then after creating the processor (windows 1m/5m/1h, default 160 buckets) and feeding 10,000
   distribution series for 6 flushes with an emit after each. The difference is the processor's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent import exphist  # noqa: E402
from agent.component import ComponentId, ComponentKind, Settings  # noqa: E402
from agent.model import Batch, Kind, MetricBatch, Point  # noqa: E402
from agent.telemetry import ComponentTelemetry, Telemetry  # noqa: E402
from processors.percentiles import PercentilesConfig, PercentilesProcessor  # noqa: E402

T0 = 1_700_000_000.0


class _Null:
    def __init__(self) -> None:
        self.points = 0

    async def consume(self, batch: Batch) -> None:
        assert isinstance(batch, MetricBatch)  # the percentiles processor passes on metrics only
        self.points += len(batch.points)


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _processor(clock: _Clock, sink: _Null) -> PercentilesProcessor:
    tel = Telemetry()
    settings = Settings(
        id=ComponentId("percentiles"),
        kind=ComponentKind.PROCESSOR,
        telemetry=ComponentTelemetry(tel, "processor", "percentiles"),
        logger=logging.getLogger("bench.percentiles"),
    )
    return PercentilesProcessor(settings, PercentilesConfig(), sink, clock=clock, run_timer=False)


def _flush(series: int, values_per_series: int, rng: np.random.Generator) -> list[MetricBatch]:
    """One StatsD-like flush: per series a delta histogram, in batches of 500 points (the receiver's)."""
    values = rng.lognormal(-3.0, 0.8, series * values_per_series)
    offsets = np.arange(series + 1, dtype=np.int64) * values_per_series
    hists = exphist.from_segments(values, None, offsets, max_buckets=160)
    points = [
        Point(
            f"app.request.duration.{i % 50}", Kind.HISTOGRAM, (("route", f"/r{i}"),), 0, histogram=h, unit="s"
        )
        for i, h in enumerate(hists)
    ]
    return [MetricBatch(tuple(points[i : i + 500])) for i in range(0, len(points), 500)]


async def _cost(flushes: int, series: int = 1000) -> tuple[float, float]:
    """(µs per consumed point, µs per series per emit)."""
    rng = np.random.default_rng(1)
    data = [_flush(series, 100, rng) for _ in range(8)]
    clock, sink = _Clock(), _Null()
    proc = _processor(clock, sink)
    consume_s = emit_s = 0.0
    for k in range(6 + flushes):
        batches = data[k % len(data)]
        clock.now = T0 + 10.0 * k + 5.0
        t = time.perf_counter()
        for b in batches:
            await proc.consume(b)
        took = time.perf_counter() - t
        clock.now = T0 + 10.0 * (k + 1)
        t = time.perf_counter()
        await proc.tick()
        took_emit = time.perf_counter() - t
        if k >= 6:
            consume_s += took
            emit_s += took_emit
    await proc.shutdown()
    return consume_s / (flushes * series) * 1e6, emit_s / (flushes * series) * 1e6


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _array_bytes(proc: Any) -> int:
    """Bytes of the percentiles store's arrays in use: the pages series hold, and per-slice statistics
    (the bench reports their share of the RSS)."""
    store = proc._store
    stats: int = sum(a.nbytes for t in store.tiers for a in (t.zero, t.count, t.sum, t.min, t.max))
    return int(store.memory_bytes()) + stats


async def _rss_child(series: int) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    data = [_flush(series, 20, rng) for _ in range(2)]
    gc.collect()
    before = _rss_kib()
    clock, sink = _Clock(), _Null()
    proc = _processor(clock, sink)
    for k in range(6):
        clock.now = T0 + 10.0 * k + 5.0
        for b in data[k % 2]:
            await proc.consume(b)
        clock.now = T0 + 10.0 * (k + 1)
        await proc.tick()
    gc.collect()
    after = _rss_kib()
    arrays = _array_bytes(proc)
    return {"before_kib": before, "after_kib": after, "arrays_bytes": arrays, "points_out": sink.points}


def run(quick: bool) -> list[tuple[str, str, str]]:
    """(figure, value, budget) rows."""
    best = min((asyncio.run(_cost(20 if quick else 60)) for _ in range(3)), key=lambda r: r[0] + r[1])
    consume_us, emit_us = best
    child = subprocess.run(
        [sys.executable, __file__, "--rss-child", "10000"], capture_output=True, text=True, check=True
    )
    rss = json.loads(child.stdout)
    grown_mb = (rss["after_kib"] - rss["before_kib"]) / 1024
    return [
        ("percentiles: consume, 1,000 timer series, µs per point", f"{consume_us:.1f}", "<= 50"),
        ("percentiles: emit 1m/5m/1h × 4 quantiles, µs per series per flush", f"{emit_us:.1f}", "<= 100"),
        ("percentiles: consume + emit, µs per incoming point", f"{consume_us + emit_us:.1f}", "<= 150"),
        ("percentiles: RSS growth, 10,000 series, windows 1m/5m/1h (MB)", f"{grown_mb:.0f}", "<= 300"),
        ("percentiles: of which slice arrays (MB)", f"{rss['arrays_bytes'] / 2**20:.0f}", ""),
        ("percentiles: RSS of the process after (MB)", f"{rss['after_kib'] / 1024:.0f}", ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer flushes")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(asyncio.run(_rss_child(args.rss_child))))
        return
    rows = run(args.quick)
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>12}  budget")
    for figure, value, budget in rows:
        print(f"{figure:<{width}}  {value:>12}  {budget}")


if __name__ == "__main__":
    main()
