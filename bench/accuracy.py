"""Quantile accuracy versus memory: the StatsD receiver's histograms and the percentiles windows.

    python bench/accuracy.py [--quick] [--budgets 160,320,640,1280,2048] [--detail] [--no-rss]

Measures issue 11 item 1 in process, through the code the agent runs, without changing any default:

1. Inputs (values in ms, fixed seeds): lognormal μ=3 σ=1 and σ=2; a bimodal mix (70 % around 1 ms,
   30 % around 500 ms, each lognormal σ=0.3); Pareto α=1.5 from 1 ms; uniform in log over
   0.1 ms – 60 s. Each at 4,000 and 100,000 values (4,000 only with --quick).
2. (a) receiver: every value sent as a StatsD timer line (``lat:<ms>|ms``, 20 lines per packet) into
   one ``StatsdAggregator(max_buckets=B)`` interval (values fold into histograms every 8,192, as in
   the agent), built with ``build()``; the one histogram's quantiles by ``exphist.quantile``.
3. (b) percentiles: for each window W of 1m/5m/1h, the same values spread over the W/10 s StatsD
   flushes that make up W (one aggregator, max_buckets=B, swap + build every 10 s of a simulated
   clock), every flush's points handed to a ``PercentilesProcessor`` (default config but
   ``max_buckets=B`` and the four quantiles below) at mid-flush; at the end one ``tick()`` on a
   boundary of every window, so each window holds exactly the values sent; its emitted gauges read.
4. Error: ``|estimate - exact| / exact`` for p50, p90, p99, p99.9, exact = numpy's quantile of the raw
   values with ``method="inverted_cdf"`` (the rank rule the agent documents).
5. Memory for 10,000 series × 1m/5m/1h at each budget: the slice arrays from the store's own tier
   layout (rows × (B float32 counts + 5 float64 statistics), positive side only), and (unless
   --no-rss or --quick) the RSS growth of a fresh subprocess that builds the processor and feeds
   10,000 series for 6 flushes, as ``bench/percentiles_bench.py`` does (its helpers are reused).
6. The issue's end-to-end figure: 4,000 ``random.Random(7).lognormvariate(3, 1)`` ms timers, 20-line
   packets, windows [1m], quantiles [0.5, 0.99], defaults otherwise: p50 19.386 vs exact 19.957.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from percentiles_bench import _Clock, _Null, _rss_kib  # noqa: E402

from agent import exphist  # noqa: E402
from agent.component import ComponentId, ComponentKind, Settings  # noqa: E402
from agent.confmodel import Duration, Size  # noqa: E402
from agent.model import Batch, Kind, MetricBatch, Point  # noqa: E402
from agent.telemetry import ComponentTelemetry, Telemetry  # noqa: E402
from processors.percentiles import PercentilesConfig, PercentilesProcessor  # noqa: E402
from receivers.statsd import StatsdConfig  # noqa: E402
from receivers.statsd.aggregator import StatsdAggregator  # noqa: E402

F64 = npt.NDArray[np.float64]

QUANTILES = [0.5, 0.9, 0.99, 0.999]
WINDOWS_S = [60.0, 300.0, 3600.0]
WINDOW_TEXT = {60.0: "1m", 300.0: "5m", 3600.0: "1h"}
FLUSH_S = 10.0
LINES_PER_PACKET = 20
SERIES = 10_000
MEMORY_BUDGET_MB = 400.0
END = 1_699_999_200.0
"""Where every run ends: a multiple of 3600 s, so the 1m, 5m and 1h windows all end on a slice boundary."""


def _bimodal(rng: np.random.Generator, n: int) -> F64:
    fast = rng.random(n) < 0.7
    return np.where(fast, rng.lognormal(math.log(1.0), 0.3, n), rng.lognormal(math.log(500.0), 0.3, n))


DISTRIBUTIONS: dict[str, tuple[int, Callable[[np.random.Generator, int], F64]]] = {
    "lognormal σ=1": (11, lambda rng, n: rng.lognormal(3.0, 1.0, n)),
    "lognormal σ=2": (12, lambda rng, n: rng.lognormal(3.0, 2.0, n)),
    "bimodal 1/500ms": (13, _bimodal),
    "pareto α=1.5": (14, lambda rng, n: rng.pareto(1.5, n) + 1.0),
    "loguniform .1ms-60s": (15, lambda rng, n: np.exp(rng.uniform(math.log(0.1), math.log(60_000.0), n))),
}
"""name → (seed, draw n values in ms)."""


def exact(values_ms: F64) -> F64:
    return np.quantile(values_ms, QUANTILES, method="inverted_cdf")


def timer_lines(values_ms: F64) -> list[bytes]:
    # repr round-trips, so the agent parses exactly the values the exact quantiles are computed from.
    return [f"lat:{v!r}|ms".encode() for v in values_ms.tolist()]


def _packets(lines: list[bytes]) -> list[bytes]:
    return [b"\n".join(lines[i : i + LINES_PER_PACKET]) for i in range(0, len(lines), LINES_PER_PACKET)]


def _flush(agg: StatsdAggregator, lines: list[bytes], end_s: float) -> list[Point]:
    """Feed `lines` in packets, detach the interval and build its points, as the receiver's flush does."""
    for packet in _packets(lines):
        agg.feed(packet)
    end_ns = int(end_s * 1e9)
    return [p for chunk in agg.build(agg.swap(), end_ns - int(FLUSH_S * 1e9), end_ns) for p in chunk]


