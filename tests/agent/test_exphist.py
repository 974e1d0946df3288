from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import exphist
from agent.exphist import EMPTY, MAX_SCALE, MIN_SCALE, ExpHistogram

Floats = npt.NDArray[np.float64]

finite = st.floats(allow_nan=False, allow_infinity=False)
# Telemetry-sized magnitudes: no overflow in sums, no subnormals (which carry too few bits for the
# quantile bound to be representable).
moderate = st.one_of(st.just(0.0), st.floats(1e-300, 1e300), st.floats(-1e300, -1e-300))
positive_finite = st.floats(min_value=5e-324, allow_nan=False, allow_infinity=False)
# Weights: whole numbers (StatsD @0.1 gives 10) and fractional ones (@0.3 gives 3.333...).
weight = st.one_of(st.integers(1, 20).map(float), st.floats(0.01, 100.0))


def segments_strategy(max_segments: int = 12) -> st.SearchStrategy[list[list[float]]]:
    return st.lists(st.lists(finite, max_size=12), max_size=max_segments)


# --- reference bucket mapping ------------------------------------------------------------------------


def _pow2_lt(i: int, x: Fraction) -> bool:
    """2**i < x, exactly."""
    if i >= 0:
        return (x.denominator << i) < x.numerator
    return x.denominator < (x.numerator << -i)


def exact_index(v: float, scale: int) -> int:
    """The OTel bucket of v > 0 at `scale` by exact rational arithmetic: base**i < v <= base**(i+1)."""
    if scale >= 0:
        # base**i < v  <=>  2**i < v**(2**scale)
        x = Fraction(v) ** (2**scale)
        e = x.numerator.bit_length() - x.denominator.bit_length()
        for i in range(e - 2, e + 2):
            if _pow2_lt(i, x) and not _pow2_lt(i + 1, x):
                return i
        raise AssertionError("unreachable")
    # 2**e < v <= 2**(e + 1) for an integer e, and bucket i spans the exponents [i, i + 1) * 2**-scale.
    x = Fraction(v)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    for octave in range(e - 2, e + 2):
        if _pow2_lt(octave, x) and not _pow2_lt(octave + 1, x):
            return octave >> -scale
    raise AssertionError("unreachable")


def indices(values: list[float], scale: int) -> list[int]:
    """Bucket index of each value > 0 through the public API: one single-value segment per value."""
    offsets = np.arange(len(values) + 1, dtype=np.int64)
    hists = exphist.from_segments(np.array(values), None, offsets, max_scale=scale)
    assert all(h.scale == scale and h.positive_counts.size == 1 for h in hists)
    return [h.positive_offset for h in hists]


POWERS_OF_TWO = {
    # scale: expected index of 1.0, 2.0, 4.0, 0.5
    -2: [-1, 0, 0, -1],
    0: [-1, 0, 1, -2],
    3: [-1, 7, 15, -9],
    20: [-1, 2**20 - 1, 2**21 - 1, -(2**20) - 1],
}


@pytest.mark.parametrize("scale", sorted(POWERS_OF_TWO))
def test_exact_powers_of_two_land_in_the_bucket_they_close(scale: int) -> None:
    values = [1.0, 2.0, 4.0, 0.5]
    assert indices(values, scale) == POWERS_OF_TWO[scale]
    assert [exact_index(v, scale) for v in values] == POWERS_OF_TWO[scale]
    # Negative values use the same mapping on their magnitude.
    negative = [exphist.from_values(np.array([-v]), max_scale=scale) for v in values]
    assert [h.negative_offset for h in negative] == POWERS_OF_TWO[scale]
    assert all(h.positive_counts.size == 0 and h.negative_counts.tolist() == [1.0] for h in negative)


