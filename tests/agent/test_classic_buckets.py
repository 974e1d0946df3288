"""agent.exphist.classic_buckets / whole: the one rule that turns exponential histograms into classic
``le`` buckets (whole exponential buckets, whole counts, within the stated error bound)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent import exphist

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _lognormal(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(3.0, 1.0, n) / 1000.0  # ms → s, as StatsD timers


@pytest.mark.parametrize("seed", range(5))
def test_integer_weights_give_integer_cumulative_counts(seed: int) -> None:
    values = _lognormal(4000, seed)
    h = exphist.from_values(values)
    below = exphist.classic_buckets(h, BOUNDS)
    assert np.array_equal(below, np.rint(below)), below  # no exponential bucket is split
    assert np.all(np.diff(below) >= 0)
    assert below[-1] <= h.count == 4000


@pytest.mark.parametrize("seed", range(5))
def test_each_value_counted_within_the_stated_bound(seed: int) -> None:
    """Every count lies between the exact counts at bound / (1 + e) and bound * (1 + e)."""
    values = np.concatenate([_lognormal(3000, seed), -_lognormal(500, seed + 100), np.zeros(7)])
    h = exphist.from_values(values)
    e = exphist.classic_error(h.scale)
    bounds = (-0.05, -0.01, 0.0, *BOUNDS)
    below = exphist.classic_buckets(h, bounds)
    for bound, got in zip(bounds, below, strict=True):
        lo, hi = (bound / (1 + e), bound * (1 + e)) if bound >= 0 else (bound * (1 + e), bound / (1 + e))
        assert np.count_nonzero(values <= lo) <= got <= np.count_nonzero(values <= hi), (bound, h.scale)


def test_error_bound_formula() -> None:
    assert exphist.classic_error(0) == pytest.approx(math.sqrt(2) - 1)
    assert exphist.classic_error(5) == pytest.approx(2 ** (1 / 64) - 1)
    assert exphist.classic_error(5) < 0.011


def test_bounds_on_bucket_boundaries_are_exact() -> None:
    values = np.array([0.5, 1.0, 1.0, 1.5, 2.0, 3.0, 4.0, 4.0001])
    h = exphist.from_values(values, max_scale=2)
    below = exphist.classic_buckets(h, (0.5, 1.0, 2.0, 4.0))
    assert below.tolist() == [1, 3, 5, 7]


def test_midpoint_rule_files_a_bucket_whole() -> None:
    # One value, scale 0: bucket (2, 4], log-midpoint 2*sqrt(2) ~ 2.83; min/max clamping aside, the
    # bucket goes whole to the first bound at or above its midpoint.
    h = exphist.merge(
        exphist.from_values(np.array([2.5]), max_scale=0), exphist.from_values(np.array([3.9]), max_scale=0)
    )
    assert h.scale == 0
    assert exphist.classic_buckets(h, (2.7, 2.9, 3.95)).tolist() == [0, 2, 2]


def test_whole_rounds_running_totals_monotone_and_count_matches_inf() -> None:
    weights = np.full(30, 1 / 0.3)  # sample rate 0.3: each value weighs 3.333...
    h = exphist.from_values(_lognormal(30, 1), weights)
    below = exphist.classic_buckets(h, BOUNDS)
    whole = exphist.whole(below)
    count = exphist.whole_count(h.count)
    assert np.array_equal(whole, np.rint(whole))
    assert np.all(np.diff(whole) >= 0) and whole[-1] <= count == 100
    assert np.all(np.abs(whole - below) <= 0.5)


def test_refuses_unordered_bounds() -> None:
    h = exphist.from_values(np.array([1.0]))
    with pytest.raises(ValueError, match="strictly ascending"):
        exphist.classic_buckets(h, (1.0, 1.0))
    with pytest.raises(ValueError, match="strictly ascending"):
        exphist.classic_buckets(h, (1.0, math.inf))
