"""The benchmark's measurements: a UDP probe at a fixed rate, the search for the sustained rate, the RSS
with 100,000 series, the parser's cost per line, and the OTLP figures.

Each returns a dataclass that ``bench/report.py`` turns into table rows and ``bench/results/latest.json``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    BENCH,
    HEADWATER,
    PEER,
    QUICK,
    RECEIVER_CORE,
    REPO,
    EtsyStatsd,
    Headwater,
    Mode,
    Sender,
    Sent,
    Target,
    core_jiffies,
    cpu_seconds,
    log,
    pick,
    proc_status_kb,
    receive_buffer,
    udp_stats,
    wait_drained,
    wait_for,
)
from payloads import Payload

LOSS_LIMIT = 0.001
SENDER_SLACK = 0.97
"""A probe whose sender reached less than this share of the asked rate was limited by the sender."""
MEMORY_SERIES = 100_000


# -- probes and the search -------------------------------------------------------------------------
@dataclass
class Probe:
    target: str
    payload: str
    asked_lines_per_s: float
    duration_s: float
    sent_lines: int
    sent_packets: int
    offered_lines_per_s: float
    received_lines: float
    received_lines_per_s: float
    refused_lines: float
    missing_lines: float
    kernel_drops: int
    self_reported_drops: float | None
    loss: float
    passed: bool
    sender_limited: bool
    receiver_cpu: float
    """Share of one core the receiver used while the sender ran."""
    foreign_cpu: float
    """Share of the receiver's core used by other processes meanwhile (other work on the machine)."""
    lag_max_s: float | None
    receive_buffer: int | None
    sender_max_behind_ms: float


def run_probe(target: Target, sender: Sender, payload: Payload, lines_per_s: float, duration: float) -> Probe:
    before = target.begin()
    port, pid = target.port, target.pid
    st0 = udp_stats(port)
    rb = receive_buffer(port)
    cpu0, t0, core0 = cpu_seconds(pid), time.monotonic(), core_jiffies(RECEIVER_CORE)
    sent = sender.send(port, payload, lines_per_s / payload.mean_lines, duration)
    cpu1, t1, core1 = cpu_seconds(pid), time.monotonic(), core_jiffies(RECEIVER_CORE)
    wait_drained(port)
    st1 = udp_stats(port)
    after = target.end()
    drops = (st1.drops if st1 else 0) - (st0.drops if st0 else 0)
    received = after.received - before.received
    missing = sent.lines - received
    loss = max(missing, drops * payload.mean_lines, 0.0) / sent.lines if sent.lines else 1.0
    self_drops = None
    if after.self_reported_drops is not None and before.self_reported_drops is not None:
        self_drops = after.self_reported_drops - before.self_reported_drops
    asked_pps = lines_per_s / payload.mean_lines
    receiver_cpu = (cpu1 - cpu0) / (t1 - t0) if t1 > t0 else 0.0
    core_total = core1[1] - core0[1]
    core_share = (core1[0] - core0[0]) / core_total if core_total > 0 else 0.0
    probe = Probe(
        target=target.name,
        payload=payload.name,
        asked_lines_per_s=lines_per_s,
        duration_s=sent.elapsed,
        sent_lines=sent.lines,
        sent_packets=sent.packets,
        offered_lines_per_s=sent.lines_per_s,
        received_lines=received,
        received_lines_per_s=received / sent.elapsed if sent.elapsed else 0.0,
        refused_lines=after.refused - before.refused,
        missing_lines=missing,
        kernel_drops=drops,
        self_reported_drops=self_drops,
        loss=loss,
        passed=loss < LOSS_LIMIT,
        sender_limited=sent.packets_per_s < SENDER_SLACK * asked_pps,
        receiver_cpu=receiver_cpu,
        foreign_cpu=max(0.0, core_share - receiver_cpu),
        lag_max_s=after.lag_max_s,
        receive_buffer=rb,
        sender_max_behind_ms=sent.max_behind_ms,
    )
    log(
        f"  {target.name:<11} {payload.name:<15} asked {lines_per_s:>11,.0f}  offered "
        f"{probe.offered_lines_per_s:>11,.0f}  received {probe.received_lines_per_s:>11,.0f} lines/s  "
        f"loss {loss * 100:6.3f} %  drops {drops:>7,}  cpu {probe.receiver_cpu * 100:3.0f} %"
        f" (others {probe.foreign_cpu * 100:2.0f} %)"
        + (f"  lag {after.lag_max_s * 1000:.1f} ms" if after.lag_max_s is not None else "")
        + (f"  sender behind {sent.max_behind_ms:.0f} ms" if sent.max_behind_ms >= 5 else "")
        + ("  SENDER-LIMITED" if probe.sender_limited else "")
        + ("  pass" if probe.passed else "  FAIL")
    )
    return probe


@dataclass
class Sustained:
    target: str
    payload: str
    lines_per_s: float | None
    """Offered rate of the passing confirmation run; None when no rate passed."""
    confirmed: Probe | None
    confirmation_runs: list[Probe]
    search: list[Probe]
    sender_limited: bool
    best_received_lines_per_s: float
    note: str = ""