def receiver_estimates(lines: list[bytes], budget: int) -> tuple[F64, int]:
    """(a): p50..p99.9 in ms of the receiver's histogram of all `lines` in one interval, and its scale."""
    points = _flush(StatsdAggregator(max_buckets=budget), lines, END)
    (point,) = [p for p in points if p.kind is Kind.HISTOGRAM]
    h = point.histogram
    assert h is not None
    return np.array([exphist.quantile(h, q) * 1000.0 for q in QUANTILES]), h.scale


def _settings() -> Settings:
    return Settings(
        id=ComponentId("percentiles"),
        kind=ComponentKind.PROCESSOR,
        telemetry=ComponentTelemetry(Telemetry(), "processor", "percentiles"),
        logger=logging.getLogger("bench.accuracy"),
    )


async def processor_estimates(
    lines: list[bytes], budget: int | None, window_s: float, config: PercentilesConfig | None = None
) -> tuple[F64, int]:
    """(b): p50..p99.9 in ms of window `window_s` after `lines` were sent over exactly that window,
    and the series' scale in the store; `budget` None: the receiver's and processor's defaults."""
    if config is None:
        config = PercentilesConfig(quantiles=list(QUANTILES))
        if budget is not None:
            config = PercentilesConfig(quantiles=list(QUANTILES), max_buckets=budget)
    flushes = round(window_s / FLUSH_S)
    start = END - window_s
    clock = _Clock()
    clock.now = start
    seen: list[MetricBatch] = []

    class _Keep(_Null):
        async def consume(self, batch: Batch) -> None:
            assert isinstance(batch, MetricBatch)  # the percentiles processor passes on metrics only
            seen.append(batch)

    sink = _Keep()
    proc = PercentilesProcessor(_settings(), config, sink, clock=clock, run_timer=False)
    agg = (
        StatsdAggregator(clock_s=clock)
        if budget is None
        else StatsdAggregator(max_buckets=budget, clock_s=clock)
    )
    cuts = np.linspace(0, len(lines), flushes + 1).round().astype(int)
    for k in range(flushes):
        clock.now = start + FLUSH_S * k + FLUSH_S / 2
        points = _flush(agg, lines[cuts[k] : cuts[k + 1]], start + FLUSH_S * (k + 1))
        if points:
            await proc.consume(MetricBatch(tuple(points)))
    clock.now = END
    seen.clear()
    await proc.tick()
    scale = int(proc._store.scale[0])  # the bench reports the scale the series ended at
    await proc.shutdown()
    text = WINDOW_TEXT[window_s]
    found: dict[float, float] = {}
    for batch in seen:
        for p in batch.points:
            labels = dict(p.labels)
            if p.name == "lat.quantile" and labels.get("window") == text:
                found[float(labels["quantile"])] = p.value * 1000.0
    return np.array([found.get(q, math.nan) for q in config.quantiles]), scale


