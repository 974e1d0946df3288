"""Cost of whole pipelines in process, µs per point: the before/after figures of issue 12, item 4.

Run from the repository root: ``python bench/pipeline_cost.py [--quick] [--json]`` (~30 s; ``--quick``
~10 s). Everything runs in this process on one core, no network and no compression unless a row says
so; each figure is CPU time of this process (``time.process_time``) divided by points, best of the
rounds. Timings swing about ±40 % between runs on small VMs: compare rows of the same run, and compare
before and after on a quiet machine. ``--quick`` uses fewer requests and flushes, so more of its
points are a series' first (cold caches): its figures are higher; compare full runs only.

1. Processor chain tenant → sample → percentiles → threshold: ``bench/processors_bench.py``'s own
   measurement (its configs and its 100,000 StatsD-shaped points over 1,000 series).
2. OTLP → OTLP: the uncompressed ExportMetricsServiceRequests of ``bench/otlp_ingest.py`` (1,000
   points each, one resource with 10 attributes, 2-4 attributes per point, 45 % cumulative sums, 30 %
   gauges, 20 % explicit and 5 % exponential histograms over 5,000 series), parsed with the
   receiver's shadow schema, converted by ``MetricsConverter``, handed as one batch per request either
   straight to an ``otlp_http`` exporter (compression none, delta) or through the chain of 1 first,
   and encoded into requests by the exporter's ``consume`` (queued in its memory queue, not sent). A
   cumulative series' first point only sets its delta baseline, so fewer points are queued than
   converted (the row says how many); the figure divides by the points converted.
3. StatsD → remote-write: the 20-line DogStatsD packets of ``bench/payloads.py`` (10,000 lines over
   1,000 series per flush) fed to ``StatsdAggregator``, flushed (``swap`` + ``build``, as the receiver
   does) and handed in chunks to a ``prometheus_remote_write`` exporter whose ``consume`` updates its
   series store and encodes the requests (memory queue, not sent). Its snappy compression is part of
   ``consume``; the row after it gives snappy alone (recompressing the same bodies) so it can be
   subtracted. Per line = feed + flush + export over lines; per flushed point = flush + export over
   points. At the real 20-line rate (~500,000 lines/s, 1,000 series, 10 s flushes) a flush is
   5,000 lines per point, so the per-line figure is then the feed's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from everyday_bench import config_of, make_flushes
from otlp_ingest import POINTS_PER_REQUEST, build_requests
from payloads import throughput_payload
from processors_bench import CONFIGS, _make, _measure

from agent.component import ComponentId, ComponentKind, Settings
from agent.model import MetricBatch
from agent.sending import Request
from agent.telemetry import ComponentTelemetry, Telemetry
from exporters.otlp import http_factory
from exporters.prometheus_remote_write import factory as remote_write_factory
from exporters.prometheus_remote_write import wire
from receivers.otlp.convert import MetricsConverter, ShadowMetricsRequest
from receivers.statsd.aggregator import StatsdAggregator

CHAIN = list(CONFIGS)
"""tenant → sample → percentiles → threshold, with processors_bench's configs."""
QUEUE = {"queue_size": 1_000_000, "full_policy": "drop_oldest"}
"""A memory queue that holds every request of a round: nothing is dropped, nothing is sent."""
FLUSH_NS = 10 * 10**9
STATSD_FLUSH_CHUNK = 2000
"""Points per batch the StatsD receiver hands on (its FLUSH_CHUNK at the time of writing)."""


def _settings(type_: str, kind: ComponentKind, tel: Telemetry) -> Settings:
    return Settings(
        id=ComponentId(type_),
        kind=kind,
        telemetry=ComponentTelemetry(tel, kind.value, type_),
        logger=logging.getLogger(f"bench.{type_}"),
    )


def _queued(exporter: Any) -> list[Request]:
    """The requests an exporter (never started) holds in its default memory queue."""
    return list(exporter._sender._items)


