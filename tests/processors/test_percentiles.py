"""The percentiles processor against exact numpy percentiles, on simulated time (an injected clock).

Data is fed as StatsD-like DELTA exponential histograms, one per 10 s slice, arriving mid-slice; the
processor is ticked at each slice boundary. Expected values are numpy percentiles with
``method="inverted_cdf"`` (the rank rule exphist.quantile estimates) over exactly the slices the window
covers by the documented edge rule: a window of n slices of length s read p seconds into the filling
slice is the filling slice plus the last n completed ones if p <= s/2, else the last n - 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from agent import exphist
from agent.component import Backpressure, ComponentKind
from agent.distributions import explicit_to_exponential
from agent.model import ExplicitHistogram, Kind, MetricBatch, Point, Resource, Temporality
from agent.telemetry import Telemetry
from processors.percentiles import (
    QUANTILE_SUFFIX,
    PercentilesConfig,
    PercentilesProcessor,
    factory,
    quantile_suffix,
)
from processors.percentiles.store import plan_tiers
from tests.conftest import Sink, component_settings, wait_until

T0 = 1_700_000_000.0  # a multiple of 300 s and of 10 s, so every tier starts on a boundary
QS = [0.5, 0.9, 0.95, 0.99]
WIDE = 2048  # buckets enough for scale >= 6 over these samples' ranges (about 13 octaves)


class GaugeSink(Sink):
    def gauges(self) -> dict[tuple[str, str, str], float]:
        """(name, quantile, window) -> value of the gauges sent since the last clear."""
        out = {}
        for p in self.points():
            if p.kind is Kind.GAUGE:
                labels = dict(p.labels)
                name = p.name.removesuffix(QUANTILE_SUFFIX)  # keyed by the distribution's name
                out[(name, labels.get("quantile", ""), labels.get("window", ""))] = p.value
        return out


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    config: PercentilesConfig | None = None, clock: Callable[[], float] | None = None, run_timer: bool = False
) -> tuple[PercentilesProcessor, GaugeSink, Telemetry, Clock]:
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "percentiles")
    sink = GaugeSink()
    c = Clock()
    proc = PercentilesProcessor(
        settings, config or PercentilesConfig(), sink, clock=clock or c, run_timer=run_timer
    )
    return proc, sink, tel, c


def hist_point(name: str, values: np.ndarray, labels: tuple[tuple[str, str], ...] = (), **kw: Any) -> Point:
    h = exphist.from_values(values, max_buckets=WIDE)
    return Point(name, Kind.HISTOGRAM, labels, 0, histogram=h, unit="s", **kw)


async def feed(proc: PercentilesProcessor, clock: Clock, slices: list[np.ndarray], name: str = "lat") -> None:
    """One DELTA histogram per 10 s slice, arriving mid-slice; tick at each following boundary."""
    for values in slices:
        start = clock.now
        clock.now = start + 5.0
        await proc.consume(MetricBatch((hist_point(name, values),)))
        clock.now = start + 10.0
        await proc.tick()


def covered(slices: list[np.ndarray], window_s: float, slice_s: float, p: float) -> np.ndarray:
    """The data a window holds by the edge rule, when read p seconds into the filling slice of
    length slice_s; the fed slices are 10 s each and the last one is the newest."""
    span = window_s + p if p <= slice_s / 2 else window_s - slice_s + p
    return np.concatenate(slices[len(slices) - round(span / 10.0) :])


def samples(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if kind == "lognormal":  # skewed, like request latencies
        return rng.lognormal(mean=-3.0, sigma=1.0, size=n)
    if kind == "bimodal":  # a cache hit / miss mix
        hit = rng.normal(0.002, 0.0003, size=n)
        miss = rng.normal(0.120, 0.015, size=n)
        return np.abs(np.where(rng.random(n) < 0.7, hit, miss))
    if kind == "pareto":  # heavy tail
        return (rng.pareto(1.5, size=n) + 1.0) * 0.001
    raise AssertionError(kind)


def test_default_tiers() -> None:
    slices, tiers = plan_tiers(10.0, [60.0, 300.0, 3600.0], 12)
    assert slices == [10.0, 30.0, 300.0]
    assert tiers == [0, 1, 2]


def test_config_validation() -> None:
    assert PercentilesConfig().validate() == []
    bad = PercentilesConfig(
        windows=[], quantiles=[1.5], emit_interval=15.0, max_buckets=2, max_series=0, include=[""]
    )
    paths = {path for path, _ in bad.validate()}
    assert {"windows", "quantiles::0", "emit_interval", "max_buckets", "max_series", "include::0"} <= paths
    assert ("windows::0", "must be a positive multiple of slice_interval (10s)") in PercentilesConfig(
        windows=[65.0]
    ).validate()


@pytest.mark.parametrize("kind", ["lognormal", "bimodal", "pareto"])
async def test_quantiles_match_numpy_within_one_percent(kind: str) -> None:
    rng = np.random.default_rng(20240605)
    proc, sink, tel, clock = make(PercentilesConfig(max_buckets=WIDE))
    slices = [samples(kind, rng, int(rng.integers(200, 2000))) for _ in range(40)]
    await feed(proc, clock, slices[:37])
    # Read at three phases of the 30 s tier (p = 10, 20, 0 s) and of the 5 min tier.
    for extra in range(3):
        sink.batches.clear()
        await feed(proc, clock, [slices[37 + extra]])
        fed = slices[: 38 + extra]
        gauges = sink.gauges()
        assert tel.value("percentiles_worst_error_ratio") <= exphist.relative_error(6)
        for window, text, slice_s in ((60.0, "1m", 10.0), (300.0, "5m", 30.0), (3600.0, "1h", 300.0)):
            p = clock.now % slice_s
            data = covered(fed, window, slice_s, p) if window < len(fed) * 10 else np.concatenate(fed)
            exact = np.percentile(data, [q * 100 for q in QS], method="inverted_cdf")
            for q, want in zip(QS, exact, strict=True):
                got = gauges[("lat", f"{q:g}", text)]
                assert abs(got - want) / want <= exphist.relative_error(6) + 1e-12, (kind, text, q, p)
                assert abs(got - want) / want <= 0.01


async def test_window_edges_follow_the_documented_rule() -> None:
    # Slice k holds the single value k + 1: the window's exact min (q = 0) names its oldest slice.
    proc, sink, _, clock = make(PercentilesConfig(quantiles=[0.0, 1.0], max_buckets=WIDE))
    slices = [np.array([float(k + 1)]) for k in range(40)]
    for k in range(40):
        sink.batches.clear()
        await feed(proc, clock, [slices[k]])
        g = sink.gauges()
        newest = float(k + 1)
        assert g[("lat", "1", "1m")] == newest
        assert g[("lat", "0", "1m")] == max(1.0, newest - 5)  # exactly the last 6 slices
        p = clock.now % 30.0
        span = 300.0 + p if p <= 15.0 else 270.0 + p
        assert g[("lat", "0", "5m")] == max(1.0, newest - round(span / 10) + 1)


async def test_old_data_rolls_out() -> None:
    proc, sink, tel, clock = make(PercentilesConfig(max_buckets=WIDE))
    await feed(proc, clock, [np.full(100, 1.0)] * 6 + [np.full(100, 100.0)] * 6)
    g = sink.gauges()
    assert g[("lat", "0.5", "1m")] == pytest.approx(100.0, rel=0.006)  # the ones are out of the 1m
    assert g[("lat", "0.5", "5m")] == pytest.approx(1.0, rel=0.006)  # both halves: the lower median
    # No new data: after 1m the 1m window is empty and sends nothing; after 5m+ the 5m one neither.
    for _ in range(6):
        sink.batches.clear()
        clock.now += 10.0
        await proc.tick()
    assert ("lat", "0.5", "1m") not in sink.gauges()
    assert ("lat", "0.5", "5m") in sink.gauges()
    for _ in range(30):
        sink.batches.clear()
        clock.now += 10.0
        await proc.tick()
    assert {w for _, _, w in sink.gauges()} == {"1h"}
    assert tel.value("percentiles_series") == 1


async def test_negative_and_zero_values() -> None:
    rng = np.random.default_rng(7)
    qs = [0.05, 0.25, 0.5, 0.9, 0.99]
    proc, sink, _, clock = make(PercentilesConfig(max_buckets=WIDE, windows=[60.0], quantiles=qs))
    slices = [np.concatenate([rng.normal(0.0, 5.0, 500), np.zeros(20)]) for _ in range(6)]
    await feed(proc, clock, slices)
    data = np.concatenate(slices)
    for q in qs:
        want = float(np.percentile(data, q * 100, method="inverted_cdf"))
        got = sink.gauges()[("lat", f"{q:g}", "1m")]
        assert abs(got - want) <= abs(want) * exphist.relative_error(6) + 1e-12, q
    assert float(np.percentile(data, 5, method="inverted_cdf")) < 0  # the negative side was exercised


async def test_defaults_hold_scale_6_for_wide_latency_data() -> None:
    # Lognormal(sigma=1) over 6,000 values spans ~12 octaves: the default 2048 buckets hold scale 6.
    rng = np.random.default_rng(11)
    proc, sink, tel, clock = make()
    slices = [rng.lognormal(-3.0, 1.0, 1000) for _ in range(6)]
    await feed(proc, clock, slices)
    assert tel.value("percentiles_worst_error_ratio") == pytest.approx(exphist.relative_error(6))
    assert tel.value("percentiles_coarse_windows_total") == 0
    assert tel.value("percentiles_downscales_total") == 0
    data = np.concatenate(slices)
    for q in QS:
        want = float(np.percentile(data, q * 100, method="inverted_cdf"))
        assert abs(sink.gauges()[("lat", f"{q:g}", "1m")] - want) <= want * exphist.relative_error(6)


async def test_few_buckets_report_a_coarser_bound_honestly() -> None:
    # 160 buckets cannot hold 12 octaves at scale 6 (~2.5 octaves): the scale is lowered and said.
    rng = np.random.default_rng(11)
    proc, sink, tel, clock = make(PercentilesConfig(max_buckets=160))
    slices = [rng.lognormal(-3.0, 1.0, 1000) for _ in range(6)]
    await feed(proc, clock, slices)
    bound = tel.value("percentiles_worst_error_ratio")
    assert bound > 0.01
    assert tel.value("percentiles_coarse_windows_total") == 6 * 3  # every emit, every window
    assert tel.value("percentiles_downscales_total", reason="span") >= 1
    assert tel.value("percentiles_downscales_total", reason="memory") == 0
    data = np.concatenate(slices)
    for q in QS:  # the stated (coarser) bound still holds
        want = float(np.percentile(data, q * 100, method="inverted_cdf"))
        assert abs(sink.gauges()[("lat", f"{q:g}", "1m")] - want) <= want * bound + 1e-12


async def test_memory_stays_within_max_memory_and_the_widest_series_gives_way() -> None:
    # Room for about 40 pages: one narrow series and three wide ones (each wanting ~24 pages at scale 6).
    config = PercentilesConfig(windows=[60.0], max_series=4)
    page = config.page_bytes()
    config = replace(config, max_memory=40 * page)
    assert config.validate() == []
    rng = np.random.default_rng(21)
    proc, sink, tel, clock = make(config)
    narrow = [rng.uniform(0.100, 0.101, 200) for _ in range(6)]
    wide = {f"wide{k}": [rng.lognormal(-3.0, 1.0, 1000) for _ in range(6)] for k in range(3)}
    for k in range(6):
        start = clock.now
        clock.now = start + 5.0
        points = [hist_point("narrow", narrow[k])] + [hist_point(n, v[k]) for n, v in wide.items()]
        await proc.consume(MetricBatch(tuple(points)))
        assert tel.value("percentiles_memory_bytes") <= config.max_memory
        clock.now = start + 10.0
        await proc.tick()
    assert tel.value("percentiles_downscales_total", reason="memory") >= 1
    got = sink.gauges()
    data = np.concatenate(narrow)
    for q in QS:  # the narrow series kept its precision: the wide ones gave way
        want = float(np.percentile(data, q * 100, method="inverted_cdf"))
        assert abs(got[("narrow", f"{q:g}", "1m")] - want) <= want * exphist.relative_error(6)
    bound = tel.value("percentiles_worst_error_ratio")
    assert bound > exphist.relative_error(6)
    for name, slices in wide.items():  # each within the worst bound stated
        data = np.concatenate(slices)
        for q in QS:
            want = float(np.percentile(data, q * 100, method="inverted_cdf"))
            assert abs(got[(name, f"{q:g}", "1m")] - want) <= want * bound + 1e-12, (name, q)
    # An expired series gives its pages back.
    held = tel.value("percentiles_memory_bytes")
    clock.now += config.idle_timeout_s() + 10.0
    await proc.consume(MetricBatch((hist_point("narrow", narrow[0]),)))
    await proc.tick()
    assert tel.value("percentiles_memory_bytes") < held


def test_max_memory_must_hold_two_pages_per_series() -> None:
    config = PercentilesConfig(max_memory=2**20)
    problems = dict(config.validate())
    assert "max_series 10000 needs 2 per series" in problems["max_memory"]


async def test_explicit_histograms_land_in_the_right_bucket() -> None:
    rng = np.random.default_rng(3)
    bounds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # Prometheus' defaults
    proc, sink, _, clock = make(PercentilesConfig(windows=[60.0], max_buckets=WIDE))
    slices = [rng.lognormal(-3.0, 1.2, 3000) for _ in range(6)]
    for values in slices:
        counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds) + 1)
        e = ExplicitHistogram(
            bounds, tuple(int(c) for c in counts), float(values.sum()), values.min(), values.max()
        )
        clock.now += 5.0
        await proc.consume(MetricBatch((Point("lat", Kind.HISTOGRAM, (), 0, explicit=e),)))
        clock.now += 5.0
        await proc.tick()
    data = np.concatenate(slices)
    edges = (float(data.min()),) + bounds + (float(data.max()),)
    for q in QS:
        want = float(np.percentile(data, q * 100, method="inverted_cdf"))
        got = sink.gauges()[("lat", f"{q:g}", "1m")]
        i = int(np.searchsorted(bounds, want, side="left"))  # the source bucket holding the truth
        lo, hi = max(edges[i], data.min()), min(edges[i + 1], data.max())
        slack = exphist.relative_error(6)
        assert lo * (1 - slack) <= got <= hi * (1 + slack), (q, lo, got, hi)


def test_explicit_conversion_keeps_count_sum_min_max() -> None:
    e = ExplicitHistogram((1.0, 2.0, 4.0), (3, 0, 5, 2), 30.0, 0.5, 7.0)
    h = explicit_to_exponential(e, max_buckets=160)
    assert h is not None
    assert (h.count, h.sum, h.min, h.max) == (10.0, 30.0, 0.5, 7.0)
    assert exphist.quantile(h, 0.2) < 1.0 + 1e-9  # rank 2 of 10 is in the first bucket
    assert 2.0 < exphist.quantile(h, 0.6) <= 4.0 * (1 + exphist.relative_error(h.scale))
    assert explicit_to_exponential(ExplicitHistogram((1.0,), (1,)), max_buckets=160) is None  # bad shape


async def test_cumulative_inputs_become_deltas() -> None:
    rng = np.random.default_rng(5)
    proc, sink, tel, clock = make(PercentilesConfig(windows=[60.0], max_buckets=WIDE))
    slices = [rng.lognormal(0.0, 0.5, 800) for _ in range(7)]
    running = exphist.EMPTY
    bounds = (0.5, 1.0, 2.0, 4.0)
    explicit_counts = np.zeros(len(bounds) + 1, dtype=np.int64)
    for values in slices:
        running = exphist.merge(running, exphist.from_values(values, max_buckets=WIDE), max_buckets=WIDE)
        explicit_counts += np.bincount(np.searchsorted(bounds, values), minlength=len(bounds) + 1)
        e = ExplicitHistogram(bounds, tuple(int(c) for c in explicit_counts), 0.0)
        cum = Temporality.CUMULATIVE
        clock.now += 5.0
        await proc.consume(
            MetricBatch(
                (
                    Point("exp", Kind.HISTOGRAM, (), 0, histogram=running, temporality=cum),
                    Point("exp_explicit", Kind.HISTOGRAM, (), 0, explicit=e, temporality=cum),
                )
            )
        )
        clock.now += 5.0
        await proc.tick()
    data = np.concatenate(slices[1:])  # the first cumulative point is only the baseline
    g = sink.gauges()
    for q in QS:
        want = float(np.percentile(data, q * 100, method="inverted_cdf"))
        assert abs(g[("exp", f"{q:g}", "1m")] - want) <= want * exphist.relative_error(6)
        i = int(np.searchsorted(bounds, want))  # the source bucket holding the truth
        lower, upper = ((0.0,) + bounds)[i], (bounds + (math.inf,))[i]
        assert lower * 0.99 <= g[("exp_explicit", f"{q:g}", "1m")] <= upper * 1.01
    # A reset (count going down) is counted and re-baselines instead of producing negative counts.
    clock.now += 5.0
    restarted = exphist.from_values(np.ones(3))
    await proc.consume(
        MetricBatch(
            (Point("exp", Kind.HISTOGRAM, (), 0, histogram=restarted, temporality=Temporality.CUMULATIVE),)
        )
    )
    assert tel.value("percentiles_ignored_points_total", reason="cumulative_reset") == 1


async def test_series_identity_includes_labels_and_resource() -> None:
    proc, sink, tel, clock = make(PercentilesConfig(windows=[60.0], quantiles=[1.0]))
    r1, r2 = Resource((("service.name", "a"),)), Resource((("service.name", "b"),))
    points = (
        hist_point("lat", np.array([1.0]), (("route", "/x"),), resource=r1),
        hist_point("lat", np.array([2.0]), (("route", "/x"),), resource=r2),
        hist_point("lat", np.array([3.0]), (("route", "/y"),), resource=r1),
    )
    clock.now += 5.0
    await proc.consume(MetricBatch(points))
    clock.now += 5.0
    await proc.tick()
    assert tel.value("percentiles_series") == 3
    got = {(dict(p.labels)["route"], p.resource, p.value) for p in sink.points() if p.kind is Kind.GAUGE}
    assert got == {("/x", r1, 1.0), ("/x", r2, 2.0), ("/y", r1, 3.0)}


async def test_idle_series_expire_and_slots_are_reused_clean() -> None:
    proc, sink, tel, clock = make(
        PercentilesConfig(windows=[60.0], quantiles=[1.0], series_idle_timeout=120.0)
    )
    await feed(proc, clock, [np.array([50.0])], name="old")
    for _ in range(13):  # 130 s idle > 120 s
        clock.now += 10.0
        await proc.tick()
    assert tel.value("percentiles_series") == 0
    assert tel.value("percentiles_expired_series_total") == 1
    sink.batches.clear()
    await feed(proc, clock, [np.array([2.0])], name="new")  # reuses the freed slot
    assert sink.gauges() == {("new", "1", "1m"): 2.0}


async def test_a_series_that_returns_after_expiring_starts_afresh() -> None:
    proc, sink, tel, clock = make(
        PercentilesConfig(windows=[60.0], quantiles=[1.0], series_idle_timeout=120.0)
    )
    await feed(proc, clock, [np.array([50.0])], name="back")
    for _ in range(13):  # 130 s idle > 120 s
        clock.now += 10.0
        await proc.tick()
    assert tel.value("percentiles_expired_series_total") == 1
    sink.batches.clear()
    await feed(proc, clock, [np.array([2.0])], name="back")  # the same series key as before it expired
    assert tel.value("percentiles_series") == 1
    assert sink.gauges() == {("back", "1", "1m"): 2.0}
    clock.now += 10.0
    await proc.tick()
    assert tel.value("percentiles_expired_series_total") == 1  # the new series is live, not the old


async def test_max_series_overflow_is_counted_and_passed_on() -> None:
    proc, sink, tel, clock = make(PercentilesConfig(windows=[60.0], max_series=2))
    batch = MetricBatch(tuple(hist_point(f"m{i}", np.array([1.0, 2.0])) for i in range(3)))
    clock.now += 5.0
    await proc.consume(batch)
    assert sink.batches[0] is batch  # everything passed on
    assert tel.value("percentiles_overflow_points_total") == 1
    clock.now += 5.0
    await proc.tick()
    assert {name for name, _, _ in sink.gauges()} == {"m0", "m1"}


async def test_shutdown_flushes_once_and_is_idempotent() -> None:
    proc, sink, tel, clock = make(PercentilesConfig(windows=[60.0]))
    await proc.shutdown()  # before start, with nothing: no output
    assert sink.batches == []
    proc, sink, tel, clock = make(PercentilesConfig(windows=[60.0]))
    await proc.start()
    clock.now += 3.0
    await proc.consume(MetricBatch((hist_point("lat", np.array([1.0, 2.0, 3.0])),)))
    await proc.shutdown()
    await proc.shutdown()
    assert sorted(q for _, q, _ in sink.gauges()) == ["0.5", "0.9", "0.95", "0.99"]
    assert len(sink.batches) == 2  # the passed-on batch and one flush
    assert tel.value("processor_outgoing_points_total") == 1 + 4


async def test_original_points_pass_unchanged_or_are_dropped() -> None:
    proc, sink, tel, _ = make()
    other = Point("hits", Kind.SUM, (), 0, value=1.0)
    summary = Point("s", Kind.SUMMARY, (), 0)
    h = hist_point("lat", np.array([1.0]))
    batch = MetricBatch((other, h, summary), {"auth.tenant": "t1"})
    await proc.consume(batch)
    assert sink.batches == [batch] and sink.batches[0] is batch
    assert tel.value("percentiles_ignored_points_total", reason="summary") == 1
    assert tel.value("processor_incoming_points_total") == 3
    proc, sink, _, _ = make(replace(PercentilesConfig(), drop_original=True, exclude=["skip*"]))
    skipped = hist_point("skipme", np.array([1.0]))
    await proc.consume(MetricBatch((other, h, skipped), {"auth.tenant": "t1"}))
    assert sink.batches[0].points == (other, skipped)
    assert sink.batches[0].context == {"auth.tenant": "t1"}


async def test_backpressure_propagates_and_nothing_is_ingested() -> None:
    proc, sink, _, clock = make(PercentilesConfig(windows=[60.0]))
    sink.refuse = True
    with pytest.raises(Backpressure):
        await proc.consume(MetricBatch((hist_point("lat", np.array([1.0])),)))
    sink.refuse = False
    clock.now += 10.0
    await proc.tick()
    assert sink.gauges() == {}  # the refused batch will be offered again: counting it now would double it


async def test_suffix_naming_and_window_histograms() -> None:
    config = PercentilesConfig(
        windows=[60.0, 300.0], quantiles=[0.5, 0.999], naming="suffix", emit_histogram=True
    )
    proc, sink, _, clock = make(config)
    await feed(proc, clock, [np.array([1.0, 2.0, 3.0])] * 2)
    names = sorted(p.name for p in sink.batches[-1].points)
    assert names == ["lat_1m", "lat_5m", "lat_p50_1m", "lat_p50_5m", "lat_p99_9_1m", "lat_p99_9_5m"]
    hist = next(p for p in sink.batches[-1].points if p.name == "lat_5m")
    assert hist.histogram is not None and hist.histogram.count == 6.0 and hist.histogram.sum == 12.0
    assert hist.temporality is Temporality.CUMULATIVE
    assert quantile_suffix(0.95) == "p95"


async def test_labels_naming_adds_quantile_and_window() -> None:
    proc, sink, _, clock = make(PercentilesConfig(windows=[60.0], quantiles=[0.5]))
    await feed(proc, clock, [np.array([1.0])])
    (p,) = sink.batches[-1].points
    assert (p.name, p.kind, p.unit) == ("lat.quantile", Kind.GAUGE, "s")
    assert p.labels == (("quantile", "0.5"), ("window", "1m"))
    assert p.time_unix_nano == int(clock.now * 1e9)


async def test_timer_emits_on_the_clock() -> None:
    clock = Clock()
    proc, sink, _, _ = make(PercentilesConfig(windows=[60.0]), clock=clock, run_timer=True)
    await proc.start()
    clock.now += 3.0
    await proc.consume(MetricBatch((hist_point("lat", np.array([1.0])),)))
    clock.now += 10.0  # past the emit boundary: the timer wakes at once
    await wait_until(sink.gauges, "the timer's emit")
    assert ("lat", "0.5", "1m") in sink.gauges()
    await proc.shutdown()


def test_factory() -> None:
    assert factory.type == "percentiles" and factory.kind is ComponentKind.PROCESSOR
    assert factory.config_class is PercentilesConfig


def test_fast_gauges_equal_constructed_points() -> None:
    from processors.percentiles import _gauge

    r = Resource((("service.name", "a"),))
    assert _gauge("n", (("a", "b"),), 5, 1.5, "s", r) == Point(
        "n", Kind.GAUGE, (("a", "b"),), 5, value=1.5, unit="s", resource=r
    )


async def test_a_refused_emit_chunk_does_not_silently_lose_the_other_chunks() -> None:
    proc, sink, tel, clock = make(PercentilesConfig(windows=[60.0], quantiles=[0.5]))
    n = 1500  # more series than one emit batch holds (about 1000 gauges)
    clock.now += 5.0
    await proc.consume(
        MetricBatch(tuple(hist_point("lat", np.array([1.0]), (("i", str(i)),)) for i in range(n)))
    )
    sink.batches.clear()
    sink.refuse_times = 1  # the first emit chunk only
    clock.now += 5.0
    with pytest.raises(Backpressure):
        await proc.tick()
    sent = len(sink.points())
    dropped = tel.value("processor_dropped_points_total", reason="backpressure")
    assert sent > 0 and dropped > 0
    assert sent + dropped == n  # every gauge of the emit was either sent or counted as dropped
    assert tel.value("processor_outgoing_points_total") == n + sent


async def test_wall_clock_stepping_back_neither_stalls_emits_nor_keeps_old_data() -> None:
    proc, sink, _, clock = make(PercentilesConfig(windows=[60.0], quantiles=[0.5]))
    await feed(proc, clock, [np.full(1000, 1.0)])
    assert sink.gauges() == {("lat", "0.5", "1m"): pytest.approx(1.0, rel=0.01)}
    clock.now -= 3600.0  # NTP steps the clock back an hour
    sink.batches.clear()
    await feed(proc, clock, [np.array([100.0])] * 8)
    # Emits go on at the new time, and the 1m window holds the last minute's data only.
    assert sink.gauges() == {("lat", "0.5", "1m"): pytest.approx(100.0, rel=0.01)}
