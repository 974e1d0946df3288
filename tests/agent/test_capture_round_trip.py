"""Capture and replay round-trip: real clients (the datadog package's DogStatsD client, the
OpenTelemetry SDK's OTLP HTTP and gRPC exporters, an aiohttp JSON POST) send to agent 1 while a
capture runs (started and stopped through /api/capture); the file is replayed into agent 2, whose
debug exporter writes the same points as agent 1's (times aside)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from datadog.dogstatsd import DogStatsd

from agent.admin import AdminServer
from agent.capture.format import DATA, END, read_file
from agent.capture.replay import replay
from agent.config import build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.loop_block_limit(None)  # the DogStatsD client sends from the test's loop


def _config(debug_path: Path, ports: dict[str, int], capture: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {
        "receivers": {
            # One flush at stop: both agents aggregate the whole run into one point per series.
            "statsd": {"udp": f"127.0.0.1:{ports['statsd']}", "flush_interval": "1h"},
            "otlp": {"http": f"127.0.0.1:{ports['otlp_http']}", "grpc": f"127.0.0.1:{ports['otlp_grpc']}"},
            "http": {"endpoint": f"127.0.0.1:{ports['http']}"},
        },
        "exporters": {"debug": {"path": str(debug_path)}},
        "service": {
            "pipelines": {"metrics": {"receivers": ["statsd", "otlp", "http"], "exporters": ["debug"]}},
            "telemetry": {"endpoint": "", **({"capture": capture} if capture else {})},
        },
    }
    return build_config(data, builtin_factories())


def _ports() -> dict[str, int]:
    return {
        "statsd": free_port(socket.SOCK_DGRAM),
        "otlp_http": free_port(),
        "otlp_grpc": free_port(),
        "http": free_port(),
    }


def _points(path: Path) -> Counter[str]:
    """What the debug exporter wrote, times aside (the replay runs later), as a multiset."""
    seen: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        point = json.loads(line)
        kept = {k: v for k, v in point.items() if "time" not in k}
        seen[json.dumps(kept, sort_keys=True)] += 1
    return seen


def _sdk_export(transport: str, target: str) -> None:
    """One export of a counter, a gauge and a histogram with the SDK's own exporter (blocking)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    exporter: Any
    if transport == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        exporter = GrpcExporter(endpoint=target, insecure=True, timeout=10)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        exporter = HttpExporter(endpoint=target, timeout=10)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=float("inf"))
    provider = MeterProvider(
        resource=Resource.create({"service.name": f"svc-{transport}"}), metric_readers=[reader]
    )
    meter = provider.get_meter("capture.test")
    meter.create_counter(f"orders_{transport}").add(5, {"region": "eu", "secret": "s3"})
    meter.create_histogram(f"latency_{transport}", unit="ms").record(12.5, {"route": "/a"})
    assert provider.force_flush(10_000)
    provider.shutdown()


async def _api(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"http://127.0.0.1:{port}{path}", json=body) as r,
    ):
        data = await r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data


async def test_a_capture_of_real_clients_replays_into_a_second_agent_with_the_same_output(
    tmp_path: Path,
) -> None:
    ports1, ports2 = _ports(), _ports()
    agent1 = Agent(_config(tmp_path / "one.jsonl", ports1))
    admin = AdminServer(agent1, "127.0.0.1:0")
    await agent1.start()
    await admin.start()
    try:
        status, started = await _api(admin.port, "POST", "/api/capture/start", {"max_duration_s": 120})
        assert status == 200, started
        assert started["receivers"] == ["http", "otlp", "statsd"]
        await wait_until(lambda: agent1.receiver_instances()["statsd"][1].capture is not None, "hooks set")

        dd = DogStatsd(
            host="127.0.0.1", port=ports1["statsd"], disable_telemetry=True, origin_detection_enabled=False
        )
        try:
            dd.increment("page.views", 3, tags=["page:home"])
            dd.increment("page.views", 2, tags=["page:home"])
            dd.gauge("queue.size", 17, tags=["queue:jobs"])
            dd.histogram("request.bytes", 512, tags=["route:/x"])
            dd.distribution("request.ms", 42)
            dd.flush()
        finally:
            dd.close_socket()
        await asyncio.to_thread(_sdk_export, "http", f"http://127.0.0.1:{ports1['otlp_http']}/v1/metrics")
        await asyncio.to_thread(_sdk_export, "grpc", f"127.0.0.1:{ports1['otlp_grpc']}")
        async with aiohttp.ClientSession() as http:
            items = [{"name": "jobs_done", "type": "counter", "value": 4, "labels": {"team": "pay"}}]
            async with http.post(f"http://127.0.0.1:{ports1['http']}/v1/metrics", json=items) as r:
                assert r.status == 200, await r.text()

        await wait_until(
            lambda: agent1.telemetry.value("receiver_accepted_points_total", receiver="statsd") >= 5,
            "agent 1's statsd receiver took the 5 lines",
        )
        status, final = await _api(admin.port, "POST", "/api/capture/stop", {})
        assert status == 200 and final["state"] == "ended" and final["reason"] == "stopped", final
        assert final["dropped_records"] == 0
        status, data = await _api(admin.port, "GET", "/api/capture/download")
        assert status == 200
        capture_file = tmp_path / "capture.hwcap"
        capture_file.write_bytes(data)
    finally:
        await admin.shutdown()
        await agent1.stop()

    header, records = read_file(str(capture_file))
    assert set(header.receivers) == {"http", "otlp", "statsd"}
    assert header.receivers["otlp"]["endpoints"] == {
        "http": f"127.0.0.1:{ports1['otlp_http']}",
        "grpc": f"127.0.0.1:{ports1['otlp_grpc']}",
    }
    data_records = [r for r in records if r.kind == DATA]
    kinds = Counter((r.receiver, r.transport) for r in data_records)
    assert kinds[("statsd", "udp")] >= 5
    assert kinds[("otlp", "http")] == kinds[("otlp", "grpc")] == 1
    assert kinds[("http", "http")] == 1
    assert records[-1].kind == END and records[-1].meta["reason"] == "stopped"
    offsets = [r.offset_ns for r in data_records]
    assert offsets == sorted(offsets)

    agent2 = Agent(_config(tmp_path / "two.jsonl", ports2))
    await agent2.start()
    try:
        summary = await replay(
            header,
            records,
            speed=0,
            targets={
                "statsd": f"127.0.0.1:{ports2['statsd']}",
                "otlp/http": f"127.0.0.1:{ports2['otlp_http']}",
                "otlp/grpc": f"127.0.0.1:{ports2['otlp_grpc']}",
                "http": f"127.0.0.1:{ports2['http']}",
            },
        )
        assert summary.errors == {}
        assert summary.records == len(data_records)
        assert summary.bytes == sum(len(r.payload) for r in data_records)
        await wait_until(
            lambda: (
                agent2.telemetry.value("receiver_accepted_points_total", receiver="statsd")
                == agent1.telemetry.value("receiver_accepted_points_total", receiver="statsd")
            ),
            "agent 2's statsd receiver took what agent 1's did",
        )
    finally:
        await agent2.stop()
    one, two = _points(tmp_path / "one.jsonl"), _points(tmp_path / "two.jsonl")
    # 4 StatsD series, a counter and a histogram from each SDK exporter, the JSON counter.
    assert sum(one.values()) == 9
    assert one == two
