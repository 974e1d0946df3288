"""A disk queue on ``full_policy: block`` takes an admitted batch whole (agent.sending.Sender with
``storage: disk``, behind the service's agent.service.Fanout): a batch that encodes into several
requests and was admitted while the queue had room for one goes to disk entirely, past ``max_bytes``
if need be, instead of being refused after some of its requests were appended (which a client's
resend would duplicate); the next batch is then refused at admission, before anything is taken."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from agent.component import Backpressure, ComponentKind
from agent.diskqueue import (
    AppendResult,
    DiskFull,
    Partition,
    PartitionOptions,
    QueueFull,
    RecordTooLarge,
)
from agent.model import Kind, MetricBatch, Point
from agent.sending import QueueConfig, Request, RetryConfig, Sender
from agent.service import Fanout
from agent.telemetry import Telemetry
from tests.conftest import component_settings, wait_until

PAYLOAD_BYTES = 1000
MAX_BYTES = 64 * 1024
BATCH_REQUESTS = 8


class HeldBackend:
    """Keeps each payload once sent; while closed every send waits, so nothing leaves the queue."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.open = asyncio.Event()

    async def send(self, request: Request) -> None:
        await self.open.wait()
        self.got.append(request.payload)


class DiskExporter:
    """An exporter's consume: one request per point (the point's name padded to PAYLOAD_BYTES)."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    async def consume(self, batch: MetricBatch) -> None:
        for p in batch.points:
            self.sender.offer(Request(p.name.encode().ljust(PAYLOAD_BYTES, b"."), 1))
        await self.sender.commit()


def batch(*names: str) -> MetricBatch:
    return MetricBatch(tuple(Point(n, Kind.GAUGE, (), 1, value=1.0) for n in names))


async def test_an_admitted_batch_goes_to_disk_whole_and_the_next_is_refused_at_admission(
    tmp_path: Path,
) -> None:
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.EXPORTER, "disk", logger="test.disk_admitted")
    backend = HeldBackend()
    queue = QueueConfig(storage="disk", directory=str(tmp_path), max_bytes=MAX_BYTES, full_policy="block")  # type: ignore[arg-type]
    sender = Sender(settings, backend.send, queue, RetryConfig(), 30.0, rng=random.Random(1))
    await sender.start()
    try:
        fanout = Fanout([DiskExporter(sender)], [settings.admission])
        part = sender._part
        assert part is not None

        # Fill the queue one request at a time until a batch of BATCH_REQUESTS would no longer fit
        # (segment headers included), while one request still does: the batch is then admitted.
        sent: list[str] = []
        record_bytes = 0
        while part.used_bytes + BATCH_REQUESTS * (record_bytes + 64) <= MAX_BYTES:
            sent.append(f"fill{len(sent)}")
            await fanout.consume(batch(sent[-1]))
            record_bytes = part.stats.appended_bytes // part.stats.appended_records
        assert sender.refusal() is None
        assert part.used_bytes + BATCH_REQUESTS * record_bytes > MAX_BYTES

        many = [f"many{i}" for i in range(BATCH_REQUESTS)]
        records = part.records
        await fanout.consume(batch(*many))  # admitted: no Backpressure part-way
        sent += many
        assert part.records == records + BATCH_REQUESTS
        assert part.used_bytes > MAX_BYTES  # past max_bytes by less than the batch
        assert part.used_bytes - MAX_BYTES < BATCH_REQUESTS * record_bytes
        assert tel.value("exporter_dropped_points_total", reason="queue_full") == 0

        # Now full: the next batch is refused before anything of it is appended.
        with pytest.raises(Backpressure) as refused:
            await fanout.consume(batch("next1", "next2"))
        assert refused.value.reason == "queue_full"
        assert part.records == records + BATCH_REQUESTS

        backend.open.set()
        await wait_until(lambda: len(backend.got) >= len(sent), "every request sent")
        await wait_until(lambda: part.records == 0, "every request acked")
        got = [p.rstrip(b".").decode() for p in backend.got]
        assert sorted(got) == sorted(sent)  # each exactly once, nothing of the refused batch
    finally:
        backend.open.set()
        await sender.shutdown(5.0)


async def test_a_full_filesystem_still_refuses_an_admitted_batch_part_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC is a real limit, not a budget: the request that meets it is refused (``disk_full``)
    even inside an admitted batch; what was appended before it stays (and is delivered)."""
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.EXPORTER, "disk", logger="test.disk_admitted")
    backend = HeldBackend()
    queue = QueueConfig(storage="disk", directory=str(tmp_path), full_policy="block")
    sender = Sender(settings, backend.send, queue, RetryConfig(), 30.0, rng=random.Random(1))
    await sender.start()
    try:
        real_append = Partition.append
        calls = 0

        def second_fails(self: Partition, *args: Any, **kw: Any) -> AppendResult:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise DiskFull("ENOSPC")
            return real_append(self, *args, **kw)

        monkeypatch.setattr(Partition, "append", second_fails)
        fanout = Fanout([DiskExporter(sender)], [settings.admission])
        with pytest.raises(Backpressure) as refused:
            await fanout.consume(batch("a", "b", "c"))
        assert refused.value.reason == "disk_full"
        monkeypatch.undo()
        assert sender._part is not None and sender._part.records == 1
        backend.open.set()
        await wait_until(lambda: len(backend.got) == 1, "a sent")
        assert backend.got[0].rstrip(b".") == b"a"
    finally:
        backend.open.set()
        await sender.shutdown(5.0)


def test_a_partition_takes_an_admitted_record_past_max_bytes_and_refuses_others(tmp_path: Path) -> None:
    opts = PartitionOptions(max_bytes=16 * 1024, full_policy="block")
    with Partition.open(str(tmp_path / "p"), opts) as p:
        while True:
            try:
                p.append(b"x" * PAYLOAD_BYTES)
            except QueueFull:
                break
        refused = p.stats.refused_full
        p.append(b"y" * PAYLOAD_BYTES, admitted=True)
        p.append(b"z" * PAYLOAD_BYTES, admitted=True)
        assert p.used_bytes > opts.max_bytes and p.stats.refused_full == refused
        with pytest.raises(QueueFull):
            p.append(b"w" * PAYLOAD_BYTES)
        with pytest.raises(RecordTooLarge):  # a record that could never fit is still refused
            p.append(b"v" * opts.max_bytes, admitted=True)
    with Partition.open(str(tmp_path / "p"), opts) as p:
        payloads = [r.payload[:1] for r in p.iter_unacked()]
        assert payloads[-2:] == [b"y", b"z"] and b"w" not in payloads and not p.report.damaged
