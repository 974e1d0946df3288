"""Typed attributes through the agent: an OTLP request (generated classes) → ``MetricsConverter`` →
``MetricEncoder`` → decoded again with the generated classes. Int, double, bool, bytes, array, kvlist
and empty values of points, resources and scopes leave as the ``AnyValue`` they arrived as; a value a
stage changed leaves as a string; string-based stages see the same text as before."""

from __future__ import annotations

import math
import pickle
import random
import struct
import time
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource

from agent.model import BoolValue, BytesValue, DoubleValue, EncodedValue, IntValue, Kind, Point, TypedValue
from exporters.otlp import wire
from receivers.otlp.convert import MetricsConverter, labels_from_keyvalues, render_value, to_shadow
from tests.exporters.test_otlp_wire import data_points, encode, encoder

VALUES: dict[str, AnyValue] = {
    "str": AnyValue(string_value="GET"),
    "str_digits": AnyValue(string_value="200"),
    "str_empty": AnyValue(string_value=""),
    "int": AnyValue(int_value=200),
    "int_negative": AnyValue(int_value=-(2**63)),
    "double": AnyValue(double_value=0.25),
    "double_nan": AnyValue(double_value=math.nan),
    "double_inf": AnyValue(double_value=-math.inf),
    "bool": AnyValue(bool_value=False),
    "bytes": AnyValue(bytes_value=b"\x00\xff\x10"),
    "array_int": AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1), AnyValue(int_value=2)])),
    "array_str": AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a")])),
    "array_double": AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=1.0)])),
    "array_bool": AnyValue(array_value=ArrayValue(values=[AnyValue(bool_value=True)])),
    "array_bytes": AnyValue(array_value=ArrayValue(values=[AnyValue(bytes_value=b"\x01")])),
    "array_empty": AnyValue(array_value=ArrayValue()),
    "kvlist": AnyValue(
        kvlist_value=KeyValueList(
            values=[
                KeyValue(key="z", value=AnyValue(int_value=1)),
                KeyValue(key="a", value=AnyValue(array_value=ArrayValue(values=[AnyValue(bool_value=True)]))),
            ]
        )
    ),
    "empty": AnyValue(),
}


def keyvalues(values: dict[str, AnyValue]) -> list[KeyValue]:
    return [KeyValue(key=k, value=v) for k, v in values.items()]


def typed_request() -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.CopyFrom(PbResource(attributes=keyvalues({"service.name": VALUES["str"], **VALUES})))
    sm = rm.scope_metrics.add()
    sm.scope.CopyFrom(InstrumentationScope(name="lib", version="1", attributes=keyvalues(VALUES)))
    m = sm.metrics.add(name="requests")
    dp = m.gauge.data_points.add(time_unix_nano=time.time_ns(), as_double=1.0)
    dp.attributes.extend(keyvalues(VALUES))
    return req


def converted(req: ExportMetricsServiceRequest) -> list[Point]:
    out = MetricsConverter().convert(to_shadow(req), time.time_ns())
    assert not out.errors
    return out.points


def as_dict(kvs: Any) -> dict[str, AnyValue]:
    return {kv.key: kv.value for kv in kvs}


def same(a: AnyValue, b: AnyValue) -> bool:
    # Compared serialized: equal bytes mean equal kind and value (NaN included, which == is not).
    return bool(a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True))


def test_point_resource_and_scope_attributes_leave_as_they_arrived() -> None:
    (point,) = converted(typed_request())
    ((rm, sm, _, dp),) = data_points(encode(encoder(), [point]))
    for where, kvs, expected in (
        ("point", dp.attributes, VALUES),
        ("scope", sm.scope.attributes, VALUES),
        ("resource", rm.resource.attributes, {"service.name": VALUES["str"], **VALUES}),
    ):
        got = as_dict(kvs)
        assert set(got) >= set(expected), where
        for key, value in expected.items():
            assert same(got[key], value), (where, key, got[key], value)


def test_typed_values_are_their_text_and_string_values_stay_plain_str() -> None:
    labels = labels_from_keyvalues(keyvalues(VALUES))
    classes = {
        "int_value": IntValue,
        "double_value": DoubleValue,
        "bool_value": BoolValue,
        "bytes_value": BytesValue,
        "array_value": EncodedValue,
        "kvlist_value": EncodedValue,
        None: EncodedValue,
    }
    for key, value in labels:
        assert value == render_value(VALUES[key])
        which = VALUES[key].WhichOneof("value")
        if which == "string_value":
            assert type(value) is str, key  # string-only attributes cost nothing extra
        else:
            assert type(value) is classes[which], key
            assert same(AnyValue.FromString(wire.any_value_of(value)), VALUES[key]), key
    assert dict(labels)["int"] == "200" and hash(dict(labels)["int"]) == hash("200")
    assert dict(labels)["kvlist"] == '{"a":[true],"z":1}'


