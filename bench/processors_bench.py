"""Cost of tenant, sample, percentiles and threshold, alone and chained, µs per point.

Run from the repository root: ``python bench/processors_bench.py [--quick]``.

Input: the StatsD-shaped flushes of ``bench/everyday_bench.py`` (100,000 points over 1,000 series,
70 % counters, 20 % gauges, 10 % timers as exponential histograms). Each processor (and the chain
tenant → sample → percentiles → threshold) consumes them into a consumer that does nothing; the
figure is this process's CPU time per point, best of the rounds.

Processors run on flushed points, not on StatsD lines: with 1,000 series the StatsD receiver hands on
1,000 points per flush however many lines arrived, so the chain's share of the ingest cost is
(chain µs per point × points per flush) / (lines per flush). The table states it at the 20-line
benchmark's sustained rate; the budget is that the chain keeps the StatsD figure within 20 %.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from everyday_bench import Discard, config_of, make_flushes

from agent.component import ComponentId, ComponentKind, Settings
from agent.model import MetricBatch
from agent.telemetry import ComponentTelemetry, Telemetry
from processors import percentiles, sample, tenant, threshold

STATSD_LINES_PER_S = 505_410.0
"""The 20-line sustained rate the core benchmark measured (README); a flush every 10 s."""
FLUSH_S = 10.0

CONFIGS: dict[str, tuple[Any, dict[str, Any]]] = {
    "tenant": (tenant.factory, {"static": "team-a", "quota": {"points_per_second": 1_000_000}}),
    "sample": (sample.factory, {"rate": 0.5}),
    "percentiles": (percentiles.factory, {"windows": ["1m", "5m", "1h"]}),
    "threshold": (
        threshold.factory,
        {
            "rules": [
                {"name": "slow", "metric": "app.requests.*.latency", "statistic": "percentile",
                 "quantile": 0.99, "window": "5m", "op": ">", "warning": 0.4},
                {"name": "busy", "metric": "app.requests.*", "statistic": "rate", "window": "1m",
                 "op": ">", "warning": 1e9},
            ]
        },
    ),
}  # fmt: skip


def _make(type_: str, next_consumer: Any, tel: Telemetry) -> Any:
    factory, data = CONFIGS[type_]
    settings = Settings(
        id=ComponentId(type_),
        kind=ComponentKind.PROCESSOR,
        telemetry=ComponentTelemetry(tel, "processor", type_),
        logger=logging.getLogger(f"bench.{type_}"),
    )
    return factory.create(settings, config_of(factory.config_class, data), next_consumer)


async def _measure(chain: list[str], flushes: list[MetricBatch]) -> float:
    gc.collect()  # each round starts clean: no state of an earlier round's processors is still alive
    tel = Telemetry()
    nxt: Any = Discard()
    procs = []
    for type_ in reversed(chain):
        nxt = _make(type_, nxt, tel)
        procs.append(nxt)
    for p in procs:
        await p.start()
    start = time.process_time()
    for b in flushes:
        await nxt.consume(b)
    elapsed = time.process_time() - start
    for p in reversed(procs):
        await p.shutdown()
    return elapsed / sum(len(b) for b in flushes) * 1e6


def run(quick: bool) -> list[tuple[str, str, str]]:
    logging.getLogger("bench").setLevel(logging.ERROR)
    flushes = make_flushes()
    rounds = 2 if quick else 5
    rows: list[tuple[str, str, str]] = []
    for type_ in CONFIGS:
        best = min(asyncio.run(_measure([type_], flushes)) for _ in range(rounds))
        rows.append((f"{type_} (µs/point)", f"{best:.2f}", ""))
    chain = list(CONFIGS)
    best = min(asyncio.run(_measure(chain, flushes)) for _ in range(rounds))
    rows.append(("chain tenant → sample → percentiles → threshold (µs/point)", f"{best:.2f}", ""))
    points_per_flush = len(flushes[0])
    lines_per_flush = STATSD_LINES_PER_S * FLUSH_S
    share = best * points_per_flush / lines_per_flush  # µs of chain work per StatsD line
    per_line_us = 1e6 / STATSD_LINES_PER_S
    rows.append(
        (
            f"chain share of StatsD ingest at {STATSD_LINES_PER_S:,.0f} lines/s, 1,000 series",
            f"{share * 1000:.2f} ns/line = {share / per_line_us * 100:.2f} % of the line budget",
            "within 20 %",
        )
    )
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