def rel_error(estimate: F64, truth: F64) -> F64:
    return np.abs(estimate - truth) / np.abs(truth)


def measure_accuracy(budgets: list[int], sizes: list[int]) -> list[dict[str, Any]]:
    """One row per (distribution, n, path, window, budget) with the error at every quantile."""
    rows: list[dict[str, Any]] = []
    for name, (seed, draw) in DISTRIBUTIONS.items():
        for n in sizes:
            values = draw(np.random.default_rng(seed), n)
            lines = timer_lines(values)
            truth = exact(values)
            for budget in budgets:
                est, scale = receiver_estimates(lines, budget)
                rows.append(
                    {
                        "dist": name,
                        "n": n,
                        "path": "receiver",
                        "budget": budget,
                        "scale": scale,
                        "errors": rel_error(est, truth).tolist(),
                    }
                )
                for w in WINDOWS_S:
                    est, scale = asyncio.run(processor_estimates(lines, budget, w))
                    rows.append(
                        {
                            "dist": name,
                            "n": n,
                            "path": f"pct {WINDOW_TEXT[w]}",
                            "budget": budget,
                            "scale": scale,
                            "errors": rel_error(est, truth).tolist(),
                        }
                    )
    return rows


MEMORIES_MIB = [64, 128, 256, 512, 1024]
"""max_memory values of the fleet runs (256 MiB is the default)."""
FLEET_VALUES = 100
"""Values per series per 10 s flush in the fleet runs (10 per second; 600 per series over the minute)."""
FLEET_SAMPLE = 100
"""Series of the fleet whose quantiles are checked against the exact ones."""


