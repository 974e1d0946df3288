"""OTLP metrics → internal model (receivers/otlp/convert.py), built with the generated proto classes."""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.metrics.v1 import metrics_pb2 as mpb

from agent import exphist
from agent.confmodel import Size
from agent.limits import SeriesLimits
from agent.model import (
    ExplicitHistogram,
    IntValue,
    Kind,
    Point,
    Resource,
    Scope,
    Summary,
    Temporality,
    series_key,
)
from receivers.otlp.convert import (
    Converted,
    MetricsConverter,
    ShadowMetricsRequest,
    labels_from_keyvalues,
    render_value,
)

T0, T1 = 1_700_000_000_000_000_000, 1_700_000_010_000_000_000
NOW = 1_800_000_000_000_000_000
DELTA, CUMULATIVE = mpb.AGGREGATION_TEMPORALITY_DELTA, mpb.AGGREGATION_TEMPORALITY_CUMULATIVE


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, AnyValue):
        return KeyValue(key=key, value=value)
    return KeyValue(key=key, value=AnyValue(string_value=value))


def request(*metrics: mpb.Metric, resource: dict[str, str] | None = None) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for k, v in (resource or {"service.name": "svc"}).items():
        rm.resource.attributes.append(kv(k, v))
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = "lib", "1.0"
    sm.scope.attributes.append(kv("scope.attr", "x"))
    sm.metrics.extend(metrics)
    return req


def convert(req: ExportMetricsServiceRequest, converter: MetricsConverter | None = None) -> Converted:
    shadow = ShadowMetricsRequest.FromString(req.SerializeToString())
    return (converter or MetricsConverter()).convert(shadow, NOW)


def number(value: float | int | None, attrs: dict[str, str] | None = None, **kw: Any) -> mpb.NumberDataPoint:
    dp = mpb.NumberDataPoint(time_unix_nano=T1, start_time_unix_nano=T0, **kw)
    if isinstance(value, int):
        dp.as_int = value
    elif isinstance(value, float):
        dp.as_double = value
    for k, v in (attrs or {}).items():
        dp.attributes.append(kv(k, v))
    return dp


def sum_metric(name: str, points: list[mpb.NumberDataPoint], temporality: int, monotonic: bool) -> mpb.Metric:
    m = mpb.Metric(name=name, unit="By", description="bytes sent")
    m.sum.aggregation_temporality = temporality  # type: ignore[assignment]  # unknown values on purpose
    m.sum.is_monotonic = monotonic
    m.sum.data_points.extend(points)
    return m


# -- sums and gauges ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("temporality", "expected"), [(DELTA, Temporality.DELTA), (CUMULATIVE, Temporality.CUMULATIVE)]
)
@pytest.mark.parametrize("monotonic", [True, False])
def test_sum_keeps_temporality_monotonic_unit_and_both_value_types(
    temporality: int, expected: Temporality, monotonic: bool
) -> None:
    m = sum_metric("bytes.sent", [number(7, {"a": "1"}), number(2.5, {"a": "2"})], temporality, monotonic)
    out = convert(request(m))
    assert out.rejected == 0 and out.refused == {}
    p1, p2 = out.points
    assert p1 == Point(
        "bytes.sent",
        Kind.SUM,
        (("a", "1"),),
        T1,
        value=7.0,
        start_time_unix_nano=T0,
        temporality=expected,
        monotonic=monotonic,
        unit="By",
        description="bytes sent",
        resource=Resource((("service.name", "svc"),)),
        scope=Scope("lib", "1.0", (("scope.attr", "x"),)),
    )
    assert p2.value == 2.5 and isinstance(p1.value, float)


def test_gauge() -> None:
    m = mpb.Metric(name="temp", unit="Cel")
    m.gauge.data_points.extend([number(21.5), number(-3)])
    out = convert(request(m))
    assert [(p.kind, p.value, p.monotonic) for p in out.points] == [
        (Kind.GAUGE, 21.5, False),
        (Kind.GAUGE, -3.0, False),
    ]


def test_points_are_real_frozen_points_equal_to_constructed_ones() -> None:
    out = convert(request(sum_metric("c", [number(1, {"k": "v"})], DELTA, True)))
    p = out.points[0]
    assert type(p) is Point
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.value = 2.0  # type: ignore[misc]
    twin = dataclasses.replace(p)
    assert twin == p and hash(twin) != 0 and repr(twin) == repr(p)


