"""The anomaly processor: z-scores against an EWMA baseline, on seeded data and simulated time."""

from __future__ import annotations

import numpy as np
import pytest

from agent import exphist
from agent.component import Backpressure, ComponentKind
from agent.model import ExplicitHistogram, Kind, MetricBatch, Point, Resource, Temporality
from agent.telemetry import Telemetry
from processors.anomaly import AnomalyConfig, AnomalyProcessor, factory
from tests.conftest import Sink, component_settings

T0_NS = 1_700_000_000 * 10**9
STEP_NS = 10 * 10**9


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make(config: AnomalyConfig | None = None) -> tuple[AnomalyProcessor, Sink, Telemetry, Clock]:
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "anomaly")
    sink, clock = Sink(), Clock()
    return AnomalyProcessor(settings, config or AnomalyConfig(), sink, clock=clock), sink, tel, clock


def gauge(value: float, i: int, name: str = "x", **kw: object) -> Point:
    return Point(name, Kind.GAUGE, (("host", "a"),), T0_NS + i * STEP_NS, value=value, **kw)  # type: ignore[arg-type]


async def run_values(values: list[float], config: AnomalyConfig | None = None) -> list[float]:
    proc, sink, _, _ = make(config)
    for i, v in enumerate(values):
        await proc.consume(MetricBatch((gauge(v, i),)))
    return sink.values("x_anomaly_score")


def test_config_validation() -> None:
    assert AnomalyConfig().validate() == []
    bad = AnomalyConfig(alpha=0.0, min_samples=1, suffix="", kinds=[], max_series=0, min_stddev=0.0)
    paths = {path for path, _ in bad.validate()}
    assert paths == {"alpha", "min_samples", "suffix", "kinds", "max_series", "min_stddev"}


async def test_stable_series_scores_near_zero_and_a_spike_scores_high() -> None:
    rng = np.random.default_rng(42)
    values = list(100.0 + rng.normal(0.0, 2.0, 300))
    values.append(100.0 + 10 * 2.0)  # a 10-sigma spike
    scores = await run_values(values)
    assert len(scores) == len(values) - 10  # none before min_samples
    steady = np.array(scores[50:-1])  # after the baseline settled
    assert abs(steady.mean()) < 0.3
    assert 0.7 < steady.std() < 1.3  # a z-score of normal noise has sd about 1
    assert np.mean(np.abs(steady) > 4) < 0.01
    assert scores[-1] > 8


async def test_scores_are_deterministic() -> None:
    rng = np.random.default_rng(7)
    values = list(rng.lognormal(0.0, 0.3, 100))
    assert await run_values(values) == await run_values(values)


async def test_a_flat_series_is_floored_not_infinite() -> None:
    scores = await run_values([50.0] * 20 + [50.5])
    assert scores[:-1] == [0.0] * 10
    # sd is floored at 0.1% of the mean (0.05), so a 1% step scores 10
    assert scores[-1] == pytest.approx(10.0)


async def test_fixed_alpha_and_min_samples() -> None:
    scores = await run_values([1.0, 2.0, 1.0, 2.0, 1.0, 5.0], AnomalyConfig(alpha=0.5, min_samples=3))
    assert len(scores) == 3
    assert scores[-1] > scores[0]


async def test_counters_are_scored_as_rates() -> None:
    proc, sink, tel, _ = make(AnomalyConfig(min_samples=5))
    total = 0.0
    rng = np.random.default_rng(1)
    for i in range(40):
        total += 1000 + rng.normal(0, 20) if i < 39 else 5000  # a burst in the last interval
        p = Point("x", Kind.SUM, (), T0_NS + i * STEP_NS, value=total, temporality=Temporality.CUMULATIVE)
        await proc.consume(MetricBatch((p,)))
    scores = sink.values("x_anomaly_score")
    assert len(scores) == 40 - 1 - 5  # the first cumulative value is only the base
    assert max(abs(s) for s in scores[:-1]) < 5 and scores[-1] > 50
    # A reset is counted and not scored.
    reset = Point("x", Kind.SUM, (), T0_NS + 40 * STEP_NS, value=3.0, temporality=Temporality.CUMULATIVE)
    await proc.consume(MetricBatch((reset,)))
    assert tel.value("anomaly_ignored_points_total", reason="counter_reset") == 1
    # DELTA counters: value over their own interval.
    proc, sink, _, _ = make(AnomalyConfig(min_samples=3))
    for i in range(6):
        t = T0_NS + i * STEP_NS
        v = 100.0 if i < 5 else 400.0
        await proc.consume(
            MetricBatch((Point("x", Kind.SUM, (), t, value=v, start_time_unix_nano=t - STEP_NS),))
        )
    assert sink.values("x_anomaly_score")[:2] == [0.0, 0.0] and sink.values("x_anomaly_score")[-1] > 100