def test_a_changed_value_leaves_as_a_string_a_renamed_one_keeps_its_type() -> None:
    (point,) = converted(typed_request())
    labels = dict(point.labels)
    labels["int"] = "404"  # what a processor writes: a new plain str
    labels["renamed"] = labels.pop("double")
    labels["hashed"] = labels["bool"].upper()  # str methods make plain str
    changed = Point(point.name, point.kind, tuple(sorted(labels.items())), point.time_unix_nano, 1.0)
    ((_, _, _, dp),) = data_points(encode(encoder(), [changed]))
    got = as_dict(dp.attributes)
    assert got["int"].WhichOneof("value") == "string_value" and got["int"].string_value == "404"
    assert got["hashed"].WhichOneof("value") == "string_value" and got["hashed"].string_value == "FALSE"
    assert got["renamed"].WhichOneof("value") == "double_value" and got["renamed"].double_value == 0.25
    assert got["bool"].WhichOneof("value") == "bool_value"


def test_int_and_string_of_the_same_text_are_one_series_and_the_first_wins() -> None:
    t = time.time_ns()
    as_int = (("code", IntValue("200")),)
    as_str = (("code", "200"),)
    enc = encoder()
    first = data_points(
        encode(enc, [Point("c", Kind.GAUGE, as_int, t, 1.0), Point("c", Kind.GAUGE, as_str, t, 2.0)])
    )
    assert enc.series == 1
    assert [dp.attributes[0].value.WhichOneof("value") for *_, dp in first] == ["int_value", "int_value"]
    enc = encoder()
    other = data_points(
        encode(enc, [Point("c", Kind.GAUGE, as_str, t, 1.0), Point("c", Kind.GAUGE, as_int, t, 2.0)])
    )
    assert [dp.attributes[0].value.WhichOneof("value") for *_, dp in other] == [
        "string_value",
        "string_value",
    ]


def test_typed_values_survive_pickling_and_encode_like_the_generated_classes() -> None:
    for key, value in VALUES.items():
        (typed,) = labels_from_keyvalues([KeyValue(key=key, value=value)])
        back = pickle.loads(pickle.dumps(typed[1]))
        assert type(back) is type(typed[1]) and back == typed[1]
        assert wire.any_value_of(back) == wire.any_value_of(typed[1])
        encoded = wire.attributes(b"\x0a", [typed])
        reference = PbResource(attributes=[KeyValue(key=key, value=value)]).SerializeToString()
        if key == "double_nan":  # the canonical quiet NaN: compare the decoded value
            assert math.isnan(PbResource.FromString(encoded).attributes[0].value.double_value)
        else:
            assert encoded == reference, key
    assert (
        wire.attributes(b"\x0a", [("k", "v")])
        == PbResource(attributes=[KeyValue(key="k", value=AnyValue(string_value="v"))]).SerializeToString()
    )
    assert isinstance(IntValue("1"), TypedValue) and repr(IntValue("1")) == "IntValue('1')"


@pytest.mark.parametrize("seed", range(4))
def test_scalars_read_back_exactly_from_their_text(seed: int) -> None:
    # Random bit patterns: every double (subnormals, extremes, -0.0) and every int64 must come back
    # as the very value that arrived, since only the text is kept.
    rng = random.Random(seed)
    values = [AnyValue(double_value=x) for x in (0.0, -0.0, 5e-324, 1.7976931348623157e308, 0.1, 1e21)]
    for _ in range(2000):
        (x,) = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))
        if not math.isnan(x):
            values.append(AnyValue(double_value=x))
        values.append(AnyValue(int_value=rng.getrandbits(64) - 2**63))
        values.append(AnyValue(bytes_value=rng.randbytes(rng.randrange(20))))
    values += [AnyValue(int_value=-(2**63)), AnyValue(int_value=2**63 - 1), AnyValue(bool_value=True)]
    for value in values:
        ((_, typed),) = labels_from_keyvalues([KeyValue(key="k", value=value)])
        assert wire.any_value_of(typed) == value.SerializeToString(), value
