"""StatsD / DogStatsD parsing and per-interval aggregation (receivers/statsd/parser.py, aggregator.py)."""

from __future__ import annotations

import dataclasses
import math
import random
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.confmodel import Size
from agent.limits import SeriesLimits
from agent.model import Kind, Labels, Point, Temporality, key_of, series_key
from receivers.statsd import aggregator as aggregator_module
from receivers.statsd import parser as parser_module
from receivers.statsd.aggregator import StatsdAggregator
from receivers.statsd.parser import (
    REFUSAL_REASONS,
    TAG_ERROR_REASONS,
    LineParser,
    StatsdEvent,
    StatsdServiceCheck,
)

NOW_S = 1_700_000_000
START_NS = (NOW_S - 10) * 1_000_000_000
END_NS = NOW_S * 1_000_000_000


def make(**kwargs: object) -> StatsdAggregator:
    kwargs.setdefault("clock_s", lambda: float(NOW_S))
    return StatsdAggregator(**kwargs)  # type: ignore[arg-type]


def flush(agg: StatsdAggregator, chunk_size: int = 2000) -> list[Point]:
    interval = agg.swap()
    return [point for chunk in agg.build(interval, START_NS, END_NS, chunk_size) for point in chunk]


def fed(packet: bytes | str, **kwargs: object) -> tuple[StatsdAggregator, list[Point]]:
    agg = make(**kwargs)
    agg.feed(packet.encode() if isinstance(packet, str) else packet)
    return agg, flush(agg)


def only(points: list[Point], name: str, labels: Labels = (), kind: Kind | None = None) -> Point:
    found = [p for p in points if p.name == name and p.labels == labels and (kind is None or p.kind == kind)]
    assert len(found) == 1, (name, labels, points)
    return found[0]


def refused_only(packet: bytes | str, reason: str, **kwargs: object) -> StatsdAggregator:
    """Feed a packet of one bad line between two good ones: exactly one refusal, the others count."""
    raw = packet.encode() if isinstance(packet, str) else packet
    agg = make(**kwargs)
    agg.feed(b"before:1|c\n" + raw + b"\nafter:1|c")
    assert agg.refused == {reason: 1}, (raw, agg.refused)
    assert agg.accepted == 2
    return agg


# -- packets --------------------------------------------------------------------------------------


def test_lines_empty_lines_and_trailing_newline() -> None:
    agg, points = fed("a:1|c\n\n\nb:2|c\n")
    assert agg.accepted == 2
    assert agg.refused == {}
    assert only(points, "a").value == 1.0
    assert only(points, "b").value == 2.0


def test_empty_packet() -> None:
    agg, points = fed(b"")
    assert (agg.accepted, agg.refused, points) == (0, {}, [])


def test_bad_lines_refused_rest_counted() -> None:
    agg, points = fed("a:1|c\nnonsense\nb:x|c\n:1|c\nc:5|g")
    assert agg.accepted == 2
    assert agg.refused == {"malformed_line": 1, "invalid_value": 1, "empty_name": 1}
    assert {p.name for p in points} == {"a", "c"}


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_feed_accepts_bytes_like(wrap: type) -> None:
    agg = make()
    agg.feed(wrap(b"a:1|c|#x:y"))
    assert agg.accepted == 1
    assert only(flush(agg), "a", (("x", "y"),)).value == 1.0


def test_refusal_reasons_listed() -> None:
    assert len(set(REFUSAL_REASONS)) == len(REFUSAL_REASONS) == 24
    assert "empty_field" in REFUSAL_REASONS
    assert set(TAG_ERROR_REASONS) == {"malformed_tag", "unbalanced_brackets"}
    assert not set(TAG_ERROR_REASONS) & set(REFUSAL_REASONS)


# -- counters -------------------------------------------------------------------------------------


def test_counter_sums_per_series_as_delta_sum() -> None:
    agg, points = fed("hits:1|c\nhits:2|c\nhits:3.5|c\nother:1|c")
    p = only(points, "hits")
    assert p.kind == Kind.SUM
    assert p.temporality == Temporality.DELTA
    assert p.monotonic is True
    assert p.value == 6.5
    assert (p.start_time_unix_nano, p.time_unix_nano) == (START_NS, END_NS)
    assert agg.accepted == 4


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("c:1|c|@0.5", 2.0),
        ("c:3|c|@0.1", 30.000000000000004),
        ("c:1|c|@1", 1.0),
        ("c:2|c|@1.0", 2.0),
        ("c:1|c|@0.25|#a:b", 4.0),
    ],
)
def test_counter_scaled_by_inverse_rate(line: str, expected: float) -> None:
    _, points = fed(line)
    assert points[0].value == pytest.approx(expected)


def test_counter_rates_mixed_in_one_series() -> None:
    _, points = fed("c:1|c|@0.5\nc:1|c\nc:1|c|@0.5")
    assert only(points, "c").value == 5.0


def test_negative_counter_refused() -> None:
    refused_only("c:-1|c", "negative_counter")
    refused_only("c:1:-1|c", "negative_counter")


def test_negative_zero_counter_accepted() -> None:
    agg, points = fed("c:-0|c")
    assert agg.accepted == 1
    assert only(points, "c").value == 0.0


def test_counter_overflowing_to_inf_refused() -> None:
    agg = make()
    agg.feed(b"c:1e308|c\nc:1e308|c\nc:1e308|c|@0.5")
    assert agg.refused == {"invalid_value": 2}
    assert only(flush(agg), "c").value == 1e308


# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"1_000",
        b" 42 ",
        b" 42",
        b"42 ",
        b"nan",
        b"NaN",
        b"inf",
        b"-inf",
        b"Infinity",
        b"1e400",
        b"-1e400",
        "١٢٣".encode(),
        "４２".encode(),
        b"",
        b"+",
        b"-",
        b".",
        b"e5",
        b"1e",
        b"1.2.3",
        b"--1",
        b"0x10",
        b"1,5",
        b"1\t",
        b"\xff",
    ],
)
@pytest.mark.parametrize("typ", [b"c", b"g", b"ms", b"h", b"d"])
def test_strict_values_refused(value: bytes, typ: bytes) -> None:
    refused_only(b"m:" + value + b"|" + typ, "invalid_value")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"42", 42.0),
        (b"1.5", 1.5),
        (b"+3", 3.0),
        (b"1e3", 1000.0),
        (b"1E2", 100.0),
        (b".5", 0.5),
        (b"5.", 5.0),
        (b"2.5e-1", 0.25),
        (b"0", 0.0),
        (b"1e308", 1e308),
    ],
)
def test_strict_values_accepted(value: bytes, expected: float) -> None:
    _, points = fed(b"m:" + value + b"|c")
    assert only(points, "m").value == expected


