"""The receiver tests run under the loop-block guard (tests/conftest.py); ``make`` builds StatsD
receivers on real sockets, each with a shared :class:`tests.conftest.Sink`; ``running`` starts the
receivers an HTTP or gRPC test builds, each with its client's session, and stops them after."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from agent.component import ComponentKind, Signal
from agent.telemetry import Telemetry
from receivers.statsd import StatsdConfig, StatsdReceiver
from tests.conftest import LOOP_BLOCK_LIMIT_S, Sink, component_settings


@pytest.fixture
def loop_block_limit_s() -> float | None:
    """Every receiver test fails if one event-loop callback runs longer than LOOP_BLOCK_LIMIT_S."""
    return LOOP_BLOCK_LIMIT_S


Make = Callable[..., tuple[StatsdReceiver, Sink, Telemetry]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Builds StatsD receivers (flush_interval 1 h unless given: tests flush by hand); shut down after."""
    made: list[StatsdReceiver] = []

    def build(**cfg: object) -> tuple[StatsdReceiver, Sink, Telemetry]:
        config = StatsdConfig(**{"flush_interval": 3600.0, **cfg})  # type: ignore[arg-type]
        assert config.validate() == []
        tel = Telemetry()
        sink = Sink()
        settings = component_settings(tel, ComponentKind.RECEIVER, "statsd")
        r = StatsdReceiver(settings, config, {Signal.METRICS: sink})
        made.append(r)
        return r, sink, tel

    yield build
    for r in made:
        await r.shutdown()


class Running:
    """Receivers a test started, each with the aiohttp session its client posts with; both are closed
    after the test (also when a start failed)."""

    def __init__(self) -> None:
        self._started: list[tuple[Any, aiohttp.ClientSession]] = []

    async def start(self, receiver: Any) -> aiohttp.ClientSession:
        """Start ``receiver``; returns a client session for it."""
        session = aiohttp.ClientSession()
        self._started.append((receiver, session))
        await receiver.start()
        return session

    async def close(self) -> None:
        for receiver, session in self._started:
            await session.close()
            await receiver.shutdown()


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    started = Running()
    yield started
    await started.close()