def test_nan_value_becomes_the_canonical_nan_and_inf_is_kept() -> None:
    # The Prometheus stale marker is the NaN with payload 2; a sender must not be able to forge it.
    stale_marker = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
    m = mpb.Metric(name="g")
    m.gauge.data_points.extend([number(stale_marker), number(math.inf), number(-math.inf)])
    out = convert(request(m))
    bits = struct.unpack("<Q", struct.pack("<d", out.points[0].value))[0]
    assert math.isnan(out.points[0].value) and bits == struct.unpack("<Q", struct.pack("<d", math.nan))[0]
    assert [p.value for p in out.points[1:]] == [math.inf, -math.inf]


def test_missing_time_gets_the_arrival_time() -> None:
    m = mpb.Metric(name="g")
    dp = number(1.0)
    dp.time_unix_nano = 0
    m.gauge.data_points.append(dp)
    assert convert(request(m)).points[0].time_unix_nano == NOW


# -- refusals -------------------------------------------------------------------------------------------
def test_point_without_value_is_refused_and_the_rest_kept() -> None:
    m = sum_metric("reqs", [number(1), number(None), number(3)], DELTA, True)
    out = convert(request(m))
    assert [p.value for p in out.points] == [1.0, 3.0]
    assert out.rejected == 1 and out.refused == {"no_value": 1}
    assert 'metric "reqs" data point 1' in out.error_message
    assert "neither as_int nor as_double" in out.error_message


@pytest.mark.parametrize("temporality", [mpb.AGGREGATION_TEMPORALITY_UNSPECIFIED, 7])
def test_unspecified_or_unknown_temporality_is_refused(temporality: int) -> None:
    out = convert(request(sum_metric("reqs", [number(1), number(2)], temporality, True)))
    assert out.points == [] and out.rejected == 2 and out.refused == {"invalid_temporality": 2}
    assert f"aggregation_temporality {temporality}" in out.error_message


def test_empty_name_is_refused() -> None:
    out = convert(
        request(sum_metric("", [number(1)], DELTA, True), sum_metric("ok", [number(1)], DELTA, True))
    )
    assert [p.name for p in out.points] == ["ok"]
    assert out.refused == {"invalid_name": 1} and "without a name" in out.error_message


def test_no_recorded_value_is_skipped_counted_and_not_reported_to_the_sender() -> None:
    m = mpb.Metric(name="up")
    m.gauge.data_points.extend([number(None, flags=1), number(1.0)])
    out = convert(request(m))
    assert [p.value for p in out.points] == [1.0]
    assert out.refused == {"no_recorded_value": 1}
    assert out.rejected == 0 and out.error_message == ""


def test_error_message_lists_the_first_ten_and_counts_the_rest() -> None:
    out = convert(request(sum_metric("r", [number(None) for _ in range(13)], DELTA, True)))
    assert out.rejected == 13 and len(out.errors) == 10
    assert out.error_message.startswith("13 data point(s) rejected: ")
    assert out.error_message.endswith("; and 3 more data point(s)")


def test_metric_without_data_is_ignored() -> None:
    out = convert(request(mpb.Metric(name="nothing")))
    assert out.points == [] and out.rejected == 0 and out.refused == {}


# -- explicit histograms --------------------------------------------------------------------------------
def hist_point(
    counts: list[int], bounds: list[float], count: int, total: float | None = 10.0, **kw: Any
) -> mpb.HistogramDataPoint:
    dp = mpb.HistogramDataPoint(time_unix_nano=T1, start_time_unix_nano=T0, count=count, **kw)
    dp.bucket_counts.extend(counts)
    dp.explicit_bounds.extend(bounds)
    if total is not None:
        dp.sum = total
    return dp


def hist_metric(*points: mpb.HistogramDataPoint, temporality: int = CUMULATIVE) -> mpb.Metric:
    m = mpb.Metric(name="latency", unit="s")
    m.histogram.aggregation_temporality = temporality  # type: ignore[assignment]  # unknown values on purpose
    m.histogram.data_points.extend(points)
    return m


@pytest.mark.parametrize(
    ("temporality", "expected"), [(DELTA, Temporality.DELTA), (CUMULATIVE, Temporality.CUMULATIVE)]
)
def test_explicit_histogram(temporality: int, expected: Temporality) -> None:
    out = convert(
        request(
            hist_metric(hist_point([1, 2, 0], [0.1, 1.0], 3, 1.5, min=0.05, max=0.9), temporality=temporality)
        )
    )
    (p,) = out.points
    assert p.kind is Kind.HISTOGRAM and p.histogram is None and p.temporality is expected
    assert p.explicit == ExplicitHistogram((0.1, 1.0), (1, 2, 0), 1.5, 0.05, 0.9)
    assert type(p.explicit) is ExplicitHistogram and p.explicit.count == 3