# -- gauges ---------------------------------------------------------------------------------------


def test_gauge_last_value_wins() -> None:
    _, points = fed("g:1|g\ng:7|g\ng:3.5|g")
    p = only(points, "g")
    assert p.kind == Kind.GAUGE
    assert p.value == 3.5
    assert p.time_unix_nano == END_NS


def test_gauge_deltas_and_negative() -> None:
    _, points = fed("g:10|g\ng:+5|g\ng:-3|g")
    assert only(points, "g").value == 12.0
    _, points = fed("g:-5|g")  # no previous value: a delta on 0
    assert only(points, "g").value == -5.0
    _, points = fed("g:7|g\ng:0|g\ng:-5|g")
    assert only(points, "g").value == -5.0


def test_gauge_rate_ignored() -> None:
    _, points = fed("g:10|g|@0.5")
    assert only(points, "g").value == 10.0
    refused_only("g:10|g|@7", "invalid_sample_rate")


def test_gauge_deltas_apply_across_intervals_and_only_updated_are_emitted() -> None:
    agg = make()
    agg.feed(b"g:10|g\nh:1|g")
    assert {p.name: p.value for p in flush(agg)} == {"g": 10.0, "h": 1.0}
    agg.feed(b"g:-3|g")
    assert {p.name: p.value for p in flush(agg)} == {"g": 7.0}
    assert flush(agg) == []
    agg.feed(b"g:+1|g\nh:+1|g")
    assert {p.name: p.value for p in flush(agg)} == {"g": 8.0, "h": 2.0}


def test_gauge_idle_expiry() -> None:
    agg = make(gauge_idle_flushes=2)
    agg.feed(b"g:5|g")
    assert only(flush(agg), "g").value == 5.0  # interval 1 updates g
    assert flush(agg) == []  # interval 2: idle for 1 flush, still remembered
    agg.feed(b"g:+1|g")
    assert only(flush(agg), "g").value == 6.0  # interval 3 updates it again
    flush(agg)
    flush(agg)  # intervals 4 and 5: idle for 2 flushes, forgotten
    agg.feed(b"g:+1|g")
    assert only(flush(agg), "g").value == 1.0


def test_gauge_updated_in_live_interval_survives_expiry_of_built_one() -> None:
    agg = make(gauge_idle_flushes=1)
    agg.feed(b"g:5|g")
    first = agg.swap()
    agg.feed(b"g:+1|g")  # the live interval updates g before the previous one is built
    list(agg.build(first, START_NS, END_NS))
    agg.feed(b"g:+1|g")
    assert only(flush(agg), "g").value == 7.0


def test_gauge_previous_values_bounded_by_max_series() -> None:
    agg = make(max_series=3, gauge_idle_flushes=100)
    for i in range(3):
        agg.feed(f"g{i}:1|g\n".encode())
        flush(agg)
    agg.feed(b"g3:1|g")
    flush(agg)
    assert len(agg._gauge_last) == 3  # g0 (the longest idle) forgotten
    agg.feed(b"g0:+1|g\ng3:+1|g")
    assert {p.name: p.value for p in flush(agg)} == {"g0": 1.0, "g3": 2.0}


# -- timers, histograms, distributions ------------------------------------------------------------


def test_timer_in_seconds_with_exact_stats() -> None:
    _, points = fed("t:100|ms\nt:300|ms\nt:200|ms")
    p = only(points, "t")
    assert p.kind == Kind.HISTOGRAM
    assert p.temporality == Temporality.DELTA
    assert p.unit == "s"
    assert (p.start_time_unix_nano, p.time_unix_nano) == (START_NS, END_NS)
    h = p.histogram
    assert h is not None
    assert h.count == 3
    assert h.sum == pytest.approx(0.6)
    assert h.min == pytest.approx(0.1)
    assert h.max == pytest.approx(0.3)


def test_timer_weighted_by_inverse_rate() -> None:
    _, points = fed("t:100|ms|@0.5\nt:200|ms\nt:400|ms|@0.25")
    h = only(points, "t").histogram
    assert h is not None
    assert h.count == pytest.approx(2 + 1 + 4)
    assert h.sum == pytest.approx(0.1 * 2 + 0.2 + 0.4 * 4)
    assert h.min == pytest.approx(0.1)
    assert h.max == pytest.approx(0.4)


@pytest.mark.parametrize("typ", ["h", "d"])
def test_histogram_and_distribution_unitless(typ: str) -> None:
    _, points = fed(f"x:1.5|{typ}\nx:2.5|{typ}|@0.5|#a:b")
    plain = only(points, "x")
    assert plain.unit == ""
    assert plain.histogram is not None and plain.histogram.count == 1
    tagged = only(points, "x", (("a", "b"),))
    assert tagged.histogram is not None
    assert tagged.histogram.count == pytest.approx(2)
    assert tagged.histogram.sum == pytest.approx(5.0)


def test_h_and_d_share_a_series_timer_does_not() -> None:
    _, points = fed("x:1|h\nx:2|d\nx:3|ms")
    hist = [p for p in points if p.unit == ""]
    timer = [p for p in points if p.unit == "s"]
    assert len(hist) == 1 and hist[0].histogram is not None and hist[0].histogram.count == 2
    assert len(timer) == 1 and timer[0].histogram is not None
    assert timer[0].histogram.sum == pytest.approx(0.003)


def test_weighted_value_overflow_refused() -> None:
    agg = refused_only("h:1e308|h|@0.5", "invalid_value")
    assert agg._iv.dists == {} and agg.series_count == 2
    refused_only("h:1:1e308|d|@0.5", "invalid_value")
    agg, points = fed("t:1e308|ms|@0.5")  # 1e305 s weighs 2: fine
    assert agg.accepted == 1 and len(points) == 1


def test_weights_array_only_once_a_rate_appears() -> None:
    agg = make()
    agg.feed(b"t:1|ms\nt:2|ms\nu:1|ms")
    assert agg._iv.timer_weights == {}
    agg.feed(b"t:3|ms|@0.5\nt:4|ms")
    (weights,) = agg._iv.timer_weights.values()
    assert list(weights) == [1.0, 1.0, 2.0, 1.0]
    assert len(agg._iv.timers[b"t"]) == 4


