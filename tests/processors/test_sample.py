"""The sample processor: consistent decisions, rules, upscaling, and unbiased totals (fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from agent import exphist
from agent.component import ComponentKind, validate_config
from agent.model import ExplicitHistogram, Kind, MetricBatch, Point, Resource, SpanBatch, Summary
from agent.telemetry import Telemetry
from processors.sample import (
    SampleConfig,
    SampleProcessor,
    SampleRule,
    factory,
    series_hash,
    series_key,
    trace_id_keeps,
)
from tests.conftest import Sink, component_settings


def make(config: SampleConfig) -> tuple[SampleProcessor, Sink, Telemetry]:
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "sample")
    sink = Sink()
    return SampleProcessor(settings, config, sink), sink, tel


def counter(i: int, value: float = 1.0, name: str = "hits") -> Point:
    return Point(name, Kind.SUM, (("id", str(i)),), 1, value=value)


async def run(config: SampleConfig, points: list[Point]) -> tuple[list[Point], Telemetry]:
    proc, sink, tel = make(config)
    await proc.consume(MetricBatch(tuple(points)))
    return [p for b in sink.batches for p in b.points], tel


def test_series_key_is_unambiguous() -> None:
    # Without length prefixes these two would both be "a" "bc" joined the same way.
    assert series_key("a", (("b", "c"),)) != series_key("ab", (("", "c"),))
    assert series_key("m", (("a", "b"),)) != series_key("m", (), (("a", "b"),))
    assert series_hash(series_key("m", ()), 0) != series_hash(series_key("m", ()), 1)


async def test_rate_one_passes_the_batch_through_unchanged() -> None:
    proc, sink, tel = make(SampleConfig())
    batch = MetricBatch((counter(1),), context={"tenant": "t"})
    await proc.consume(batch)
    assert sink.batches == [batch]
    assert tel.value("processor_outgoing_points_total") == 1


async def test_decisions_are_consistent_across_batches_and_instances() -> None:
    points = [counter(i) for i in range(2000)]
    first, _ = await run(SampleConfig(rate=0.3), points)
    again, _ = await run(SampleConfig(rate=0.3), list(reversed(points)))

    def ids(points: list[Point]) -> set[str]:
        return {dict(p.labels)["id"] for p in points}

    kept = ids(first)
    assert kept == ids(again)
    assert 450 < len(kept) < 750  # 0.3 of 2000 = 600, sd ≈ 20
    # A lower rate keeps a subset; another seed keeps a different set.
    lower, _ = await run(SampleConfig(rate=0.1), points)
    assert ids(lower) < kept
    other_seed, _ = await run(SampleConfig(rate=0.3, seed=7), points)
    assert ids(other_seed) != kept


async def test_rules_first_match_wins_and_rate_label_is_added() -> None:
    cfg = SampleConfig(
        rate=1.0,
        rules=[SampleRule("debug.*", 0.0), SampleRule("http.*", 0.5), SampleRule("http.requests", 0.0)],
    )
    points = [counter(i, name=n) for i in range(200) for n in ("debug.x", "http.requests", "app.y")]
    kept, tel = await run(cfg, points)
    names = [p.name for p in kept]
    assert names.count("debug.x") == 0
    assert 60 < names.count("http.requests") < 140  # the 0.5 rule, not the later 0.0 one
    assert names.count("app.y") == 200
    http = [p for p in kept if p.name == "http.requests"]
    assert all(dict(p.labels)["sample_rate"] == "0.5" and p.value == 2.0 for p in http)
    assert all("sample_rate" not in dict(p.labels) for p in kept if p.name == "app.y")
    assert tel.value("processor_dropped_points_total", reason="sampled") == 600 - len(kept)


async def test_gauges_are_kept_whole_and_histograms_and_summaries_are_scaled() -> None:
    h = exphist.from_values(np.array([0.1, 0.2, 0.4, 0.8]))
    e = ExplicitHistogram(bounds=(1.0, 2.0), counts=(3, 0, 1), sum=4.5, min=0.5, max=3.0)
    points = []
    for i in range(400):
        labels = (("id", str(i)),)
        points += [
            Point("g", Kind.GAUGE, labels, 1, value=7.0),
            Point("h", Kind.HISTOGRAM, labels, 1, histogram=h),
            Point("e", Kind.HISTOGRAM, labels, 1, explicit=e),
            Point("s", Kind.SUMMARY, labels, 1, summary=Summary(3, 1.5, ((0.5, 0.4),))),
        ]
    kept, _ = await run(SampleConfig(rate=0.25), points)
    by_kind = {name: [p for p in kept if p.name == name] for name in "gehs"}
    assert all(len(v) > 50 for v in by_kind.values())
    assert {p.value for p in by_kind["g"]} == {7.0}
    for p in by_kind["h"]:
        assert p.histogram is not None
        assert p.histogram.count == 16 and p.histogram.sum == pytest.approx(6.0)
        assert p.histogram.positive_counts.sum() == 16 and p.histogram.max == h.max
    assert {(p.explicit.counts, p.explicit.sum) for p in by_kind["e"] if p.explicit} == {((12, 0, 4), 18.0)}
    assert {(p.summary.count, p.summary.sum, p.summary.quantiles) for p in by_kind["s"] if p.summary} == {
        (12, 6.0, ((0.5, 0.4),))
    }
    assert all(dict(p.labels)["sample_rate"] == "0.25" for p in kept)


@pytest.mark.parametrize(("rate", "seed"), [(0.1, 0), (0.01, 1), (0.5, 2)])
async def test_upscaled_totals_are_unbiased(rate: float, seed: int) -> None:
    """Each series is kept with probability `rate` and scaled by 1/rate, so the estimate's variance is
    Σ v² (1/rate − 1); the estimate must land within 4 standard deviations of the true total (a fixed
    seed makes the test deterministic; 4 σ would fail by chance about once in 16,000 seeds)."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(mean=2.0, sigma=1.0, size=50_000)
    resource = Resource((("service.name", f"svc{seed}"),))
    points = [
        Point("requests", Kind.SUM, (("id", str(i)),), 1, value=float(v), resource=resource)
        for i, v in enumerate(values)
    ]
    kept, _ = await run(SampleConfig(rate=rate, seed=seed), points)
    true_total = float(values.sum())
    estimate = sum(p.value for p in kept)
    sigma = math.sqrt(float((values**2).sum()) * (1 / rate - 1))
    assert abs(estimate - true_total) < 4 * sigma
    # The kept fraction itself is binomial.
    n = len(values)
    assert abs(len(kept) - n * rate) < 4 * math.sqrt(n * rate * (1 - rate))


