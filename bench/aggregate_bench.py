"""Aggregate processor benchmark: CPU per point on one core, and RSS with 10,000 series × 3 intervals.

    python bench/aggregate_bench.py [--quick]

Pinned to CPU 0 (``os.sched_setaffinity``, as ``taskset -c 0`` would). Simulated time (an injected
clock, no sleeping): every 10 s "flush" each series sends one point, in batches of 500 (the StatsD
receiver's), through 60 flushes (10 min; 18 with --quick) after a warm-up of 6.

The rule set (realistic for a node agent): counters ``http.requests`` without ``pod`` (increase, rate,
count) and gauges ``node.*`` without ``cpu`` (avg, min, max, last, stddev, slope), both over 1m, 5m
and 1h, keep_input false. 10,000 series: 5,000 counters over 4 pods (1,250 groups) and 5,000 gauges
over 8 CPUs (625 groups). The worst case is reported too: the same series with nothing aggregated
away (10,000 groups, each sending all its outputs every minute), and the realistic rules with sliding
5m and 15m windows by 1m instead (every minute each group merges its last 15 slides). Points carry
their series key, as the StatsD and OTLP receivers hand them on. Every flush's input is made before
the timing starts, so the heap the garbage collector walks holds it too: a figure moves by up to
~0.5 µs with where a full collection falls. Distributions are measured apart (their cost is the
histogram merge): 1,000 timer series, one 160-bucket delta histogram each per flush, quantiles +
count over 1m/5m/1h.

Reported: ``consume`` per point (match, group lookup, fold), the window ends per point (emitting
every group's outputs each minute, merging into 5m / 1h, handed to a null consumer), and the total,
as the process's CPU time (``time.process_time``: on the shared machine another process holding
the core would otherwise count as ours). Best of 3 runs. RSS: in a fresh subprocess, VmRSS after
imports and building the input, then after feeding 10,000 series into 10,000 groups (nothing
aggregated away; each group holding 3 intervals' accumulators) for 12 flushes with the window ends;
the difference is the processor's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
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
from agent.model import Batch, Kind, Labels, MetricBatch, Point, Temporality, new_point, series_key  # noqa: E402
from agent.telemetry import ComponentTelemetry, Telemetry  # noqa: E402
from processors.aggregate import AggregateConfig, AggregateProcessor, RuleConfig  # noqa: E402

T0 = 1_699_999_200.0  # on the hour
FLUSH_S = 10.0
BATCH = 500
INTERVALS = [Duration(60.0), Duration(300.0), Duration(3600.0)]
GAUGE_OUTPUTS: list[Any] = ["avg", "min", "max", "last", "stddev", "slope"]
VALUE_RULES = [
    RuleConfig(
        match=["http.requests"], intervals=INTERVALS, without=["pod"], outputs=["increase", "rate", "count"]
    ),
    RuleConfig(match=["node.*"], intervals=INTERVALS, without=["cpu"], outputs=GAUGE_OUTPUTS),
]
SLIDING_RULES = [
    RuleConfig(
        match=["http.requests"],
        intervals=[Duration(300.0), Duration(900.0)],
        slide=Duration(60.0),
        without=["pod"],
        outputs=["increase", "rate", "count"],
    ),
    RuleConfig(
        match=["node.*"],
        intervals=[Duration(300.0), Duration(900.0)],
        slide=Duration(60.0),
        without=["cpu"],
        outputs=GAUGE_OUTPUTS,
    ),
]
WORST_RULES = [
    RuleConfig(match=["http.requests"], intervals=INTERVALS, outputs=["increase", "rate", "count"]),
    RuleConfig(match=["node.*"], intervals=INTERVALS, outputs=GAUGE_OUTPUTS),
]
HIST_RULES = [
    RuleConfig(
        match=["http.latency"], intervals=INTERVALS, outputs=["quantiles", "count"], quantiles=[0.5, 0.99]
    )
]


DELTA = Temporality.DELTA
_REST = (None, "", "", None, None, None, None)
"""new_point's histogram, unit, description, resource, scope, explicit and summary for a plain value."""


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


def _processor(rules: list[RuleConfig], clock: _Clock, sink: _Null) -> AggregateProcessor:
    settings = Settings(
        id=ComponentId("aggregate"),
        kind=ComponentKind.PROCESSOR,
        telemetry=ComponentTelemetry(Telemetry(), "processor", "aggregate"),
        logger=logging.getLogger("bench.aggregate"),
    )
    config = AggregateConfig(rules=rules, max_series=100_000)
    return AggregateProcessor(settings, config, sink, clock=clock, run_timer=False)


def _value_flush(series: int, t: float, rng: np.random.Generator) -> list[MetricBatch]:
    """One flush of `series` points: half counter deltas (4 pods a route), half gauges (8 CPUs a host)."""
    ns = int(t * 1e9)
    half = series // 2
    deltas = rng.integers(0, 50, half).tolist()
    levels = rng.normal(50.0, 10.0, series - half).tolist()
    points = []
    for i, d in enumerate(deltas):
        labels: Labels = (("code", "200"), ("pod", f"p{i % 4}"), ("route", f"/r{i // 4}"))
        key = series_key("http.requests", Kind.SUM, labels)
        points.append(new_point(key.name, Kind.SUM, labels, ns, float(d), 0, DELTA, True, *_REST, key))
    for i, v in enumerate(levels):
        labels = (("cpu", str(i % 8)), ("host", f"h{i // 8}"))
        key = series_key("node.cpu.busy", Kind.GAUGE, labels)
        points.append(new_point(key.name, Kind.GAUGE, labels, ns, v, 0, DELTA, False, *_REST, key))
    return [MetricBatch(tuple(points[i : i + BATCH])) for i in range(0, len(points), BATCH)]


