"""The drift processor's dense rows (processors/drift/store.py): a slot equals the exact merge of what
was added to it (exphist.merge_all), whatever the batches, scales and spans; gauge values equal
exphist.from_values; slots are reused empty; batches of many series equal each series merged alone."""

from __future__ import annotations

import numpy as np
import pytest

from agent import exphist
from agent.component import ComponentKind
from agent.exphist import ExpHistogram
from agent.model import Kind, MetricBatch, Point
from agent.telemetry import Telemetry
from processors.drift import DriftConfig, DriftProcessor, stats
from processors.drift.store import Rows
from tests.conftest import Sink, component_settings


def same(got: ExpHistogram, want: ExpHistogram) -> None:
    """Equal to the bit: scale, layout, every bucket, count, sum, min and max (the scale of a histogram
    without buckets places nothing: not compared)."""
    if not (want.positive_counts.size or want.negative_counts.size):
        assert not (got.positive_counts.size or got.negative_counts.size)
        got = ExpHistogram(
            want.scale, got.zero_count, 0, np.zeros(0), 0, np.zeros(0), got.count, got.sum, got.min, got.max
        )
    assert got == want, (got, want)


def test_a_slot_equals_the_merge_of_its_inputs_through_rescales_and_moves() -> None:
    """Inputs at finer and coarser scales, spans that drift away and widen (the slot moves and
    downscales itself), both signs and zeros, several inputs for one slot in one call."""
    rng = np.random.default_rng(7)
    rows = Rows(160)
    slots = [rows.allocate() for _ in range(4)]
    added: dict[int, list[ExpHistogram]] = {s: [] for s in slots}
    for step in range(8):
        at: list[int] = []
        hs: list[ExpHistogram] = []
        for i, slot in enumerate(slots):
            for _ in range(1 + (i + step) % 3):
                if i == 0:  # drifting up, then wide: the slot moves, then downscales
                    v = rng.lognormal(1.0 + step, 0.2 + 0.4 * step, 40)
                elif i == 1:  # both signs and exact zeros
                    v = np.concatenate((rng.normal(step, 1.0 + step, 30), np.zeros(3)))
                elif i == 2:  # narrow, at scales changing every step (finer and coarser than the slot)
                    v = rng.lognormal(-2.0, 0.05, 20)
                else:  # a slot given only zeros and empties for a while, then values
                    v = np.zeros(5) if step < 4 else rng.lognormal(0.0, 1.0, 20)
                h = exphist.from_values(v, max_buckets=160, max_scale=(8, 3, 20, -1)[(i + step) % 4])
                at.append(slot)
                hs.append(h)
                added[slot].append(h)
        assert rows.add_histograms(at, hs) == 0
        for slot in slots:
            same(rows.histogram(slot), exphist.merge_all(added[slot], max_buckets=160))
    assert rows.histogram(slots[0]).scale < 3  # the wide inputs made it downscale


def test_a_wide_histogram_downscales_a_slot_holding_a_narrow_one() -> None:
    rows = Rows(20)
    slot = rows.allocate()
    narrow = exphist.from_values(np.array([1.0, 1.01, 1.02]), max_buckets=20, max_scale=8)
    wide = exphist.from_values(np.array([0.001, 1000.0]), max_buckets=20, max_scale=8)
    rows.add_histograms([slot], [narrow])
    same(rows.histogram(slot), narrow)
    rows.add_histograms([slot], [wide])
    merged = exphist.merge_all([narrow, wide], max_buckets=20)
    assert merged.scale < narrow.scale
    same(rows.histogram(slot), merged)


def test_empty_and_non_finite_histograms_are_left_out_and_counted() -> None:
    rows = Rows(160)
    slot = rows.allocate()
    good = exphist.from_values(np.array([1.0, 2.0]))
    bad = ExpHistogram(0, 0.0, 0, np.array([1.0]), 0, np.zeros(0), 1.0, 1.0, 1.0, float("inf"))
    assert rows.add_histograms([slot, slot, slot], [exphist.EMPTY, bad, good]) == 1
    same(rows.histogram(slot), good)


