"""The drift processor: its statistics against the same statistics computed exactly on the raw
samples (numpy, scipy), its reference modes on simulated time (an injected clock), and its bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sst
from scipy.spatial.distance import jensenshannon

from agent import exphist
from processors.drift import stats

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


def test_kolmogorov_and_gamma_functions_match_scipy() -> None:
    from scipy import special

    for x in [0.0, 0.05, 0.3, 0.8, 1.17, 1.18, 1.19, 1.5, 2.5, 4.0]:
        assert stats.kolmogorov_sf(x) == pytest.approx(sst.kstwobign.sf(x), rel=1e-12, abs=1e-300)
    for a in [0.5, 1.0, 4.5, 50.0, 500.0]:
        for x in [0.0, 0.1, 1.0, a, 2 * a, 5 * a + 10]:
            assert stats.gamma_q(a, x) == pytest.approx(special.gammaincc(a, x), rel=1e-9, abs=1e-300)


def test_identical_histograms_show_no_drift() -> None:
    h = exphist.from_values(np.random.default_rng(7).lognormal(0, 1, 1000), max_buckets=320)
    d = stats.drift(h, h)
    assert d is not None
    assert (d.psi, d.ks, d.js, d.chi2) == (0.0, 0.0, 0.0, 0.0)
    assert d.ks_pvalue == 1.0 and d.chi2_pvalue == 1.0


def test_empty_side_gives_no_statistics() -> None:
    h = exphist.from_values(np.array([1.0, 2.0]))
    assert stats.drift(exphist.EMPTY, h) is None and stats.drift(h, exphist.EMPTY) is None
