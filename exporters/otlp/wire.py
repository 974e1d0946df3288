"""OTLP metrics wire encoding, by hand, for the export hot path.

Building an ``ExportMetricsServiceRequest`` through the generated opentelemetry-proto classes costs
~8 µs per data point here; writing the protobuf bytes directly, with each series' attributes encoded
once and cached by the caller, costs about a tenth of that (``bench/otlp_encode.py``). The tests decode
everything written here with the generated classes, which stay the reference for the schema.

Layout, outermost first (field numbers from opentelemetry-proto, metrics/v1 and collector/metrics/v1)::

    ExportMetricsServiceRequest.resource_metrics(1) → ResourceMetrics
        resource(1) → Resource.attributes(1) → KeyValue
        scope_metrics(2) → ScopeMetrics: scope(1) → InstrumentationScope, metrics(2) → Metric
            Metric: name(1) description(2) unit(3) and one of gauge(5) sum(7) histogram(9)
                    exponential_histogram(10) summary(11), each holding data_points(1) and, except
                    gauge and summary, aggregation_temporality(2); sum also is_monotonic(3)

Contracts:
- A data point is returned as a complete ``data_points`` entry (tag, length, body); a metric's data
  is the concatenation of its entries (:func:`metric`), a request is built by :func:`request`.
- Attribute bytes (:func:`attributes`) depend only on the pairs and the field they go in: the caller
  caches them per series. A value is written as the ``AnyValue`` it arrived as when it is an
  ``agent.model.TypedValue`` (an OTLP attribute that was not a string, unchanged since), otherwise as
  an ``AnyValue.string_value`` (empty ones too). A NaN double goes out as the canonical quiet NaN.
- Times are fixed64 nanoseconds; a zero start time is left out (proto3 default).
- Histogram counts are uint64 on the wire: fractional counts (StatsD sample rates) are rounded to the
  nearest integer per bucket and the point's count is the sum of the rounded buckets, so the OTLP
  invariant count == zero_count + sum(bucket_counts) always holds. sum is written as given, except
  that a histogram's unknown (NaN) sum leaves its optional ``sum`` field out.
  min and max are written only when both are finite and min <= max (unknown otherwise).
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from agent.exphist import ExpHistogram
from agent.model import BoolValue, BytesValue, DoubleValue, EncodedValue, IntValue
from agent.protowire import SMALL_VARINTS, field, packed_uvarints, uvarint

# Field tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited).
TAG_RESOURCE_METRICS = b"\x0a"  # ExportMetricsServiceRequest.resource_metrics = 1
TAG_RESOURCE = b"\x0a"  # ResourceMetrics.resource = 1 (also ResourceSpans / ResourceLogs)
TAG_SCOPE_METRICS = b"\x12"  # ResourceMetrics.scope_metrics = 2
TAG_SCOPE = b"\x0a"  # ScopeMetrics.scope = 1
TAG_METRIC = b"\x12"  # ScopeMetrics.metrics = 2
TAG_DATA_POINT = b"\x0a"  # Gauge/Sum/Histogram/ExponentialHistogram/Summary.data_points = 1

ATTR_RESOURCE = b"\x0a"  # Resource.attributes = 1
ATTR_SCOPE = b"\x1a"  # InstrumentationScope.attributes = 3
ATTR_NUMBER = b"\x3a"  # NumberDataPoint.attributes = 7
ATTR_HISTOGRAM = b"\x4a"  # HistogramDataPoint.attributes = 9
ATTR_EXPONENTIAL = b"\x0a"  # ExponentialHistogramDataPoint.attributes = 1
ATTR_SUMMARY = b"\x3a"  # SummaryDataPoint.attributes = 7

DATA_GAUGE = b"\x2a"  # Metric.gauge = 5
DATA_SUM = b"\x3a"  # Metric.sum = 7
DATA_HISTOGRAM = b"\x4a"  # Metric.histogram = 9
DATA_EXPONENTIAL = b"\x52"  # Metric.exponential_histogram = 10
DATA_SUMMARY = b"\x5a"  # Metric.summary = 11

_TAG_START = 0x11  # *DataPoint.start_time_unix_nano = 2 (fixed64)
_TAG_TIME = 0x19  # *DataPoint.time_unix_nano = 3 (fixed64)
_TAG_AS_DOUBLE = 0x21  # NumberDataPoint.as_double = 4
_TAG_COUNT = 0x21  # Histogram/ExponentialHistogram/SummaryDataPoint.count = 4 (fixed64)
_TAG_SUM = 0x29  # .sum = 5 (double)
_TAG_BUCKET_COUNTS = b"\x32"  # HistogramDataPoint.bucket_counts = 6 (packed fixed64)
_TAG_BOUNDS = b"\x3a"  # HistogramDataPoint.explicit_bounds = 7 (packed double)
_TAG_HIST_MIN = 0x59  # HistogramDataPoint.min = 11
_TAG_HIST_MAX = 0x61  # HistogramDataPoint.max = 12
_TAG_SCALE = b"\x30"  # ExponentialHistogramDataPoint.scale = 6 (sint32)
_TAG_ZERO_COUNT = 0x39  # ExponentialHistogramDataPoint.zero_count = 7 (fixed64)
_TAG_POSITIVE = b"\x42"  # ExponentialHistogramDataPoint.positive = 8
_TAG_NEGATIVE = b"\x4a"  # ExponentialHistogramDataPoint.negative = 9
_TAG_EXP_MIN = 0x61  # ExponentialHistogramDataPoint.min = 12
_TAG_EXP_MAX = 0x69  # ExponentialHistogramDataPoint.max = 13
_TAG_BUCKETS_OFFSET = b"\x08"  # Buckets.offset = 1 (sint32)
_TAG_BUCKETS_COUNTS = b"\x12"  # Buckets.bucket_counts = 2 (packed uint64)
_TAG_QUANTILE = b"\x32"  # SummaryDataPoint.quantile_values = 6
_TAG_TEMPORALITY = b"\x10"  # Sum/Histogram/ExponentialHistogram.aggregation_temporality = 2
_TAG_MONOTONIC = b"\x18"  # Sum.is_monotonic = 3

_DOUBLE = struct.Struct("<d")
_TAGGED_DOUBLE = struct.Struct("<Bd")
_TAGGED_FIXED64 = struct.Struct("<BQ")
# A NumberDataPoint after its attributes: start, time and value in one pack call (the whole per-point
# cost of a counter is little more than this and one concatenation).
NUMBER_TAIL = struct.Struct("<BQBQBd")
NUMBER_TAIL_NO_START = struct.Struct("<BQBd")
_TIMES = struct.Struct("<BQBQ")
_TIME_ONLY = struct.Struct("<BQ")
_COUNT_SUM = struct.Struct("<BQBd")
_MIN_MAX_EXP = struct.Struct("<BdBd")
_QUANTILE = struct.Struct("<BBBdBd")  # tag, length 18, quantile tag, quantile, value tag, value


def _string(tag: bytes, text: str) -> bytes:
    return field(tag, text.encode()) if text else b""


def attributes(tag: bytes, pairs: Iterable[tuple[str, str]]) -> bytes:
    """Repeated ``KeyValue`` fields (``tag`` names the field they fill): an ``agent.model.TypedValue``
    as the ``AnyValue`` it arrived as, any other value as a string."""
    parts = []
    for key, value in pairs:
        # Text (the usual case) as AnyValue.string_value = 1, kept even when empty.
        any_value = field(b"\x0a", value.encode()) if value.__class__ is str else any_value_of(value)
        parts.append(field(tag, field(b"\x0a", key.encode()) + field(b"\x12", any_value)))
    return b"".join(parts)


_UINT64 = (1 << 64) - 1


def any_value_of(value: str) -> bytes:
    """The ``AnyValue`` body of a label value: as it arrived when it is an ``agent.model.TypedValue``,
    else ``string_value``. Scalars are read back from their text, which is exact."""
    cls = value.__class__
    if cls is IntValue:
        return b"\x18" + uvarint(int(value) & _UINT64)  # int_value = 3 (int64: negatives as 2**64 + v)
    if cls is DoubleValue:
        return _TAGGED_DOUBLE.pack(0x21, float(value))  # double_value = 4 (NaN, +Inf, -Inf parse too)
    if cls is BoolValue:
        return b"\x10\x01" if value == "true" else b"\x10\x00"  # bool_value = 2 (a oneof: false is kept)
    if cls is BytesValue:
        return field(b"\x3a", base64.b64decode(value))  # bytes_value = 7
    if isinstance(value, EncodedValue):
        return value.any_value  # an array, kvlist or empty value, as it arrived
    return field(b"\x0a", value.encode())


def resource(pairs: Iterable[tuple[str, str]]) -> bytes:
    """A ``Resource`` message body."""
    return attributes(ATTR_RESOURCE, pairs)


def scope(name: str, version: str, pairs: Iterable[tuple[str, str]] = ()) -> bytes:
    """An ``InstrumentationScope`` message body."""
    return _string(b"\x0a", name) + _string(b"\x12", version) + attributes(ATTR_SCOPE, pairs)


def metric_head(name: str, description: str, unit: str) -> bytes:
    """The ``Metric`` fields before its data."""
    return _string(b"\x0a", name) + _string(b"\x12", description) + _string(b"\x1a", unit)


def data_trailer(temporality: int, monotonic: bool | None) -> bytes:
    """Fields after the data points: temporality (0 for gauge and summary) and Sum.is_monotonic."""
    out = b""
    if temporality:
        out += _TAG_TEMPORALITY + uvarint(temporality)
    if monotonic:
        out += _TAG_MONOTONIC + b"\x01"
    return out


def metric(head: bytes, data_tag: bytes, points: Sequence[bytes], trailer: bytes) -> bytes:
    """One ``ScopeMetrics.metrics`` entry from :func:`metric_head`, a DATA_* tag and data points."""
    inner = b"".join(points) + trailer
    body = head + data_tag + uvarint(len(inner)) + inner
    return TAG_METRIC + uvarint(len(body)) + body


def request(resources: Iterable[tuple[bytes, Iterable[tuple[bytes, Iterable[bytes]]]]]) -> bytes:
    """An ``ExportMetricsServiceRequest`` from (resource body, [(scope body, [metric entry])])."""
    out = []
    for resource_body, scopes in resources:
        parts = [field(TAG_RESOURCE, resource_body)]
        for scope_body, metrics in scopes:
            parts.append(field(TAG_SCOPE_METRICS, field(TAG_SCOPE, scope_body) + b"".join(metrics)))
        out.append(field(TAG_RESOURCE_METRICS, b"".join(parts)))
    return b"".join(out)


def number_heads(attrs: bytes) -> tuple[bytes, bytes]:
    """Cached prefixes of a series' NumberDataPoint entries: (with start time, without).

    An entry is ``head + NUMBER_TAIL.pack(0x11, start, 0x19, time, 0x21, value)`` (or the no-start
    form); the length in the head is fixed because the tail's is.
    """
    return (
        TAG_DATA_POINT + uvarint(len(attrs) + NUMBER_TAIL.size) + attrs,
        TAG_DATA_POINT + uvarint(len(attrs) + NUMBER_TAIL_NO_START.size) + attrs,
    )


def number_point(heads: tuple[bytes, bytes], start_ns: int, time_ns: int, value: float) -> bytes:
    """A NumberDataPoint entry (as_double)."""
    if start_ns:
        return heads[0] + NUMBER_TAIL.pack(_TAG_START, start_ns, _TAG_TIME, time_ns, _TAG_AS_DOUBLE, value)
    return heads[1] + NUMBER_TAIL_NO_START.pack(_TAG_TIME, time_ns, _TAG_AS_DOUBLE, value)


def _times(start_ns: int, time_ns: int) -> bytes:
    if start_ns:
        return _TIMES.pack(_TAG_START, start_ns, _TAG_TIME, time_ns)
    return _TIME_ONLY.pack(_TAG_TIME, time_ns)


def _count_sum(count: int, total: float) -> bytes:
    """A histogram's count and its optional sum, left out when unknown (NaN)."""
    if total == total:
        return _COUNT_SUM.pack(_TAG_COUNT, count, _TAG_SUM, total)
    return _TAGGED_FIXED64.pack(_TAG_COUNT, count)