@pytest.mark.parametrize("scale", [-10, -3, -1, 0, 1, 3, 6, 20])
def test_neighbours_of_powers_of_two(scale: int) -> None:
    values: list[float] = []
    for k in (-1074, -1022, -60, -1, 0, 1, 7, 100, 1023):
        p = math.ldexp(1.0, k)
        values += [p, math.nextafter(p, math.inf), math.nextafter(p, 0.0)]
    values = [v for v in values if 0 < v < math.inf]
    if scale <= 6:
        want = [exact_index(v, scale) for v in values]
    else:
        # A power of two closes its bucket, so the value just below shares it and the one above opens
        # the next: 2**k -> (k << scale) - 1, next up -> k << scale.
        want = []
        for v in values:
            mantissa, exponent = math.frexp(v)
            if mantissa == 0.5:
                want.append(((exponent - 1) << scale) - 1)
            elif math.frexp(math.nextafter(v, 0.0))[0] == 0.5:
                want.append((exponent - 1) << scale)
            else:
                want.append((exponent << scale) - 1)
    assert indices(values, scale) == want


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(positive_finite, min_size=1, max_size=30), st.integers(MIN_SCALE, 6))
def test_mapping_matches_exact_reference(values: list[float], scale: int) -> None:
    assert indices(values, scale) == [exact_index(v, scale) for v in values]


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(positive_finite, min_size=1, max_size=30), st.sampled_from([8, 12, 16, 20]))
def test_mapping_matches_log2_reference_at_fine_scales(values: list[float], scale: int) -> None:
    got = indices(values, scale)
    for v, i in zip(values, got, strict=True):
        position = math.log2(v) * 2**scale
        if math.frexp(v)[0] == 0.5:
            assert i == round(position) - 1
        elif abs(position - round(position)) > 1e-6:
            assert i == math.ceil(position) - 1
        else:  # within rounding of a boundary: either side of it is acceptable
            assert i in (round(position) - 1, round(position))


# --- building histograms -------------------------------------------------------------------------------


def histogram_buckets(h: ExpHistogram) -> tuple[dict[int, float], dict[int, float]]:
    pos = {h.positive_offset + k: c for k, c in enumerate(h.positive_counts.tolist()) if c}
    neg = {h.negative_offset + k: c for k, c in enumerate(h.negative_counts.tolist()) if c}
    return pos, neg


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(st.tuples(moderate, weight), max_size=40),
    st.sampled_from([3, 4, 7, 20, 160]),
    st.integers(-2, MAX_SCALE),
)
def test_from_values_exact_stats_buckets_and_best_scale(
    pairs: list[tuple[float, float]], max_buckets: int, max_scale: int
) -> None:
    values = np.array([v for v, _ in pairs], dtype=np.float64)
    weights = np.array([w for _, w in pairs], dtype=np.float64)
    h = exphist.from_values(values, weights, max_buckets=max_buckets, max_scale=max_scale)
    if not pairs:
        assert h is EMPTY
        return
    assert h.count == pytest.approx(math.fsum(weights), rel=1e-12)
    assert abs(h.sum - math.fsum(values * weights)) <= 1e-12 * math.fsum(abs(values * weights))
    assert h.min == values.min() and h.max == values.max()
    assert h.zero_count == pytest.approx(math.fsum(weights[values == 0]), rel=1e-12)
    assert h.count == pytest.approx(
        h.zero_count + h.positive_counts.sum() + h.negative_counts.sum(), rel=1e-12
    )
    assert not h.positive_counts.flags.writeable and not h.negative_counts.flags.writeable
    assert h.positive_counts.dtype == np.float64 and h.negative_counts.dtype == np.float64

    # Every value sits in the bucket its finest index maps to, and the arrays are trimmed to them.
    fine = exphist._map_to_index(np.abs(values[values != 0]), max_scale)
    shift = max_scale - h.scale
    want_pos: defaultdict[int, float] = defaultdict(float)
    want_neg: defaultdict[int, float] = defaultdict(float)
    for v, w, i in zip(values[values != 0], weights[values != 0], fine.tolist(), strict=True):
        (want_pos if v > 0 else want_neg)[i >> shift] += w
    pos, neg = histogram_buckets(h)
    assert pos.keys() == want_pos.keys() and neg.keys() == want_neg.keys()
    for got, want in ((pos, want_pos), (neg, want_neg)):
        for i, c in want.items():
            assert got[i] == pytest.approx(c, rel=1e-12)
    assert h.positive_counts.size <= max_buckets and h.negative_counts.size <= max_buckets
    if want_pos:
        assert (
            h.positive_offset == min(want_pos) and h.positive_counts.size == max(want_pos) - min(want_pos) + 1
        )

    # The scale is the largest that fits: one finer would need more than max_buckets on some side.
    if h.scale < max_scale:
        finer = fine >> (shift - 1)
        sides = [finer[values[values != 0] > 0], finer[values[values != 0] < 0]]
        assert any(s.size and s.max() - s.min() + 1 > max_buckets for s in sides)


