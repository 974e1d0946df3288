"""Long work on the event loop, done in slices that yield to it.

A 1M-point batch costs an exporter seconds of pure-Python work (series state, encoding); done in one go
it holds the loop that long, and every connection, timer and health answer on it waits. Work over a
sequence goes through :func:`slices` instead: the items come in runs of ``size``, and before a run the
loop gets a turn once ``SLICE_S`` of work has passed since its last one. Other work (a scrape page, a
snapshot) uses a :class:`Slicer` directly.

Yielding lets other tasks run in the middle of the work: a caller whose state must not be seen or
changed half-way (a batch applied to series state, whose requests must stay in order) holds a lock
around the whole of it. The exporters share this one implementation (STYLE lesson 13).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

SLICE_S = 0.005
"""Work done on the event loop before it gets a turn: 5 ms, far inside a 1 s liveness timeout, and
long enough that the turns cost little (one ``sleep(0)``, ~20 µs, per slice)."""
CHECK_EVERY = 256
"""Items handled between looks at the clock: ~0.1-2 ms of work for the exporters (0.4-8 µs an item), so
a slice overruns ``SLICE_S`` by little, and the clock is read rarely enough to cost nothing."""

T = TypeVar("T")


class Slicer:
    """Tells when ``slice_s`` of work has passed since the loop last had a turn, and gives it one."""

    __slots__ = ("_start", "slice_s")

    def __init__(self, slice_s: float | None = None) -> None:
        self.slice_s = SLICE_S if slice_s is None else slice_s
        self._start = time.perf_counter()

    def due(self) -> bool:
        """Whether the current slice is used up."""
        return time.perf_counter() - self._start >= self.slice_s

    async def pause(self) -> None:
        """Give the loop a turn and start a new slice."""
        await asyncio.sleep(0)
        self._start = time.perf_counter()

    async def tick(self) -> None:
        """:meth:`pause` when the current slice is used up."""
        if time.perf_counter() - self._start >= self.slice_s:
            await self.pause()


async def slices(
    items: Sequence[T], size: int = CHECK_EVERY, slice_s: float | None = None
) -> AsyncIterator[Sequence[T]]:
    """``items`` in consecutive runs of at most ``size`` (slices of the sequence, in order); before each
    run but the first, the loop gets a turn if ``slice_s`` (default ``SLICE_S``) of work has passed since
    it last had one. The work done on a run counts towards the slice: do it inside the ``async for``."""
    slicer = Slicer(slice_s)
    for lo in range(0, len(items), size):
        if lo:
            await slicer.tick()
        yield items[lo : lo + size]