def find_sustained(
    target: Target,
    sender: Sender,
    payload: Payload,
    start: float,
    ceiling: float,
    mode: Mode,
    confirm_s: float,
) -> Sustained:
    """Search with short probes, then confirm the best passing rate for ``confirm_s`` seconds."""
    log(f"{target.name}, {payload.name}: search from {start:,.0f} lines/s")
    search: list[Probe] = []
    lo: float | None = None
    hi: float | None = None
    rate = min(start, ceiling)
    limited = False
    for _ in range(mode.max_probes):
        p = run_probe(target, sender, payload, rate, mode.probe_s)
        search.append(p)
        if p.passed:
            lo = max(lo or 0.0, min(rate, p.offered_lines_per_s))
            if p.sender_limited or rate >= ceiling * SENDER_SLACK:
                limited = True
                break
        else:
            hi = rate if hi is None else min(hi, rate)
        if lo is not None and hi is not None:
            if hi / lo < 1.12:
                break
            rate = math.sqrt(lo * hi)
        elif lo is not None:
            rate = min(lo * 2, ceiling)
        else:
            rate = rate / 2
            if rate < start / 64:
                break
    confirmation: list[Probe] = []
    confirmed: Probe | None = None
    note = ""
    if lo is None:
        lowest = min(p.asked_lines_per_s for p in search)
        note = f"lost ≥ {LOSS_LIMIT * 100:g} % at every rate tried (down to {lowest:,.0f} lines/s)"
    else:
        candidates = [lo, lo * 0.85] if mode.retry_confirm else [lo]
        for rate in candidates:
            target.fresh()
            log(f"{target.name}, {payload.name}: confirm {rate:,.0f} lines/s for {confirm_s:g} s")
            p = run_probe(target, sender, payload, rate, confirm_s)
            confirmation.append(p)
            if p.passed:
                confirmed = p
                break
        if confirmed is None:
            note = (
                f"the {confirm_s:g} s confirmation lost ≥ {LOSS_LIMIT * 100:g} % at "
                + ", ".join(f"{p.asked_lines_per_s:,.0f}" for p in confirmation)
                + " lines/s"
            )
    target.close()
    return Sustained(
        target=target.name,
        payload=payload.name,
        lines_per_s=confirmed.offered_lines_per_s if confirmed else None,
        confirmed=confirmed,
        confirmation_runs=confirmation,
        search=search,
        sender_limited=limited or bool(confirmed and confirmed.sender_limited),
        best_received_lines_per_s=max(p.received_lines_per_s for p in search + confirmation),
        note=note,
    )


# -- memory with 100k series -----------------------------------------------------------------------
@dataclass
class Memory:
    target: str
    series_sent: int
    lines_sent: int
    lines_received: float
    idle_rss_mb: float
    rss_after_flush_mb: float | None
    hwm_mb: float | None
    rss_after_scrape_mb: float | None = None
    scrape_bytes: int | None = None
    scrape_s: float | None = None
    flush_lag_max_s: float | None = None
    flushes_seen: int = 0
    note: str = ""


def _send_all(sender: Sender, port: int, payload: Payload) -> Sent:
    rate = 1_000.0  # datagrams/s (20k lines/s): well below either receiver's limit, so nothing is lost
    sent = sender.send(port, payload, rate, len(payload.packets) / rate)
    wait_drained(port)
    return sent


def memory_headwater(workdir: Path, sender: Sender, payload: Payload, flush_s: float) -> Memory:
    hw = Headwater(workdir, "memory", flush_interval_s=flush_s)
    hw.start()
    try:
        time.sleep(1.0)
        idle = proc_status_kb(hw.pid, "VmRSS") / 1024
        lines = 0
        flushes = 0
        note = ""

        def exported() -> float:
            return pick(hw.metrics(), "headwater_exporter_sent_points_total", exporter="prometheus") or 0.0

        for _ in range(2):  # two intervals: the second flush finds every series already known
            before = exported()
            lines += _send_all(sender, hw.port, payload).lines

            def flushed(base: float = before) -> bool:
                return exported() - base >= MEMORY_SERIES

            if wait_for(flushed, flush_s * 2 + 30, 0.25):
                flushes += 1
            else:
                note = "no flush observed through headwater_exporter_sent_points_total"
        time.sleep(0.5)
        counts = hw.counts()
        rss = proc_status_kb(hw.pid, "VmRSS") / 1024
        hwm = proc_status_kb(hw.pid, "VmHWM") / 1024
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{hw.prom_port}/metrics", timeout=60) as resp:
            body = resp.read()
        scrape_s = time.monotonic() - t0
        after_scrape = proc_status_kb(hw.pid, "VmRSS") / 1024
        return Memory(
            target=HEADWATER,
            series_sent=MEMORY_SERIES,
            lines_sent=lines,
            lines_received=counts.received,
            idle_rss_mb=idle,
            rss_after_flush_mb=rss,
            hwm_mb=hwm,
            rss_after_scrape_mb=after_scrape,
            scrape_bytes=len(body),
            scrape_s=scrape_s,
            flush_lag_max_s=counts.lag_max_s,
            flushes_seen=flushes,
            note=note,
        )
    finally:
        hw.close()