def _min_max(lowest: float | None, highest: float | None, min_tag: int, max_tag: int) -> bytes:
    if lowest is None or highest is None:
        return b""
    if not (math.isfinite(lowest) and math.isfinite(highest) and lowest <= highest):
        return b""
    return _TAGGED_DOUBLE.pack(min_tag, lowest) + _TAGGED_DOUBLE.pack(max_tag, highest)


def rounded(counts: npt.NDArray[np.float64]) -> npt.NDArray[np.uint64]:
    """Float bucket counts (never negative) as the nearest integers."""
    return np.rint(counts).astype(np.uint64)


_add_reduce = np.add.reduce
_max_reduce = np.maximum.reduce
_rint = np.rint
_U8 = np.uint8


def _side(tag: bytes, offset: int, counts: npt.NDArray[np.float64]) -> tuple[bytes, int]:
    """A ``Buckets`` field of rounded counts, and their sum."""
    # Small numpy calls cost ~0.3-1 µs each here, which is most of a histogram's cost: one rounding,
    # one sum, and no max when the sum proves every count fits a one-byte varint.
    r = _rint(counts)
    total = int(_add_reduce(r))
    if total < 0x80 or _max_reduce(r) < 0x80:
        packed = r.astype(_U8).tobytes()
    else:
        packed = packed_uvarints(r.astype(np.uint64))
    body = _TAG_BUCKETS_OFFSET + uvarint((offset << 1) ^ (offset >> 63)) + _TAG_BUCKETS_COUNTS
    body += uvarint(len(packed)) + packed
    return tag + uvarint(len(body)) + body, total


