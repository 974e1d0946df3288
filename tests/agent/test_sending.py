from __future__ import annotations

import asyncio
import logging
import random

from agent.component import ComponentId, ComponentKind, PermanentError, RetryableError, Settings
from agent.sending import QueueConfig, Request, RetryConfig, Sender
from agent.telemetry import ComponentTelemetry, Telemetry

FAST = RetryConfig(initial_interval=0.001, max_interval=0.01, max_elapsed_time=5.0)


def make(send, queue: QueueConfig | None = None, retry: RetryConfig = FAST, timeout_s: float = 5.0):
    tel = Telemetry()
    settings = Settings(
        id=ComponentId("test"),
        kind=ComponentKind.EXPORTER,
        telemetry=ComponentTelemetry(tel, "exporter", "test"),
        logger=logging.getLogger("test.sender"),
    )
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
    sender.start()
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
    sender.start()
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
    sender.start()
    sender.offer(Request(b"x", 1))
    await sender.shutdown(5.0)
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.3  # a lower bound only: never retried before the server's delay


async def test_gives_up_after_max_elapsed_time() -> None:
    async def send(req: Request) -> None:
        raise ConnectionRefusedError("nobody home")

    retry = RetryConfig(initial_interval=0.001, max_interval=0.002, max_elapsed_time=0.05)
    sender, tel = make(send, retry=retry)
    sender.start()
    sender.offer(Request(b"x", 5))
    await sender.shutdown(5.0)
    assert tel.value("exporter_dropped_points_total", reason="retries_exhausted") == 5
    assert tel.value("exporter_failed_points_total", reason="connection_error") >= 5


async def test_full_queue_drops_oldest_and_counts() -> None:
    gate = asyncio.Event()
    seen: list[bytes] = []

    async def send(req: Request) -> None:
        await gate.wait()
        seen.append(req.payload)

    sender, tel = make(send, queue=QueueConfig(queue_size=2))
    sender.start()
    sender.offer(Request(b"1", 1))
    await asyncio.sleep(0.01)  # the worker takes 1 and waits on the gate
    for p in (b"2", b"3", b"4"):
        sender.offer(Request(p, 1))
    assert tel.value("exporter_dropped_points_total", reason="queue_full") == 1
    gate.set()
    await sender.shutdown(5.0)
    assert seen == [b"1", b"3", b"4"]


async def test_full_queue_drop_newest() -> None:
    gate = asyncio.Event()
    seen: list[bytes] = []

    async def send(req: Request) -> None:
        await gate.wait()
        seen.append(req.payload)

    sender, tel = make(send, queue=QueueConfig(queue_size=1, full_policy="drop_newest"))
    sender.start()
    sender.offer(Request(b"1", 1))
    await asyncio.sleep(0.01)
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
    sender.start()
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
            await asyncio.sleep(10)

    sender, tel = make(send, timeout_s=0.05)
    sender.start()
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
