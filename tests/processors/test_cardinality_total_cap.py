"""The cardinality processor's cap over all metrics together (``max_series``): a flood of metric names
is limited like a flood of series, counted under ``metric="_all"``, and idle series free room."""

from __future__ import annotations

from agent.model import Kind, MetricBatch, Point
from processors.cardinality import ALL_METRICS, OVERFLOW_LABELS, CardinalityConfig
from tests.processors.test_cardinality import make


def names(n: int, prefix: str = "m") -> MetricBatch:
    return MetricBatch(tuple(Point(f"{prefix}{i}", Kind.SUM, (("a", "b"),), 1, value=1) for i in range(n)))


async def test_a_flood_of_metric_names_is_dropped_and_counted_beyond_max_series() -> None:
    proc, sink, tel, _ = make(CardinalityConfig(max_series=100, max_series_per_metric=10))
    await proc.consume(names(250))
    assert len(sink.points()) == 100
    assert tel.value("processor_cardinality_active_series") == 100
    assert len(proc._metrics) == 100  # no state kept for names over the cap
    assert tel.value("processor_dropped_points_total", reason="cardinality") == 150
    assert tel.value("processor_cardinality_limited_points_total", metric=ALL_METRICS) == 150
    # Series already tracked keep passing.
    await proc.consume(names(100))
    assert len(sink.points()) == 200


async def test_overflow_folds_points_beyond_max_series() -> None:
    proc, sink, tel, _ = make(CardinalityConfig(max_series=2, action="overflow"))
    await proc.consume(names(5))
    out = sink.points()
    assert [p.labels for p in out].count(OVERFLOW_LABELS) == 3
    assert sum(p.value for p in out) == 5  # totals kept
    assert tel.value("processor_cardinality_limited_points_total", metric=ALL_METRICS) == 3


async def test_idle_series_free_room_under_max_series() -> None:
    proc, sink, tel, clock = make(CardinalityConfig(max_series=100, window=60.0))
    await proc.consume(names(100, "old"))
    clock.now += 61  # every series idle for longer than the window
    await proc.consume(names(100, "new"))
    assert len(sink.points()) == 200
    assert tel.value("processor_cardinality_active_series") == 100
    assert tel.value("processor_dropped_points_total", reason="cardinality") == 0
    assert set(proc._metrics) == {f"new{i}" for i in range(100)}


async def test_a_single_point_folded_into_overflow_is_sent_folded() -> None:
    proc, sink, _, _ = make(CardinalityConfig(max_series_per_metric=1, action="overflow"))
    await proc.consume(MetricBatch((Point("m", Kind.SUM, (("id", "a"),), 1, value=1),)))
    # As many points out as in (one folded), but the new series' point must carry the overflow labels.
    await proc.consume(MetricBatch((Point("m", Kind.SUM, (("id", "b"),), 1, value=2),)))
    assert [p.labels for p in sink.points()] == [(("id", "a"),), OVERFLOW_LABELS]
