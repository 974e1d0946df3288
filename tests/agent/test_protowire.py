"""agent/protowire: the varints and fields of the hand encoders equal what protobuf itself writes."""

from __future__ import annotations

import numpy as np
from google.protobuf.internal import encoder
from opentelemetry.proto.metrics.v1.metrics_pb2 import ExponentialHistogramDataPoint

from agent import protowire
from exporters.prometheus_remote_write import remote_pb2

EDGES = [0, 1, 127, 128, 255, 16383, 16384, 16385, 2**21 - 1, 2**21, 2**32, 2**63, 2**64 - 1]


def test_uvarint_matches_protobuf_on_each_length_boundary() -> None:
    for n in EDGES:
        assert protowire.uvarint(n) == protowire.encode_uvarint(n) == encoder._VarintBytes(n), n


def test_int64_varint_decodes_as_the_int64_it_encodes() -> None:
    for n in [0, 1, -1, 1_700_000_000_000, -(2**63), 2**63 - 1]:
        body = b"\x10" + protowire.int64_varint(n)  # Sample.timestamp = 2 (int64)
        assert remote_pb2.Sample.FromString(body).timestamp == n  # type: ignore[attr-defined]
        assert protowire.cached_int64_varint(n) == protowire.int64_varint(n)


def test_zigzag_and_field_decode_as_a_sint32_and_a_message() -> None:
    for scale in [-10, -1, 0, 1, 20]:
        offset = scale * 3
        buckets = b"\x08" + protowire.uvarint(protowire.zigzag(offset))  # Buckets.offset (sint32)
        body = b"\x30" + protowire.uvarint(protowire.zigzag(scale)) + protowire.field(b"\x42", buckets)
        point = ExponentialHistogramDataPoint.FromString(body)
        assert (point.scale, point.positive.offset) == (scale, offset)


def test_packed_uvarints_equal_the_varints_back_to_back() -> None:
    values = np.array([*EDGES, 5, 0, 300], dtype=np.uint64)
    assert protowire.packed_uvarints(values) == b"".join(protowire.encode_uvarint(int(v)) for v in values)
    assert protowire.packed_uvarints(np.array([3, 0, 127], dtype=np.uint64)) == bytes([3, 0, 127])
    assert protowire.packed_uvarints(np.array([], dtype=np.uint64)) == b""