def test_gauge_values_equal_from_values() -> None:
    rng = np.random.default_rng(3)
    rows = Rows(160)
    slots = [rows.allocate() for _ in range(3)]
    samples = [rng.normal(0.0, 1.0, 300), rng.lognormal(0.0, 3.0, 300), np.array([0.0, 0.0, -5.0, 2.5])]
    at = np.concatenate([np.full(v.size, s) for s, v in zip(slots, samples, strict=True)])
    values = np.concatenate(samples)
    order = rng.permutation(values.size)  # interleaved: each slot's values still in their order
    order = np.concatenate([order[at[order] == s] for s in slots])
    rows.add_values(at[order][: values.size // 2], values[order][: values.size // 2], 8)
    rows.add_values(at[order][values.size // 2 :], values[order][values.size // 2 :], 8)
    for slot, v in zip(slots, samples, strict=True):
        want = exphist.from_values(v, max_buckets=160, max_scale=8)
        got = rows.histogram(slot)
        assert (got.scale, got.positive_offset, got.negative_offset, got.zero_count, got.count) == (
            want.scale, want.positive_offset, want.negative_offset, want.zero_count, want.count,
        )  # fmt: skip
        np.testing.assert_array_equal(got.positive_counts, want.positive_counts)
        np.testing.assert_array_equal(got.negative_counts, want.negative_counts)
        assert got.sum == pytest.approx(want.sum, rel=1e-12) and (got.min, got.max) == (want.min, want.max)


def test_released_slots_come_back_empty_and_the_store_grows_keeping_its_rows() -> None:
    rows = Rows(40)
    h = exphist.from_values(np.array([-3.0, 0.0, 2.0, 7.0]), max_buckets=40)
    first = [rows.allocate() for _ in range(5)]
    rows.add_histograms(first, [h] * 5)
    rows.release(first[:2])
    again = rows.allocate()
    assert again in first[:2]
    same(rows.histogram(again), exphist.EMPTY)
    rows.add_histograms([again], [exphist.from_values(np.array([5.0]), max_buckets=40)])
    same(rows.histogram(again), exphist.from_values(np.array([5.0]), max_buckets=40))
    many = [rows.allocate() for _ in range(3000)]  # past the first 1024 slots: grown twice
    rows.add_histograms(many[-1:], [h])
    for slot in (*first[2:], many[-1]):
        same(rows.histogram(slot), h)
    assert rows.slots_in_use == 3 + 1 + 3000


def test_statistics_read_from_rows_equal_those_of_the_histograms() -> None:
    rng = np.random.default_rng(5)
    rows = Rows(320)
    pairs = [
        (rng.normal(0, 1, 400), rng.normal(0.3, 1, 900)),
        (rng.lognormal(2, 1, 500), rng.lognormal(2, 2, 50)),
    ]
    hs = [exphist.from_values(v, max_buckets=320, max_scale=8) for pair in pairs for v in pair]
    slots = [rows.allocate() for _ in hs]
    rows.add_histograms(slots, hs)
    got = stats.drift_of(rows.histograms(np.array([slots[0], slots[2], slots[1], slots[3]])))
    want = stats.drift_many([hs[0], hs[2]], [hs[1], hs[3]])
    for name in ("psi", "ks", "ks_pvalue", "ks_bound", "js", "chi2", "chi2_pvalue", "bin_edges"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_batches_of_many_series_equal_each_series_merged_alone() -> None:
    """Batches of many series, each series twice in a batch (a row added to twice in one call), at
    changing scales, more points than are held before being added (added mid-window too): each
    series' statistics equal drift_many of its window's and its baseline's inputs merged alone
    (exphist.merge_all; gauges: exphist.from_values of its values)."""
    rng = np.random.default_rng(11)
    series = 1100  # 2,200 histograms and 26,400 values a window: past the 2,048 and 16,384 held
    sink = Sink()
    clock = _Clock()
    config = DriftConfig(window=60.0, baseline=60.0, gauges=["score"])  # type: ignore[arg-type]
    settings = component_settings(Telemetry(), ComponentKind.PROCESSOR, "drift")
    proc = DriftProcessor(settings, config, sink, clock=clock, run_timer=False)
    await proc.start()
    inputs: list[tuple[dict[int, list[ExpHistogram]], dict[int, list[float]]]] = []
    for w in range(2):
        hists: dict[int, list[ExpHistogram]] = {i: [] for i in range(series)}
        values: dict[int, list[float]] = {i: [] for i in range(series)}
        points: list[Point] = []
        for i in range(series):
            for k in range(2):
                v = rng.lognormal(i % 5 + 0.3 * w, 0.5 + (i % 3), 20)
                h = exphist.from_values(v, max_buckets=320, max_scale=(8, 4, 6)[(i + k + w) % 3])
                hists[i].append(h)
                points.append(Point("lat", Kind.HISTOGRAM, (("s", str(i)),), 0, histogram=h))
            for v in rng.normal(i % 4 + 0.5 * w, 1.0, 24).tolist():
                values[i].append(v)
                points.append(Point("score", Kind.GAUGE, (("s", str(i)),), 0, value=v))
        inputs.append((hists, values))
        clock.now = 1_700_000_040.0 + 60.0 * w  # inside window w
        for start in range(0, len(points), 500):
            await proc.consume(MetricBatch(tuple(points[start : start + 500])))
        clock.now += 30.0
        await proc.tick()
    got = {(p.name, p.labels): p.value for p in sink.points() if p.name.endswith(".drift")}
    assert len(got) == 2 * series * 6
    (base_h, base_v), (cur_h, cur_v) = inputs
    for i in range(series):
        for name, current, reference in (
            (
                "lat",
                exphist.merge_all(cur_h[i], max_buckets=320),
                exphist.merge_all(base_h[i], max_buckets=320),
            ),
            (
                "score",
                exphist.from_values(np.array(cur_v[i]), max_buckets=320, max_scale=8),
                exphist.from_values(np.array(base_v[i]), max_buckets=320, max_scale=8),
            ),
        ):
            d = stats.drift(current, reference)
            assert d is not None
            want = {"psi": d.psi, "ks": d.ks, "ks_pvalue": d.ks_pvalue, "js": d.js, "chi2": d.chi2}
            want["chi2_pvalue"] = d.chi2_pvalue
            for test, value in want.items():
                labels = (("s", str(i)), ("test", test), ("window", "1m"))
                assert got[(name + ".drift", labels)] == pytest.approx(value, rel=1e-12, abs=1e-15), (
                    name,
                    i,
                    test,
                )
    await proc.shutdown()