async def _fleet_child(dist: str, max_memory_mib: int, series: int) -> dict[str, Any]:
    """10,000 series of `dist` at max_memory: 6 flushes of FLEET_VALUES values each as the StatsD
    receiver builds them (default max_buckets and max_scale), a tick after each; RSS growth, memory
    held, scales and the worst error of FLEET_SAMPLE series over p50..p99.9 of every window."""
    seed, draw = DISTRIBUTIONS[dist]
    rng = np.random.default_rng(seed)
    sample = set(range(0, series, series // FLEET_SAMPLE))
    kept: dict[int, list[F64]] = {i: [] for i in sample}
    receiver = StatsdConfig()
    flushes = []
    for _ in range(6):
        values = draw(rng, series * FLEET_VALUES) / 1000.0
        offsets = np.arange(series + 1, dtype=np.int64) * FLEET_VALUES
        for i in sample:
            kept[i].append(values[i * FLEET_VALUES : (i + 1) * FLEET_VALUES])
        hists = exphist.from_segments(
            values, None, offsets, max_buckets=receiver.max_buckets, max_scale=receiver.max_scale
        )
        points = [
            Point("lat", Kind.HISTOGRAM, (("series", str(i)),), 0, histogram=h, unit="s")
            for i, h in enumerate(hists)
        ]
        flushes.append([MetricBatch(tuple(points[i : i + 500])) for i in range(0, len(points), 500)])
        del values, hists, points
    gc.collect()
    before = _rss_kib()
    clock = _Clock()
    clock.now = END
    last: dict[tuple[int, str, float], float] = {}

    class _Keep(_Null):
        async def consume(self, batch: Batch) -> None:
            assert isinstance(batch, MetricBatch)  # the percentiles processor passes on metrics only
            for p in batch.points:
                labels = dict(p.labels)
                i = int(labels["series"])
                if i in sample and p.name == "lat.quantile":
                    last[(i, labels["window"], float(labels["quantile"]))] = p.value

    config = PercentilesConfig(
        quantiles=list(QUANTILES), max_series=series, max_memory=Size(max_memory_mib * 2**20)
    )
    tel = Telemetry()
    settings = Settings(
        id=ComponentId("percentiles"),
        kind=ComponentKind.PROCESSOR,
        telemetry=ComponentTelemetry(tel, "processor", "percentiles"),
        logger=logging.getLogger("bench.accuracy"),
    )
    proc = PercentilesProcessor(settings, config, _Keep(), clock=clock, run_timer=False)
    started = time.perf_counter()
    for k, batches in enumerate(flushes):
        clock.now = END + FLUSH_S * k + 5.0
        for b in batches:
            await proc.consume(b)
        clock.now = END + FLUSH_S * (k + 1)
        await proc.tick()
    took = time.perf_counter() - started
    gc.collect()
    after = _rss_kib()
    scales = proc._store.scale[:series]  # the bench reports the scales the series ended at
    worst = 0.0
    for i, parts in kept.items():
        truth = exact(np.concatenate(parts))
        for text in WINDOW_TEXT.values():
            est = np.array([last[(i, text, q)] for q in QUANTILES])
            worst = max(worst, float(rel_error(est, truth).max()))
    return {
        "grown_kib": after - before,
        "held_bytes": proc._store.memory_bytes(),
        "scale_min": int(scales.min()),
        "scale_median": float(np.median(scales)),
        "at_scale_6": float(np.mean(scales >= 6)),
        "squeezes": tel.value("percentiles_downscales_total", reason="memory"),
        "worst": worst,
        "bound": tel.value("percentiles_worst_error_ratio"),
        "seconds": took,
    }


def measure_fleet(dist: str, max_memory_mib: int) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, __file__, "--fleet-child", f"{dist}|{max_memory_mib}"],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(child.stdout)
    return result


async def issue_figure() -> tuple[float, float, float, float]:
    """(p50, exact p50, p99, exact p99) in ms: the issue's run, windows [1m], quantiles [0.5, 0.99]."""
    r = random.Random(7)
    values = np.array([r.lognormvariate(3.0, 1.0) for _ in range(4000)])
    config = PercentilesConfig(windows=[Duration(60.0)], quantiles=[0.5, 0.99])
    est, _ = await processor_estimates(timer_lines(values), None, 60.0, config)
    truth = np.quantile(values, [0.5, 0.99], method="inverted_cdf")
    return float(est[0]), float(truth[0]), float(est[1]), float(truth[1])


def _pct(x: float) -> str:
    return "  nan" if math.isnan(x) else f"{100 * x:5.2f}"


def span_report(sizes: list[int]) -> None:
    """Buckets each input needs at scale 6 (bound 0.54 %): over its whole span, and over the part a
    DDSketch-style store that collapses its lowest buckets (or both ends) must keep for p50..p99.9."""
    per_octave = 2**6
    print(
        "Buckets needed at scale 6 (error bound 0.54 %): whole span; p50..max (lowest collapsed); p50..p99.9"
    )
    for name, (seed, draw) in DISTRIBUTIONS.items():
        for n in sizes:
            v = draw(np.random.default_rng(seed), n)
            lo, hi = float(v.min()), float(v.max())
            p50, p999 = np.quantile(v, [0.5, 0.999], method="inverted_cdf").tolist()

            def need(a: float, b: float) -> int:
                return math.ceil(math.log2(b / a) * per_octave) + 1

            print(
                f"  {name:<20} n={n:<7} max/min {hi / lo:>12,.0f}×  {need(lo, hi):>5}  {need(p50, hi):>5}  "
                f"{need(p50, p999):>5}"
            )
    print()


def fleet_report(fleet: dict[tuple[str, int], dict[str, Any]]) -> None:
    print(
        f"{SERIES:,} series × 1m/5m/1h, {FLEET_VALUES} values per series per 10 s flush for a minute, "
        "defaults but max_memory;"
    )
    print(f"worst error over {FLEET_SAMPLE} series × p50/p90/p99/p99.9 × every window, against exact")
    print(
        f"  {'input':<20} {'max_memory':>10} {'held MB':>8} {'RSS growth MB':>13} {'scale min/med':>13} "
        f"{'at 6':>5} {'bound %':>7} {'worst %':>7} {'within 1 %':>10} {'s':>4}"
    )
    for (dist, mib), r in fleet.items():
        print(
            f"  {dist:<20} {str(mib) + ' MiB':>10} {r['held_bytes'] / 2**20:>8.0f} "
            f"{r['grown_kib'] / 1024:>13.0f} {r['scale_min']:>6}/{r['scale_median']:<6g} "
            f"{100 * r['at_scale_6']:>4.0f}% {_pct(r['bound']):>7} "
            f"{_pct(r['worst']):>7} {'yes' if r['worst'] <= 0.01 else 'NO':>10} {r['seconds']:>4.0f}"
        )
    print()


def report(rows: list[dict[str, Any]], budgets: list[int], detail: bool) -> None:
    names = list(DISTRIBUTIONS)
    if detail:
        print("Relative error (%) at p50 / p90 / p99 / p99.9, and the scale reached")
        for r in rows:
            errs = " / ".join(_pct(e) for e in r["errors"])
            print(
                f"  {r['dist']:<20} n={r['n']:<7} {r['path']:<9} B={r['budget']:<5} "
                f"scale {r['scale']:>3}  {errs}"
            )
        print()

    def worst(dist: str, budget: int, receiver: bool) -> float:
        return max(
            float(max(r["errors"]))
            for r in rows
            if r["dist"] == dist and r["budget"] == budget and (r["path"] == "receiver") == receiver
        )

    width = max(len(n) for n in names)
    for receiver, title in (
        (True, "(a) StatsD receiver histogram"),
        (False, "(b) percentiles 1m/5m/1h windows"),
    ):
        print(f"Worst relative error (%) over p50/p90/p99/p99.9 and every size, {title}")
        print(f"  {'budget':>6}  " + "  ".join(f"{n:>{width}}" for n in names))
        for b in budgets:
            print(f"  {b:>6}  " + "  ".join(f"{_pct(worst(n, b, receiver)):>{width}}" for n in names))
        print()

    print("Smallest budget with every quantile within 1 % on both paths")
    for n in names:
        ok = [b for b in budgets if worst(n, b, True) <= 0.01 and worst(n, b, False) <= 0.01]
        print(f"  {n:<{width}}  {ok[0] if ok else 'none of ' + ','.join(map(str, budgets))}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4,000 values only, no RSS subprocesses")
    parser.add_argument("--budgets", default="160,640,2048", help="max_buckets to sweep (2048: the default)")
    parser.add_argument("--detail", action="store_true", help="print every run's error at each quantile")
    parser.add_argument("--no-fleet", action="store_true", help="skip the 10,000-series subprocesses")
    parser.add_argument("--fleet-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fleet_child:
        dist, mib = args.fleet_child.split("|")
        print(json.dumps(asyncio.run(_fleet_child(dist, int(mib), SERIES))))
        return
    budgets = [int(b) for b in args.budgets.split(",")]
    started = time.perf_counter()

    p50, p50_exact, p99, p99_exact = asyncio.run(issue_figure())
    print(
        "Issue 11 figure: 4,000 lognormal(3, 1) ms timers (random.Random(7)), 20-line packets, windows [1m]"
    )
    print(
        f"  p50 {p50:.3f} ms vs exact {p50_exact:.3f} ({100 * (p50 / p50_exact - 1):+.2f} %); "
        f"p99 {p99:.3f} vs exact {p99_exact:.3f} ({100 * (p99 / p99_exact - 1):+.2f} %)"
    )
    print()

    sizes = [4000] if args.quick else [4000, 100_000]
    span_report(sizes)
    rows = measure_accuracy(budgets, sizes)
    report(rows, budgets, args.detail)
    if not args.no_fleet:
        runs = (
            [("lognormal σ=1", 256)] if args.quick else [(d, m) for d in DISTRIBUTIONS for m in MEMORIES_MIB]
        )
        fleet_report({(d, m): measure_fleet(d, m) for d, m in runs})
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