def test_explicit_histogram_without_sum_min_max_or_buckets() -> None:
    out = convert(request(hist_metric(hist_point([], [], 4, total=None))))
    (p,) = out.points
    assert p.explicit is not None
    assert p.explicit.bounds == () and p.explicit.counts == (4,)
    assert math.isnan(p.explicit.sum) and p.explicit.min is None and p.explicit.max is None


@pytest.mark.parametrize(
    ("point", "needle"),
    [
        (hist_point([1, 2], [0.1, 1.0], 3), "2 bucket_counts for 2 explicit_bounds"),
        (hist_point([1, 2, 1], [0.1, 1.0], 3), "add up to 4 but count is 3"),
        (hist_point([1, 1, 1], [1.0, 0.5], 3), "strictly ascending"),
        (hist_point([1, 1, 1], [0.1, math.nan], 3), "strictly ascending"),
        (hist_point([1, 1, 1], [0.1, math.inf], 3), "strictly ascending"),
        (hist_point([1, 1, 1], [0.1, 1.0], 3, min=2.0, max=1.0), "min 2.0 is greater than max 1.0"),
    ],
)
def test_invalid_explicit_histograms_are_refused(point: mpb.HistogramDataPoint, needle: str) -> None:
    out = convert(request(hist_metric(hist_point([1, 0], [5.0], 1), point)))
    assert len(out.points) == 1
    assert out.refused == {"invalid_histogram": 1}
    assert 'metric "latency" data point 1: ' in out.error_message and needle in out.error_message


# -- exponential histograms -----------------------------------------------------------------------------
def exp_point(**kw: Any) -> mpb.ExponentialHistogramDataPoint:
    dp = mpb.ExponentialHistogramDataPoint(time_unix_nano=T1, start_time_unix_nano=T0, **kw)
    return dp


def exp_metric(*points: mpb.ExponentialHistogramDataPoint, temporality: int = DELTA) -> mpb.Metric:
    m = mpb.Metric(name="exp")
    m.exponential_histogram.aggregation_temporality = temporality  # type: ignore[assignment]  # unknown values on purpose
    m.exponential_histogram.data_points.extend(points)
    return m


@pytest.mark.parametrize(
    ("temporality", "expected"), [(DELTA, Temporality.DELTA), (CUMULATIVE, Temporality.CUMULATIVE)]
)
def test_exponential_histogram(temporality: int, expected: Temporality) -> None:
    dp = exp_point(scale=1, count=7, sum=20.5, zero_count=1, min=-3.0, max=9.0)
    dp.positive.offset = 2
    dp.positive.bucket_counts.extend([3, 0, 2])
    dp.negative.offset = 1
    dp.negative.bucket_counts.extend([1])
    (p,) = convert(request(exp_metric(dp, temporality=temporality))).points
    assert p.kind is Kind.HISTOGRAM and p.explicit is None and p.temporality is expected
    h = p.histogram
    assert h is not None
    assert (h.scale, h.zero_count, h.count, h.sum, h.min, h.max) == (1, 1.0, 7.0, 20.5, -3.0, 9.0)
    assert (h.positive_offset, h.positive_counts.tolist()) == (2, [3.0, 0.0, 2.0])
    assert (h.negative_offset, h.negative_counts.tolist()) == (1, [1.0])
    assert not h.positive_counts.flags.writeable
    assert h.min <= exphist.quantile(h, 0.5) <= h.max


def test_exponential_histogram_without_min_max_is_bounded_by_its_buckets() -> None:
    # scale 0: bucket i holds (2**i, 2**(i+1)]; positive buckets 1..3 hold values in (2, 16].
    dp = exp_point(scale=0, count=3)
    dp.positive.offset = 1
    dp.positive.bucket_counts.extend([1, 1, 1])
    dp.sum = 20.0
    (p,) = convert(request(exp_metric(dp))).points
    assert p.histogram is not None and (p.histogram.min, p.histogram.max) == (2.0, 16.0)
    neg = exp_point(scale=0, count=2, zero_count=1)
    neg.negative.offset = 0
    neg.negative.bucket_counts.extend([0, 1])  # magnitudes in (2, 4]
    (q,) = convert(request(exp_metric(neg))).points
    assert q.histogram is not None and (q.histogram.min, q.histogram.max) == (-4.0, 0.0)
    assert math.isnan(q.histogram.sum)  # no sum sent: unknown, not 0


