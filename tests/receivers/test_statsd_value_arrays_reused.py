"""The StatsD aggregator reuses the raw value arrays of a built interval for the next intervals'
histogram series, so a steady load makes no new objects for the garbage collector to walk
(receivers/statsd/aggregator.py ``_spare``; the policy that freezes them is agent/gcpolicy.py)."""

from __future__ import annotations

from array import array

from agent.model import Point
from receivers.statsd.aggregator import StatsdAggregator

NOW_S = 1_700_000_000
START_NS = (NOW_S - 10) * 1_000_000_000
END_NS = NOW_S * 1_000_000_000
LINES = b"t.a:10|ms|#k:1\nt.a:30|ms|#k:1\nt.b:5|ms\nd.c:2|d\nd.c:4|h|@0.5\n"


def aggregator() -> StatsdAggregator:
    return StatsdAggregator(clock_s=lambda: float(NOW_S))


def histograms(points: list[Point]) -> dict[str, tuple[float, float, float]]:
    out = {}
    for p in points:
        assert p.histogram is not None
        out[p.name] = (p.histogram.count, p.histogram.sum, p.histogram.max)
    return out


def arrays_of(agg: StatsdAggregator) -> list[array[float]]:
    iv = agg._iv
    return [*iv.timers.values(), *iv.timer_weights.values(), *iv.dists.values(), *iv.dist_weights.values()]


def test_the_next_interval_takes_the_arrays_of_the_built_one_and_counts_the_same() -> None:
    agg = aggregator()
    agg.feed(LINES)
    first = arrays_of(agg)
    assert len(first) == 4  # t.a, t.b, d.c and d.c's weights (its @0.5)
    built = [p for chunk in agg.build(agg.swap(), START_NS, END_NS) for p in chunk]

    agg.feed(LINES)
    again = arrays_of(agg)
    reused = [a for a in again if any(a is b for b in first)]
    assert len(again) == 4 and len(reused) == 3  # the values' arrays; sampled weights are made anew
    rebuilt = [p for chunk in agg.build(agg.swap(), START_NS, END_NS) for p in chunk]
    assert (
        histograms(rebuilt)
        == histograms(built)
        == {
            "t.a": (2.0, 0.04, 0.03),
            "t.b": (1.0, 0.005, 0.005),
            "d.c": (3.0, 10.0, 4.0),
        }
    )


def test_a_build_not_taken_to_the_end_keeps_its_arrays() -> None:
    agg = aggregator()
    agg.feed(LINES)
    interval = agg.swap()
    held = dict(interval.timers)
    chunks = agg.build(interval, START_NS, END_NS, chunk_size=1)
    next(chunks)  # the flush was cancelled after its first chunk
    agg.feed(LINES)
    assert not any(a is b for a in arrays_of(agg) for b in held.values())
    assert interval.timers == held
    assert sorted(list(values) for values in held.values()) == [[0.005], [0.01, 0.03]]


def test_the_spare_arrays_never_outnumber_the_last_interval() -> None:
    agg = aggregator()
    agg.feed(b"\n".join(b"t.%d:1|ms" % i for i in range(50)))
    for _ in agg.build(agg.swap(), START_NS, END_NS):
        pass
    assert len(agg._spare) == 50
    agg.feed(b"t.0:1|ms")
    for _ in agg.build(agg.swap(), START_NS, END_NS):
        pass
    assert len(agg._spare) == 1
