"""``headwater queue replay``: backlogs written by the real exporters (disk queue, backend down) are sent
to another endpoint — a real Prometheus for remote-write, the independent OTLP sink for OTLP — by the
command run as a user runs it (a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from agent.component import ComponentId, ComponentKind, Settings
from agent.diskqueue import Partition, partition_name
from agent.diskqueue.replay import content_encoding, otlp_url, parse_partition_name
from agent.model import Kind, LogBatch, MetricBatch, Point, SpanBatch, Temporality
from agent.sending import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from agent.tls import ClientTLSConfig
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig
from exporters.otlp.grpc import OtlpGrpcExporter
from exporters.otlp.http import OtlpHttpExporter
from exporters.prometheus_remote_write import PrometheusRemoteWriteConfig, PrometheusRemoteWriteExporter
from tests.conftest import component_settings, free_port
from tests.exporters.otlp_sink import Answer, Sink
from tests.integration.conftest import ROOT, PrometheusServer

pytestmark = pytest.mark.integration

FAST = RetryConfig(initial_interval=0.01, max_interval=0.05)
S = 10**9


def settings(type_: str, name: str = "") -> Settings:
    """Settings of the exporter ``type_/name``, reporting into a telemetry of its own."""
    return component_settings(
        Telemetry(),
        ComponentKind.EXPORTER,
        str(ComponentId(type_, name)),
        logger=f"test.replay.{type_}",
        shutdown_timeout_s=0.3,
    )


def disk(queue: Path) -> QueueConfig:
    return QueueConfig(storage="disk", directory=str(queue))


def nowhere_http() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: the backend is down


def counter(name: str, value: float, t: int, labels: Any = ()) -> Point:
    return Point(name, Kind.SUM, labels, t, value, t - 10 * S, Temporality.DELTA, True)


async def run_cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "queue",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def replay_json(directory: Path, to: str, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    code, out = await run_cli("replay", str(directory), "--to", to, "--json", *extra)
    try:
        return code, list(json.loads(out))
    except json.JSONDecodeError:
        raise AssertionError(f"exit {code}, not JSON:\n{out}") from None


async def lag(directory: Path) -> dict[str, int]:
    code, out = await run_cli("inspect", str(directory), "--json")
    assert code == 0, out
    return {r["partition"]: r["lag"] for r in json.loads(out)}


async def http_backlog(queue: Path, name: str = "backup", **overrides: Any) -> tuple[str, int]:
    """An otlp_http exporter with its backend down queues metrics, traces and logs on disk, then stops.
    Returns the partition name and the number of records."""
    cfg = OtlpHttpConfig(
        endpoint=nowhere_http(),
        sending_queue=disk(queue),
        retry_on_failure=FAST,
        resource_from_environment=False,
        **overrides,
    )
    assert cfg.validate() == []
    exp = OtlpHttpExporter(settings("otlp_http", name), cfg)
    await exp.start()
    try:
        await feed_otlp(exp)
    finally:
        await exp.shutdown()
    return partition_name(f"otlp_http/{name}"), 3


async def feed_otlp(exp: OtlpHttpExporter | OtlpGrpcExporter) -> None:
    t = time.time_ns()
    await exp.consume(MetricBatch((counter("jobs.done", 5, t, (("queue", "mail"),)),)))
    spans = [
        Span(name=f"span-{i}", trace_id=bytes([i + 1]) * 16, span_id=bytes([i + 1]) * 8) for i in range(2)
    ]
    await exp.consume(SpanBatch((ResourceSpans(scope_spans=[ScopeSpans(spans=spans)]),), span_count=2))
    logs = ResourceLogs(scope_logs=[ScopeLogs(log_records=[LogRecord(severity_text="WARN")])])
    await exp.consume(LogBatch((logs,), record_count=1))


def check_otlp_received(sink: Sink) -> None:
    assert [r.signal for r in sink.received] == ["metrics", "traces", "logs"]
    [(_, _, metric, dp)] = sink.metrics()
    assert metric.name == "jobs.done" and dp.as_double == 5.0
    assert {kv.key: kv.value.string_value for kv in dp.attributes} == {"queue": "mail"}
    spans = [
        s.name for rs in sink.received[1].message.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]
    assert spans == ["span-0", "span-1"]
    logs = sink.received[2].message.resource_logs[0].scope_logs[0].log_records
    assert [r.severity_text for r in logs] == ["WARN"]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    yield s
    await s.stop()


# -- remote-write into a real Prometheus --------------------------------------------------------------


async def test_remote_write_backlog_replays_into_prometheus(
    tmp_path: Path, prometheus: PrometheusServer
) -> None:
    queue = tmp_path / "queue"
    cfg = PrometheusRemoteWriteConfig(
        endpoint=nowhere_http() + "/api/v1/write", sending_queue=disk(queue), retry_on_failure=FAST
    )
    exp = PrometheusRemoteWriteExporter(settings("prometheus_remote_write"), cfg)
    await exp.start()
    t = time.time_ns() - 120 * S
    try:
        for i, value in enumerate((3, 2, 4)):  # three requests: cumulative 3, 5, 9
            await exp.consume(
                MetricBatch((counter("jobs.done", value, t + i * 10 * S, (("queue", "mail"),)),))
            )
        await exp.consume(MetricBatch((Point("queue.depth", Kind.GAUGE, (), t + 30 * S, 40.0),)))
    finally:
        await exp.shutdown()
    name = partition_name("prometheus_remote_write")
    assert await lag(queue) == {name: 4}

    code, out = await run_cli("replay", str(queue), "--to", prometheus.write_url, "--dry-run")
    assert code == 0, out
    assert out.count("would send record") == 4
    assert "Content-Encoding: snappy" in out and "X-Prometheus-Remote-Write-Version: 0.1.0" in out
    assert prometheus.query("jobs_done_total") == []  # nothing was sent
    assert await lag(queue) == {name: 4}

    code, out = await run_cli("replay", str(queue), "--to", prometheus.write_url)
    assert code == 0, out
    assert f"{name}: replayed 4 of 4 records, 4 points," in out
    assert "0 rejected (0 points), 0 failed" in out
    # In a thread: wait_value polls Prometheus synchronously.
    await asyncio.to_thread(prometheus.wait_value, 'jobs_done_total{queue="mail"}', 9.0)
    # Every sample arrived, in order: the running total went 3, 5, 9 without a reset.
    assert prometheus.value('min_over_time(jobs_done_total{queue="mail"}[15m])') == 3.0
    assert prometheus.value('count_over_time(jobs_done_total{queue="mail"}[15m])') == 3.0
    assert prometheus.value('resets(jobs_done_total{queue="mail"}[15m])') == 0.0
    assert prometheus.value("max_over_time(queue_depth[15m])") == 40.0
    assert await lag(queue) == {name: 4}  # without --ack the queue is untouched

    # Again, with --ack: Prometheus accepts the exact duplicates of its newest samples but refuses the
    # older ones as out of order (HTTP 400): those count as rejected and stay queued; the rest is acked.
    code, summary = await replay_json(queue, prometheus.write_url, "--ack")
    assert code == 1, summary
    [s] = summary
    assert (s["replayed"], s["acked"], s["rejected"], s["rejected_points"], s["failed"]) == (2, 2, 2, 2, 0)
    assert all("HTTP 400" in m and "out of order" in m for m in s["messages"]), s["messages"]
    assert await lag(queue) == {name: 2}
    assert prometheus.value('count_over_time(jobs_done_total{queue="mail"}[15m])') == 3.0  # no duplicates


async def test_remote_write_needs_an_http_url(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    exp = PrometheusRemoteWriteExporter(
        settings("prometheus_remote_write", "mimir"),
        PrometheusRemoteWriteConfig(
            endpoint=nowhere_http(), sending_queue=disk(queue), retry_on_failure=FAST
        ),
    )
    await exp.start()
    try:
        await exp.consume(MetricBatch((counter("x", 1, time.time_ns()),)))
    finally:
        await exp.shutdown()
    code, out = await run_cli("replay", str(queue), "--to", "127.0.0.1:4317")
    assert code == 2
    assert "remote-write backlog is sent over HTTP" in out


# -- OTLP into the independent sink -------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_otlp_http_backlog_replays_into_a_sink(tmp_path: Path, sink: Sink, compression: str) -> None:
    queue = tmp_path / "queue"
    name, records = await http_backlog(queue, compression=compression)
    assert name == "otlp_http%2Fbackup"
    base = await sink.start_http()

    code, summary = await replay_json(queue, base, "--header", "X-Scope-OrgID=acme")
    assert code == 0, summary
    [s] = summary
    assert (s["partition"], s["type"], s["tenant"]) == (name, "otlp_http", None)
    assert (s["records"], s["replayed"], s["points"], s["rejected"], s["failed"]) == (3, 3, 4, 0, 0)
    assert s["bytes"] == sum(len(r.raw) for r in sink.received)
    check_otlp_received(sink)
    assert [r.path for r in sink.received] == ["/v1/metrics", "/v1/traces", "/v1/logs"]
    for r in sink.received:
        assert r.headers.get("Content-Encoding") == (None if compression == "none" else compression)
        assert r.headers["Content-Type"] == "application/x-protobuf"
        assert r.headers["X-Scope-OrgID"] == "acme"
    assert await lag(queue) == {name: records}

    # A signal's own endpoint as --to: the other signals go to their sibling paths.
    sink.received.clear()
    code, summary = await replay_json(queue, base + "/v1/metrics/")
    assert code == 0, summary
    assert [r.path for r in sink.received] == ["/v1/metrics", "/v1/traces", "/v1/logs"]
    check_otlp_received(sink)


async def test_otlp_grpc_backlog_goes_over_grpc_or_http(tmp_path: Path, sink: Sink) -> None:
    queue = tmp_path / "queue"
    cfg = OtlpConfig(
        endpoint=f"127.0.0.1:{free_port()}",
        tls=ClientTLSConfig(insecure=True),
        sending_queue=disk(queue),
        retry_on_failure=FAST,
        resource_from_environment=False,
    )
    exp = OtlpGrpcExporter(settings("otlp", "signoz"), cfg)
    await exp.start()
    try:
        await feed_otlp(exp)
    finally:
        await exp.shutdown()
    name = "otlp%2Fsignoz"
    assert await lag(queue) == {name: 3}
    target = await sink.start_grpc()
    base = await sink.start_http()

    code, summary = await replay_json(queue, "grpc://" + target, "--header", "X-Scope-OrgID=acme")
    assert code == 0, summary
    assert [(s["type"], s["replayed"], s["points"]) for s in summary] == [("otlp", 3, 4)]
    check_otlp_received(sink)
    assert all(r.headers["x-scope-orgid"] == "acme" for r in sink.received)

    sink.received.clear()
    code, summary = await replay_json(queue, base)
    assert code == 0, summary
    check_otlp_received(sink)
    assert all("Content-Encoding" not in r.headers for r in sink.received)  # stored uncompressed

    # An otlp_http backlog (gzip bodies) to a gRPC target is decompressed first.
    other = tmp_path / "other"
    await http_backlog(other)
    sink.received.clear()
    code, summary = await replay_json(other, "grpc://" + target)
    assert code == 0, summary
    check_otlp_received(sink)


# -- ack, locks, rejections, failures ------------------------------------------------------------------


async def test_ack_refused_while_an_agent_holds_the_queue_and_empties_it_after(
    tmp_path: Path, sink: Sink
) -> None:
    queue = tmp_path / "queue"
    name, records = await http_backlog(queue)
    base = await sink.start_http()
    # The exporter running again (still cut off from its backend) holds the partition's lock.
    live = OtlpHttpExporter(
        settings("otlp_http", "backup"),
        OtlpHttpConfig(endpoint=nowhere_http(), sending_queue=disk(queue), retry_on_failure=FAST),
    )
    await live.start()
    try:
        code, out = await run_cli("replay", str(queue), "--to", base, "--ack")
        assert code == 2
        assert "locked by another process" in out and f"(pid {os.getpid()})" in out
        assert sink.attempts == []  # nothing was sent
        # Without --ack the replay is read-only and runs beside the live exporter.
        code, summary = await replay_json(queue, base)
        assert code == 0, summary
        assert summary[0]["replayed"] == records and summary[0]["acked"] == 0
        check_otlp_received(sink)
    finally:
        await live.shutdown()
    assert await lag(queue) == {name: records}  # unchanged

    sink.received.clear()
    code, out = await run_cli("replay", str(queue), "--to", base, "--ack")
    assert code == 0, out
    assert f"{name}: replayed 3 of 3 records, 4 points" in out and "3 acked" in out
    check_otlp_received(sink)
    assert await lag(queue) == {name: 0}
    code, out = await run_cli("inspect", str(queue))
    assert code == 0 and f"{name}: 0 segments, 0 bytes, 0 records, lag 0 unacked" in out
    sink.received.clear()
    code, summary = await replay_json(queue, base, "--ack")
    assert code == 0 and summary[0]["records"] == 0 and sink.received == []  # nothing sent twice


async def test_rejected_records_are_counted_and_kept(tmp_path: Path, sink: Sink) -> None:
    queue = tmp_path / "queue"
    name, _ = await http_backlog(queue)
    base = await sink.start_http()
    sink.script = [Answer(), Answer(kind="http", status=400)]  # the traces request is refused
    code, out = await run_cli("replay", str(queue), "--to", base, "--ack")
    assert code == 1, out
    assert "rejected by" in out and "HTTP 400: scripted 400" in out
    assert f"{name}: replayed 2 of 3 records, 2 points" in out
    assert "1 rejected (2 points), 0 failed; 2 acked" in out
    assert [r.signal for r in sink.received] == ["metrics", "logs"]  # went on after the rejection
    assert await lag(queue) == {name: 1}  # the rejected record stays in the queue


async def test_failing_endpoint_stops_in_order_with_a_summary(tmp_path: Path, sink: Sink) -> None:
    queue = tmp_path / "queue"
    name, _ = await http_backlog(queue)

    code, out = await run_cli("replay", str(queue), "--to", nowhere_http(), "--retries", "1")
    assert code == 3, out
    assert f"{name}: replayed 0 of 3 records, 0 points, 0 bytes; 0 rejected (0 points), 1 failed" in out
    assert "STOPPED: record" in out and "after 2 attempts" in out and "2 records not attempted" in out

    # 503 is retried; a record that keeps failing stops the replay there: the later ones wait.
    base = await sink.start_http()
    busy = Answer(kind="http", status=503)
    sink.script = [busy, Answer(), busy, busy]
    code, summary = await replay_json(queue, base, "--retries", "1", "--ack")
    assert code == 3, summary
    [s] = summary
    assert (s["replayed"], s["failed"], s["not_attempted"], s["acked"], s["status"]) == (
        1,
        1,
        1,
        1,
        "stopped",
    )
    assert "HTTP 503" in s["error"]
    assert sink.attempts == ["metrics", "metrics", "traces", "traces"]
    assert await lag(queue) == {name: 2}
    code, summary = await replay_json(queue, base, "--ack")  # resumes where it stopped
    assert code == 0, summary
    assert [r.signal for r in sink.received] == ["metrics", "traces", "logs"]
    assert await lag(queue) == {name: 0}


async def test_partitions_tenants_and_refusals(tmp_path: Path, sink: Sink) -> None:
    queue = tmp_path / "queue"
    await http_backlog(queue)
    # A tenant's partition, written as the sender writes one (uncompressed body, the signal as kind).
    tenant = queue / partition_name("otlp_http/backup", "acme")
    body = ExportLogsServiceRequest(
        resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[LogRecord(severity_text="acme")])])]
    ).SerializeToString()
    with Partition.open(str(tenant)) as p:
        p.append(body, items=1, headers={"\x00kind": "logs"})
    base = await sink.start_http()

    code, summary = await replay_json(queue, base, "--partition", tenant.name)
    assert code == 0, summary
    assert [(s["partition"], s["tenant"], s["replayed"]) for s in summary] == [(tenant.name, "acme", 1)]
    [rec] = sink.received
    assert rec.path == "/v1/logs" and "Content-Encoding" not in rec.headers
    assert rec.message.resource_logs[0].scope_logs[0].log_records[0].severity_text == "acme"

    code, out = await run_cli("replay", str(queue), "--to", base, "--partition", "nope")
    assert code == 2 and "no disk-queue partition named nope" in out
    code, out = await run_cli("replay", str(queue), "--to", base, "--header", "Content-Type=text/plain")
    assert code == 2 and "cannot be replaced" in out
    code, out = await run_cli("inspect", str(queue), "--to", base)
    assert code == 2 and "only for replay" in out

    strange = queue / partition_name("kafka/events")
    Partition.open(str(strange)).close()
    code, out = await run_cli("replay", str(queue), "--to", base)
    assert code == 2
    assert "kafka%2Fevents: cannot tell which exporter wrote this partition" in out


def test_partition_names_encodings_and_urls() -> None:
    assert parse_partition_name("otlp%2Fsignoz@acme") == ("otlp/signoz", "otlp", "acme")
    assert parse_partition_name(partition_name("otlp_http/a@b", "t@x")) == (
        "otlp_http/a@b",
        "otlp_http",
        "t@x",
    )
    assert parse_partition_name("prometheus_remote_write") == (
        "prometheus_remote_write",
        "prometheus_remote_write",
        None,
    )
    assert content_encoding(b"\x1f\x8b\x08rest") == "gzip"
    assert content_encoding(b"\x28\xb5\x2f\xfdrest") == "zstd"
    assert content_encoding(b"\x0a\x02ab") is None
    assert otlp_url("http://h:4318/", "logs") == "http://h:4318/v1/logs"
    assert otlp_url("http://h:4318/otlp/v1/metrics", "traces") == "http://h:4318/otlp/v1/traces"
