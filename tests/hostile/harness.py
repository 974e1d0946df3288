"""Run one hostile-input case against a real agent subprocess and measure what it did to the agent.

For each case a fresh agent is started (``python3 -m agent run`` with its working directory and
``PYTHONPATH`` set to ``agent_src``, so the same harness measures any checkout) under an address-space
limit and, where the case asks, a lower ``nofile``. While the case runs:

- a separate probe *process* (not a thread: the load generators in this process hold the GIL and
  would make the probe's own latency look like the agent's) GETs ``/healthz`` every 50 ms on a new
  connection, the way the kubelet does, and samples the agent's resident memory;
- a legitimate client (the ``statsd`` PyPI client over TCP, or the OpenTelemetry SDK over OTLP/HTTP)
  counts every 100 ms on a series of its own.

Afterwards the harness reads the peak RSS (``VmHWM``), waits (bounded) for every legitimate increment
to reach the pull endpoint, and gathers the case's own problems (the input was not refused with its
reason, a reload did not finish, ...). :class:`Result` holds it all; the CI test asserts on it and the
benchmark prints it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import free_tcp_udp_port, http_get

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

MEMORY_LIMIT_MIB = 400
"""``memory_limiter.limit`` of every case's agent: the issue's 400 MiB, and the RSS bound asserted."""
ADDRESS_SPACE_LIMIT_MIB = 3072
"""RLIMIT_AS of the agent (CI): an agent that blows through its memory budget dies instead of taking
the machine; grpc's and numpy's threads reserve ~1 GiB of address space they never touch."""
PROBE_INTERVAL_S = 0.05
HEALTH_GOAL_MS = 100.0
"""The issue's goal for the longest /healthz answer (reported by the benchmark; CI asserts no failure)."""
LEGIT_NAME = "hostile.legit"
LEGIT_PERIOD_S = 0.1


def sizes(scale: str, ci: Any, bench: Any) -> Any:
    """The CI or the benchmark size of an input (the benchmark uses the issue's full sizes)."""
    return bench if scale == "bench" else ci


