"""``headwater top`` as a user runs it: in a real terminal (tmux, 160x40) against a running agent fed
by the ``statsd`` client; the screen is read back with ``tmux capture-pane``. The component rows show
non-zero rates, ``s`` changes the sort column, ``/`` filters the components, ``q`` quits with 0; with
the agent gone the screen says it cannot read it and keeps retrying.

The screens are kept as test artifacts (``top-screen.txt``, ``top-screen-filtered.txt`` under the test's
tmp dir, and copied to ``$HEADWATER_ARTIFACTS`` when that is set).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import statsd

from tests.helpers import STATSD_TO_DEBUG, keep_artifact
from tests.integration.conftest import ROOT, AgentProcess, free_tcp_udp_port, http_get, wait_for_peer

pytestmark = pytest.mark.integration


class Terminal:
    """One tmux server of the test's own (its own socket) running one command in a 160x40 window."""

    def __init__(self, tmp_path: Path) -> None:
        tmux = shutil.which("tmux")
        assert tmux, "tmux is not installed: scripts/install-test-deps installs it"
        self._base = [tmux, "-S", str(tmp_path / "tmux.sock")]
        self.rc_path = tmp_path / "top.rc"
        # The window's size, not a COLUMNS/LINES the test process may carry (curses prefers those).
        self._env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def _tmux(self, *args: str) -> str:
        done = subprocess.run([*self._base, *args], capture_output=True, text=True, timeout=30, env=self._env)
        assert done.returncode == 0, f"tmux {args}: {done.stderr}"
        return done.stdout

    def start(self, command: list[str]) -> None:
        quoted = " ".join(f"'{a}'" for a in command)
        self._tmux(
            "new-session", "-d", "-s", "top", "-x", "160", "-y", "40", "-c", str(ROOT),
            f"{quoted}; echo $? > '{self.rc_path}'",
        )  # fmt: skip

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "top", *(["-l"] if literal else []), *keys)

    def close(self) -> None:
        subprocess.run([*self._base, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path)
    yield term
    term.close()


def _start_agent(tmp_path: Path) -> AgentProcess:
    ports = {"statsd": free_tcp_udp_port(), "telemetry": free_tcp_udp_port()}
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(textwrap.dedent(STATSD_TO_DEBUG.format(out=tmp_path / "out.jsonl", **ports)))
    log_path, stdout_path = tmp_path / "agent.log", tmp_path / "agent.out"
    with open(log_path, "wb") as err, open(stdout_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "-c", str(config_path)], cwd=ROOT, stdout=out, stderr=err
        )
    agent = AgentProcess(proc, config_path, ports, log_path, stdout_path)
    wait_for_peer(lambda: http_get(agent.url("telemetry", "/readyz"))[0] == 200, "agent ready")
    return agent


def _rows(screen: str, kind: str) -> list[list[str]]:
    """The component rows of ``kind`` on the screen, split into columns."""
    return [line.split() for line in screen.splitlines() if line.startswith(kind + " ")]


def test_top_shows_rates_sorts_filters_and_quits(tmp_path: Path, terminal: Terminal) -> None:
    agent = _start_agent(tmp_path)
    closing: list[socket.socket] = []
    try:
        terminal.start(
            [sys.executable, "-m", "agent", "top", "--endpoint", f"127.0.0.1:{agent.ports['telemetry']}"]
        )
        client = statsd.StatsClient("127.0.0.1", agent.ports["statsd"])
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closing.append(raw)
        sent = 0

        def flowing() -> str | None:
            # Traffic while waiting, bounded: at most 50 rounds of 20 lines (the wait itself ends first).
            nonlocal sent
            if sent < 50:
                sent += 1
                for i in range(20):
                    client.incr(f"top.hits{i % 3}")
                raw.sendto(b"not a statsd line", ("127.0.0.1", agent.ports["statsd"]))
            screen = terminal.screen()
            [receiver] = _rows(screen, "receiver") or [[]]
            # KIND COMPONENT IN/S OUT/S REFUSED/S ...: a rate shown and above zero.
            moving = len(receiver) >= 5 and receiver[2] not in ("0", "…") and receiver[4] not in ("0", "…")
            tracked = "TOP METRICS BY SERIES" in screen and "top.hits" in screen
            return screen if moving and tracked and _rows(screen, "exporter") else None

        screen = wait_for_peer(flowing, "the statsd row with non-zero in/s and refused/s, top metrics")
        keep_artifact(tmp_path, "top-screen.txt", screen)
        assert "sort: in/s (s)" in screen
        assert [r[1] for r in _rows(screen, "processor")] == ["memory_limiter"]
        assert [r[1] for r in _rows(screen, "exporter")] == ["debug"]
        assert "malformed_line" in screen  # the refusal, by reason
        assert "rss " in screen and "loop lag" in screen and "ALERTS  0 firing" in screen

        terminal.keys("s")
        wait_for_peer(lambda: "sort: out/s (s)" in terminal.screen(), "the sort column to change")

        terminal.keys("/")
        wait_for_peer(lambda: "filter: _" in terminal.screen(), "the filter prompt")
        terminal.keys("debug", literal=True)
        terminal.keys("Enter")

        def filtered() -> str | None:
            screen = terminal.screen()
            shown = "filter: debug (/)" in screen
            return screen if shown and _rows(screen, "exporter") and not _rows(screen, "receiver") else None

        screen = wait_for_peer(filtered, "only the debug exporter's row")
        assert not _rows(screen, "processor") and "malformed_line" not in screen and "top.hits" not in screen
        keep_artifact(tmp_path, "top-screen-filtered.txt", screen)

        agent.stop()
        wait_for_peer(lambda: "cannot read the agent" in terminal.screen(), "the endpoint-down message")
        assert "retrying every second" in terminal.screen()

        terminal.keys("q")
        wait_for_peer(
            lambda: terminal.rc_path.exists() and terminal.rc_path.read_text().strip(), "top to exit"
        )
        assert terminal.rc_path.read_text().strip() == "0"
    finally:
        for sock in closing:
            sock.close()
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