def test_fold_keeps_memory_bounded_and_stats_exact() -> None:
    agg = make()
    n = aggregator_module.FOLD_VALUES + 1808
    agg.feed("\n".join(f"t:{i}|ms" for i in range(1, n + 1)).encode())
    iv = agg._iv
    assert b"t" in iv.timer_folds
    assert len(iv.timers[b"t"]) == n - aggregator_module.FOLD_VALUES
    h = only(flush(agg), "t").histogram
    assert h is not None
    assert h.count == n
    assert h.sum == pytest.approx(n * (n + 1) / 2 / 1000.0)
    assert h.min == pytest.approx(0.001)
    assert h.max == pytest.approx(n / 1000.0)


def test_fold_with_weights_and_exact_multiple() -> None:
    agg = make()
    n = aggregator_module.FOLD_VALUES * 2
    agg.feed("\n".join(f"d:{i % 7}|d|@0.5" for i in range(n)).encode())
    assert len(agg._iv.dists[b"d"]) == 0  # everything folded: the point comes from the fold alone
    h = only(flush(agg), "d").histogram
    assert h is not None
    assert h.count == pytest.approx(2 * n)
    assert h.sum == pytest.approx(2 * sum(i % 7 for i in range(n)))


# -- sets -----------------------------------------------------------------------------------------


def test_set_counts_distinct_members() -> None:
    agg, points = fed("u:alice|s\nu:bob|s\nu:alice|s\nu:a:b:c|s\nu:1.5|s|#env:prod")
    p = only(points, "u")
    assert p.kind == Kind.GAUGE
    assert p.unit == "1"
    assert p.value == 3.0  # alice, bob, "a:b:c": no value packing for sets
    assert only(points, "u", (("env", "prod"),)).value == 1.0
    assert agg.accepted == 5


def test_set_empty_member_refused() -> None:
    refused_only("u:|s", "invalid_value")


def test_set_member_limit() -> None:
    agg = make(max_set_members=2)
    agg.feed(b"u:a|s\nu:b|s\nu:c|s\nu:a|s")
    assert agg.refused == {"set_member_limit": 1}
    assert agg.accepted == 3
    assert only(flush(agg), "u").value == 2.0


def test_set_members_over_all_sets_are_capped_per_interval() -> None:
    agg = make(max_set_members_total=3)
    agg.feed(b"a:1|s\nb:1|s\na:2|s\nb:2|s\nc:1|s\na:1|s\nb:1|s")
    # a:{1,2} b:{1} fill the 3 slots; b:2 and the new set c are refused; members seen still count
    assert agg.refused == {"set_member_limit": 2}
    assert agg.accepted == 5
    points = flush(agg)
    assert (only(points, "a").value, only(points, "b").value) == (2.0, 1.0)
    agg.feed(b"c:1|s")  # a new interval starts with every slot free
    assert only(flush(agg), "c").value == 1.0


def test_set_members_are_kept_as_hashes_whatever_their_length() -> None:
    agg = make()
    long_member = b"m" * 60_000
    agg.feed(b"u:" + long_member + b"|s\nu:" + long_member + b"|s\nu:short|s")
    (members,) = agg._iv.sets.values()
    assert all(type(m) is int for m in members) and len(members) == 2
    assert only(flush(agg), "u").value == 2.0


# -- value packing ---------------------------------------------------------------------------------


def test_packing_counts_each_value() -> None:
    agg, points = fed("c:1:2:3|c|@0.5\nt:100:200|ms\ng:5:+1:-2|g\nh:1:2:3:4|h")
    assert agg.accepted == 3 + 2 + 3 + 4
    assert only(points, "c").value == 12.0
    assert only(points, "g").value == 4.0
    t = only(points, "t").histogram
    assert t is not None and t.count == 2 and t.sum == pytest.approx(0.3)
    h = only(points, "h").histogram
    assert h is not None and h.count == 4


@pytest.mark.parametrize("line", ["c:1:x|c", "c:1::2|c", "c:1:|c", "t::1|ms", "g:1:nan|g"])
def test_packing_one_bad_value_refuses_the_line(line: str) -> None:
    agg = refused_only(line, "invalid_value")
    assert [p.name for p in flush(agg)] == ["before", "after"]


# -- sample rates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate",
    [
        "@0",
        "@0.0",
        "@-0.5",
        "@1.5",
        "@2",
        "@nan",
        "@inf",
        "@",
        "@abc",
        "@ 0.5",
        "@1e-320",
        "@0x1",
        "@1_0",
    ],
)
@pytest.mark.parametrize("typ", ["c", "g", "ms", "s"])
def test_invalid_sample_rate(rate: str, typ: str) -> None:
    refused_only(f"m:1|{typ}|{rate}", "invalid_sample_rate")


def test_tiny_valid_rate() -> None:
    _, points = fed("c:1|c|@1e-300")
    assert only(points, "c").value == pytest.approx(1e300)


# -- tags -----------------------------------------------------------------------------------------


def test_dogstatsd_tags_canonical_and_sorted() -> None:
    agg, points = fed("r:1|c|#route:/users,env:prod,host:web-1\nr:2|c|#host:web-1,env:prod,route:/users")
    p = only(points, "r", (("env", "prod"), ("host", "web-1"), ("route", "/users")))
    assert p.value == 3.0
    assert agg.accepted == 2


def test_dogstatsd_tag_forms() -> None:
    _, points = fed("m:1|c|#bare,k:v:with:colons,,dup:1,dup:2,empty:")
    only(points, "m", (("bare", ""), ("dup", "2"), ("empty", ""), ("k", "v:with:colons")))


def test_empty_tag_field_means_no_tags() -> None:
    _, points = fed("m:1|c|#\nm:1|c")
    assert only(points, "m").value == 2.0


@pytest.mark.parametrize("line", ["m:1|c|#:v", "m:1|c|#a:b,:c"])
def test_dogstatsd_tag_without_key(line: str) -> None:
    refused_only(line, "invalid_tag")


def test_tag_fields_in_any_order_and_unknown_fields_ignored() -> None:
    _, points = fed("m:1|c|#a:b|@0.5|x:future\nm:1|c|@0.5|e:what|#a:b")
    assert only(points, "m", (("a", "b"),)).value == 4.0


