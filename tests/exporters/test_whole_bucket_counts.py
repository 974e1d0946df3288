"""Whole classic bucket counts and per-metric ``le`` layouts in the exporters that render classic
buckets: OTLP ``histograms: explicit`` (decoded with the opentelemetry-proto classes), the shared
Prometheus series store, and the ``bucket_layouts`` validation of all three."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest

from agent import exphist
from agent.bucket_layouts import BucketLayout, BucketLayouts
from agent.model import Kind, Point, Temporality
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig
from exporters.prometheus import PrometheusConfig
from exporters.prometheus_remote_write import PrometheusRemoteWriteConfig
from exporters.prometheus_series import DEFAULT_BUCKETS, SeriesStore
from tests.exporters.test_otlp_wire import data_points, encode, encoder

S = 10**9
FINE = (0.01, 0.02, 0.04, 0.08)


def timer(name: str, values: np.ndarray, rate: float = 1.0) -> Point:
    t = time.time_ns()
    h = exphist.from_values(values, np.full(values.size, 1 / rate))
    return Point(name, Kind.HISTOGRAM, (), t, 0.0, t - S, unit="s", histogram=h)


@pytest.mark.parametrize("temporality", [Temporality.DELTA, Temporality.CUMULATIVE])
def test_otlp_explicit_counts_are_whole_and_follow_the_layout(temporality: Temporality) -> None:
    values = np.random.default_rng(3).lognormal(-4.0, 1.0, 997)
    enc = encoder(
        histograms="explicit",
        temporality=temporality,
        explicit_layouts=(BucketLayout("api.*", list(FINE)),),
    )
    points = [timer("api.lat", values, rate=0.3), timer("db.lat", values, rate=0.3)]
    first = {m.name: dp for *_, m, dp in data_points(encode(enc, points))}
    again = {m.name: dp for *_, m, dp in data_points(encode(enc, [timer("api.lat", values, rate=0.3)], 1.0))}
    assert list(first["api.lat"].explicit_bounds) == list(FINE)
    assert list(first["db.lat"].explicit_bounds) == [0.1, 1.0, 10.0]  # the default explicit_buckets
    total = exphist.whole_count(997 / 0.3)
    for dp in (*first.values(), again["api.lat"]):
        counts = list(dp.bucket_counts)  # uint64 on the wire: whole by type; the sum must hold
        assert dp.count == sum(counts)
    assert first["api.lat"].count == first["db.lat"].count == total
    # Cumulative: float totals are kept and rounded as sent, so rounding errors never add up.
    twice = exphist.whole_count(2 * 997 / 0.3)
    assert again["api.lat"].count == (twice if temporality is Temporality.CUMULATIVE else total)
    # Within the bound: each cumulative count lies between the exact weighted counts at le / (1 + e)
    # and le * (1 + e), give or take the rounding of the running total.
    e = exphist.classic_error(exphist.from_values(values).scale)
    running = np.cumsum(list(first["api.lat"].bucket_counts))[:-1]
    for le, got in zip(FINE, running, strict=True):
        lo, hi = (
            np.count_nonzero(values <= le / (1 + e)) / 0.3,
            np.count_nonzero(values <= le * (1 + e)) / 0.3,
        )
        assert lo - 0.5 <= got <= hi + 0.5, (le, got, lo, hi)


def test_series_store_cuts_each_family_at_its_layout() -> None:
    store = SeriesStore(layouts=(BucketLayout("api_*", list(FINE)), BucketLayout("*", [1.0])))
    values = np.array([0.015, 0.03, 0.05, 0.5])
    a = store.update(timer("api.lat", values))
    b = store.update(timer("db.lat", values))
    assert a is not None and b is not None and a.bucket_counts is not None and b.bucket_counts is not None
    assert store.bounds_of("api_lat_seconds") == FINE and a.bucket_counts.tolist() == [0, 1, 2, 3]
    assert store.bounds_of("db_lat_seconds") == (1.0,) and b.bucket_counts.tolist() == [4]  # first match wins
    assert SeriesStore().bounds_of("api_lat_seconds") == DEFAULT_BUCKETS


def test_restored_state_of_another_layout_starts_again() -> None:
    old = SeriesStore()
    old.update(timer("api.lat", np.array([0.015, 0.5])))
    new = SeriesStore(layouts=(BucketLayout("api_*", list(FINE)),))
    assert new.restore(old.snapshot()) == 0  # 11 default buckets cannot be 4 others: not restored
    same = SeriesStore()
    assert same.restore(old.snapshot()) == 1


def test_layout_lookup_is_cached_and_shared() -> None:
    layouts = BucketLayouts((1.0,), (BucketLayout("a*", [0.5, 2.0]),))
    assert layouts.bounds_for("abc") is layouts.bounds_for("axe")
    assert layouts.bounds_for("b") is layouts.default


CONFIGS: list[tuple[Any, str, dict[str, Any]]] = [
    (PrometheusConfig, "bucket_layouts", {}),
    (PrometheusRemoteWriteConfig, "bucket_layouts", {"endpoint": "http://127.0.0.1:9/api/v1/write"}),
    (OtlpHttpConfig, "explicit_bucket_layouts", {"endpoint": "http://127.0.0.1:4318"}),
    (OtlpConfig, "explicit_bucket_layouts", {"endpoint": "127.0.0.1:4317"}),
]


@pytest.mark.parametrize(("cls", "key", "base"), CONFIGS)
def test_layouts_are_validated(cls: Any, key: str, base: dict[str, Any]) -> None:
    good = cls(**base, **{key: [BucketLayout("api.*", [0.1, 1.0])]})
    assert good.validate() == []
    bad = cls(
        **base,
        **{
            key: [
                BucketLayout("", [1.0]),
                BucketLayout("a", []),
                BucketLayout("b", [1.0, 0.5]),
                BucketLayout("c", [1.0, math.inf]),
            ]
        },
    )
    assert sorted(bad.validate()) == [
        (f"{key}::0::match", "must not be empty"),
        (f"{key}::1::bounds", "at least one bucket bound is required"),
        (f"{key}::2::bounds", "bounds must be strictly increasing"),
        (f"{key}::3::bounds", "bounds must be finite (+Inf is always the last bucket)"),
    ]
