"""agent.partitioned.PartitionedSender: one sender per partition key beside the exporter's own."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.component import ComponentKind, RetryableError, Settings
from agent.partitioned import PartitionedSender
from agent.sending import QueueConfig, Request, RetryConfig
from agent.telemetry import Telemetry
from tests.conftest import component_settings

FAST = RetryConfig(initial_interval=0.001, max_interval=0.01, max_elapsed_time=5.0)


class Backend:
    """Records (tenant, payload) of each request; refuses every request while ``down``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str | None, bytes]] = []
        self.down = False

    async def send(self, request: Request, tenant: str | None = None) -> None:
        if self.down:
            raise RetryableError("503", reason="http_503")
        self.sent.append((tenant, request.payload))


def _settings(tel: Telemetry) -> Settings:
    return component_settings(tel, ComponentKind.EXPORTER, "prometheus_remote_write", shutdown_timeout_s=5.0)


def _make(
    backend: Backend, queue: QueueConfig | None = None, max_partitions: int = 10
) -> tuple[PartitionedSender, Telemetry]:
    tel = Telemetry()
    senders = PartitionedSender(
        _settings(tel), backend.send, queue or QueueConfig(), FAST, 5.0, max_partitions=max_partitions
    )
    return senders, tel


async def test_each_key_has_its_own_sender_which_sends_with_its_key() -> None:
    backend = Backend()
    senders, _ = _make(backend)
    await senders.start()
    a, again, b = await asyncio.gather(senders.get("a"), senders.get("a"), senders.get("b"))
    assert a is not None and a is again and b is not None and a is not b and a is not senders.default
    a.offer(Request(b"for-a", 1))
    b.offer(Request(b"for-b", 1))
    senders.default.offer(Request(b"nobodys", 1))
    await senders.shutdown(5.0)
    assert sorted(backend.sent, key=repr) == sorted(
        [("a", b"for-a"), ("b", b"for-b"), (None, b"nobodys")], key=repr
    )


async def test_no_sender_beyond_the_cap_or_once_closing() -> None:
    senders, _ = _make(Backend(), max_partitions=2)
    await senders.start()
    assert await senders.get("a") is not None and await senders.get("b") is not None
    assert await senders.get("c") is None
    assert await senders.get("a") is not None  # existing ones stay
    senders.stop_opening()
    assert senders.closing
    assert await senders.get("d") is None
    await senders.shutdown(5.0)
    await senders.shutdown(5.0)  # idempotent


async def test_shutdown_before_start_is_safe() -> None:
    senders, _ = _make(Backend())
    await senders.shutdown(1.0)


async def test_a_tenants_disk_backlog_drains_at_the_next_start(tmp_path: Path) -> None:
    queue = QueueConfig(storage="disk", directory=str(tmp_path))
    backend = Backend()
    backend.down = True
    first, _ = _make(backend, queue)
    await first.start()
    sender = await first.get("team-a")
    assert sender is not None
    sender.offer(Request(b"kept", 3))
    await sender.commit()
    await first.shutdown(0.2)  # the backend is down: the record stays on disk
    assert backend.sent == []

    backend.down = False
    second, tel = _make(backend, queue)
    await second.start()
    await second.open_backlogs()  # without a batch of team-a's
    await second.shutdown(5.0)
    assert backend.sent == [("team-a", b"kept")]
    assert tel.value("exporter_sent_points_total") == 3


async def test_sync_hooks_reach_partitions_opened_later(tmp_path: Path) -> None:
    senders, _ = _make(Backend(), QueueConfig(storage="disk", directory=str(tmp_path)))
    synced: list[str] = []
    await senders.start()
    senders.sync_first(lambda: synced.append("state"))
    sender = await senders.get("late")
    assert sender is not None
    sender.offer(Request(b"x", 1))
    await sender.commit()  # fsync: batch — the hook runs before the queue's sync
    assert synced
    await senders.shutdown(5.0)


async def test_hand_over_and_adopt_keep_each_keys_requests_in_its_queue() -> None:
    backend = Backend()
    backend.down = True
    old, _ = _make(backend)
    await old.start()
    a = await old.get("a")
    assert a is not None
    a.offer(Request(b"a1", 2))
    old.default.offer(Request(b"d1", 1))
    queued = await old.hand_over()
    assert {key: [r.payload for r in rs] for key, rs in queued.items()} == {"a": [b"a1"], None: [b"d1"]}

    backend.down = False
    new, _ = _make(backend)
    await new.start()
    converted: list[int] = []

    async def convert(requests: list[Request]) -> list[Request]:
        converted.append(len(requests))
        return requests

    await new.adopt(queued, partitioned=True, convert=convert)
    await new.shutdown(5.0)
    assert sorted(backend.sent, key=repr) == sorted([("a", b"a1"), (None, b"d1")], key=repr)
    assert converted == [1, 1]


async def test_adopt_without_partitions_drops_and_counts_a_keys_requests() -> None:
    backend = Backend()
    senders, tel = _make(backend)
    await senders.start()
    await senders.adopt({"a": [Request(b"a1", 4)], None: [Request(b"d1", 1)]}, partitioned=False)
    await senders.shutdown(5.0)
    assert backend.sent == [(None, b"d1")]
    assert tel.value("exporter_dropped_points_total", reason="tenant_routing_changed") == 4