@pytest.mark.parametrize(
    ("line", "name", "labels"),
    [
        ("req#env=prod,host=a:1|c", "req", (("env", "prod"), ("host", "a"))),
        ("req,env=prod,host=a:1|c", "req", (("env", "prod"), ("host", "a"))),
        ("req[env=prod,host=a]:1|c", "req", (("env", "prod"), ("host", "a"))),
        ("api.[env=prod]latency:1|c", "api.latency", (("env", "prod"),)),
        ("req,url=a=b:1|c", "req", (("url", "a=b"),)),
        ("req,k=1,k=2:1|c", "req", (("k", "2"),)),
    ],
)
def test_name_embedded_tags(line: str, name: str, labels: Labels) -> None:
    agg, points = fed(line)
    assert agg.refused == {}
    assert only(points, name, labels).value == 1.0


def test_embedded_and_dogstatsd_spellings_are_one_series() -> None:
    _, points = fed("r,b=2,a=1:1|c\nr#a=1,b=2:1|c\nr[b=2,a=1]:1|c\nr:1|c|#a:1,b:2")
    assert only(points, "r", (("a", "1"), ("b", "2"))).value == 4.0


@pytest.mark.parametrize(
    "line",
    [
        "r,a=1:1|c|#b:2",
        "r#a=1:1|c|#b:2",
        "r[a=1]:1|c|#b:2",
        "r[a=1],b=2:1|c",
        "r,a=1#b=2:1|c",
        "r[a=1]#b=2:1|c",
    ],
)
def test_mixed_tag_styles_refused(line: str) -> None:
    refused_only(line, "mixed_tag_styles")


@pytest.mark.parametrize(
    "line",
    [
        "r]a=1[:1|c",
        "r[a=1][b=2]:1|c",
        "r#a=1#b=2:1|c",
    ],
)
def test_malformed_embedded_tags(line: str) -> None:
    refused_only(line, "invalid_tag")


@pytest.mark.parametrize(
    ("line", "name", "labels", "tag_errors"),
    [
        # The SignalFX cases, handled as statsd_exporter handles them.
        ("foo.[]test:100|c", "foo.test", (), {}),
        ("foo.[tag1,tag2]test:100|c", "foo.test", (), {"malformed_tag": 2}),
        ("[tag1=bar,tag2=bazfoo.test:100|c", "[tag1=bar,tag2=bazfoo.test", (), {"unbalanced_brackets": 1}),
        ("tag1=bar,tag2=baz]foo.test:100|c", "tag1=bar,tag2=baz]foo.test", (), {"unbalanced_brackets": 1}),
        ("foo.[a=1,b,=2,c=]test:100|c", "foo.test", (("a", "1"),), {"malformed_tag": 3}),
        # The same tag rules in the Librato and InfluxDB styles.
        ("r,a:100|c", "r", (), {"malformed_tag": 1}),
        ("r,=1:100|c", "r", (), {"malformed_tag": 1}),
        ("r#a=:100|c", "r", (), {"malformed_tag": 1}),
        ("r,a=1,,b=2:100|c", "r", (("a", "1"), ("b", "2")), {"malformed_tag": 1}),
        ("r,:100|c", "r", (), {}),
        ("r#:100|c", "r", (), {}),
        # A name kept whole for a missing bracket takes DogStatsD tags.
        ("r[a=1:100|c|#k:v", "r[a=1", (("k", "v"),), {"unbalanced_brackets": 1}),
    ],
)
def test_embedded_tag_errors_keep_the_line_and_are_counted(
    line: str, name: str, labels: Labels, tag_errors: dict[str, int]
) -> None:
    agg, points = fed(line)
    assert agg.refused == {}
    assert agg.accepted == 1
    assert agg.tag_errors == tag_errors
    assert only(points, name, labels).value == 100.0


def test_tag_errors_counted_for_every_line_also_on_the_fast_path() -> None:
    agg = make()
    for _ in range(3):  # the second and third packets would hit the descriptor cache
        agg.feed(b"foo.[tag1,tag2]test:1|c\nb[x=1:2|g\nfoo.[t=1]test:1|c")
    assert agg.tag_errors == {"malformed_tag": 6, "unbalanced_brackets": 3}
    assert agg.accepted == 9
    points = flush(agg)
    assert only(points, "foo.test").value == 3.0
    assert only(points, "foo.test", (("t", "1"),)).value == 3.0
    assert only(points, "b[x=1").value == 2.0


def test_tag_errors_not_counted_on_refused_lines() -> None:
    agg = make()
    agg.feed(b"foo.[tag1]test:x|c\nfoo.[tag1]test:-1|c\n[a=1:1|c|")
    assert agg.refused == {"invalid_value": 1, "negative_counter": 1, "empty_field": 1}
    assert agg.tag_errors == {}
    assert agg.accepted == 0


def test_embedded_tags_on_empty_name() -> None:
    refused_only(",a=1:1|c", "empty_name")
    refused_only("[a=1]:1|c", "empty_name")


def test_container_id_label() -> None:
    _, points = fed("m:1|c|#env:prod|c:abc123\nm:1|c|c:abc123|#env:prod")
    assert only(points, "m", (("container.id", "abc123"), ("env", "prod"))).value == 2.0


def test_container_id_with_embedded_tags_and_override() -> None:
    _, points = fed("m,env=prod:1|c|c:abc\nm:1|c|#container.id:x|c:abc")
    only(points, "m", (("container.id", "abc"), ("env", "prod")))
    only(points, "m", (("container.id", "abc"),))


def test_empty_container_id_refused() -> None:
    refused_only("m:1|c|c:", "invalid_container_id")