def test_empty_exponential_histogram() -> None:
    (p,) = convert(request(exp_metric(exp_point(scale=3, count=0)))).points
    assert p.histogram is not None and p.histogram.count == 0
    assert (p.histogram.min, p.histogram.max) == (math.inf, -math.inf)


@pytest.mark.parametrize(
    ("point", "needle"),
    [
        (exp_point(scale=21, count=0), "scale 21 is outside [-10, 20]"),
        (exp_point(scale=-11, count=0), "scale -11 is outside"),
        (exp_point(scale=0, count=5, zero_count=2), "add up to 2 but count is 5"),
        (exp_point(scale=0, count=1, zero_count=1, min=1.0, max=0.0), "min 1.0 is greater than max 0.0"),
    ],
)
def test_invalid_exponential_histograms_are_refused(
    point: mpb.ExponentialHistogramDataPoint, needle: str
) -> None:
    out = convert(request(exp_metric(point)))
    assert out.points == [] and out.refused == {"invalid_histogram": 1}
    assert needle in out.error_message


# -- summaries ------------------------------------------------------------------------------------------
def summary_metric(*quantiles: tuple[float, float], total: float = 12.0) -> mpb.Metric:
    m = mpb.Metric(name="rpc.duration")
    dp = m.summary.data_points.add(time_unix_nano=T1, start_time_unix_nano=T0, count=4, sum=total)
    for q, v in quantiles:
        dp.quantile_values.add(quantile=q, value=v)
    return m


def test_summary() -> None:
    (p,) = convert(request(summary_metric((0.99, 9.0), (0.5, 2.0)))).points
    assert p.kind is Kind.SUMMARY and p.temporality is Temporality.CUMULATIVE
    assert p.summary == Summary(4, 12.0, ((0.5, 2.0), (0.99, 9.0)))


@pytest.mark.parametrize(
    ("metric", "needle"),
    [
        (summary_metric((1.5, 2.0)), "quantile 1.5 is outside [0, 1]"),
        (summary_metric((0.5, math.nan)), "the value of quantile 0.5 is NaN"),
        (summary_metric((0.5, 1.0), total=math.nan), "sum is NaN"),
    ],
)
def test_invalid_summaries_are_refused(metric: mpb.Metric, needle: str) -> None:
    out = convert(request(metric))
    assert out.points == [] and out.refused == {"invalid_summary": 1} and needle in out.error_message


# -- attributes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (AnyValue(string_value="x y"), "x y"),
        (AnyValue(bool_value=True), "true"),
        (AnyValue(bool_value=False), "false"),
        (AnyValue(int_value=-42), "-42"),
        (AnyValue(int_value=2**63 - 1), "9223372036854775807"),
        (AnyValue(double_value=1.0), "1"),
        (AnyValue(double_value=0.25), "0.25"),
        (AnyValue(double_value=1e20), "100000000000000000000"),
        (AnyValue(double_value=math.nan), "NaN"),
        (AnyValue(double_value=-math.inf), "-Inf"),
        (AnyValue(bytes_value=b"\x00\xff"), "AP8="),
        (AnyValue(), ""),
        (
            AnyValue(
                array_value=ArrayValue(
                    values=[
                        AnyValue(string_value="a"),
                        AnyValue(int_value=1),
                        AnyValue(double_value=1.5),
                        AnyValue(bool_value=True),
                        AnyValue(bytes_value=b"\x01"),
                        AnyValue(double_value=math.inf),
                        AnyValue(),
                    ]
                )
            ),
            '["a",1,1.5,true,"AQ==","+Inf",null]',
        ),
        (
            AnyValue(
                kvlist_value=KeyValueList(
                    values=[kv("z", "1"), KeyValue(key="a", value=AnyValue(array_value=ArrayValue()))]
                )
            ),
            '{"a":[],"z":"1"}',
        ),
    ],
)
def test_attribute_rendering(value: AnyValue, text: str) -> None:
    assert render_value(value) == text


def test_labels_are_sorted_and_the_last_duplicate_wins() -> None:
    labels = labels_from_keyvalues([kv("b", "1"), kv("a", "2"), kv("b", "3")])
    assert labels == (("a", "2"), ("b", "3"))
    dp = number(1.0)
    dp.attributes.extend([kv("zone", "eu"), kv("host", "h1"), kv("zone", "us")])
    m = mpb.Metric(name="g")
    m.gauge.data_points.append(dp)
    assert convert(request(m)).points[0].labels == (("host", "h1"), ("zone", "us"))