def test_integer_weights_equal_repeated_values() -> None:
    rng = np.random.default_rng(7)
    values = rng.lognormal(0.0, 2.0, 500) * rng.choice([-1.0, 1.0], 500)
    values[::50] = 0.0
    weights = rng.integers(1, 11, 500).astype(np.float64)
    weighted = exphist.from_values(values, weights)
    repeated = exphist.from_values(np.repeat(values, weights.astype(np.int64)))
    assert weighted.scale == repeated.scale
    assert weighted.count == repeated.count == weights.sum()
    assert weighted.zero_count == repeated.zero_count
    assert weighted.positive_offset == repeated.positive_offset
    assert weighted.negative_offset == repeated.negative_offset
    assert np.array_equal(weighted.positive_counts, repeated.positive_counts)
    assert np.array_equal(weighted.negative_counts, repeated.negative_counts)
    assert weighted.sum == pytest.approx(repeated.sum, rel=1e-12)
    assert (weighted.min, weighted.max) == (repeated.min, repeated.max)


def test_fractional_weights() -> None:
    # StatsD @0.3 weighs each value 1/0.3.
    h = exphist.from_values(np.array([1.5, 1.5, 3.0]), np.full(3, 1 / 0.3))
    assert h.count == pytest.approx(10.0)
    assert h.sum == pytest.approx(6.0 / 0.3)
    assert h.positive_counts.sum() == pytest.approx(10.0)


@settings(max_examples=200, deadline=None, database=None)
@given(
    segments_strategy(),
    st.booleans(),
    st.integers(0, 3),
    st.sampled_from([3, 5, 20, 160]),
    st.sampled_from([-3, 0, 4, 20]),
)
def test_from_segments_equals_from_values_per_segment(
    segments: list[list[float]],
    weighted: bool,
    lead: int,
    max_buckets: int,
    max_scale: int,
) -> None:
    rng = np.random.default_rng(len(segments))
    flat = [v for seg in segments for v in seg]
    # Values before offsets[0] do not belong to any segment.
    values = np.array([123.0] * lead + flat, dtype=np.float64)
    weights = rng.choice([1.0, 10.0, 1 / 0.3, 2.5], values.size) if weighted else None
    offsets = np.cumsum([lead] + [len(seg) for seg in segments]).astype(np.int64)
    hists = exphist.from_segments(values, weights, offsets, max_buckets=max_buckets, max_scale=max_scale)
    assert len(hists) == len(segments)
    for j, h in enumerate(hists):
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        alone = exphist.from_values(
            values[lo:hi],
            None if weights is None else weights[lo:hi],
            max_buckets=max_buckets,
            max_scale=max_scale,
        )
        assert h == alone
        if lo == hi:
            assert h is EMPTY


def test_from_segments_many_segments_mixed_signs() -> None:
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 11, 2000)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    values = rng.lognormal(-3.0, 2.0, int(offsets[-1])) * rng.choice([-1.0, 0.0, 1.0, 1.0], int(offsets[-1]))
    weights = rng.choice([1.0, 10.0, 1 / 0.3], values.size)
    hists = exphist.from_segments(values, weights, offsets)
    for j in range(0, 2000, 37):
        lo, hi = offsets[j], offsets[j + 1]
        assert hists[j] == exphist.from_values(values[lo:hi], weights[lo:hi])


def test_bad_values_and_weights_are_dropped() -> None:
    values = np.array([1.0, math.nan, math.inf, -math.inf, 2.0, 3.0, 4.0, 5.0])
    weights = np.array([1.0, 1.0, 1.0, 1.0, 0.0, -1.0, math.nan, 2.0])
    h = exphist.from_values(values, weights)
    assert h == exphist.from_values(np.array([1.0, 5.0]), np.array([1.0, 2.0]))
    assert exphist.from_values(np.array([math.nan, math.inf])) is EMPTY
    hists = exphist.from_segments(values, None, np.array([0, 2, 4, 8]))
    assert hists[1] is EMPTY
    assert hists[0] == exphist.from_values(np.array([1.0]))
    assert hists[2] == exphist.from_values(np.array([2.0, 3.0, 4.0, 5.0]))


