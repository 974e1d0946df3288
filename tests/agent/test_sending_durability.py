"""A Sender on a disk queue loses nothing it holds: ``drop_oldest`` never drops the request being sent,
and a request still unsent at shutdown stays on disk for the next run."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.component import RetryableError
from agent.sending import QueueConfig, Request
from tests.agent.test_sending import make


async def test_drop_oldest_never_drops_a_request_being_sent(tmp_path: Path) -> None:
    gate = asyncio.Event()
    taken = asyncio.Event()
    sent: list[bytes] = []

    async def slow(req: Request) -> None:
        taken.set()
        await gate.wait()
        sent.append(req.payload)

    cfg = QueueConfig(storage="disk", directory=str(tmp_path), max_bytes=64 * 1024, full_policy="drop_oldest")
    sender, tel = make(slow, cfg)
    await sender.start()
    sender.offer(Request(b"first" + b"." * 3995, 1))
    await sender.commit()
    await taken.wait()  # the worker holds "first" in flight
    for _ in range(100):
        sender.offer(Request(b"z" * 4000, 1))
    await sender.commit()
    dropped = tel.value("exporter_dropped_points_total", reason="queue_full")
    assert dropped > 0
    gate.set()
    await sender.shutdown(5.0)
    assert sent[0].startswith(b"first")
    # Every point is either delivered or dropped, never both.
    assert tel.value("exporter_sent_points_total") + dropped == 101


async def test_a_release_on_shutdown_keeps_the_record_for_the_next_run(tmp_path: Path) -> None:
    async def down(req: Request) -> None:
        raise RetryableError("503", reason="http_503")

    cfg = QueueConfig(storage="disk", directory=str(tmp_path))
    sender, tel = make(down, cfg)
    await sender.start()
    sender.offer(Request(b"a", 2))
    await sender.commit()
    await sender.shutdown(0.01)
    assert tel.value("exporter_dropped_points_total") == 0
    seen: list[bytes] = []

    async def up(req: Request) -> None:
        seen.append(req.payload)

    again, _ = make(up, cfg)
    await again.start()
    await again.shutdown(5.0)
    assert seen == [b"a"]
