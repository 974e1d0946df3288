from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from agent.component import Backpressure, ComponentKind, PermanentError, RetryableError
from agent.sending import QueueConfig, Request, RetryConfig, Sender
from agent.telemetry import Telemetry
from tests.conftest import component_settings, wait_until

FAST = RetryConfig(initial_interval=0.001, max_interval=0.01, max_elapsed_time=5.0)


def make(send, queue: QueueConfig | None = None, retry: RetryConfig = FAST, timeout_s: float = 5.0):
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.EXPORTER, "test", logger="test.sender")
    return Sender(settings, send, queue or QueueConfig(), retry, timeout_s, rng=random.Random(1)), tel


async def test_retries_then_delivers_in_order() -> None:
    seen: list[bytes] = []
    failures = {b"a": 2}

    async def send(req: Request) -> None:
        if failures.get(req.payload, 0) > 0:
            failures[req.payload] -= 1
            raise RetryableError("503", reason="http_503")
        seen.append(req.payload)

    sender, tel = make(send)
    await sender.start()
    for p in (b"a", b"b", b"c"):
        sender.offer(Request(p, 10))
    await sender.shutdown(5.0)
    assert seen == [b"a", b"b", b"c"]  # a failing head blocks later requests: per-series order holds
    assert tel.value("exporter_sent_points_total") == 30
    assert tel.value("exporter_failed_points_total", reason="http_503") == 20
    assert tel.value("exporter_retries_total") == 2


async def test_permanent_error_drops_and_counts_and_later_requests_flow() -> None:
    seen: list[bytes] = []

    async def send(req: Request) -> None:
        if req.payload == b"poison":
            raise PermanentError("HTTP 400: bad")
        seen.append(req.payload)

    sender, tel = make(send)
    await sender.start()
    sender.offer(Request(b"poison", 7))
    sender.offer(Request(b"ok", 3))
    await sender.shutdown(5.0)
    assert seen == [b"ok"]
    assert tel.value("exporter_dropped_points_total", reason="permanent_error") == 7
    assert tel.value("exporter_retries_total") == 0


async def test_retry_after_is_honoured() -> None:
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    async def send(req: Request) -> None:
        calls.append(loop.time())
        if len(calls) == 1:
            raise RetryableError("429", reason="http_429", retry_after_s=0.3)

    sender, _ = make(send)
    await sender.start()
    sender.offer(Request(b"x", 1))
    await sender.shutdown(5.0)
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.3  # a lower bound only: never retried before the server's delay


async def test_gives_up_after_max_elapsed_time() -> None:
    async def send(req: Request) -> None:
        raise ConnectionRefusedError("nobody home")

    retry = RetryConfig(initial_interval=0.001, max_interval=0.002, max_elapsed_time=0.05)
    sender, tel = make(send, retry=retry)
    await sender.start()
    sender.offer(Request(b"x", 5))
    await sender.shutdown(5.0)
    assert tel.value("exporter_dropped_points_total", reason="retries_exhausted") == 5
    assert tel.value("exporter_failed_points_total", reason="connection_error") >= 5


async def test_full_queue_drops_oldest_and_counts() -> None:
    gate = asyncio.Event()
    taken: list[bytes] = []
    seen: list[bytes] = []

    async def send(req: Request) -> None:
        taken.append(req.payload)
        await gate.wait()
        seen.append(req.payload)

    sender, tel = make(send, queue=QueueConfig(queue_size=2))
    await sender.start()
    sender.offer(Request(b"1", 1))
    await wait_until(lambda: taken == [b"1"], "the worker to take 1 and wait on the gate")
    for p in (b"2", b"3", b"4"):
        sender.offer(Request(p, 1))
    assert tel.value("exporter_dropped_points_total", reason="queue_full") == 1
    gate.set()
    await sender.shutdown(5.0)
    assert seen == [b"1", b"3", b"4"]


async def test_full_queue_drop_newest() -> None:
    gate = asyncio.Event()
    taken: list[bytes] = []
    seen: list[bytes] = []

    async def send(req: Request) -> None:
        taken.append(req.payload)
        await gate.wait()
        seen.append(req.payload)

    sender, tel = make(send, queue=QueueConfig(queue_size=1, full_policy="drop_newest"))
    await sender.start()
    sender.offer(Request(b"1", 1))
    await wait_until(lambda: taken == [b"1"], "the worker to take 1 and wait on the gate")
    sender.offer(Request(b"2", 1))
    sender.offer(Request(b"3", 1))
    gate.set()
    await sender.shutdown(5.0)
    assert seen == [b"1", b"2"]
    assert tel.value("exporter_dropped_points_total", reason="queue_full") == 1


