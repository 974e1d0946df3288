"""The paged store on its own: many series of random width and sign sharing a small pool, so pages are
taken, moved, squeezed and given back; every window must still hold every count, within the bound its
scale states, and the pool must never hold more than its budget."""

from __future__ import annotations

import numpy as np
import pytest

from agent import exphist
from processors.percentiles.store import PAGE, Store, quantiles

T0 = 1_700_000_000.0
QS = [0.01, 0.25, 0.5, 0.9, 0.99]


def _values(rng: np.random.Generator) -> np.ndarray:
    """A batch of one series: a lognormal of random width, sometimes with negatives and zeros."""
    v = rng.lognormal(rng.uniform(-8, 8), rng.uniform(0.05, 3.0), int(rng.integers(1, 300)))
    if rng.random() < 0.3:
        v = v * rng.choice([-1.0, 1.0], v.size)
    if rng.random() < 0.1:
        v[: max(1, v.size // 10)] = 0.0
    return v


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counts_and_bounds_survive_paging_and_squeezing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = [7, 11, 13]
    series = 24
    budget_pages = 3 * series  # tight: wide series must be squeezed
    store = Store(10.0, [10.0, 30.0, 300.0], rows, 2048, T0, budget_pages * sum(rows) * PAGE * 4)
    store.grow(series)
    data: list[list[np.ndarray]] = [[] for _ in range(series)]
    for _ in range(200):
        i = int(rng.integers(series))
        v = _values(rng)
        data[i].append(v)
        store.add(i, exphist.from_values(v, max_buckets=2048, max_scale=int(rng.integers(0, 12))))
        assert store.held <= store.budget
        if rng.random() < 0.05:  # a series expires and its slot is reused
            store.reset(i)
            data[i] = []
    assert store.squeezes > 0
    # Everything is still in the filling base slice: the 1m window of 6 slices holds it all.
    w = store.window(0, 6, T0 + 1.0, 0, series)
    est = quantiles(w, QS)
    for i in range(series):
        if not data[i]:
            assert w.count[i] == 0
            continue
        values = np.concatenate(data[i])
        held = w.pos[i].sum() + w.zero[i] + (w.neg[i].sum() if w.neg is not None else 0.0)
        assert held == pytest.approx(values.size)
        assert w.count[i] == values.size
        bound = exphist.relative_error(int(w.scale[i]))
        for k, q in enumerate(QS):
            want = float(np.quantile(values, q, method="inverted_cdf"))
            assert abs(est[k, i] - want) <= abs(want) * bound * (1 + 1e-9) + 1e-300, (i, q)


def test_released_pages_are_reused_clean() -> None:
    rows = [7]
    store = Store(10.0, [10.0], rows, 2048, T0, 8 * sum(rows) * PAGE * 4)
    store.grow(2)
    wide = np.geomspace(1e-3, 1e3, 500)
    store.add(0, exphist.from_values(wide, max_buckets=2048, max_scale=6))
    taken = store.held
    store.reset(0)
    assert store.held == 0
    store.add(1, exphist.from_values(np.array([5.0]), max_buckets=2048, max_scale=6))
    w = store.window(0, 6, T0 + 1.0, 0, 2)
    assert w.count.tolist() == [0.0, 1.0]
    assert w.pos[0].sum() == 0.0 and w.pos[1].sum() == 1.0  # nothing of the old series leaked
    assert taken > 1
