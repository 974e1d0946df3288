"""The hand encoder (exporters/prometheus_remote_write/wire.py), checked by decoding with remote_pb2."""

from __future__ import annotations

import dataclasses
import math
import struct
from collections import defaultdict

import cramjam
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.exphist import ExpHistogram, downscale
from exporters.prometheus_remote_write import remote_pb2, wire

FRAMED_SNAPPY_MAGIC = bytes.fromhex("ff060000734e61507059")
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
NOW_MS = 1_700_000_000_123


def bits(v: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", v))[0])


def from_bits(b: int) -> float:
    return float(struct.unpack("<d", struct.pack("<Q", b))[0])


def decode(body: bytes) -> remote_pb2.WriteRequest:
    return remote_pb2.WriteRequest.FromString(body)


def one_series(series_bytes: bytes) -> remote_pb2.TimeSeries:
    req = decode(wire.encode_write_request([series_bytes]))
    assert len(req.timeseries) == 1
    return req.timeseries[0]


def label_pairs(ts: remote_pb2.TimeSeries) -> list[tuple[str, str]]:
    return [(label.name, label.value) for label in ts.labels]


# --- labels and samples ----------------------------------------------------------------------------

label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,20}", fullmatch=True)
label_values = st.text(min_size=1, max_size=40)  # any UTF-8 (hypothesis' text excludes surrogates)
label_sets = st.dictionaries(label_names, label_values, max_size=12).map(lambda d: tuple(sorted(d.items())))
timestamps = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
samples_st = st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True), timestamps), max_size=6)


@given(labels=label_sets, samples=samples_st)
@settings(max_examples=300, deadline=None)
def test_labels_and_samples_round_trip(
    labels: tuple[tuple[str, str], ...], samples: list[tuple[float, int]]
) -> None:
    ts = one_series(wire.encode_series(wire.encode_labels(labels), samples))
    assert label_pairs(ts) == list(labels)
    assert [(bits(s.value), s.timestamp) for s in ts.samples] == [(bits(v), t) for v, t in samples]


@given(series=st.lists(st.tuples(label_sets, samples_st), max_size=8))
@settings(max_examples=100, deadline=None)
def test_request_of_many_series_round_trips(
    series: list[tuple[tuple[tuple[str, str], ...], list[tuple[float, int]]]],
) -> None:
    req = decode(wire.encode_write_request(wire.encode_series(wire.encode_labels(ls), s) for ls, s in series))
    assert len(req.timeseries) == len(series)
    for ts, (labels, samples) in zip(req.timeseries, series, strict=True):
        assert label_pairs(ts) == list(labels)
        assert [(bits(s.value), s.timestamp) for s in ts.samples] == [(bits(v), t) for v, t in samples]


def test_label_order_and_unicode_values_are_kept() -> None:
    labels = (
        ("__name__", "http_requests_total"),
        ("city", "Zürich"),
        ("emoji", "🚀 ok"),
        ("path", "/ä/日本語/\x00/\n"),
        ("zone", "z"),
    )
    ts = one_series(wire.encode_series(wire.encode_labels(labels), [(1.0, NOW_MS)]))
    assert label_pairs(ts) == list(labels)


def test_empty_label_values_are_skipped() -> None:
    labels = (("__name__", "m"), ("a", ""), ("b", "x"), ("c", ""))
    ts = one_series(wire.encode_series(wire.encode_labels(labels), [(1.0, NOW_MS)]))
    assert label_pairs(ts) == [("__name__", "m"), ("b", "x")]


