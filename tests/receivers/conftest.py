"""Fixtures shared by the receiver tests: a StatsD receiver on real sockets and a sink that keeps points."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from agent.component import Backpressure, ComponentId, ComponentKind, Settings, Signal
from agent.model import MetricBatch, Point
from agent.telemetry import ComponentTelemetry, Telemetry
from receivers.statsd import StatsdConfig, StatsdReceiver


class Sink:
    """A metrics consumer that keeps every point (or refuses with backpressure when ``refuse``)."""

    def __init__(self) -> None:
        self.points: list[Point] = []
        self.refuse = False

    async def consume(self, batch: MetricBatch) -> None:
        if self.refuse:
            raise Backpressure("queue_full")
        self.points.extend(batch.points)

    def total(self, name: str) -> float:
        return sum(p.value for p in self.points if p.name == name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def receiver_settings(tel: Telemetry, name: str) -> Settings:
    """Settings of a receiver under test named ``name``, reporting into ``tel``."""
    return Settings(
        id=ComponentId(name),
        kind=ComponentKind.RECEIVER,
        telemetry=ComponentTelemetry(tel, "receiver", name),
        logger=logging.getLogger(f"test.{name}"),
    )


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (polling) until ``check()`` holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


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
        r = StatsdReceiver(receiver_settings(tel, "statsd"), config, {Signal.METRICS: sink})
        made.append(r)
        return r, sink, tel

    yield build
    for r in made:
        await r.shutdown()
