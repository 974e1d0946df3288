"""The StatsD ladder: rising 15-s steps at kernel defaults, Headwater and Etsy statsd in the same run.

    python3 bench/ladder.py                       # both receivers, the default ladder (~6 min)
    python3 bench/ladder.py --skip-peer           # Headwater only
    python3 bench/ladder.py --steps 100k,200k,400k --step-s 5   # a short probe
    python3 bench/ladder.py --receive-buffer 212992   # as on a kernel whose net.core.rmem_max is 208 KiB

This is how users measure a StatsD daemon, and it is harsher than ``bench/run.py``'s search (which
confirms one rate on a fresh agent for 60 s): one receiver process takes every step in turn, the rate
rises by a step every ``--step-s`` seconds (15) with no pause for the receiver to catch up beyond the
drain of its socket, and nothing is tuned: the kernel's limits are whatever this machine has (no sysctl
is changed; each run records net.core.rmem_max / rmem_default) and Headwater runs with its defaults
(flush_interval 10 s, receive_buffer 32 MiB asked, clamped by rmem_max). ``--receive-buffer`` asks for
a smaller buffer, to see what a kernel with a lower rmem_max (208 KiB is Linux's stock value) gives.

Each receiver runs on core 0 (``taskset -c 0``), the paced C sender (bench/udp_sender.c, sendmmsg) on
core 1, sending bench/payloads.throughput_payload(20): packets of 20 DogStatsD lines (~1.3 KB) over
1,000 series (``--series N``: N distinct series each sent once a cycle, so every flush carries N). Per
step:

- loss = (sent lines - lines the receiver accounted for) / sent lines. Headwater accounts on /metrics
  for accepted + refused lines (``headwater_receiver_{accepted,refused}_points_total``); lines the
  kernel dropped are in ``headwater_receiver_udp_kernel_drops_total`` (datagrams) and are the missing
  ones; ``missing`` and ``kernel drops × 20`` are both reported. Etsy statsd counts
  ``metrics_received`` (a fresh statsd per step: it writes its totals when it exits).
- a step passes at < 0.1 % loss; the clean rate is the last step before the first that fails (the
  users' figure), the best pass is the highest passing step. After ``--stop-after`` steps in a row (2)
  at 1 % loss or more the receiver's ladder ends.
- Headwater's own view of the step (deltas of its /metrics histograms): event-loop lag timers over
  5 ms and the longest bucket reached, GC collections, pause seconds and the longest pause's bucket per
  generation, and the CPU share it used (utime+stime from /proc) — these, not wall time, show what the
  step cost.

Output: a table on stdout and JSON in bench/results/ladder-<UTC time>.json (``--out`` overrides).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    LOGS,
    PEER,
    RECEIVER_CORE,
    REPO,
    RESULTS,
    SENDER_CORE,
    EtsyStatsd,
    Sender,
    UdpStats,
    core_jiffies,
    cpu_seconds,
    ensure_peer,
    free_port,
    loadavg,
    log,
    machine,
    pick,
    receive_buffer,
    scrape,
    stop_process,
    sysctl,
    tail,
    udp_stats,
    wait_drained,
    wait_for,
    workdir,
)
from payloads import Payload, memory_payload, throughput_payload

LOSS_LIMIT = 0.001
STOP_LOSS = 0.01
"""A step at this loss or more counts towards ending a ladder (a marginal miss does not end it)."""
DEFAULT_STEPS = "25k,50k,75k,100k,150k,200k,300k,400k,500k,600k,700k,800k,900k,1000k,1100k,1200k"
Samples = list[tuple[str, dict[str, str], float]]


def parse_steps(text: str) -> list[float]:
    """``100k,200k,1.2m`` → lines/s."""
    out: list[float] = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1e3 if part.endswith("k") else 1e6 if part.endswith("m") else 1.0
        out.append(float(part.rstrip("km")) * scale)
    return out


@dataclass
class Step:
    target: str
    asked_lines_per_s: float
    duration_s: float
    sent_lines: int
    offered_lines_per_s: float
    accounted_lines: float
    missing_lines: float
    kernel_drop_lines: float
    loss: float
    passed: bool
    receiver_cpu: float
    """Share of one core the receiver used while the sender ran."""
    foreign_cpu: float
    """Share of the receiver's core other processes used meanwhile (a busy machine shows here)."""
    sender_max_behind_ms: float
    lag_over_5ms: float | None = None
    """Headwater's 20-ms loop-lag timers that found the loop more than 5 ms late during the step."""
    lag_worst_bucket_s: float | None = None
    """The highest lag bucket any timer of the step reached (upper bound, seconds)."""
    gc: dict[str, list[float]] = field(default_factory=dict)
    """Per generation: [collections, pause seconds, longest pause's bucket bound in seconds] during the
    step (the bound is 0 when no collection ran)."""


