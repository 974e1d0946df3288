"""The benchmark's machinery: paths and cores, process helpers, the paced UDP sender and the two
receivers it measures (Headwater and Etsy statsd), each as a :class:`Target` the probes drive.

Used by ``bench/run.py`` (the entry point) and ``bench/probes.py`` (the measurements).
"""

from __future__ import annotations

import contextlib
import json
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
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from payloads import Payload
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

HEADWATER = "headwater"
PEER = "etsy statsd"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- modes -----------------------------------------------------------------------------------------
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


# -- small system helpers --------------------------------------------------------------------------
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


# -- the sender ------------------------------------------------------------------------------------
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


# -- the two receivers -----------------------------------------------------------------------------
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


# -- the peer's installation -----------------------------------------------------------------------
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


# -- the run ---------------------------------------------------------------------------------------
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
