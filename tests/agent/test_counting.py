"""agent/counting.py: a processor's incoming, outgoing and dropped{reason} point counters."""

from __future__ import annotations

from prometheus_client import generate_latest

from agent.counting import PointCounts
from agent.telemetry import ComponentTelemetry, Telemetry


def test_counts_go_to_the_standard_series_of_their_processor() -> None:
    tel = Telemetry()
    counts = PointCounts(ComponentTelemetry(tel, "processor", "sample/a"), "sampled")
    other = PointCounts(ComponentTelemetry(tel, "processor", "sample/b"))
    counts.incoming(10)
    counts.incoming(5)
    counts.outgoing(9)
    counts.dropped("sampled", 6)
    other.incoming(1)

    assert tel.value("processor_incoming_points_total", processor="sample/a") == 15
    assert tel.value("processor_outgoing_points_total", processor="sample/a") == 9
    assert tel.value("processor_dropped_points_total", processor="sample/a", reason="sampled") == 6
    assert tel.value("processor_incoming_points_total", processor="sample/b") == 1
    assert tel.value("processor_outgoing_points_total", processor="sample/b") == 0


def test_named_reasons_show_at_zero_and_others_appear_when_first_counted() -> None:
    tel = Telemetry()
    counts = PointCounts(ComponentTelemetry(tel, "processor", "filter"), "filtered")
    page = generate_latest(tel.registry).decode()
    assert 'headwater_processor_dropped_points_total{processor="filter",reason="filtered"} 0.0' in page
    assert 'headwater_processor_incoming_points_total{processor="filter"} 0.0' in page
    assert 'reason="shutdown"' not in page

    counts.dropped("shutdown", 3)
    counts.dropped("shutdown", 4)
    page = generate_latest(tel.registry).decode()
    assert 'headwater_processor_dropped_points_total{processor="filter",reason="shutdown"} 7.0' in page
    assert 'headwater_processor_dropped_points_total{processor="filter",reason="filtered"} 0.0' in page