class Agent:
    """Headwater (``python -m agent run``) on the receiver core, one process for the whole ladder."""

    def __init__(self, wd: Path, receive_buffer_bytes: int | None, label: str) -> None:
        self.wd = wd
        self.receive_buffer_bytes = receive_buffer_bytes
        self.label = label
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.prom_port = self.admin_port = self.pid = 0
        self.log_path = LOGS / f"ladder-headwater-{label}.log"

    def start(self) -> None:
        self.port, self.prom_port, self.admin_port = free_port(), free_port(), free_port()
        config = self.wd / f"ladder-{self.label}.yaml"
        rb = f"    receive_buffer: {self.receive_buffer_bytes}\n" if self.receive_buffer_bytes else ""
        config.write_text(
            "receivers:\n"
            "  statsd:\n"
            f"    udp: 127.0.0.1:{self.port}\n" + rb + "exporters:\n"
            "  prometheus:\n"
            f"    endpoint: 127.0.0.1:{self.prom_port}\n"
            "service:\n"
            "  telemetry:\n"
            f"    endpoint: 127.0.0.1:{self.admin_port}\n"
            "  pipelines:\n"
            "    metrics:\n"
            "      receivers: [statsd]\n"
            "      exporters: [prometheus]\n"
        )
        LOGS.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                ["taskset", "-c", RECEIVER_CORE, sys.executable, "-m", "agent", "run", "-c", str(config)],
                cwd=REPO,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.pid = self.proc.pid
        if not wait_for(self._ready, 60, 0.1):
            self.close()
            raise RuntimeError(f"Headwater did not become ready; log {self.log_path}:\n{tail(self.log_path)}")

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"Headwater exited at start; log {self.log_path}:\n{tail(self.log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> Samples:
        return scrape(f"http://127.0.0.1:{self.admin_port}/metrics")

    def settled(self) -> Samples:
        """/metrics once two scrapes 0.2 s apart agree on the lines accounted for."""
        last = self.metrics()
        for _ in range(50):
            time.sleep(0.2)
            now = self.metrics()
            if accounted(now) == accounted(last):
                return now
            last = now
        return last

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def accounted(s: Samples) -> float:
    accepted = pick(s, "headwater_receiver_accepted_points_total", receiver="statsd")
    if accepted is None:
        raise RuntimeError("headwater_receiver_accepted_points_total{receiver=statsd} missing from /metrics")
    return accepted + (pick(s, "headwater_receiver_refused_points_total", receiver="statsd") or 0.0)


def _hist(s: Samples, name: str, **labels: str) -> dict[str, float]:
    """Cumulative bucket counts by ``le`` plus ``count`` and ``sum`` of one histogram."""
    out: dict[str, float] = {}
    for n, lab, v in s:
        if not all(lab.get(k) == x for k, x in labels.items()):
            continue
        if n == name + "_bucket":
            out[lab["le"]] = v
        elif n == name + "_count":
            out["count"] = v
        elif n == name + "_sum":
            out["sum"] = v
    return out


def _loop_view(before: Samples, after: Samples) -> tuple[float, float]:
    b = _hist(before, "headwater_event_loop_lag_seconds")
    a = _hist(after, "headwater_event_loop_lag_seconds")
    if not a:
        return 0.0, 0.0
    le5 = a.get("0.005", 0.0) - b.get("0.005", 0.0)
    over5 = (a.get("count", 0.0) - b.get("count", 0.0)) - le5
    total = a.get("count", 0.0) - b.get("count", 0.0)
    worst = float("inf")  # the smallest bucket bound that holds every timer of the step
    for bound in sorted(float(k) for k in a if k not in ("count", "sum", "+Inf")):
        key = next(k for k in a if k not in ("count", "sum", "+Inf") and float(k) == bound)
        if a[key] - b.get(key, 0.0) >= total:
            worst = bound
            break
    return over5, worst


def _worst_bucket(before: dict[str, float], after: dict[str, float]) -> float:
    """The smallest bucket bound that holds every observation between two scrapes of a histogram (0 when
    none was made; inf when one passed the last finite bound)."""
    total = after.get("count", 0.0) - before.get("count", 0.0)
    if total <= 0:
        return 0.0
    bounds = sorted((float(k), k) for k in after if k not in ("count", "sum", "+Inf"))
    for bound, key in bounds:
        if after[key] - before.get(key, 0.0) >= total:
            return bound
    return float("inf")