@pytest.mark.skipif(not __debug__, reason="the sortedness check is an assert")
@pytest.mark.parametrize(
    "labels",
    [
        (("b", "1"), ("a", "2")),  # unsorted
        (("a", "1"), ("a", "2")),  # repeated name
        (("", "1"),),  # empty name
    ],
)
def test_unsorted_or_repeated_labels_fail_in_debug(labels: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(AssertionError):
        wire.encode_labels(labels)


def test_labels_longer_than_the_varint_table() -> None:
    # Lengths past 2**14 take the general varint path, in the label, the series and the request.
    labels = (("__name__", "m"), ("big", "ü" * 20_000), *((f"l{i:03d}", "v" * 100) for i in range(200)))
    ts = one_series(wire.encode_series(wire.encode_labels(labels), [(2.5, NOW_MS)]))
    assert label_pairs(ts) == list(labels)
    assert [(s.value, s.timestamp) for s in ts.samples] == [(2.5, NOW_MS)]


@pytest.mark.parametrize(
    "value",
    [0.0, -0.0, 1.0, -1.5, 1e308, -1e308, 5e-324, math.inf, -math.inf, 2.0**53 + 1, -123456789.125],
)
def test_sample_values_are_exact(value: float) -> None:
    ts = one_series(wire.encode_series(wire.encode_labels((("__name__", "m"),)), [(value, NOW_MS)]))
    assert bits(ts.samples[0].value) == bits(value)


@pytest.mark.parametrize(
    "nan_bits",
    [wire.STALE_NAN_BITS, bits(math.nan), 0x7FF8000000000001, 0xFFF8000000000000, 0x7FF0000000000001],
)
def test_nan_bit_patterns_are_preserved(nan_bits: int) -> None:
    ts = one_series(wire.encode_series(wire.encode_labels((("__name__", "m"),)), [(from_bits(nan_bits), 1)]))
    assert bits(ts.samples[0].value) == nan_bits


def test_stale_nan() -> None:
    assert wire.STALE_NAN_BITS == 0x7FF0000000000002
    assert bits(wire.STALE_NAN) == wire.STALE_NAN_BITS
    assert wire.is_stale_nan(wire.STALE_NAN)
    assert not wire.is_stale_nan(math.nan)
    assert not wire.is_stale_nan(float("nan"))
    assert not wire.is_stale_nan(from_bits(0x7FF0000000000001))
    assert not wire.is_stale_nan(1.0)
    assert not wire.is_stale_nan(math.inf)
    ts = one_series(wire.encode_series(b"", [(wire.STALE_NAN, NOW_MS), (math.nan, NOW_MS + 1)]))
    assert wire.is_stale_nan(ts.samples[0].value)
    assert not wire.is_stale_nan(ts.samples[1].value)


@pytest.mark.parametrize(
    "timestamp_ms",
    [0, 1, 127, 128, NOW_MS, 4_102_444_800_000, INT64_MAX, -1, -NOW_MS, INT64_MIN],
)
def test_int64_timestamps(timestamp_ms: int) -> None:
    ts = one_series(wire.encode_series(wire.encode_labels((("__name__", "m"),)), [(1.0, timestamp_ms)]))
    assert ts.samples[0].timestamp == timestamp_ms


def test_several_samples_keep_their_order() -> None:
    samples = [(float(i), NOW_MS + 1000 * i) for i in range(5)]
    ts = one_series(wire.encode_series(wire.encode_labels((("__name__", "m"),)), samples))
    assert [(s.value, s.timestamp) for s in ts.samples] == samples


@pytest.mark.parametrize("timestamp_ms", [0, NOW_MS, INT64_MAX, -1, INT64_MIN])
def test_one_sample_each_is_encode_series_of_each(timestamp_ms: int) -> None:
    labels = [wire.encode_labels((("__name__", "m_bucket"), ("le", le))) for le in ("0.1", "1", "+Inf")]
    labels.append(b"")
    values = [1.0, 3.0, 4.0, wire.STALE_NAN]
    got = wire.encode_each(labels, values, timestamp_ms)
    assert got == [wire.encode_series(lb, [(v, timestamp_ms)]) for lb, v in zip(labels, values, strict=True)]


def test_series_without_samples_or_labels() -> None:
    ts = one_series(wire.encode_series(b"", []))
    assert list(ts.labels) == [] and list(ts.samples) == []


def test_matches_generated_serialisation_byte_for_byte() -> None:
    # With no zero-valued fields (which proto3 omits) the two encoders agree exactly.
    labels = (("__name__", "up"), ("instance", "host:9100"), ("job", "node"))
    expected = remote_pb2.WriteRequest()
    series = expected.timeseries.add()
    for name, value in labels:
        series.labels.add(name=name, value=value)
    series.samples.add(value=1.0, timestamp=NOW_MS)
    series.samples.add(value=-2.5, timestamp=NOW_MS + 15_000)
    hand = wire.encode_write_request(
        [wire.encode_series(wire.encode_labels(labels), [(1.0, NOW_MS), (-2.5, NOW_MS + 15_000)])]
    )
    assert hand == expected.SerializeToString(deterministic=True)


def test_empty_request() -> None:
    body = wire.encode_write_request([])
    assert body == b""
    assert len(decode(body).timeseries) == 0
    assert wire.decompress(wire.compress(body)) == b""


# --- native histograms -----------------------------------------------------------------------------


def exp_histogram(
    scale: int,
    positive: list[float],
    positive_offset: int = 0,
    negative: list[float] | None = None,
    negative_offset: int = 0,
    zero_count: float = 0.0,
    sum_: float = 1.0,
) -> ExpHistogram:
    negative = negative or []
    return ExpHistogram(
        scale=scale,
        zero_count=zero_count,
        positive_offset=positive_offset,
        positive_counts=np.array(positive, dtype=np.float64),
        negative_offset=negative_offset,
        negative_counts=np.array(negative, dtype=np.float64),
        count=float(sum(positive) + sum(negative) + zero_count),
        sum=sum_,
        min=-1.0,
        max=1.0,
    )


def decode_histogram(series_bytes: bytes) -> remote_pb2.Histogram:
    ts = one_series(series_bytes)
    assert len(ts.samples) == 0 and len(ts.histograms) == 1
    return ts.histograms[0]


def expand(
    spans: list[remote_pb2.BucketSpan], deltas: list[int], counts: list[float], integral: bool
) -> dict[int, float]:
    """Prometheus bucket index → count, as a receiver rebuilds it from spans and deltas/counts."""
    indices: list[int] = []
    index = 0  # the first offset is absolute, later ones are relative to the previous span's end
    for span in spans:
        index += span.offset
        for _ in range(span.length):
            indices.append(index)
            index += 1
    if integral:
        assert counts == []
        values: list[float] = []
        running = 0
        for d in deltas:
            running += d
            values.append(float(running))
    else:
        assert deltas == []
        values = counts
    assert len(values) == len(indices)
    return {i: v for i, v in zip(indices, values, strict=True) if v != 0}


def expected_buckets(counts: np.ndarray, otel_offset: int) -> dict[int, float]:
    """OTel bucket i covers (base^i, base^(i+1)], Prometheus bucket j covers (base^(j-1), base^j]."""
    return {otel_offset + k + 1: float(c) for k, c in enumerate(counts.tolist()) if c != 0}


def assert_same_buckets(ph: remote_pb2.Histogram, h: ExpHistogram, integral: bool) -> None:
    pos = expand(list(ph.positive_spans), list(ph.positive_deltas), list(ph.positive_counts), integral)
    neg = expand(list(ph.negative_spans), list(ph.negative_deltas), list(ph.negative_counts), integral)
    assert pos == expected_buckets(h.positive_counts, h.positive_offset)
    assert neg == expected_buckets(h.negative_counts, h.negative_offset)


def test_integer_histogram() -> None:
    h = exp_histogram(
        scale=3,
        positive=[1, 0, 2, 0, 0, 7, 0, 0, 0, 1, 3],
        positive_offset=-4,
        negative=[4, 0, 0, 0, 0, 2],
        negative_offset=2,
        zero_count=5,
        sum_=-12.25,
    )
    ph = decode_histogram(wire.encode_histogram_series(wire.encode_labels((("__name__", "h"),)), h, NOW_MS))
    assert ph.WhichOneof("count") == "count_int" and ph.count_int == 25
    assert ph.WhichOneof("zero_count") == "zero_count_int" and ph.zero_count_int == 5
    assert ph.sum == -12.25
    assert ph.schema == 3
    assert ph.zero_threshold == 0.0
    assert ph.reset_hint == remote_pb2.Histogram.UNKNOWN
    assert ph.timestamp == NOW_MS
    assert list(ph.positive_counts) == [] and list(ph.negative_counts) == []
    assert_same_buckets(ph, h, integral=True)
    # Runs of up to two empty buckets stay inside a span; three or more split it.
    assert [(s.offset, s.length) for s in ph.positive_spans] == [(-3, 6), (3, 2)]
    assert [(s.offset, s.length) for s in ph.negative_spans] == [(3, 1), (4, 1)]
    assert list(ph.positive_deltas) == [1, -1, 2, -2, 0, 7, -6, 2]


def test_float_histogram() -> None:
    h = exp_histogram(
        scale=0,
        positive=[0.5, 0, 0, 0, 2.25],
        positive_offset=1,
        negative=[1.0, 0.0, 3.0],
        negative_offset=-3,
        zero_count=1.0,
    )
    ph = decode_histogram(wire.encode_histogram_series(b"", h, NOW_MS))
    assert ph.WhichOneof("count") == "count_float" and ph.count_float == h.count
    assert ph.WhichOneof("zero_count") == "zero_count_float" and ph.zero_count_float == 1.0
    assert list(ph.positive_deltas) == [] and list(ph.negative_deltas) == []
    assert list(ph.positive_counts) == [0.5, 2.25]
    assert list(ph.negative_counts) == [1.0, 0.0, 3.0]
    assert_same_buckets(ph, h, integral=False)


def test_zero_counts_still_choose_the_oneof() -> None:
    # Both oneofs are written even when 0: their member is what marks a float histogram.
    ph = decode_histogram(wire.encode_histogram_series(b"", exp_histogram(scale=0, positive=[]), NOW_MS))
    assert ph.WhichOneof("count") == "count_int" and ph.count_int == 0
    assert ph.WhichOneof("zero_count") == "zero_count_int"
    assert list(ph.positive_spans) == [] and list(ph.negative_spans) == []
    ph = decode_histogram(
        wire.encode_histogram_series(b"", exp_histogram(scale=0, positive=[], zero_count=0.5), NOW_MS)
    )
    assert ph.WhichOneof("count") == "count_float" and ph.count_float == 0.5
    assert ph.WhichOneof("zero_count") == "zero_count_float" and ph.zero_count_float == 0.5


def test_only_zero_buckets() -> None:
    h = exp_histogram(scale=2, positive=[0, 0, 0], negative=[0], zero_count=3)
    ph = decode_histogram(wire.encode_histogram_series(b"", h, NOW_MS))
    assert ph.zero_count_int == 3 and ph.count_int == 3
    assert list(ph.positive_spans) == [] and list(ph.negative_spans) == []


def test_reset_hint_yes() -> None:
    h = exp_histogram(scale=1, positive=[1])
    assert decode_histogram(wire.encode_histogram_series(b"", h, 1, reset=True)).reset_hint == (
        remote_pb2.Histogram.YES
    )


@pytest.mark.parametrize("timestamp_ms", [0, NOW_MS, INT64_MAX, -1, INT64_MIN])
def test_histogram_timestamps(timestamp_ms: int) -> None:
    h = exp_histogram(scale=1, positive=[1])
    assert decode_histogram(wire.encode_histogram_series(b"", h, timestamp_ms)).timestamp == timestamp_ms


def test_histogram_labels_and_sum() -> None:
    labels = (("__name__", "latency_seconds"), ("route", "/ö"))
    h = exp_histogram(scale=1, positive=[1], sum_=math.nan)
    ts = one_series(wire.encode_histogram_series(wire.encode_labels(labels), h, NOW_MS))
    assert label_pairs(ts) == list(labels)
    assert math.isnan(ts.histograms[0].sum)


def downscaled_expectation(counts: np.ndarray, otel_offset: int, by: int) -> dict[int, float]:
    """Bucket i at scale s is bucket i >> by at scale s - by; as Prometheus indices (j = i + 1)."""
    merged: defaultdict[int, float] = defaultdict(float)
    for k, c in enumerate(counts.tolist()):
        if c:
            merged[(otel_offset + k) >> by] += c
    return {i + 1: float(c) for i, c in merged.items() if c}


@pytest.mark.parametrize("scale", [9, 12, 20])
def test_scale_above_8_is_downscaled(scale: int) -> None:
    h = exp_histogram(
        scale=scale,
        positive=[1, 2, 0, 0, 0, 0, 3, 1, 1, 0, 5],
        positive_offset=-7,
        negative=[2, 0, 1, 4],
        negative_offset=1021,
        zero_count=2,
    )
    ph = decode_histogram(wire.encode_histogram_series(b"", h, NOW_MS))
    assert ph.schema == 8
    assert ph.count_int == h.count and ph.zero_count_int == 2
    by = scale - 8
    pos = expand(list(ph.positive_spans), list(ph.positive_deltas), [], integral=True)
    neg = expand(list(ph.negative_spans), list(ph.negative_deltas), [], integral=True)
    assert pos == downscaled_expectation(h.positive_counts, h.positive_offset, by)
    assert neg == downscaled_expectation(h.negative_counts, h.negative_offset, by)
    # And it is exactly what exphist.downscale gives.
    assert_same_buckets(ph, downscale(h, by), integral=True)


@pytest.mark.parametrize("scale", [-4, 0, 8])
def test_representable_scales_are_kept(scale: int) -> None:
    h = exp_histogram(scale=scale, positive=[1, 2], positive_offset=-1)
    assert decode_histogram(wire.encode_histogram_series(b"", h, NOW_MS)).schema == scale


@pytest.mark.parametrize("scale", [-5, -10])
def test_scale_below_minus_4_is_refused(scale: int) -> None:
    with pytest.raises(ValueError, match="scale"):
        wire.encode_histogram_series(b"", exp_histogram(scale=scale, positive=[1]), NOW_MS)


int_counts = st.one_of(st.just(0.0), st.integers(min_value=0, max_value=1 << 40).map(float))
float_counts = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1e12, allow_subnormal=False))


