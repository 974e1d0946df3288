"""The cardinality processor: a series cap per metric over a sliding window, drop or overflow."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from agent import exphist
from agent.component import Backpressure, ComponentKind
from agent.model import (
    ExplicitHistogram,
    Kind,
    MetricBatch,
    Point,
    Resource,
    SpanBatch,
    Summary,
    Temporality,
)
from agent.telemetry import Telemetry
from processors.cardinality import OVERFLOW_LABELS, CardinalityConfig, CardinalityLimiter
from tests.conftest import Sink, component_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    config: CardinalityConfig, sink: Sink | None = None
) -> tuple[CardinalityLimiter, Sink, Telemetry, Clock]:
    assert config.validate() == []
    tel = Telemetry()
    sink = sink or Sink()
    clock = Clock()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "cardinality")
    return CardinalityLimiter(settings, config, sink, clock=clock), sink, tel, clock


def pt(name: str, series: str, value: float = 1.0, kind: Kind = Kind.SUM, t: int = 1) -> Point:
    return Point(name, kind, (("id", series),), t, value=value, start_time_unix_nano=t - 1)


def batch(*points: Point) -> MetricBatch:
    return MetricBatch(points, {"tenant": "t"})


async def test_new_series_beyond_the_cap_are_dropped_per_metric(caplog: pytest.LogCaptureFixture) -> None:
    proc, sink, tel, _ = make(CardinalityConfig(max_series_per_metric=2))
    with caplog.at_level(logging.WARNING, logger="test.cardinality"):
        await proc.consume(batch(pt("m", "a"), pt("m", "b"), pt("m", "c"), pt("n", "c")))
        await proc.consume(batch(pt("m", "a"), pt("m", "d"), pt("m", "b")))
    assert [(p.name, p.labels[0][1]) for p in sink.points()] == [
        ("m", "a"),
        ("m", "b"),
        ("n", "c"),
        ("m", "a"),  # active series always pass
        ("m", "b"),
    ]
    assert tel.value("processor_dropped_points_total", reason="cardinality") == 2
    assert tel.value("processor_cardinality_limited_points_total", metric="m", action="drop") == 2
    assert tel.value("processor_cardinality_limited_points_total", metric="n") == 0
    assert tel.value("processor_incoming_points_total") == 7
    assert tel.value("processor_outgoing_points_total") == 5
    assert tel.value("processor_cardinality_active_series") == 3
    assert len([r for r in caplog.records if "reached 2 active series" in r.getMessage()]) == 1
    assert all(b.context == {"tenant": "t"} for b in sink.batches)


async def test_idle_series_leave_the_window() -> None:
    proc, sink, tel, clock = make(CardinalityConfig(max_series_per_metric=2, window=60.0))  # type: ignore[arg-type]
    await proc.consume(batch(pt("m", "a"), pt("m", "b")))
    clock.now += 50
    await proc.consume(batch(pt("m", "b")))  # b stays active, a goes idle
    clock.now += 20  # a idle for 70 s > window; b for 20 s
    await proc.consume(batch(pt("m", "c"), pt("m", "d")))
    got = [p.labels[0][1] for p in sink.points()]
    assert got == ["a", "b", "b", "c"]  # c takes a's place; d is beyond the cap (b, c active)
    assert tel.value("processor_dropped_points_total", reason="cardinality") == 1
    clock.now += 1000
    await proc.consume(batch(pt("other", "x")))  # the periodic sweep forgets every idle series
    assert tel.value("processor_cardinality_active_series") == 1


async def test_a_full_metric_expires_idle_series_between_sweeps() -> None:
    proc, sink, _, clock = make(CardinalityConfig(max_series_per_metric=2, window=60.0))  # type: ignore[arg-type]
    await proc.consume(batch(pt("m", "a"), pt("m", "b")))
    clock.now += 59
    await proc.consume(batch(pt("m", "a")))
    clock.now += 1  # the periodic sweep runs here: b, seen exactly one window ago, still counts
    await proc.consume(batch(pt("m", "a")))
    clock.now += 10  # b is now idle for 70 s; the next sweep is not due yet
    await proc.consume(batch(pt("m", "c")))
    assert [p.labels[0][1] for p in sink.points()] == ["a", "b", "a", "a", "c"]


async def test_unlimited_batch_is_passed_as_is_and_input_unchanged() -> None:
    proc, sink, _, _ = make(CardinalityConfig(max_series_per_metric=5))
    b = batch(pt("m", "a"), pt("m", "b"))
    await proc.consume(b)
    assert sink.batches[0] is b
    limited = batch(*(pt("m", str(i)) for i in range(10)))
    before = copy.deepcopy(limited)
    await proc.consume(limited)
    assert limited == before
    assert len(sink.batches[1]) == 3


async def test_resource_is_part_of_the_series() -> None:
    proc, sink, _, _ = make(CardinalityConfig(max_series_per_metric=1))
    p = pt("m", "a")
    other = Point("m", Kind.SUM, p.labels, 1, resource=Resource((("host", "h2"),)))
    await proc.consume(batch(p, other))
    assert sink.points() == [p]


async def test_overflow_folds_into_one_point_per_metric_and_kind() -> None:
    proc, sink, tel, _ = make(CardinalityConfig(max_series_per_metric=1, action="overflow"))
    await proc.consume(
        batch(
            pt("m", "a", 1.0, t=10),
            pt("m", "b", 2.0, t=10),
            pt("m", "c", 3.0, t=12),
            pt("g", "a", 5.0, Kind.GAUGE),
            pt("g", "b", 7.0, Kind.GAUGE, t=20),
            pt("g", "c", 6.0, Kind.GAUGE, t=15),
        )
    )
    out = sink.points()
    assert [(p.name, p.labels) for p in out] == [
        ("m", (("id", "a"),)),
        ("g", (("id", "a"),)),
        ("m", OVERFLOW_LABELS),
        ("g", OVERFLOW_LABELS),
    ]
    m_over, g_over = out[2], out[3]
    assert m_over.value == 5.0 and m_over.time_unix_nano == 12 and m_over.start_time_unix_nano == 9
    assert g_over.value == 7.0 and g_over.time_unix_nano == 20  # the latest gauge value
    assert tel.value("processor_cardinality_limited_points_total", metric="m", action="overflow") == 2
    assert tel.value("processor_dropped_points_total", reason="cardinality_merged") == 2
    assert tel.value("processor_dropped_points_total", reason="cardinality") == 0
    # loss accounting still adds up: in = out + dropped (merged points live on in the overflow point)
    assert tel.value("processor_incoming_points_total") == tel.value("processor_outgoing_points_total") + 2


async def test_overflow_merges_histograms_and_drops_what_cannot_merge() -> None:
    proc, sink, tel, _ = make(CardinalityConfig(max_series_per_metric=1, action="overflow"))
    h1 = exphist.from_values(np.array([1.0, 2.0]))
    h2 = exphist.from_values(np.array([4.0]))
    e1 = ExplicitHistogram((1.0, 2.0), (1, 0, 2), 7.0, 0.5, 3.0)
    e2 = ExplicitHistogram((1.0, 2.0), (0, 1, 0), 1.5, 1.5, 1.5)
    e3 = ExplicitHistogram((5.0,), (1, 0), 1.0)
    summary = Summary(1, 1.0, ((0.5, 1.0),))

    def hp(name: str, series: str, **kw: object) -> Point:
        return Point(name, Kind.HISTOGRAM, (("id", series),), 1, **kw)  # type: ignore[arg-type]

    await proc.consume(
        batch(
            hp("h", "keep", histogram=h1),
            hp("h", "x", histogram=h1),
            hp("h", "y", histogram=h2),
            hp("e", "keep", explicit=e1),
            hp("e", "x", explicit=e1),
            hp("e", "y", explicit=e2),
            hp("e", "z", explicit=e3),  # other bounds: cannot merge
            Point("s", Kind.SUMMARY, (("id", "keep"),), 1, summary=summary),
            Point("s", Kind.SUMMARY, (("id", "x"),), 1, summary=summary),  # summaries never merge
        )
    )
    over = {p.name: p for p in sink.points() if p.labels == OVERFLOW_LABELS}
    assert set(over) == {"h", "e"}
    h = over["h"].histogram
    assert h is not None and h.count == 3 and h.sum == 7.0
    e = over["e"].explicit
    assert e is not None and e.counts == (1, 1, 2) and e.sum == 8.5 and (e.min, e.max) == (0.5, 3.0)
    assert tel.value("processor_dropped_points_total", reason="cardinality") == 2


async def test_overflow_does_not_mix_temporalities() -> None:
    proc, sink, tel, _ = make(CardinalityConfig(max_series_per_metric=1, action="overflow"))
    cumulative = Point("m", Kind.SUM, (("id", "c"),), 1, 4.0, temporality=Temporality.CUMULATIVE)
    await proc.consume(batch(pt("m", "a"), pt("m", "b", 2.0), cumulative))
    assert [p.value for p in sink.points() if p.labels == OVERFLOW_LABELS] == [2.0]
    assert tel.value("processor_dropped_points_total", reason="cardinality") == 1


async def test_other_signals_pass_and_backpressure_propagates() -> None:
    proc, sink, _, _ = make(CardinalityConfig())
    rs = trace_pb2.ResourceSpans()
    spans = SpanBatch((rs,), span_count=0)
    await proc.consume(spans)
    assert sink.batches == [spans]
    refusing, _, _, _ = make(CardinalityConfig(), Sink(refuse=True))
    with pytest.raises(Backpressure):
        await refusing.consume(batch(pt("m", "a")))


async def test_lifecycle_and_validation() -> None:
    proc, sink, _, _ = make(CardinalityConfig())
    await proc.shutdown()
    await proc.start()
    await proc.consume(batch(pt("m", "a")))
    await proc.shutdown()
    await proc.shutdown()
    assert len(sink.points()) == 1
    problems = CardinalityConfig(max_series_per_metric=0, window=0.0).validate()  # type: ignore[arg-type]
    assert [p for p, _ in problems] == ["max_series_per_metric", "window"]


async def test_overflow_of_a_malformed_explicit_histogram_is_dropped_not_raised() -> None:
    proc, sink, tel, _ = make(CardinalityConfig(max_series_per_metric=1, action="overflow"))

    def hist(series: str, counts: tuple[int, ...]) -> Point:
        e = ExplicitHistogram((1.0, 2.0), counts, sum=1.0)
        return Point("h", Kind.HISTOGRAM, (("id", series),), 1, explicit=e)

    # Same bounds, but the third point has one count too many (bad OTLP input).
    await proc.consume(
        batch(hist("a", (1, 0, 0)), hist("b", (1, 0, 0)), hist("c", (1, 0, 0)), hist("d", (1, 0, 0, 5)))
    )
    overflow = [p for p in sink.points() if p.labels == OVERFLOW_LABELS]
    assert len(overflow) == 1 and overflow[0].explicit is not None
    assert overflow[0].explicit.counts == (2, 0, 0)
    assert tel.value("processor_dropped_points_total", reason="cardinality") == 1
