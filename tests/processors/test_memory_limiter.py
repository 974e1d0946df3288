"""The memory limiter: limits from config or the cgroup, refusal above the soft limit, recovery."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent.component import Backpressure, ComponentKind
from agent.model import Kind, LogBatch, MetricBatch, Point, SpanBatch
from agent.telemetry import Telemetry
from processors.memory_limiter import (
    MemoryLimiter,
    MemoryLimiterConfig,
    cgroup_limit_bytes,
    read_rss_bytes,
    total_memory_bytes,
)
from tests.conftest import Sink, component_settings, wait_until

MiB = 1 << 20
GiB = 1 << 30


class Memory:
    """A fake RSS: ``rss`` is what the reader returns; ``collect`` can lower it like a real gc would."""

    def __init__(self, rss: int) -> None:
        self.rss = rss
        self.collects = 0
        self.after_collect: int | None = None
        self.fail = False

    def read(self) -> int:
        if self.fail:
            raise OSError("no /proc here")
        return self.rss

    def collect(self) -> None:
        self.collects += 1
        if self.after_collect is not None:
            self.rss = self.after_collect


def make(
    config: MemoryLimiterConfig,
    memory: Memory,
    *,
    cgroup: list[str] | None = None,
    physical: int = 16 * GiB,
    sink: Sink | None = None,
) -> tuple[MemoryLimiter, Sink, Telemetry]:
    assert config.validate() == []
    tel = Telemetry()
    sink = sink or Sink()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "memory_limiter")
    limiter = MemoryLimiter(
        settings,
        config,
        sink,
        read_rss=memory.read,
        cgroup_paths=cgroup or [],
        physical_memory=physical,
        collect=memory.collect,
    )
    return limiter, sink, tel


BATCH = MetricBatch((Point("a", Kind.GAUGE, (), 1), Point("b", Kind.GAUGE, (), 1)), {"tenant": "t"})
FIXED = MemoryLimiterConfig(limit=1000 * MiB, spike_limit=200 * MiB)  # type: ignore[arg-type]


async def test_soft_limit_refuses_and_collects_then_recovers(caplog: pytest.LogCaptureFixture) -> None:
    memory = Memory(100 * MiB)
    limiter, sink, tel = make(FIXED, memory)
    assert (limiter.soft_bytes, limiter.hard_bytes) == (800 * MiB, 1000 * MiB)
    limiter.check()
    await limiter.consume(BATCH)
    assert sink.batches == [BATCH] and memory.collects == 0

    memory.rss = 900 * MiB
    with caplog.at_level(logging.INFO, logger="test.memory_limiter"):
        limiter.check()
    assert limiter.refusing and memory.collects == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # soft only: no warning
    with pytest.raises(Backpressure) as info:
        await limiter.consume(BATCH)
    assert info.value.reason == "memory_limit" and info.value.retry_after_s == FIXED.check_interval
    assert len(sink.batches) == 1
    assert tel.value("processor_refused_points_total", reason="memory_limit") == 2
    assert tel.value("memory_limiter_refusing") == 1.0
    assert tel.value("memory_limiter_rss_bytes") == 900 * MiB

    memory.rss = 100 * MiB
    limiter.check()
    await limiter.consume(BATCH)
    assert len(sink.batches) == 2 and not limiter.refusing
    assert tel.value("processor_incoming_points_total") == tel.value("processor_outgoing_points_total") == 4


async def test_hard_limit_warns_once_per_crossing(caplog: pytest.LogCaptureFixture) -> None:
    memory = Memory(1100 * MiB)
    limiter, _, _ = make(FIXED, memory)
    with caplog.at_level(logging.WARNING, logger="test.memory_limiter"):
        limiter.check()
        limiter.check()
        memory.rss = 100 * MiB
        limiter.check()
        memory.rss = 1200 * MiB
        limiter.check()
    warnings = [r for r in caplog.records if "hard limit" in r.getMessage()]
    assert len(warnings) == 2
    with pytest.raises(Backpressure):
        await limiter.consume(BATCH)


async def test_collect_that_frees_enough_keeps_data_flowing() -> None:
    memory = Memory(900 * MiB)
    memory.after_collect = 500 * MiB
    limiter, sink, _ = make(FIXED, memory)
    limiter.check()
    assert memory.collects == 1 and not limiter.refusing
    await limiter.consume(BATCH)
    assert sink.batches == [BATCH]


def test_spike_defaults_to_a_fifth_of_the_limit() -> None:
    limiter, _, _ = make(MemoryLimiterConfig(limit=500 * MiB), Memory(0))  # type: ignore[arg-type]
    assert (limiter.soft_bytes, limiter.hard_bytes) == (400 * MiB, 500 * MiB)


def test_defaults_come_from_the_cgroup_v2_limit(tmp_path: Path) -> None:
    v2 = tmp_path / "memory.max"
    v2.write_text("1000000000\n")
    limiter, _, _ = make(MemoryLimiterConfig(), Memory(0), cgroup=[str(v2)])
    assert limiter.total_bytes == 1_000_000_000
    assert limiter.hard_bytes == 800_000_000  # 80 %
    assert limiter.soft_bytes == 600_000_000  # hard - 20 % of the limit


def test_cgroup_v1_and_unlimited(tmp_path: Path) -> None:
    v2 = tmp_path / "memory.max"
    v1 = tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")
    v1.write_text("536870912\n")
    # v2 says "no limit": that is the answer, v1 is not consulted
    assert cgroup_limit_bytes([str(v2), str(v1)]) is None
    assert cgroup_limit_bytes([str(tmp_path / "missing"), str(v1)]) == 512 * MiB
    # v1 writes a huge number for "no limit": physical memory wins
    v1.write_text("9223372036854771712\n")
    assert total_memory_bytes([str(v1)], physical=8 * GiB) == 8 * GiB
    assert total_memory_bytes([str(tmp_path / "missing")], physical=8 * GiB) == 8 * GiB
    limiter, _, _ = make(
        MemoryLimiterConfig(limit_percentage=50, spike_limit_percentage=10),
        Memory(0),
        cgroup=[str(v2)],
        physical=10 * GiB,
    )
    assert (limiter.soft_bytes, limiter.hard_bytes) == (4 * GiB, 5 * GiB)


async def test_background_check_and_lifecycle() -> None:
    memory = Memory(100 * MiB)
    config = MemoryLimiterConfig(check_interval=0.01, limit=1000 * MiB)  # type: ignore[arg-type]
    limiter, _, tel = make(config, memory)
    await limiter.shutdown()  # safe before start
    limiter, _, tel = make(config, memory)
    await limiter.start()
    assert tel.value("memory_limiter_rss_bytes") == 100 * MiB  # checked at start, not one interval later
    memory.rss = 2000 * MiB
    await wait_until(lambda: limiter.refusing, "the background check")
    assert tel.value("memory_limiter_hard_limit_bytes") == 1000 * MiB
    await limiter.shutdown()
    await limiter.shutdown()
    assert tel.value("memory_limiter_hard_limit_bytes") == 0  # gauges removed with the component


async def test_unreadable_rss_turns_the_limits_off() -> None:
    memory = Memory(900 * MiB)
    limiter, sink, _ = make(FIXED, memory)
    limiter.check()
    assert limiter.refusing
    memory.fail = True
    limiter.check()
    assert not limiter.refusing
    await limiter.consume(BATCH)
    assert sink.batches == [BATCH]


async def test_downstream_backpressure_propagates() -> None:
    limiter, _, _ = make(FIXED, Memory(0), sink=Sink(refuse=True, retry_after_s=2.0))
    with pytest.raises(Backpressure) as info:
        await limiter.consume(BATCH)
    assert info.value.reason == "queue_full"


async def test_spans_and_logs_pass_and_are_refused_alike() -> None:
    rs = trace_pb2.ResourceSpans()
    rs.scope_spans.add().spans.add(name="s")
    spans = SpanBatch((rs,), span_count=1)
    rl = logs_pb2.ResourceLogs()
    rl.scope_logs.add().log_records.add()
    logs = LogBatch((rl,), record_count=1)
    memory = Memory(0)
    limiter, sink, tel = make(FIXED, memory)
    await limiter.consume(spans)
    await limiter.consume(logs)
    assert sink.batches[0] is spans and sink.batches[1] is logs
    memory.rss = 900 * MiB
    limiter.check()
    for batch in (spans, logs):
        with pytest.raises(Backpressure):
            await limiter.consume(batch)
    assert tel.value("processor_refused_points_total") == 2


def test_reads_this_process() -> None:
    assert read_rss_bytes() > MiB


@pytest.mark.parametrize(
    ("config", "path"),
    [
        (MemoryLimiterConfig(check_interval=0.0), "check_interval"),  # type: ignore[arg-type]
        (MemoryLimiterConfig(limit=100, spike_limit=100), "spike_limit"),  # type: ignore[arg-type]
        (MemoryLimiterConfig(spike_limit=100), "spike_limit"),  # type: ignore[arg-type]
        (MemoryLimiterConfig(limit_percentage=0), "limit_percentage"),
        (MemoryLimiterConfig(limit_percentage=50, spike_limit_percentage=50), "spike_limit_percentage"),
    ],
)
def test_validation(config: MemoryLimiterConfig, path: str) -> None:
    assert path in [p for p, _ in config.validate()]
    assert MemoryLimiterConfig().validate() == []


async def test_crossing_the_soft_limit_frees_frozen_cyclic_garbage() -> None:
    # The agent freezes long-lived objects (agent/gcpolicy.py); a cycle that became garbage after it was
    # frozen is never found by gc.collect. The first check over the soft limit thaws and collects it.
    import gc
    import weakref

    class Node:
        def __init__(self) -> None:
            self.me = self

    cycle = Node()
    gone = weakref.ref(cycle)
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "memory_limiter")
    memory = Memory(950 * MiB)
    limiter = MemoryLimiter(settings, FIXED, Sink(), read_rss=memory.read, cgroup_paths=[])
    gc.freeze()
    try:
        del cycle
        gc.collect()
        assert gone() is not None  # frozen: the ordinary collection does not see it
        limiter.check()
        assert limiter.refusing
        assert gone() is None
    finally:
        gc.unfreeze()