def _chain(consumer: Any, tel: Telemetry) -> tuple[Any, list[Any]]:
    """The processor chain in front of ``consumer``: (its head, the processors)."""
    procs = []
    nxt = consumer
    for type_ in reversed(CHAIN):
        nxt = _make(type_, nxt, tel)
        procs.append(nxt)
    return nxt, procs


# -- 2. OTLP → OTLP -----------------------------------------------------------------------------------
async def _otlp_round(bodies: list[bytes], with_chain: bool) -> dict[str, float]:
    gc.collect()  # each round starts clean: no state of an earlier round's exporter is still alive
    tel = Telemetry()
    exporter = http_factory.create(
        _settings("otlp_http", ComponentKind.EXPORTER, tel),
        config_of(
            http_factory.config_class,
            {"endpoint": "http://127.0.0.1:9/v1/metrics", "compression": "none", "sending_queue": QUEUE},
        ),
    )
    head: Any = exporter
    procs: list[Any] = []
    if with_chain:
        head, procs = _chain(exporter, tel)
    for p in procs:
        await p.start()
    converter = MetricsConverter()
    now_ns = time.time_ns()
    parse = convert = rest = 0.0
    points = 0
    clock = time.process_time
    for body in bodies:
        t0 = clock()
        request = ShadowMetricsRequest.FromString(body)
        t1 = clock()
        converted = converter.convert(request, now_ns)
        batch = MetricBatch(tuple(converted.points))
        t2 = clock()
        await head.consume(batch)
        t3 = clock()
        parse += t1 - t0
        convert += t2 - t1
        rest += t3 - t2
        points += len(batch)
    for p in reversed(procs):
        await p.shutdown()
    queued = _queued(exporter)
    if points != len(bodies) * POINTS_PER_REQUEST or not queued:
        raise SystemExit(f"OTLP: {points} points converted, {len(queued)} requests queued")
    sent = sum(r.points for r in queued)
    if not 0 < sent <= points:
        raise SystemExit(f"OTLP: {points} points in, {sent} queued")
    per = 1e6 / points
    return {"parse": parse * per, "convert": convert * per, "rest": rest * per,
            "total": (parse + convert + rest) * per, "queued": sent / points}  # fmt: skip


# -- 3. StatsD → remote-write -------------------------------------------------------------------------
async def _statsd_round(packets: tuple[bytes, ...], lines_per_flush: int, flushes: int) -> dict[str, Any]:
    gc.collect()
    tel = Telemetry()
    exporter = remote_write_factory.create(
        _settings("prometheus_remote_write", ComponentKind.EXPORTER, tel),
        config_of(
            remote_write_factory.config_class,
            {"endpoint": "http://127.0.0.1:9/api/v1/write", "sending_queue": QUEUE},
        ),
    )
    agg = StatsdAggregator()
    feed = agg.feed
    clock = time.process_time
    fed = build = export = 0.0
    points = 0
    start_ns = time.time_ns()
    for f in range(flushes):
        t0 = clock()
        for packet in packets:
            feed(packet)
        t1 = clock()
        interval = agg.swap()
        chunks = [
            MetricBatch(tuple(chunk))
            for chunk in agg.build(interval, start_ns + f * FLUSH_NS, start_ns + (f + 1) * FLUSH_NS,
                                   chunk_size=STATSD_FLUSH_CHUNK)
            if chunk
        ]  # fmt: skip
        t2 = clock()
        for batch in chunks:
            await exporter.consume(batch)
        t3 = clock()
        fed += t1 - t0
        build += t2 - t1
        export += t3 - t2
        points += sum(len(b) for b in chunks)
    lines = lines_per_flush * flushes
    refused: Counter[str] = Counter(agg.refused)
    if agg.accepted != lines or refused:
        raise SystemExit(f"StatsD: accepted {agg.accepted} of {lines} lines, refused {dict(refused)}")
    queued = _queued(exporter)
    if sum(r.points for r in queued) != points:
        raise SystemExit(f"remote-write: {points} points in, {sum(r.points for r in queued)} queued")
    return {
        "feed_line": fed / lines * 1e6,
        "flush_point": (build + export) / points * 1e6,
        "build_point": build / points * 1e6,
        "export_point": export / points * 1e6,
        "total_line": (fed + build + export) / lines * 1e6,
        "points_per_flush": points / flushes,
        "bodies": [wire.decompress(r.payload) for r in queued],
    }


