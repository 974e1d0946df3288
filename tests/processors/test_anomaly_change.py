"""The anomaly processor's change-point detector (two-sided CUSUM): a lasting level change is flagged
within a few values with its relative size, plain noise and short spikes are not, and one threshold
rule over the change gauge alerts on "dropped 30 % and stayed there"."""

from __future__ import annotations

import numpy as np
import pytest

from agent.component import Backpressure, ComponentKind
from agent.model import MetricBatch
from agent.telemetry import Telemetry
from processors.anomaly import AnomalyConfig, AnomalyProcessor
from processors.threshold import RuleConfig, ThresholdConfig, ThresholdProcessor
from tests.conftest import Sink, component_settings
from tests.processors.test_anomaly import STEP_NS, T0_NS, gauge, make

CHANGE = AnomalyConfig(change_detection=True)
WARMUP = 30
"""Values the detector's reference learns from before it reports (the module's _CHANGE_WARMUP)."""


async def changes(values: list[float] | np.ndarray, config: AnomalyConfig = CHANGE) -> list[float]:
    """The change gauge's values, fed in batches of 50 points of one series."""
    proc, sink, _, _ = make(config)
    points = [gauge(float(v), i) for i, v in enumerate(values)]
    for start in range(0, len(points), 50):
        await proc.consume(MetricBatch(tuple(points[start : start + 50])))
    return sink.values("x_change")


def flagged(values: list[float]) -> list[tuple[int, float]]:
    """(index of the input value, relative change) of each detection; the gauge starts after warm-up."""
    return [(i + WARMUP, v) for i, v in enumerate(values) if v != 0.0]


@pytest.mark.parametrize(("noise_sd", "max_delay"), [(10.0, 4), (50.0, 4), (100.0, 8), (150.0, 16)])
async def test_a_30_percent_drop_is_detected_within_a_few_values(noise_sd: float, max_delay: int) -> None:
    rng = np.random.default_rng(7)
    values = np.concatenate([1000 + rng.normal(0, noise_sd, 200), 700 + rng.normal(0, noise_sd, 100)])
    out = await changes(values)
    assert len(out) == len(values) - WARMUP  # one gauge value per value once warmed up
    hits = flagged(out)
    assert len(hits) == 1, hits
    index, size = hits[0]
    assert 200 <= index <= 200 + max_delay
    # The size is estimated from the last change_min_points values: the noise over sqrt(3) around -0.3.
    assert abs(size - -0.3) < 3 * noise_sd / 1000 / np.sqrt(3) + 0.02


async def test_a_rise_is_positive_and_the_new_level_is_learnt() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([50 + rng.normal(0, 2, 100), 75 + rng.normal(0, 2, 400)])
    hits = flagged(await changes(values))
    assert len(hits) == 1 and 100 <= hits[0][0] <= 104 and 0.4 < hits[0][1] < 0.6


async def test_stationary_noise_is_never_flagged() -> None:
    rng = np.random.default_rng(11)
    out = await changes(1000 + rng.normal(0, 50, 5000))
    assert len(out) == 5000 - WARMUP and flagged(out) == []


@pytest.mark.parametrize("length", [1, 2])
async def test_a_spike_shorter_than_change_min_points_is_not_a_level_change(length: int) -> None:
    rng = np.random.default_rng(5)
    values = 1000 + rng.normal(0, 50, 400)
    values[200 : 200 + length] = 5000.0
    proc, sink, _, _ = make(CHANGE)
    await proc.consume(MetricBatch(tuple(gauge(float(v), i) for i, v in enumerate(values))))
    assert flagged(sink.values("x_change")) == []
    # The z-score is what flags a spike.
    assert max(sink.values("x_anomaly_score")) > 20


