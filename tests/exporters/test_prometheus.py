"""The pull endpoint: what a scrape returns, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from agent import exphist
from agent.component import ComponentKind
from agent.model import ExplicitHistogram, Kind, MetricBatch, Point, Resource, Summary, Temporality
from agent.telemetry import Telemetry
from exporters.prometheus import PrometheusConfig, PrometheusExporter
from exporters.prometheus_series import HISTOGRAM, SUMMARY, SeriesStore, metric_name, prom_labels
from tests.conftest import component_settings, free_port, wait_until


def make(**cfg: object) -> tuple[PrometheusExporter, Telemetry, PrometheusConfig]:
    config = PrometheusConfig(**{"endpoint": f"127.0.0.1:{free_port()}", **cfg})  # type: ignore[arg-type]
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.EXPORTER, "prometheus", logger="test.prom")
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

        async def expired() -> bool:
            return "gone" not in await exp.render()

        await wait_until(expired, "the idle series gone from the page", timeout_s=10)
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


# -- explicit-bucket histograms and summaries (OTLP shapes) ---------------------------------------------

SEC = 1_000_000_000


def explicit(
    name: str,
    bounds: list[float],
    counts: list[int],
    total: float,
    t: int,
    *,
    start: int = 0,
    cumulative: bool = False,
    labels: tuple[tuple[str, str], ...] = (),
) -> Point:
    # tuple(list) on purpose: every point gets its own bounds tuple, as points of separate OTLP requests do.
    return Point(
        name,
        Kind.HISTOGRAM,
        labels,
        t,
        start_time_unix_nano=start,
        temporality=Temporality.CUMULATIVE if cumulative else Temporality.DELTA,
        explicit=ExplicitHistogram(tuple(bounds), tuple(counts), total),
    )


def summary(
    name: str,
    count: int,
    total: float,
    quantiles: list[tuple[float, float]],
    t: int,
    *,
    start: int = 0,
    labels: tuple[tuple[str, str], ...] = (),
) -> Point:
    return Point(
        name,
        Kind.SUMMARY,
        labels,
        t,
        start_time_unix_nano=start,
        temporality=Temporality.CUMULATIVE,
        summary=Summary(count, total, tuple(quantiles)),
    )


def test_store_explicit_deltas_accumulate_with_shared_bounds() -> None:
    store = SeriesStore()
    t = 1_700_000_000 * SEC
    a = store.update(explicit("rpc", [0.25, 1.0], [1, 2, 3], 4.5, t, start=t - SEC, labels=(("x", "a"),)))
    b = store.update(explicit("rpc", [0.25, 1.0], [0, 1, 0], 0.5, t, labels=(("x", "b"),)))
    a2 = store.update(explicit("rpc", [0.25, 1.0], [2, 0, 1], 3.0, t + SEC, labels=(("x", "a"),)))
    assert a is not None and b is not None and a2 is a
    assert a.kind == HISTOGRAM
    assert a.bucket_counts is not None and a.bucket_counts.tolist() == [3, 5]  # (1+2, 1+2+2+0), cumulative
    assert (a.count, a.sum) == (9, 7.5)
    assert a.start_ms == (t - SEC) // 1_000_000  # unchanged by later deltas with the same bounds
    # One tuple for every series with these bounds (memory), and not the store's own buckets.
    assert a.bounds == (0.25, 1.0) and a.bounds is b.bounds
    assert store.bounds != a.bounds


def test_store_explicit_bounds_change_restarts_the_series() -> None:
    store = SeriesStore()
    t = 1_700_000_000 * SEC
    s = store.update(explicit("rpc", [1.0, 2.0], [5, 5, 5], 20.0, t, start=t - SEC))
    assert s is not None and s.start_ms == (t - SEC) // 1_000_000
    # Old counts cannot be re-cut at new bounds: the series starts over from this delta.
    store.update(explicit("rpc", [1.0, 5.0, 10.0], [1, 1, 0, 1], 30.0, t + 10 * SEC, start=t + 9 * SEC))
    assert s.bounds == (1.0, 5.0, 10.0)
    assert s.bucket_counts is not None and s.bucket_counts.tolist() == [1, 2, 2]
    assert (s.count, s.sum) == (3, 30.0)
    assert s.start_ms == (t + 9 * SEC) // 1_000_000
    # Same bounds again: accumulation resumes, the start stays.
    store.update(explicit("rpc", [1.0, 5.0, 10.0], [1, 0, 0, 0], 0.5, t + 20 * SEC))
    assert s.bucket_counts.tolist() == [2, 3, 3] and s.count == 4
    assert s.start_ms == (t + 9 * SEC) // 1_000_000


def test_store_explicit_cumulative_replaces_and_a_lower_count_is_a_reset() -> None:
    store = SeriesStore()
    t = 1_700_000_000 * SEC
    s = store.update(explicit("c", [1.0], [4, 6], 12.0, t, cumulative=True))
    assert s is not None and s.start_ms == t // 1_000_000
    shared = s.bounds
    store.update(explicit("c", [1.0], [5, 10], 20.0, t + SEC, cumulative=True))
    assert s.bounds is shared  # equal bounds in a new tuple keep the interned one
    assert s.bucket_counts is not None and s.bucket_counts.tolist() == [5]
    assert (s.count, s.sum) == (15, 20.0)  # replaced, not added
    assert s.start_ms == t // 1_000_000
    store.update(explicit("c", [1.0], [1, 1], 2.0, t + 2 * SEC, cumulative=True))  # 15 → 2: a restart
    assert (s.count, s.sum) == (2, 2.0)
    assert s.start_ms == (t + 2 * SEC) // 1_000_000
    store.update(explicit("c", [1.0], [1, 2], 3.0, t + 3 * SEC, start=t + 2 * SEC - 5, cumulative=True))
    assert s.start_ms == (t + 2 * SEC - 5) // 1_000_000  # a given start time is taken as is


def test_store_nan_sum_is_not_forever() -> None:
    store = SeriesStore()
    t = 1_700_000_000 * SEC
    s = store.update(explicit("n", [1.0], [1, 0], 0.5, t))
    assert s is not None
    store.update(explicit("n", [1.0], [1, 0], math.nan, t + SEC))  # OTLP histogram without a sum
    assert math.isnan(s.sum) and s.count == 2  # the total is unknown now; the count is not
    store.update(explicit("n", [1.0], [0, 1], 2.0, t + 2 * SEC))
    assert s.sum == 2.0  # _sum restarts from the first known delta
    store.update(explicit("n", [1.0], [0, 1], 3.0, t + 3 * SEC))
    assert s.sum == 5.0 and s.count == 4
    assert s.bucket_counts is not None and s.bucket_counts.tolist() == [2]
    # The same rule for exponential histograms (OTLP exponential points may omit the sum too).
    h = exphist.from_values(np.array([0.5]))
    e = store.update(Point("x", Kind.HISTOGRAM, (), t, histogram=h))
    assert e is not None
    store.update(Point("x", Kind.HISTOGRAM, (), t + SEC, histogram=dataclasses.replace(h, sum=math.nan)))
    assert math.isnan(e.sum) and e.count == 2
    store.update(Point("x", Kind.HISTOGRAM, (), t + 2 * SEC, histogram=h))
    assert e.sum == 0.5 and e.count == 3


def test_store_switching_between_exponential_and_explicit_restarts() -> None:
    store = SeriesStore(buckets=[1.0, 10.0])
    t = 1_700_000_000 * SEC
    h = exphist.from_values(np.array([0.5, 5.0]))
    s = store.update(Point("mix", Kind.HISTOGRAM, (), t, histogram=h))
    assert s is not None and s.bounds is None
    store.update(explicit("mix", [2.0], [1, 0], 1.0, t + SEC))
    assert s.bounds == (2.0,) and s.count == 1
    assert s.start_ms == (t + SEC) // 1_000_000
    store.update(Point("mix", Kind.HISTOGRAM, (), t + 2 * SEC, histogram=h))
    assert s.bounds is None and s.count == 2  # back to the store's buckets, restarted
    assert s.bucket_counts is not None and s.bucket_counts.tolist() == [1, 2]


def test_store_summary_state_and_exported_quantile() -> None:
    store = SeriesStore()
    t = 1_700_000_000 * SEC
    labels = (("quantile", "user"), ("svc", "api"))
    s = store.update(summary("lat", 10, 4.0, [(0.5, 0.3), (0.99, 0.9)], t, start=t - SEC, labels=labels))
    assert s is not None and s.kind == SUMMARY and store.kinds["lat"] == SUMMARY
    assert s.labels == (("exported_quantile", "user"), ("svc", "api"))
    assert s.bounds == (0.5, 0.99)
    assert s.bucket_counts is not None and s.bucket_counts.tolist() == [0.3, 0.9]
    assert (s.count, s.sum) == (10, 4.0)
    # Cumulative: the next point replaces everything; a repeated quantile keeps its last value.
    store.update(summary("lat", 12, 5.0, [(0.5, 0.4), (0.5, 0.35), (0.9, 0.8)], t + SEC, labels=labels))
    assert s.bounds == (0.5, 0.9)
    assert s.bucket_counts.tolist() == [0.35, 0.8]
    assert (s.count, s.sum) == (12, 5.0)
    assert s.start_ms == (t - SEC) // 1_000_000
    store.update(summary("lat", 1, 0.2, [(0.5, 0.2), (0.9, 0.2)], t + 2 * SEC, labels=labels))
    assert s.start_ms == (t + 2 * SEC) // 1_000_000  # the count went down: a reset
    assert store.size == 1


def test_store_label_renames_join_collisions_and_types_conflict() -> None:
    store = SeriesStore()
    t = 1_700_000_000 * SEC
    # A label already named exported_le joins the renamed le with ";" (name order), never a duplicate name.
    s = store.update(explicit("h", [1.0], [1, 0], 1.0, t, labels=(("exported_le", "a"), ("le", "b"))))
    assert s is not None and s.labels == (("exported_le", "a;b"),)
    assert store.update(summary("h", 1, 1.0, [(0.5, 1.0)], t)) is None  # h is a histogram family
    assert store.update(explicit("s", [1.0], [1, 0], 1.0, t)) is not None
    assert store.update(summary("s", 1, 1.0, [], t)) is None
    assert store.refused == {"type_conflict": 2}


def test_store_refuses_a_histogram_without_buckets_and_keeps_no_series() -> None:
    store = SeriesStore()
    t = 1_700_000_000 * SEC
    assert store.update(Point("empty", Kind.HISTOGRAM, (), t)) is None
    assert store.update(Point("q", Kind.SUMMARY, (), t, temporality=Temporality.CUMULATIVE)) is None
    bad = Point("bad", Kind.HISTOGRAM, (), t, explicit=ExplicitHistogram((1.0,), (1,), 1.0))
    assert store.update(bad) is None
    assert store.refused == {"missing_histogram": 1, "missing_summary": 1, "invalid_histogram": 1}
    assert store.size == 0 and store.families == {} and store.kinds == {}


async def test_scrape_renders_explicit_histograms_and_summaries() -> None:
    exp, tel, cfg = make(histogram_buckets=[0.1, 1.0])
    await exp.start()
    try:
        t = now()
        points = (
            explicit("http.duration", [0.25, 1.0, 2.5], [1, 2, 0, 1], 4.5, t, labels=(("le", "x"),), start=t),
            explicit("http.duration", [0.25, 1.0, 2.5], [0, 1, 1, 0], 2.0, t, labels=(("le", "x"),)),
            explicit("http.duration", [0.5], [1, 1], 2.0, t, labels=(("route", "/b"),)),
            explicit("no.sum", [1.0], [1, 1], math.nan, t),
            summary(
                "rpc.latency",
                20,
                9.5,
                [(0.5, 0.25), (0.9, 0.75), (0.99, 1.5)],
                t,
                labels=(("quantile", "q"),),
            ),
            Point("exp", Kind.HISTOGRAM, (), t, histogram=exphist.from_values(np.array([0.05, 0.5, 5.0]))),
        )
        await exp.consume(MetricBatch(points))
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://{cfg.endpoint}/metrics").read().decode()
        )
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert families["http_duration"].type == "histogram"
        assert families["rpc_latency"].type == "summary"
        got = samples(body)
        dur = frozenset({("exported_le", "x")})
        # The point's own bounds, not histogram_buckets; counts accumulated over the two deltas.
        les = [dict(lb)["le"] for n, lb in got if n == "http_duration_bucket" and ("exported_le", "x") in lb]
        assert les == ["0.25", "1", "2.5", "+Inf"]
        assert got[("http_duration_bucket", dur | {("le", "0.25")})] == 1
        assert got[("http_duration_bucket", dur | {("le", "1")})] == 4
        assert got[("http_duration_bucket", dur | {("le", "2.5")})] == 5
        assert got[("http_duration_bucket", dur | {("le", "+Inf")})] == 6
        assert got[("http_duration_sum", dur)] == 6.5
        assert got[("http_duration_count", dur)] == 6
        route = frozenset({("route", "/b")})
        assert got[("http_duration_bucket", route | {("le", "0.5")})] == 1
        assert got[("http_duration_bucket", route | {("le", "+Inf")})] == 2
        assert math.isnan(got[("no_sum_sum", frozenset())]) and got[("no_sum_count", frozenset())] == 2
        q = frozenset({("exported_quantile", "q")})
        assert got[("rpc_latency", q | {("quantile", "0.5")})] == 0.25
        assert got[("rpc_latency", q | {("quantile", "0.9")})] == 0.75
        assert got[("rpc_latency", q | {("quantile", "0.99")})] == 1.5
        assert got[("rpc_latency_sum", q)] == 9.5
        assert got[("rpc_latency_count", q)] == 20
        # Exponential histograms still use histogram_buckets.
        assert got[("exp_bucket", frozenset({("le", "0.1")}))] == 1
        assert got[("exp_bucket", frozenset({("le", "1")}))] == 2
        assert tel.value("exporter_sent_points_total") == 6
    finally:
        await exp.shutdown()


def test_resource_service_becomes_job_and_instance() -> None:
    store = SeriesStore()
    checkout = Resource((("service.instance.id", "pod-1"), ("service.name", "checkout"), ("zone", "a")))
    billing = Resource((("service.name", "billing"), ("service.namespace", "shop")))
    own_job = Resource((("service.name", "ignored"),))
    for resource, value in ((checkout, 1.0), (billing, 2.0), (None, 4.0)):
        store.update(Point("hits", Kind.SUM, (("env", "dev"),), 1, value=value, resource=resource))
    store.update(Point("hits", Kind.SUM, (("job", "mine"),), 1, value=8.0, resource=own_job))
    family = store.families["hits_total"]
    assert {labels: s.value for labels, s in family.items()} == {
        (("env", "dev"), ("instance", "pod-1"), ("job", "checkout")): 1.0,
        (("env", "dev"), ("job", "shop/billing")): 2.0,
        (("env", "dev"),): 4.0,
        (("job", "mine"),): 8.0,
    }