class Run:
    """One case's agent and everything a case needs to talk to it."""

    def __init__(self, agent_src: Path, scale: str, workdir: Path) -> None:
        self.agent_src = agent_src
        self.scale = scale
        self.workdir = workdir
        # Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer.
        self.sockdir = Path(tempfile.mkdtemp(prefix="hw-hostile-"))
        self.ports = {
            name: free_tcp_udp_port() for name in ("statsd", "http", "grpc", "otlp_http", "pull", "telemetry")
        }
        self.config_path = workdir / "agent.yaml"
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config: dict[str, Any] = {}
        """The config the agent was started with (a case copies it to build a reload)."""
        self.peers: dict[str, Any] = {}
        """Fake backends and the like a case's configure made for its drive."""
        self.facts: dict[str, Any] = {}
        """What a case measured besides the standard columns (shown by the benchmark)."""
        self.nofile: int | None = None
        self.address_space_mib: int | None = ADDRESS_SPACE_LIMIT_MIB
        self._stoppers: list[Callable[[], None]] = []

    # -- config -------------------------------------------------------------------------------------

    def base_config(self) -> dict[str, Any]:
        """StatsD (UDP, TCP, Unix datagram), JSON over HTTP and OTLP in; memory_limiter; the pull
        endpoint out. Only settings that exist at the issue's baseline, so old checkouts run it too."""
        p = self.ports
        return {
            "receivers": {
                "statsd": {
                    "udp": f"127.0.0.1:{p['statsd']}",
                    "tcp": f"127.0.0.1:{p['statsd']}",
                    "unixgram": str(self.sockdir / "statsd.sock"),
                    "flush_interval": "1s",
                },
                "http": {"endpoint": f"127.0.0.1:{p['http']}"},
                "otlp": {"grpc": f"127.0.0.1:{p['grpc']}", "http": f"127.0.0.1:{p['otlp_http']}"},
            },
            "processors": {"memory_limiter": {"limit": f"{MEMORY_LIMIT_MIB}MiB", "check_interval": "200ms"}},
            "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{p['pull']}"}},
            "service": {
                "shutdown_timeout": "10s",
                "telemetry": {"endpoint": f"127.0.0.1:{p['telemetry']}", "log_level": "info"},
                "pipelines": {
                    "metrics": {
                        "receivers": ["statsd", "http", "otlp"],
                        "processors": ["memory_limiter"],
                        "exporters": ["prometheus"],
                    }
                },
            },
        }

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)

    # -- the agent ----------------------------------------------------------------------------------

    def start_agent(self) -> None:
        nofile, address_space = self.nofile, self.address_space_mib

        def limits() -> None:  # runs in the child between fork and exec
            if address_space is not None:
                size = address_space * 2**20
                resource.setrlimit(resource.RLIMIT_AS, (size, size))
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.agent_src)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(self.config_path)],
                cwd=self.agent_src,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                preexec_fn=limits,
            )
        wait_until("agent ready", self._ready, timeout_s=60)

    def start_agent_on_free_ports(self, attempts: int = 3) -> None:
        """:meth:`start_agent`; when another process took one of the agent's ports between
        :func:`free_tcp_udp_port` and the agent's bind (the agent exits: address already in use),
        pick new ports, rewrite them in the config and start again — a race of the harness, not a
        finding about the agent."""
        for attempt in range(attempts):
            try:
                self.start_agent()
                return
            except CaseError:
                if attempt == attempts - 1 or "Address already in use" not in self.log_tail():
                    raise
            text = self.config_path.read_text()
            for name, old in list(self.ports.items()):
                self.ports[name] = new = free_tcp_udp_port()
                text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
            self.config = yaml.safe_load(text)
            self.write_config(text)

    def _ready(self) -> bool:
        if not self.alive():
            raise CaseError(f"agent exited with {self.returncode()} at start:\n{self.log_tail()}")
        return http_get(self.url("telemetry", "/readyz"), timeout_s=2)[0] == 200

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def peak_rss_mib(self) -> float | None:
        """``VmHWM``: the agent's peak resident memory since it started (None once it has exited)."""
        kib = proc_status_kib(self.pid, "VmHWM")
        return None if kib is None else kib / 1024

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def wait_log(self, pattern: str, *, after: int = 0, timeout_s: float = 60) -> re.Match[str]:
        """Wait (bounded) until the log, from offset ``after``, matches ``pattern``."""
        rx = re.compile(pattern)

        def check() -> re.Match[str] | None:
            m = rx.search(self.log_text(), after)
            if m is None and not self.alive():
                raise CaseError(f"agent exited with {self.returncode()} before logging {pattern!r}")
            return m

        return wait_until(f"log line {pattern!r}", check, timeout_s=timeout_s)

    def url(self, port: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    # -- what the agent reports ---------------------------------------------------------------------

    def self_metrics(self) -> list[tuple[str, dict[str, str], float]]:
        status, body = http_get(self.url("telemetry", "/metrics"), timeout_s=10)
        if status != 200:
            raise CaseError(f"the agent's /metrics answered {status}")
        return [
            (s.name, s.labels, s.value) for fam in text_string_to_metric_families(body) for s in fam.samples
        ]

    def refusals(self, reason: str, receivers: tuple[str, ...] = ()) -> float:
        """Everything counted as refused, dropped or closed with a reason matching ``reason`` (a regex):
        points, requests, connections, calls — whichever unit the component counts in; only those of
        ``receivers`` when given."""
        rx = re.compile(reason)
        return sum(
            value
            for name, labels, value in self.self_metrics()
            if name.endswith("_total")
            and re.search(r"refused|dropped|closed|rejected|cancel|truncat", name)
            and any(rx.fullmatch(v) for k, v in labels.items() if k in ("reason", "code", "status"))
            and (not receivers or labels.get("receiver") in receivers)
        )

    def pull_page(self, timeout_s: float = 120) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["pull"], timeout=timeout_s)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise CaseError(f"the pull endpoint answered {resp.status}")
            return body
        finally:
            conn.close()

    def pull_value(self, name: str, page: bytes | None = None) -> float | None:
        """The sum of the series of ``name`` on the pull page, None when there is none (a line scan:
        pages under a series flood are too big to parse whole)."""
        page = self.pull_page() if page is None else page
        found = re.findall(rb"^" + re.escape(name.encode()) + rb"(?:\{[^\n]*\})? (\S+)$", page, re.M)
        return sum(float(v) for v in found) if found else None

    # -- the case's background helpers --------------------------------------------------------------

    def on_stop(self, stop: Callable[[], None]) -> None:
        """Run ``stop`` when the case ends (closes a fake backend, a socket pool...)."""
        self._stoppers.append(stop)

    def close(self) -> None:
        for stop in reversed(self._stoppers):
            with contextlib.suppress(Exception):
                stop()
        self._stoppers.clear()
        self.kill()
        shutil.rmtree(self.sockdir, ignore_errors=True)


