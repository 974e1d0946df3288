"""The image runs the agent as PID 1 (exec-form entrypoint, no init). PID 1 gets no default signal
actions from the kernel, so the agent must handle SIGTERM itself: stop, flush, exit 0.

Without a container engine, a new PID namespace (`unshare --pid --fork`, as root) makes the agent PID 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, free_tcp_udp_port, http_get, wait_for_peer

pytestmark = pytest.mark.integration


def _can_unshare() -> bool:
    exe = shutil.which("unshare")
    if exe is None:
        return False
    done = subprocess.run([exe, "--pid", "--fork", "true"], capture_output=True, timeout=10)
    return done.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare --pid (root or user namespaces)")
def test_agent_as_pid_1_drains_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    statsd, telemetry = free_tcp_udp_port(), free_tcp_udp_port()
    out = tmp_path / "points.jsonl"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""receivers:
  statsd: {{udp: 127.0.0.1:{statsd}, flush_interval: 1h}}
exporters:
  debug: {{path: {out}}}
service:
  telemetry: {{endpoint: 127.0.0.1:{telemetry}}}
  pipelines:
    metrics: {{receivers: [statsd], exporters: [debug]}}
"""
    )
    log = tmp_path / "agent.log"
    with open(log, "wb") as err:
        outer = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                sys.executable,
                "-m",
                "agent",
                "run",
                "-c",
                str(config),
            ],
            cwd=ROOT,
            stdout=err,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_for_peer(lambda: http_get(f"http://127.0.0.1:{telemetry}/readyz")[0] == 200, "agent ready")
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
        (agent_pid,) = children
        ns_pids = next(
            line
            for line in Path(f"/proc/{agent_pid}/status").read_text().splitlines()
            if line.startswith("NSpid:")
        )
        assert ns_pids.split()[-1] == "1", ns_pids  # PID 1 in its namespace, as in a container
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"pid1.hits:3|c", ("127.0.0.1", statsd))
        wait_for_peer(lambda: _accepted(telemetry), "the point accepted")
        os.kill(int(agent_pid), signal.SIGTERM)
        assert outer.wait(30) == 0, log.read_text()  # unshare exits with the agent's status
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
    assert "received SIGTERM: stopping" in log.read_text()
    # The flush interval is an hour: the point was written only because SIGTERM flushed it.
    points = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["name"], p["value"]) for p in points] == [("pid1.hits", 3.0)]


def _accepted(telemetry: int) -> bool:
    _, body = http_get(f"http://127.0.0.1:{telemetry}/metrics")
    return any(
        line.startswith("headwater_receiver_accepted_points_total") and float(line.split()[-1]) >= 1
        for line in body.splitlines()
    )


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare --pid (root or user namespaces)")
def test_agent_as_pid_1_stops_on_sigterm_while_still_starting(tmp_path: Path) -> None:
    """Before the event loop exists there is no loop signal handler; as PID 1 an unhandled SIGTERM
    would be ignored and the pod would wait for SIGKILL. The config is a FIFO nobody writes, so the
    agent is held inside config loading when the signal arrives."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "agent", "run", "-c", str(fifo)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def blocked_on_the_fifo() -> str | None:
            children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
            if len(children) != 1:
                return None
            wchan = Path(f"/proc/{children[0]}/wchan").read_text()
            return children[0] if wchan == "wait_for_partner" else None

        agent_pid = wait_for_peer(blocked_on_the_fifo, "the agent blocked opening its config")
        os.kill(int(agent_pid), signal.SIGTERM)
        assert outer.wait(30) == 0
        assert "Traceback" not in (outer.stderr.read() if outer.stderr else "")
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
