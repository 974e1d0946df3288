"""The batch processor: size and timeout triggers, splitting, per-context buffers, flush, backpressure."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent.component import Backpressure, ComponentKind
from agent.model import Batch, Kind, LogBatch, MetricBatch, Point, SpanBatch
from agent.telemetry import Telemetry
from processors.batch import BatchConfig, BatchProcessor, factory
from tests.conftest import Sink, component_settings, wait_until


def make(config: BatchConfig, sink: Sink | None = None) -> tuple[BatchProcessor, Sink, Telemetry]:
    assert config.validate() == []
    tel = Telemetry()
    sink = sink or Sink()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "batch")
    return BatchProcessor(settings, config, sink), sink, tel


def points(*values: float, ctx: dict[str, str] | None = None) -> MetricBatch:
    return MetricBatch(tuple(Point("m", Kind.SUM, (), 1, value=v) for v in values), ctx or {})


LONG = 3600.0  # a timeout that never fires during a test


async def test_size_trigger_sends_everything_held() -> None:
    proc, sink, tel = make(BatchConfig(send_batch_size=3, timeout=LONG))
    await proc.start()
    await proc.consume(points(1, 2))
    assert sink.batches == []
    assert tel.value("processor_batch_buffered_points") == 2
    await proc.consume(points(3, 4))
    assert [len(b) for b in sink.batches] == [4]  # size is a trigger, not a cap
    assert sink.values() == [1, 2, 3, 4]
    assert tel.value("processor_batch_sends_total", trigger="size") == 1
    assert tel.value("processor_incoming_points_total") == tel.value("processor_outgoing_points_total") == 4
    await proc.shutdown()


async def test_max_size_splits() -> None:
    proc, sink, _ = make(BatchConfig(send_batch_size=3, send_batch_max_size=3, timeout=LONG))
    await proc.start()
    await proc.consume(points(1, 2))
    await proc.consume(points(3, 4, 5, 6, 7))
    assert [len(b) for b in sink.batches] == [3, 3, 1]
    assert sink.values() == [1, 2, 3, 4, 5, 6, 7]
    await proc.shutdown()


async def test_timeout_sends_a_small_batch() -> None:
    proc, sink, tel = make(BatchConfig(send_batch_size=100, timeout=0.02))
    await proc.start()
    await proc.consume(points(1))
    await proc.consume(points(2))
    await wait_until(lambda: len(sink.values()) == 2)
    assert sink.values() == [1, 2]
    assert tel.value("processor_batch_sends_total", trigger="timeout") >= 1
    await proc.shutdown()


async def test_contexts_are_kept_apart() -> None:
    proc, sink, _ = make(BatchConfig(send_batch_size=100, timeout=LONG))
    await proc.start()
    a, b = {"x-scope-orgid": "a"}, {"x-scope-orgid": "b"}
    await proc.consume(points(1, ctx=a))
    await proc.consume(points(2, ctx=b))
    await proc.consume(points(3, ctx=dict(a)))  # equal content, another dict: same buffer
    await proc.shutdown()
    got = sorted(
        (dict(batch.context)["x-scope-orgid"], [p.value for p in batch.points]) for batch in sink.batches
    )  # type: ignore[union-attr]
    assert got == [("a", [1, 3]), ("b", [2])]


async def test_shutdown_flushes_and_is_idempotent() -> None:
    proc, sink, tel = make(BatchConfig(send_batch_size=100, timeout=LONG))
    await proc.shutdown()  # safe before start
    proc, sink, tel = make(BatchConfig(send_batch_size=100, timeout=LONG))
    await proc.start()
    await proc.consume(points(1, 2, 3))
    await proc.shutdown()
    await proc.shutdown()
    assert sink.values() == [1, 2, 3]
    assert tel.value("processor_batch_sends_total", trigger="shutdown") == 1


async def test_refusal_on_size_trigger_refuses_the_callers_batch_and_keeps_held_data() -> None:
    sink = Sink(retry_after_s=0.01, refuse_times=1)
    proc, _, tel = make(BatchConfig(send_batch_size=3, timeout=LONG), sink)
    await proc.start()
    await proc.consume(points(1, 2))
    with pytest.raises(Backpressure) as info:
        await proc.consume(points(3, 4))
    assert info.value.reason == "queue_full"
    assert tel.value("processor_batch_buffered_points") == 2  # the held points, not the refused ones
    await proc.consume(points(5))  # downstream accepts again
    assert sink.values() == [1, 2, 5]
    await proc.shutdown()


async def test_partial_delivery_keeps_the_rest_without_duplicates() -> None:
    class RefuseSecond(Sink):
        async def consume(self, batch: Batch) -> None:
            self.calls += 1
            if self.calls == 2:
                raise Backpressure("queue_full")
            self.batches.append(batch)

    sink = RefuseSecond()
    proc, _, _ = make(BatchConfig(send_batch_size=3, send_batch_max_size=3, timeout=LONG), sink)
    await proc.start()
    await proc.consume(points(1))
    # chunks [1, 2, 3] (goes) and [4, 5] (refused): part of the caller's batch went, so the call
    # succeeds and [4, 5] stay held.
    await proc.consume(points(2, 3, 4, 5))
    assert sink.values() == [1, 2, 3]
    await proc.shutdown()
    assert sink.values() == [1, 2, 3, 4, 5]


async def test_refusal_on_timeout_is_retried() -> None:
    sink = Sink(retry_after_s=0.01, refuse_times=2)
    proc, _, tel = make(BatchConfig(send_batch_size=100, timeout=0.01), sink)
    await proc.start()
    await proc.consume(points(1, 2))
    await wait_until(lambda: sink.values() == [1, 2])
    assert sink.calls == 3
    assert tel.value("processor_dropped_points_total") == 0
    await proc.shutdown()


async def test_refusal_on_shutdown_is_counted() -> None:
    sink = Sink(retry_after_s=0.01, refuse_times=1)
    proc, _, tel = make(BatchConfig(send_batch_size=100, timeout=LONG), sink)
    await proc.start()
    await proc.consume(points(1, 2))
    await proc.shutdown()
    assert tel.value("processor_dropped_points_total", reason="shutdown") == 2


async def test_other_downstream_errors_drop_the_chunk_and_are_counted() -> None:
    proc, _, tel = make(BatchConfig(send_batch_size=2, timeout=LONG), Sink(fail=True))
    await proc.start()
    await proc.consume(points(1, 2))
    assert tel.value("processor_dropped_points_total", reason="downstream_error") == 2
    assert tel.value("processor_batch_buffered_points") == 0
    await proc.shutdown()


async def test_timeout_zero_passes_through_split() -> None:
    proc, sink, _ = make(BatchConfig(send_batch_size=2, send_batch_max_size=2, timeout=0))
    await proc.start()
    await proc.consume(points(1, 2, 3))
    assert [len(b) for b in sink.batches] == [2, 1]
    refusing = Sink(retry_after_s=0.01, refuse_times=1)
    proc2, _, _ = make(BatchConfig(timeout=0), refusing)
    with pytest.raises(Backpressure):
        await proc2.consume(points(1))
    await proc.shutdown()


async def test_contexts_beyond_the_limit_pass_straight_through() -> None:
    proc, sink, _ = make(BatchConfig(send_batch_size=100, timeout=LONG, max_contexts=1))
    await proc.start()
    await proc.consume(points(1, ctx={"t": "a"}))
    await proc.consume(points(2, ctx={"t": "b"}))
    assert [dict(b.context) for b in sink.batches] == [{"t": "b"}]
    await proc.shutdown()
    assert sink.values() == [2, 1]


# -- spans and logs ----------------------------------------------------------------------------------


def span_batch(n: int, service: str = "checkout") -> SpanBatch:
    rs = trace_pb2.ResourceSpans(schema_url="s1")
    rs.resource.attributes.add(key="service.name").value.string_value = service
    first = rs.scope_spans.add()
    first.scope.name = "a"
    second = rs.scope_spans.add()
    second.scope.name = "b"
    for i in range(n):
        (first if i % 2 == 0 else second).spans.add(name=f"s{i}")
    return SpanBatch((rs,), {"tenant": "t"}, span_count=n)


async def test_spans_are_split_by_span_count_and_input_is_unchanged() -> None:
    proc, sink, tel = make(BatchConfig(send_batch_size=4, send_batch_max_size=4, timeout=LONG))
    await proc.start()
    batch = span_batch(5)
    before = batch.resource_spans[0].SerializeToString()
    await proc.consume(span_batch(1, "other"))
    await proc.consume(batch)
    assert batch.resource_spans[0].SerializeToString() == before
    sizes = [b.span_count for b in sink.batches if isinstance(b, SpanBatch)]
    # the 5-span message is cut where the first chunk is full: chunks of 4 and 2
    assert sizes == [4, 2] and all(b.context == {"tenant": "t"} for b in sink.batches)
    names = []
    for b in sink.batches:
        assert isinstance(b, SpanBatch)
        for rs in b.resource_spans:
            n_spans = sum(len(ss.spans) for ss in rs.scope_spans)
            assert n_spans <= 4
            for ss in rs.scope_spans:
                for s in ss.spans:
                    names.append((rs.resource.attributes[0].value.string_value, ss.scope.name, s.name))
                assert rs.schema_url == "s1" or rs.resource.attributes[0].value.string_value == "other"
    assert sorted(names) == sorted(
        [("other", "a", "s0")] + [("checkout", "a" if i % 2 == 0 else "b", f"s{i}") for i in range(5)]
    )
    assert tel.value("processor_outgoing_points_total") == 6
    await proc.shutdown()


async def test_logs_are_merged_per_context() -> None:
    def log_batch(body: str) -> LogBatch:
        rl = logs_pb2.ResourceLogs()
        rl.scope_logs.add().log_records.add().body.string_value = body
        return LogBatch((rl,), {"tenant": "t"}, record_count=1)

    proc, sink, _ = make(BatchConfig(send_batch_size=10, timeout=LONG))
    await proc.start()
    await proc.consume(log_batch("a"))
    await proc.consume(log_batch("b"))
    await proc.shutdown()
    (out,) = sink.batches
    assert isinstance(out, LogBatch) and out.record_count == 2 and out.context == {"tenant": "t"}
    bodies = [r.body.string_value for rl in out.resource_logs for sl in rl.scope_logs for r in sl.log_records]
    assert bodies == ["a", "b"]


def test_validation() -> None:
    assert BatchConfig().validate() == []
    bad = BatchConfig(send_batch_size=0, timeout=-1.0, send_batch_max_size=-1, max_contexts=0)  # type: ignore[arg-type]
    assert [p for p, _ in bad.validate()] == [
        "send_batch_size",
        "timeout",
        "send_batch_max_size",
        "max_contexts",
    ]
    assert [p for p, _ in BatchConfig(send_batch_size=10, send_batch_max_size=5).validate()] == [
        "send_batch_max_size"
    ]
    assert factory.type == "batch"


async def test_refused_span_batch_is_cut_out_of_split_messages() -> None:
    sink = Sink(retry_after_s=0.01, refuse_times=1)
    proc, _, tel = make(BatchConfig(send_batch_size=3, send_batch_max_size=3, timeout=LONG), sink)
    await proc.start()
    await proc.consume(span_batch(1, "held"))
    # chunks would be [held + 2 spans of the new message], [3 spans]: the first is refused, so the new
    # batch (split across both chunks) is refused whole and only the held span stays.
    with pytest.raises(Backpressure):
        await proc.consume(span_batch(5))
    assert tel.value("processor_batch_buffered_points") == 1
    await proc.consume(span_batch(2, "later"))
    services = [
        rs.resource.attributes[0].value.string_value
        for b in sink.batches
        if isinstance(b, SpanBatch)
        for rs in b.resource_spans
        for ss in rs.scope_spans
        for _ in ss.spans
    ]
    assert services == ["held", "later", "later"]
    await proc.shutdown()


async def test_shutdown_while_the_timer_is_sending_keeps_that_buffer() -> None:
    class StallOnce(Sink):
        """The first send never completes (a slow exporter); later ones are collected."""

        def __init__(self) -> None:
            super().__init__()
            self.entered = asyncio.Event()

        async def consume(self, batch: Batch) -> None:
            if not self.entered.is_set():
                self.entered.set()
                await asyncio.Event().wait()
            await super().consume(batch)

    sink = StallOnce()
    proc, _, tel = make(BatchConfig(send_batch_size=100, timeout=0.01), sink)
    await proc.start()
    await proc.consume(points(1, 2))
    await sink.entered.wait()  # the timer took the buffer out and is inside downstream's consume
    await proc.shutdown()  # cancels the timer mid-send: the buffer must still be flushed
    assert sink.values() == [1, 2]
    assert tel.value("processor_outgoing_points_total") == 2


async def test_shutdown_ends_when_a_new_buffer_wakes_the_timer_as_it_is_cancelled() -> None:
    # A consume that opens a buffer wakes the timer, and shutdown cancels the timer in the same loop
    # turn: its timed wait ends just as the cancellation comes. On Python 3.11 asyncio.wait_for then
    # returned the wait's result and swallowed the cancellation; the timer went back to waiting and
    # shutdown waited for it forever.
    for round_ in range(20):
        proc, sink, tel = make(BatchConfig(send_batch_size=100, timeout=LONG))
        await proc.start()
        await proc.consume(points(1, ctx={"tenant": "a"}))
        await wait_until(lambda p=proc: not p._wake.is_set())  # the timer took the wake-up, waits again
        await proc.consume(points(2, ctx={"tenant": "b"}))  # a new buffer: wakes the timer
        async with asyncio.timeout(10.0):  # reached only by a hang
            await proc.shutdown()
        assert sorted(sink.values()) == [1, 2], f"round {round_}"
        assert tel.value("processor_outgoing_points_total") == 2