def test_empty_inputs() -> None:
    assert exphist.from_segments(np.zeros(0), None, np.array([0])) == []
    assert exphist.from_segments(np.zeros(0), None, np.array([0, 0, 0])) == [EMPTY, EMPTY]
    assert exphist.from_values(np.zeros(0)) is EMPTY
    assert EMPTY.count == 0 and EMPTY.scale == MAX_SCALE
    assert EMPTY.min == math.inf and EMPTY.max == -math.inf
    assert EMPTY.positive_counts.size == 0 and EMPTY.negative_counts.size == 0


def test_zeros_only_and_signed_zero() -> None:
    h = exphist.from_values(np.array([0.0, -0.0, 0.0]), np.array([1.0, 2.0, 3.0]))
    assert h.zero_count == 6.0 and h.count == 6.0 and h.sum == 0.0
    assert h.positive_counts.size == 0 and h.negative_counts.size == 0
    assert h.min == 0.0 and h.max == 0.0


def test_extreme_magnitudes_fit_at_the_coarsest_scale() -> None:
    values = np.array([5e-324, 2.2e-308, 1.0, 1.7e308, -5e-324, -1.7e308])
    h = exphist.from_values(values, max_buckets=3)
    assert h.scale >= MIN_SCALE
    assert h.positive_counts.size <= 3 and h.negative_counts.size <= 3
    assert h.count == 6.0
    for q in (0.1, 0.5, 0.9):
        assert h.min <= exphist.quantile(h, q) <= h.max


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="max_buckets"):
        exphist.from_values(np.array([1.0]), max_buckets=2)
    with pytest.raises(ValueError, match="max_scale"):
        exphist.from_values(np.array([1.0]), max_scale=21)
    with pytest.raises(ValueError, match="offsets"):
        exphist.from_segments(np.array([1.0, 2.0]), None, np.array([0, 3]))
    with pytest.raises(ValueError, match="offsets"):
        exphist.from_segments(np.array([1.0, 2.0]), None, np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="weights"):
        exphist.from_segments(np.array([1.0, 2.0]), np.array([1.0]), np.array([0, 2]))


# --- the dataclass -------------------------------------------------------------------------------------


def test_constructor_copies_writeable_arrays_and_equality_compares_values() -> None:
    counts = np.array([1.0, 2.0])
    h = ExpHistogram(3, 0.0, -2, counts, 0, np.zeros(0), 3.0, 2.0, 0.5, 1.0)
    counts[0] = 99.0
    assert h.positive_counts.tolist() == [1.0, 2.0]
    assert not h.positive_counts.flags.writeable
    with pytest.raises(ValueError):
        h.positive_counts[0] = 5.0
    ints = ExpHistogram(3, 0.0, -2, np.array([1, 2]), 0, np.zeros(0), 3.0, 2.0, 0.5, 1.0)
    assert ints.positive_counts.dtype == np.float64
    assert h == ints
    assert h != ExpHistogram(3, 0.0, -2, np.array([1.0, 3.0]), 0, np.zeros(0), 3.0, 2.0, 0.5, 1.0)
    assert h != "not a histogram"
    with pytest.raises(TypeError):
        hash(h)
    with pytest.raises(AttributeError):
        h.count = 4.0  # type: ignore[misc]
    assert repr(h) == "ExpHistogram(count=3, sum=2, min=0.5, max=1, scale=3, zero=0, pos=[-2:0], neg=[])"


def test_histograms_from_segments_are_real_frozen_instances() -> None:
    (h,) = exphist.from_segments(np.array([1.0, -2.0]), None, np.array([0, 2]))
    assert type(h) is ExpHistogram
    with pytest.raises(AttributeError):
        h.scale = 1  # type: ignore[misc]
    assert not h.positive_counts.flags.writeable and not h.negative_counts.flags.writeable


# --- downscale, merge, scale_counts --------------------------------------------------------------------