SMALL = SeriesLimits(
    max_name_length=6,
    max_labels=2,
    max_label_name_length=3,
    max_label_value_length=6,
    max_series_bytes=Size(20),
)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("abcdefg:1|c", "name_too_long"),
        ("abcdefg,k=v:1|c", "name_too_long"),  # the name left after the embedded tags
        ("ab[k=v]cdefg:1|g", "name_too_long"),
        ("m:1|c|#a:1,b:2,c:3", "too_many_labels"),
        ("m,a=1,b=2:1|c|c:x", "too_many_labels"),  # container.id is a label too
        ("m:1|c|#abcd:v", "label_name_too_long"),
        ("m:1|c|c:abcdefg", "label_name_too_long"),  # the label name "container.id" is 12 bytes
        ("m:1|ms|#k:abcdefg", "label_value_too_long"),
        ("m#k=abcdefg:1|c", "label_value_too_long"),
        ("abcdef:1|c|#ab:vvvvvv,cd:vvvvv", "series_too_large"),  # 6 + 8 + 7 = 21 bytes
        ("_e{1,1}:a|b|#abcd:v", "label_name_too_long"),
        ("_sc|x|0|#a:1,b:2,c:3", "too_many_labels"),
    ],
)
def test_series_limits(line: str, reason: str) -> None:
    refused_only(line, reason, limits=SMALL)


def test_series_limits_at_the_boundary_accepted() -> None:
    agg, points = fed("abcdef:1|c|#ab:vvvvvv,cd:vvvv\nm,a=1:2|g\nn:3|c|#k:vvvvvv", limits=SMALL)
    assert agg.refused == {} and agg.accepted == 3
    assert only(points, "abcdef", (("ab", "vvvvvv"), ("cd", "vvvv"))).value == 1.0  # 20 bytes


def test_series_limits_by_default() -> None:
    limits = SeriesLimits()
    refused_only("m" * (limits.max_name_length + 1) + ":1|c", "name_too_long")
    refused_only("m:1|c|#" + ",".join(f"k{i}:v" for i in range(limits.max_labels + 1)), "too_many_labels")
    refused_only("m:1|c|#k:" + "v" * (limits.max_label_value_length + 1), "label_value_too_long")
    tags = ",".join(f"k{i}:" + "v" * 4000 for i in range(5))  # 5 labels of ~4 KB: over 16 KiB
    refused_only("m:1|c|#" + tags, "series_too_large")
    agg, points = fed("m:1|c|#k:" + "v" * limits.max_label_value_length)
    assert agg.accepted == 1 and len(points) == 1


@pytest.mark.parametrize(
    "line",
    [
        b"esc\x1bx:1|c",
        b"nul\x00:1|g",
        b"m:1|c|#k\x00:v",
        b"m:1|c|#ok:v,k\x7f:v",
        b"m,k\x07=v:1|c",
        b"m:1|c|#k:v|c:x\x00",  # the container id is a value: kept; the key is not refused
        b"_e{1,1}:a|b|#k\x1b:v",
        b"_sc|x|0|#\x01:v",
    ],
)
def test_control_characters_in_names_and_tag_keys_refused(line: bytes) -> None:
    agg = make()
    agg.feed(b"before:1|c\n" + line + b"\nafter:1|c")
    if b"c:x\x00" in line:
        assert agg.refused == {} and agg.accepted == 3
        return
    assert agg.refused == {"control_character": 1}, agg.refused
    assert agg.accepted == 2


def test_control_characters_in_tag_values_kept_for_the_edge_to_escape() -> None:
    agg, points = fed(b"m:1|c|#k:a\x00b\x1b[31m\nn:2|g|c:\x07")
    assert agg.refused == {}
    only(points, "m", (("k", "a\x00b\x1b[31m"),))
    only(points, "n", (("container.id", "\x07"),))


def test_pending_events_bounded_in_bytes() -> None:
    agg = make()
    text = b"t" * 60_000
    line = b"_e{1,60000}:a|" + text
    agg.feed(b"\n".join([line] * 200))
    taken = aggregator_module.MAX_EVENT_BYTES // len(line)
    assert len(agg.events) == taken and agg.refused == {"event_limit": 200 - taken}
    agg.take_events()
    agg.feed(line)
    assert len(agg.events) == 1  # taking them frees the budget


def test_long_spellings_accepted_but_not_cached() -> None:
    agg = make()
    line = ("m:1|c|#" + ",".join(["a:b"] * 5000)).encode()  # 20 KB of one repeated tag
    agg.feed(line + b"\n" + line)
    assert agg.accepted == 2
    assert agg._parser.descriptors == {} and agg._parser._suffixes == {}
    assert only(flush(agg), "m", (("a", "b"),)).value == 2.0


def test_types_are_separate_series() -> None:
    _, points = fed("x:1|c\nx:2|g\nx:a|s\nx:3|ms")
    assert sorted((p.kind, p.unit) for p in points) == [
        (Kind.SUM, ""),
        (Kind.GAUGE, ""),
        (Kind.GAUGE, "1"),
        (Kind.HISTOGRAM, "s"),
    ]


# -- names, types, shapes, UTF-8 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("nocolon", "malformed_line"),
        ("a|c", "malformed_line"),
        ("a|c|#b:c", "malformed_line"),
        ("a:1", "invalid_type"),
        ("a:1|", "invalid_type"),
        ("a:1|x", "invalid_type"),
        ("a:1|C", "invalid_type"),
        ("a:1|cc", "invalid_type"),
        ("a:1|c |#x", "invalid_type"),
        ("foo:1|c|", "empty_field"),
        ("foo:1|c||#a:b", "empty_field"),
        ("foo:1|c|#a:b|", "empty_field"),
        ("foo:1:2|ms|@0.5|", "empty_field"),
        ("foo:x|s|", "empty_field"),
        ("foo:100|c|#tag1:value|c", "invalid_container_id"),
        ("foo:100|g|c", "invalid_container_id"),
        (":1|c", "empty_name"),
        (":1|c|#a:b", "empty_name"),
    ],
)
def test_line_shape_refusals(line: str, reason: str) -> None:
    refused_only(line, reason)


@pytest.mark.parametrize(
    "line",
    [
        b"caf\xe9:1|c",
        b"m:1|c|#env:\xff",
        b"m:1|c|#\xc3:v",
        b"m:1|c|c:\xff\xfe",
        b"m\xfd,a=1:1|c",
        b"\xed\xa0\x80:1|g",
    ],
)
def test_invalid_utf8_refused(line: bytes) -> None:
    refused_only(line, "invalid_utf8")


def test_utf8_names_and_tags_decoded() -> None:
    _, points = fed("café.latency:1|c|#région:île-de-france")
    only(points, "café.latency", (("région", "île-de-france"),))


# -- timestamps -----------------------------------------------------------------------------------


