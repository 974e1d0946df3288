"""Telemetry.histogram: a cheap cell rendered at scrape as a Prometheus histogram, bucket for bucket the
same as prometheus_client's own Histogram given the same observations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.telemetry import ComponentTelemetry, Telemetry

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def samples(text: str, family: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([*BUCKETS, 0.0, math.inf]),  # the bounds themselves: le is inclusive
            st.floats(min_value=0, max_value=100, allow_nan=False),
        ),
        max_size=40,
    )
)
def test_rendering_equals_prometheus_client_histogram(values: list[float]) -> None:
    tel = Telemetry()
    cell = tel.histogram("op_seconds", "Op time.", BUCKETS, outcome="success")
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "headwater_op_seconds", "Op time.", ["outcome"], buckets=BUCKETS, registry=reference_registry
    )
    child = reference.labels("success")
    for v in values:
        cell.observe(v)
        child.observe(v)
    ours = samples(generate_latest(tel.registry).decode(), "headwater_op_seconds")
    theirs = samples(generate_latest(reference_registry).decode(), "headwater_op_seconds")
    theirs = {k: v for k, v in theirs.items() if not k[0].endswith("_created")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, nan_ok=True), key
    assert tel.value("op_seconds", outcome="success") == len(values)


def test_same_name_and_labels_return_the_same_cell_and_component_labels_are_added() -> None:
    tel = Telemetry()
    comp = ComponentTelemetry(tel, "exporter", "otlp/a")
    a = comp.histogram("send_seconds", "Send time.", BUCKETS, outcome="success")
    assert a is tel.histogram("send_seconds", "Send time.", BUCKETS, exporter="otlp/a", outcome="success")
    a.observe(0.5)
    text = generate_latest(tel.registry).decode()
    assert 'headwater_send_seconds_bucket{exporter="otlp/a",le="1.0",outcome="success"} 1.0' in text
    assert 'headwater_send_seconds_count{exporter="otlp/a",outcome="success"} 1.0' in text


@pytest.mark.parametrize(
    "buckets, other",
    [((0.1, 1.0), (0.1, 2.0)), ((0.1, 1.0), (0.1, 1.0, 5.0))],
)
def test_one_name_refuses_other_buckets(buckets: tuple[float, ...], other: tuple[float, ...]) -> None:
    tel = Telemetry()
    tel.histogram("h_seconds", "H.", buckets, a="1")
    with pytest.raises(ValueError, match="different buckets"):
        tel.histogram("h_seconds", "H.", other, a="2")


@pytest.mark.parametrize("buckets", [(), (1.0, 0.5), (0.5, 0.5), (math.nan,)])
def test_bad_buckets_are_refused(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="increasing finite"):
        Telemetry().histogram("h_seconds", "H.", buckets)


def test_a_name_is_one_kind() -> None:
    tel = Telemetry()
    tel.counter("x_total", "X.")
    with pytest.raises(ValueError, match="registered twice"):
        tel.histogram("x_total", "X.", BUCKETS)
