"""Headwater's benchmark: one command, one table, the Etsy statsd daemon measured in the same run.

    python bench/run.py              # full run (~12-15 min)
    python bench/run.py --quick      # smoke run (~3 min): short probes, short confirmation
    python bench/run.py --skip-peer  # Headwater only
    python bench/run.py --duration 120   # confirmation length in seconds (default 60; 8 with --quick)
    python bench/run.py --otlp-only  # OTLP ingest and export encoding only (~2 min)
    python bench/run.py --chain      # 20-line StatsD rate without and with the four processors (~5 min)

Figures and method
------------------
1. StatsD over UDP, sustained lines/s at < 0.1 % loss, for ~1.3 KB packets of 20 DogStatsD lines
   and for one line per packet, flush_interval 10 s. The receiver runs on core 0 (``taskset -c 0``),
   the sender (``udp_sender.c``, compiled here with gcc; ``udp_sender.py`` without a compiler) on
   core 1 and sends prebuilt datagrams to 127.0.0.1 at a fixed rate for a fixed time. A short search
   of 10 s probes steps the rate (doubling or halving until a pass and a fail bracket it, then
   bisecting); the best passing rate is then confirmed for the full duration (one retry at 85 % if
   it fails). Loss = sent lines minus the lines the receiver counted (Headwater's accepted + refused
   counters, statsd's ``metrics_received``), cross-checked with the kernel's drop count for the
   receiving socket (last column of /proc/net/udp). Both receivers get the same bytes and the kernel's
   default limits: nothing here changes a sysctl.
2. The longest event-loop stall: Headwater's ``headwater_event_loop_lag_max_seconds`` gauge, read
   after each confirmation run (a fresh agent per run, so the gauge covers exactly that run).
3. Parser cost per line: ``bench/parser_cost.py`` (µs per shape) and ``bench/feed_cost.py`` (µs on
   this benchmark's packets, and instructions per line under callgrind: a run minus its baseline).
4. RSS with 100,000 active series (20 % timers) after a flush, from VmRSS in /proc/<pid>/status.
5. OTLP (second table): OTLP/HTTP protobuf+gzip ingest, data points/s on one core and the
   receive-to-response latency at half that rate (``bench/otlp_ingest.py``); export encoding + gzip-6,
   µs per data point (``bench/otlp_encode.py``).
6. Not run here: whole pipelines in process, µs per point (``bench/pipeline_cost.py``): the processor
   chain, OTLP → OTLP, and StatsD → remote-write per flushed point and per line.

The table goes to stdout, progress to stderr, everything as JSON to bench/results/latest.json, and
each daemon's log to bench/results/logs/.

This file is the entry point (``make bench``): it parses the options and runs the measurements in order.
``harness.py`` holds the machinery (cores, processes, the sender, the two receivers), ``probes.py`` the
measurements and ``report.py`` the tables, budgets, notes and JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from harness import (
    FULL,
    HEADWATER,
    LOGS,
    PEER,
    QUICK,
    SENDER_CORE,
    EtsyStatsd,
    Headwater,
    Mode,
    Sender,
    Sent,
    Target,
    ensure_peer,
    loadavg,
    log,
    machine,
    sysctl,
    workdir,
)
from payloads import memory_payload, throughput_payload, throughput_series
from probes import (
    LOSS_LIMIT,
    MEMORY_SERIES,
    Sustained,
    find_sustained,
    memory_headwater,
    memory_peer,
    otlp_rows,
    parser_cost,
)
from report import add_notes, fmt_rate, render, render_otlp, verdict, write_latest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short probes and confirmation (~3 min)")
    ap.add_argument("--duration", type=float, help="confirmation run length in seconds (60; 8 with --quick)")
    ap.add_argument("--skip-peer", action="store_true", help="do not measure Etsy statsd")
    ap.add_argument("--skip-otlp", action="store_true", help="StatsD figures only")
    ap.add_argument("--otlp-only", action="store_true", help="OTLP figures only (ingest, encode)")
    ap.add_argument(
        "--chain",
        action="store_true",
        help="only the 20-line StatsD rate, without and with tenant → sample → percentiles → threshold",
    )
    args = ap.parse_args()
    mode = QUICK if args.quick else FULL
    if args.otlp_only:
        print(render_otlp(otlp_rows(args.quick)))
        return 0
    if args.chain:
        return chain_main(mode, args.duration or mode.confirm_s)
    confirm_s = args.duration or mode.confirm_s
    if os.cpu_count() is None or (os.cpu_count() or 0) < 2:
        log("warning: fewer than 2 cores; receiver and sender will share one")
    if shutil.which("taskset") is None:
        log("taskset (util-linux) is required")
        return 2
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(SENDER_CORE)})  # keep this orchestrator off the receiver's core
    LOGS.mkdir(parents=True, exist_ok=True)
    for old in LOGS.glob("*.log"):  # each run's daemon logs start empty
        old.unlink()
    t_start = time.monotonic()
    results: dict[str, Any] = {
        "mode": mode.name,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "confirm_s": confirm_s,
        "probe_s": mode.probe_s,
        "loss_limit": LOSS_LIMIT,
        "sysctl": {k: sysctl(k) for k in ("net.core.rmem_max", "net.core.rmem_default")},
        "loadavg_start": loadavg(),
        "throughput": {HEADWATER: {}},
        "notes": [],
    }
    notes: list[str] = results["notes"]
    peer_version: str | None = None
    if not args.skip_peer:
        peer_version, why = ensure_peer()
        if peer_version is None:
            notes.append(f"peer not measured: {why}")
    results["peer_version"] = peer_version

    payloads = {"20": throughput_payload(20), "1": throughput_payload(1)}
    with workdir() as wd:
        sender = Sender(wd)
        results["sender"] = sender.kind
        ceilings: dict[str, Sent] = {}
        for key, payload in payloads.items():
            ceilings[key] = sender.ceiling(payload, 1.0 if args.quick else 2.0)
            log(
                f"sender ceiling, {payload.name}: {ceilings[key].packets_per_s:,.0f} datagrams/s "
                f"= {ceilings[key].lines_per_s:,.0f} lines/s (into an unread socket)"
            )
        results["sender_ceiling"] = ceilings
        results["payloads"] = {
            k: {
                "packets": len(p.packets),
                "mean_lines": p.mean_lines,
                "mean_bytes": p.mean_bytes,
                "series": throughput_series(),
            }
            for k, p in payloads.items()
        }

        starts = {HEADWATER: {"20": 500_000.0, "1": 150_000.0}, PEER: {"20": 120_000.0, "1": 60_000.0}}
        targets: list[tuple[str, Callable[[str], Target]]] = [(HEADWATER, lambda k: Headwater(wd, k))]
        if peer_version:
            targets.append((PEER, lambda k: EtsyStatsd(wd, k)))
            results["throughput"][PEER] = {}
        try:
            for name, make in targets:
                for key, payload in payloads.items():
                    target = make(f"{key}line")
                    try:
                        results["throughput"][name][key] = find_sustained(
                            target,
                            sender,
                            payload,
                            starts[name][key],
                            ceilings[key].lines_per_s,
                            mode,
                            confirm_s,
                        )
                    except RuntimeError as exc:
                        log(f"{name}, {payload.name}: {exc}")
                        notes.append(f"{name}, {payload.name}: not measured: {str(exc).splitlines()[0]}")
                        results["throughput"][name][key] = None
                    finally:
                        target.close()

            mem_payload = memory_payload(MEMORY_SERIES)
            results["memory"] = {}
            log(f"memory: {MEMORY_SERIES:,} series, flush_interval {mode.memory_flush_s:g}s")
            try:
                results["memory"][HEADWATER] = memory_headwater(wd, sender, mem_payload, mode.memory_flush_s)
            except (RuntimeError, OSError) as exc:
                notes.append(f"headwater memory run failed: {str(exc).splitlines()[0]}")
            if peer_version:
                try:
                    results["memory"][PEER] = memory_peer(wd, sender, mem_payload, mode.memory_flush_s)
                except (RuntimeError, OSError) as exc:
                    notes.append(f"statsd memory run failed: {str(exc).splitlines()[0]}")
        except KeyboardInterrupt:
            log("interrupted; writing what was measured")
            notes.append("interrupted before the end")

    if "interrupted before the end" not in notes:
        results["parser"] = parser_cost(mode)

    if not args.skip_otlp and "interrupted before the end" not in notes:
        results["otlp"] = otlp_rows(args.quick)
    results["loadavg_end"] = loadavg()
    add_notes(results, payloads, ceilings, peer_version)
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    notes.append(
        f"whole run took {results['elapsed_s']:.0f} s; details in bench/results/latest.json, "
        "daemon logs in bench/results/logs/"
    )
    write_latest(results)
    print(render(results))
    if results.get("otlp"):
        print()
        print(render_otlp(results["otlp"]))
    return 0


def chain_main(mode: Mode, confirm_s: float) -> int:
    """The 20-line sustained rate twice in one run: plain, then through the four processors."""
    os.sched_setaffinity(0, {int(SENDER_CORE)})
    LOGS.mkdir(parents=True, exist_ok=True)
    payload = throughput_payload(20)
    rates: dict[bool, Sustained] = {}
    with workdir() as wd:
        sender = Sender(wd)
        ceiling = sender.ceiling(payload, 1.0)
        for chain in (False, True):
            target = Headwater(wd, "chain" if chain else "plain", chain=chain)
            try:
                rates[chain] = find_sustained(
                    target, sender, payload, 500_000.0, ceiling.lines_per_s, mode, confirm_s
                )
            finally:
                target.close()
    plain, chained = rates[False], rates[True]
    print("20-line packets, sustained lines/s at < 0.1 % loss:")
    print(f"  plain pipeline:                                   {fmt_rate(plain)}")
    print(f"  tenant → sample → percentiles → threshold:        {fmt_rate(chained)}")
    if plain.lines_per_s and chained.lines_per_s:
        ratio = chained.lines_per_s / plain.lines_per_s
        print(
            f"  with the chain / without: {ratio * 100:.1f} % (budget: within 20 %) {verdict(ratio >= 0.8)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
