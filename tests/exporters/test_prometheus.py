"""The pull endpoint: what a scrape returns, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from agent import exphist
from agent.component import ComponentId, ComponentKind, Settings
from agent.model import Kind, MetricBatch, Point
from agent.telemetry import ComponentTelemetry, Telemetry
from exporters.prometheus import PrometheusConfig, PrometheusExporter
from exporters.prometheus_series import metric_name, prom_labels
from tests.test_contract import free_port


def make(**cfg: object) -> tuple[PrometheusExporter, Telemetry, PrometheusConfig]:
    config = PrometheusConfig(**{"endpoint": f"127.0.0.1:{free_port()}", **cfg})  # type: ignore[arg-type]
    tel = Telemetry()
    settings = Settings(
        id=ComponentId("prometheus"),
        kind=ComponentKind.EXPORTER,
        telemetry=ComponentTelemetry(tel, "exporter", "prometheus"),
        logger=logging.getLogger("test.prom"),
    )
    return PrometheusExporter(settings, config), tel, config


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def now() -> int:
    return time.time_ns()


async def test_scrape_renders_statsd_semantics() -> None:
    exp, tel, cfg = make(histogram_buckets=[0.1, 1.0])
    await exp.start()
    try:
        h = exphist.from_values(np.array([0.05, 0.5, 5.0]))
        batch = MetricBatch(
            (
                Point("api.hits", Kind.SUM, (("env", "dev"),), now(), value=2),
                Point("api.hits", Kind.SUM, (("env", "dev"),), now(), value=3),
                Point("queue-depth", Kind.GAUGE, (), now(), value=7),
                Point("users", Kind.GAUGE, (), now(), value=3, unit="1"),
                Point("api.lat", Kind.HISTOGRAM, (("path", 'a"b\\c\nd'),), now(), histogram=h, unit="s"),
            )
        )
        await exp.consume(batch)
        await exp.consume(MetricBatch((Point("api.hits", Kind.SUM, (("env", "dev"),), now(), value=1),)))
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://{cfg.endpoint}/metrics").read().decode()
        )
        got = samples(body)
        assert got[("api_hits_total", frozenset({("env", "dev")}))] == 6
        assert got[("queue_depth", frozenset())] == 7
        assert got[("users", frozenset())] == 3
        lat = frozenset({("path", 'a"b\\c\nd')})
        assert got[("api_lat_seconds_bucket", lat | {("le", "0.1")})] == 1
        assert got[("api_lat_seconds_bucket", lat | {("le", "1")})] == 2
        assert got[("api_lat_seconds_bucket", lat | {("le", "+Inf")})] == 3
        assert got[("api_lat_seconds_count", lat)] == 3
        assert got[("api_lat_seconds_sum", lat)] == 5.55
        assert "# TYPE api_hits_total counter" in body and "# TYPE api_lat_seconds histogram" in body
        assert tel.value("exporter_sent_points_total") == 6
    finally:
        await exp.shutdown()


async def test_idle_series_expire() -> None:
    exp, _, _ = make(metric_expiration=0.1)
    await exp.start()
    try:
        await exp.consume(MetricBatch((Point("gone", Kind.GAUGE, (), now(), value=1),)))
        assert "gone 1" in await exp.render()
        deadline = time.monotonic() + 10
        while "gone" in await exp.render():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await exp.shutdown()


async def test_type_conflict_and_series_limit_are_counted() -> None:
    exp, tel, _ = make(max_series=2)
    await exp.consume(MetricBatch((Point("x", Kind.GAUGE, (), now(), value=1),)))
    await exp.consume(MetricBatch((Point("x_total", Kind.GAUGE, (), now(), value=1),)))
    await exp.consume(MetricBatch((Point("x", Kind.SUM, (), now(), value=1),)))  # x_total is a gauge already
    await exp.consume(MetricBatch((Point("y", Kind.GAUGE, (), now(), value=1),)))  # a third series
    assert tel.value("exporter_dropped_points_total", reason="type_conflict") == 1
    assert tel.value("exporter_dropped_points_total", reason="series_limit") == 1
    await exp.shutdown()


def test_names_and_labels() -> None:
    assert metric_name("a.b-c/d", Kind.GAUGE, True, "") == "a_b_c_d"
    assert metric_name("9lives", Kind.GAUGE, True, "") == "_9lives"
    assert metric_name("req.time", Kind.HISTOGRAM, True, "s") == "req_time_seconds"
    assert metric_name("reqs_total", Kind.SUM, True, "") == "reqs_total"
    assert metric_name("updown", Kind.SUM, False, "") == "updown"
    assert prom_labels((("a.b", "1"), ("a_b", "2"), ("empty", ""), ("__x", "3"))) == (
        ("a_b", "1;2"),
        ("key___x", "3"),
    )
