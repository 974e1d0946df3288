"""The disk queue's background syncer ends when cancelled, even when its wait ends at the same moment."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.diskqueue import DiskQueue, DiskQueueConfig


async def test_the_syncer_ends_cancelled_when_stopped_and_cancelled_at_once(tmp_path: Path) -> None:
    # What a sender's stop does: set the syncer's stop event and cancel it (Tasks.close) in the same loop
    # turn. On Python 3.11 asyncio.wait_for then returned the wait's result and swallowed the
    # cancellation: the syncer ran one more sync during shutdown and ended as if merely stopped.
    q = DiskQueue(DiskQueueConfig(directory=str(tmp_path), fsync="interval", fsync_interval=3600.0), "x")
    part = q.partition()
    try:
        for round_ in range(20):
            stop = asyncio.Event()
            task = asyncio.create_task(q.run_syncer(stop))
            await asyncio.sleep(0)  # one turn: the syncer is in its timed wait
            part.append(b"a")  # something the syncer would sync
            fsyncs = part.stats.fsyncs
            stop.set()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled(), f"round {round_}"
            assert part.stats.fsyncs == fsyncs, f"round {round_}: the syncer synced after its cancellation"
    finally:
        q.close()