async def test_shutdown_deadline_counts_what_is_left() -> None:
    async def send(req: Request) -> None:
        raise RetryableError("503", reason="http_503")

    retry = RetryConfig(initial_interval=0.01, max_interval=0.02, max_elapsed_time=0)
    sender, tel = make(send, retry=retry)
    await sender.start()
    for _ in range(3):
        sender.offer(Request(b"x", 4))
    await sender.shutdown(0.1)
    assert tel.value("exporter_dropped_points_total", reason="shutdown") == 12
    assert tel.value("exporter_sent_points_total") == 0
    sender.offer(Request(b"late", 2))  # after shutdown: counted, not queued
    assert tel.value("exporter_dropped_points_total", reason="shutdown") == 14


async def test_timeout_is_retryable() -> None:
    calls = 0

    async def send(req: Request) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # never answers: the 0.05 s timeout ends the call

    sender, tel = make(send, timeout_s=0.05)
    await sender.start()
    sender.offer(Request(b"x", 1))
    await sender.shutdown(5.0)
    assert tel.value("exporter_failed_points_total", reason="timeout") == 1
    assert tel.value("exporter_sent_points_total") == 1


def test_backoff_is_capped_and_jittered() -> None:
    retry = RetryConfig(initial_interval=1.0, max_interval=30.0, multiplier=2.0, randomization_factor=0.5)
    rng = random.Random(7)
    waits = [retry.backoff_s(a, rng) for a in range(12)]
    assert all(0.5 <= w <= 30.0 for w in waits)
    assert waits[-1] <= 30.0 and len(set(waits)) > 6
    assert 0.5 <= retry.backoff_s(0, rng) <= 1.5


# -- disk storage ------------------------------------------------------------------------------------


def disk(tmp_path: object, **kw: object) -> QueueConfig:
    return QueueConfig(storage="disk", directory=str(tmp_path), **kw)  # type: ignore[arg-type]


async def test_disk_queue_keeps_undelivered_requests_for_the_next_run(tmp_path: object) -> None:
    async def down(req: Request) -> None:
        raise RetryableError("503", reason="http_503")

    sender, tel = make(down, disk(tmp_path))
    await sender.start()
    for i in range(5):
        sender.offer(Request(b"r%d" % i, 10, {"x-tenant": "a"}, kind="metrics"))
    await sender.commit()
    await sender.shutdown(0.05)  # the backend is down past the deadline
    assert tel.value("exporter_dropped_points_total") == 0  # kept, not lost
    assert tel.value("exporter_sent_points_total") == 0

    seen: list[Request] = []

    async def up(req: Request) -> None:
        seen.append(req)

    again, tel2 = make(up, disk(tmp_path))
    await again.start()
    await again.shutdown(5.0)
    assert [r.payload for r in seen] == [b"r%d" % i for i in range(5)]  # oldest first
    assert all(r.points == 10 and r.kind == "metrics" and r.headers == {"x-tenant": "a"} for r in seen)
    assert tel2.value("exporter_sent_points_total") == 50

    third, _ = make(up, disk(tmp_path))  # delivered records are acked: never sent again
    await third.start()
    await third.shutdown(5.0)
    assert len(seen) == 5


async def test_disk_queue_retries_past_max_elapsed_time(tmp_path: object) -> None:
    calls = 0

    async def flaky(req: Request) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RetryableError("503", reason="http_503")

    retry = RetryConfig(initial_interval=0.01, max_interval=0.02, max_elapsed_time=0.001)
    sender, tel = make(flaky, disk(tmp_path), retry=retry)
    await sender.start()
    sender.offer(Request(b"x", 4))
    await sender.commit()
    await wait_until(lambda: tel.value("exporter_sent_points_total") == 4)  # a memory queue gives up
    await sender.shutdown(5.0)
    assert tel.value("exporter_dropped_points_total") == 0


async def test_disk_queue_permanent_error_is_dropped_once(tmp_path: object) -> None:
    async def refuse(req: Request) -> None:
        raise PermanentError("HTTP 400", reason="http_400")

    sender, tel = make(refuse, disk(tmp_path))
    await sender.start()
    sender.offer(Request(b"poison", 3))
    await sender.commit()
    await sender.shutdown(5.0)
    assert tel.value("exporter_dropped_points_total", reason="http_400") == 3
    seen: list[bytes] = []

    async def up(req: Request) -> None:
        seen.append(req.payload)

    again, _ = make(up, disk(tmp_path))
    await again.start()
    await again.shutdown(5.0)
    assert seen == []


async def test_full_queues_block_with_backpressure(tmp_path: object) -> None:
    gate = asyncio.Event()
    taken: list[bytes] = []

    async def stuck(req: Request) -> None:
        taken.append(req.payload)
        await gate.wait()

    memory, _ = make(stuck, QueueConfig(queue_size=2, full_policy="block"))
    await memory.start()
    memory.offer(Request(b"a", 1))
    await wait_until(lambda: taken == [b"a"], 'the worker to take "a"')
    memory.offer(Request(b"b", 1))
    memory.offer(Request(b"c", 1))
    with pytest.raises(Backpressure):
        memory.offer(Request(b"d", 1))
    gate.set()
    await memory.shutdown(5.0)

    ondisk, tel = make(stuck, disk(tmp_path, max_bytes=64 * 1024, full_policy="block"))
    gate.clear()
    await ondisk.start()
    with pytest.raises(Backpressure):
        for _ in range(100):
            ondisk.offer(Request(b"z" * 4000, 1))
    assert tel.value("exporter_disk_queue_refused_appends_total", reason="full") >= 1
    gate.set()
    await ondisk.shutdown(5.0)


