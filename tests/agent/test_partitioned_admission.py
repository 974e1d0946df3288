"""agent.partitioned: the one admission check of an exporter's tenants' queues (PartitionedSender.refusal
registered in Settings.admission) and PartitionedSender.admitting for batches no fan-out admitted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from agent.component import Backpressure, ComponentKind, Settings, admitted
from agent.model import Batch, Kind, MetricBatch, Point
from agent.partitioned import PartitionedSender
from agent.sending import QueueConfig, Request, RetryConfig
from agent.telemetry import Telemetry
from tests.conftest import component_settings, wait_until

BLOCK = QueueConfig(queue_size=1, full_policy="block")
FAST = RetryConfig(initial_interval=0.001, max_interval=0.01, max_elapsed_time=5.0)


class Stuck:
    """A backend whose sends wait until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sending = 0

    async def send(self, request: Request, tenant: str | None = None) -> None:
        self.sending += 1
        await self.release.wait()


def point(tenant: str) -> Point:
    return Point("m", Kind.GAUGE, (("t", tenant),), time.time_ns(), value=1.0)


def tenants(batch: Batch) -> Iterator[str | None]:
    assert isinstance(batch, MetricBatch)
    return (next((v for k, v in p.labels if k == "t"), None) for p in batch.points)


def settings() -> Settings:
    return component_settings(Telemetry(), ComponentKind.EXPORTER, "otlp_http", shutdown_timeout_s=0.1)


async def full_tenant(senders: PartitionedSender, backend: Stuck, tenant: str) -> None:
    """``tenant``'s queue (size 1) full: one request being sent, one waiting."""
    sender = await senders.get(tenant)
    assert sender is not None
    sender.offer(Request(b"1", 1))
    await wait_until(lambda: backend.sending == 1, "the first request taken by the sender")
    sender.offer(Request(b"2", 1))


async def test_a_batch_naming_a_full_tenant_is_refused_and_others_pass() -> None:
    backend, own = Stuck(), settings()
    senders = PartitionedSender(own, backend.send, BLOCK, FAST, 5.0, max_partitions=10, keys_of=tenants)
    await senders.start()
    try:
        await full_tenant(senders, backend, "a")
        assert await senders.get("b") is not None
        for batch in (MetricBatch((point("b"), point("a"))), MetricBatch((point("a"),))):
            refused = own.admission.refusal(batch)
            assert isinstance(refused, Backpressure) and refused.reason == "queue_full"
        assert own.admission.refusal(MetricBatch((point("b"), point("c")))) is None
        assert own.admission.refusal(MetricBatch((point("b"),))) is None
    finally:
        backend.release.set()
        await senders.shutdown(0.1)
    # Stopped: its check is gone from the exporter's admission (a reload's successor adds its own).
    assert own.admission.refusal(MetricBatch((point("a"),))) is None


async def test_admitting_refuses_with_nothing_taken_or_admits_the_whole_batch() -> None:
    backend, own = Stuck(), settings()
    senders = PartitionedSender(own, backend.send, BLOCK, FAST, 5.0, max_partitions=10, keys_of=tenants)
    await senders.start()
    try:
        await full_tenant(senders, backend, "a")
        with pytest.raises(Backpressure), senders.admitting(MetricBatch((point("b"), point("a")))):
            pytest.fail("a refused batch must not be handed on")
        with senders.admitting(MetricBatch((point("b"),))):
            assert admitted()
            sender = await senders.get("b")
            assert sender is not None
            for payload in (b"1", b"2", b"3"):  # an admitted batch is taken whole, past the size
                sender.offer(Request(payload, 1))
        assert not admitted()
    finally:
        backend.release.set()
        await senders.shutdown(0.1)


async def test_without_block_or_a_way_to_find_the_tenants_no_check_is_registered() -> None:
    for queue, keys_of in ((QueueConfig(queue_size=1), tenants), (BLOCK, None)):
        backend, own = Stuck(), settings()
        senders = PartitionedSender(own, backend.send, queue, FAST, 5.0, max_partitions=10, keys_of=keys_of)
        await senders.start()
        try:
            await full_tenant(senders, backend, "a")
            # Only the default sender's own check (block) is there: tenant a's queue is not asked.
            assert own.admission.refusal(MetricBatch((point("a"),))) is None
        finally:
            backend.release.set()
            await senders.shutdown(0.1)
