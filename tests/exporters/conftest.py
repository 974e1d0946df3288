"""Helpers shared by the exporter tests: serving a test's own backend, and watching the event loop while
an exporter works. The exporter tests run under the loop-block guard (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from agent import slicing
from tests.conftest import LOOP_BLOCK_LIMIT_S


@pytest.fixture
def loop_block_limit_s() -> float | None:
    """Every exporter test fails if one event-loop callback runs longer than LOOP_BLOCK_LIMIT_S."""
    return LOOP_BLOCK_LIMIT_S


async def serve(
    app: web.Application, *, ssl_context: ssl.SSLContext | None = None, **runner_options: Any
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` (a test's backend) on 127.0.0.1 at a port the system picks: (its runner, whose
    ``cleanup()`` stops it; the port). ``runner_options`` go to ``web.AppRunner``."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    return runner, int(runner.addresses[0][1])


class Gate:
    """For test backends that hold requests while ``open`` is clear; ``waiting`` counts those held."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.waiting = 0

    async def passage(self) -> None:
        self.waiting += 1
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1


class Ticker:
    """Counts the turns the event loop gives to another task while something else runs; with ``probe``,
    records what the probe returns at each turn (e.g. how far a batch has been applied)."""

    def __init__(self, probe: Callable[[], object] | None = None) -> None:
        self.ticks = 0
        self.seen: list[object] = []
        self._probe = probe
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.ticks += 1
            if self._probe is not None:
                self.seen.append(self._probe())
            await asyncio.sleep(0)

    async def stop(self) -> int:
        self._stop.set()
        await self._task
        return self.ticks


@pytest.fixture
def slice_every_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices end at every clock check, so how often the loop gets a turn does not depend on speed."""
    monkeypatch.setattr(slicing, "SLICE_S", 0.0)


@pytest.fixture
def unsliced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices never end: work runs in one go, as before slicing (the reference for equality tests)."""
    monkeypatch.setattr(slicing, "SLICE_S", float("inf"))
