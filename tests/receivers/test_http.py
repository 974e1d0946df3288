"""The JSON HTTP receiver, driven over real HTTP with aiohttp's client (rules: agent/json_items.py)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import ssl
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from multidict import CIMultiDict
from prometheus_client import generate_latest

from agent import exphist
from agent.component import ComponentKind, Signal
from agent.config import expand_values, load_yaml
from agent.confmodel import Decoder
from agent.json_items import ITEM_REASONS
from agent.model import Kind, Temporality
from agent.telemetry import Telemetry
from receivers.http import (
    REQUEST_REASONS,
    HttpAuthConfig,
    HttpConfig,
    HttpReceiver,
    HttpTLSConfig,
    HttpTokenConfig,
    factory,
)
from tests.conftest import Certs, Sink, component_settings
from tests.receivers.conftest import Running

JSON = {"Content-Type": "application/json"}


@dataclass
class Harness:
    receiver: HttpReceiver
    sink: Sink
    tel: Telemetry
    session: aiohttp.ClientSession
    ready_calls: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.receiver.port}/v1/metrics"

    async def post(
        self, payload: Any = None, *, data: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        body = json.dumps(payload).encode() if data is None else data
        async with self.session.post(self.url, data=body, headers={**JSON, **(headers or {})}) as resp:
            return resp.status, await resp.json(), resp

    def refused(self, reason: str) -> float:
        return self.tel.value("receiver_refused_points_total", reason=reason)


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make(running: Running) -> AsyncIterator[Make]:

    async def build(**cfg: Any) -> Harness:
        config = HttpConfig(**{"endpoint": "127.0.0.1:0", **cfg})
        assert config.validate() == []
        tel = Telemetry()
        sink = Sink()
        ready_calls: list[int] = []
        settings = component_settings(
            tel, ComponentKind.RECEIVER, "http", ready=lambda: ready_calls.append(1)
        )
        receiver = HttpReceiver(settings, config, {Signal.METRICS: sink})
        return Harness(receiver, sink, tel, await running.start(receiver), ready_calls)

    yield build


def now_s() -> float:
    return time.time()


# -- the happy path and mixed batches -------------------------------------------------------------------
async def test_mixed_batch_keeps_valid_items_and_lists_index_and_reason(make: Make) -> None:
    h = await make()
    status, body, _ = await h.post(
        [
            {"name": "a", "value": 1},
            {"name": "b", "value": "abc"},
            {"name": "c", "value": 3, "tags": {"env": "dev"}},
            {"value": 4},
        ]
    )
    assert status == 200
    assert body["accepted"] == 2 and body["rejected"] == 2
    assert body["errors"] == [
        {
            "index": 1,
            "code": "invalid_value",
            "reason": 'value: must be a finite number, got the string "abc"',
        },
        {"index": 3, "code": "invalid_name", "reason": "name: required (a non-empty string)"},
    ]
    assert [(p.name, p.value, p.labels) for p in h.sink.points()] == [
        ("a", 1.0, ()),
        ("c", 3.0, (("env", "dev"),)),
    ]
    assert len(h.sink.batches) == 1  # one batch per request


async def test_single_object_gauge_defaults_and_aliases(make: Make) -> None:
    h = await make()
    before = time.time_ns()
    status, body, _ = await h.post(
        {
            "metric_name": "temp",
            "value": 21.5,
            "labels": {"b": "2", "a": "1"},
            "unit": "Cel",
            "description": "T",
        }
    )
    assert status == 200 and body == {"accepted": 1, "rejected": 0, "errors": []}
    (p,) = h.sink.points()
    assert p.kind is Kind.GAUGE and p.name == "temp" and p.value == 21.5
    assert p.labels == (("a", "1"), ("b", "2"))  # sorted by name
    assert p.unit == "Cel" and p.description == "T"
    assert before <= p.time_unix_nano <= time.time_ns()


async def test_optional_fields_may_be_null(make: Make) -> None:
    h = await make()
    item = {"name": "x", "value": 1, "type": None, "tags": None, "timestamp": None, "unit": None}
    status, body, _ = await h.post(item)
    assert status == 200 and body["accepted"] == 1
    assert h.sink.points()[0].kind is Kind.GAUGE


async def test_empty_list_is_accepted_as_nothing(make: Make) -> None:
    h = await make()
    status, body, _ = await h.post([])
    assert (status, body) == (200, {"accepted": 0, "rejected": 0, "errors": []})
    assert h.sink.batches == []


async def test_counter_is_a_delta_monotonic_sum_and_negative_is_refused(make: Make) -> None:
    h = await make()
    status, body, _ = await h.post(
        [{"name": "hits", "value": 3, "type": "counter"}, {"name": "hits", "value": -1, "type": "counter"}]
    )
    assert status == 200
    (p,) = h.sink.points()
    assert p.kind is Kind.SUM and p.temporality is Temporality.DELTA and p.monotonic and p.value == 3
    assert body["errors"][0]["code"] == "negative_counter"
    assert "a counter takes increments" in body["errors"][0]["reason"]
    assert h.refused("negative_counter") == 1


async def test_histogram_from_a_list_and_from_one_number(make: Make) -> None:
    h = await make()
    status, _, _ = await h.post(
        [
            {"name": "lat", "value": [0.1, 0.2, 0.4, -1, 0], "type": "histogram", "unit": "s"},
            {"name": "g", "value": 7},
            {"name": "one", "value": 5, "type": "histogram"},
        ]
    )
    assert status == 200
    lat, g, one = h.sink.points()
    assert lat.kind is Kind.HISTOGRAM and lat.histogram is not None and lat.unit == "s"
    # Built at the receiver's defaults: up to 2048 buckets, no finer than scale 8.
    assert lat.histogram == exphist.from_values(
        np.array([0.1, 0.2, 0.4, -1, 0]), max_buckets=2048, max_scale=8
    )
    assert lat.histogram.scale == 8
    assert (lat.histogram.count, lat.histogram.min, lat.histogram.max) == (5, -1, 0.4)
    assert math.isclose(lat.histogram.sum, -0.3)
    assert g.kind is Kind.GAUGE and g.value == 7
    assert one.histogram is not None and (one.histogram.count, one.histogram.sum) == (1, 5)


async def test_a_refused_histogram_does_not_shift_its_neighbours_values(make: Make) -> None:
    h = await make()
    status, body, _ = await h.post(
        [
            {"name": "a", "value": [1, 2], "type": "histogram"},
            {"name": "bad", "value": [100, 200], "type": "histogram", "tags": {"k": 1}},
            {"name": "b", "value": [3], "type": "histogram"},
        ]
    )
    assert status == 200 and body["errors"][0]["index"] == 1
    a, b = h.sink.points()
    assert a.histogram is not None and b.histogram is not None
    assert (a.histogram.sum, b.histogram.sum) == (3, 3)


# -- every item rule ------------------------------------------------------------------------------------
LONG = "x" * 1025


@pytest.mark.parametrize(
    ("item", "code", "reason"),
    [
        ([1], "invalid_item", "must be a metric object, got a list"),
        ("x", "invalid_item", 'got the string "x"'),
        ({"name": "a", "value": 1, "foo": 1}, "unknown_field", 'unknown field "foo"'),
        ({"name": "a", "value": 1, "tag": {}}, "unknown_field", "did you mean 'tags'?"),
        ({"name": "a", "metric_name": "b", "value": 1}, "invalid_name", "either name or metric_name"),
        ({"name": "", "value": 1}, "invalid_name", "name: must not be empty"),
        ({"name": 5, "value": 1}, "invalid_name", "name: must be a string, got the number 5"),
        ({"name": LONG, "value": 1}, "name_too_long", "name: is 1025 bytes long; the limit is 1024"),
        ({"name": "é" * 513, "value": 1}, "name_too_long", "1026 bytes"),  # UTF-8 bytes, not characters
        ({"name": "a\ud800", "value": 1}, "invalid_name", "unpaired UTF-16 surrogate"),
        ({"name": "a"}, "invalid_value", "value: required"),
        ({"name": "a", "value": None}, "invalid_value", "got null"),
        ({"name": "a", "value": True}, "invalid_value", "got the boolean true"),
        ({"name": "a", "value": "1.5"}, "invalid_value", 'got the string "1.5"'),
        ({"name": "a", "value": {}}, "invalid_value", "got an object"),
        ({"name": "a", "value": [1, 2]}, "invalid_value", 'needs "type": "histogram", not gauge'),
        ({"name": "a", "value": [], "type": "histogram"}, "invalid_value", "at least one number"),
        (
            {"name": "a", "value": [1, "2"], "type": "histogram"},
            "invalid_value",
            "value[1]: must be a finite",
        ),
        ({"name": "a", "value": 1, "type": "timer"}, "invalid_type", '"timer" is not one of gauge, counter'),
        ({"name": "a", "value": 1, "type": 3}, "invalid_type", "the number 3 is not one of"),
        ({"name": "a", "value": -2, "type": "counter"}, "negative_counter", "-2 is negative"),
        ({"name": "a", "value": 1, "tags": ["a"]}, "invalid_labels", "tags: must be an object"),
        (
            {"name": "a", "value": 1, "tags": {"k": 1}},
            "invalid_labels",
            "tags.k: must be a string, got the number",
        ),
        (
            {"name": "a", "value": 1, "labels": {"": "v"}},
            "invalid_labels",
            "labels: a label name must not be empty",
        ),
        ({"name": "a", "value": 1, "tags": {}, "labels": {}}, "invalid_labels", "either tags or labels"),
        (
            {"name": "a", "value": 1, "tags": {f"k{i}": "v" for i in range(129)}},
            "too_many_labels",
            "has 129 labels; the limit is 128",
        ),
        ({"name": "a", "value": 1, "tags": {"k": "v" * 4097}}, "label_value_too_long", "4097 bytes long"),
        ({"name": "a", "value": 1, "tags": {LONG: "v"}}, "label_name_too_long", "label name"),
        ({"name": "a", "value": 1, "tags": {"k": "\udc00"}}, "invalid_labels", "surrogate"),
        ({"name": "a", "value": 1, "unit": "µs"}, "invalid_unit", "ASCII string of at most 63"),
        ({"name": "a", "value": 1, "unit": 5}, "invalid_unit", "got the number 5"),
        ({"name": "a", "value": 1, "description": "d" * 1024}, "invalid_description", "longer than 1023"),
        ({"name": "a", "value": 1, "description": 1}, "invalid_description", "must be a string"),
        ({"name": "a", "value": 1, "timestamp": "yesterday"}, "invalid_timestamp", "is not RFC 3339"),
        ({"name": "a", "value": 1, "timestamp": "2024-05-01T12:00:00"}, "invalid_timestamp", "not RFC 3339"),
        (
            {"name": "a", "value": 1, "timestamp": "2024-02-30T12:00:00Z"},
            "invalid_timestamp",
            "day is out of",
        ),
        ({"name": "a", "value": 1, "timestamp": "2024-05-01T12:00:00+25:00"}, "invalid_timestamp", "offset"),
        ({"name": "a", "value": 1, "timestamp": "1714564800"}, "invalid_timestamp", "as a number"),
        ({"name": "a", "value": 1, "timestamp": True}, "invalid_timestamp", "got the boolean true"),
        ({"name": "a", "value": 1, "timestamp": 0}, "timestamp_out_of_range", "years in the past"),
        ({"name": "a", "value": 1, "timestamp": -5}, "timestamp_out_of_range", "in the past"),
    ],
)
async def test_item_rules(make: Make, item: Any, code: str, reason: str) -> None:
    h = await make()
    status, body, _ = await h.post([item, {"name": "ok", "value": 1}])
    assert status == 200  # the valid neighbour still goes through
    assert body["accepted"] == 1 and body["rejected"] == 1
    (error,) = body["errors"]
    assert error["index"] == 0 and error["code"] == code
    assert reason in error["reason"], error["reason"]
    assert [p.name for p in h.sink.points()] == ["ok"]
    assert h.refused(code) == 1


async def test_all_items_refused_answers_400_with_every_reason(make: Make) -> None:
    h = await make()
    status, body, _ = await h.post([{"name": "a"}, {"value": 1}, 7])
    assert status == 400
    assert body["accepted"] == 0 and body["rejected"] == 3
    assert [e["index"] for e in body["errors"]] == [0, 1, 2]
    assert h.sink.batches == []


async def test_nan_and_infinity_literals_and_overflow_refuse_only_their_item(make: Make) -> None:
    h = await make()
    huge = "9" * 5000  # int() would refuse more than 4,300 digits and fail the whole body
    raw = (
        '[{"name":"a","value":NaN},{"name":"b","value":Infinity},{"name":"c","value":-Infinity},'
        '{"name":"d","value":1e400},{"name":"e","value":' + huge + '},{"name":"f","value":1.5},'
        '{"name":"g","value":[1,NaN],"type":"histogram"},{"name":"h","value":1,"tags":{"k":NaN}}]'
    )
    status, body, _ = await h.post(data=raw.encode())
    assert status == 200 and body["accepted"] == 1
    reasons = {e["index"]: e["reason"] for e in body["errors"]}
    assert reasons[0] == "value: must be a finite number, got the literal NaN (not valid JSON)"
    assert "literal Infinity" in reasons[1] and "literal -Infinity" in reasons[2]
    assert "too large for a double" in reasons[3] and "too large for a double" in reasons[4]
    assert "value[1]" in reasons[6] and "literal NaN" in reasons[6]
    assert body["errors"][-1]["code"] == "invalid_labels"
    assert [(p.name, p.value) for p in h.sink.points()] == [("f", 1.5)]
    assert h.refused("invalid_value") == 6


# -- timestamps ----------------------------------------------------------------------------------------
async def test_timestamps_rfc3339_epoch_seconds_and_milliseconds(make: Make) -> None:
    h = await make()
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    base_ns = int(base.timestamp()) * 10**9
    offset = base.astimezone(datetime.now().astimezone().tzinfo)
    plus2 = (base + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S") + ".123456789+02:00"
    items = [
        {"name": "z", "value": 1, "timestamp": base.strftime("%Y-%m-%dT%H:%M:%SZ")},
        {"name": "off", "value": 1, "timestamp": plus2},
        {"name": "local", "value": 1, "timestamp": offset.isoformat()},
        {"name": "space", "value": 1, "timestamp": base.strftime("%Y-%m-%d %H:%M:%S.5z")},
        {"name": "s", "value": 1, "timestamp": int(base.timestamp())},
        {"name": "sf", "value": 1, "timestamp": base.timestamp() + 0.25},
        {"name": "ms", "value": 1, "timestamp": int(base.timestamp()) * 1000 + 7},
        {"name": "msf", "value": 1, "timestamp": base.timestamp() * 1000 + 0.5},
    ]
    status, body, _ = await h.post(items)
    assert status == 200 and body["accepted"] == len(items), body
    got = {p.name: p.time_unix_nano for p in h.sink.points()}
    assert got["z"] == base_ns
    assert got["off"] == base_ns + 123_456_789
    assert got["local"] == base_ns
    assert got["space"] == base_ns + 500_000_000
    assert got["s"] == base_ns
    assert abs(got["sf"] - (base_ns + 250_000_000)) < 1000
    assert got["ms"] == base_ns + 7_000_000
    assert abs(got["msf"] - (base_ns + 500_000)) < 1000


async def test_timestamps_outside_the_window_are_refused_with_how_far(make: Make) -> None:
    h = await make()
    now = now_s()
    items = [
        {"name": "old", "value": 1, "timestamp": int(now - 25 * 3600)},
        {"name": "future", "value": 1, "timestamp": int((now + 11 * 60) * 1000)},
        {"name": "ns", "value": 1, "timestamp": time.time_ns()},
        {"name": "edge", "value": 1, "timestamp": int(now - 23 * 3600)},
        {"name": "soon", "value": 1, "timestamp": int(now + 5 * 60)},
    ]
    status, body, _ = await h.post(items)
    assert status == 200 and [p.name for p in h.sink.points()] == ["edge", "soon"]
    reasons = {e["index"]: e for e in body["errors"]}
    assert {e["code"] for e in reasons.values()} == {"timestamp_out_of_range"}
    assert "1.0 days in the past" in reasons[0]["reason"]
    assert "from 1.0 days before to 10.0 min after now" in reasons[0]["reason"]
    assert "11.0 min ahead of the agent's clock" in reasons[1]["reason"]
    assert "read as epoch milliseconds" in reasons[2]["reason"]  # a nanosecond timestamp, explained
    assert h.refused("timestamp_out_of_range") == 3


async def test_timestamp_window_is_configurable(make: Make) -> None:
    h = await make(max_timestamp_age=60.0, max_timestamp_ahead=1.0)
    status, body, _ = await h.post({"name": "a", "value": 1, "timestamp": int(now_s() - 120)})
    assert status == 400 and body["errors"][0]["code"] == "timestamp_out_of_range"


# -- the body: JSON, size, compression, media type ------------------------------------------------------
async def test_deep_json_is_refused_not_crashed(make: Make) -> None:
    h = await make()
    for raw in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        status, body, _ = await h.post(data=raw)
        assert status == 400 and body == {
            "code": "invalid_json",
            "error": "body is not valid JSON: nested deeper than the JSON decoder allows (about "
            f"{sys.getrecursionlimit()} levels, the interpreter's recursion limit); an item nests at "
            "most 3 levels",
        }
    # Nesting the decoder takes is refused by the item rules, which never recurse into it.
    status, body, _ = await h.post(data=b"[" * 500 + b"]" * 500)
    assert status == 400 and body["errors"][0]["code"] == "invalid_item"
    status, _, _ = await h.post({"name": "still", "value": 1})
    assert status == 200


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'[{"name": "a", "value": 1}', "body is not valid JSON: Expecting ',' delimiter: line 1"),
        (b'{"name": "\xff"}', "body is not valid UTF-8 (byte 10)"),
        (b"42", "body must be a metric object or a list of them, got the number 42"),
        (b"", "body is not valid JSON: Expecting value"),
    ],
)
async def test_malformed_bodies(make: Make, raw: bytes, message: str) -> None:
    h = await make()
    status, body, _ = await h.post(data=raw)
    assert status == 400 and body["code"] == "invalid_json"
    assert body["error"].startswith(message), body["error"]
    assert h.refused("invalid_json") == 1


async def test_a_body_of_too_many_values_is_refused_before_it_is_parsed(make: Make) -> None:
    h = await make(max_items=10, max_values=100)
    # A top-level list of 10 million numbers (~20 MB) would take ~0.5 GB and seconds of GIL to parse.
    status, body, _ = await h.post(data=b"[" + b"1," * 200 + b"1]")
    assert status == 413 and body["code"] == "too_many_values"
    assert "up to 201 JSON values" in body["error"] and "the limit is 100 (max_values)" in body["error"]
    assert h.sink.batches == [] and h.refused("too_many_values") == 1
    # Histogram samples count as values too; an honest request under the limit goes through.
    status, body, _ = await h.post({"name": "lat", "type": "histogram", "value": [0.1] * 150})
    assert status == 413 and body["code"] == "too_many_values"
    status, body, _ = await h.post({"name": "lat", "type": "histogram", "value": [0.1] * 50})
    assert status == 200 and body["accepted"] == 1


async def test_too_many_items_is_refused_whole(make: Make) -> None:
    h = await make(max_items=3)
    status, body, _ = await h.post([{"name": "a", "value": 1}] * 4)
    assert status == 413 and body["code"] == "too_many_items"
    assert "the limit is 3" in body["error"]
    # Counted once per request, not per element: a 10M-element list must not add 10M refusals.
    assert h.sink.batches == [] and h.refused("too_many_items") == 1
    status, body, _ = await h.post([{"name": "a", "value": 1}] * 3)
    assert status == 200 and body["accepted"] == 3


async def test_gzip_body(make: Make) -> None:
    h = await make()
    payload = [{"name": f"m{i}", "value": i} for i in range(100)]
    raw = gzip.compress(json.dumps(payload).encode())
    status, body, _ = await h.post(data=raw, headers={"Content-Encoding": "gzip"})
    assert status == 200 and body["accepted"] == 100
    # Two gzip members are one stream (RFC 1952), even when a chunk boundary falls between them.
    two = gzip.compress(b'[{"name": "x", ') + gzip.compress(b'"value": 2}]')
    status, body, _ = await h.post(data=two, headers={"Content-Encoding": "GZIP"})
    assert status == 200 and h.sink.points()[-1].value == 2


async def test_gzip_bomb_answers_413(make: Make) -> None:
    h = await make(max_request_body_size=2**20)
    bomb = gzip.compress(bytes(10 * 2**20), 9)  # 10 MiB of zeros in ~10 KiB
    status, body, _ = await h.post(data=bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and body["code"] == "body_too_large"
    assert body["error"] == "body inflates past max_request_body_size (1MiB)"
    assert h.refused("body_too_large") == 1


async def test_gzip_bomb_past_the_default_cap(make: Make) -> None:
    h = await make()
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(2**20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(64)) + compressor.flush()  # 64 MiB inflated
    status, body, _ = await h.post(data=bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and "20MiB" in body["error"]


async def test_corrupt_and_truncated_gzip(make: Make) -> None:
    h = await make()
    good = gzip.compress(b'[{"name": "a", "value": 1}]')
    for raw in (b"not gzip at all", good[:-6], good + b"trailing junk"):
        status, body, _ = await h.post(data=raw, headers={"Content-Encoding": "gzip"})
        assert status == 400 and body["code"] == "invalid_compression", body
    assert h.sink.batches == []


async def test_raw_body_over_the_cap_by_content_length(make: Make) -> None:
    h = await make(max_request_body_size=64 * 1024)
    status, body, _ = await h.post(data=b"[" + b" " * 2**20 + b"]")
    assert status == 413 and body["code"] == "body_too_large"
    assert body["error"] == "body is larger than max_request_body_size (64KiB)"


async def test_raw_body_over_the_cap_while_streaming(make: Make) -> None:
    h = await make(max_request_body_size=64 * 1024)

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to check up front
        for _ in range(64):
            yield b" " * 2**14

    status, body, _ = await h.post(data=chunks())
    assert status == 413 and body["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Content-Encoding": "br"}, "unsupported_encoding"),
        ({"Content-Encoding": "deflate"}, "unsupported_encoding"),
        ({"Content-Encoding": "gzip, gzip"}, "unsupported_encoding"),
        ({"Content-Type": "text/plain"}, "unsupported_media_type"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, "unsupported_media_type"),
        ({"Content-Type": "application/json; charset=latin-1"}, "unsupported_media_type"),
    ],
)
async def test_unsupported_media_types_and_encodings(make: Make, headers: dict[str, str], code: str) -> None:
    h = await make()
    status, body, _ = await h.post({"name": "a", "value": 1}, headers=headers)
    assert status == 415 and body["code"] == code
    assert h.refused(code) == 1 and h.sink.batches == []


async def test_two_content_encoding_headers_are_refused(make: Make) -> None:
    h = await make()
    repeated = CIMultiDict([("Content-Type", "application/json"), ("Content-Encoding", "identity")])
    repeated.add("Content-Encoding", "gzip")
    async with h.session.post(h.url, data=b"[]", headers=repeated) as resp:
        assert resp.status == 415 and (await resp.json())["code"] == "unsupported_encoding"


async def test_charset_utf8_and_identity_encoding_are_accepted(make: Make) -> None:
    h = await make()
    headers = {"Content-Type": "application/json; charset=UTF-8", "Content-Encoding": "identity"}
    status, body, _ = await h.post({"name": "é", "value": 1, "tags": {"city": "Zürich"}}, headers=headers)
    assert status == 200 and body["accepted"] == 1
    assert h.sink.points()[0].name == "é" and h.sink.points()[0].labels == (("city", "Zürich"),)


async def test_large_body_is_parsed_off_the_loop(make: Make) -> None:
    h = await make()
    values = [round(0.001 * i, 3) for i in range(300_000)]  # ~2 MiB of JSON
    status, body, _ = await h.post({"name": "big", "value": values, "type": "histogram"})
    assert status == 200 and body["accepted"] == 1
    hist = h.sink.points()[0].histogram
    assert hist is not None and hist.count == 300_000 and hist.max == values[-1]


async def test_slow_body_times_out_with_408(make: Make) -> None:
    h = await make(read_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", h.receiver.port)
    writer.write(
        b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n[{"
    )
    await writer.drain()
    answer = b""
    while b"read_timeout" not in answer:  # the status line and the JSON body may come in two reads
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        assert chunk, f"connection closed without a full answer: {answer!r}"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408")
    assert h.refused("read_timeout") == 1
    writer.close()


# -- auth, context --------------------------------------------------------------------------------------
async def test_context_carries_lower_cased_headers_but_no_secrets_or_forged_auth(make: Make) -> None:
    h = await make()
    headers = {
        "X-Scope-OrgID": "team-a",
        "Authorization": "Basic c2VjcmV0",
        "Cookie": "session=1",
        "auth.tenant": "forged",
    }
    status, _, _ = await h.post({"name": "a", "value": 1}, headers=headers)
    assert status == 200
    ctx = h.sink.batches[0].context
    assert ctx["x-scope-orgid"] == "team-a" and ctx["content-type"] == "application/json"
    assert "authorization" not in ctx and "cookie" not in ctx and "auth.tenant" not in ctx


async def test_bearer_tokens_map_to_tenants(make: Make) -> None:
    tokens = [HttpTokenConfig("tok-a", "team-a"), HttpTokenConfig("tok-b", "team-b")]
    h = await make(auth=HttpAuthConfig(tokens=tokens))
    status, body, resp = await h.post({"name": "a", "value": 1})
    assert status == 401 and body["code"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="headwater"'
    status, body, resp = await h.post({"name": "a", "value": 1}, headers={"Authorization": "Bearer nope"})
    assert status == 401 and "invalid_token" in resp.headers["WWW-Authenticate"]
    status, _, _ = await h.post({"name": "a", "value": 1}, headers={"Authorization": "Basic dG9rLWE="})
    assert status == 401
    assert h.refused("unauthorized") == 3 and h.sink.batches == []
    headers = {"Authorization": "bearer tok-b", "auth.tenant": "forged"}
    status, _, _ = await h.post({"name": "a", "value": 1}, headers=headers)
    assert status == 200
    assert h.sink.batches[0].context["auth.tenant"] == "team-b"
    assert "authorization" not in h.sink.batches[0].context
    async with h.session.get(f"http://127.0.0.1:{h.receiver.port}/healthz") as resp2:
        assert resp2.status == 200  # health needs no token


async def test_tokens_file_is_read_and_reloaded_without_logging_tokens(
    make: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("s3cret-one: team-one\n")
    h = await make(auth=HttpAuthConfig(tokens_file=str(path)))
    status, _, _ = await h.post({"name": "a", "value": 1}, headers={"Authorization": "Bearer s3cret-one"})
    assert status == 200 and h.sink.batches[-1].context["auth.tenant"] == "team-one"
    path.write_text('{"s3cret-two": "team-two"}')  # JSON is YAML too
    status, _, _ = await h.post({"name": "a", "value": 1}, headers={"Authorization": "Bearer s3cret-two"})
    assert status == 200 and h.sink.batches[-1].context["auth.tenant"] == "team-two"
    status, _, _ = await h.post({"name": "a", "value": 1}, headers={"Authorization": "Bearer s3cret-one"})
    assert status == 401
    with caplog.at_level(logging.WARNING):
        path.write_text("s3cret-three: ''\n")  # broken: the previous tokens stay
        headers = {"Authorization": "Bearer s3cret-two"}
        status, _, _ = await h.post({"name": "a", "value": 1}, headers=headers)
    assert status == 200
    assert "keeping the previous bearer tokens" in caplog.text and "s3cret" not in caplog.text


async def test_start_fails_on_a_bad_tokens_file(make: Make, tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("- just a list\n")
    with pytest.raises(ValueError, match="non-empty mapping of token to tenant"):
        await make(auth=HttpAuthConfig(tokens_file=str(path)))


# -- overload, errors, health, lifecycle ----------------------------------------------------------------
async def test_backpressure_answers_429_with_retry_after(make: Make) -> None:
    h = await make()
    h.sink.refuse, h.sink.reason, h.sink.retry_after_s = True, "queue_full", 2.5
    status, body, resp = await h.post([{"name": "a", "value": 1}, {"name": "b", "value": 2}, {"value": 3}])
    assert status == 429 and body["code"] == "backpressure" and "queue_full" in body["error"]
    assert resp.headers["Retry-After"] == "3"
    assert h.refused("backpressure") == 2 and h.refused("invalid_name") == 1
    h.sink.reason, h.sink.retry_after_s = "memory_limit", None
    status, _, resp = await h.post({"name": "a", "value": 1})
    assert status == 429 and resp.headers["Retry-After"] == "1"
    assert h.tel.value("receiver_accepted_points_total") == 0


async def test_a_failing_pipeline_answers_500_and_is_counted(make: Make) -> None:
    h = await make()
    h.sink.fail = True
    status, body, _ = await h.post({"name": "a", "value": 1})
    assert status == 500 and body["code"] == "pipeline_error"
    assert h.refused("pipeline_error") == 1
    h.sink.fail = False
    status, _, _ = await h.post({"name": "a", "value": 1})
    assert status == 200


async def test_healthz_and_unknown_routes(make: Make) -> None:
    h = await make()
    base = f"http://127.0.0.1:{h.receiver.port}"
    async with h.session.get(f"{base}/healthz") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
    async with h.session.get(f"{base}/v1/metrics") as resp:
        assert resp.status == 405
    async with h.session.post(f"{base}/v2/metrics", json=[]) as resp:
        assert resp.status == 404


async def test_self_metrics_move_per_request(make: Make) -> None:
    h = await make()
    await h.post([{"name": "a", "value": 1}, {"name": "b", "value": 2}, {"name": "c"}])
    await h.post([{"name": "x", "value": "y"}])
    await h.post(data=b"{", headers={})
    assert h.tel.value("receiver_accepted_points_total") == 2
    assert h.refused("invalid_value") == 2 and h.refused("invalid_json") == 1
    assert h.tel.value("receiver_requests_total", status="200") == 1
    assert h.tel.value("receiver_requests_total", status="400") == 2
    text = generate_latest(h.tel.registry).decode()
    assert 'headwater_receiver_accepted_points_total{receiver="http"} 2.0' in text
    assert 'headwater_receiver_refused_points_total{reason="invalid_value",receiver="http"} 2.0' in text
    for code in ITEM_REASONS + REQUEST_REASONS:  # every reason shows, at 0 until it happens
        assert f'headwater_receiver_refused_points_total{{reason="{code}",receiver="http"}}' in text


async def test_ready_once_and_shutdown_idempotent_and_safe_before_start(make: Make) -> None:
    h = await make()
    assert h.ready_calls == [1]
    await h.receiver.shutdown()
    await h.receiver.shutdown()
    with pytest.raises(aiohttp.ClientConnectionError):
        await h.post({"name": "a", "value": 1})
    settings = component_settings(Telemetry(), ComponentKind.RECEIVER, "http")
    never_started = factory.create(settings, HttpConfig(), {Signal.METRICS: Sink()})
    await never_started.shutdown()


async def test_tls(make: Make, tls_certs: Certs) -> None:
    ca, crt, key = Path(tls_certs.ca), Path(tls_certs.cert), Path(tls_certs.key)
    h = await make(tls=HttpTLSConfig(cert_file=str(crt), key_file=str(key)))
    url = f"https://127.0.0.1:{h.receiver.port}/v1/metrics"
    client_ctx = ssl.create_default_context(cafile=str(ca))
    async with h.session.post(url, json={"name": "a", "value": 1}, ssl=client_ctx) as resp:
        assert resp.status == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):  # an unknown CA is refused
        async with h.session.post(url, json={"name": "a", "value": 1}) as resp:
            pass
    async with aiohttp.ClientSession() as plain:  # plain HTTP to the TLS port gets nothing
        with pytest.raises(aiohttp.ClientError):
            async with plain.post(url.replace("https", "http"), json=[]) as resp:
                await resp.read()
    assert len(h.sink.points()) == 1


# -- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "path", "message"),
    [
        ({"endpoint": "8080"}, "endpoint", "not host:port"),
        ({"max_items": 0}, "max_items", "at least 1"),
        ({"max_request_body_size": 10}, "max_request_body_size", "at least 1KiB"),
        ({"read_timeout": 0.0}, "read_timeout", "greater than 0"),
        ({"max_buckets": 2}, "max_buckets", "between 3 and 16384"),
        ({"tls": HttpTLSConfig(cert_file="c.pem")}, "tls", "go together"),
        ({"tls": HttpTLSConfig(client_ca_file="ca.pem")}, "tls::client_ca_file", "needs cert_file"),
        (
            {"auth": HttpAuthConfig(tokens=[HttpTokenConfig("", "t")])},
            "auth::tokens::0::token",
            "variable set",
        ),
        (
            {"auth": HttpAuthConfig(tokens=[HttpTokenConfig("zq9 space", "t")])},
            "auth::tokens::0::token",
            "cannot carry",
        ),
        (
            {"auth": HttpAuthConfig(tokens=[HttpTokenConfig("tok", "")])},
            "auth::tokens::0::tenant",
            "non-empty",
        ),
        (
            {
                "auth": HttpAuthConfig(
                    tokens=[HttpTokenConfig("zq9-dup", "a"), HttpTokenConfig("zq9-dup", "b")]
                )
            },
            "auth::tokens::1::token",
            "listed twice",
        ),
    ],
)
def test_config_validation(cfg: dict[str, Any], path: str, message: str) -> None:
    problems = HttpConfig(**cfg).validate()
    assert [p for p, _ in problems] == [path] and message in problems[0][1]
    assert "zq9" not in problems[0][0] + problems[0][1]  # tokens are never echoed


def test_defaults_and_secrets_stay_out_of_repr() -> None:
    cfg = HttpConfig(auth=HttpAuthConfig(tokens=[HttpTokenConfig("very-secret", "t")]))
    assert cfg.validate() == []
    assert "very-secret" not in repr(cfg)
    assert HttpConfig().endpoint == "127.0.0.1:8080" and HttpConfig().max_items == 1000
    assert HttpConfig().max_request_body_size == 20 * 2**20


def test_environment_problems(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.yaml"
    bad.write_text("secret-token: ''\n")
    cfg = HttpConfig(
        endpoint="127.0.0.1:0",
        auth=HttpAuthConfig(tokens_file=str(bad)),
        tls=HttpTLSConfig(cert_file=str(tmp_path / "missing.crt"), key_file=str(tmp_path / "missing.key")),
    )
    problems = dict(cfg.environment_problems())
    assert set(problems) == {"tls::cert_file", "tls::key_file", "auth::tokens_file"}
    assert "secret-token" not in problems["auth::tokens_file"]
    assert HttpConfig(endpoint="127.0.0.1:0").environment_problems() == []


def test_tokens_come_from_the_environment_through_the_config_loader() -> None:
    text = """
endpoint: 127.0.0.1:9999
auth:
  tokens:
    - {token: "${env:TEAM_A_TOKEN}", tenant: team-a}
    - {token: "${env:TEAM_B_TOKEN}", tenant: team-b}
"""
    data, _ = load_yaml(text)
    data, env_problems = expand_values(data, {"TEAM_A_TOKEN": "abc.123", "TEAM_B_TOKEN": "x-y_z"})
    decoder = Decoder(lambda _: None)
    cfg = decoder.decode(HttpConfig, data, ("receivers", "http"))
    assert env_problems == [] and decoder.errors == [] and cfg.validate() == []
    assert [(t.token, t.tenant) for t in cfg.auth.tokens] == [("abc.123", "team-a"), ("x-y_z", "team-b")]
    data, env_problems = expand_values(load_yaml(text)[0], {"TEAM_A_TOKEN": "abc.123"})
    cfg = Decoder(lambda _: None).decode(HttpConfig, data, ("receivers", "http"))
    assert [p for p, _ in env_problems] == [("auth", "tokens", "1", "token")]
    assert [p for p, _ in cfg.validate()] == ["auth::tokens::1::token"]  # unset variable: refused, not open
