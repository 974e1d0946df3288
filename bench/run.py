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

The table goes to stdout, progress to stderr, everything as JSON to bench/results/latest.json, and
each daemon's log to bench/results/logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from payloads import Payload, memory_payload, throughput_payload, throughput_series
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
PEER_DIR = BENCH / ".peer"
PEER_PACKAGE = "statsd@0.9.0"
PEER_STATS_JS = PEER_DIR / "node_modules" / "statsd" / "stats.js"

RECEIVER_CORE = "0"
SENDER_CORE = "1"
LOSS_LIMIT = 0.001
SENDER_SLACK = 0.97
"""A probe whose sender reached less than this share of the asked rate was limited by the sender."""

BUDGET_LINES_20 = 800_000
BUDGET_PEER_FACTOR = 3.0
BUDGET_LINES_1 = 250_000
BUDGET_STALL_S = 0.050
BUDGET_US_PER_LINE = 1.0
BUDGET_INSTRUCTIONS = 8_000
BUDGET_RSS_MB = 250.0
MEMORY_SERIES = 100_000

HEADWATER = "headwater"
PEER = "etsy statsd"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- modes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    name: str
    probe_s: float
    confirm_s: float
    max_probes: int
    retry_confirm: bool
    memory_flush_s: float
    parser_lines: int
    parser_repeat: int
    callgrind_lines: int


FULL = Mode("full", 10.0, 60.0, 5, True, 10.0, 200_000, 3, 40_000)
QUICK = Mode("quick", 3.0, 8.0, 3, True, 2.0, 50_000, 1, 10_000)


# -- small system helpers ------------------------------------------------------------------------
def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port found")


@dataclass
class UdpStats:
    rx_queue: int
    drops: int


