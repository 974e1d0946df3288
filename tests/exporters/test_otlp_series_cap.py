"""The OTLP exporter's temporality state at its cap: idle series free room as soon as it is needed,
and resources of points sent uncached beyond the cap are not held."""

from __future__ import annotations

import time

from agent.model import Kind, Point, Resource, Temporality
from tests.exporters.test_otlp_wire import S, data_points, encode, encoder


def test_idle_series_free_room_at_the_cap_before_the_periodic_sweep() -> None:
    t = time.time_ns()
    enc = encoder(max_series=2, series_idle_timeout_s=60.0, temporality=Temporality.CUMULATIVE)
    old = [Point(f"old{i}", Kind.SUM, (), t, 1.0, t - S) for i in range(2)]
    encode(enc, old, now_s=0.0)
    encode(enc, [], now_s=50.0)  # the periodic sweep runs here; nothing is idle yet
    # At 61 s both series are idle, but the next periodic sweep is not due until 65 s.
    decoded = data_points(encode(enc, [Point("new", Kind.SUM, (), t, 1.0, t - S)], now_s=61.0))
    assert [m.name for _, _, m, _ in decoded] == ["new"]
    assert enc.counts.get("series_limit", 0) == 0
    assert enc.series == 1


def test_series_still_live_at_the_cap_refuse_new_conversions() -> None:
    t = time.time_ns()
    enc = encoder(max_series=2, series_idle_timeout_s=60.0, temporality=Temporality.CUMULATIVE)
    encode(enc, [Point(f"c{i}", Kind.SUM, (), t, 1.0, t - S) for i in range(2)], now_s=0.0)
    encode(enc, [Point("c2", Kind.SUM, (), t, 1.0, t - S)], now_s=30.0)
    assert enc.counts["series_limit"] == 1 and enc.series == 2


def test_resources_of_uncached_points_are_not_held() -> None:
    t = time.time_ns()
    enc = encoder(max_series=1, series_idle_timeout_s=60.0)
    encode(enc, [Point("kept", Kind.GAUGE, (), t, 1.0)], now_s=0.0)
    flood = [
        Point("g", Kind.GAUGE, (), t, 1.0, resource=Resource((("service.instance.id", str(i)),)))
        for i in range(500)
    ]
    assert len(data_points(encode(enc, flood, now_s=1.0))) == 500  # sent, beyond the cap, uncached
    encode(enc, [Point("kept", Kind.GAUGE, (), t, 1.0)], now_s=20.0)  # a periodic sweep
    assert len(enc._resources) == 1