def test_counter_timestamp_separate_slot() -> None:
    t = NOW_S - 30
    _, points = fed(f"c:1|c\nc:2|c|T{t}\nc:3|c|T{t}\nc:4|c|#a:b|T{t}")
    plain = [p for p in points if p.time_unix_nano == END_NS]
    stamped = [p for p in points if p.time_unix_nano == t * 1_000_000_000]
    assert [p.value for p in plain] == [1.0]
    assert sorted((p.labels, p.value) for p in stamped) == [((), 5.0), ((("a", "b"),), 4.0)]
    for p in stamped:
        assert p.start_time_unix_nano == t * 1_000_000_000 - (END_NS - START_NS)


def test_gauge_timestamp() -> None:
    t = NOW_S + 600
    _, points = fed(f"g:5|g|T{t}\ng:+1|g")
    # the untimestamped slot gets the delta on the latest value, whatever its timestamp
    assert sorted((p.time_unix_nano, p.value) for p in points) == [(END_NS, 6.0), (t * 1_000_000_000, 5.0)]


@pytest.mark.parametrize("offset", [-3601, 601, -(10**9)])
def test_timestamp_out_of_range(offset: int) -> None:
    refused_only(f"c:1|c|T{NOW_S + offset}", "timestamp_out_of_range")
    refused_only(f"g:1|g|T{NOW_S + offset}", "timestamp_out_of_range")


def test_timestamp_edges_accepted_and_huge_refused() -> None:
    agg, points = fed(f"c:1|c|T{NOW_S - 3600}\nc:1|c|T{NOW_S + 600}")
    assert agg.accepted == 2 and len(points) == 2
    refused_only("c:1|c|T" + "9" * 40, "timestamp_out_of_range")
    refused_only("c:1|c|T0", "timestamp_out_of_range")


@pytest.mark.parametrize("field", ["Tabc", "T-5", "T", "T1.5", "T+17", "T１７"])
def test_invalid_timestamp(field: str) -> None:
    refused_only(f"c:1|c|{field}", "invalid_timestamp")


def test_timestamp_ignored_on_other_types() -> None:
    agg, points = fed("t:1|ms|Tabc\nh:1|h|T0\nu:a|s|T-5")
    assert agg.refused == {}
    assert all(p.time_unix_nano == END_NS for p in points) and len(points) == 3


# -- events and service checks --------------------------------------------------------------------


def test_event_minimal() -> None:
    agg = make()
    agg.feed(b"_e{5,4}:title|text")
    assert agg.accepted == 1
    assert agg.take_events() == [
        StatsdEvent(
            title="title",
            text="text",
            timestamp_s=None,
            hostname="",
            aggregation_key="",
            priority="normal",
            alert_type="info",
            source_type_name="",
            labels=(),
        )
    ]
    assert agg.events == [] and agg.take_events() == []


def test_event_all_fields_pipes_utf8_and_newlines() -> None:
    title = "a|b é"
    text = "line1\\nline2|x"
    line = (
        f"_e{{{len(title.encode())},{len(text.encode())}}}:{title}|{text}|d:1700000000|h:web-1|p:low"
        f"|t:warning|k:agg|s:deploy|#env:prod,team|c:cid|zz:unknown"
    )
    agg = make()
    agg.feed(line.encode() + b"\nm:1|c")
    assert agg.refused == {}
    assert agg.accepted == 2
    assert agg.events == [
        StatsdEvent(
            title="a|b é",
            text="line1\nline2|x",
            timestamp_s=1_700_000_000,
            hostname="web-1",
            aggregation_key="agg",
            priority="low",
            alert_type="warning",
            source_type_name="deploy",
            labels=(("container.id", "cid"), ("env", "prod"), ("team", "")),
        )
    ]


def test_event_empty_text() -> None:
    agg = make()
    agg.feed(b"_e{5,0}:title|\n_e{5,0}:title||t:error")
    events = [e for e in agg.events if isinstance(e, StatsdEvent)]
    assert [(e.text, e.alert_type) for e in events] == [("", "info"), ("", "error")]


@pytest.mark.parametrize(
    "line",
    [
        "_e{5,4}title|text",
        "_e{5,4:title|text",
        "_e{5}:title|text",
        "_e{a,4}:title|text",
        "_e{-5,4}:title|text",
        "_e{0,4}:|text",
        "_e{4,4}:title|text",
        "_e{5,5}:title|text",
        "_e{6,4}:title|text",
        "_e{5,3}:title|text",
        "_e{5,4}:title|text|p:urgent",
        "_e{5,4}:title|text|t:fatal",
        "_e{5,4}:title|text|d:abc",
        "_e{5,4}:title|text|d:-5",
        "_e{5,4}:title|text|d:99999999999",
        "_e{5,4}:title|text|#:v",
        "_e{5,4}:title|text|c:",
        "_e{9999999,4}:title|text",
        "_e{,}:|",
    ],
)
def test_invalid_events(line: str) -> None:
    agg = refused_only(line, "invalid_event")
    assert agg.events == []


def test_event_invalid_utf8() -> None:
    refused_only(b"_e{2,4}:\xff\xfe|text", "invalid_utf8")


def test_event_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregator_module, "MAX_EVENTS", 3)
    agg = make()
    agg.feed(b"\n".join([b"_e{1,1}:a|b"] * 2 + [b"_sc|x|0"] * 2))
    assert agg.refused == {"event_limit": 1}
    assert len(agg.take_events()) == 3
    agg.feed(b"_e{1,1}:a|b")
    assert len(agg.events) == 1


def test_service_check_minimal_and_full() -> None:
    agg = make()
    agg.feed(b"_sc|db.up|0\n_sc|db.up|2|d:1700000000|h:db-1|#env:prod|c:cid|m:down | really\\nbad|#x:y")
    assert agg.refused == {}
    assert agg.take_events() == [
        StatsdServiceCheck(name="db.up", status=0, timestamp_s=None, hostname="", message="", labels=()),
        StatsdServiceCheck(
            name="db.up",
            status=2,
            timestamp_s=1_700_000_000,
            hostname="db-1",
            message="down | really\nbad|#x:y",
            labels=(("container.id", "cid"), ("env", "prod")),
        ),
    ]


@pytest.mark.parametrize(
    "line",
    [
        "_sc|db.up",
        "_sc|db.up|4",
        "_sc|db.up|x",
        "_sc|db.up|",
        "_sc||0",
        "_sc|db.up|00",
        "_sc|db.up|0|d:abc",
        "_sc|db.up|0|#:x",
        "_sc|db.up|-1",
    ],
)
def test_invalid_service_checks(line: str) -> None:
    refused_only(line, "invalid_service_check")