def _gc_view(before: Samples, after: Samples) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for g in ("0", "1", "2"):
        b = _hist(before, "headwater_gc_pause_seconds", generation=g)
        a = _hist(after, "headwater_gc_pause_seconds", generation=g)
        if a:
            out[g] = [
                a.get("count", 0.0) - b.get("count", 0.0),
                a.get("sum", 0.0) - b.get("sum", 0.0),
                _worst_bucket(b, a),
            ]
    return out


def _send(
    sender: Sender, port: int, pid: int, payload: Payload, rate: float, step_s: float
) -> tuple[Any, float, float]:
    cpu0, t0, core0 = cpu_seconds(pid), time.monotonic(), core_jiffies(RECEIVER_CORE)
    sent = sender.send(port, payload, rate / payload.mean_lines, step_s)
    cpu1, t1, core1 = cpu_seconds(pid), time.monotonic(), core_jiffies(RECEIVER_CORE)
    own = (cpu1 - cpu0) / (t1 - t0) if t1 > t0 else 0.0
    total = core1[1] - core0[1]
    share = (core1[0] - core0[0]) / total if total > 0 else 0.0
    return sent, own, max(0.0, share - own)


def ladder_headwater(
    wd: Path,
    sender: Sender,
    payload: Payload,
    steps: list[float],
    step_s: float,
    stop_after: int,
    rb: int | None,
) -> tuple[list[Step], dict[str, Any]]:
    agent = Agent(wd, rb, "default" if rb is None else f"rb{rb}")
    agent.start()
    info: dict[str, Any] = {"receive_buffer_bytes": receive_buffer(agent.port)}
    out: list[Step] = []
    fails = 0
    try:
        for rate in steps:
            before = agent.metrics()
            st0 = udp_stats(agent.port)
            sent, own, foreign = _send(sender, agent.port, agent.pid, payload, rate, step_s)
            wait_drained(agent.port)
            after = agent.settled()
            st1 = udp_stats(agent.port)
            got = accounted(after) - accounted(before)
            over5, worst = _loop_view(before, after)
            step = _step("headwater", rate, sent, got, st0, st1, payload, own, foreign)
            step.lag_over_5ms, step.lag_worst_bucket_s = over5, worst
            step.gc = _gc_view(before, after)
            out.append(step)
            log(line(step))
            fails = fails + 1 if step.loss >= STOP_LOSS else 0
            if fails >= stop_after:
                break
        info["event_loop_lag_max_s"] = pick(agent.metrics(), "headwater_event_loop_lag_max_seconds")
    finally:
        agent.close()
    return out, info


def _step(
    target: str,
    rate: float,
    sent: Any,
    got: float,
    st0: UdpStats | None,
    st1: UdpStats | None,
    payload: Payload,
    own: float,
    foreign: float,
) -> Step:
    """A step's figures: loss is the larger of the lines not accounted for and the kernel's drops on
    the receiver's socket (``st0``/``st1``: its UDP stats before and after, None when not found)."""
    drops = ((st1.drops if st1 else 0) - (st0.drops if st0 else 0)) * payload.mean_lines
    missing = sent.lines - got
    loss = max(missing, drops, 0.0) / sent.lines if sent.lines else 1.0
    return Step(
        target,
        rate,
        sent.elapsed,
        sent.lines,
        sent.lines_per_s,
        got,
        missing,
        drops,
        loss,
        loss < LOSS_LIMIT,
        own,
        foreign,
        sent.max_behind_ms,
    )


def ladder_peer(
    wd: Path, sender: Sender, payload: Payload, steps: list[float], step_s: float, stop_after: int
) -> list[Step]:
    peer = EtsyStatsd(wd, "ladder")
    out: list[Step] = []
    fails = 0
    try:
        for rate in steps:
            peer.begin()
            st0 = udp_stats(peer.port)
            sent, own, foreign = _send(sender, peer.port, peer.pid, payload, rate, step_s)
            wait_drained(peer.port)
            st1 = udp_stats(peer.port)
            got = peer.end().received
            step = _step(PEER, rate, sent, got, st0, st1, payload, own, foreign)
            out.append(step)
            log(line(step))
            fails = fails + 1 if step.loss >= STOP_LOSS else 0
            if fails >= stop_after:
                break
    finally:
        peer.close()
    return out


