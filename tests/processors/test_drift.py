"""The drift processor: its statistics against the same statistics computed exactly on the raw
samples (numpy, scipy), its reference modes on simulated time (an injected clock), and its bounds."""

from __future__ import annotations

import json
import math
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import statsd
from scipy import stats as sst
from scipy.spatial.distance import jensenshannon

from agent import exphist
from agent.component import Backpressure, ComponentKind
from agent.model import Kind, MetricBatch, Point, Temporality
from agent.telemetry import Telemetry
from processors.drift import DRIFT_SUFFIX, TESTS, DriftConfig, DriftProcessor, stats
from processors.drift.baseline_file import FILE_FORMAT
from tests.conftest import AgentGraph, Sink, component_settings, free_port, wait_until
from tests.integration.conftest import PrometheusServer, prom_value, to_remote_write

N_REFERENCE, N_CURRENT = 20_000, 5_000


def _lognormal(rng: np.random.Generator, n: int, mu: float = -3.0, sigma: float = 0.5) -> np.ndarray:
    return rng.lognormal(mu, sigma, n)


def _mixture(rng: np.random.Generator, n: int, slow_share: float) -> np.ndarray:
    fast = rng.lognormal(-5.0, 0.3, n)
    slow = rng.lognormal(-2.0, 0.3, n)
    return np.where(rng.random(n) < slow_share, slow, fast)


CASES = {
    "no_shift": (lambda r: _lognormal(r, N_REFERENCE), lambda r: _lognormal(r, N_CURRENT)),
    "mean_shift": (lambda r: _lognormal(r, N_REFERENCE), lambda r: _lognormal(r, N_CURRENT, mu=-2.8)),
    "scale_shift": (lambda r: _lognormal(r, N_REFERENCE), lambda r: _lognormal(r, N_CURRENT, sigma=0.7)),
    "mixture_change": (lambda r: _mixture(r, N_REFERENCE, 0.1), lambda r: _mixture(r, N_CURRENT, 0.25)),
    "signed_mean_shift": (
        lambda r: r.normal(0.0, 1.0, N_REFERENCE),
        lambda r: r.normal(0.2, 1.0, N_CURRENT),
    ),
}


