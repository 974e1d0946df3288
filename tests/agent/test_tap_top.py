"""The top-metrics tracker's arithmetic (agent.tap.top): series seen within the last minute, points per
second over the window, labels by distinct values, and the cap on series kept."""

from __future__ import annotations

import pytest

from agent.model import Kind, MetricBatch, Point
from agent.tap import top
from agent.tap.top import TopTracker


def _batch(name: str, n: int, **fixed: str) -> MetricBatch:
    return MetricBatch(
        tuple(
            Point(name, Kind.GAUGE, tuple(sorted({"i": str(i), **fixed}.items())), 0, 1.0) for i in range(n)
        )
    )


def test_series_points_per_second_and_labels_over_the_window() -> None:
    tracker = TopTracker(started=1000.0)
    tracker.add(_batch("a", 10, zone="z1"), 1000.0)
    tracker.add(_batch("a", 10, zone="z1"), 1010.0)  # the same 10 series again
    tracker.add(_batch("b", 3), 1010.0)
    rows = tracker.snapshot(5, "series", 1020.0)
    assert [(r["name"], r["series"], r["points_per_s"]) for r in rows] == [("a", 10, 1.0), ("b", 3, 0.15)]
    assert rows[0]["labels"] == [{"name": "i", "values": 10}, {"name": "zone", "values": 1}]
    assert [r["name"] for r in tracker.snapshot(1, "points_per_s", 1020.0)] == ["a"]
    # A minute after the last sighting, a series is no longer active.
    assert [(r["name"], r["series"]) for r in tracker.snapshot(5, "series", 1069.0)] == [("a", 10), ("b", 3)]
    assert tracker.snapshot(5, "series", 1080.0) == []


def test_series_beyond_the_cap_are_counted_in_points_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(top, "TOP_MAX_SERIES", 5)
    tracker = TopTracker(started=0.0)
    tracker.add(_batch("a", 8), 0.0)
    [row] = tracker.snapshot(5, "series", 10.0)
    assert row["series"] == 5 and row["points_per_s"] == 0.8