def test_downscale_moves_bucket_i_to_i_shifted() -> None:
    positive = np.array([1.0, 2, 0, 0, 0, 0, 3, 1, 1, 0, 5])
    h = ExpHistogram(5, 2.0, -7, positive, 1021, np.array([2.0, 0, 1, 4]), 22.0, 1.0, -3.0, 3.0)
    assert exphist.downscale(h, 0) is h
    for k in (1, 2, 3, 7, 15):
        d = exphist.downscale(h, k)
        assert d.scale == 5 - k
        pos, neg = histogram_buckets(d)
        hp, hn = histogram_buckets(h)
        want_pos: defaultdict[int, float] = defaultdict(float)
        want_neg: defaultdict[int, float] = defaultdict(float)
        for i, c in hp.items():
            want_pos[i >> k] += c
        for i, c in hn.items():
            want_neg[i >> k] += c
        assert pos == want_pos and neg == want_neg
        assert (d.count, d.sum, d.min, d.max, d.zero_count) == (h.count, h.sum, h.min, h.max, h.zero_count)
        assert d.positive_offset == -7 >> k and d.negative_offset == 1021 >> k
    with pytest.raises(ValueError):
        exphist.downscale(h, -1)
    with pytest.raises(ValueError):
        exphist.downscale(h, 16)


def test_downscale_equals_building_at_the_lower_scale() -> None:
    rng = np.random.default_rng(11)
    values = rng.lognormal(0.0, 1.0, 300) * rng.choice([-1.0, 1.0], 300)
    fine = exphist.from_values(values, max_buckets=10_000, max_scale=8)
    coarse = exphist.from_values(values, max_buckets=10_000, max_scale=5)
    assert fine.scale == 8 and coarse.scale == 5
    assert exphist.downscale(fine, 3) == coarse


@st.composite
def histograms(draw: st.DrawFn) -> tuple[ExpHistogram, Floats]:
    values = np.array(draw(st.lists(moderate, max_size=30)), dtype=np.float64)
    max_buckets = draw(st.sampled_from([3, 8, 160]))
    return exphist.from_values(values, max_buckets=max_buckets), values


@settings(max_examples=200, deadline=None, database=None)
@given(histograms(), histograms(), histograms(), st.sampled_from([3, 8, 160]))
def test_merge_is_associative_and_matches_building_from_the_union(
    a: tuple[ExpHistogram, Floats],
    b: tuple[ExpHistogram, Floats],
    c: tuple[ExpHistogram, Floats],
    max_buckets: int,
) -> None:
    (ha, va), (hb, vb), (hc, vc) = a, b, c
    left = exphist.merge(exphist.merge(ha, hb, max_buckets=max_buckets), hc, max_buckets=max_buckets)
    right = exphist.merge(ha, exphist.merge(hb, hc, max_buckets=max_buckets), max_buckets=max_buckets)
    for h in (left, right):
        assert h.positive_counts.size <= max_buckets and h.negative_counts.size <= max_buckets
    assert left.count == right.count  # whole-number counts: exact
    assert abs(left.sum - right.sum) <= 1e-12 * (abs(ha.sum) + abs(hb.sum) + abs(hc.sum))
    assert (left.min, left.max, left.zero_count) == (right.min, right.max, right.zero_count)
    assert histogram_buckets(left) == histogram_buckets(right)
    if left.positive_counts.size or left.negative_counts.size:
        assert left.scale == right.scale

    # Merging loses nothing beyond the coarser scale: it equals building from all the values at once,
    # provided the inputs were not already coarsened below that by their own max_buckets.
    union = exphist.from_values(np.concatenate((va, vb, vc)), max_buckets=max_buckets)
    if all(h.scale >= union.scale for h in (ha, hb, hc) if h.positive_counts.size or h.negative_counts.size):
        assert histogram_buckets(left) == histogram_buckets(union)
        assert left.count == union.count
        if left.positive_counts.size or left.negative_counts.size:
            assert left.scale == union.scale


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(histograms(), min_size=1, max_size=6), st.sampled_from([3, 8, 160]))
def test_merge_all_equals_merging_pairwise(hs: list[tuple[ExpHistogram, Floats]], max_buckets: int) -> None:
    """One pass over a window's histograms gives what folding them pairwise gave."""
    folded = hs[0][0]
    for h, _ in hs[1:]:
        folded = exphist.merge(folded, h, max_buckets=max_buckets)
    merged = exphist.merge_all([h for h, _ in hs], max_buckets=max_buckets)
    assert histogram_buckets(merged) == histogram_buckets(folded)
    assert (merged.count, merged.min, merged.max, merged.zero_count) == (
        folded.count, folded.min, folded.max, folded.zero_count,
    )  # fmt: skip
    assert abs(merged.sum - folded.sum) <= 1e-12 * sum(abs(h.sum) for h, _ in hs)
    if merged.positive_counts.size or merged.negative_counts.size:
        assert merged.scale == folded.scale
    with pytest.raises(ValueError, match="no histograms"):
        exphist.merge_all([])


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(st.lists(histograms(), min_size=1, max_size=5), min_size=1, max_size=6),
    st.sampled_from([3, 8, 160]),
)
def test_merge_groups_equals_merge_all_of_each_group(
    groups: list[list[tuple[ExpHistogram, Floats]]], max_buckets: int
) -> None:
    """A window end's merge of every series at once gives each series' merge_all, to the bit."""
    hs = [[h for h, _ in g] for g in groups]
    merged = exphist.merge_groups(hs, max_buckets=max_buckets)
    assert merged == [exphist.merge_all(g, max_buckets=max_buckets) for g in hs]
    for h in merged:
        assert not h.positive_counts.flags.writeable and not h.negative_counts.flags.writeable
    with pytest.raises(ValueError, match="no histograms"):
        exphist.merge_groups([hs[0], []])


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(histograms(), min_size=1, max_size=6),
    st.lists(
        st.one_of(st.sampled_from([0.0, 0.01, 0.5, 0.99, 1.0]), st.floats(0.0, 1.0)), min_size=1, max_size=4
    ),
)
def test_quantiles_of_equals_quantile_of_each(hs: list[tuple[ExpHistogram, Floats]], qs: list[float]) -> None:
    """The quantiles of many histograms at once are quantile()'s, to the bit (NaN for no values)."""
    got = exphist.quantiles_of([h for h, _ in hs] + [EMPTY], qs)
    want = [[exphist.quantile(h, q) for q in qs] for h in [h for h, _ in hs] + [EMPTY]]
    assert [[x if x == x else "nan" for x in row] for row in got] == [
        [x if x == x else "nan" for x in row] for row in want
    ]
    with pytest.raises(ValueError, match="within"):
        exphist.quantiles_of([hs[0][0]], [1.5])