def exponential_point(attrs: bytes, h: ExpHistogram, start_ns: int, time_ns: int) -> bytes:
    """An ExponentialHistogramDataPoint entry; ``attrs`` made with ATTR_EXPONENTIAL.

    zero_threshold is left at 0: the agent's zero bucket holds exact zeros only.
    """
    zero = round(h.zero_count)
    count = zero
    sides = b""
    if h.positive_counts.size:
        sides, n = _side(_TAG_POSITIVE, h.positive_offset, h.positive_counts)
        count += n
    if h.negative_counts.size:
        negative, n = _side(_TAG_NEGATIVE, h.negative_offset, h.negative_counts)
        sides += negative
        count += n
    scale = h.scale
    lowest, highest = h.min, h.max
    times = (
        _TIMES.pack(_TAG_START, start_ns, _TAG_TIME, time_ns)
        if start_ns
        else _TIME_ONLY.pack(_TAG_TIME, time_ns)
    )
    body = (
        attrs
        + times
        + _count_sum(count, h.sum)
        + _TAG_SCALE
        + SMALL_VARINTS[(scale << 1) ^ (scale >> 31)]
        + _TAGGED_FIXED64.pack(_TAG_ZERO_COUNT, zero)
        + sides
    )
    if count and lowest <= highest and -math.inf < lowest and highest < math.inf:
        body += _MIN_MAX_EXP.pack(_TAG_EXP_MIN, lowest, _TAG_EXP_MAX, highest)
    return TAG_DATA_POINT + uvarint(len(body)) + body


