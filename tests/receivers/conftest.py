"""The receiver tests run under the loop-block guard (tests/conftest.py); ``make`` builds StatsD
receivers on real sockets, each with a shared :class:`tests.conftest.Sink`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

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
