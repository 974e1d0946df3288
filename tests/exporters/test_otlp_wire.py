"""The OTLP hand encoder (exporters/otlp/wire.py, metrics.py) checked by decoding its output with the
opentelemetry-proto classes, and the resource-attribute rules (exporters/otlp/resource.py)."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent import exphist, protowire
from agent.model import Kind, Point, Resource, Scope, Temporality
from exporters.otlp import resource
from exporters.otlp.metrics import EncoderOptions, MetricEncoder

S = 10**9


def encoder(**overrides: Any) -> MetricEncoder:
    options: dict[str, Any] = {
        "temporality": Temporality.DELTA,
        "histograms": "exponential",
        "explicit_buckets": (0.1, 1.0, 10.0),
        "max_request_size": 4 << 20,
        "series_idle_timeout_s": 300.0,
        "max_series": 1000,
        "static_resource": {"service.name": "svc"},
        "scope_name": "headwater",
        "scope_version": "1.2.3",
        "started_ns": 0,
    }
    options.update(overrides)
    return MetricEncoder(EncoderOptions(**options))


def encode(enc: MetricEncoder, points: list[Point], now_s: float = 0.0) -> list[ExportMetricsServiceRequest]:
    enc.begin(now_s)
    bodies = enc.add(points) + enc.finish()
    return [ExportMetricsServiceRequest.FromString(body) for body, _ in bodies]


def data_points(requests: list[ExportMetricsServiceRequest]) -> list[tuple[Any, Any, Any, Any]]:
    out = []
    for req in requests:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for dp in getattr(m, m.WhichOneof("data")).data_points:
                        out.append((rm, sm, m, dp))
    return out


def test_packed_uvarints_match_the_reference_varint() -> None:
    values = np.array([0, 1, 127, 128, 255, 300, 16383, 16384, 2**35 + 7, 2**63 + 5], dtype=np.uint64)
    ref = b"".join(protowire.encode_uvarint(int(v)) for v in values)
    assert protowire.packed_uvarints(values) == ref
    assert protowire.packed_uvarints(np.array([3, 0, 127], dtype=np.uint64)) == bytes([3, 0, 127])


def test_numbers_scope_resource_and_grouping() -> None:
    t = time.time_ns()
    scope = Scope("io.opentelemetry.http", "1.0", (("lib", "x"),))
    points = [
        Point("a", Kind.SUM, (("k", "v"), ("empty", "")), t, 1.5, t - S),
        Point("a", Kind.SUM, (("k", "w"),), t, -2.0, t - S),
        Point("g", Kind.GAUGE, (), t, math.inf),
        Point("g", Kind.GAUGE, (), t, math.nan, scope=scope),
        Point("a", Kind.SUM, (("k", "v"),), t, 7.0, t - S, resource=Resource((("service.name", "app"),))),
    ]
    reqs = encode(encoder(), points)
    (req,) = reqs
    assert len(req.resource_metrics) == 2
    first, second = req.resource_metrics
    assert [(kv.key, kv.value.string_value) for kv in first.resource.attributes] == [("service.name", "svc")]
    assert [(kv.key, kv.value.string_value) for kv in second.resource.attributes] == [("service.name", "app")]
    assert [(sm.scope.name, sm.scope.version) for sm in first.scope_metrics] == [
        ("headwater", "1.2.3"),
        ("io.opentelemetry.http", "1.0"),
    ]
    assert first.scope_metrics[1].scope.attributes[0].key == "lib"
    metrics = first.scope_metrics[0].metrics
    assert [m.name for m in metrics] == ["a", "g"]  # one Metric per name, its points together
    values = [dp.as_double for dp in metrics[0].sum.data_points]
    assert values == [1.5, -2.0]
    kvs = metrics[0].sum.data_points[0].attributes
    assert [(kv.key, kv.value.WhichOneof("value"), kv.value.string_value) for kv in kvs] == [
        ("k", "string_value", "v"),
        ("empty", "string_value", ""),
    ]
    assert not metrics[1].gauge.data_points[0].start_time_unix_nano
    assert math.isinf(metrics[1].gauge.data_points[0].as_double)
    assert math.isnan(first.scope_metrics[1].metrics[0].gauge.data_points[0].as_double)


def test_fractional_and_large_counts_keep_the_count_invariant() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.lognormal(0, 2, 5000), -rng.lognormal(0, 1, 300), np.zeros(7)])
    weights = np.full(values.size, 1 / 0.3)  # sampled at 30 %
    h = exphist.from_values(values, weights)
    t = time.time_ns()
    (p,) = [Point("d", Kind.HISTOGRAM, (), t, 0.0, t - S, histogram=h)]
    ((_, _, m, dp),) = data_points(encode(encoder(), [p]))
    assert dp.count == dp.zero_count + sum(dp.positive.bucket_counts) + sum(dp.negative.bucket_counts)
    assert dp.count == pytest.approx(h.count, rel=1e-3)
    assert dp.zero_count == round(7 / 0.3)
    assert max(dp.positive.bucket_counts) >= 128  # multi-byte varints were needed
    assert dp.negative.offset == h.negative_offset and dp.scale == h.scale
    assert dp.sum == h.sum and dp.min == h.min and dp.max == h.max
    assert m.exponential_histogram.aggregation_temporality == 1


def test_explicit_conversion_of_fractional_weights_sums_to_the_count() -> None:
    values = np.array([0.05, 0.5, 0.5, 5.0, 50.0])
    h = exphist.from_values(values, np.full(5, 2.5))
    t = time.time_ns()
    p = Point("d", Kind.HISTOGRAM, (), t, 0.0, t - S, histogram=h)
    ((*_, dp),) = data_points(encode(encoder(histograms="explicit"), [p]))
    assert list(dp.explicit_bounds) == [0.1, 1.0, 10.0]
    # Weights 2.5 each: running counts 2.5, 7.5, 10, 12.5 are rounded (half to even) to 2, 8, 10, 12,
    # so buckets never go negative and add up to the count.
    assert list(dp.bucket_counts) == [2, 6, 2, 2]
    assert dp.count == sum(dp.bucket_counts) == 12


def test_oversize_point_dropped_and_requests_never_exceed_the_limit() -> None:
    t = time.time_ns()
    rng = random.Random(5)
    points = []
    for i in range(400):
        labels = tuple(sorted((f"k{j}", "v" * rng.randint(0, 40)) for j in range(rng.randint(0, 6))))
        points.append(Point(f"m{i % 13}", Kind.SUM, labels, t, float(i), t - S))
    points.append(Point("huge", Kind.SUM, (("blob", "x" * 10000),), t, 1.0, t - S))
    for limit in (1200, 3000, 7777):
        enc = encoder(max_request_size=limit)
        enc.begin(0.0)
        bodies = enc.add(points) + enc.finish()
        assert all(len(body) <= limit for body, _ in bodies)
        decoded = data_points([ExportMetricsServiceRequest.FromString(b) for b, _ in bodies])
        assert sum(n for _, n in bodies) == len(decoded) == 400
        assert enc.counts["too_large"] == 1
        assert sorted(dp.as_double for *_, dp in decoded) == [float(i) for i in range(400)]


def test_max_series_refuses_only_conversions() -> None:
    t = time.time_ns()
    enc = encoder(max_series=2, temporality=Temporality.CUMULATIVE)
    points = [Point(f"c{i}", Kind.SUM, (), t, 1.0, t - S) for i in range(4)]
    points += [Point("g", Kind.GAUGE, (), t, 1.0)]
    decoded = data_points(encode(enc, points))
    assert [m.name for _, _, m, _ in decoded] == ["c0", "c1", "g"]
    assert enc.counts["series_limit"] == 2


def test_sweep_forgets_idle_series() -> None:
    t = time.time_ns()
    enc = encoder(series_idle_timeout_s=60.0, temporality=Temporality.CUMULATIVE)
    encode(enc, [Point("c", Kind.SUM, (), t, 1.0, t - S)], now_s=1000.0)
    assert enc.series == 1
    again = data_points(encode(enc, [Point("c", Kind.SUM, (), t + S, 1.0, t)], now_s=1030.0))
    assert again[0][3].as_double == 2.0
    encode(enc, [Point("other", Kind.GAUGE, (), t, 1.0)], now_s=1100.0)
    assert enc.series == 1  # "c" idle since 1030 > 60 s: gone


def test_parse_resource_attributes() -> None:
    got = resource.parse_resource_attributes(" a=1 , b = x%2Cy ,bad, =nokey,c=")
    assert got == {"a": "1", "b": "x,y", "c": ""}


def test_static_attribute_precedence() -> None:
    env = {
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=qa,team=env",
        "HEADWATER_DEPLOYMENT_ENVIRONMENT": "ignored-by-otel-attrs",
        "K8S_POD_UID": "uid-1",
        "K8S_CONTAINER_NAME": "app",
        "K8S_DEPLOYMENT_NAME": "web",
        "K8S_CLUSTER_NAME": "c1",
    }
    got = resource.static_attributes({"team": "cfg"}, "", env)
    assert got == {
        "service.name": "unknown_service:headwater",
        "deployment.environment": "qa",
        "deployment.environment.name": "qa",  # mirrored from the one key given
        "team": "cfg",
        "k8s.pod.uid": "uid-1",
        "k8s.container.name": "app",
        "k8s.deployment.name": "web",
        "k8s.cluster.name": "c1",
    }
    assert resource.static_attributes({}, "prod", env)["deployment.environment.name"] == "prod"
    assert resource.static_attributes({}, "", None) == {"service.name": "unknown_service:headwater"}
    only_var = resource.static_attributes({}, "", {"HEADWATER_DEPLOYMENT_ENVIRONMENT": "stage"})
    assert only_var["deployment.environment"] == only_var["deployment.environment.name"] == "stage"
    merged = resource.merge(
        (("deployment.environment.name", "own"),), {"deployment.environment": "cfg", "x": "1"}
    )
    assert dict(merged) == {"deployment.environment.name": "own", "deployment.environment": "own", "x": "1"}