def packed_bounds(bounds: Sequence[float]) -> bytes:
    """The explicit_bounds field of a HistogramDataPoint: cache it per bound set."""
    return field(_TAG_BOUNDS, np.asarray(bounds, dtype="<f8").tobytes()) if len(bounds) else b""


def explicit_point(
    attrs: bytes,
    bounds_field: bytes,
    counts: Sequence[int],
    total: float,
    lowest: float | None,
    highest: float | None,
    start_ns: int,
    time_ns: int,
) -> bytes:
    """A HistogramDataPoint entry; ``attrs`` made with ATTR_HISTOGRAM, ``bounds_field`` with
    :func:`packed_bounds`, ``counts`` per bucket (one more than the bounds, whole and >= 0)."""
    body = (
        attrs
        + _times(start_ns, time_ns)
        + _count_sum(sum(counts), total)
        + field(_TAG_BUCKET_COUNTS, struct.pack(f"<{len(counts)}Q", *counts))
        + bounds_field
        + _min_max(lowest, highest, _TAG_HIST_MIN, _TAG_HIST_MAX)
    )
    return field(TAG_DATA_POINT, body)


def summary_point(
    attrs: bytes,
    count: int,
    total: float,
    quantiles: Sequence[tuple[float, float]],
    start_ns: int,
    time_ns: int,
) -> bytes:
    """A SummaryDataPoint entry; ``attrs`` made with ATTR_SUMMARY."""
    body = (
        attrs
        + _times(start_ns, time_ns)
        + _COUNT_SUM.pack(_TAG_COUNT, count, _TAG_SUM, total)
        + b"".join([_QUANTILE.pack(0x32, 18, 0x09, q, 0x11, v) for q, v in quantiles])
    )
    return field(TAG_DATA_POINT, body)


MAX_NESTING_OVERHEAD = 6
"""Upper bound of what one enclosing field adds (1-byte tag + a length varint below 2**32)."""