@given(
    scale=st.integers(min_value=-4, max_value=8),
    data=st.data(),
    integral=st.booleans(),
    positive_offset=st.integers(min_value=-2000, max_value=2000),
    negative_offset=st.integers(min_value=-2000, max_value=2000),
)
@settings(max_examples=300, deadline=None)
def test_histogram_buckets_round_trip(
    scale: int, data: st.DataObject, integral: bool, positive_offset: int, negative_offset: int
) -> None:
    count = int_counts if integral else float_counts
    h = exp_histogram(
        scale=scale,
        positive=data.draw(st.lists(count, max_size=40)),
        positive_offset=positive_offset,
        negative=data.draw(st.lists(count, max_size=40)),
        negative_offset=negative_offset,
        zero_count=data.draw(count),
    )
    ph = decode_histogram(wire.encode_histogram_series(b"", h, NOW_MS))
    decoded_integral = ph.WhichOneof("count") == "count_int"
    all_counts = [h.zero_count, h.count, *h.positive_counts.tolist(), *h.negative_counts.tolist()]
    assert decoded_integral == all(c == math.floor(c) for c in all_counts)
    assert ph.schema == scale
    assert_same_buckets(ph, h, integral=decoded_integral)
    if decoded_integral:
        assert ph.count_int == h.count and ph.zero_count_int == h.zero_count
    else:
        assert ph.count_float == h.count and ph.zero_count_float == h.zero_count
    for spans in (ph.positive_spans, ph.negative_spans):
        # Spans never hold an empty edge bucket, and gaps between spans are longer than 2 buckets.
        assert all(s.length > 0 for s in spans)
        assert all(s.offset > 2 for s in list(spans)[1:])


def test_non_integral_total_count_selects_the_float_form() -> None:
    h = dataclasses.replace(exp_histogram(scale=0, positive=[1, 2]), count=3.5)
    ph = decode_histogram(wire.encode_histogram_series(b"", h, NOW_MS))
    assert ph.WhichOneof("count") == "count_float" and ph.count_float == 3.5
    assert list(ph.positive_counts) == [1.0, 2.0]


# --- snappy ----------------------------------------------------------------------------------------


def test_snappy_block_format_not_framed() -> None:
    labels = wire.encode_labels((("__name__", "m"), ("job", "x")))
    body = wire.encode_write_request(wire.encode_series(labels, [(float(i), NOW_MS)]) for i in range(500))
    compressed = wire.compress(body)
    assert isinstance(compressed, bytes)
    assert not compressed.startswith(FRAMED_SNAPPY_MAGIC)
    assert bytes(cramjam.snappy.decompress_raw(compressed)) == body
    assert wire.decompress(compressed) == body
    assert len(compressed) < len(body)
    # The check above can fail: the framed format does start with the magic.
    assert bytes(cramjam.snappy.compress(body)).startswith(FRAMED_SNAPPY_MAGIC)
