"""Real peers for integration tests: a Prometheus server and the agent, each a subprocess on free
ports with its own temp directory, stopped at the end of the test.

Waiting uses bounded polling (``wait_for``): a test fails when the condition never holds within a
generous limit, never because something was slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (StatsD listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free port")


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float = 60.0, every_s: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as exc:  # the peer may not be up yet
            last_exc = exc
        time.sleep(every_s)
    raise AssertionError(
        f"timed out waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else "")
    )


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class PrometheusServer:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        data = json.loads(body)
        assert status == 200 and data["status"] == "success", body
        return list(data["data"]["result"])

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def wait_value(self, expr: str, expected: float, timeout_s: float = 60.0) -> float:
        def check() -> bool:
            v = self.value(expr)
            return v is not None and abs(v - expected) <= 1e-9 * max(1.0, abs(expected))

        try:
            wait_for(f"{expr} == {expected}", check, timeout_s)
        except AssertionError:
            raise AssertionError(f"{expr}: expected {expected}, Prometheus has {self.query(expr)}") from None
        return expected


def launch_prometheus(data: Path, port: int) -> PrometheusServer:
    """Start Prometheus 2.42 on ``port``, its TSDB in ``data`` (kept across restarts); wait until ready."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not installed: run ./scripts/install-test-deps (make install)")
    data.mkdir(exist_ok=True)
    (data / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    log_path = data / "prometheus.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={data / 'prometheus.yml'}",
                f"--storage.tsdb.path={data / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-remote-write-receiver",
                "--enable-feature=native-histograms",
                "--query.lookback-delta=10m",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = PrometheusServer(port, proc, log_path)
    try:
        wait_for("prometheus ready", lambda: http_get(f"{server.url}/-/ready")[0] == 200)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusServer]:
    server = launch_prometheus(tmp_path / "prometheus", free_port())
    try:
        yield server
    finally:
        server.stop()


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    config_path: Path
    ports: dict[str, int]
    log_path: Path
    stdout_path: Path
    exit_code: int | None = field(default=None)

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def self_metric(self, name: str) -> float:
        """Sum of a self-metric's samples on /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, body = http_get(self.url("telemetry", "/metrics"))
        total = 0.0
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                if s.name == name:
                    total += s.value
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.exit_code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"agent did not exit within {timeout_s}s of signal {sig}:\n{self.logs()}"
            ) from None
        return self.exit_code

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(config: str, ports: dict[str, int], *, extra_args: tuple[str, ...] = ()) -> AgentProcess:
        config_path = tmp_path / f"agent-{len(started)}.yaml"
        config_path.write_text(textwrap.dedent(config))
        log_path = tmp_path / f"agent-{len(started)}.log"
        stdout_path = tmp_path / f"agent-{len(started)}.out"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as err, open(stdout_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(config_path), *extra_args],
                cwd=ROOT,
                stdout=out,
                stderr=err,
                env=env,
            )
        agent = AgentProcess(proc, config_path, ports, log_path, stdout_path)
        started.append(agent)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited with {proc.returncode}:\n{agent.logs()}")
            return http_get(agent.url("telemetry", "/readyz"))[0] == 200

        wait_for("agent ready", ready)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