def memory_peer(workdir: Path, sender: Sender, payload: Payload, flush_s: float) -> Memory:
    peer = EtsyStatsd(workdir, "memory", flush_interval_s=flush_s)
    peer.start()
    try:
        time.sleep(1.0)
        idle = proc_status_kb(peer.pid, "VmRSS") / 1024
        lines = 0
        flushes = 0
        note = ""
        for _ in range(2):
            lines += _send_all(sender, peer.port, payload).lines
            done = peer.totals().get("flushes", 0)

            def flushed(base: float = done) -> bool:
                return peer.totals().get("flushes", 0) > base

            if wait_for(flushed, flush_s * 2 + 30, 0.25):
                flushes += 1
            else:
                note = "no flush observed"
        rss = proc_status_kb(peer.pid, "VmRSS") / 1024
        hwm = proc_status_kb(peer.pid, "VmHWM") / 1024
        received = peer.totals().get("metrics_received", 0.0)
        return Memory(
            target=PEER,
            series_sent=MEMORY_SERIES,
            lines_sent=lines,
            lines_received=received,
            idle_rss_mb=idle,
            rss_after_flush_mb=rss,
            hwm_mb=hwm,
            flushes_seen=flushes,
            note=note,
        )
    finally:
        peer.close()


# -- parser cost -----------------------------------------------------------------------------------
@dataclass
class ParserCost:
    parser_cost_rows: dict[str, float] = field(default_factory=dict)
    """bench/parser_cost.py: µs per line per shape."""
    parser_cost_note: str = ""
    feed_us_per_line: float | None = None
    """bench/feed_cost.py: µs per line on this benchmark's 20-line packets."""
    instructions_per_line: float | None = None
    callgrind_lines: int = 0
    callgrind_note: str = ""


def parser_cost(mode: Mode) -> ParserCost:
    out = ParserCost()
    script = BENCH / "parser_cost.py"
    pin = ["taskset", "-c", RECEIVER_CORE]
    if script.exists():
        helptext = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO, check=False
        ).stdout
        cmd = [*pin, sys.executable, str(script)]
        if "--lines" in helptext:
            cmd += ["--lines", str(mode.parser_lines)]
        if "--repeat" in helptext:
            cmd += ["--repeat", str(mode.parser_repeat)]
        if mode is QUICK and "--shape" in helptext and "mixed" in helptext:
            cmd += ["--shape", "mixed"]
        log("parser cost: " + " ".join(cmd[3:]))
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False, timeout=600)
        for line in proc.stdout.splitlines():
            parts = line.rsplit(None, 2)
            if len(parts) == 3:
                with contextlib.suppress(ValueError):
                    out.parser_cost_rows[parts[0].strip()] = float(parts[1])
        if proc.returncode != 0 or not out.parser_cost_rows:
            out.parser_cost_note = f"parser_cost.py failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
    else:
        out.parser_cost_note = "bench/parser_cost.py not present"

    feed = [sys.executable, str(BENCH / "feed_cost.py")]
    proc = subprocess.run(
        [*pin, *feed, "--lines", str(mode.parser_lines), "--repeat", str(mode.parser_repeat)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=600,
    )
    if proc.returncode == 0:
        out.feed_us_per_line = float(proc.stdout.strip())
    else:
        out.callgrind_note = f"feed_cost.py failed: {proc.stderr.strip()[-500:]}"
        return out

    if shutil.which("valgrind") is None:
        out.callgrind_note = "valgrind not installed"
        return out
    n = mode.callgrind_lines
    log(f"callgrind: {n:,} lines vs baseline (two valgrind runs in parallel)")
    env = dict(os.environ, PYTHONHASHSEED="0")
    runs = [
        subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                *feed,
                "--lines",
                str(n),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for extra in ([], ["--baseline"])
    ]
    counts: list[int] = []
    for run in runs:
        _, err = run.communicate(timeout=900)
        match = re.search(r"Collected\s*:\s*(\d+)", err)
        if run.returncode != 0 or not match:
            out.callgrind_note = f"valgrind failed: {err.strip()[-500:]}"
            return out
        counts.append(int(match.group(1)))
    out.instructions_per_line = (counts[0] - counts[1]) / n
    out.callgrind_lines = n
    return out


# -- OTLP ------------------------------------------------------------------------------------------
def otlp_rows(quick: bool) -> list[tuple[str, str, str]]:
    """OTLP/HTTP ingest (bench/otlp_ingest.py) and OTLP export encoding (bench/otlp_encode.py)."""
    import otlp_encode
    import otlp_ingest

    log("otlp: ingest through the receiver (server on core 0, client on core 1)")
    rows = otlp_ingest.run(quick)
    log("otlp: export encoding")
    return rows + otlp_encode.run(quick)