async def test_disk_queue_drop_oldest_counts_points(tmp_path: object) -> None:
    async def down(req: Request) -> None:
        raise RetryableError("503", reason="http_503")

    sender, tel = make(down, disk(tmp_path, max_bytes=64 * 1024, full_policy="drop_oldest"))
    await sender.start()
    for _ in range(100):
        sender.offer(Request(b"z" * 4000, 2))
    await sender.commit()
    await sender.shutdown(0.05)
    dropped = tel.value("exporter_dropped_points_total", reason="queue_full")
    assert dropped > 0 and dropped % 2 == 0
    assert dropped + 2 * sender.queued <= 200


async def test_interleaved_disk_drain_alternates_oldest_and_newest(tmp_path: object) -> None:
    async def down(req: Request) -> None:
        raise RetryableError("503", reason="http_503")

    backlog, _ = make(down, disk(tmp_path))
    await backlog.start()
    for i in range(6):
        backlog.offer(Request(b"%d" % i, 1))
    await backlog.commit()
    await backlog.shutdown(0.05)

    seen: list[bytes] = []

    async def up(req: Request) -> None:
        seen.append(req.payload)

    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.EXPORTER, "test", logger="test.sender")
    sender = Sender(settings, up, disk(tmp_path), FAST, 5.0, fifo=False, rng=random.Random(1))
    await sender.start()
    await sender.shutdown(5.0)
    assert seen == [b"0", b"5", b"1", b"4", b"2", b"3"]


def test_disk_queue_config_checks(tmp_path: object) -> None:
    assert ("full_policy", "a disk queue blocks or drops the oldest records") in disk(
        tmp_path, full_policy="drop_newest"
    ).validate()
    assert disk(tmp_path).environment_problems() == []
    blocker = Path(str(tmp_path)) / "a-file"
    blocker.write_text("")
    assert QueueConfig(storage="disk", directory=str(blocker / "queue")).environment_problems()


async def test_a_full_disk_is_a_full_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.diskqueue import DiskFull, Partition

    async def up(req: Request) -> None:
        pass

    def no_space(
        self: Partition, payload: bytes, items: int = 1, headers: object = None, *, admitted: bool = False
    ) -> object:
        raise DiskFull("ENOSPC")

    blocking, _ = make(up, disk(tmp_path / "a", full_policy="block"))
    await blocking.start()
    monkeypatch.setattr(Partition, "append", no_space)
    with pytest.raises(Backpressure) as raised:
        blocking.offer(Request(b"x", 3))
    assert raised.value.reason == "disk_full"
    monkeypatch.undo()
    await blocking.shutdown(5.0)

    dropping, tel = make(up, disk(tmp_path / "b", full_policy="drop_oldest"))
    await dropping.start()
    monkeypatch.setattr(Partition, "append", no_space)
    dropping.offer(Request(b"x", 3))
    monkeypatch.undo()
    assert tel.value("exporter_dropped_points_total", reason="disk_full") == 3
    dropping.offer(Request(b"y", 2))  # space is back
    await dropping.commit()
    await dropping.shutdown(5.0)
    assert tel.value("exporter_sent_points_total") == 2


async def test_shutdown_with_the_backend_down_keeps_the_disk_backlog_without_retrying(tmp_path: Path) -> None:
    attempts: list[bool] = []  # True for attempts made after shutdown began
    closing = False

    async def down(req: Request) -> None:
        attempts.append(closing)
        raise RetryableError("503", reason="http_503")

    retry = RetryConfig(initial_interval=30.0, max_interval=60.0)  # a long backoff shutdown must not wait out
    sender, tel = make(down, disk(tmp_path), retry=retry)
    await sender.start()
    for i in range(3):
        sender.offer(Request(b"r%d" % i, 1))
    await sender.commit()
    await wait_until(lambda: len(attempts) >= 1)
    closing = True
    await sender.shutdown(600.0)  # returns once the worker has kept its request, not after 600 s
    assert attempts.count(True) <= 1  # at most the one attempt that was already due
    assert tel.value("exporter_dropped_points_total") == 0
    seen: list[bytes] = []

    async def up(req: Request) -> None:
        seen.append(req.payload)

    again, _ = make(up, disk(tmp_path))
    await again.start()
    await again.shutdown(5.0)
    assert seen == [b"r0", b"r1", b"r2"]