def exact_binned(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of `values` in bins ``(previous edge, edge]`` (the first reaching to -inf)."""
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=edges.size)[: edges.size]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("max_buckets", [160, 2048])
def test_statistics_match_the_exact_ones_on_raw_samples(case: str, max_buckets: int) -> None:
    rng = np.random.default_rng(sorted(CASES).index(case))
    make_ref, make_cur = CASES[case]
    ref, cur = make_ref(rng), make_cur(rng)
    d = stats.drift(
        exphist.from_values(cur, max_buckets=max_buckets, max_scale=8),
        exphist.from_values(ref, max_buckets=max_buckets, max_scale=8),
        bins=10,
    )
    assert d is not None

    # KS: the bucketed D is a lower bound of the exact one, ks_bound an upper bound.
    exact = sst.ks_2samp(cur, ref, method="asymp")
    assert d.ks - 1e-12 <= exact.statistic <= d.ks_bound + 1e-12
    assert d.ks_bound - d.ks < (0.1 if max_buckets == 160 else 0.01)  # one bucket's share
    # Its p-value is the asymptotic Kolmogorov one, at the effective sample size n·m/(n+m).
    root = math.sqrt(N_CURRENT * N_REFERENCE / (N_CURRENT + N_REFERENCE))
    assert d.ks_pvalue == pytest.approx(sst.kstwobign.sf(root * d.ks), rel=1e-9, abs=1e-300)
    exact_p = sst.kstwobign.sf(root * exact.statistic)
    assert stats.kolmogorov_sf(root * d.ks_bound) - 1e-12 <= exact_p <= d.ks_pvalue + 1e-12

    # PSI, JS and Chi² equal the exact statistics of the raw samples binned at the same edges.
    assert d.bin_edges.size <= 10
    cb, rb = exact_binned(cur, d.bin_edges), exact_binned(ref, d.bin_edges)
    assert cb.sum() == N_CURRENT and rb.sum() == N_REFERENCE
    p = np.maximum(cb / N_CURRENT, stats.PSI_EPSILON)
    q = np.maximum(rb / N_REFERENCE, stats.PSI_EPSILON)
    assert d.psi == pytest.approx(float(np.sum((p - q) * np.log(p / q))), rel=1e-9, abs=1e-12)
    assert d.js == pytest.approx(float(jensenshannon(cb, rb, base=2)), rel=1e-9, abs=1e-9)
    table = np.stack((cb, rb))[:, (cb + rb) > 0]
    chi2, chi2_p, _, _ = sst.chi2_contingency(table, correction=False)
    assert d.chi2 == pytest.approx(chi2, rel=1e-9)
    assert d.chi2_pvalue == pytest.approx(chi2_p, rel=1e-6, abs=1e-300)

    # And they see what happened.
    if case == "no_shift":
        assert d.psi < 0.01 and d.ks_pvalue > 0.01 and d.chi2_pvalue > 0.01
    else:
        assert d.ks_pvalue < 1e-6 and d.chi2_pvalue < 1e-6 and d.psi > 0.02


def test_kolmogorov_and_chi2_survival_functions_match_scipy() -> None:
    x = np.array([0.0, 0.05, 0.3, 0.8, 1.17, 1.18, 1.19, 1.5, 2.5, 4.0])
    np.testing.assert_allclose(stats.kolmogorov_sf(x), sst.kstwobign.sf(x), rtol=1e-12, atol=1e-300)
    for df in [1, 2, 3, 9, 100, 999, 1000]:
        a = df / 2
        x = np.array([0.0, 0.1, 1.0, a, 2 * a, 5 * a + 10, 1e6, math.inf]) * 2
        np.testing.assert_allclose(
            stats.chi2_sf(x, np.full(x.size, df)), sst.chi2.sf(x, df), rtol=1e-9, atol=1e-300
        )


def test_many_pairs_at_once_equal_each_pair_alone() -> None:
    """drift_many lays every pair on one padded grid: each row equals that pair computed alone, with
    different scales, signs, zeros, empty sides and sizes side by side."""
    rng = np.random.default_rng(3)
    samples = [
        rng.lognormal(-3, 0.5, 2000),
        rng.normal(0, 1, 500),
        np.concatenate((np.zeros(30), rng.lognormal(2, 1, 300))),
        rng.lognormal(10, 0.1, 50),
        np.array([]),
        -rng.lognormal(0, 2, 800),
    ]
    hs = [exphist.from_values(v, max_buckets=int(rng.choice([8, 160, 2048])), max_scale=8) for v in samples]
    currents = [hs[i] for i in range(len(hs)) for _ in range(len(hs))]
    references = [hs[j] for _ in range(len(hs)) for j in range(len(hs))]
    many = stats.drift_many(currents, references, bins=7)
    for i, (c, r) in enumerate(zip(currents, references, strict=True)):
        one = stats.drift_many([c], [r], bins=7)
        assert bool(many.valid[i]) == bool(one.valid[0]) == (c.count > 0 and r.count > 0)
        for field in ("psi", "ks", "ks_pvalue", "ks_bound", "js", "chi2", "chi2_pvalue"):
            np.testing.assert_allclose(getattr(many, field)[i], getattr(one, field)[0], rtol=1e-12, atol=0)
        if one.valid[0]:
            assert many.bin_edges[i].tolist() == one.bin_edges[0].tolist()


@pytest.mark.parametrize("seed", range(20))
def test_a_window_merged_in_one_pass_equals_merging_it_pairwise(seed: int) -> None:
    """A window end's merge of many flushes (exphist.merge_all: one bincount over all of them) gives
    exactly what folding them two at a time (side by side) gives: mixed scales, signs, zeros, empty
    inputs, and bucket limits that force a coarser scale."""
    rng = np.random.default_rng(seed)
    hs = []
    for _ in range(int(rng.integers(3, 40))):
        kind = int(rng.integers(0, 4))
        if kind == 0:
            values = rng.lognormal(rng.normal(0, 3), rng.uniform(0.1, 2), int(rng.integers(0, 60)))
        elif kind == 1:
            values = rng.normal(0, rng.uniform(0.1, 100), int(rng.integers(1, 60)))
        elif kind == 2:
            values = np.zeros(int(rng.integers(1, 5)))
        else:
            values = np.array([])
        max_buckets = int(rng.choice([8, 160, 320, 2048]))
        hs.append(exphist.from_values(values, max_buckets=max_buckets, max_scale=int(rng.integers(-2, 10))))
    # Pairwise folding coarsens step by step; with room enough no step does, and the two are equal.
    merged = exphist.merge_all(hs, max_buckets=1 << 16)
    folded = hs[0]
    for h in hs[1:]:
        folded = exphist.merge(folded, h, max_buckets=1 << 16)
    assert merged.scale == folded.scale or not (merged.positive_counts.size or merged.negative_counts.size)
    assert merged.positive_counts.tolist() == folded.positive_counts.tolist()
    assert merged.negative_counts.tolist() == folded.negative_counts.tolist()
    assert (merged.positive_offset, merged.negative_offset) == (
        folded.positive_offset,
        folded.negative_offset,
    )
    assert (merged.count, merged.zero_count, merged.min, merged.max) == (
        folded.count, folded.zero_count, folded.min, folded.max,
    )  # fmt: skip


def test_identical_histograms_show_no_drift() -> None:
    h = exphist.from_values(np.random.default_rng(7).lognormal(0, 1, 1000), max_buckets=320)
    d = stats.drift(h, h)
    assert d is not None
    assert (d.psi, d.ks, d.js, d.chi2) == (0.0, 0.0, 0.0, 0.0)
    assert d.ks_pvalue == 1.0 and d.chi2_pvalue == 1.0


def test_empty_side_gives_no_statistics() -> None:
    h = exphist.from_values(np.array([1.0, 2.0]))
    assert stats.drift(exphist.EMPTY, h) is None and stats.drift(h, exphist.EMPTY) is None


# -- the processor, on simulated time ---------------------------------------------------------------

T0 = 1_699_999_200.0  # a multiple of 3600 s: windows start on a boundary
FLUSH = 10.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(config: DriftConfig, sink: Sink | None = None) -> tuple[DriftProcessor, Sink, Telemetry, Clock]:
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "drift")
    out = sink or Sink()
    clock = Clock()
    return DriftProcessor(settings, config, out, clock=clock, run_timer=False), out, tel, clock


def timer(name: str, values: np.ndarray, labels: tuple[tuple[str, str], ...] = ()) -> Point:
    """A StatsD timer's flush: a DELTA exponential histogram (scale <= 8, as the receiver builds it)."""
    h = exphist.from_values(values, max_buckets=2048, max_scale=8)
    return Point(name, Kind.HISTOGRAM, labels, 0, histogram=h, unit="ms", temporality=Temporality.DELTA)


async def feed_window(
    proc: DriftProcessor, clock: Clock, make_values: Callable[[], np.ndarray], name: str = "lat"
) -> np.ndarray:
    """One window (60 s) of flushes arriving mid-flush, then a tick at its end; the values fed."""
    fed = []
    start = clock.now
    for k in range(6):
        clock.now = start + k * FLUSH + 5.0
        values = make_values()
        fed.append(values)
        await proc.consume(MetricBatch((timer(name, values),)))
    clock.now = start + 60.0
    await proc.tick()
    return np.concatenate(fed)


def drift_gauges(sink: Sink, name: str = "lat") -> dict[str, float]:
    """test -> value of the drift gauges of `name` taken since the sink was last cleared."""
    out = {}
    for p in sink.points():
        if p.kind is Kind.GAUGE and p.name == name + DRIFT_SUFFIX:
            labels = dict(p.labels)
            assert labels["window"] == "1m"
            out[labels["test"]] = p.value
    return out


def check_against_raw(gauges: dict[str, float], current: np.ndarray, reference: np.ndarray) -> None:
    """The emitted KS D and its p-value bracket the exact ones of the raw samples (one bucket's share)."""
    exact = sst.ks_2samp(current, reference, method="asymp").statistic
    assert gauges["ks"] - 1e-12 <= exact <= gauges["ks"] + 0.01
    assert set(gauges) == set(TESTS)


def rng_lognormal(rng: np.random.Generator, mu: float = 3.0, sigma: float = 0.5) -> Callable[[], np.ndarray]:
    return lambda: rng.lognormal(mu, sigma, 300)


async def test_learnt_baseline_then_windows_against_it() -> None:
    proc, sink, tel, clock = make(DriftConfig(window=60.0, baseline=120.0))  # type: ignore[arg-type]
    await proc.start()
    rng = np.random.default_rng(1)
    baseline = np.concatenate([await feed_window(proc, clock, rng_lognormal(rng)) for _ in range(2)])
    assert drift_gauges(sink) == {}  # still learning: nothing to compare with
    assert tel.value("drift_skipped_windows_total", reason="no_reference") == 0

    same = await feed_window(proc, clock, rng_lognormal(rng))
    quiet = drift_gauges(sink)
    check_against_raw(quiet, same, baseline)
    points = [p for p in sink.points() if p.name == "lat" + DRIFT_SUFFIX]
    assert all(p.time_unix_nano == int((T0 + 180.0) * 1e9) and p.unit == "" for p in points)
    sink.batches.clear()

    shifted = await feed_window(proc, clock, rng_lognormal(rng, mu=3.3))
    loud = drift_gauges(sink)
    check_against_raw(loud, shifted, baseline)
    for test in ("psi", "ks", "js", "chi2"):
        assert loud[test] > 5 * quiet[test], test
    assert loud["ks_pvalue"] < 1e-6 < quiet["ks_pvalue"]
    assert loud["chi2_pvalue"] < 1e-6 < quiet["chi2_pvalue"]
    # The raw timers passed on unchanged.
    assert sum(1 for p in sink.points() if p.name == "lat") == 6
    await proc.shutdown()


async def test_a_window_of_many_flushes_is_the_whole_window() -> None:
    """150 flushes a window, each added to the series' row as it comes (the row moving and
    downscaling itself as the span grows): the statistics are those of the whole window against the
    whole baseline."""
    proc, sink, _, clock = make(DriftConfig(window=60.0, baseline=60.0, max_buckets=2048))  # type: ignore[arg-type]
    rng = np.random.default_rng(12)
    windows: list[list[exphist.ExpHistogram]] = []
    for mu in (3.0, 3.2):
        hs = []
        for k in range(150):
            clock.now = clock.now // 60 * 60 + 5.0 + k * 0.3
            point = timer("lat", rng.lognormal(mu, 0.5, 40))
            assert point.histogram is not None
            hs.append(point.histogram)
            await proc.consume(MetricBatch((point,)))
        clock.now = clock.now // 60 * 60 + 60.0
        await proc.tick()
        windows.append(hs)
    whole = [exphist.merge_all(hs, max_buckets=2048) for hs in windows]
    d = stats.drift(whole[1], whole[0])
    assert d is not None
    got = drift_gauges(sink)
    assert got == pytest.approx(
        {
            "psi": d.psi,
            "ks": d.ks,
            "ks_pvalue": d.ks_pvalue,
            "js": d.js,
            "chi2": d.chi2,
            "chi2_pvalue": d.chi2_pvalue,
        },
        rel=1e-9,
    )


async def test_gauges_are_observed_value_by_value() -> None:
    config = DriftConfig(window=60.0, baseline=60.0, gauges=["score"], include=[])  # type: ignore[arg-type]
    proc, sink, _, clock = make(config)
    rng = np.random.default_rng(2)

    async def gauge_window(mu: float) -> np.ndarray:
        values = rng.normal(mu, 1.0, 600)
        for k, chunk in enumerate(np.split(values, 6)):
            clock.now = clock.now // 60 * 60 + k * FLUSH + 5.0
            await proc.consume(
                MetricBatch(tuple(Point("score", Kind.GAUGE, (), 0, value=float(v)) for v in chunk))
            )
        clock.now = clock.now // 60 * 60 + 60.0
        await proc.tick()
        return values

    reference = await gauge_window(0.0)
    current = await gauge_window(0.5)
    gauges = drift_gauges(sink, "score")
    check_against_raw(gauges, current, reference)
    assert gauges["ks_pvalue"] < 1e-6


async def test_many_gauge_values_and_non_finite_ones() -> None:
    """A window of more gauge values than a series holds unfolded (8192) is the whole window; NaN
    and ±inf values are left out and counted."""
    config = DriftConfig(window=60.0, baseline=60.0, gauges=["score"], include=[])  # type: ignore[arg-type]
    proc, sink, tel, clock = make(config)
    rng = np.random.default_rng(13)
    windows = []
    for mu in (0.0, 0.3):
        values = rng.normal(mu, 1.0, 9000)
        sent = np.concatenate((values, [math.nan, math.inf, -math.inf]))
        for k, chunk in enumerate(np.array_split(sent, 6)):
            clock.now = clock.now // 60 * 60 + k * FLUSH + 5.0
            await proc.consume(
                MetricBatch(tuple(Point("score", Kind.GAUGE, (), 0, value=float(v)) for v in chunk))
            )
        clock.now = clock.now // 60 * 60 + 60.0
        await proc.tick()
        windows.append(values)
    assert tel.value("drift_ignored_points_total", reason="non_finite") == 6
    gauges = drift_gauges(sink, "score")
    check_against_raw(gauges, windows[1], windows[0])
    assert gauges["ks_pvalue"] < 1e-6


async def test_baseline_file_is_written_then_used_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    config = DriftConfig(window=60.0, baseline=60.0, baseline_file=str(path))  # type: ignore[arg-type]
    proc, _, _, clock = make(config)
    await proc.start()
    rng = np.random.default_rng(3)
    labels = (("route", "/a"),)
    reference = np.concatenate([rng.lognormal(3.0, 0.5, 2000)])
    clock.now = T0 + 5.0
    await proc.consume(MetricBatch((timer("lat", reference, labels),)))
    assert not path.exists()
    clock.now = T0 + 60.0
    await proc.tick()  # the baseline is complete at the end of the window: written
    doc = json.loads(path.read_text())
    assert doc["format"] == FILE_FORMAT
    [entry] = doc["series"]
    assert entry["name"] == "lat" and entry["labels"] == {"route": "/a"}
    assert entry["histogram"]["count"] == 2000
    await proc.shutdown()

    # A new agent: the series is compared from its first window, against the saved baseline.
    again, sink, _, clock2 = make(config)
    clock2.now = T0 + 3600.0
    await again.start()
    current = rng.lognormal(3.2, 0.5, 1000)
    clock2.now += 5.0
    await again.consume(MetricBatch((timer("lat", current, labels),)))
    clock2.now += 55.0
    await again.tick()
    gauges = drift_gauges(sink)
    check_against_raw(gauges, current, reference)
    assert gauges["ks_pvalue"] < 1e-6
    await again.shutdown()


@pytest.mark.parametrize(
    ("content", "wrong"),
    [
        ("{not json", "cannot read it as JSON"),
        ('{"series": []}', "not a drift baseline file"),
        (
            json.dumps({"format": FILE_FORMAT, "series": [{"name": "x", "histogram": {"scale": 6}}]}),
            "series[0]: histogram field missing",
        ),
        (
            json.dumps(
                {
                    "format": FILE_FORMAT,
                    "series": [
                        {
                            "name": "x",
                            "histogram": {
                                "scale": 6, "count": 5, "min": 1, "max": 2, "sum": 7,
                                "positive": {"offset": 0, "counts": [1, 1]},
                            },
                        }
                    ],
                }
            ),
            "series[0]: count 5 is not the sum of the buckets (2)",
        ),
    ],
)  # fmt: skip
async def test_a_bad_baseline_file_is_refused_at_start(tmp_path: Path, content: str, wrong: str) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(content)
    proc, _, _, _ = make(DriftConfig(baseline_file=str(path)))
    with pytest.raises(ValueError, match=r"baseline_file .*" + re.escape(wrong)):
        await proc.start()


async def test_trailing_reference_is_the_window_offset_earlier_and_bounded() -> None:
    config = DriftConfig(window=60.0, reference="trailing", offset=120.0)  # type: ignore[arg-type]
    proc, sink, tel, clock = make(config)
    rng = np.random.default_rng(4)
    a = await feed_window(proc, clock, rng_lognormal(rng, mu=3.0))
    b = await feed_window(proc, clock, rng_lognormal(rng, mu=3.5))
    assert drift_gauges(sink) == {}
    assert tel.value("drift_skipped_windows_total", reason="no_reference") == 2
    a2 = await feed_window(proc, clock, rng_lognormal(rng, mu=3.0))  # against a: the same
    same = drift_gauges(sink)
    check_against_raw(same, a2, a)
    sink.batches.clear()
    a3 = await feed_window(proc, clock, rng_lognormal(rng, mu=3.0))  # against b: shifted
    moved = drift_gauges(sink)
    check_against_raw(moved, a3, b)
    assert moved["ks_pvalue"] < 1e-6 < same["ks_pvalue"]
    for _ in range(5):
        await feed_window(proc, clock, rng_lognormal(rng))
    [series] = proc._series.values()
    assert len(series.past) <= 2  # offset / window past windows, no more


async def test_gauges_keep_the_series_labels_sorted_with_test_and_window_in_place() -> None:
    proc, sink, _, clock = make(DriftConfig(window=60.0, baseline=60.0))  # type: ignore[arg-type]
    rng = np.random.default_rng(14)
    labels = (("a", "1"), ("test", "theirs"), ("u", "2"), ("window", "theirs"), ("zone", "3"))
    for _ in range(2):
        clock.now = clock.now // 60 * 60 + 5.0
        await proc.consume(MetricBatch((timer("lat", rng.lognormal(3, 0.5, 300), labels),)))
        clock.now = clock.now // 60 * 60 + 60.0
        await proc.tick()
    got = [p.labels for p in sink.points() if p.name == "lat" + DRIFT_SUFFIX]
    assert got == [
        (("a", "1"), ("test", test), ("u", "2"), ("window", "1m"), ("zone", "3")) for test in TESTS
    ]


async def test_max_series_bounds_state_and_counts_overflow() -> None:
    proc, sink, tel, clock = make(DriftConfig(window=60.0, baseline=60.0, max_series=2))  # type: ignore[arg-type]
    rng = np.random.default_rng(5)
    for _ in range(2):
        clock.now += 5.0
        batch = tuple(timer("lat", rng.lognormal(3, 0.5, 200), (("pod", str(i)),)) for i in range(3))
        await proc.consume(MetricBatch(batch))
        clock.now = clock.now // 60 * 60 + 60.0
        await proc.tick()
    assert tel.value("drift_series") == 2
    assert tel.value("drift_overflow_points_total") == 2
    assert sum(1 for p in sink.points() if p.name == "lat") == 6  # every point passed on
    pods = {dict(p.labels)["pod"] for p in sink.points() if p.name == "lat" + DRIFT_SUFFIX}
    assert pods == {"0", "1"}


@pytest.mark.parametrize("with_file", [False, True])
async def test_idle_series_are_forgotten_and_relearn_or_reload_their_baseline(
    tmp_path: Path, with_file: bool
) -> None:
    """A series without a point for series_idle_timeout is dropped at a window end (counted); back,
    it starts afresh: learning again, or with its baseline from baseline_file at once."""
    config = DriftConfig(
        window=60.0,  # type: ignore[arg-type]
        baseline=60.0,  # type: ignore[arg-type]
        series_idle_timeout=120.0,  # type: ignore[arg-type]
        baseline_file=str(tmp_path / "baselines.json") if with_file else None,
    )
    proc, sink, tel, clock = make(config)
    await proc.start()
    rng = np.random.default_rng(11)

    async def window(names: tuple[str, ...]) -> None:
        start = clock.now
        clock.now = start + 5.0
        await proc.consume(MetricBatch(tuple(timer(n, rng.lognormal(3, 0.5, 300)) for n in names)))
        clock.now = start + 60.0
        await proc.tick()

    await window(("a", "b"))  # both learn their baselines
    await window(("a", "b"))
    assert set(drift_gauges(sink, "a")) == set(TESTS)
    await window(("b",))  # a: last point 115 s before this window end, not yet idle
    assert tel.value("drift_series") == 2
    await window(("b",))
    assert tel.value("drift_series") == 1 and tel.value("drift_expired_series_total") == 1
    sink.batches.clear()
    await window(("a", "b"))  # a is back
    if not with_file:
        assert drift_gauges(sink, "a") == {}  # learning again
        await window(("a", "b"))
    assert set(drift_gauges(sink, "a")) == set(TESTS)
    await proc.shutdown()


async def test_backpressure_refuses_before_observing() -> None:
    proc, sink, tel, clock = make(DriftConfig(window=60.0, baseline=60.0), Sink(refuse_times=1))
    rng = np.random.default_rng(6)
    clock.now += 5.0
    with pytest.raises(Backpressure):
        await proc.consume(MetricBatch((timer("lat", rng.lognormal(3, 0.5, 500)),)))
    clock.now = T0 + 60.0
    await proc.tick()  # the refused batch was not learnt: the baseline is empty
    clock.now += 5.0
    await proc.consume(MetricBatch((timer("lat", rng.lognormal(3, 0.5, 500)),)))
    clock.now = T0 + 120.0
    await proc.tick()
    assert drift_gauges(sink) == {}
    assert tel.value("drift_skipped_windows_total", reason="no_reference") == 1


async def test_shutdown_sends_the_window_so_far() -> None:
    proc, sink, _, clock = make(DriftConfig(window=60.0, baseline=60.0))  # type: ignore[arg-type]
    await proc.start()
    rng = np.random.default_rng(7)
    await feed_window(proc, clock, rng_lognormal(rng))
    clock.now += 5.0
    await proc.consume(MetricBatch((timer("lat", rng.lognormal(4, 0.5, 300)),)))
    await proc.shutdown()
    assert drift_gauges(sink)["ks_pvalue"] < 1e-6
    await proc.shutdown()  # idempotent


async def test_emit_backpressure_is_counted_and_other_series_still_offered() -> None:
    sink = Sink()
    proc, _, tel, clock = make(DriftConfig(window=60.0, baseline=60.0), sink)  # type: ignore[arg-type]
    rng = np.random.default_rng(8)
    await feed_window(proc, clock, rng_lognormal(rng))
    clock.now += 5.0
    await proc.consume(MetricBatch((timer("lat", rng.lognormal(3, 0.5, 300)),)))
    sink.refuse_times = 1
    clock.now = T0 + 120.0
    with pytest.raises(Backpressure):
        await proc.tick()
    assert tel.value("processor_dropped_points_total", reason="backpressure") == len(TESTS)


@pytest.mark.parametrize(
    ("fields", "path", "message"),
    [
        ({"reference": "trailing", "offset": 90.0, "window": 60.0}, "offset", "multiple of window"),
        ({"reference": "trailing", "offset": 86400.0, "window": 60.0}, "offset", "max_trailing_windows"),
        ({"reference": "trailing", "baseline_file": "x.json"}, "baseline_file", "baseline only"),
        ({"bins": 1}, "bins", "between 2 and 1000"),
        ({"max_series": 0}, "max_series", "at least 1"),
        ({"gauges": [""]}, "gauges::0", "non-empty"),
        ({"series_idle_timeout": 30.0, "window": 60.0}, "series_idle_timeout", "at least window"),
    ],
)
def test_config_refusals(fields: dict[str, Any], path: str, message: str) -> None:
    problems = DriftConfig(**fields).validate()
    assert any(p == path and message in m for p, m in problems), problems
    assert DriftConfig().validate() == []


# -- end to end: StatsD timers → agent → drift → remote-write → a real Prometheus -------------------------


@pytest.mark.integration
async def test_statsd_timers_drift_rises_in_prometheus_after_a_shift(prometheus: PrometheusServer) -> None:
    port = free_port(socket.SOCK_DGRAM)
    config = to_remote_write(
        prometheus,
        {"statsd": {"udp": f"127.0.0.1:{port}", "flush_interval": "200ms"}},
        {"drift": {"include": ["checkout.latency"], "window": "1s", "baseline": "2s"}},
    )
    graph = AgentGraph()
    client = statsd.StatsClient("127.0.0.1", port)
    rng = np.random.default_rng(9)
    mu = 3.0  # the latency's log-mean: e**3 ≈ 20 ms, then e**3.7 ≈ 40 ms
    try:
        await graph.start(config)
        async with aiohttp.ClientSession() as session:

            async def query(expr: str) -> float | None:
                return await prom_value(session, prometheus, expr)

            async def send_then(expr: str, done: Callable[[float], bool]) -> float | None:
                """Send 40 timers of the current distribution, then read `expr` (None until `done`)."""
                with client.pipeline() as pipe:
                    for ms in rng.lognormal(mu, 0.4, 40):
                        pipe.timing("checkout.latency", float(ms))
                value = await query(expr)
                return value if value is not None and done(value) else None

            psi = 'checkout_latency_drift{test="psi",window="1s"}'
            quiet = await wait_until(
                lambda: send_then(psi, lambda v: True), "a first drift gauge in Prometheus", timeout_s=60
            )
            assert quiet < 0.2  # the same distribution as the baseline
            mu = 3.7
            loud = await wait_until(
                lambda: send_then(psi, lambda v: v > 1.0), "PSI above 1 after the shift", timeout_s=60
            )
            assert loud > 5 * quiet
            ks_p = await query('checkout_latency_drift{test="ks_pvalue"}')
            assert ks_p is not None and ks_p < 1e-3
            rising = await query(f"max_over_time({psi}[5m]) > 5 * min_over_time({psi}[5m])")
            assert rising is not None
            tests = await query('count(checkout_latency_drift{window="1s"})')
            assert tests == len(TESTS)
    finally:
        await graph.close()