async def test_histogram_counts_stay_unbiased() -> None:
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 50, size=5000)
    points = [
        Point("lat", Kind.HISTOGRAM, (("id", str(i)),), 1, histogram=exphist.from_values(rng.random(int(k))))
        for i, k in enumerate(sizes)
    ]
    rate = 0.2
    kept, _ = await run(SampleConfig(rate=rate), points)
    estimate = sum(p.histogram.count for p in kept if p.histogram is not None)
    sigma = math.sqrt(float((sizes.astype(float) ** 2).sum()) * (1 / rate - 1))
    assert abs(estimate - float(sizes.sum())) < 4 * sigma


async def test_the_input_batch_is_not_mutated_and_an_earlier_rate_multiplies() -> None:
    points = tuple(
        Point("c", Kind.SUM, (("id", str(i)), ("sample_rate", "0.5")), 1, value=2.0) for i in range(300)
    )
    proc, sink, _ = make(SampleConfig(rate=0.5))
    batch = MetricBatch(points)
    await proc.consume(batch)
    assert batch.points is points and all(p.value == 2.0 for p in points)
    kept = sink.batches[0].points
    assert kept and all(dict(p.labels)["sample_rate"] == "0.25" and p.value == 4.0 for p in kept)


def trace_id(low: int) -> bytes:
    return (0xDEADBEEF).to_bytes(8, "big") + low.to_bytes(8, "big")