class CaseError(Exception):
    """The case could not run as planned (the agent died, a peer did not come up)."""


def wait_until(what: str, check: Callable[[], T | None], *, timeout_s: float, every_s: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; raise :class:`CaseError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except CaseError:
            raise
        except Exception as exc:  # the peer may not be up yet
            last = exc
        if time.monotonic() >= deadline:
            raise CaseError(
                f"timed out after {timeout_s:g}s waiting for {what}" + (f" ({last!r})" if last else "")
            )
        time.sleep(every_s)


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# -- the /healthz probe (its own process) -------------------------------------------------------------


@dataclass
class Health:
    answers: int = 0
    failures: int = 0
    max_ms: float = 0.0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    max_rss_mib: float = 0.0


class HealthProbe:
    """``python -m tests.hostile.harness probe``: one line per probe, read back at :meth:`stop`."""

    def __init__(self, run: Run, timeout_s: float) -> None:
        self._out = run.workdir / "probe.txt"
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.hostile.harness",
                "probe",
                str(run.ports["telemetry"]),
                str(run.pid),
                str(PROBE_INTERVAL_S),
                str(timeout_s),
                str(self._out),
            ],
            cwd=ROOT,
        )
        wait_until(
            "the first /healthz probe",
            lambda: self._out.exists() and self._out.stat().st_size > 0,
            timeout_s=30,
        )

    def stop(self) -> Health:
        self._proc.terminate()
        self._proc.wait()
        health = Health()
        for line in self._out.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue  # the line being written when the probe was stopped
            ms, outcome, rss_kib = float(parts[0]), parts[1], int(parts[2])
            health.max_rss_mib = max(health.max_rss_mib, rss_kib / 1024)
            health.max_ms = max(health.max_ms, ms)
            if outcome == "200":
                health.answers += 1
            else:
                health.failures += 1
                health.failure_kinds[outcome] = health.failure_kinds.get(outcome, 0) + 1
        return health


def probe_main(port: int, pid: int, interval_s: float, timeout_s: float, out: Path) -> None:
    """GET /healthz every ``interval_s`` on a new connection; write ``latency_ms outcome rss_kib``."""
    with open(out, "w", buffering=1) as f:
        while True:
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                resp.read()
                outcome = str(resp.status)
            except TimeoutError:
                outcome = "timeout"
            except OSError as exc:
                outcome = type(exc).__name__
            except http.client.HTTPException as exc:
                outcome = type(exc).__name__
            finally:
                conn.close()
            elapsed = time.monotonic() - started
            if proc_status_kib(pid, "VmRSS") is None:
                return  # the agent is gone: nothing left to probe
            f.write(f"{elapsed * 1000:.1f} {outcome} {proc_status_kib(pid, 'VmRSS') or 0}\n")
            time.sleep(max(0.0, interval_s - elapsed))


# -- legitimate traffic -----------------------------------------------------------------------------


class LegitTraffic:
    """A well-behaved app counting every 100 ms while the case runs (bounded by the case's length)."""

    def __init__(self, run: Run, kind: str) -> None:
        self._run = run
        self.kind = kind
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="legit", daemon=True)
        self._thread.start()

    @property
    def series(self) -> str:
        return "hostile_legit_total" if self.kind == "statsd" else "hostile_legit_otlp_total"

    def _loop(self) -> None:
        try:
            if self.kind == "statsd":
                self._statsd()
            else:
                self._otlp()
        except Exception as exc:  # reported as the legit column, not raised in a thread
            self.errors.append(repr(exc))

    def _statsd(self) -> None:
        import statsd  # type: ignore[import-untyped]  # the client ships no type information

        client: Any = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = statsd.TCPStatsClient("127.0.0.1", self._run.ports["statsd"], timeout=2)
                    client.connect()
                client.incr(LEGIT_NAME)
                self.sent += 1
            except OSError as exc:
                # The app would retry on a new connection; what it could not send is not counted.
                self.errors.append(f"statsd: {exc!r}")
                client = None
            self._stop.wait(LEGIT_PERIOD_S)
        if client is not None:
            client.close()

    def _otlp(self) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        exporter = OTLPMetricExporter(endpoint=self._run.url("otlp_http", "/v1/metrics"), timeout=5)
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
        provider = MeterProvider(metric_readers=[reader])
        counter = provider.get_meter("hostile").create_counter(LEGIT_NAME + ".otlp")
        while not self._stop.is_set():
            counter.add(1)
            self.sent += 1
            if not provider.force_flush(10_000):
                self.errors.append("otlp: force_flush failed")
            self._stop.wait(LEGIT_PERIOD_S)
        provider.shutdown()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def arrived(self, timeout_s: float) -> tuple[bool, str]:
        """Wait (bounded) until the pull endpoint shows every increment sent."""
        if self.sent == 0:
            return False, f"nothing sent ({'; '.join(self.errors[:3])})"
        last: list[float | None] = [None]

        def check() -> bool:
            last[0] = self._run.pull_value(self.series)
            return last[0] is not None and last[0] >= self.sent

        try:
            wait_until(f"{self.series} == {self.sent}", check, timeout_s=timeout_s, every_s=0.5)
        except CaseError:
            errors = f"; client errors: {'; '.join(self.errors[:3])}" if self.errors else ""
            return False, f"{last[0]} of {self.sent} arrived{errors}"
        return True, f"{self.sent}/{self.sent}"


# -- one case, start to end ---------------------------------------------------------------------------


@dataclass
class Result:
    case: str
    alive: bool
    exit_detail: str
    rss_peak_mib: float | None
    health: Health
    problems: list[str]
    legit_ok: bool | None
    legit_detail: str
    duration_s: float
    facts: dict[str, Any]

    def summary(self) -> str:
        rss = "?" if self.rss_peak_mib is None else f"{self.rss_peak_mib:.0f} MiB"
        return (
            f"{self.case}: alive={self.alive} {self.exit_detail} rss_peak={rss} "
            f"healthz_max={self.health.max_ms:.0f}ms failures={self.health.failures} "
            f"{self.health.failure_kinds or ''} legit={self.legit_detail} problems={self.problems} "
            f"facts={ {k: v for k, v in self.facts.items() if k != 'log_tail'} } ({self.duration_s:.1f}s)"
        )


def run_case(case: Any, agent_src: Path, scale: str, workdir: Path, probe_timeout_s: float = 2.0) -> Result:
    """Start an agent configured for ``case``, run the case with the probe and legitimate traffic
    around it, and measure (see the module docstring). Never raises for what the agent did: a dead
    agent or a refused expectation is part of the result."""
    workdir.mkdir(parents=True, exist_ok=True)
    run = Run(agent_src, scale, workdir)
    started = time.monotonic()
    problems: list[str] = []
    health = Health()
    legit: LegitTraffic | None = None
    legit_ok: bool | None = None
    legit_detail = "n/a"
    rss_peak: float | None = None
    try:
        run.config = run.base_config()
        case.configure(run, run.config)
        run.write_config(run.config)
        run.start_agent_on_free_ports()
        probe = HealthProbe(run, probe_timeout_s)
        try:
            if case.legit != "none":
                legit = LegitTraffic(run, case.legit)
            try:
                problems.extend(case.drive(run))
            except CaseError as exc:
                problems.append(str(exc))
            except Exception as exc:  # a peer or client failing in a way the case did not plan for
                problems.append(f"the case failed: {exc!r}")
                run.facts["traceback"] = traceback.format_exc(limit=-3)
            finally:
                if legit is not None:
                    legit.stop()
            rss_peak = run.peak_rss_mib()
        finally:
            health = probe.stop()
        if rss_peak is None:
            rss_peak = health.max_rss_mib or None  # the agent exited: the probe's samples are all we have
        if legit is not None and run.alive():
            legit_ok, legit_detail = legit.arrived(timeout_s=sizes(scale, 30, 90))
        elif legit is not None:
            legit_ok, legit_detail = False, "agent gone"
        alive = run.alive() if case.expect_alive else True
        code = run.returncode()
        exit_detail = "" if code is None else f"exit={code}"
    except CaseError as exc:
        problems.append(str(exc))
        alive = run.alive()
        code = run.returncode()
        exit_detail = "" if code is None else f"exit={code}"
    finally:
        if problems or (case.expect_alive and not run.alive()):
            run.facts["log_tail"] = run.log_tail(1500)
        run.close()
    return Result(
        case=case.name,
        alive=alive,
        exit_detail=exit_detail,
        rss_peak_mib=rss_peak,
        health=health,
        problems=problems,
        legit_ok=legit_ok,
        legit_detail=legit_detail,
        duration_s=time.monotonic() - started,
        facts=run.facts,
    )


@contextlib.contextmanager
def background(target: Callable[[threading.Event], None], name: str) -> Iterator[threading.Event]:
    """Run ``target(stop)`` in a thread for the duration of the block; set ``stop`` and join at the end."""
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(60)


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    probe_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), Path(sys.argv[6]))
