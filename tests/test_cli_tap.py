"""``headwater tap`` as users run it: a subprocess reading a running agent's stream (the agent in this
test's process, fed with the ``statsd`` client), printing one line per item in text or JSON, with the
filters given, a drop notice when its rate limit cuts, and a clear refusal without the token."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import statsd

from agent.admin import AdminServer
from agent.config import build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port

SAFETY_S = 30.0
"""Bounds a wait for a line that is failing to come anyway."""


class Tapped:
    def __init__(self, agent: Agent, admin: AdminServer, statsd_port: int) -> None:
        self.agent, self.admin, self.statsd_port = agent, admin, statsd_port
        self.endpoint = f"127.0.0.1:{admin.port}"


async def _start(telemetry: dict[str, Any]) -> Tapped:
    port = free_port(socket.SOCK_DGRAM)
    data = {
        "receivers": {"statsd": {"udp": f"127.0.0.1:{port}", "flush_interval": "50ms"}},
        "processors": {"batch": {}},
        "exporters": {"debug": {"verbosity": "basic"}},
        "service": {
            "telemetry": {"endpoint": "127.0.0.1:0", **telemetry},
            "pipelines": {
                "metrics": {"receivers": ["statsd"], "processors": ["batch"], "exporters": ["debug"]}
            },
        },
    }
    agent = Agent(build_config(data, builtin_factories()))
    admin = AdminServer(agent, "127.0.0.1:0")
    await admin.start()
    await agent.start()
    return Tapped(agent, admin, port)


@pytest.fixture
async def tapped(request: pytest.FixtureRequest) -> AsyncIterator[Tapped]:
    t = await _start(getattr(request, "param", {}))  # service.telemetry settings, by indirect parametrize
    yield t
    await t.agent.stop()
    await t.admin.shutdown()


class TapProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), SAFETY_S)
        assert raw, "headwater tap ended without printing the line waited for"
        return raw.decode().rstrip("\n")

    async def watching(self) -> str:
        """The stderr line saying what it watches: the taps are in place from then on."""
        assert self.proc.stderr is not None
        raw = await asyncio.wait_for(self.proc.stderr.readline(), SAFETY_S)
        return raw.decode()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()


@pytest.fixture
async def run_tap() -> AsyncIterator[Any]:
    started: list[TapProcess] = []

    async def run(*args: str) -> TapProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "tap", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        started.append(TapProcess(proc))
        return started[-1]

    yield run
    for p in started:
        await p.stop()


async def test_text_lines_for_statsd_points(tapped: Tapped, run_tap: Any) -> None:
    tap = await run_tap("--endpoint", tapped.endpoint, "--component", "statsd", "--metric", "shop.*")
    assert "statsd out" in await tap.watching()
    client = statsd.StatsClient("127.0.0.1", tapped.statsd_port)
    client.gauge("other", 1)
    client.incr("shop.orders,env=prod", 2)
    line = await tap.line()
    assert ' statsd out shop.orders{env="prod"} sum 2' in line, line
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", line), line  # the point's time, UTC


async def test_json_format_with_label_matchers_and_the_processor_input(tapped: Tapped, run_tap: Any) -> None:
    tap = await run_tap(
        "--endpoint", tapped.endpoint, "--component", "batch*", "--direction", "in",
        "--match", "env=~pro.*", "--match", "team!=ops", "--format", "json",
    )  # fmt: skip
    assert "batch@metrics in" in await tap.watching()
    client = statsd.StatsClient("127.0.0.1", tapped.statsd_port)
    client.incr("req,env=dev")
    client.incr("req,env=prod,team=ops")
    client.incr("req,env=prod,team=web", 5)
    message = json.loads(await tap.line())
    assert message["component"] == "batch@metrics" and message["direction"] == "in"
    assert message["labels"] == {"env": "prod", "team": "web"} and message["value"] == 5.0


@pytest.mark.parametrize("tapped", [{"tap": {"rate_limit_per_s": 1}}], indirect=True)
async def test_what_the_rate_limit_cuts_is_told_in_the_stream(tapped: Tapped, run_tap: Any) -> None:
    tap = await run_tap("--endpoint", tapped.endpoint, "--component", "statsd")
    await tap.watching()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto("\n".join(f"m{i}:1|c" for i in range(10)).encode(), ("127.0.0.1", tapped.statsd_port))
    lines = sorted([await tap.line(), await tap.line()])  # the notice comes first in its message batch
    assert lines[0] == "-- dropped 9 (rate limit)"
    assert lines[1].split()[3].startswith("m")  # the one item the limit lets through


@pytest.mark.parametrize("tapped", [{"auth": {"bearer_token": "s3cret"}}], indirect=True)
async def test_without_the_token_it_says_so_and_exits(tapped: Tapped, run_tap: Any) -> None:
    tap = await run_tap("--endpoint", tapped.endpoint, "--token", "wrong")
    assert await asyncio.wait_for(tap.proc.wait(), SAFETY_S) == 2
    assert tap.proc.stderr is not None
    err = (await tap.proc.stderr.read()).decode()
    assert "401" in err and "bearer token is not the configured one" in err
    ok = await run_tap("--endpoint", tapped.endpoint, "--token", "s3cret")
    assert "statsd out" in await ok.watching()


async def test_an_agent_that_is_not_there(run_tap: Any) -> None:
    tap = await run_tap("--endpoint", f"127.0.0.1:{free_port()}")
    assert await asyncio.wait_for(tap.proc.wait(), SAFETY_S) == 1
    assert tap.proc.stderr is not None
    assert "cannot reach the agent" in (await tap.proc.stderr.read()).decode()