def test_trace_id_ratio_rule() -> None:
    bound = int(0.25 * 2**64)
    assert trace_id_keeps(trace_id(bound - 1), bound)
    assert not trace_id_keeps(trace_id(bound), bound)


async def test_spans_of_a_trace_are_kept_together_with_the_rate_attribute() -> None:
    rng = np.random.default_rng(4)
    ids = [rng.bytes(16) for _ in range(1000)]
    rs = ResourceSpans()
    rs.resource.attributes.add(key="service.name").value.string_value = "svc"
    ss = rs.scope_spans.add()
    ss.scope.name = "lib"
    for tid in ids:
        for j in range(3):  # three spans per trace
            ss.spans.add(name=f"op{j}", trace_id=tid, span_id=rng.bytes(8))
    before = rs.SerializeToString()
    proc, sink, tel = make(SampleConfig(rate=1.0, trace_rate=0.2))
    await proc.consume(SpanBatch((rs,), span_count=3000))
    assert rs.SerializeToString() == before  # the input message is untouched
    (out,) = sink.batches
    spans = [s for r in out.resource_spans for sc in r.scope_spans for s in sc.spans]
    assert len(spans) == out.span_count
    per_trace: dict[bytes, int] = {}
    for s in spans:
        per_trace[s.trace_id] = per_trace.get(s.trace_id, 0) + 1
        assert [(a.key, a.value.double_value) for a in s.attributes] == [("sample_rate", 0.2)]
    assert set(per_trace.values()) == {3}
    expected = {t for t in ids if int.from_bytes(t[8:], "big") < int(0.2 * 2**64)}
    assert set(per_trace) == expected
    assert 120 < len(expected) < 280
    assert out.resource_spans[0].scope_spans[0].scope.name == "lib"
    assert tel.value("processor_dropped_points_total", reason="sampled") == 3000 - len(spans)


def test_config_validation() -> None:
    assert validate_config(SampleConfig()) == []
    bad = SampleConfig(rate=1.5, rules=[SampleRule("", -0.1)], trace_rate=float("nan"))
    assert {p for p, _ in validate_config(bad)} == {"rate", "rules::0::rate", "rules::0::match", "trace_rate"}
    assert factory.type == "sample"


async def test_lifecycle_with_the_default_config() -> None:
    proc, sink, _ = make(SampleConfig())
    await proc.shutdown()
    await proc.start()
    await proc.consume(MetricBatch((counter(1),)))
    await proc.shutdown()
    await proc.shutdown()
    assert len(sink.batches) == 1


async def test_a_span_sampled_again_carries_one_rate_attribute_with_the_product() -> None:
    rs = ResourceSpans()
    ss = rs.scope_spans.add()
    span = ss.spans.add(name="op", trace_id=trace_id(0), span_id=b"\x01" * 8)
    span.attributes.add(key="sample_rate").value.double_value = 0.5  # an earlier sampler's
    span.attributes.add(key="http.method").value.string_value = "GET"
    before = rs.SerializeToString()
    proc, sink, _ = make(SampleConfig(trace_rate=0.5, seed=1))
    await proc.consume(SpanBatch((rs,), span_count=1))
    assert rs.SerializeToString() == before
    (out,) = sink.batches
    (kept,) = [s for r in out.resource_spans for sc in r.scope_spans for s in sc.spans]
    attrs = [(a.key, a.value.WhichOneof("value")) for a in kept.attributes]
    assert sorted(attrs) == [("http.method", "string_value"), ("sample_rate", "double_value")]
    assert next(a.value.double_value for a in kept.attributes if a.key == "sample_rate") == 0.25