def test_resource_and_scope_are_shared_within_and_across_requests() -> None:
    converter = MetricsConverter()
    m = sum_metric("c", [number(1, {"a": "1"}), number(2, {"a": "2"})], DELTA, True)
    first = convert(request(m, resource={"service.name": "a", "host": "h"}), converter).points
    second = convert(request(m, resource={"service.name": "a", "host": "h"}), converter).points
    assert first[0].resource is first[1].resource is second[0].resource
    assert first[0].scope is second[1].scope
    assert first[0].resource == Resource((("host", "h"), ("service.name", "a")))
    assert first[0].labels is second[0].labels  # one tuple per attribute set while cached


def test_points_carry_their_series_key_made_once_per_series() -> None:
    converter = MetricsConverter()
    m = sum_metric("c", [number(1, {"a": "1"}), number(2, {"a": "2"})], DELTA, True)
    h = mpb.Metric(name="lat")
    h.histogram.aggregation_temporality = DELTA
    h.histogram.data_points.add(
        time_unix_nano=T1, count=1, explicit_bounds=[1.0], bucket_counts=[1, 0]
    ).attributes.append(kv("a", "1"))
    first = convert(request(m, h), converter).points
    second = convert(request(m, h), converter).points
    for p in (*first, *second):
        assert p.key is not None and p.key is series_key(p.name, p.kind, p.labels, p.resource, p.scope)
    assert [p.key for p in first] == [p.key for p in second]  # the same objects, not recomputed
    assert len({id(p.key) for p in first}) == 3  # two sum series and a histogram series
    # Typed attributes: a point keeps its own labels; the key compares them as text.
    typed = sum_metric("c", [number(1, {"a": AnyValue(int_value=1)})], DELTA, True)
    p = convert(request(typed), converter).points[0]
    assert type(p.labels[0][1]) is IntValue and p.key is first[0].key


def test_the_series_key_memo_is_bounded_and_results_stay_right() -> None:
    converter = MetricsConverter(max_cached=2)  # the memo holds 4 data points' keys at most
    points = [number(i, {"i": str(i)}) for i in range(6)]
    for _ in range(3):
        out = convert(request(sum_metric("c", points, DELTA, True)), converter)
        assert [p.labels for p in out.points] == [(("i", str(i)),) for i in range(6)]
        assert all(p.key is not None and p.key.labels == p.labels for p in out.points)
        assert converter._memos_held <= 2 * 2 + 1


def test_each_resource_metrics_gets_its_own_resource() -> None:
    req = request(sum_metric("c", [number(1)], DELTA, True), resource={"service.name": "a"})
    req.resource_metrics.extend(
        request(sum_metric("c", [number(2)], DELTA, True), resource={"service.name": "b"}).resource_metrics
    )
    a, b = convert(req).points
    assert a.resource is not None and b.resource is not None
    assert a.resource.attributes == (("service.name", "a"),) and b.resource.attributes == (
        ("service.name", "b"),
    )


def test_a_full_cache_is_emptied_and_results_stay_right() -> None:
    converter = MetricsConverter(max_cached=2)
    points = [number(i, {"i": str(i)}) for i in range(5)]
    for _ in range(2):
        out = convert(request(sum_metric("c", points, DELTA, True)), converter)
        assert [p.labels for p in out.points] == [(("i", str(i)),) for i in range(5)]


def test_invalid_attribute_bytes_refuse_only_their_point() -> None:
    shadow = ShadowMetricsRequest.FromString(
        request(
            sum_metric("c", [number(1, {"ok": "1"}), number(2, {"ok": "2"})], DELTA, True)
        ).SerializeToString()
    )
    dp = shadow.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[1]
    dp.attributes.append(b"\x0a\x02\xff\xfe")  # a KeyValue whose key is not UTF-8
    out = MetricsConverter().convert(shadow, NOW)
    assert [p.value for p in out.points] == [1.0]
    assert out.refused == {"invalid_attributes": 1} and 'metric "c" data point 1' in out.error_message