def line(s: Step) -> str:
    extra = ""
    if s.lag_over_5ms is not None:
        worst = "none" if s.lag_worst_bucket_s == 0 else f"≤{(s.lag_worst_bucket_s or 0) * 1000:g} ms"
        extra = f"  lag>5ms {s.lag_over_5ms:4.0f} (worst {worst})"
        for g in ("1", "2"):
            n, total_s, worst_s = (s.gc.get(g, []) + [0.0, 0.0, 0.0])[:3]
            extra += f"  gen{g} {n:.0f}×/{total_s * 1000:.1f} ms" + (f" (≤{worst_s * 1000:g})" if n else "")
    return (
        f"{s.target:12s} {s.asked_lines_per_s / 1e3:6.0f}k asked  {s.offered_lines_per_s / 1e3:6.0f}k sent  "
        f"loss {s.loss * 100:7.3f} %  {'pass' if s.passed else 'FAIL'}  cpu {s.receiver_cpu * 100:3.0f} %"
        f"  other {s.foreign_cpu * 100:3.0f} %{extra}"
    )


def best_pass(steps: list[Step]) -> float | None:
    return max((s.offered_lines_per_s for s in steps if s.passed), default=None)


def clean_rate(steps: list[Step]) -> float | None:
    best = None
    for s in steps:
        if not s.passed:
            break
        best = s.offered_lines_per_s
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", default=DEFAULT_STEPS, help="lines/s per step, comma-separated (k, m suffixes)"
    )
    ap.add_argument("--step-s", type=float, default=15.0, help="seconds per step (15)")
    ap.add_argument(
        "--stop-after", type=int, default=2, help="steps in a row at ≥ 1 %% loss that end a ladder"
    )
    ap.add_argument("--skip-peer", action="store_true", help="Headwater only")
    ap.add_argument("--skip-headwater", action="store_true", help="Etsy statsd only")
    ap.add_argument("--receive-buffer", type=int, help="bytes of SO_RCVBUF Headwater asks for (its default)")
    ap.add_argument(
        "--series",
        type=int,
        help="N distinct series, each sent once a cycle (default: the 1,000-series payload)",
    )
    ap.add_argument("--note", default="", help="recorded with the run (e.g. 'busy machine')")
    ap.add_argument("--out", type=Path, help="JSON path (bench/results/ladder-<UTC>.json)")
    args = ap.parse_args()
    steps = parse_steps(args.steps)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(SENDER_CORE)})
    payload = throughput_payload(20) if args.series is None else memory_payload(args.series, 20)
    results: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python3", *sys.argv]),
        "note": args.note,
        "machine": machine(),
        "loadavg_start": loadavg(),
        "sysctl": {k: sysctl(k) for k in ("net.core.rmem_max", "net.core.rmem_default")},
        "payload": {
            "name": payload.name,
            "lines_per_packet": payload.mean_lines,
            "bytes_per_packet": payload.mean_bytes,
        },
        "step_s": args.step_s,
        "loss_limit": LOSS_LIMIT,
    }
    with workdir() as wd:
        sender = Sender(wd)
        results["sender"] = sender.kind
        rows: list[Step] = []
        if not args.skip_headwater:
            hw, info = ladder_headwater(
                wd, sender, payload, steps, args.step_s, args.stop_after, args.receive_buffer
            )
            rows += hw
            results["headwater"] = {
                "clean_lines_per_s": clean_rate(hw),
                "best_pass_lines_per_s": best_pass(hw),
                **info,
            }
        if not args.skip_peer:
            version, why = ensure_peer()
            if version is None:
                results["peer"] = {"skipped": why}
            else:
                pr = ladder_peer(wd, sender, payload, steps, args.step_s, args.stop_after)
                rows += pr
                results["peer"] = {
                    "version": version,
                    "clean_lines_per_s": clean_rate(pr),
                    "best_pass_lines_per_s": best_pass(pr),
                }
        results["steps"] = [asdict(r) for r in rows]
    results["loadavg_end"] = loadavg()
    hw_clean = results.get("headwater", {}).get("clean_lines_per_s")
    peer_clean = results.get("peer", {}).get("clean_lines_per_s")
    if hw_clean and peer_clean:
        results["ratio"] = hw_clean / peer_clean
    out = args.out or RESULTS / f"ladder-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"StatsD ladder, {args.step_s:g}-s steps, 20-line packets, loss limit {LOSS_LIMIT * 100:g} %")
    print(
        f"rmem_max {results['sysctl']['net.core.rmem_max']}, "
        f"load {results['loadavg_start']} → {results['loadavg_end']}"
    )
    for r in rows:
        print(line(r))
    print(
        f"clean: headwater {fmt(hw_clean)}, {PEER} {fmt(peer_clean)}"
        + (f", ratio {results['ratio']:.1f}×" if "ratio" in results else "")
    )
    print(
        f"best passing step: headwater {fmt(results.get('headwater', {}).get('best_pass_lines_per_s'))}, "
        f"{PEER} {fmt(results.get('peer', {}).get('best_pass_lines_per_s'))}"
    )
    print(f"JSON: {out}")
    return 0


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e3:,.0f}k lines/s"


if __name__ == "__main__":
    sys.exit(main())