def test_merge_with_empty_and_commutes() -> None:
    h = exphist.from_values(np.array([0.5, 3.0, -2.0, 0.0]))
    assert exphist.merge(h, EMPTY) == h
    assert exphist.merge(EMPTY, h) == h
    assert exphist.merge(EMPTY, EMPTY) == EMPTY
    g = exphist.from_values(np.array([100.0, 1e-3]))
    assert exphist.merge(h, g) == exphist.merge(g, h)


def test_merge_downscales_to_fit() -> None:
    a = exphist.from_values(np.array([1.0, 1.5]), max_buckets=10)
    b = exphist.from_values(np.array([1000.0, 1500.0]), max_buckets=10)
    m = exphist.merge(a, b, max_buckets=10)
    assert m.positive_counts.size <= 10
    assert m.scale < min(a.scale, b.scale)
    assert (m.count, m.sum, m.min, m.max) == (4.0, 2502.5, 1.0, 1500.0)


def test_scale_counts() -> None:
    h = exphist.from_values(np.array([1.0, -2.0, 0.0, 4.0]))
    s = exphist.scale_counts(h, 10.0)
    assert s.count == 40.0 and s.sum == 30.0 and s.zero_count == 10.0
    assert s.positive_counts.tolist() == (h.positive_counts * 10).tolist()
    assert s.negative_counts.tolist() == (h.negative_counts * 10).tolist()
    assert (s.min, s.max, s.scale, s.positive_offset) == (h.min, h.max, h.scale, h.positive_offset)
    assert not s.positive_counts.flags.writeable
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            exphist.scale_counts(h, bad)


# --- quantile ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", range(3, 9))
def test_relative_error_formula(scale: int) -> None:
    base = 2.0 ** (2.0**-scale)
    assert exphist.relative_error(scale) == pytest.approx((base - 1) / (base + 1), rel=1e-12)


def test_relative_error_edges() -> None:
    assert exphist.relative_error(6) < 0.01 < exphist.relative_error(5)
    assert exphist.relative_error(MIN_SCALE) == 1.0
    assert 0 < exphist.relative_error(MAX_SCALE) < 1e-6


def assert_quantile_within_bound(h: ExpHistogram, values: Floats, weights: Floats | None, q: float) -> None:
    got = exphist.quantile(h, q)
    want = float(np.quantile(values, q, weights=weights, method="inverted_cdf"))
    bound = exphist.relative_error(h.scale) * abs(want) * (1 + 1e-9)
    assert abs(got - want) <= bound, (q, got, want, h)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_buckets", [20, 160, 2000])
