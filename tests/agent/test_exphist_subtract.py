"""agent.exphist.subtract: cumulative → delta for exponential histograms, the one rule the percentiles
processor and the OTLP exporter share. The cases where their former copies disagreed come first: float
residue that is no reset (either copy called one a reset), trimmed buckets, and min/max."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent import exphist
from agent.exphist import EMPTY, ExpHistogram, subtract


def hist(
    positive: list[float],
    *,
    offset: int = 0,
    scale: int = 3,
    zero: float = 0.0,
    total: float | None = None,
    low: float = 1.0,
    high: float = 100.0,
) -> ExpHistogram:
    count = total if total is not None else zero + sum(positive)
    return ExpHistogram(
        scale=scale,
        zero_count=zero,
        positive_offset=offset,
        positive_counts=np.array(positive, dtype=np.float64),
        negative_offset=0,
        negative_counts=np.zeros(0),
        count=count,
        sum=10.0 * count,
        min=low if count else math.inf,
        max=high if count else -math.inf,
    )


def test_float_residue_in_the_count_is_no_reset_and_no_values() -> None:
    # 0.1 + 0.2 accumulated as the previous count; 0.3 now: nothing new, only rounding.
    previous = hist([0.1 + 0.2], total=0.1 + 0.2)
    current = hist([0.3], total=0.3)
    assert subtract(current, previous) == EMPTY


def test_residue_of_a_large_cumulative_count_is_no_reset() -> None:
    # A bucket of 3e12 weighted values lost 1e-3 to rounding (3e-16 of it) while another gained 50.
    previous = hist([3e12, 10.0])
    current = hist([3e12 - 1e-3, 60.0])
    delta = subtract(current, previous)
    assert delta is not None
    assert delta.positive_offset == 1 and delta.positive_counts.tolist() == [50.0]
    assert delta.count == pytest.approx(50.0 - 1e-3)


def test_the_delta_is_trimmed_of_empty_buckets() -> None:
    delta = subtract(hist([5.0, 7.0, 5.0]), hist([5.0, 5.0, 5.0]))
    assert delta is not None
    assert (delta.positive_offset, delta.positive_counts.tolist(), delta.count) == (1, [2.0], 2.0)


def test_min_and_max_are_exact_when_nothing_came_before() -> None:
    current = hist([1.0, 2.0], low=2.5, high=7.0)
    for bounds in (True, False):
        delta = subtract(current, hist([], total=0.0), bounds=bounds)
        assert delta is not None and (delta.min, delta.max) == (2.5, 7.0)


def test_min_and_max_of_a_delta_are_bounds_or_unknown() -> None:
    current, previous = hist([1.0, 4.0], low=2.5, high=7.0), hist([1.0, 2.0], low=2.5, high=6.0)
    bounded = subtract(current, previous)
    assert bounded is not None and (bounded.min, bounded.max) == (2.5, 7.0)
    unknown = subtract(current, previous, bounds=False)
    assert unknown is not None and math.isnan(unknown.min) and math.isnan(unknown.max)


@pytest.mark.parametrize(
    ("current", "previous"),
    [
        (hist([5.0, 9.0]), hist([6.0, 2.0])),  # a bucket went down, the count did not
        (hist([5.0], zero=1.0), hist([3.0], zero=2.0)),  # the zero bucket went down
        (hist([5.0], total=5.0), hist([5.0, 1.0], total=6.0)),  # the count went down
    ],
)
def test_anything_that_went_down_is_a_reset(current: ExpHistogram, previous: ExpHistogram) -> None:
    assert subtract(current, previous) is None


def test_a_scale_change_between_points_compares_at_the_coarser_scale() -> None:
    previous = hist([1.0, 1.0, 1.0, 1.0], offset=8, scale=3)  # buckets 8..11 at scale 3
    current = hist([3.0, 4.0], offset=4, scale=2, zero=1.0)  # 4, 5 at scale 2 = 8..11 at scale 3
    delta = subtract(current, previous)
    assert delta is not None
    assert delta.scale == 2 and delta.positive_offset == 4 and delta.positive_counts.tolist() == [1.0, 2.0]
    assert (delta.zero_count, delta.count) == (1.0, 4.0)
    assert delta == subtract(current, exphist.downscale(previous, 1))
