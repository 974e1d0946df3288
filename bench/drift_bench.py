"""Drift processor benchmark: CPU per point on one core and RSS with 10,000 series.

    taskset -c 0 python bench/drift_bench.py [--quick]

1. Cost per point, 10,000 series, simulated time (an injected clock, no sleeping), the default window
   (5m), baseline 5m (the first 30 flushes), then 60 flushes (2 windows; 1 with --quick) measured:

   - timers: every 10 s "flush" each series gets one DELTA exponential histogram (scale <= 8, up to
     320 buckets) of 50 lognormal values, in batches of 500 points (the StatsD receiver's);
   - gauges: every flush each series gets one gauge point (``gauges:``, one observation each; a
     StatsD gauge arrives once a flush).

   Reported, as CPU time of the process (not wall time: the machine may be shared): ``consume`` per
   point (adding each point's buckets to its series' row), the window end per series (the last held
   points added, the six statistics of every row pair, building the six gauges, handing them to a
   null consumer, emptying the rows), and both together per incoming point (window-end cost spread
   over the points of the window). Best of 3 runs.
2. RSS. In a fresh subprocess: VmRSS after imports and building one flush, then after feeding 10,000
   timer series (fresh histograms every flush, as a receiver makes them) through the baseline and 3
   windows of 1m (reference: baseline), likewise with ``reference: trailing`` and ``offset: 5m`` (each
   series holding 5 past windows of 1m), and through a 5m baseline and one 5m window (the default
   window: 30 flushes held in it); the growth after, and at its peak (just before a window's end).
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
from agent.confmodel import Duration  # noqa: E402
from agent.model import Batch, Kind, MetricBatch, Point  # noqa: E402
from agent.telemetry import ComponentTelemetry, Telemetry  # noqa: E402
from processors.drift import DriftConfig, DriftProcessor  # noqa: E402

T0 = 1_699_999_200.0  # a multiple of 60 s
SERIES = 10_000
_PER_WINDOW = 30
"""10 s flushes in the default 5m window."""


def _cpu() -> float:
    """CPU seconds of this process: the figure is CPU per point, and on a shared machine the wall
    clock also counts the time other processes hold the core (one run showed twice the CPU time)."""
    return time.process_time()


class _Null:
    def __init__(self) -> None:
        self.points = 0

    async def consume(self, batch: Batch) -> None:
        assert isinstance(batch, MetricBatch)
        self.points += len(batch.points)


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _processor(clock: _Clock, sink: _Null, config: DriftConfig) -> DriftProcessor:
    tel = Telemetry()
    settings = Settings(
        id=ComponentId("drift"),
        kind=ComponentKind.PROCESSOR,
        telemetry=ComponentTelemetry(tel, "processor", "drift"),
        logger=logging.getLogger("bench.drift"),
    )
    return DriftProcessor(settings, config, sink, clock=clock, run_timer=False)


def _timer_flush(
    series: int, values_per_series: int, mu: float, rng: np.random.Generator
) -> list[MetricBatch]:
    """One StatsD-like flush: per series a delta histogram, in batches of 500 points."""
    values = rng.lognormal(mu, 0.5, series * values_per_series)
    offsets = np.arange(series + 1, dtype=np.int64) * values_per_series
    hists = exphist.from_segments(values, None, offsets, max_buckets=320, max_scale=8)
    points = [
        Point(
            f"app.request.duration.{i % 50}",
            Kind.HISTOGRAM,
            (("route", f"/r{i}"),),
            0,
            histogram=h,
            unit="ms",
        )
        for i, h in enumerate(hists)
    ]
    return [MetricBatch(tuple(points[i : i + 500])) for i in range(0, len(points), 500)]


def _gauge_flush(series: int, per_series: int, mu: float, rng: np.random.Generator) -> list[MetricBatch]:
    """Per series `per_series` gauge points (one observation each), in batches of 500 points."""
    values = rng.normal(mu, 1.0, series * per_series).tolist()
    points = [
        Point(f"model.score.{i % 50}", Kind.GAUGE, (("model", f"m{i % series}"),), 0, value=v)
        for i, v in enumerate(values)
    ]
    return [MetricBatch(tuple(points[i : i + 500])) for i in range(0, len(points), 500)]


async def _cost(kind: str, flushes: int) -> tuple[float, float, float]:
    """(µs per consumed point, µs per series per window end, points per flush)."""
    rng = np.random.default_rng(1)
    if kind == "timers":
        config = DriftConfig(baseline=Duration(300.0))
        data = [_timer_flush(SERIES, 50, 3.0 + 0.05 * (k % 2), rng) for k in range(4)]
    else:
        config = DriftConfig(baseline=Duration(300.0), gauges=["model.score.*"], include=[])
        data = [_gauge_flush(SERIES, 1, 0.1 * (k % 2), rng) for k in range(4)]
    per_flush = sum(len(b.points) for b in data[0])
    clock, sink = _Clock(), _Null()
    proc = _processor(clock, sink, config)
    consume_s = end_s = 0.0
    ends = 0
    for k in range(_PER_WINDOW + flushes):
        clock.now = T0 + 10.0 * k + 5.0
        t = _cpu()
        for b in data[k % len(data)]:
            await proc.consume(b)
        took = _cpu() - t
        clock.now = T0 + 10.0 * (k + 1)
        t = _cpu()
        await proc.tick()
        took_end = _cpu() - t
        if k >= _PER_WINDOW:
            consume_s += took
            if (k + 1) % _PER_WINDOW == 0:
                end_s += took_end
                ends += 1
    await proc.shutdown()
    assert sink.points > 0
    return consume_s / (flushes * per_flush) * 1e6, end_s / max(ends, 1) / SERIES * 1e6, per_flush


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _rss_child(reference: str) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    flush = _timer_flush(SERIES, 50, 3.0, rng)
    gc.collect()
    before = _rss_kib()
    if reference == "trailing":
        config = DriftConfig(window=Duration(60.0), reference="trailing", offset=Duration(300.0))
        flushes = 6 * 8
    elif reference == "baseline-5m":
        config = DriftConfig(baseline=Duration(300.0))  # the default 5m window: 30 flushes in it
        flushes = 30 * 2
    else:
        config = DriftConfig(window=Duration(60.0), baseline=Duration(60.0))
        flushes = 6 * 4
    clock, sink = _Clock(), _Null()
    proc = _processor(clock, sink, config)
    peak = 0
    for k in range(flushes):
        clock.now = T0 + 10.0 * k + 5.0
        # Fresh histograms every flush, as a receiver makes them: what a series holds is its own.
        for b in flush if k == 0 else _timer_flush(SERIES, 50, 3.0, rng):
            await proc.consume(b)
        peak = max(peak, _rss_kib())  # before a window end: the most a window holds
        clock.now = T0 + 10.0 * (k + 1)
        await proc.tick()
    gc.collect()
    return {"before_kib": before, "peak_kib": peak, "after_kib": _rss_kib(), "points_out": sink.points}


def run(quick: bool) -> list[tuple[str, str, str]]:
    """(figure, value, budget) rows."""
    flushes = _PER_WINDOW * (1 if quick else 2)
    rows: list[tuple[str, str, str]] = []
    for kind in ("timers", "gauges"):
        consume_us, end_us, per_flush = min(
            (asyncio.run(_cost(kind, flushes)) for _ in range(3)), key=lambda r: r[0] + r[1]
        )
        # A window's points pay one window end per series.
        total_us = consume_us + end_us * SERIES / (_PER_WINDOW * per_flush)
        rows += [
            (f"drift: consume, 10,000 {kind} series, µs per point", f"{consume_us:.2f}", ""),
            (f"drift: window end ({kind}), µs per series", f"{end_us:.1f}", ""),
            (f"drift: consume + window end ({kind}), µs per incoming point", f"{total_us:.2f}", "<= 2"),
        ]
    for reference in ("baseline", "trailing", "baseline-5m"):
        child = subprocess.run(
            [sys.executable, __file__, "--rss-child", reference], capture_output=True, text=True, check=True
        )
        rss = json.loads(child.stdout)
        grown_mb = (rss["after_kib"] - rss["before_kib"]) / 1024
        peak_mb = (rss["peak_kib"] - rss["before_kib"]) / 1024
        rows += [
            (
                f"drift: RSS growth, 10,000 timer series, reference {reference} (MB)",
                f"{grown_mb:.0f}",
                "<= 300",
            ),
            (
                f"drift: RSS growth at its peak (a window's end), reference {reference} (MB)",
                f"{peak_mb:.0f}",
                "<= 300",
            ),
            (
                f"drift: RSS of the process after, reference {reference} (MB)",
                f"{rss['after_kib'] / 1024:.0f}",
                "",
            ),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer flushes")
    parser.add_argument(
        "--rss-child", choices=["baseline", "trailing", "baseline-5m"], help=argparse.SUPPRESS
    )
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