@pytest.mark.parametrize("statistic", ["mean", "p99", "max"])
async def test_histograms_are_scored_by_a_statistic(statistic: str) -> None:
    rng = np.random.default_rng(3)
    proc, sink, _, _ = make(AnomalyConfig(histogram_statistic=statistic))  # type: ignore[arg-type]
    for i in range(60):
        values = rng.lognormal(-3.0, 0.4, 500) * (4.0 if i == 59 else 1.0)  # the last interval is 4x slower
        p = Point("x", Kind.HISTOGRAM, (), T0_NS + i * STEP_NS, histogram=exphist.from_values(values))
        await proc.consume(MetricBatch((p,)))
    scores = sink.values("x_anomaly_score")
    assert len(scores) == 50
    assert max(abs(s) for s in scores[20:-1]) < 6
    assert scores[-1] > 10


async def test_explicit_histograms_mean() -> None:
    proc, sink, _, _ = make(AnomalyConfig(min_samples=3))
    for i, total in enumerate([10.0, 11.0, 9.0, 10.0, 30.0]):
        e = ExplicitHistogram((1.0, 5.0), (2, 6, 2), total)
        await proc.consume(MetricBatch((Point("x", Kind.HISTOGRAM, (), T0_NS + i * STEP_NS, explicit=e),)))
    assert sink.values("x_anomaly_score")[-1] > 10


async def test_originals_pass_unchanged_and_scores_follow() -> None:
    proc, sink, tel, _ = make(AnomalyConfig(min_samples=2, include=["x*"]))
    resource = Resource((("service.name", "api"),))
    other = Point("other", Kind.GAUGE, (), T0_NS, value=1.0)
    summary = Point("x.s", Kind.SUMMARY, (), T0_NS)
    batches = [
        MetricBatch((gauge(1.0 + i, i, resource=resource), other, summary), {"k": "v"}) for i in range(3)
    ]
    for b in batches:
        await proc.consume(b)
    assert sink.batches[0] is batches[0]  # nothing to add yet: the same batch
    last = sink.batches[-1]
    assert last.points[:3] == batches[-1].points and last.context == {"k": "v"}
    (score,) = last.points[3:]
    assert (score.name, score.labels, score.resource, score.unit) == (
        "x_anomaly_score",
        (("host", "a"),),
        resource,
        "1",
    )
    assert tel.value("processor_outgoing_points_total") == 3 + 3 + 4
    # Scores are never scored again, even when the include globs match them.
    await proc.consume(MetricBatch((score,)))
    assert tel.value("anomaly_series") == 1


async def test_expiry_and_max_series() -> None:
    proc, sink, tel, clock = make(AnomalyConfig(max_series=2, series_idle_timeout=60.0))
    batch = MetricBatch(tuple(gauge(1.0, 0, name=f"m{i}") for i in range(3)))
    await proc.consume(batch)
    assert sink.batches[0] is batch
    assert tel.value("anomaly_overflow_points_total") == 1 and tel.value("anomaly_series") == 2
    clock.now += 120.0
    await proc.consume(MetricBatch((gauge(1.0, 1, name="m2"),)))
    assert tel.value("anomaly_expired_series_total") == 2 and tel.value("anomaly_series") == 1


async def test_backpressure_propagates_and_shutdown_is_idempotent() -> None:
    proc, sink, _, _ = make()
    await proc.shutdown()
    await proc.start()
    sink.refuse = True
    with pytest.raises(Backpressure):
        await proc.consume(MetricBatch((gauge(1.0, 0),)))
    await proc.shutdown()
    await proc.shutdown()
    assert factory.type == "anomaly" and factory.kind is ComponentKind.PROCESSOR


async def test_a_refused_batch_does_not_enter_the_baseline_twice() -> None:
    config = AnomalyConfig(min_samples=2)
    values = [1.0, 3.0, 2.0, 5.0, 4.0]
    reference = await run_values(values, config)
    proc, sink, _, _ = make(config)
    for i, v in enumerate(values):
        batch = MetricBatch((gauge(v, i),))
        if i == 2:
            sink.refuse = True
            with pytest.raises(Backpressure):
                await proc.consume(batch)  # refused: the receiver offers the same batch again
            sink.refuse = False
        await proc.consume(batch)
    assert sink.values("x_anomaly_score") == reference
