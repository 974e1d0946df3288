"""Spans per second through the spanmetrics connector (consume + flush), on one core.

Run from the repository root: ``taskset -c 0 python bench/spanmetrics_bench.py [--quick]``.

Input: OTLP ``ResourceSpans`` parsed from their wire bytes (as the OTLP receiver hands them on), 512
spans a request (the SDK's BatchSpanProcessor batch), from 3 services: half HTTP server spans (8
attributes: method, route of 50, status code, scheme, server address, user agent, client address,
tenant of 10), half database client spans (7 attributes: system, operation of 4, table of 20,
statement, server address, tenant, and a row count). Each configuration consumes every request and
flushes every ``FLUSH_EVERY`` requests into a consumer that does nothing; the figure is this
process's CPU time for all of it (every flush included), best of the rounds.

Configurations: the Collector's defaults (calls and duration over service, span name, kind and
status), and ``preset: red`` with ``http.route`` as a dimension (the metric sets SignOz dashboards
read, on top).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

from agent.component import ComponentId, ComponentKind, Settings
from agent.model import Batch, SpanBatch
from agent.telemetry import ComponentTelemetry, Telemetry
from connectors.spanmetrics import DimensionConfig, SpanMetricsConfig, SpanMetricsConnector

SPANS_PER_REQUEST = 512
UNIQUE_REQUESTS = 100
"""Distinct requests built (51,200 spans); the run cycles through them."""
FLUSH_EVERY = 200
"""Requests between flushes: 102,400 spans, one second at the goal rate; the default flush interval
is 15 s, so flushing costs 15 times less a span in service than here."""
ROUTES, TABLES, TENANTS = 30, 20, 5
"""Cardinality: 30 routes x 3 methods x 5 status codes x 5 tenants = 2,250 http_requests_total
series at most, within the default max_series with everything else (no span goes to overflow)."""
GOAL_SPANS_PER_S = 100_000
ERROR = Status.StatusCode.STATUS_CODE_ERROR
UNSET = Status.StatusCode.STATUS_CODE_UNSET

CONFIGS: dict[str, SpanMetricsConfig] = {
    "collector defaults": SpanMetricsConfig(),
    "preset red + http.route": SpanMetricsConfig(preset="red", dimensions=[DimensionConfig("http.route")]),
}


class Discard:
    def __init__(self) -> None:
        self.points = 0

    async def consume(self, batch: Batch) -> None:
        self.points += len(batch)


def _kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def make_requests(n_requests: int, seed: int = 1) -> list[SpanBatch]:
    """``n_requests`` SpanBatches of SPANS_PER_REQUEST spans each, parsed from the wire."""
    rnd = random.Random(seed)
    routes = [f"/api/v1/resource{i}/{{id}}" for i in range(ROUTES)]
    tables = [f"table_{i}" for i in range(TABLES)]
    tenants = [f"tenant-{i}" for i in range(TENANTS)]
    out = []
    for r in range(n_requests):
        request = ExportTraceServiceRequest()
        rs: ResourceSpans = request.resource_spans.add()
        service = f"service-{r % 3}"
        rs.resource.attributes.extend(
            [_kv("service.name", service), _kv("service.instance.id", f"{service}-pod-1"),
             _kv("telemetry.sdk.language", "python"), _kv("host.name", "node-7")]
        )  # fmt: skip
        spans = rs.scope_spans.add().spans
        for i in range(SPANS_PER_REQUEST):
            start = 1_700_000_000_000_000_000 + r * 10**9 + i * 10**6
            tenant = rnd.choice(tenants)
            if i % 2 == 0:
                route = rnd.choice(routes)
                method = rnd.choice(("GET", "GET", "GET", "POST", "PUT"))
                code = rnd.choice((200, 200, 200, 200, 201, 404, 500))
                attrs = [
                    _kv("http.request.method", method), _kv("http.route", route),
                    _kv("http.response.status_code", code), _kv("url.scheme", "https"),
                    _kv("server.address", "api.example.com"), _kv("user_agent.original", "Mozilla/5.0"),
                    _kv("client.address", f"10.0.{i % 256}.{r % 256}"), _kv("tenant.id", tenant),
                ]  # fmt: skip
                span = Span(
                    name=f"{method} {route}", kind=Span.SpanKind.SPAN_KIND_SERVER,
                    start_time_unix_nano=start, end_time_unix_nano=start + int(rnd.lognormvariate(17, 1)),
                    status=Status(code=ERROR if code == 500 else UNSET),
                    attributes=attrs,
                )  # fmt: skip
            else:
                op = rnd.choice(("SELECT", "SELECT", "INSERT", "UPDATE"))
                table = rnd.choice(tables)
                attrs = [
                    _kv("db.system", "postgresql"), _kv("db.operation", op), _kv("db.sql.table", table),
                    _kv("db.statement", f"{op} * FROM {table} WHERE id = $1"),
                    _kv("server.address", "db.internal"), _kv("tenant.id", tenant), _kv("db.rows", i % 50),
                ]  # fmt: skip
                span = Span(
                    name=f"{op} {table}", kind=Span.SpanKind.SPAN_KIND_CLIENT,
                    start_time_unix_nano=start, end_time_unix_nano=start + int(rnd.lognormvariate(14, 1)),
                    attributes=attrs,
                )  # fmt: skip
            span.trace_id = rnd.randbytes(16)
            span.span_id = rnd.randbytes(8)
            spans.append(span)
        parsed = ExportTraceServiceRequest.FromString(request.SerializeToString())
        out.append(SpanBatch(tuple(parsed.resource_spans), span_count=SPANS_PER_REQUEST))
    return out


def _settings(tel: Telemetry) -> Settings:
    return Settings(
        id=ComponentId("spanmetrics"),
        kind=ComponentKind.CONNECTOR,
        telemetry=ComponentTelemetry(tel, "connector", "spanmetrics"),
        logger=logging.getLogger("bench.spanmetrics"),
    )


async def _run(config: SpanMetricsConfig, requests: list[SpanBatch], n_requests: int) -> tuple[float, int]:
    """CPU seconds for consuming every request and flushing every FLUSH_EVERY of them; points out."""
    sink = Discard()
    tel = Telemetry()
    conn = SpanMetricsConnector(_settings(tel), config, sink, run_timer=False)
    gc.collect()
    t0 = time.process_time()
    for i in range(1, n_requests + 1):
        await conn.consume(requests[i % len(requests)])
        if i % FLUSH_EVERY == 0:
            await conn.flush()
    await conn.flush()
    cpu_s = time.process_time() - t0
    assert tel.value("spanmetrics_overflow_spans_total") == 0, "the benchmark's series exceed max_series"
    return cpu_s, sink.points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer spans and rounds")
    args = parser.parse_args()
    n_requests, rounds = (400, 1) if args.quick else (600, 3)
    requests = make_requests(UNIQUE_REQUESTS)
    spans = n_requests * SPANS_PER_REQUEST
    print(
        f"{spans:,} spans ({n_requests} requests of {SPANS_PER_REQUEST}, {UNIQUE_REQUESTS} distinct), "
        f"a flush every {FLUSH_EVERY} requests"
    )
    worst = float("inf")
    for name, config in CONFIGS.items():
        best = float("inf")
        points = 0
        for _ in range(rounds):
            cpu_s, points = asyncio.run(_run(config, requests, n_requests))
            best = min(best, cpu_s)
        rate = spans / best
        worst = min(worst, rate)
        print(
            f"{name:28s} {rate:>10,.0f} spans/s  {best / spans * 1e6:6.2f} µs/span  ({points:,} points out)"
        )
    verdict = "meets" if worst >= GOAL_SPANS_PER_S else "misses"
    print(f"slowest configuration: {worst:,.0f} spans/s — {verdict} the {GOAL_SPANS_PER_S:,} spans/s goal")


if __name__ == "__main__":
    main()
