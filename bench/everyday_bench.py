"""Cost of the everyday processors (filter, attributes, batch, memory_limiter, cardinality), µs per point.

Run from the repository root: ``python bench/everyday_bench.py [--quick]``.

Input: 100,000 StatsD-like points over 1,000 series (100 flushes of 1,000 points; dotted names over
50 metrics, four tags each, 70 % counters, 20 % gauges, 10 % timers as exponential histograms), the
shape a StatsD receiver hands a pipeline. Each processor runs with a typical config into a consumer
that does nothing, on one event loop; the figure is CPU time of this process divided by points, best
of the rounds (timings swing about ±40 % between runs on small VMs: compare rows of the same run).
Steady state: the series repeat every flush, as they do in production, so per-series memos are warm
after the first flush (included in the time).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from agent import exphist
from agent.component import ComponentId, ComponentKind, Settings
from agent.confmodel import Decoder
from agent.model import Batch, Kind, MetricBatch, Point, Temporality
from agent.telemetry import ComponentTelemetry, Telemetry
from processors import attributes, batch, cardinality, filter, memory_limiter
from processors.attributes import with_labels

SERIES = 1000
POINTS = 100_000

BUDGET_US = {
    "filter": 0.5,
    "attributes": 2.5,  # every point changes: rebuilding a frozen Point alone costs 1-2.5 µs here
    "batch": 0.5,
    "memory_limiter": 0.05,
    "cardinality": 1.0,
    "cardinality overflow": 2.0,  # folding merges exponential histograms: ~25 µs per merge here
}


def make_flushes(series: int = SERIES, points: int = POINTS) -> list[MetricBatch]:
    h = exphist.from_values(np.linspace(0.001, 0.5, 40))
    now = time.time_ns()
    flushes = []
    for f in range(points // series):
        t = now + f * 10**10
        pts = []
        for i in range(series):
            labels = (
                ("env", "production"),
                ("host", f"web-{i // 50:02d}"),  # with the name (i % 50): 1,000 distinct series
                ("route", f"/api/v1/items/{i % 50}"),
                ("service", f"svc-{i % 5}"),
            )
            name = f"app.requests.{i % 50}"
            pick = i % 10
            if pick < 7:
                p = Point(name, Kind.SUM, labels, t, float(i % 13), t - 10**10, Temporality.DELTA, True)
            elif pick < 9:
                p = Point(name + ".gauge", Kind.GAUGE, labels, t, float(i))
            else:
                p = Point(name + ".latency", Kind.HISTOGRAM, labels, t, histogram=h, unit="s")
            pts.append(p)
        flushes.append(MetricBatch(tuple(pts)))
    return flushes


class Discard:
    async def consume(self, batch: Batch) -> None:
        pass


def config_of(cls: type, data: dict[str, Any]) -> Any:
    decoder = Decoder(lambda path: None)
    config = decoder.decode(cls, data, ("bench",))
    assert not decoder.errors, decoder.errors
    return config


CASES: list[tuple[str, str, Any, dict[str, Any]]] = [
    ("filter", "exclude by name glob", filter.factory, {"metrics": {"exclude": {"match_type": "glob",
     "metric_names": ["*.gauge"]}}}),
    ("filter", "include by name + label regex", filter.factory, {"metrics": {"include": {
     "match_type": "regexp", "metric_names": ["app\\..*"],
     "labels": [{"key": "route", "regex": "/api/.*"}]}}}),
    ("attributes", "insert + rename + delete + hash", attributes.factory, {"actions": [
     {"action": "insert", "key": "cluster", "value": "eu1"},
     {"action": "rename", "key": "host", "new_key": "instance"},
     {"action": "delete", "pattern": "debug.*"},
     {"action": "hash", "key": "route"}]}),
    ("batch", "send_batch_size 8192", batch.factory, {"send_batch_size": 8192, "timeout": "10s"}),
    ("memory_limiter", "below the limit", memory_limiter.factory, {"limit": "64GiB"}),
    ("cardinality", "all series under the cap", cardinality.factory, {}),
    # 50 metric names of 20 series each: a cap of 10 folds half the points into overflow series
    ("cardinality overflow", "half the series over the cap", cardinality.factory,
     {"max_series_per_metric": 10, "action": "overflow"}),
]  # fmt: skip


async def _measure(factory: Any, data: dict[str, Any], flushes: list[MetricBatch]) -> float:
    tel = Telemetry()
    settings = Settings(
        id=ComponentId(factory.type),
        kind=ComponentKind.PROCESSOR,
        telemetry=ComponentTelemetry(tel, "processor", factory.type),
        logger=logging.getLogger(f"bench.{factory.type}"),
    )
    proc = factory.create(settings, config_of(factory.config_class, data), Discard())
    await proc.start()
    consume: Callable[[Batch], Any] = proc.consume
    start = time.process_time()
    for b in flushes:
        await consume(b)
    await proc.shutdown()  # the batch processor's last send is part of its cost
    elapsed = time.process_time() - start
    return elapsed / sum(len(b) for b in flushes) * 1e6


def _baseline(flushes: list[MetricBatch]) -> float:
    """Rebuilding every point with new labels and nothing else: the floor for any processor that
    changes every point (frozen dataclasses set each field through object.__setattr__)."""
    labels = (("env", "production"),)
    start = time.process_time()
    for b in flushes:
        MetricBatch(tuple([with_labels(p, labels, p.resource) for p in b.points]), b.context)
    return (time.process_time() - start) / sum(len(b) for b in flushes) * 1e6


def run(quick: bool) -> list[tuple[str, str, str]]:
    """(figure, value, budget) rows."""
    logging.getLogger("bench").setLevel(logging.ERROR)  # the cardinality case warns once per capped metric
    flushes = make_flushes()
    rounds = 2 if quick else 5
    rows: list[tuple[str, str, str]] = []
    floor = min(_baseline(flushes) for _ in range(rounds))
    rows.append(("baseline: rebuild every Point with new labels (µs/point)", f"{floor:.3f}", ""))
    for type_, what, factory, data in CASES:
        best = min(asyncio.run(_measure(factory, data, flushes)) for _ in range(rounds))
        budget = BUDGET_US[type_]
        rows.append((f"{type_}: {what} (µs/point)", f"{best:.3f}", f"<= {budget}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rows = run(args.quick)
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>8}  budget")
    for figure, value, budget in rows:
        print(f"{figure:<{width}}  {value:>8}  {budget}")


if __name__ == "__main__":
    main()
