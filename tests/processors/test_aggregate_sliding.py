"""The aggregate processor's sliding windows (``slide``) against numpy over the raw values of each span.

Every slide (1m) each interval is sent over the interval just ended: the 5m window at 12:07 holds the
points of [12:02, 12:07). Values are fed minute by minute on an injected clock and every window sent
is compared with numpy over exactly the points of its span.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from agent import exphist
from agent.confmodel import Duration
from agent.model import Kind, MetricBatch, Point
from processors.aggregate import AggregateConfig, RuleConfig
from tests.processors.test_aggregate import T0, close_window, counter, gauge, hist_point, make

MINUTE = 60.0
SPANS = {"1m": 60.0, "5m": 300.0}


def by_window(points: list[Point], prefix: str) -> dict[tuple[int, str], dict[str, Any]]:
    """(window end in ns, interval text) → output → value (quantiles: by quantile; histogram: itself)."""
    out: dict[tuple[int, str], dict[str, Any]] = defaultdict(dict)
    for p in points:
        if not p.name.startswith(prefix):
            continue
        interval, output = p.name[len(prefix) :].split(".", 1)
        slot = out[(p.time_unix_nano, interval)]
        if output == "quantile":
            slot.setdefault("quantiles", {})[float(dict(p.labels)["quantile"])] = p.value
        elif p.kind is Kind.HISTOGRAM:
            slot[output] = p.histogram
        else:
            slot[output] = p.value
    return out


def test_slide_validation() -> None:
    ok = RuleConfig(match=["g"], intervals=[Duration(120.0), Duration(300.0)], slide=Duration(60.0))
    assert AggregateConfig(rules=[ok]).validate() == []  # 2m and 5m: multiples of the slide, not of 2m
    bad = AggregateConfig(
        rules=[
            RuleConfig(match=["g"], intervals=[Duration(300.0)], slide=Duration(120.0)),
            RuleConfig(match=["g"], intervals=[Duration(86400.0)], slide=Duration(60.0)),
            RuleConfig(match=["g"], slide=Duration(7.0)),
        ]
    )
    problems = dict(bad.validate())
    assert problems["rules::0::intervals::0"] == "must be a multiple of slide, 120s"
    assert problems["rules::1::intervals::0"] == "holds more than 120 slides; give a longer slide"
    assert problems["rules::2::slide"] == "must be between 1s and 1d and divide a day (like 1m)"


async def test_sliding_gauge_windows_exact_against_numpy_over_each_span() -> None:
    rule = RuleConfig(
        match=["g"],
        intervals=[Duration(60.0), Duration(300.0)],
        slide=Duration(MINUTE),
        outputs=["count", "sum", "avg", "min", "max", "last", "stddev", "slope", "quantiles", "histogram"],
        quantiles=[0.1, 0.5, 0.99],
    )
    proc, sink, tel, clock = make(rule, max_buckets=2048)
    rng = np.random.default_rng(11)
    times: list[float] = []
    values: list[float] = []
    minutes = 9
    for m in range(minutes):
        if m == 3:
            continue  # a minute without data: the 5m windows over it still hold the others
        ts = np.sort(rng.uniform(T0 + MINUTE * m, T0 + MINUTE * (m + 1) - 0.5, size=40))
        vs = rng.normal(5.0, 10.0, size=40) + 0.05 * (ts - T0)  # both signs, a trend
        for t, v in zip(ts.tolist(), vs.tolist(), strict=True):
            clock.now = t
            point = gauge("g", t, v)
            await proc.consume(MetricBatch((point,)))
            # The point's own time (whole ns) since T0: exact, unlike unix seconds as a float (~0.2 µs).
            times.append((point.time_unix_nano - int(T0 * 1e9)) * 1e-9)
            values.append(v)
        await close_window(proc, clock, T0 + MINUTE * (m + 1) + 0.25)
    await close_window(proc, clock, T0 + MINUTE * (minutes + 1) + 0.25)
    t_all, v_all = np.array(times), np.array(values)
    windows = by_window(sink.points(), "g.")
    checked = 0
    for m in range(minutes + 1):
        end = MINUTE * (m + 1)  # since T0
        for text, span in SPANS.items():
            inside = (t_all >= end - span) & (t_all < end)
            got = windows.get((int((T0 + end) * 1e9), text))
            if not inside.any():
                assert got is None  # nothing in the span: nothing sent
                continue
            assert got is not None, (m, text)
            v, t = v_all[inside], t_all[inside]
            assert got["count"] == v.size
            assert got["sum"] == pytest.approx(np.sum(v), rel=1e-12, abs=1e-9)
            assert got["avg"] == pytest.approx(np.mean(v), rel=1e-12, abs=1e-9)
            assert (got["min"], got["max"]) == (np.min(v), np.max(v))
            assert got["last"] == v[np.argmax(t)]
            assert got["stddev"] == pytest.approx(np.std(v), rel=1e-9)
            assert got["slope"] == pytest.approx(np.polyfit(t, v, 1)[0], rel=1e-9)
            h = got["histogram"]
            assert h.count == v.size and exphist.relative_error(h.scale) < 0.01
            bound = exphist.relative_error(h.scale)
            for q, estimate in got["quantiles"].items():
                exact = float(np.quantile(v, q, method="inverted_cdf"))
                assert abs(estimate - exact) <= bound * abs(exact) * (1 + 1e-9), (m, text, q)
            checked += 1
    assert checked == 8 + 10  # 1m: each of the 8 minutes with data; 5m: every minute's end, and one after
    assert tel.value("aggregate_windows_total") == checked


async def test_sliding_counter_increase_and_rate_over_each_span() -> None:
    rule = RuleConfig(
        match=["c"], intervals=[Duration(300.0)], slide=Duration(MINUTE), outputs=["increase", "rate"]
    )
    proc, sink, _, clock = make(rule)
    rng = np.random.default_rng(12)
    deltas = rng.integers(0, 100, size=(7, 6)).astype(float)  # 7 minutes of 10 s flushes
    for m in range(7):
        for k in range(6):
            t = T0 + MINUTE * m + 10.0 * k + 5.0
            clock.now = t
            await proc.consume(MetricBatch((counter("c", t, float(deltas[m, k])),)))
        await close_window(proc, clock, T0 + MINUTE * (m + 1))
    increases = sink.values("c.5m.increase")
    rates = sink.values("c.5m.rate")
    expected = [float(deltas[max(0, m - 4) : m + 1].sum()) for m in range(7)]
    assert increases == expected
    assert rates == pytest.approx([e / 300.0 for e in expected], rel=1e-12)


async def test_sliding_distribution_quantiles_within_the_bound() -> None:
    rule = RuleConfig(
        match=["lat"],
        intervals=[Duration(120.0), Duration(300.0)],
        slide=Duration(MINUTE),
        outputs=["quantiles", "histogram", "count", "max"],
        quantiles=[0.5, 0.99],
    )
    proc, sink, _, clock = make(rule, max_buckets=2048)
    rng = np.random.default_rng(13)
    per_minute = []
    for m in range(6):
        chunk = rng.lognormal(-3.0 + 0.2 * m, 1.0, size=(6, 200))  # a drifting level
        for k in range(6):
            t = T0 + MINUTE * m + 10.0 * k + 5.0
            clock.now = t
            await proc.consume(MetricBatch((hist_point("lat", chunk[k], t),)))
        per_minute.append(chunk.reshape(-1))
        await close_window(proc, clock, T0 + MINUTE * (m + 1))
    windows = by_window(sink.points(), "lat.")
    for m in range(6):
        for text, slides in (("2m", 2), ("5m", 5)):
            got = windows[(int((T0 + MINUTE * (m + 1)) * 1e9), text)]
            v = np.concatenate(per_minute[max(0, m + 1 - slides) : m + 1])
            assert got["count"] == v.size and got["max"] == np.max(v)
            bound = exphist.relative_error(got["histogram"].scale)
            assert bound < 0.01
            for q, estimate in got["quantiles"].items():
                exact = float(np.quantile(v, q, method="inverted_cdf"))
                assert abs(estimate - exact) <= bound * exact * (1 + 1e-9)


async def test_sliding_windows_at_shutdown_and_after_a_clock_jump() -> None:
    rule = RuleConfig(match=["c"], intervals=[Duration(180.0)], slide=Duration(MINUTE), outputs=["increase"])
    proc, sink, _, clock = make(rule)
    clock.now = T0 + 30.0
    await proc.consume(MetricBatch((counter("c", T0 + 30.0, 5.0),)))
    # No tick for three minutes (a stalled loop): the slide that held the 5 ended, two more passed.
    clock.now = T0 + 200.0
    await proc.consume(MetricBatch((counter("c", T0 + 200.0, 7.0),)))
    await proc.tick()
    assert sink.values("c.3m.increase") == [5.0]  # sent at its slide's end (T0 + 60)
    assert sink.points()[0].time_unix_nano == int((T0 + MINUTE) * 1e9)
    await close_window(proc, clock, T0 + 240.0)
    # The window ending at T0 + 240 covers [T0 + 60, T0 + 240): the 5 slid out, the 7 is in.
    assert sink.values("c.3m.increase") == [5.0, 7.0]
    clock.now = T0 + 250.0
    await proc.consume(MetricBatch((counter("c", T0 + 250.0, 1.0),)))
    await proc.shutdown()
    assert sink.values("c.3m.increase") == [5.0, 7.0, 8.0]  # the slide being filled + the last two