def test_quantile_error_bound_on_lognormal_data(seed: int, max_buckets: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    values = rng.lognormal(-4.0, 1.0 + seed / 4, n)
    weights = [None, rng.integers(1, 11, n).astype(np.float64), rng.uniform(0.1, 10.0, n)][seed % 3]
    h = exphist.from_values(values, weights, max_buckets=max_buckets)
    for q in (0.5, 0.9, 0.99):
        assert_quantile_within_bound(h, values, weights, q)


def test_quantile_error_is_at_most_one_percent_at_scale_6() -> None:
    rng = np.random.default_rng(42)
    values = rng.lognormal(-4.0, 1.0, 20_000)
    h = exphist.from_values(values, max_buckets=1000)
    assert h.scale >= 6
    for q in (0.5, 0.9, 0.95, 0.99):
        want = float(np.quantile(values, q, method="inverted_cdf"))
        assert abs(exphist.quantile(h, q) - want) <= 0.01 * want


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(st.tuples(moderate, st.integers(1, 5).map(float)), min_size=1, max_size=40),
    st.sampled_from([3, 8, 160]),
    st.floats(0.0, 1.0),
)
def test_quantile_error_bound_on_any_data(
    pairs: list[tuple[float, float]], max_buckets: int, q: float
) -> None:
    values = np.array([v for v, _ in pairs], dtype=np.float64)
    weights = np.array([w for _, w in pairs], dtype=np.float64)
    h = exphist.from_values(values, weights, max_buckets=max_buckets)
    if q in (0.0, 1.0):
        assert exphist.quantile(h, q) == (values.min() if q == 0.0 else values.max())
    else:
        assert_quantile_within_bound(h, values, weights, q)


def test_quantile_edges() -> None:
    assert math.isnan(exphist.quantile(EMPTY, 0.5))
    h = exphist.from_values(np.array([-3.0, 0.0, 0.0, 7.0]))
    assert exphist.quantile(h, 0.0) == -3.0
    assert exphist.quantile(h, 1.0) == 7.0
    assert exphist.quantile(h, 0.5) == 0.0
    assert exphist.quantile(exphist.from_values(np.array([0.37])), 0.5) == 0.37  # clamped into [min, max]
    for bad in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError):
            exphist.quantile(h, bad)


# --- classic_buckets (properties) ------------------------------------------------------------------


def test_classic_buckets_exact_at_powers_of_two() -> None:
    rng = np.random.default_rng(5)
    values = rng.lognormal(0.0, 2.0, 3000) * rng.choice([-1.0, 1.0, 1.0], 3000)
    values[::100] = 0.0
    weights = rng.integers(1, 11, 3000).astype(np.float64)
    bounds = np.concatenate((-(2.0 ** np.arange(8, -9, -1)), [0.0], 2.0 ** np.arange(-8, 9)))
    for max_buckets in (160, 400):
        h = exphist.from_values(values, weights, max_buckets=max_buckets)
        assert h.scale >= 0
        got = exphist.classic_buckets(h, bounds.tolist())
        want = [weights[values <= b].sum() for b in bounds]
        assert got.tolist() == want


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(st.tuples(finite, weight), min_size=1, max_size=40),
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=20, unique=True),
    st.sampled_from([3, 8, 160]),
)
def test_classic_buckets_monotone_and_bounded(
    pairs: list[tuple[float, float]], bounds: list[float], max_buckets: int
) -> None:
    values = np.array([v for v, _ in pairs], dtype=np.float64)
    weights = np.array([w for _, w in pairs], dtype=np.float64)
    h = exphist.from_values(values, weights, max_buckets=max_buckets)
    b = sorted(bounds)
    got = exphist.classic_buckets(h, b)
    assert got.shape == (len(b),)
    assert np.all(np.diff(got) >= 0)
    assert np.all((got >= 0) & (got <= h.count))
    for bound, c in zip(b, got.tolist(), strict=True):
        if bound >= h.max:
            assert c == h.count
        if bound < h.min:
            assert c == 0.0
    last = exphist.classic_buckets(h, [*b, max(b[-1], h.max) + 1.0])
    assert last[-1] == h.count