async def test_a_plateau_longer_than_change_min_points_is_a_change() -> None:
    rng = np.random.default_rng(5)
    values = 1000 + rng.normal(0, 50, 400)
    values[200:210] = 3000.0
    hits = flagged(await changes(values))
    # Its third or fourth value flags it (the third when noise had already raised the sum); its end, 10
    # values later, falls in the 30 values the new level is learnt over, when nothing is flagged.
    assert len(hits) == 1 and hits[0][0] in (202, 203) and 1.9 < hits[0][1] < 2.1


async def test_off_by_default_and_its_gauge_is_never_scored() -> None:
    proc, sink, _, _ = make()
    await proc.consume(MetricBatch(tuple(gauge(float(i % 3), i) for i in range(100))))
    assert sink.values("x_change") == []
    proc, sink, _, _ = make(CHANGE)
    await proc.consume(MetricBatch(tuple(gauge(float(i % 3), i, name="y_change") for i in range(100))))
    assert {p.name for p in sink.points()} == {"y_change"}  # not scored nor watched for changes


async def test_a_refused_batch_does_not_enter_the_detector_twice() -> None:
    rng = np.random.default_rng(9)
    values = np.concatenate([100 + rng.normal(0, 5, 60), 60 + rng.normal(0, 5, 20)])
    reference = await changes(values)
    proc, sink, _, _ = make(CHANGE)
    for start in range(0, len(values), 10):
        batch = MetricBatch(
            tuple(gauge(float(values[i]), i) for i in range(start, min(start + 10, len(values))))
        )
        if start == 60:  # the batch holding the change
            sink.refuse = True
            with pytest.raises(Backpressure):
                await proc.consume(batch)
            sink.refuse = False
        await proc.consume(batch)
    assert sink.values("x_change") == reference and len(flagged(reference)) == 1


def test_change_settings_are_validated() -> None:
    bad = AnomalyConfig(
        change_detection=True, change_threshold=0.0, change_drift=-1.0, change_min_points=0, change_suffix=""
    )
    paths = {p for p, _ in bad.validate()}
    assert paths == {"change_threshold", "change_drift", "change_min_points", "change_suffix"}
    same = AnomalyConfig(change_detection=True, change_suffix="_anomaly_score")
    assert [p for p, _ in same.validate()] == ["change_suffix"]


async def test_one_threshold_rule_alerts_on_a_drop_that_stays() -> None:
    """anomaly → threshold: "throughput dropped 30 % (or more) and stayed there" is one rule over the
    change gauge: its minimum over an hour at or below -0.2."""
    tel = Telemetry()
    clock_s = [T0_NS / 1e9]
    alerting = ThresholdProcessor(
        component_settings(tel, ComponentKind.PROCESSOR, "threshold", logger="test.threshold"),
        ThresholdConfig(
            rules=[
                RuleConfig(
                    name="throughput_dropped",
                    metric="*_change",
                    statistic="percentile",
                    quantile=0.0,
                    window=3600.0,
                    op="<=",
                    critical=-0.2,
                )
            ],
            log=False,
        ),
        Sink(),
        clock=lambda: clock_s[0],
    )
    anomaly = AnomalyProcessor(
        component_settings(tel, ComponentKind.PROCESSOR, "anomaly"),
        CHANGE,
        alerting,
        clock=lambda: clock_s[0],
    )
    await alerting.start()
    rng = np.random.default_rng(21)
    values = np.concatenate([1000 + rng.normal(0, 50, 120), 700 + rng.normal(0, 50, 120)])
    fired_at = []
    try:
        for i, v in enumerate(values):
            clock_s[0] = (T0_NS + i * STEP_NS) / 1e9
            await anomaly.consume(MetricBatch((gauge(float(v), i),)))
            if alerting.engine.firing_counts.get(("throughput_dropped", "critical")):
                fired_at.append(i)
    finally:
        await alerting.shutdown()
    # Fires a few values after the drop and stays firing for the rest (20 min < the 1 h window).
    assert fired_at and 120 <= fired_at[0] <= 124
    assert fired_at == list(range(fired_at[0], len(values)))
