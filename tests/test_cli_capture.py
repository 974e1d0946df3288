"""``headwater capture`` and ``headwater replay`` as users run them: subprocesses against an agent in
this test's process. The capture command starts a capture, says so, and once the capture ends
(stopped here through the endpoint) writes the file and the reason; replay sends the file back over
UDP and TCP at full speed and prints its summary; a file of another version is refused clearly, and
an agent that cannot be reached is named."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.admin import AdminServer
from agent.capture.format import DATA, FORMAT_VERSION, read_file
from agent.config import build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port, wait_until

SAFETY_S = 60.0
"""Bounds a wait for a subprocess that is failing anyway."""


class Running:
    def __init__(self, agent: Agent, admin: AdminServer, udp: int, tcp: int) -> None:
        self.agent, self.admin, self.udp, self.tcp = agent, admin, udp, tcp

    def accepted(self) -> float:
        return self.agent.telemetry.value("receiver_accepted_points_total", receiver="statsd")


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    udp, tcp = free_port(socket.SOCK_DGRAM), free_port()
    data = {
        "receivers": {
            "statsd": {"udp": f"127.0.0.1:{udp}", "tcp": f"127.0.0.1:{tcp}", "flush_interval": "1h"}
        },
        "exporters": {"debug": {"path": str(tmp_path / "out.jsonl")}},
        "service": {
            "telemetry": {"endpoint": "127.0.0.1:0", "capture": {"directory": str(tmp_path)}},
            "pipelines": {"metrics": {"receivers": ["statsd"], "exporters": ["debug"]}},
        },
    }
    agent = Agent(build_config(data, builtin_factories()))
    admin = AdminServer(agent, "127.0.0.1:0")
    await admin.start()
    await agent.start()
    yield Running(agent, admin, udp, tcp)
    await agent.stop()
    await admin.shutdown()


async def _run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), SAFETY_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_capture_then_replay_from_the_command_line(running: Running, tmp_path: Path) -> None:
    output = tmp_path / "cli.hwcap"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "capture",
        "--endpoint",
        f"127.0.0.1:{running.admin.port}",
        "--receiver",
        "statsd",
        "--duration",
        "5m",
        "--max-bytes",
        "1MiB",
        "-o",
        str(output),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        said = (await asyncio.wait_for(proc.stderr.readline(), SAFETY_S)).decode()
        assert "recording statsd" in said and "at most 300s, 1048576 bytes" in said
        receiver = running.agent.receiver_instances()["statsd"][1]
        await wait_until(lambda: receiver.capture is not None, "the capture hook set")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"hits:3|c|#route:/a\nload:0.5|g", ("127.0.0.1", running.udp))
        _, writer = await asyncio.open_connection("127.0.0.1", running.tcp)
        writer.write(b"jobs:2|c\n")
        await writer.drain()
        writer.close()
        await wait_until(lambda: running.accepted() == 3, "the agent took the 3 lines")
        capture = running.admin.capture
        assert capture is not None and capture.recorder is not None
        recorder = capture.recorder
        await wait_until(lambda: recorder.status()["records"] == 2, "both reads recorded")
        await asyncio.to_thread(capture.stop)
        rest = (await asyncio.wait_for(proc.stderr.read(), SAFETY_S)).decode()
        assert await asyncio.wait_for(proc.wait(), SAFETY_S) == 0, rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert f"2 records, {output.stat().st_size} bytes written to {output}; ended: stopped" in rest
    _, records = read_file(str(output))
    assert sorted((r.transport, r.payload) for r in records if r.kind == DATA) == [
        ("tcp", b"jobs:2|c\n"),
        ("udp", b"hits:3|c|#route:/a\nload:0.5|g"),
    ]

    code, out, err = await _run(
        "replay",
        str(output),
        "--speed",
        "0",
        "--receiver",
        f"statsd/udp=127.0.0.1:{running.udp}",
        "--receiver",
        f"statsd/tcp=127.0.0.1:{running.tcp}",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["records"] == 2 and summary["errors"] == {} and summary["gaps"] == 0
    assert summary["bytes"] == len(b"jobs:2|c\n") + len(b"hits:3|c|#route:/a\nload:0.5|g")
    await wait_until(lambda: running.accepted() == 6, "the replay's 3 lines taken again")


async def test_replay_refuses_another_version_and_capture_names_an_unreachable_agent(tmp_path: Path) -> None:
    newer = tmp_path / "newer.hwcap"
    newer.write_bytes(b"HWCAPTUR" + struct.pack(">HI", FORMAT_VERSION + 1, 2) + b"{}")
    code, _, err = await _run("replay", str(newer))
    assert code == 2
    assert f"capture format version {FORMAT_VERSION + 1} is not supported" in err
    code, _, err = await _run("replay", str(newer), "--receiver", "statsd")
    assert code == 2 and "expected ID=HOST:PORT" in err
    port = free_port()  # nothing listens there
    code, _, err = await _run("capture", "--endpoint", f"127.0.0.1:{port}", "-o", str(tmp_path / "x"))
    assert code == 1 and f"cannot reach the telemetry endpoint 127.0.0.1:{port}" in err
    assert not (tmp_path / "x").exists()