def test_service_check_invalid_utf8() -> None:
    refused_only(b"_sc|db\xff|0", "invalid_utf8")


# -- series cap -----------------------------------------------------------------------------------


def test_series_limit() -> None:
    agg = make(max_series=3)
    agg.feed(b"a:1|c\nb:1|g\nc:1|ms\nd:1|c\ne:x|s\na:1|c\nb:2|g\nc:2|ms")
    assert agg.refused == {"series_limit": 2}
    assert agg.accepted == 6
    assert agg.series_count == 3
    points = flush(agg)
    assert only(points, "a").value == 2.0
    assert only(points, "b").value == 2.0
    assert agg.series_count == 0
    agg.feed(b"d:1|c")  # a fresh interval has room again
    assert agg.refused == {"series_limit": 2}
    assert only(flush(agg), "d").value == 1.0


def test_series_limit_counts_timestamp_slots() -> None:
    agg = make(max_series=2)
    agg.feed(f"c:1|c\nc:1|c|T{NOW_S}\nc:1|c|T{NOW_S - 1}".encode())
    assert agg.refused == {"series_limit": 1}


# -- swap and build -------------------------------------------------------------------------------


def test_swap_detaches_and_feed_continues() -> None:
    agg = make()
    agg.feed(b"a:1|c")
    first = agg.swap()
    agg.feed(b"a:5|c")
    assert agg.series_count == 1
    assert [p.value for chunk in agg.build(first, START_NS, END_NS) for p in chunk] == [1.0]
    assert only(flush(agg), "a").value == 5.0


def test_build_chunks() -> None:
    agg = make()
    agg.feed("\n".join(f"c{i}:1|c" for i in range(4500)).encode())
    agg.feed("\n".join(f"g{i}:1|g" for i in range(100)).encode())
    agg.feed("\n".join(f"t{i % 10}:{i}|ms" for i in range(100)).encode())
    chunks = list(agg.build(agg.swap(), START_NS, END_NS, chunk_size=2000))
    assert all(1 <= len(c) <= 2000 for c in chunks)
    points = [p for c in chunks for p in c]
    assert len(points) == 4500 + 100 + 10
    assert len({(p.name, p.labels, p.kind) for p in points}) == len(points)
    assert [len(c) for c in chunks] == [2000, 2000, 600, 10]


def test_build_chunks_histograms_by_value_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregator_module, "HIST_VALUES_PER_CHUNK", 10)
    agg = make()
    agg.feed("\n".join(f"t{i % 6}:{i}|ms\nd{i % 3}:{i}|d|@0.5" for i in range(30)).encode())
    chunks = list(agg.build(agg.swap(), START_NS, END_NS, chunk_size=4))
    assert [len(c) for c in chunks] == [2, 2, 2, 1, 1, 1]
    counts = {p.name: p.histogram.count for c in chunks for p in c if p.histogram is not None}
    assert counts == {**{f"t{i}": 5 for i in range(6)}, **{f"d{i}": pytest.approx(20) for i in range(3)}}


def test_build_rejects_bad_chunk_size() -> None:
    agg = make()
    with pytest.raises(ValueError):
        agg.build(agg.swap(), START_NS, END_NS, chunk_size=0)


def test_fast_points_match_constructor() -> None:
    key = series_key("a", Kind.SUM, (("k", "v"),))
    fast = aggregator_module._point(key, 5, 1.5, 2, True, None, "s")
    built = Point(
        "a", Kind.SUM, (("k", "v"),), 5, value=1.5, start_time_unix_nano=2, monotonic=True, unit="s"
    )
    assert type(fast) is Point
    assert fast == built and hash(fast) == hash(built) and repr(fast) == repr(built)
    assert fast.key is key is key_of(built)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.value = 2.0  # type: ignore[misc]


def test_names_decoded_once_and_cached() -> None:
    agg = make()
    agg.feed(b"a:1|c|#x:y")
    first = only(flush(agg), "a", (("x", "y"),))
    agg.feed(b"a:1|c|#x:y")
    second = only(flush(agg), "a", (("x", "y"),))
    assert first.name is second.name and first.labels is second.labels
    assert first.key is not None and first.key is second.key  # the series' key, once per series
    agg.feed(b"a:2|g|#x:y")  # the same name and tags as a gauge: another series (kind), its own key
    gauge = only(flush(agg), "a", (("x", "y"),))
    assert gauge.key is not None and gauge.key is not first.key and gauge.key.kind is Kind.GAUGE


def test_caches_are_bounded() -> None:
    parser = LineParser(cache_max=3, clock_s=lambda: float(NOW_S))
    for i in range(10):
        assert parser.descriptor((f"m{i}".encode(), f"c|#a:{i}".encode())) is not None
    assert len(parser.descriptors) <= 3
    assert len(parser._suffixes) <= 3
    for i in range(1000):
        parser.rate(f"@0.{i + 1}".encode())
    assert len(parser.rates) <= 256


def test_gauges_kept_across_intervals_are_capped_and_counted() -> None:
    agg = make(max_series=3)
    agg.feed(b"a:1|g\nb:1|g\nc:1|g")
    flush(agg)
    agg.feed(b"d:1|g\ne:1|g")
    flush(agg)  # five bases kept, three allowed: the two idle longest (a, b) go, counted
    assert agg.gauges_forgotten == 2
    assert set(agg._gauge_last) == {b"c", b"d", b"e"}
    agg.feed(b"a:+5|g\nc:+5|g")
    points = flush(agg)
    assert (only(points, "a").value, only(points, "c").value) == (5.0, 6.0)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        StatsdAggregator(max_series=0)


# -- properties -----------------------------------------------------------------------------------

