"""The shared test helpers of tests/conftest.py: the sink, the bounded waits, free ports, Settings."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time

import pytest

from agent.component import Backpressure, ComponentId, ComponentKind
from agent.model import Kind, MetricBatch, Point, SpanBatch
from agent.telemetry import Telemetry
from tests.conftest import Sink, component_settings, free_port, wait_until, wait_until_sync


def batch(*values: float, name: str = "m") -> MetricBatch:
    return MetricBatch(tuple(Point(name, Kind.SUM, (), 1, value=v) for v in values))


async def test_the_sink_keeps_batches_in_order_and_reads_their_points() -> None:
    sink = Sink()
    first, second, spans = batch(1, 2), batch(3, name="n"), SpanBatch(())
    for b in (first, spans, second):
        await sink.consume(b)
    assert sink.batches == [first, spans, second] and sink.calls == 3
    assert [p.value for p in sink.points()] == [1, 2, 3]
    assert sink.values() == [1, 2, 3] and sink.values("n") == [3]
    assert sink.total("m") == 3


async def test_the_sink_refuses_while_told_to_and_counts_each_call() -> None:
    sink = Sink(refuse=True, reason="memory_limit", retry_after_s=1.5)
    with pytest.raises(Backpressure) as info:
        await sink.consume(batch(1))
    assert (info.value.reason, info.value.retry_after_s) == ("memory_limit", 1.5)
    sink.refuse = False
    await sink.consume(batch(2))
    assert sink.values() == [2] and sink.calls == 2


async def test_the_sink_refuses_a_number_of_times_then_takes() -> None:
    sink = Sink(refuse_times=2)
    for _ in range(2):
        with pytest.raises(Backpressure) as info:
            await sink.consume(batch(1))
        assert info.value.reason == "queue_full" and info.value.retry_after_s is None
    await sink.consume(batch(1))
    assert sink.values() == [1] and sink.calls == 3


async def test_a_failing_sink_raises_what_is_not_backpressure() -> None:
    with pytest.raises(RuntimeError):
        await Sink(fail=True).consume(batch(1))


async def test_wait_until_returns_the_first_truthy_value_of_a_plain_or_async_condition() -> None:
    seen: list[int] = []

    def later() -> list[int]:
        seen.append(len(seen))
        return seen if len(seen) == 3 else []

    assert await wait_until(later) == [0, 1, 2]
    event = asyncio.Event()
    asyncio.get_running_loop().call_soon(event.set)

    async def is_set() -> str:
        return "set" if event.is_set() else ""

    assert await wait_until(is_set) == "set"


async def test_wait_until_fails_naming_what_never_happened() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.05 s waiting for the moon"):
        await wait_until(lambda: False, "the moon", timeout_s=0.05)


def test_wait_until_sync_sees_what_a_thread_does_and_fails_naming_what_never_happened() -> None:
    done = threading.Event()
    thread = threading.Thread(target=done.set)
    thread.start()
    assert wait_until_sync(done.is_set, "the thread") is True
    thread.join()
    with pytest.raises(AssertionError, match="waiting for the thread to stop"):
        wait_until_sync(lambda: None, "the thread to stop", timeout_s=0.05)


def test_wait_until_sync_retries_the_errors_it_is_told_to_and_names_the_last() -> None:
    calls: list[float] = []

    def peer() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionRefusedError("not up yet")
        return "up"

    assert wait_until_sync(peer, "the peer", retry_on=(OSError,), every_s=0.05) == "up"
    assert all(b - a >= 0.05 for a, b in itertools.pairwise(calls))  # polled every every_s

    def down() -> str:
        raise ConnectionRefusedError("nothing listens")

    with pytest.raises(AssertionError, match=r"waiting for the peer \(last error: ConnectionRefusedError"):
        wait_until_sync(down, "the peer", timeout_s=0.05, retry_on=(OSError,))


def test_wait_until_sync_ends_at_an_error_it_is_not_told_to_retry_or_an_assertion() -> None:
    def broken() -> bool:
        raise ValueError("a bug in the check")

    with pytest.raises(ValueError, match="a bug in the check"):
        wait_until_sync(broken, retry_on=(OSError,))

    def asserts() -> bool:
        raise AssertionError("more arrived than was sent")

    with pytest.raises(AssertionError, match="more arrived than was sent"):
        wait_until_sync(asserts, retry_on=(Exception,))


@pytest.mark.parametrize(
    ("kind", "host"),
    [(socket.SOCK_STREAM, "127.0.0.1"), (socket.SOCK_DGRAM, "127.0.0.1"), (socket.SOCK_STREAM, "::1")],
)
def test_free_port_can_be_bound(kind: socket.SocketKind, host: str) -> None:
    port = free_port(kind, host)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
        s.bind((host, port))
        assert s.getsockname()[1] == port


def test_component_settings_name_the_component_its_telemetry_and_logger() -> None:
    tel = Telemetry()
    plain = component_settings(tel, ComponentKind.PROCESSOR, "batch")
    assert plain.id == ComponentId("batch") and plain.kind is ComponentKind.PROCESSOR
    assert (plain.telemetry.telemetry, plain.telemetry.kind, plain.telemetry.id) == (
        tel,
        "processor",
        "batch",
    )
    assert plain.logger.name == "test.batch"
    named = component_settings(
        tel,
        ComponentKind.EXPORTER,
        "otlp/b",
        telemetry_id="otlp/b@metrics",
        logger="test.sender",
        shutdown_timeout_s=1.0,
    )
    assert named.id == ComponentId("otlp", "b") and named.telemetry.id == "otlp/b@metrics"
    assert named.logger.name == "test.sender" and named.shutdown_timeout_s == 1.0
