"""Garbage-collection cost of the StatsD path at many series: feed → flush → the Prometheus exporter's store.

    python3 bench/gc_bench.py                              # 100,000 series, the agent's GC policy
    python3 bench/gc_bench.py --series 1000                # the ladder's 1,000-series case
    python3 bench/gc_bench.py --churn 0.1                  # 10 % of the series new at each flush
    python3 bench/gc_bench.py --policy before              # the policy before agent/gcpolicy.py's
    python3 bench/gc_bench.py --churn 1 --flushes 25 --lines-per-flush 100000   # full collections

Everything runs in this process on one core, as the agent's loop would run it: ``--lines-per-flush``
lines of bench/payloads.memory_payload's shape (20-line DogStatsD packets; 20 % timers, 40 % counters,
40 % gauges) fed to ``StatsdAggregator``, then the flush (``swap`` + ``build``, 2,000-point chunks as
the receiver hands them) consumed by a ``prometheus`` exporter (its store, as on the ladder; nothing is
served). With ``--churn c`` each flush's series are shifted by ``c × series``: that many are new and as
many are gone, which the exporter then forgets (its expiry, run at once instead of after 5 minutes).

Before the first flush the GC policy under test is applied as ``headwater run`` applies it after
startup: ``--policy agent`` (agent/gcpolicy.py: freeze what exists, thresholds (50,000, 1, 100), and
after each flush — standing for the 10-s rounds of its ``GcKeeper`` — a young collection and a freeze;
``--thaw-every N`` flushes its thaw, at most hourly) or ``--policy before`` (freeze what exists, thresholds
(50,000, 5, 20), nothing after; the aggregator is still this checkout's, which reuses its value arrays:
for the code before both, run this file from commit 574a01c). ``--threshold`` overrides the
thresholds. Every collection is timed through ``gc.callbacks``; the keeper's own rounds are
collections too and are counted with them. Reported per phase — the ramp (flush 1, where every series
is new) and the steady flushes after it — µs of CPU per line for the feed and for feed + flush, and
per generation the collections, their total and their longest pause. Each figure is CPU time of this process
(``time.process_time``) or wall time of one collection (``perf_counter``): on a shared machine
compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from everyday_bench import config_of

from agent import gcpolicy
from agent.component import ComponentId, ComponentKind, Settings
from agent.model import MetricBatch
from agent.telemetry import ComponentTelemetry, Telemetry
from exporters.prometheus import factory as prometheus_factory
from receivers.statsd.aggregator import StatsdAggregator

LINES_PER_PACKET = 20
BEFORE = (50_000, 5, 20)
"""The thresholds ``headwater run`` set before agent/gcpolicy.py."""


def series_line(i: int) -> bytes:
    """Series ``i`` of bench/payloads.memory_payload's shape (its value varies with nothing: the cost
    is the series', not the value's)."""
    host = f"host:node-{i % 500:03d}"
    kind = i % 5
    if kind == 0:
        return f"svc.latency:{10 + i % 90}.5|ms|#env:prod,{host},endpoint:/e{i // 5}".encode()
    if kind in (1, 2):
        return f"svc.requests:1|c|#env:prod,{host},endpoint:/e{i // 5},kind:k{kind}".encode()
    return f"svc.inflight:{i % 100}|g|#env:prod,{host},slot:s{i // 5},kind:k{kind}".encode()


def packets_of(first: int, series: int) -> list[bytes]:
    """One packet list holding series ``first`` … ``first + series - 1`` once each."""
    lines = [series_line(i) for i in range(first, first + series)]
    return [b"\n".join(lines[i : i + LINES_PER_PACKET]) for i in range(0, len(lines), LINES_PER_PACKET)]


@dataclass
class Pauses:
    """Collections timed by ``gc.callbacks``: per generation, each pause in seconds."""

    by_gen: dict[int, list[float]] = field(default_factory=lambda: {0: [], 1: [], 2: []})
    _started: float = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.by_gen[int(info["generation"])].append(time.perf_counter() - self._started)

    def mark(self) -> dict[int, int]:
        return {g: len(p) for g, p in self.by_gen.items()}

    def since(self, mark: dict[int, int]) -> dict[int, list[float]]:
        return {g: p[mark[g] :] for g, p in self.by_gen.items()}


@dataclass
class Phase:
    name: str
    lines: int = 0
    feed_s: float = 0.0
    flush_s: float = 0.0
    flushes: int = 0
    pauses: dict[int, list[float]] = field(default_factory=lambda: {0: [], 1: [], 2: []})

    def row(self) -> str:
        per_line = self.feed_s / self.lines * 1e6 if self.lines else 0.0
        total = (self.feed_s + self.flush_s) / self.lines * 1e6 if self.lines else 0.0
        gens = "  ".join(
            f"gen{g} {len(p):3d}× {sum(p) * 1e3:7.1f} ms (max {max(p, default=0.0) * 1e3:6.1f})"
            for g, p in self.pauses.items()
        )
        return (
            f"{self.name:7s} {self.flushes:2d} flush(es) {self.lines / 1e6:5.1f}M lines  "
            f"feed {per_line:.3f} µs/line  feed+flush {total:.3f} µs/line  "
            f"flush {self.flush_s / max(1, self.flushes):.3f} s  {gens}"
        )


def parse_threshold(text: str) -> tuple[int, int, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--threshold takes three integers: gen0,gen1,gen2")
    return parts[0], parts[1], parts[2]


@dataclass
class Thaw:
    """After the last flush: a full collection as the collector would run it (frozen objects
    excluded), then one over everything once unfrozen (the keeper's thaw), and the objects it
    freed: cyclic garbage that was being held."""

    full_s: float
    thawed_s: float
    freed: int
    frozen: int


async def run(args: argparse.Namespace) -> tuple[list[Phase], Thaw]:
    """The ramp and steady phases, and the collections after the last flush."""
    tel = Telemetry()
    settings = Settings(
        id=ComponentId("prometheus"),
        kind=ComponentKind.EXPORTER,
        telemetry=ComponentTelemetry(tel, ComponentKind.EXPORTER.value, "prometheus"),
        logger=logging.getLogger("bench.prometheus"),
    )
    exporter: Any = prometheus_factory.create(
        settings, config_of(prometheus_factory.config_class, {"endpoint": "127.0.0.1:9"})
    )
    store = exporter._store
    agg = StatsdAggregator(max_series=max(100_000, args.series))
    shift = int(args.series * args.churn)
    cycles_per_flush = max(1, args.lines_per_flush // args.series)
    pauses = Pauses()
    gc.freeze()
    gc.set_threshold(*(args.threshold or (gcpolicy.THRESHOLDS if args.policy == "agent" else BEFORE)))
    keeper = None
    if args.policy == "agent":
        rounds = iter(range(1, 1 << 62))
        # The keeper's clock counts flushes: each flush stands for one of its rounds.
        # A thaw every --thaw-every flushes: the keeper's most frequent (hourly, while memory grows).
        every = float(args.thaw_every)
        keeper = gcpolicy.GcKeeper(1.0, every, clock_s=lambda: float(next(rounds)), max_thaw_interval_s=every)
    gc.callbacks.append(pauses)
    phases = [Phase("ramp"), Phase("steady")]
    try:
        for flush in range(args.flushes):
            packets = packets_of(flush * shift, args.series)  # made outside the timed work
            phase = phases[0 if flush == 0 else 1]
            mark = pauses.mark()
            c0 = time.process_time()
            feed = agg.feed
            for _ in range(cycles_per_flush):
                for packet in packets:
                    feed(packet)
            c1 = time.process_time()
            began = time.monotonic()
            for chunk in agg.build(agg.swap(), 0, time.time_ns(), chunk_size=2000):
                if chunk:
                    await exporter.consume(MetricBatch(tuple(chunk)))
            if shift:
                store.expire(0.0, now=began)  # the series this flush did not update are gone
            if keeper is not None:
                keeper.step()
            c2 = time.process_time()
            phase.lines += cycles_per_flush * args.series
            phase.feed_s += c1 - c0
            phase.flush_s += c2 - c1
            phase.flushes += 1
            for g, p in pauses.since(mark).items():
                phase.pauses[g] += p
            if args.verbose:
                print(f"flush {flush + 1}: {pauses.since(mark)}", flush=True)
        t0 = time.perf_counter()
        gc.collect()
        full_s = time.perf_counter() - t0
        frozen = gc.get_freeze_count()
        gc.unfreeze()
        t0 = time.perf_counter()
        freed = gc.collect()
        thawed = Thaw(full_s, time.perf_counter() - t0, freed, frozen)
    finally:
        gc.callbacks.remove(pauses)
    return phases, thawed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=100_000, help="live series (100,000)")
    ap.add_argument("--flushes", type=int, default=5, help="flushes, the first being the ramp (5)")
    ap.add_argument(
        "--lines-per-flush",
        type=int,
        default=1_000_000,
        help="lines fed per flush, whole cycles over the series (1,000,000)",
    )
    ap.add_argument("--churn", type=float, default=0.0, help="share of the series replaced at each flush")
    ap.add_argument(
        "--threshold", type=parse_threshold, help="gc thresholds gen0,gen1,gen2 (the agent's default)"
    )
    ap.add_argument("--policy", choices=("agent", "before"), default="agent", help="GC policy (agent)")
    ap.add_argument(
        "--thaw-every", type=int, default=360, help="flushes between thaws (360: 1 h of 10-s flushes)"
    )
    ap.add_argument("--verbose", action="store_true", help="each flush's pauses")
    args = ap.parse_args()
    if args.series % LINES_PER_PACKET:
        ap.error(f"--series must be a multiple of {LINES_PER_PACKET}")
    phases, thaw = asyncio.run(run(args))
    print(
        f"policy {args.policy}: {args.series:,} series, churn {args.churn:g}, "
        f"{args.lines_per_flush:,} lines a flush, gc threshold {gc.get_threshold()}, "
        f"frozen after the last flush {thaw.frozen:,}"
    )
    for phase in phases:
        if phase.flushes:
            print(phase.row())
    print(
        f"after the last flush: a full collection {thaw.full_s * 1e3:.1f} ms; everything unfrozen and "
        f"collected {thaw.thawed_s * 1e3:.1f} ms, {thaw.freed} objects freed"
    )


if __name__ == "__main__":
    main()