def udp_stats(port: int) -> UdpStats | None:
    """rx_queue bytes and the kernel's drop count of the IPv4 UDP socket bound to 127.0.0.1:port."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/udp", encoding="ascii") as f:
        next(f)
        for line in f:
            cols = line.split()
            if len(cols) >= 13 and cols[1] == local:
                return UdpStats(int(cols[4].split(":")[1], 16), int(cols[12]))
    return None


def receive_buffer(port: int) -> int | None:
    """The receive buffer the kernel gave the socket on ``port`` (``ss -m``'s rb), in bytes."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-u", "-a", "-m", "-n", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"rb(\d+)", out)
    return int(match.group(1)) if match else None


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_jiffies(core: str) -> tuple[int, int]:
    """(busy, total) clock ticks of one CPU from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:9]]
                return sum(v) - v[3] - v[4], sum(v)
    return 0, 0


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


def wait_for(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- the sender -------------------------------------------------------------------------------------
@dataclass
class Sent:
    packets: int
    lines: int
    bytes: int
    errors: int
    elapsed: float
    max_behind_ms: float = 0.0
    """Longest the sender fell behind its schedule (then caught up in a burst)."""

    @property
    def packets_per_s(self) -> float:
        return self.packets / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.elapsed if self.elapsed > 0 else 0.0


class Sender:
    """The paced sender, pinned to the sender core: the C program if gcc builds it, else Python."""

    def __init__(self, workdir: Path) -> None:
        self.kind = "python (bench/udp_sender.py)"
        self.command: list[str] = [sys.executable, str(BENCH / "udp_sender.py")]
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc:
            binary = workdir / "udp_sender"
            build = subprocess.run(
                [gcc, "-O2", "-o", str(binary), str(BENCH / "udp_sender.c")],
                capture_output=True,
                text=True,
                check=False,
            )
            if build.returncode == 0:
                self.kind = "C (bench/udp_sender.c, sendmmsg)"
                self.command = [str(binary)]
            else:
                log(f"gcc could not build the sender, using Python:\n{build.stderr}")
        self.files: dict[str, Path] = {}
        self.workdir = workdir

    def payload_file(self, payload: Payload) -> Path:
        path = self.files.get(payload.name)
        if path is None:
            path = self.files[payload.name] = payload.write(self.workdir / f"payload-{len(self.files)}.bin")
        return path

    def send(self, port: int, payload: Payload, packets_per_s: float, duration: float) -> Sent:
        cmd = [
            "taskset",
            "-c",
            SENDER_CORE,
            *self.command,
            str(port),
            str(self.payload_file(payload)),
            f"{packets_per_s:.3f}",
            f"{duration:.3f}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=duration + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"sender failed ({proc.returncode}): {proc.stderr.strip()}")
        return Sent(**json.loads(proc.stdout))

    def ceiling(self, payload: Payload, duration: float) -> Sent:
        """As fast as it can into a socket nobody reads (the kernel drops what does not fit)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
            sink.bind(("127.0.0.1", 0))
            return self.send(int(sink.getsockname()[1]), payload, 0, duration)


# -- the two receivers --------------------------------------------------------------------------
@dataclass
class Counts:
    received: float = 0.0
    """Lines the receiver counted (Headwater: accepted + refused; statsd: metrics_received)."""
    refused: float = 0.0
    """Lines refused (Headwater) or bad lines (statsd)."""
    datagrams: float = 0.0
    self_reported_drops: float | None = None
    """The receiver's own account of kernel drops (Headwater's counter; statsd has none)."""
    lag_max_s: float | None = None


class Target(Protocol):
    name: str
    port: int
    pid: int

    def begin(self) -> Counts: ...

    def end(self) -> Counts: ...

    def fresh(self) -> None: ...

    def close(self) -> None: ...


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return [
        (s.name, dict(s.labels), float(s.value))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def pick(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float | None:
    values = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(values) if values else None


CHAIN_PROCESSORS = (
    "processors:\n"
    "  tenant: {static: team-a}\n"
    "  sample: {rate: 0.5}\n"
    "  percentiles: {windows: [1m, 5m, 1h]}\n"
    "  threshold:\n"
    "    rules:\n"
    "      - {name: slow, metric: '*', statistic: percentile, quantile: 0.99, window: 5m, op: '>',"
    " warning: 10}\n"
)
"""The four processors of issue 5, as ``--chain`` runs them."""


class Headwater:
    """``python -m agent run -c <config>`` from the repository root, pinned to the receiver core."""

    name = HEADWATER

    def __init__(
        self, workdir: Path, label: str, flush_interval_s: float = 10.0, *, chain: bool = False
    ) -> None:
        self.workdir = workdir
        self.label = label
        self.flush_interval_s = flush_interval_s
        self.chain = chain
        """Run the pipeline through tenant → sample → percentiles → threshold (issue 5's budget)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.prom_port = self.admin_port = 0
        self.pid = 0
        self.starts = 0
        self.log_path = LOGS / f"headwater-{label}.log"

    def start(self) -> None:
        self.close()
        self.port, self.prom_port, self.admin_port = free_port(), free_port(), free_port()
        config = self.workdir / f"headwater-{self.label}.yaml"
        config.write_text(
            "receivers:\n"
            "  statsd:\n"
            f"    udp: 127.0.0.1:{self.port}\n"
            f"    flush_interval: {self.flush_interval_s:g}s\n"
            + (CHAIN_PROCESSORS if self.chain else "")
            + "exporters:\n"
            "  prometheus:\n"
            f"    endpoint: 127.0.0.1:{self.prom_port}\n"
            "service:\n"
            "  telemetry:\n"
            f"    endpoint: 127.0.0.1:{self.admin_port}\n"
            "  pipelines:\n"
            "    metrics:\n"
            "      receivers: [statsd]\n"
            + ("      processors: [tenant, sample, percentiles, threshold]\n" if self.chain else "")
            + "      exporters: [prometheus]\n"
        )
        self.starts += 1
        with open(self.log_path, "ab") as logf:  # the child keeps its own copy of the descriptor
            logf.write(f"\n=== start {self.starts} ({time.strftime('%H:%M:%S')}) ===\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                ["taskset", "-c", RECEIVER_CORE, sys.executable, "-m", "agent", "run", "-c", str(config)],
                cwd=REPO,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.pid = self.proc.pid
        if not wait_for(self._ready, 60, 0.1):
            code = self.proc.poll()
            self.close()
            raise RuntimeError(
                f"Headwater did not become ready (exit code {code}); "
                f"log {self.log_path}:\n{tail(self.log_path)}"
            )

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"Headwater exited at start; log {self.log_path}:\n{tail(self.log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        return scrape(f"http://127.0.0.1:{self.admin_port}/metrics")

    def counts(self) -> Counts:
        s = self.metrics()
        accepted = pick(s, "headwater_receiver_accepted_points_total", receiver="statsd")
        if accepted is None:
            raise RuntimeError(
                "headwater_receiver_accepted_points_total{receiver=statsd} missing from /metrics"
            )
        refused = pick(s, "headwater_receiver_refused_points_total", receiver="statsd") or 0.0
        return Counts(
            received=accepted + refused,
            refused=refused,
            datagrams=pick(s, "headwater_receiver_datagrams_total", receiver="statsd") or 0.0,
            self_reported_drops=pick(s, "headwater_receiver_udp_kernel_drops_total", receiver="statsd"),
            lag_max_s=pick(s, "headwater_event_loop_lag_max_seconds"),
        )

    def begin(self) -> Counts:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self.counts()

    def end(self) -> Counts:
        last = self.counts()
        for _ in range(50):  # the last drain may still be counting: wait for two equal scrapes
            time.sleep(0.2)
            now = self.counts()
            if now.received == last.received:
                return now
            last = now
        return last

    def fresh(self) -> None:
        self.start()

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class EtsyStatsd:
    """Etsy statsd with bench/peer_config.js and the blackhole backend; a fresh process per probe."""

    name = PEER

    def __init__(self, workdir: Path, label: str, flush_interval_s: float = 10.0) -> None:
        self.workdir = workdir
        self.label = label
        self.flush_ms = int(flush_interval_s * 1000)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.mgmt_port = 0
        self.pid = 0
        self.out = workdir / f"peer-{label}.json"
        self.log_path = LOGS / f"statsd-{label}.log"

    def start(self) -> None:
        self.close()
        self.port, self.mgmt_port = free_port(), free_port()
        with contextlib.suppress(FileNotFoundError):
            self.out.unlink()
        env = dict(
            os.environ,
            HW_PEER_PORT=str(self.port),
            HW_PEER_MGMT_PORT=str(self.mgmt_port),
            HW_PEER_BACKEND=str(BENCH / "peer_blackhole_backend.js"),
            HW_PEER_OUT=str(self.out),
            HW_PEER_FLUSH_MS=str(self.flush_ms),
        )
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                ["taskset", "-c", RECEIVER_CORE, "node", str(PEER_STATS_JS), str(BENCH / "peer_config.js")],
                cwd=PEER_DIR,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.pid = self.proc.pid
        proc = self.proc
        if not wait_for(lambda: proc.poll() is not None or udp_stats(self.port) is not None, 30):
            raise RuntimeError(f"statsd did not bind its port; log {self.log_path}:\n{tail(self.log_path)}")
        if proc.poll() is not None:
            raise RuntimeError(f"statsd exited at start; log {self.log_path}:\n{tail(self.log_path)}")
        time.sleep(0.3)  # backends load right after the bind, in the same tick; leave it some slack

    def totals(self) -> dict[str, float]:
        try:
            data: dict[str, float] = json.loads(self.out.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def begin(self) -> Counts:
        self.start()
        return Counts()

    def end(self) -> Counts:
        self.close()  # SIGTERM: statsd's exit hook flushes once more, the backend writes the totals
        t = self.totals()
        if not t:
            raise RuntimeError(
                f"statsd wrote no totals to {self.out}; log {self.log_path}:\n{tail(self.log_path)}"
            )
        return Counts(
            received=t["metrics_received"], refused=t["bad_lines_seen"], datagrams=t["packets_received"]
        )

    def fresh(self) -> None:
        """Every probe starts a fresh process already."""

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


# -- probes and the search -----------------------------------------------------------------------
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


def wait_drained(port: int, timeout: float = 20.0) -> None:
    def empty() -> bool:
        st = udp_stats(port)
        return st is None or st.rx_queue == 0

    def settled() -> bool:
        if not empty():
            return False
        time.sleep(0.05)
        return empty()

    wait_for(settled, timeout)


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


# -- memory with 100k series -------------------------------------------------------------------------
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


# -- parser cost -------------------------------------------------------------------------------------
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


# -- the peer's installation ---------------------------------------------------------------------
def ensure_peer() -> tuple[str | None, str]:
    """(version, note): installs Etsy statsd into bench/.peer with npm when missing."""
    if shutil.which("node") is None:
        return None, "node is not installed"
    if not PEER_STATS_JS.exists():
        if shutil.which("npm") is None:
            return None, "npm is not installed"
        log(f"installing {PEER_PACKAGE} into {PEER_DIR} with npm")
        proc = subprocess.run(
            ["npm", "install", "--prefix", str(PEER_DIR), "--no-audit", "--no-fund", PEER_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not PEER_STATS_JS.exists():
            return None, f"npm install failed: {proc.stderr.strip()[-500:]}"
    version = json.loads((PEER_STATS_JS.parent / "package.json").read_text())["version"]
    return str(version), ""


# -- the table ---------------------------------------------------------------------------------------
def fmt_rate(s: Sustained | None) -> str:
    if s is None:
        return "-"
    if s.lines_per_s is None:
        return "no pass"
    return f"{s.lines_per_s:,.0f}" + (" (sender max)" if s.sender_limited else "")


def fmt_loss(s: Sustained | None) -> str:
    if s is None:
        return "-"
    p = s.confirmed or (s.confirmation_runs[-1] if s.confirmation_runs else None)
    if p is None:
        return "-"
    return f"{p.loss * 100:.3f} % ({p.kernel_drops:,} drops, {p.missing_lines:,.0f} missing)"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    tp: dict[str, dict[str, Sustained | None]] = results["throughput"]
    hw20, pe20 = tp[HEADWATER].get("20"), tp.get(PEER, {}).get("20")
    hw1, pe1 = tp[HEADWATER].get("1"), tp.get(PEER, {}).get("1")
    out: list[tuple[str, str, str, str, str]] = []

    def rate(s: Sustained | None) -> float:
        return (s.lines_per_s or 0.0) if s else 0.0

    ok20: bool | None = None
    if hw20:
        ok20 = rate(hw20) >= BUDGET_LINES_20
        if pe20 and pe20.lines_per_s:
            ok20 = ok20 and rate(hw20) >= BUDGET_PEER_FACTOR * rate(pe20)
    ratio = f" = {rate(hw20) / rate(pe20):.1f}× peer" if rate(hw20) and rate(pe20) else ""
    dur = results["confirm_s"]
    out.append(
        (
            f"UDP 20 lines/pkt: sustained lines/s ({dur:g} s, <0.1 % loss)",
            fmt_rate(hw20) + ratio,
            fmt_rate(pe20),
            f"≥ {BUDGET_LINES_20:,} and ≥ 3× peer",
            verdict(ok20),
        )
    )
    out.append(("  loss in that run", fmt_loss(hw20), fmt_loss(pe20), "< 0.1 %", ""))
    out.append(
        (
            "  best received lines/s, any loss",
            f"{hw20.best_received_lines_per_s:,.0f}" if hw20 else "-",
            f"{pe20.best_received_lines_per_s:,.0f}" if pe20 else "-",
            "",
            "",
        )
    )
    out.append(
        (
            f"UDP 1 line/pkt: sustained lines/s ({dur:g} s)",
            fmt_rate(hw1),
            fmt_rate(pe1),
            f"≥ {BUDGET_LINES_1:,}",
            verdict(rate(hw1) >= BUDGET_LINES_1 if hw1 else None),
        )
    )
    out.append(("  loss in that run", fmt_loss(hw1), fmt_loss(pe1), "< 0.1 %", ""))
    out.append(
        (
            "  best received lines/s, any loss",
            f"{hw1.best_received_lines_per_s:,.0f}" if hw1 else "-",
            f"{pe1.best_received_lines_per_s:,.0f}" if pe1 else "-",
            "",
            "",
        )
    )
    lags = [p.lag_max_s for s in (hw20, hw1) if s for p in s.confirmation_runs if p.lag_max_s is not None]
    search_lags = [p.lag_max_s for s in (hw20, hw1) if s for p in s.search if p.lag_max_s is not None]
    out.append(
        (
            "Longest event-loop stall (confirmation runs)",
            f"{max(lags) * 1000:.1f} ms" if lags else "-",
            "n/a",
            f"≤ {BUDGET_STALL_S * 1000:g} ms",
            verdict(max(lags) <= BUDGET_STALL_S if lags else None),
        )
    )
    out.append(
        (
            "  during the search probes (incl. overload)",
            f"{max(search_lags) * 1000:.1f} ms" if search_lags else "-",
            "n/a",
            "",
            "",
        )
    )
    pc: ParserCost | None = results.get("parser")
    if pc is not None:
        for shape, us in pc.parser_cost_rows.items():
            out.append(
                (
                    f"Parser µs/line, parser_cost.py {shape}",
                    f"{us:.3f}",
                    "",
                    f"≤ {BUDGET_US_PER_LINE:g}",
                    verdict(us <= BUDGET_US_PER_LINE),
                )
            )
        if pc.parser_cost_note:
            out.append(("Parser µs/line, parser_cost.py", pc.parser_cost_note, "", "", ""))
        if pc.feed_us_per_line is not None:
            out.append(
                (
                    "Parser µs/line, this benchmark's packets",
                    f"{pc.feed_us_per_line:.3f}",
                    "",
                    f"≤ {BUDGET_US_PER_LINE:g}",
                    verdict(pc.feed_us_per_line <= BUDGET_US_PER_LINE),
                )
            )
        ipl = pc.instructions_per_line
        out.append(
            (
                "Parser instructions/line (callgrind)",
                f"{ipl:,.0f}" if ipl is not None else pc.callgrind_note,
                "",
                f"≤ {BUDGET_INSTRUCTIONS:,}",
                verdict(ipl <= BUDGET_INSTRUCTIONS if ipl is not None else None),
            )
        )
    mem: dict[str, Memory] = results.get("memory", {})
    hm, pm = mem.get(HEADWATER), mem.get(PEER)

    def mb(v: float | None) -> str:
        return f"{v:,.1f} MB" if v is not None else "-"

    out.append(
        (
            f"RSS, {MEMORY_SERIES:,} series after a flush",
            mb(hm.rss_after_flush_mb if hm else None),
            mb(pm.rss_after_flush_mb if pm else None),
            f"≤ {BUDGET_RSS_MB:g} MB",
            verdict(hm.rss_after_flush_mb <= BUDGET_RSS_MB if hm and hm.rss_after_flush_mb else None),
        )
    )
    out.append(("  peak RSS (VmHWM)", mb(hm.hwm_mb if hm else None), mb(pm.hwm_mb if pm else None), "", ""))
    out.append(
        ("  RSS after one scrape of the exporter", mb(hm.rss_after_scrape_mb if hm else None), "n/a", "", "")
    )
    out.append(
        (
            "  idle RSS at start",
            mb(hm.idle_rss_mb if hm else None),
            mb(pm.idle_rss_mb if pm else None),
            "",
            "",
        )
    )
    out.append(
        (
            "  longest stall, 100k-series run",
            f"{hm.flush_lag_max_s * 1000:.1f} ms" if hm and hm.flush_lag_max_s is not None else "-",
            "n/a",
            "",
            "",
        )
    )
    return out


def render(results: dict[str, Any]) -> str:
    table = rows(results)
    head = ("figure", HEADWATER, f"{PEER} {results.get('peer_version') or ''}".strip(), "budget", "verdict")
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(5)]
    lines = [
        f"Headwater benchmark ({results['mode']} mode, {results['started']}): {results['machine']}",
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.append("")
    lines += [f"- {n}" for n in results["notes"]]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return obj


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="headwater-bench-") as d:
        yield Path(d)


def machine() -> str:
    node = (
        subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout.strip()
        if shutil.which("node")
        else "no node"
    )
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, node {node}, "
        f"{platform.system()} {platform.release()}"
    )


def sysctl(name: str) -> str:
    try:
        return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
    except OSError:
        return "?"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(to_jsonable(results), indent=2) + "\n")
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
        verdict = "PASS" if ratio >= 0.8 else "FAIL"
        print(f"  with the chain / without: {ratio * 100:.1f} % (budget: within 20 %) {verdict}")
    return 0


def otlp_rows(quick: bool) -> list[tuple[str, str, str]]:
    """OTLP/HTTP ingest (bench/otlp_ingest.py) and OTLP export encoding (bench/otlp_encode.py)."""
    import otlp_encode
    import otlp_ingest

    log("otlp: ingest through the receiver (server on core 0, client on core 1)")
    rows = otlp_ingest.run(quick)
    log("otlp: export encoding")
    return rows + otlp_encode.run(quick)


def render_otlp(rows: list[tuple[str, str, str]]) -> str:
    head = ("OTLP figure", "headwater", "budget")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def add_notes(
    results: dict[str, Any], payloads: dict[str, Payload], ceilings: dict[str, Sent], peer_version: str | None
) -> None:
    notes: list[str] = results["notes"]
    p20 = payloads["20"]
    notes.append(
        f"payloads: {throughput_series():,} DogStatsD series (45 % counters, 20 % timers @0.5, 20 % gauges, "
        f"15 % histograms); {p20.mean_lines:g} lines = {p20.mean_bytes:,.0f} B per packet, and 1 line = "
        f"{payloads['1'].mean_bytes:.0f} B per packet"
    )
    notes.append(
        f"sender: {results['sender']} on core {SENDER_CORE}, receivers on core {RECEIVER_CORE}; its ceiling "
        f"into an unread socket: {ceilings['20'].packets_per_s:,.0f} datagrams/s with 20-line packets, "
        f"{ceilings['1'].packets_per_s:,.0f} with 1-line packets (the kernel's loopback work runs on the "
        f"sender's core, so it offers less when the receiver reads)"
    )
    rb: dict[str, int] = {}
    for name, by_payload in results["throughput"].items():
        for s in by_payload.values():
            if s is None:
                continue
            for p in s.search + s.confirmation_runs:
                if p.receive_buffer:
                    rb[name] = p.receive_buffer
            if s.note:
                notes.append(f"{name}, {s.payload}: {s.note}")
            for p in s.search + s.confirmation_runs:
                if p.refused_lines:
                    notes.append(
                        f"{name}, {s.payload}: {p.refused_lines:,.0f} lines refused/bad at "
                        f"{p.asked_lines_per_s:,.0f} lines/s (the payload is valid DogStatsD)"
                    )
                    break
            for p in s.search + s.confirmation_runs:
                if p.self_reported_drops is not None and p.self_reported_drops != p.kernel_drops:
                    notes.append(
                        f"{name}, {s.payload}: headwater_receiver_udp_kernel_drops_total rose by "
                        f"{p.self_reported_drops:,.0f} but /proc/net/udp by {p.kernel_drops:,}"
                    )
                    break
    foreign = [
        p.foreign_cpu
        for by_payload in results["throughput"].values()
        for s in by_payload.values()
        if s is not None
        for p in s.search + s.confirmation_runs
    ]
    if foreign and (max(foreign) > 0.20 or sum(foreign) / len(foreign) > 0.05):
        notes.append(
            f"other processes took up to {max(foreign) * 100:.0f} % of the receivers' core during the probes "
            f"(mean {sum(foreign) / len(foreign) * 100:.0f} %): the receivers' figures are pessimistic;"
            " rerun on an idle machine for clean numbers (per-probe values in latest.json, foreign_cpu)"
        )
    behind = [
        (p.sender_max_behind_ms, p.target, p.payload, p.asked_lines_per_s)
        for by_payload in results["throughput"].values()
        for s in by_payload.values()
        if s is not None
        for p in s.confirmation_runs
        if p.sender_max_behind_ms >= 10
    ]
    for ms, target, payload_name, rate in behind:
        notes.append(
            f"{target}, {payload_name}: the sender fell {ms:.0f} ms behind schedule at {rate:,.0f} lines/s "
            "and caught up in a burst (its core was busy): that confirmation run was burstier than asked"
        )
    sys_ = results["sysctl"]
    buffers = ", ".join(f"{n} {v / 2**20:.2f} MiB" for n, v in rb.items())
    notes.append(
        "receive buffers as the kernel reports them (ss -m rb, twice the size asked): "
        f"{buffers or 'unknown'}; "
        f"kernel defaults untouched: net.core.rmem_max={sys_['net.core.rmem_max']}, "
        f"rmem_default={sys_['net.core.rmem_default']}. Headwater asks 32 MiB (capped at rmem_max); "
        "Etsy statsd 0.9 has no receive-buffer option and gets rmem_default. Advice only: "
        "`sysctl -w net.core.rmem_max=33554432` would let Headwater's 32 MiB ask apply "
        "and absorb longer stalls"
    )
    if peer_version:
        notes.append(
            f"peer: Etsy statsd {peer_version} (npm), stock UDP server, flushInterval 10000, "
            "blackhole backend bench/peer_blackhole_backend.js; a fresh process per probe"
        )
    notes.append(
        f"load average (1/5/15 min) at start {results['loadavg_start']}, at end {results['loadavg_end']}: "
        "anything else running on this 2-core machine shows in these figures (±40 % swings are usual)"
    )
    mem = results.get("memory", {})
    for m in mem.values():
        if m.lines_received < m.lines_sent:
            notes.append(f"{m.target} memory run: received {m.lines_received:,.0f} of {m.lines_sent:,} lines")
        if m.note:
            notes.append(f"{m.target} memory run: {m.note}")


if __name__ == "__main__":
    raise SystemExit(main())
