"""The debug exporter: one JSON line per point, span and log record, at each verbosity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent import exphist
from agent.component import ComponentKind
from agent.model import (
    ExplicitHistogram,
    Kind,
    LogBatch,
    MetricBatch,
    Point,
    Resource,
    Scope,
    SpanBatch,
    Summary,
)
from agent.telemetry import Telemetry
from exporters.debug import DebugConfig, DebugExporter
from tests.conftest import component_settings


def make(tmp_path: Path, verbosity: str) -> tuple[DebugExporter, Path, Telemetry]:
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.EXPORTER, "debug")
    path = tmp_path / "out.jsonl"
    return DebugExporter(settings, DebugConfig(verbosity=verbosity, path=str(path))), path, tel  # type: ignore[arg-type]


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def spans() -> SpanBatch:
    rs = trace_pb2.ResourceSpans()
    rs.resource.attributes.add(key="service.name").value.string_value = "checkout"
    ss = rs.scope_spans.add()
    ss.scope.name = "shop"
    span = ss.spans.add(name="GET /cart", trace_id=bytes(range(16)), span_id=bytes(range(8)))
    span.attributes.add(key="http.status_code").value.int_value = 200
    ss.spans.add(name="db", trace_id=bytes(range(16)), span_id=b"\x01" * 8, parent_span_id=bytes(range(8)))
    return SpanBatch((rs,), span_count=2)


def logs() -> LogBatch:
    rl = logs_pb2.ResourceLogs()
    rl.resource.attributes.add(key="service.name").value.string_value = "checkout"
    record = rl.scope_logs.add().log_records.add(severity_text="WARN", time_unix_nano=5)
    record.body.string_value = "disk almost full"
    record.attributes.add(key="free").value.double_value = float("nan")
    return LogBatch((rl,), record_count=1)


async def test_every_kind_of_point_and_signal(tmp_path: Path) -> None:
    exporter, path, tel = make(tmp_path, "detailed")
    await exporter.start()
    resource, scope = Resource((("service.name", "api"),)), Scope("meter", "1.0")
    points = (
        Point("hits", Kind.SUM, (("env", "dev"),), 10, value=3.0, resource=resource, scope=scope),
        Point("temp", Kind.GAUGE, (), 10, value=float("nan")),
        Point("lat", Kind.HISTOGRAM, (), 10, histogram=exphist.from_values(np.array([1.0, 2.0]))),
        Point(
            "size",
            Kind.HISTOGRAM,
            (),
            10,
            explicit=ExplicitHistogram((1.0, 5.0), (1, 2, 0), sum=7.5, min=0.5, max=4.0),
        ),
        Point("rpc", Kind.SUMMARY, (), 10, summary=Summary(4, 10.0, ((0.5, 2.0), (0.99, 4.0)))),
    )
    await exporter.consume(MetricBatch(points))
    await exporter.consume(spans())
    await exporter.consume(logs())
    await exporter.shutdown()
    out = lines(path)
    assert len(out) == 5 + 2 + 1
    hits, temp, lat, size, rpc, span, child, log = out
    assert hits["value"] == 3.0 and hits["labels"] == {"env": "dev"}
    assert hits["resource"] == {"service.name": "api"} and hits["scope"] == "meter"
    assert temp["value"] == "NaN"
    assert lat["histogram"]["count"] == 2 and "scale" in lat["histogram"]
    assert size["histogram"] == {
        "count": 3,
        "sum": 7.5,
        "min": 0.5,
        "max": 4.0,
        "bounds": [1.0, 5.0],
        "counts": [1, 2, 0],
    }
    assert rpc["summary"] == {"count": 4, "sum": 10.0, "quantiles": {"0.5": 2.0, "0.99": 4.0}}
    assert span["span"] == "GET /cart" and span["trace_id"] == bytes(range(16)).hex()
    assert span["service"] == "checkout" and span["scope"] == "shop"
    assert span["attributes"] == {"http.status_code": 200}
    assert child["parent_span_id"] == bytes(range(8)).hex()
    assert log["log"] == "disk almost full" and log["severity"] == "WARN"
    assert log["attributes"] == {"free": "NaN"}
    assert tel.value("exporter_sent_points_total") == 8


async def test_basic_writes_one_line_per_batch(tmp_path: Path) -> None:
    exporter, path, _ = make(tmp_path, "basic")
    await exporter.start()
    await exporter.consume(MetricBatch((Point("a", Kind.GAUGE, (), 1, value=1.0),)))
    await exporter.consume(spans())
    await exporter.consume(logs())
    await exporter.shutdown()
    assert lines(path) == [{"points": 1}, {"spans": 2}, {"log_records": 1}]


async def test_normal_leaves_out_attributes(tmp_path: Path) -> None:
    exporter, path, _ = make(tmp_path, "normal")
    await exporter.start()
    await exporter.consume(spans())
    await exporter.shutdown()
    assert all("attributes" not in line for line in lines(path))