def _snappy_per_point(bodies: list[bytes], points: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for body in bodies:
            wire.compress(body)
        best = min(best, time.process_time() - t0)
    return best / points * 1e6


def _best(runs: list[dict[str, Any]], key: str) -> float:
    return float(min(r[key] for r in runs))


def run(quick: bool) -> list[tuple[str, str, str, float]]:
    """(key, figure, unit, value) rows."""
    logging.getLogger("bench").setLevel(logging.ERROR)
    rounds = 2 if quick else 5
    rows: list[tuple[str, str, str, float]] = []

    # 1. the chain alone
    flushes = make_flushes()
    chain_us = min(asyncio.run(_measure(CHAIN, flushes)) for _ in range(rounds))
    rows.append(("chain", "chain tenant → sample → percentiles → threshold", "µs/point", chain_us))

    # 2. OTLP → OTLP
    bodies = build_requests(15 if quick else 40)
    for with_chain, label in ((False, "no processors"), (True, "through the chain")):
        runs = [asyncio.run(_otlp_round(bodies, with_chain)) for _ in range(rounds)]
        key = "otlp_chain" if with_chain else "otlp"
        queued = runs[0]["queued"] * 100
        rows.append((key, f"OTLP → OTLP, {label} ({queued:.0f} % queued)", "µs/point", _best(runs, "total")))
        rows.append(
            (f"{key}_parse", "  of which parse (shadow FromString)", "µs/point", _best(runs, "parse"))
        )
        rows.append((f"{key}_convert", "  of which convert", "µs/point", _best(runs, "convert")))
        rest = "chain + encode" if with_chain else "encode (exporter consume)"
        rows.append((f"{key}_rest", f"  of which {rest}", "µs/point", _best(runs, "rest")))

    # 3. StatsD → remote-write
    payload = throughput_payload(20)
    n_flushes = 3 if quick else 8
    statsd_runs = [
        asyncio.run(_statsd_round(payload.packets, payload.total_lines, n_flushes)) for _ in range(rounds)
    ]
    per_flush = statsd_runs[0]["points_per_flush"]
    snappy = _snappy_per_point(statsd_runs[0]["bodies"], int(per_flush * n_flushes), rounds)
    what = f"{payload.total_lines:,} lines → {per_flush:,.0f} points per flush"
    rows += [
        ("statsd_rw_point", f"StatsD → remote-write, per flushed point ({what})", "µs/point",
         _best(statsd_runs, "flush_point")),
        ("statsd_rw_build", "  of which flush (swap + build)", "µs/point", _best(statsd_runs, "build_point")),
        ("statsd_rw_export", "  of which remote-write consume (incl. snappy)", "µs/point",
         _best(statsd_runs, "export_point")),
        ("statsd_rw_snappy", "  snappy alone (same bodies)", "µs/point", snappy),
        ("statsd_rw_line", "StatsD → remote-write, per line (feed + flush + export)", "µs/line",
         _best(statsd_runs, "total_line")),
        ("statsd_feed_line", "  of which feed (20-line packets)", "µs/line", _best(statsd_runs, "feed_line")),
    ]  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller inputs (~10 s)")
    parser.add_argument("--json", action="store_true", help="print {key: value} as JSON instead")
    args = parser.parse_args()
    rows = run(args.quick)
    if args.json:
        print(json.dumps({key: round(value, 4) for key, _, _, value in rows}, indent=2))
        return
    width = max(len(r[1]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>8}  unit")
    for _, figure, unit, value in rows:
        print(f"{figure:<{width}}  {value:>8.3f}  {unit}")


if __name__ == "__main__":
    main()