_NAMES = [
    b"a",
    b"b.c",
    b"x,k=v",
    b"y#k=v",
    b"z[k=v]r",
    b"",
    b"\xff",
    b"a|b",
    b"_e{1,1}",
    b"n#",
    b"w,k=v,j=u",
    b"ctl\x1b",
    b"longname",
    b"v,k=long",
    b"k,\x00=v",
    b"seven77",
    b"f.[]t",
    b"f.[a,b=1]t",
    b"[a=b,c=dx",
    b"a=b]x",
]
_VALUES = [
    b"1",
    b"-1",
    b"+2",
    b"1.5",
    b"1e3",
    b"nan",
    b"",
    b"1:2",
    b"1:-2",
    b"1_0",
    b"1e400",
    b"x",
    b"-0",
    b"0",
    b" 1",
    b"1e308",
    b"+1e308",
    b"-5:+3",
    b"1.7e308",
    b"-1e308",
    b"1e308:1e308",
    b"1:1e400",
    b"2:1.5:-0",
    b"1::2",
    b"-0:-0",
    b"3:+1e308:-1e308",
    b"1e-5:2E3:.5",
    b"1:2:x",
]
_TYPES = [b"c", b"g", b"ms", b"h", b"d", b"s", b"x", b""]
_FIELDS = [
    b"@0.5",
    b"@1",
    b"@0",
    b"@2",
    b"@0.25",
    b"#a:b",
    b"#b:c,a:d",
    b"#",
    b"#a",
    b"c:abc",
    b"c:",
    b"T1700000000",
    b"T1699999990",
    b"Tx",
    b"T1",
    b"zz",
    b"",
    b"#:x",
    b"#\xff",
    b"#k\x00:v",
    b"#k:v\x00",
    b"#a:1,b:2,c:3",
    b"#abcd:v",
    b"#abc:vvvv",
    b"#k:longvalue",
    b"c:\x1b",
    b"c",
]

_lines = st.builds(
    lambda n, v, t, f: n + b":" + v + b"|" + t + b"".join(b"|" + x for x in f),
    st.sampled_from(_NAMES),
    st.sampled_from(_VALUES),
    st.sampled_from(_TYPES),
    st.lists(st.sampled_from(_FIELDS), max_size=4),
)
_events = st.sampled_from([b"_e{1,1}:a|b", b"_e{1,1}:a|bc", b"_sc|x|0", b"_sc|x|9", b"_e{2,1}:a|b|c"])
_packets = st.lists(st.one_of(_lines, _lines, _events, st.binary(max_size=30)), max_size=12).map(b"\n".join)


def _state(agg: StatsdAggregator) -> tuple[object, ...]:
    iv = agg._iv
    return (
        agg.accepted,
        agg.refused,
        iv.n_series,
        iv.counters,
        iv.gauges,
        agg._gauge_last,
        {k: list(v) for k, v in iv.timers.items()},
        {k: list(v) for k, v in iv.timer_weights.items()},
        {k: list(v) for k, v in iv.dists.items()},
        {k: list(v) for k, v in iv.dist_weights.items()},
        iv.sets,
        agg.events,
        agg._gauge_seen,
        agg.tag_errors,
    )


def _agree(packets: list[bytes], **kwargs: object) -> None:
    """The fast path and the complete parser leave identical state, packet after packet; an interval
    ends every third packet, so lines often meet fresh series."""
    fast = make(**kwargs)
    slow = make(**kwargs)
    for i, packet in enumerate(packets + packets):  # twice: the second pass hits the caches
        fast.feed(packet)
        for line in packet.split(b"\n"):
            if line:
                slow.accepted += slow._slow_line(line)
        assert _state(fast) == _state(slow), packet
        if i % 3 == 2:
            fast.swap()
            slow.swap()


@pytest.mark.parametrize("max_series", [100_000, 12])
def test_fast_path_agrees_with_complete_parser_exhaustively(max_series: int) -> None:
    pairs = [b"@0.5|#a:b", b"#b:c,a:d|@0.25", b"c:abc|#a:b", b"T1700000000|#a:b", b"@2|#a:b", b"#a|c:"]
    tails = [b""] + [b"|" + f for f in _FIELDS] + [b"|" + p for p in pairs]
    lines = [n + b":" + v + b"|" + t + x for n in _NAMES for v in _VALUES for t in _TYPES for x in tails]
    random.Random(1).shuffle(lines)
    packets = [b"\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    _agree(packets, max_series=max_series, max_set_members=2, max_set_members_total=5, limits=_LIMITS)


_LIMITS = SeriesLimits(
    max_name_length=7,
    max_labels=2,
    max_label_name_length=3,
    max_label_value_length=4,
    max_series_bytes=Size(12),
)
"""Small enough that the test lines meet every limit."""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packets=st.lists(_packets, min_size=1, max_size=3),
    max_series=st.sampled_from([2, 100]),
    limits=st.sampled_from([_LIMITS, SeriesLimits()]),
)
def test_fast_path_agrees_with_complete_parser(
    packets: list[bytes], max_series: int, limits: SeriesLimits
) -> None:
    _agree(packets, max_series=max_series, max_set_members=2, max_set_members_total=5, limits=limits)


_value_atoms = st.one_of(
    st.sampled_from(
        [b"1", b"-1", b"+2", b"0", b"-0", b"1e308", b"-1e308", b"1e400", b"1.5", b"", b"x", b"."]
    ),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    st.integers(-(10**20), 10**20).map(lambda i: str(i).encode()),
)


@settings(max_examples=500, deadline=None)
@given(
    values=st.lists(_value_atoms, min_size=2, max_size=8),
    kind=st.sampled_from([b"c", b"g", b"ms", b"h", b"d"]),
    rate=st.sampled_from([b"", b"|@0.5", b"|@0.001", b"|@1"]),
)
def test_packed_values_convert_as_one_by_one(values: list[bytes], kind: bytes, rate: bytes) -> None:
    """The C-level conversion of a packed line gives what the value-by-value loop gives, bit for bit,
    and the same refusal."""
    line = b"p:" + b":".join(values) + b"|" + kind + rate
    parser = LineParser(cache_max=100, clock_s=lambda: float(NOW_S))
    fast = parser.parse(line)
    with mock.patch.object(parser_module, "_packed_values", lambda *_: None):
        loop = parser.parse(line)
    assert repr(fast) == repr(loop)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=200), _packets), max_size=5))
def test_feed_never_raises(packets: list[bytes]) -> None:
    agg = make(max_series=5)
    for packet in packets:
        agg.feed(packet)
    lines = sum(1 for p in packets for line in p.split(b"\n") if line)
    assert sum(agg.refused.values()) <= lines
    assert set(agg.refused) <= set(REFUSAL_REASONS)
    for point in flush(agg):
        assert point.kind != Kind.HISTOGRAM or point.histogram is not None
        assert point.kind == Kind.HISTOGRAM or math.isfinite(point.value)
