"""The recorder's bounds (size, duration, a full buffer counted and marked as a gap), redaction
(StatsD tags, JSON labels, OTLP/JSON and OTLP protobuf attributes; headers never recorded), the file
format's refusal of other versions, and no hooks while no capture runs."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2

from agent.admin import AdminServer
from agent.capture.format import (
    DATA,
    END,
    FORMAT_VERSION,
    GAP,
    MAGIC,
    CaptureFormatError,
    Header,
    encode_header,
    read_file,
)
from agent.capture.recorder import MAX_BYTES, MAX_DURATION, STOPPED, Recorder
from agent.config import ConfigError, build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port, wait_until, wait_until_sync


def _recorder(path: Path, **kwargs: Any) -> Recorder:
    options: dict[str, Any] = {"max_bytes": 1 << 20, "max_duration_s": 600.0, **kwargs}
    return Recorder(str(path), Header("test", 1, {"statsd": {"type": "statsd", "endpoints": {}}}), **options)


def test_records_are_written_in_order_with_their_receiver_transport_and_times(tmp_path: Path) -> None:
    rec = _recorder(tmp_path / "c")
    rec.start()
    hook = rec.hook("statsd")
    hook("udp", b"a:1|c\n")
    hook("tcp", b"b:2|g\n")
    rec.stop()
    header, records = read_file(str(tmp_path / "c"))
    assert header.agent_version == "test"
    assert [(r.kind, r.receiver, r.transport, r.payload) for r in records] == [
        (DATA, "statsd", "udp", b"a:1|c\n"),
        (DATA, "statsd", "tcp", b"b:2|g\n"),
        (END, "", "", b""),
    ]
    assert records[-1].meta["reason"] == STOPPED
    assert 0 <= records[0].offset_ns <= records[1].offset_ns
    assert records[0].meta["time_unix_nano"] > 1_600_000_000 * 10**9


def test_a_full_buffer_drops_and_counts_and_the_file_says_where(tmp_path: Path) -> None:
    rec = _recorder(tmp_path / "c", buffer_records=2)
    hook = rec.hook("statsd")
    for i in range(5):  # before the writer runs: 2 wait, 3 find the buffer full
        hook("udp", b"x:%d|c" % i)
    rec.start()
    rec.stop()
    _, records = read_file(str(tmp_path / "c"))
    gaps = [r for r in records if r.kind == GAP]
    assert [(g.meta["dropped_records"], g.meta["dropped_bytes"]) for g in gaps] == [(3, 15)]
    assert [r.payload for r in records if r.kind == DATA] == [b"x:0|c", b"x:1|c"]
    assert rec.status()["dropped_records"] == 3


def test_the_size_bound_ends_the_capture_within_it(tmp_path: Path) -> None:
    ended: list[str] = []
    rec = _recorder(tmp_path / "c", max_bytes=2000, on_end=ended.append)
    rec.start()
    hook = rec.hook("statsd")
    for _ in range(40):
        hook("udp", b"y" * 100)
    wait_until_sync(lambda: rec.ended, "the capture ended at its size")
    rec.stop()
    assert rec.reason == MAX_BYTES and ended == [MAX_BYTES]
    assert (tmp_path / "c").stat().st_size <= 2000
    _, records = read_file(str(tmp_path / "c"))
    assert records[-1].meta["reason"] == MAX_BYTES
    assert 0 < sum(r.kind == DATA for r in records) < 40
    hook("udp", b"after")  # an ended capture takes nothing more
    assert rec.status()["records"] == sum(r.kind == DATA for r in records)


def test_the_duration_bound_ends_the_capture(tmp_path: Path) -> None:
    rec = _recorder(tmp_path / "c", max_duration_s=0.1)
    rec.start()
    wait_until_sync(lambda: rec.ended, "the capture ended at its duration")
    rec.stop()
    assert rec.reason == MAX_DURATION
    assert read_file(str(tmp_path / "c"))[1][-1].meta["reason"] == MAX_DURATION


def test_another_version_is_refused_clearly(tmp_path: Path) -> None:
    good = encode_header(Header("x", 1))
    newer = good.replace(struct.pack(">H", FORMAT_VERSION), struct.pack(">H", FORMAT_VERSION + 1), 1)
    (tmp_path / "newer").write_bytes(newer)
    with pytest.raises(CaptureFormatError, match=r"format version 2 is not supported .* reads version 1"):
        read_file(str(tmp_path / "newer"))
    (tmp_path / "other").write_bytes(b"not a capture at all")
    with pytest.raises(CaptureFormatError, match="not a headwater capture file"):
        read_file(str(tmp_path / "other"))
    (tmp_path / "cut").write_bytes(good + b"\x00\x00\x00\x40\x01")
    with pytest.raises(CaptureFormatError, match="cut short"):
        read_file(str(tmp_path / "cut"))
    assert good.startswith(MAGIC)


def _otlp_request() -> bytes:
    def kv(k: str, v: str) -> common_pb2.KeyValue:
        return common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(string_value=v))

    point = metrics_pb2.NumberDataPoint(as_int=3, attributes=[kv("user", "alice"), kv("route", "/a")])
    request = metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource={"attributes": [kv("user", "bob"), kv("service.name", "svc")]},
                scope_metrics=[
                    metrics_pb2.ScopeMetrics(
                        metrics=[metrics_pb2.Metric(name="m", sum=metrics_pb2.Sum(data_points=[point]))]
                    )
                ],
            )
        ]
    )
    return request.SerializeToString()


def test_configured_names_are_redacted_in_every_format(tmp_path: Path) -> None:
    rec = _recorder(tmp_path / "c", redact=("user",))
    rec.start()
    hook = rec.hook("r")
    hook("udp", b"a:1|c|#user:alice,env:prod\nb;user=bob;env=dev:2|g\n")
    hook(
        "http",
        json.dumps([{"name": "j", "value": 1, "labels": {"user": "carol", "x": "1"}}]).encode(),
        {"path": "/v1/metrics", "content_type": "application/json"},
    )
    otlp_json = {
        "resourceMetrics": [{"resource": {"attributes": [{"key": "user", "value": {"stringValue": "dan"}}]}}]
    }
    hook("http", json.dumps(otlp_json).encode(), {"path": "/v1/metrics", "content_type": "application/json"})
    hook("grpc", _otlp_request(), {"path": "/v1/metrics", "content_type": "application/grpc"})
    hook("http", b"\xff not protobuf", {"path": "/v1/metrics", "content_type": "application/x-protobuf"})
    rec.stop()
    _, records = read_file(str(tmp_path / "c"))
    statsd, labels, otlpjson, proto, broken = (r for r in records if r.kind == DATA)
    assert statsd.payload == b"a:1|c|#user:<redacted>,env:prod\nb;user=<redacted>;env=dev:2|g\n"
    assert json.loads(labels.payload)[0]["labels"] == {"user": "<redacted>", "x": "1"}
    assert json.loads(otlpjson.payload)["resourceMetrics"][0]["resource"]["attributes"][0]["value"] == {
        "stringValue": "<redacted>"
    }
    decoded = metrics_service_pb2.ExportMetricsServiceRequest.FromString(proto.payload)
    rm = decoded.resource_metrics[0]
    attrs = {a.key: a.value.string_value for a in rm.resource.attributes}
    assert attrs == {"user": "<redacted>", "service.name": "svc"}
    point = rm.scope_metrics[0].metrics[0].sum.data_points[0]
    assert {a.key: a.value.string_value for a in point.attributes} == {"user": "<redacted>", "route": "/a"}
    assert broken.payload == b"" and broken.meta["redaction_failed"] is True
    raw = (tmp_path / "c").read_bytes()
    for secret in (b"alice", b"bob", b"carol", b"dan"):
        assert secret not in raw


def test_capture_limits_are_checked() -> None:
    data = {
        "receivers": {"http": {"endpoint": "127.0.0.1:0"}},
        "exporters": {"debug": {}},
        "service": {
            "pipelines": {"metrics": {"receivers": ["http"], "exporters": ["debug"]}},
            "telemetry": {"capture": {"max_bytes": "10B", "max_duration": "0s", "buffer_records": 0}},
        },
    }
    with pytest.raises(ConfigError) as err:
        build_config(data, builtin_factories())
    text = "\n".join(err.value.problems)
    for key in ("capture::max_bytes", "capture::max_duration", "capture::buffer_records"):
        assert key in text


async def test_no_hook_while_off_tokens_never_recorded_and_the_endpoint_refuses_clearly(
    tmp_path: Path,
) -> None:
    port = free_port()
    data = {
        "receivers": {
            "http": {
                "endpoint": f"127.0.0.1:{port}",
                "auth": {"tokens": [{"token": "client-secret-token-0123456789", "tenant": "pay"}]},
            }
        },
        "exporters": {"debug": {"path": str(tmp_path / "out.jsonl")}},
        "service": {
            "pipelines": {"metrics": {"receivers": ["http"], "exporters": ["debug"]}},
            "telemetry": {"endpoint": "", "capture": {"directory": str(tmp_path), "max_duration": "5m"}},
        },
    }
    agent = Agent(build_config(data, builtin_factories()))
    admin = AdminServer(agent, "127.0.0.1:0")
    await agent.start()
    await admin.start()
    base = f"http://127.0.0.1:{admin.port}/api/capture"
    receiver = agent.receiver_instances()["http"][1]
    try:
        async with aiohttp.ClientSession() as http:
            assert receiver.capture is None
            async with http.get(base) as r:
                assert (await r.json()) == {"state": "idle"}
            async with http.post(base + "/start", json={"receivers": ["nope"]}) as r:
                assert r.status == 400 and "nope cannot be captured" in (await r.json())["error"]
            async with http.post(base + "/start", json={"max_duration_s": 3600}) as r:
                assert r.status == 400 and "capture.max_duration" in (await r.json())["error"]
            async with http.post(base + "/start", json={"max_bytes": 10}) as r:
                assert (
                    r.status == 400 and "max_bytes 10 is out of range: 1024 to" in (await r.json())["error"]
                )
            async with http.post(base + "/start", json={"colour": 1}) as r:
                assert r.status == 400 and "unknown fields colour" in (await r.json())["error"]
            async with http.post(base + "/start", json={"max_bytes": "1MiB"}) as r:
                assert r.status == 200, await r.text()
            async with http.post(base + "/start", json={}) as r:
                assert r.status == 409
            async with http.get(base + "/download") as r:
                assert r.status == 409
            await wait_until(lambda: receiver.capture is not None, "the hook set on the agent's loop")
            headers = {"Authorization": "Bearer client-secret-token-0123456789"}
            body = [{"name": "seen", "type": "counter", "value": 1}]
            async with http.post(f"http://127.0.0.1:{port}/v1/metrics", json=body, headers=headers) as r:
                assert r.status == 200
            async with http.post(base + "/stop", json={}) as r:
                assert (await r.json())["records"] == 1
            await wait_until(lambda: receiver.capture is None, "the hook cleared once the capture ended")
            async with http.post(f"http://127.0.0.1:{port}/v1/metrics", json=body, headers=headers) as r:
                assert r.status == 200  # taken while off: not in the file
            async with http.get(base + "/download") as r:
                raw = await r.read()
    finally:
        await admin.shutdown()
        await agent.stop()
    (tmp_path / "c").write_bytes(raw)
    _, records = read_file(str(tmp_path / "c"))
    assert [r.kind for r in records] == [DATA, END]
    assert json.loads(records[0].payload) == body
    assert set(records[0].meta) == {
        "receiver",
        "transport",
        "offset_ns",
        "time_unix_nano",
        "path",
        "content_type",
    }
    assert b"client-secret-token" not in raw


async def test_unix_datagram_and_stream_reads_are_recorded_and_replayed(tmp_path: Path) -> None:
    from agent.capture import CaptureControl
    from agent.capture.replay import replay

    dgram, stream = str(tmp_path / "dsd.sock"), str(tmp_path / "stream.sock")
    data = {
        "receivers": {"statsd": {"unixgram": dgram, "unix": stream, "flush_interval": "1h"}},
        "exporters": {"debug": {"path": str(tmp_path / "out.jsonl")}},
        "service": {
            "pipelines": {"metrics": {"receivers": ["statsd"], "exporters": ["debug"]}},
            "telemetry": {"endpoint": "", "capture": {"directory": str(tmp_path)}},
        },
    }
    agent = Agent(build_config(data, builtin_factories()))
    await agent.start()
    try:
        control = CaptureControl(agent, asyncio.get_running_loop())
        status = await asyncio.to_thread(control.start, ["statsd"])
        receiver = agent.receiver_instances()["statsd"][1]
        await wait_until(lambda: receiver.capture is not None, "the hook set")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"a:1|c", dgram)
        _, writer = await asyncio.open_unix_connection(stream)
        writer.write(b"b:2|c\n")
        await writer.drain()
        writer.close()

        def accepted() -> float:
            return agent.telemetry.value("receiver_accepted_points_total", receiver="statsd")

        await wait_until(lambda: accepted() == 2, "both lines taken")
        await wait_until(lambda: control.status()["records"] == 2, "both reads recorded")
        await asyncio.to_thread(control.stop)
        await wait_until(lambda: receiver.capture is None, "the hook cleared once the capture ended")
        header, records = read_file(status["path"])
        assert header.receivers["statsd"]["endpoints"] == {"unixgram": dgram, "unix": stream}
        assert sorted((r.transport, r.payload) for r in records if r.kind == DATA) == [
            ("unix", b"b:2|c\n"),
            ("unixgram", b"a:1|c"),
        ]
        summary = await replay(header, records, speed=0)  # to the recorded socket paths
        assert summary.errors == {} and summary.records == 2
        await wait_until(lambda: accepted() == 4, "the replayed lines taken again")
    finally:
        await agent.stop()


async def test_the_capture_routes_ask_for_the_endpoints_token(tmp_path: Path) -> None:
    data = {
        "receivers": {"http": {"endpoint": f"127.0.0.1:{free_port()}"}},
        "exporters": {"debug": {"path": str(tmp_path / "out.jsonl")}},
        "service": {
            "pipelines": {"metrics": {"receivers": ["http"], "exporters": ["debug"]}},
            "telemetry": {"endpoint": "", "auth": {"bearer_token": "admin-token"}},
        },
    }
    agent = Agent(build_config(data, builtin_factories()))
    admin = AdminServer(agent, "127.0.0.1:0")
    await admin.start()
    base = f"http://127.0.0.1:{admin.port}/api/capture"
    try:
        async with aiohttp.ClientSession() as http:
            for method, path in (("POST", "/start"), ("POST", "/stop"), ("GET", ""), ("GET", "/download")):
                async with http.request(method, base + path, json={}) as r:
                    assert r.status == 401, (method, path)
            assert admin.capture is not None and admin.capture.recorder is None  # nothing started
            async with http.get(base, headers={"Authorization": "Bearer admin-token"}) as r:
                assert r.status == 200 and (await r.json()) == {"state": "idle"}
    finally:
        await admin.shutdown()


async def test_a_capture_follows_a_receiver_that_a_reload_replaced(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]

    def config(port: int) -> Any:
        data = {
            "receivers": {"http": {"endpoint": f"127.0.0.1:{port}"}},
            "exporters": {"debug": {"path": str(tmp_path / "out.jsonl")}},
            "service": {
                "pipelines": {"metrics": {"receivers": ["http"], "exporters": ["debug"]}},
                "telemetry": {"endpoint": "", "capture": {"directory": str(tmp_path)}},
            },
        }
        return build_config(data, builtin_factories())

    agent = Agent(config(ports[0]))
    admin = AdminServer(agent, "127.0.0.1:0")
    await agent.start()
    await admin.start()
    base = f"http://127.0.0.1:{admin.port}/api/capture"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/start", json={}) as r:
                assert r.status == 200, await r.text()
            first = agent.receiver_instances()["http"][1]
            await wait_until(lambda: first.capture is not None, "the hook on the first receiver")
            body = [{"name": "before", "type": "counter", "value": 1}]
            async with http.post(f"http://127.0.0.1:{ports[0]}/v1/metrics", json=body) as r:
                assert r.status == 200
            assert await agent.reload(config(ports[1]))  # the receiver moves: a new instance
            second = agent.receiver_instances()["http"][1]
            assert second is not first
            assert second.capture is not None  # hooked by the reload itself, on the agent's loop
            body = [{"name": "after", "type": "counter", "value": 1}]
            async with http.post(f"http://127.0.0.1:{ports[1]}/v1/metrics", json=body) as r:
                assert r.status == 200
            async with http.post(base + "/stop", json={}) as r:
                assert (await r.json())["records"] == 2
            await wait_until(lambda: second.capture is None, "the hook cleared once the capture ended")
            async with http.get(base + "/download") as r:
                raw = await r.read()
    finally:
        await admin.shutdown()
        await agent.stop()
    (tmp_path / "c").write_bytes(raw)
    _, records = read_file(str(tmp_path / "c"))
    names = [json.loads(r.payload)[0]["name"] for r in records if r.kind == DATA]
    assert names == ["before", "after"]
