"""Real peers for integration tests: a Prometheus server and the agent, each a subprocess on free
ports with its own temp directory, stopped at the end of the test (the independent OTLP sinks for the
synchronous tests are in ``otlp_sinks.py``).

Waiting on a peer uses :func:`wait_for_peer`: the shared bounded poll (``tests.conftest``) every 0.2 s
for up to 60 s, a peer that does not answer yet counting as "not yet". A test fails when the condition
never holds within that generous limit, never because something was slow.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from tests.conftest import LOOP_BLOCK_LIMIT_S, free_port, wait_until_sync

if TYPE_CHECKING:
    import aiohttp

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

PEER_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, http.client.HTTPException)
"""What asking a peer process raises while it is not answering (yet): refused or reset connections and
timeouts (OSError, urllib's URLError among them), a cut-off response (HTTPException) or body (ValueError
from the JSON or exposition parser)."""


@pytest.fixture
def loop_block_limit_s() -> float | None:
    """Every integration test fails if one event-loop callback runs longer than LOOP_BLOCK_LIMIT_S."""
    return LOOP_BLOCK_LIMIT_S


def wait_for_peer(check: Callable[[], T], what: str, *, timeout_s: float = 60.0, every_s: float = 0.2) -> T:
    """Poll ``check`` (which asks Prometheus, an agent or a sink) with :func:`tests.conftest.wait_until_sync`
    until it returns something truthy, and return that: every 0.2 s, so the polling does not compete
    with the peers for the CPU, and up to 60 s, since only a failing test waits that long; an error in
    :data:`PEER_ERRORS` counts as "not yet"."""
    return wait_until_sync(check, what, timeout_s, every_s=every_s, retry_on=PEER_ERRORS)


def free_tcp_udp_port() -> int:
    """A port on 127.0.0.1 free for both TCP and UDP (a StatsD receiver listening on both)."""
    for _ in range(50):
        port = free_port(socket.SOCK_STREAM)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free for both TCP and UDP")


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
            wait_for_peer(check, f"{expr} == {expected}", timeout_s=timeout_s)
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
        wait_for_peer(lambda: http_get(f"{server.url}/-/ready")[0] == 200, "prometheus ready")
    except BaseException:
        server.stop()
        raise
    return server


async def prom_query(session: aiohttp.ClientSession, server: PrometheusServer, expr: str) -> list[Any]:
    """The result vector of the instant query ``expr`` (PromQL) against ``server``."""
    async with session.get(f"{server.url}/api/v1/query", params={"query": expr}) as resp:
        data = await resp.json()
    assert resp.status == 200 and data["status"] == "success", data
    return list(data["data"]["result"])


async def prom_value(session: aiohttp.ClientSession, server: PrometheusServer, expr: str) -> float | None:
    """The first sample's value of the instant query ``expr``; None while the query has none."""
    result = await prom_query(session, server, expr)
    return float(result[0]["value"][1]) if result else None


def to_remote_write(
    server: PrometheusServer, receivers: dict[str, Any], processors: dict[str, Any]
) -> dict[str, Any]:
    """An agent config: one metrics pipeline from ``receivers`` through ``processors`` (in their order)
    to ``prometheus_remote_write`` into ``server``, retrying from 100 ms to 1 s."""
    return {
        "receivers": receivers,
        "processors": processors,
        "exporters": {
            "prometheus_remote_write": {
                "endpoint": server.write_url,
                "retry_on_failure": {"initial_interval": "100ms", "max_interval": "1s"},
            }
        },
        "service": {
            "pipelines": {
                "metrics": {
                    "receivers": list(receivers),
                    "processors": list(processors),
                    "exporters": ["prometheus_remote_write"],
                }
            }
        },
    }


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

    def self_metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of self-metric ``name`` on /metrics whose labels include ``labels`` (0 when
        absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = http_get(self.url("telemetry", "/metrics"))
        assert status == 200, body
        return sum(
            s.value
            for fam in text_string_to_metric_families(body)
            for s in fam.samples
            if s.name == name and labels.items() <= s.labels.items()
        )

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

        wait_for_peer(ready, "agent ready")
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