def _hist_flush(series: int, t: float, rng: np.random.Generator) -> list[MetricBatch]:
    values = rng.lognormal(-3.0, 0.8, series * 100)
    offsets = np.arange(series + 1, dtype=np.int64) * 100
    hists = exphist.from_segments(values, None, offsets, max_buckets=160)
    ns = int(t * 1e9)
    points = [
        Point("http.latency", Kind.HISTOGRAM, (("route", f"/r{i}"),), ns, histogram=h, unit="s")
        for i, h in enumerate(hists)
    ]
    return [MetricBatch(tuple(points[i : i + BATCH])) for i in range(0, len(points), BATCH)]


async def _run(
    rules: list[RuleConfig], make: Any, series: int, flushes: int, warmup: int
) -> dict[str, float]:
    rng = np.random.default_rng(7)
    clock = _Clock()
    sink = _Null()
    proc = _processor(rules, clock, sink)
    data = [make(series, T0 + FLUSH_S * (k + 0.5), rng) for k in range(warmup + flushes)]
    consume_s = roll_s = 0.0
    points = 0
    gc.collect()
    for k, batches in enumerate(data):
        clock.now = T0 + FLUSH_S * k
        t = time.process_time()
        await proc.tick()  # the window ends (every 6th flush), measured apart from consume
        roll = time.process_time() - t
        clock.now += FLUSH_S / 2
        t = time.process_time()
        for b in batches:
            await proc.consume(b)
        spent = time.process_time() - t
        if k >= warmup:
            consume_s += spent
            roll_s += roll
            points += sum(len(b) for b in batches)
    return {
        "points": points,
        "consume_us": consume_s / points * 1e6,
        "windows_us": roll_s / points * 1e6,
        "total_us": (consume_s + roll_s) / points * 1e6,
        "emitted": sink.points,
    }


def _best(rules: list[RuleConfig], make: Any, series: int, flushes: int) -> dict[str, float]:
    runs = [asyncio.run(_run(rules, make, series, flushes, 6)) for _ in range(3)]
    return min(runs, key=lambda r: r["total_us"])


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _rss_child() -> None:
    """In a fresh process: RSS of the processor holding 10,000 series × 3 intervals."""

    async def main() -> dict[str, float]:
        rng = np.random.default_rng(8)
        data = [_value_flush(10_000, T0 + FLUSH_S * (k + 0.5), rng) for k in range(12)]
        gc.collect()
        before = _rss_kb()
        clock = _Clock()
        proc = _processor(WORST_RULES, clock, _Null())
        for k, batches in enumerate(data):
            clock.now = T0 + FLUSH_S * k + FLUSH_S / 2
            await proc.tick()
            for b in batches:
                await proc.consume(b)
        gc.collect()
        after = _rss_kb()
        groups = sum(len(r.groups) for r in proc._rules)
        return {"rss_before_mb": before / 1024, "rss_after_mb": after / 1024, "groups": groups}

    print(json.dumps(asyncio.run(main())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="18 flushes instead of 60")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    if args.rss_child:
        _rss_child()
        return
    flushes = 18 if args.quick else 60
    values = _best(VALUE_RULES, _value_flush, 10_000, flushes)
    print(
        f"counters + gauges, 10,000 series, 3 intervals: {values['total_us']:.2f} µs per point "
        f"(consume {values['consume_us']:.2f} + window ends {values['windows_us']:.2f}; "
        f"{values['points']:,} points, {values['emitted']:,} outputs)"
    )
    worst = _best(WORST_RULES, _value_flush, 10_000, flushes)
    print(
        f"  worst case, nothing aggregated away (10,000 groups): {worst['total_us']:.2f} µs per point "
        f"(consume {worst['consume_us']:.2f} + window ends {worst['windows_us']:.2f})"
    )
    sliding = _best(SLIDING_RULES, _value_flush, 10_000, flushes)
    print(
        f"  sliding 5m and 15m windows by 1m (the same series and groups): {sliding['total_us']:.2f} µs per "
        f"point (consume {sliding['consume_us']:.2f} + window ends {sliding['windows_us']:.2f})"
    )
    hists = _best(HIST_RULES, _hist_flush, 1_000, flushes)
    print(
        f"distributions, 1,000 timer series, 3 intervals: {hists['total_us']:.2f} µs per point "
        f"(consume {hists['consume_us']:.2f} + window ends {hists['windows_us']:.2f})"
    )
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child"], check=True, capture_output=True, text=True
    ).stdout
    rss = json.loads(out)
    print(
        f"RSS, 10,000 series × 3 intervals ({rss['groups']:,} groups): "
        f"{rss['rss_after_mb'] - rss['rss_before_mb']:.1f} MB for the processor "
        f"(process {rss['rss_after_mb']:.1f} MB)"
    )


if __name__ == "__main__":
    main()
