"""A sender's shutdown ends within its deadline whatever the backend does, and a reload's hand-over
moves the queue to the successor instead of dropping it."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from agent.component import ComponentKind, Tasks
from agent.sending import QueueConfig, Request, RetryConfig, Sender
from agent.telemetry import Telemetry
from tests.conftest import component_settings, wait_until

HANG_LIMIT_S = 60.0
"""Only a hang reaches this: every shutdown here has a deadline well under a second."""


def make(send, queue: QueueConfig, tel: Telemetry | None = None, retry: RetryConfig | None = None):
    tel = tel or Telemetry()
    settings = component_settings(tel, ComponentKind.EXPORTER, "test", logger="test.sender")
    retry = retry or RetryConfig(initial_interval=1.0, max_interval=1.0)
    return Sender(settings, send, queue, retry, 5.0, rng=random.Random(1)), tel


async def test_shutdown_ends_while_workers_are_cancelled_as_sends_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The backend refuses at once, so at the deadline the worker is nearly always inside a send that has
    # just failed: on Python 3.11 asyncio.wait_for then swallowed the worker's cancellation, the worker
    # went back to waiting for work, and shutdown waited for it forever (9 rounds in 10).
    attempts = 0

    async def send(req: Request) -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        raise ConnectionRefusedError("refused")

    for round_ in range(10):
        attempts = 0
        sender, tel = make(send, QueueConfig(queue_size=50_000))
        await sender.start()
        for _ in range(20_000):
            sender.offer(Request(b"x", 2))
        async with asyncio.timeout(HANG_LIMIT_S):
            await sender.shutdown(0.01 + round_ * 0.002)
        assert tel.value("exporter_dropped_points_total", reason="shutdown") == 40_000
        # The worker stopped when cancelled at the deadline: the rest was counted, not pushed one by one
        # through the dead backend (what a swallowed cancellation did).
        assert attempts < 20_000
        assert tel.value("exporter_queue_points") == 0  # unregistered with the sender
    # Each worker ended when cancelled: none was left behind by the stop grace (the safety net).
    assert not [r for r in caplog.records if "did not stop" in r.getMessage()]


async def test_a_worker_that_swallows_its_cancellation_cannot_hold_shutdown() -> None:
    tasks = Tasks("test", logging.getLogger("test.tasks"))
    release = asyncio.Event()
    running = asyncio.Event()

    async def stubborn() -> None:
        running.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # the bug this guards against: a cancellation eaten in a loop

    task = tasks.spawn(stubborn(), "stubborn")
    await running.wait()
    async with asyncio.timeout(HANG_LIMIT_S):
        assert await tasks.close(0.05) == ["test:stubborn"]
    release.set()
    await task


async def test_queue_points_count_queued_and_in_flight_requests() -> None:
    started = asyncio.Event()

    async def send(req: Request) -> None:
        started.set()
        await asyncio.Event().wait()  # a backend that never answers

    sender, tel = make(send, QueueConfig(queue_size=10))
    await sender.start()
    for n in (3, 4, 5):
        sender.offer(Request(b"x", n))
    await started.wait()
    assert tel.value("exporter_queue_points") == 12
    await sender.shutdown(0.01)
    assert tel.value("exporter_dropped_points_total", reason="shutdown") == 12


async def test_hand_over_gives_the_memory_queue_to_the_successor_in_order() -> None:
    started = asyncio.Event()

    async def hang(req: Request) -> None:
        started.set()
        await asyncio.Event().wait()

    old, tel = make(hang, QueueConfig(queue_size=3))
    await old.start()
    old.offer(Request(b"r0", 1))
    await started.wait()
    for i in range(1, 5):  # r0 is being sent, r1 is dropped for r4 (drop_oldest, counted), r2-r4 wait
        old.offer(Request(f"r{i}".encode(), 1))
    handed = await old.hand_over()
    assert [r.payload for r in handed] == [b"r0", b"r2", b"r3", b"r4"]
    assert tel.value("exporter_dropped_points_total", reason="shutdown") == 0
    old.offer(Request(b"late", 1))  # the old sender is closed: counted, not queued
    assert tel.value("exporter_dropped_points_total", reason="shutdown") == 1

    seen: list[bytes] = []
    all_sent = asyncio.Event()

    async def record(req: Request) -> None:
        seen.append(req.payload)
        if len(seen) == 5:
            all_sent.set()

    new, _ = make(record, QueueConfig(queue_size=1), tel)
    new.offer(Request(b"new", 1))
    await new.adopt(handed)  # past queue_size: they were accepted already
    await new.start()
    await all_sent.wait()
    await new.shutdown(1.0)
    assert seen == [b"r0", b"r2", b"r3", b"r4", b"new"]
    assert tel.value("exporter_sent_points_total") == 5
    assert tel.value("exporter_dropped_points_total", reason="queue_full") == 1


async def test_hand_over_leaves_a_disk_backlog_for_the_successor(tmp_path: Path) -> None:
    async def refuse(req: Request) -> None:
        raise ConnectionRefusedError("refused")

    queue = QueueConfig(storage="disk", directory=str(tmp_path))
    old, tel = make(refuse, queue)
    await old.start()
    for i in range(3):
        old.offer(Request(f"r{i}".encode(), 1))
    await old.commit()
    async with asyncio.timeout(HANG_LIMIT_S):
        assert await old.hand_over() == []

    seen: list[bytes] = []
    all_sent = asyncio.Event()

    async def record(req: Request) -> None:
        seen.append(req.payload)
        if len(seen) == 3:
            all_sent.set()

    new, _ = make(record, queue, tel)
    await new.start()  # the lock was released: the same partition opens
    await all_sent.wait()
    await new.shutdown(1.0)
    assert seen == [b"r0", b"r1", b"r2"]
    assert tel.value("exporter_dropped_points_total") == 0


async def test_a_disk_queue_shutdown_ends_once_every_worker_has_stopped(tmp_path: Path) -> None:
    # Two workers, one record, the backend down: one worker found nothing to send and ended at shutdown,
    # then the other's send failed and it kept the record for the next run. Shutdown then has nothing
    # left to wait for; it used to wait its whole deadline, counting only the workers that kept a record.
    sending = asyncio.Event()
    fail = asyncio.Event()

    async def refuse_later(req: Request) -> None:
        sending.set()
        await fail.wait()
        raise ConnectionRefusedError("refused")

    queue = QueueConfig(storage="disk", directory=str(tmp_path), num_consumers=2)
    sender, tel = make(refuse_later, queue)
    await sender.start()
    sender.offer(Request(b"r0", 1))
    await sender.commit()
    await sending.wait()
    stopping = asyncio.ensure_future(sender.shutdown(3600.0))
    async with asyncio.timeout(HANG_LIMIT_S):
        await wait_until(lambda: len(sender._tasks._tasks) <= 1, "the idle worker to end")
        fail.set()
        await stopping
    assert tel.value("exporter_dropped_points_total") == 0

    kept: list[bytes] = []

    async def record(req: Request) -> None:
        kept.append(req.payload)

    again, _ = make(record, queue, tel)
    await again.start()
    await again.shutdown(HANG_LIMIT_S)
    assert kept == [b"r0"]  # left on disk for the next run


async def test_adopt_counts_what_the_disk_queue_cannot_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reload moved a memory queue to disk and the disk fails: the requests it could not write are
    # counted as dropped{write_error}, the rest are queued and sent; the failure does not escape adopt
    # (the reload would have left the successor half set up).
    from agent.diskqueue.partition import Partition

    seen: list[bytes] = []
    sent = asyncio.Event()

    async def record(req: Request) -> None:
        seen.append(req.payload)
        if len(seen) == 2:
            sent.set()

    new, tel = make(record, QueueConfig(storage="disk", directory=str(tmp_path)))
    await new.start()
    real_append = Partition.append

    def append(self: Partition, payload: bytes, *args: object, **kwargs: object) -> object:
        if payload == b"r1":
            raise OSError(5, "Input/output error")
        return real_append(self, payload, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Partition, "append", append)
    await new.adopt([Request(b"r0", 1), Request(b"r1", 2), Request(b"r2", 4)])
    await sent.wait()
    await new.shutdown(HANG_LIMIT_S)
    assert seen == [b"r0", b"r2"]
    assert tel.value("exporter_dropped_points_total", reason="write_error") == 2