def test_exemplars_are_ignored() -> None:
    dp = number(1.0)
    dp.exemplars.add(as_double=5.0, trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    m = mpb.Metric(name="g")
    m.gauge.data_points.append(dp)
    assert [p.value for p in convert(request(m)).points] == [1.0]


def test_large_int_values_become_floats() -> None:
    m = mpb.Metric(name="g")
    m.gauge.data_points.append(number(2**62))
    assert convert(request(m)).points[0].value == float(2**62)
    assert np.float64(convert(request(m)).points[0].value) == 2.0**62


def test_invalid_resource_attributes_refuse_its_points_only() -> None:
    req = request(sum_metric("a", [number(1), number(2)], DELTA, True), resource={"service.name": "bad"})
    req.resource_metrics.extend(request(sum_metric("b", [number(3)], DELTA, True)).resource_metrics)
    shadow = ShadowMetricsRequest.FromString(req.SerializeToString())
    shadow.resource_metrics[0].resource.attributes.append(b"\x0a\x01\xff")
    out = MetricsConverter().convert(shadow, NOW)
    assert [p.name for p in out.points] == ["b"]
    assert out.refused == {"invalid_attributes": 2} and out.rejected == 2
    assert "resource 0: attributes are not valid KeyValues (2 data point(s))" in out.error_message
    assert "more" not in out.error_message  # the one sentence stands for both points


# -- size limits: the cached fast path against a plain reference ------------------------------------------
SMALL_LIMITS = SeriesLimits(
    max_name_length=12,
    max_labels=5,
    max_label_name_length=6,
    max_label_value_length=10,
    max_series_bytes=Size(40),
    max_resource_bytes=Size(45),
)
LONG_NAMES = dataclasses.replace(SMALL_LIMITS, max_name_length=30)
"""Names of up to 30 bytes in a 40-byte series: attribute sets of at most 20 bytes are cached, and
metrics whose names are over 20 bytes check each cache hit."""
# Few distinct keys, values and names, so that attribute sets repeat under other resources and names
# (cache hits), and sizes on both sides of every limit.
_key = st.sampled_from(["a", "bb", "ccc", "dddddd", "eeeeeee", "x\x1b"])
_value = st.sampled_from(["", "v", "vvvvv", "vvvvvvvvvv", "é" * 5, "é" * 6, "vvvvvvvvvvv", "\t\n"])
_POOL = [
    {},
    {"a": "v"},
    {"a": "vvvvvvvvvv"},
    {"a": "vvvvvvvvvv", "bb": "vvvvv"},
    {"a": "v", "bb": "v"},
    {"ccc": "é" * 5, "dddddd": "vvvvvvvvvv"},
    {"a": "", "bb": "", "ccc": ""},
]
"""Attribute sets that recur (cache hits), small enough to be cached and large enough to push a point
over the series limit with a longer name."""
_attrs = st.one_of(st.sampled_from(_POOL), st.dictionaries(_key, _value, max_size=4))
_outer = st.one_of(
    st.sampled_from([{}, {"a": "v", "bb": "v"}, {"ccc": "vvvvvvvvvv"}, {f"k{i}": "" for i in range(8)}]),
    st.dictionaries(_key, st.sampled_from(["", "v", "v" * 11, "v" * 30]), max_size=3),
)
"""Resource and scope attributes: values over max_label_value_length and more than max_labels of them
(fine: they are not series labels), keys too long or holding ESC, and sizes on both sides of
max_resource_bytes alone and together."""
_name = st.sampled_from(["m", "mmmmmm", "m" * 12, "m" * 13, "m" * 25, "m" * 31, "n\x1b"])


def _size(attrs: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in attrs.items())


def _reference(
    limits: SeriesLimits, name: str, resource: dict[str, str], scope: dict[str, str], attrs: dict[str, str]
) -> bool:
    """Whether a point is within ``limits``, computed the plain way (scope name "lib", version "1.0"):
    the name and the point's attributes as a series, the resource and scope on their own."""
    if limits.check(name, attrs.items()) is not None or "\x1b" in name:
        return False
    keys = [*resource, *scope, *attrs]
    if any("\x1b" in k for k in keys):
        return False
    if any(len(k.encode()) > limits.max_label_name_length for k in [*resource, *scope]):
        return False
    return _size(resource) + _size(scope) + len("lib1.0") <= limits.max_resource_bytes


_CONVERTERS = [
    (limits, MetricsConverter(limits=limits, max_cached=8)) for limits in (SMALL_LIMITS, LONG_NAMES)
]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            _outer,  # resource
            _outer,  # scope
            st.lists(st.tuples(_name, st.lists(_attrs, max_size=3)), max_size=4),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_limits_take_exactly_the_points_within_them(resources: list[Any]) -> None:
    """One converter per limits (with a small cache) across examples: cached attribute sets under
    other resources and metric names are held to the limits as a fresh parse would be."""
    req = ExportMetricsServiceRequest()
    for resource, scope, metrics in resources:
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(kv(k, v) for k, v in resource.items())
        sm = rm.scope_metrics.add()
        sm.scope.name, sm.scope.version = "lib", "1.0"
        sm.scope.attributes.extend(kv(k, v) for k, v in scope.items())
        for name, points in metrics:
            m = sm.metrics.add(name=name)
            for i, attrs in enumerate(points):
                m.gauge.data_points.add(as_double=i, attributes=[kv(k, v) for k, v in attrs.items()])
    body = req.SerializeToString()
    for limits, converter in _CONVERTERS:
        expected = [
            (name, tuple(sorted(attrs.items())))
            for resource, scope, metrics in resources
            for name, points in metrics
            for attrs in points
            if _reference(limits, name, resource, scope, attrs)
        ]
        out = converter.convert(ShadowMetricsRequest.FromString(body), NOW)
        assert [(p.name, p.labels) for p in out.points] == expected
        assert out.rejected == sum(out.refused.values())


def test_the_caches_are_bounded_in_bytes() -> None:
    converter = MetricsConverter(max_cached_bytes=64 * 1024)
    for i in range(50):
        m = mpb.Metric(name="g")
        m.gauge.data_points.append(number(1.0, {"big": f"{i:04d}" + "v" * 4000}))
        assert convert(request(m, resource={"r": f"{i:04d}" + "w" * 4000}), converter).points
        # keys (serialized) and values (rendered) of ~4 KB each
        assert len(converter._labels) <= 8 and len(converter._resources) <= 8
    assert len(converter._labels) >= 1


def test_attribute_sets_too_large_to_cache_are_still_right() -> None:
    # A name may take 60 of the 100 bytes: attribute sets of at most 50 bytes are cached.
    converter = MetricsConverter(limits=SeriesLimits(max_name_length=60, max_series_bytes=Size(100)))
    large = {"a": "v" * 25, "b": "v" * 25}  # 52 bytes
    m = sum_metric("c", [number(1, large), number(2, {"a": "1"})], DELTA, True)
    for _ in range(2):
        out = convert(request(m), converter)
        assert [p.labels for p in out.points] == [tuple(large.items()), (("a", "1"),)]
    assert list(converter._labels.values()) == [(("a", "1"),)]
    # With the default limits every attribute set within them is cached, whatever the resource.
    converter = MetricsConverter()
    big = {f"k{i:03d}": "v" * 100 for i in range(120)}  # 12.6 KB
    resource = {"service.name": "svc", "process.command_line": "java " + "x" * 30_000}
    assert convert(
        request(sum_metric("c", [number(1, big)], DELTA, True), resource=resource), converter
    ).points
    assert list(converter._labels.values()) == [tuple(big.items())]


def test_upb_names_its_depth_limit() -> None:
    """The converter and the receiver tell depth from malformed input by upb's message."""
    from google.protobuf.message import DecodeError

    from receivers.otlp.wire import is_too_deep

    value = AnyValue(string_value="x").SerializeToString()
    for _ in range(40):  # AnyValue.kvlist_value.values[0].value
        entry = b"\x0a\x01k" + b"\x12" + _varint(len(value)) + value
        kvlist = b"\x0a" + _varint(len(entry)) + entry
        value = b"\x32" + _varint(len(kvlist)) + kvlist
    with pytest.raises(DecodeError) as info:
        AnyValue.FromString(value)
    assert is_too_deep(info.value)
    with pytest.raises(DecodeError) as info:
        KeyValue.FromString(b"\x0a\x02\xff\xfe")
    assert not is_too_deep(info.value)


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def test_a_cached_attribute_set_is_checked_again_under_a_longer_name() -> None:
    converter = MetricsConverter(limits=LONG_NAMES)

    def once(name: str) -> Converted:
        req = ExportMetricsServiceRequest()
        m = req.resource_metrics.add().scope_metrics.add().metrics.add(name=name)
        m.gauge.data_points.add(as_double=1.0, attributes=[kv("a", "vvvvvvvvvv")])  # 11 bytes
        return convert(req, converter)

    assert len(once("m").points) == 1  # now cached
    assert len(once("m" * 29).points) == 1  # a hit checked: 29 + 11 = 40
    out = once("m" * 30)
    assert out.points == [] and out.refused == {"series_too_large": 1}
    assert list(converter._labels.values()) == [(("a", "vvvvvvvvvv"),)]


# -- resources and scopes: not series labels, bounded by max_resource_bytes ----------------------------------
def with_resource(req: ExportMetricsServiceRequest, index: int, attributes: dict[str, Any]) -> None:
    rm = req.resource_metrics[index]
    rm.resource.ClearField("attributes")
    rm.resource.attributes.extend(kv(k, v) for k, v in attributes.items())


def two_resources() -> ExportMetricsServiceRequest:
    """Resource 0 with two points, resource 1 with one; the same scope ("lib" 1.0, scope.attr=x) each."""
    req = request(sum_metric("a", [number(1), number(2)], DELTA, True))
    req.resource_metrics.extend(request(sum_metric("b", [number(3)], DELTA, True)).resource_metrics)
    return req


@pytest.mark.parametrize(
    ("attributes", "reason", "sentence"),
    [
        (
            {"blob": "x" * 100_000},
            "resource_too_large",
            "the resource is 100004 bytes: the resource plus scope (attributes, scope name and version) "
            "is over the limit of 65536 bytes (limits::max_resource_bytes)",
        ),
        (
            {"k" * 1025: "v"},
            "label_name_too_long",
            f'the attribute key "{"k" * 100}"... is 1025 bytes long: a label name is over the limit of '
            "1024 bytes (limits::max_label_name_length)",
        ),
        ({"esc\x1b": "v"}, "control_character", 'the attribute key "esc\\u001b" holds a control character'),
    ],
    ids=["resource_too_large", "label_name_too_long", "control_character"],
)
def test_a_resource_over_its_limits_refuses_its_points_with_one_sentence(
    attributes: dict[str, str], reason: str, sentence: str
) -> None:
    req = two_resources()
    with_resource(req, 0, attributes)
    out = convert(req)
    assert [p.name for p in out.points] == ["b"]
    assert out.refused == {reason: 2} and out.rejected == 2
    assert out.errors == [f"resource 0: {sentence} (2 data point(s))"]


def test_resource_values_and_count_are_bounded_by_bytes_only() -> None:
    req = two_resources()
    many = {f"attr.{i:03d}": "v" * 100 for i in range(500)}  # 500 labels (> 128), 54 KB
    with_resource(req, 0, many)
    with_resource(req, 1, {"service.name": "s", "process.command_line": "x" * 65_000})  # > 4096
    out = convert(req)
    assert out.refused == {} and [p.name for p in out.points] == ["a", "a", "b"]
    assert out.points[0].resource == Resource(tuple(many.items()))


def test_the_scope_counts_with_its_resource() -> None:
    limit = SeriesLimits().max_resource_bytes
    req = two_resources()
    # Resource 0 and its scope each fit, but not together; resource 1's smaller one fits with it.
    with_resource(req, 0, {"r": "x" * (limit - 100)})
    with_resource(req, 1, {"r": "x" * (limit - 300)})
    for rm in req.resource_metrics:
        rm.scope_metrics[0].scope.attributes.append(kv("s", "y" * 200))
    out = convert(req)
    assert [p.name for p in out.points] == ["b"] and out.refused == {"resource_too_large": 2}
    total = 1 + limit - 100 + len("lib1.0scope.attrx") + 1 + 200
    assert out.errors == [
        f"resource 0, scope 0: the resource and this scope are {total} bytes: the resource plus scope "
        "(attributes, scope name and version) is over the limit of 65536 bytes (limits::max_resource_bytes) "
        "(2 data point(s))"
    ]


def test_a_scope_name_counts_in_the_resource_bytes() -> None:
    req = two_resources()
    req.resource_metrics[0].scope_metrics[0].scope.name = "s" * 100_000
    req.resource_metrics[1].scope_metrics[0].scope.name = "s" * 5000  # over the label value limit: fine
    out = convert(req)
    assert [p.name for p in out.points] == ["b"] and out.refused == {"resource_too_large": 2}
    assert out.points[0].scope is not None and out.points[0].scope.name == "s" * 5000
    assert out.errors == [
        "resource 0, scope 0: the scope is 100014 bytes: the resource plus scope (attributes, scope name "
        "and version) is over the limit of 65536 bytes (limits::max_resource_bytes) (2 data point(s))"
    ]


def test_ten_mib_attributes_are_refused_on_a_resource_and_on_a_point() -> None:
    filler = "x" * (10 * 2**20)
    req = two_resources()
    with_resource(req, 0, {"service.name": "big", "v": filler})
    req.resource_metrics[1].scope_metrics[0].metrics.append(
        sum_metric("c", [number(4, {"v": filler}), number(5, {"v": "small"})], DELTA, True)
    )
    out = convert(req)
    assert out.refused == {"resource_too_large": 2, "label_value_too_long": 1}
    assert [(p.name, p.value) for p in out.points] == [("b", 3.0), ("c", 5.0)]
