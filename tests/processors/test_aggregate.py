"""The aggregate processor against exact numpy computations over the raw values, on an injected clock.

Points are fed at known timestamps inside a window, the clock is moved past the window's end and the
processor ticked; every output is compared with numpy over the values that window holds.
"""

from __future__ import annotations

import math
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
import statsd

from agent import exphist
from agent.component import Backpressure, ComponentKind
from agent.confmodel import Duration
from agent.model import ExplicitHistogram, Kind, Labels, MetricBatch, Point, Temporality
from agent.telemetry import Telemetry
from processors.aggregate import AggregateConfig, AggregateProcessor, RuleConfig, factory, output_prefix
from tests.conftest import AgentGraph, Sink, component_settings, wait_until
from tests.integration.conftest import PrometheusServer, free_tcp_udp_port, prom_query, to_remote_write

T0 = 1_699_999_200.0  # a multiple of 3600 s: every interval up to 1h starts a window here
ALL_VALUE_OUTPUTS: list[Any] = ["count", "sum", "avg", "min", "max", "last", "stddev", "slope"]


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    *rules: RuleConfig, sink: Sink | None = None, **config: Any
) -> tuple[AggregateProcessor, Sink, Telemetry, Clock]:
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "aggregate")
    out = sink or Sink()
    clock = Clock()
    proc = AggregateProcessor(
        settings, AggregateConfig(rules=list(rules), **config), out, clock=clock, run_timer=False
    )
    return proc, out, tel, clock


def gauge(name: str, t: float, v: float, labels: Labels = ()) -> Point:
    return Point(name, Kind.GAUGE, labels, int(t * 1e9), value=v)


def counter(
    name: str, t: float, v: float, labels: Labels = (), cumulative: bool = False, start: float = 0.0
) -> Point:
    temporality = Temporality.CUMULATIVE if cumulative else Temporality.DELTA
    return Point(
        name,
        Kind.SUM,
        labels,
        int(t * 1e9),
        value=v,
        temporality=temporality,
        monotonic=True,
        start_time_unix_nano=int(start * 1e9),
    )


def outputs(sink: Sink) -> dict[tuple[str, Labels], Point]:
    return {(p.name, p.labels): p for p in sink.points()}


def metric(tel: Telemetry, name: str, **labels: str) -> float:
    return tel.value(name, **labels)


async def close_window(proc: AggregateProcessor, clock: Clock, end: float) -> None:
    clock.now = end
    await proc.tick()


def test_config_validation() -> None:
    assert AggregateConfig().validate() == []
    assert AggregateConfig(rules=[RuleConfig(match=["a"])]).validate() == []
    bad = AggregateConfig(
        rules=[
            RuleConfig(match=[], intervals=[Duration(7 * 60.0)], by=["a"], without=["b"]),
            RuleConfig(match=["x"], intervals=[Duration(300.0), Duration(450.0)], quantiles=[2.0]),
            RuleConfig(match=["x"], intervals=[Duration(60.0)], outputs=[]),
        ],
        max_series=0,
        max_buckets=1,
    )
    problems = dict(bad.validate())
    assert "rules::0::match" in problems
    assert problems["rules::0::intervals::0"].startswith("must be between 1s and 1d and divide a day")
    assert problems["rules::0::without"] == "give by or without, not both"
    assert problems["rules::1::intervals::1"] == "must be a multiple of the shortest, 300s"
    assert "rules::1::quantiles::0" in problems
    assert "rules::2::outputs" in problems
    assert {"max_series", "max_buckets"} <= problems.keys()


async def test_gauge_outputs_exact_against_numpy() -> None:
    rule = RuleConfig(match=["cpu.*"], intervals=[Duration(60.0)], by=["host"], outputs=ALL_VALUE_OUTPUTS)
    proc, sink, _, clock = make(rule)
    rng = np.random.default_rng(1)
    # Two pods of one host: `by: [host]` aggregates the pod away, so both series are one group.
    times = np.sort(rng.uniform(T0, T0 + 59.0, size=200))
    values = rng.normal(50.0, 12.0, size=200) + 0.3 * (times - T0)
    points = [
        gauge("cpu.load", t, v, (("host", "h1"), ("pod", f"p{i % 2}")))
        for i, (t, v) in enumerate(zip(times, values, strict=True))
    ]
    clock.now = T0 + 30.0
    for i in range(0, 200, 50):
        await proc.consume(MetricBatch(tuple(points[i : i + 50])))
    assert sink.points() == []  # aggregated and not kept; nothing before the window ends
    await close_window(proc, clock, T0 + 60.0)
    got = outputs(sink)
    prefix = "cpu.load.1m_by_host"
    labels = (("host", "h1"),)
    value = {o: got[(f"{prefix}.{o}", labels)].value for o in ALL_VALUE_OUTPUTS}
    assert value["count"] == 200
    assert value["sum"] == pytest.approx(np.sum(values), rel=1e-12)
    assert value["avg"] == pytest.approx(np.mean(values), rel=1e-12)
    assert value["min"] == np.min(values)
    assert value["max"] == np.max(values)
    assert value["last"] == values[np.argmax(times)]
    assert value["stddev"] == pytest.approx(np.std(values), rel=1e-9)
    # Point timestamps are whole nanoseconds: fit against what was sent.
    sent_t = np.array([p.time_unix_nano for p in points]) / 1e9 - T0
    assert value["slope"] == pytest.approx(np.polyfit(sent_t, values, 1)[0], rel=1e-9)
    assert {p.time_unix_nano for p in sink.points()} == {int((T0 + 60.0) * 1e9)}
    assert all(p.kind is Kind.GAUGE for p in sink.points())


async def test_counter_delta_increase_rate_and_delta_statistics() -> None:
    rule = RuleConfig(
        match=["http.requests"],
        intervals=[Duration(60.0)],
        without=["pod"],
        outputs=["increase", "rate", "count", "sum", "avg", "min", "max", "stddev"],
    )
    proc, sink, _, clock = make(rule)
    rng = np.random.default_rng(2)
    deltas = rng.integers(0, 100, size=60).astype(float)
    clock.now = T0 + 1.0
    batch = tuple(
        counter("http.requests", T0 + i, d, (("code", "200"), ("pod", f"p{i % 3}")))
        for i, d in enumerate(deltas)
    )
    await proc.consume(MetricBatch(batch))
    await close_window(proc, clock, T0 + 60.0)
    got = {p.name.rsplit(".", 1)[1]: p.value for p in sink.points()}
    assert {p.labels for p in sink.points()} == {(("code", "200"),)}
    assert got["increase"] == np.sum(deltas)
    assert got["rate"] == pytest.approx(np.sum(deltas) / 60.0, rel=1e-12)
    assert got["count"] == 60
    assert got["avg"] == pytest.approx(np.mean(deltas), rel=1e-12)
    assert got["min"] == np.min(deltas)
    assert got["max"] == np.max(deltas)
    assert got["stddev"] == pytest.approx(np.std(deltas), rel=1e-9)


async def test_cumulative_counter_increase_survives_a_reset() -> None:
    rule = RuleConfig(match=["jobs.done"], intervals=[Duration(60.0)], outputs=["increase", "rate"])
    proc, sink, _, clock = make(rule)
    # A counter older than the processor: its first point is the baseline only. At index 5 the process
    # restarts (the value drops): the new value is the increase from zero.
    totals = [1000.0, 1010.0, 1025.0, 1025.0, 1040.0, 7.0, 19.0, 30.0]
    clock.now = T0 + 1.0
    points = [
        counter("jobs.done", T0 + i, v, cumulative=True, start=T0 - 3600.0) for i, v in enumerate(totals)
    ]
    for p in points:
        await proc.consume(MetricBatch((p,)))
    await close_window(proc, clock, T0 + 60.0)
    diffs = np.diff(totals)
    expected = float(np.sum(np.where(diffs >= 0, diffs, np.array(totals[1:]))))
    got = {p.name: p.value for p in sink.points()}
    assert got["jobs.done.1m.increase"] == expected == 70.0
    assert got["jobs.done.1m.rate"] == pytest.approx(expected / 60.0)


async def test_cumulative_counter_born_after_start_counts_its_first_value() -> None:
    proc, sink, _, clock = make(RuleConfig(match=["c"], outputs=["increase"]))
    clock.now = T0 + 5.0
    await proc.consume(MetricBatch((counter("c", T0 + 5.0, 4.0, cumulative=True, start=T0 + 2.0),)))
    await proc.consume(MetricBatch((counter("c", T0 + 6.0, 9.0, cumulative=True, start=T0 + 2.0),)))
    await close_window(proc, clock, T0 + 60.0)
    assert sink.values("c.1m.increase") == [9.0]


async def test_by_and_without_make_the_groups_and_names() -> None:
    by = RuleConfig(match=["m"], by=["route"], outputs=["sum"], keep_input=True)
    without = RuleConfig(match=["m"], without=["pod"], outputs=["sum"])
    proc, sink, _, clock = make(by, without)
    clock.now = T0 + 1.0
    batch = (
        gauge("m", T0 + 1, 1.0, (("code", "200"), ("pod", "a"), ("route", "/x"))),
        gauge("m", T0 + 1, 2.0, (("code", "500"), ("pod", "b"), ("route", "/x"))),
        gauge("m", T0 + 1, 4.0, (("code", "200"), ("pod", "c"), ("route", "/y"))),
        gauge("m", T0 + 1, 8.0, (("code", "200"), ("pod", "d"), ("route", "/y"))),
    )
    await proc.consume(MetricBatch(batch))
    raw = sink.points()
    assert raw == list(batch)  # one rule keeps its input: the points pass on
    sink.batches.clear()
    await close_window(proc, clock, T0 + 60.0)
    got = {(p.name, p.labels): p.value for p in sink.points()}
    assert got == {
        ("m.1m_by_route.sum", (("route", "/x"),)): 3.0,
        ("m.1m_by_route.sum", (("route", "/y"),)): 12.0,
        ("m.1m_without_pod.sum", (("code", "200"), ("route", "/x"))): 1.0,
        ("m.1m_without_pod.sum", (("code", "500"), ("route", "/x"))): 2.0,
        ("m.1m_without_pod.sum", (("code", "200"), ("route", "/y"))): 12.0,
    }
    assert output_prefix("http.requests", 86400.0, [], ["pod"]) == "http.requests.1d_without_pod"


async def test_keep_input_false_drops_matched_points_and_passes_the_rest() -> None:
    proc, sink, tel, clock = make(RuleConfig(match=["agg.*"], outputs=["count"]))
    clock.now = T0 + 1.0
    other = gauge("other", T0, 1.0)
    await proc.consume(MetricBatch((gauge("agg.a", T0, 1.0), other, gauge("agg.b", T0, 2.0))))
    assert sink.points() == [other]
    assert metric(tel, "processor_dropped_points_total", reason="aggregated") == 2


async def test_windows_are_aligned_to_the_clock_and_coarse_ones_merge_exactly() -> None:
    rule = RuleConfig(
        match=["g"], intervals=[Duration(60.0), Duration(300.0)], outputs=["count", "avg", "stddev", "slope"]
    )
    proc, sink, _, clock = make(rule)
    rng = np.random.default_rng(3)
    start = T0 + 30.0  # data starts mid-minute: the first window still ends on the minute
    all_t: list[float] = []
    all_v: list[float] = []
    per_minute: list[tuple[float, list[float]]] = []
    t = start
    while t < T0 + 300.0:
        minute_end = (math.floor(t / 60.0) + 1) * 60.0
        values = []
        while t < minute_end:
            v = float(rng.normal(10.0, 3.0))
            clock.now = t
            await proc.consume(MetricBatch((gauge("g", t, v),)))
            all_t.append(t)
            all_v.append(v)
            values.append(v)
            t += 7.5
        per_minute.append((minute_end, values))
        await close_window(proc, clock, minute_end + 0.25)
    minute_points = [p for p in sink.points() if p.name == "g.1m.count"]
    assert [p.time_unix_nano for p in minute_points] == [int(end * 1e9) for end, _ in per_minute]
    assert [p.value for p in minute_points] == [len(v) for _, v in per_minute]
    five = {p.name: p for p in sink.points() if p.name.startswith("g.5m.")}
    assert {p.time_unix_nano for p in five.values()} == {int((T0 + 300.0) * 1e9)}
    assert five["g.5m.count"].value == len(all_v)
    assert five["g.5m.avg"].value == pytest.approx(np.mean(all_v), rel=1e-12)
    assert five["g.5m.stddev"].value == pytest.approx(np.std(all_v), rel=1e-9)
    assert five["g.5m.slope"].value == pytest.approx(np.polyfit(np.array(all_t) - T0, all_v, 1)[0], rel=1e-9)


async def test_late_points_are_counted_and_passed_on_raw() -> None:
    proc, sink, tel, clock = make(RuleConfig(match=["g"], outputs=["count"]), max_delay=Duration(5.0))
    clock.now = T0 + 61.0
    await proc.tick()
    late = gauge("g", T0 + 50.0, 1.0)  # stamped in the window that ended (and beyond max_delay)
    in_time = gauge("g", T0 + 58.0, 2.0)  # within max_delay of the new window: folded into it
    await proc.consume(MetricBatch((late, in_time)))
    assert sink.points() == [late]
    assert metric(tel, "aggregate_late_points_total") == 1
    await close_window(proc, clock, T0 + 120.0)
    assert sink.values("g.1m.count") == [1.0]


async def test_max_series_overflow_is_counted_and_passed_on() -> None:
    proc, sink, tel, clock = make(RuleConfig(match=["g"], by=["k"], outputs=["count"]), max_series=3)
    clock.now = T0 + 1.0
    batch = tuple(gauge("g", T0, 1.0, (("k", str(i)),)) for i in range(5))
    await proc.consume(MetricBatch(batch))
    assert sink.points() == list(batch[3:])
    assert metric(tel, "aggregate_overflow_points_total") == 2
    await close_window(proc, clock, T0 + 60.0)
    assert sorted(p.labels for p in sink.points() if p.name == "g.1m_by_k.count") == [
        (("k", "0"),),
        (("k", "1"),),
        (("k", "2"),),
    ]


def hist_point(name: str, values: np.ndarray, t: float, labels: Labels = ()) -> Point:
    h = exphist.from_values(values, max_buckets=2048)
    return Point(name, Kind.HISTOGRAM, labels, int(t * 1e9), histogram=h, unit="s")


@pytest.mark.parametrize("seed", [4, 5])
async def test_quantiles_and_merged_histogram_within_the_bound(seed: int) -> None:
    rule = RuleConfig(
        match=["lat"],
        intervals=[Duration(60.0), Duration(300.0)],
        outputs=["quantiles", "histogram", "count", "sum", "min", "max"],
        quantiles=[0.5, 0.9, 0.99],
    )
    proc, sink, _, clock = make(rule, max_buckets=2048)
    rng = np.random.default_rng(seed)
    chunks = [rng.lognormal(-3.0, 1.0, size=500) for _ in range(30)]  # 10 s flushes over 5 minutes
    for i, values in enumerate(chunks):
        t = T0 + 10.0 * i + 5.0
        clock.now = t
        await proc.consume(MetricBatch((hist_point("lat", values, t, (("pod", "a"),)),)))
        if (i + 1) % 6 == 0:
            await close_window(proc, clock, T0 + 10.0 * (i + 1))
    allv = np.concatenate(chunks)
    five = [p for p in sink.points() if p.name.startswith("lat.5m.")]
    h = next(p for p in five if p.kind is Kind.HISTOGRAM).histogram
    assert h is not None and h.count == len(allv)
    bound = exphist.relative_error(h.scale)
    assert bound < 0.01
    for p in five:
        if p.name == "lat.5m.quantile":
            q = float(dict(p.labels)["quantile"])
            exact = float(np.quantile(allv, q, method="inverted_cdf"))
            assert abs(p.value - exact) <= bound * exact
    stats = {p.name: p.value for p in five if p.kind is Kind.GAUGE and p.name != "lat.5m.quantile"}
    assert stats["lat.5m.count"] == len(allv)
    assert stats["lat.5m.sum"] == pytest.approx(np.sum(allv), rel=1e-9)
    assert stats["lat.5m.min"] == np.min(allv)
    assert stats["lat.5m.max"] == np.max(allv)
    minute = [
        p for p in sink.points() if p.name == "lat.1m.quantile" and dict(p.labels)["quantile"] == "0.99"
    ]
    assert len(minute) == 5


async def test_cumulative_and_explicit_histograms_add_their_increase() -> None:
    rule = RuleConfig(match=["lat", "rpc"], outputs=["count", "sum", "max"])
    proc, sink, _, clock = make(rule)
    rng = np.random.default_rng(6)
    a, b, c = (rng.lognormal(-3.0, 1.0, size=n) for n in (50, 80, 30))
    clock.now = T0 + 1.0
    born = int((T0 + 0.5) * 1e9)  # started after the processor: its first histogram counts whole
    first = exphist.from_values(a, max_buckets=2048)
    second = exphist.merge(first, exphist.from_values(b, max_buckets=2048), max_buckets=2048)
    after_reset = exphist.from_values(c, max_buckets=2048)  # the process restarted: fewer than before
    for h in (first, second, after_reset):
        p = Point("lat", Kind.HISTOGRAM, (), int(clock.now * 1e9), start_time_unix_nano=born, histogram=h,
                  temporality=Temporality.CUMULATIVE)  # fmt: skip
        await proc.consume(MetricBatch((p,)))
        clock.now += 1.0
    # An OTLP explicit-bucket delta histogram: count and sum exact, max as sent.
    explicit = ExplicitHistogram(bounds=(0.1, 1.0), counts=(3, 4, 1), sum=4.5, min=0.01, max=2.0)
    await proc.consume(
        MetricBatch((Point("rpc", Kind.HISTOGRAM, (), int(clock.now * 1e9), explicit=explicit),))
    )
    await close_window(proc, clock, T0 + 60.0)
    got = {p.name: p.value for p in sink.points()}
    everything = np.concatenate([a, b, c])
    assert got["lat.1m.count"] == len(everything)
    assert got["lat.1m.sum"] == pytest.approx(np.sum(everything), rel=1e-9)
    assert got["lat.1m.max"] == max(np.max(a), np.max(b), np.max(c))
    assert got["rpc.1m.count"] == 8 and got["rpc.1m.sum"] == pytest.approx(4.5) and got["rpc.1m.max"] == 2.0


async def test_integer_cumulative_counter_values() -> None:
    proc, sink, _, clock = make(RuleConfig(match=["c"], outputs=["increase"]))
    clock.now = T0 + 1.0
    for i, v in enumerate((10, 15, 21)):  # OTLP as_int values arrive as ints
        p = Point("c", Kind.SUM, (), int((T0 + i) * 1e9), value=v, temporality=Temporality.CUMULATIVE)
        await proc.consume(MetricBatch((p,)))
    await close_window(proc, clock, T0 + 60.0)
    assert sink.values("c.1m.increase") == [11.0]


async def test_refused_window_outputs_are_kept_resent_and_refuse_input_meanwhile() -> None:
    sink = Sink()
    proc, _, tel, clock = make(RuleConfig(match=["g"], outputs=["count"]), sink=sink)
    clock.now = T0 + 1.0
    await proc.consume(MetricBatch((gauge("g", T0 + 1.0, 1.0),)))
    sink.refuse = True
    with pytest.raises(Backpressure):
        await close_window(proc, clock, T0 + 60.0)
    with pytest.raises(Backpressure):  # nothing taken while the window waits
        await proc.consume(MetricBatch((gauge("g", T0 + 61.0, 5.0),)))
    assert metric(tel, "processor_incoming_points_total") == 1
    sink.refuse = False
    await proc.consume(MetricBatch((gauge("g", T0 + 61.0, 5.0),)))
    assert sink.values("g.1m.count") == [1.0]
    await close_window(proc, clock, T0 + 120.0)
    assert sink.values("g.1m.count") == [1.0, 1.0]


async def test_refusal_of_raw_points_folds_nothing() -> None:
    sink = Sink()
    proc, _, _, clock = make(RuleConfig(match=["g"], outputs=["count"], keep_input=True), sink=sink)
    clock.now = T0 + 1.0
    sink.refuse = True
    with pytest.raises(Backpressure):
        await proc.consume(MetricBatch((gauge("g", T0 + 1.0, 1.0),)))
    sink.refuse = False
    await proc.consume(MetricBatch((gauge("g", T0 + 1.0, 1.0),)))  # the sender's retry
    await close_window(proc, clock, T0 + 60.0)
    assert sink.values("g.1m.count") == [1.0]


async def test_shutdown_sends_the_windows_being_filled() -> None:
    rule = RuleConfig(match=["c"], intervals=[Duration(60.0), Duration(3600.0)], outputs=["increase", "rate"])
    proc, sink, _, clock = make(rule)
    clock.now = T0 + 70.0
    await proc.consume(MetricBatch((counter("c", T0 + 70.0, 6.0),)))
    clock.now = T0 + 90.0
    await proc.shutdown()
    got = {p.name: p.value for p in sink.points()}
    assert got["c.1m.increase"] == 6.0 and got["c.1h.increase"] == 6.0
    assert got["c.1m.rate"] == pytest.approx(6.0 / 30.0)
    assert got["c.1h.rate"] == pytest.approx(6.0 / 90.0)
    await proc.shutdown()  # idempotent
    assert len(sink.points()) == 4


async def test_non_finite_values_are_counted_not_folded() -> None:
    proc, sink, tel, clock = make(RuleConfig(match=["g"], outputs=["count", "sum"]))
    clock.now = T0 + 1.0
    bad = gauge("g", T0, math.nan)
    await proc.consume(MetricBatch((bad, gauge("g", T0, 2.0))))
    assert sink.points() == [bad]
    assert metric(tel, "aggregate_ignored_points_total", reason="non_finite") == 1
    await close_window(proc, clock, T0 + 60.0)
    assert sink.values("g.1m.sum") == [2.0]


async def test_idle_groups_expire() -> None:
    proc, sink, tel, clock = make(RuleConfig(match=["g"], by=["k"], outputs=["count"]))
    clock.now = T0 + 1.0
    await proc.consume(MetricBatch((gauge("g", T0, 1.0, (("k", "a"),)),)))
    assert metric(tel, "aggregate_groups") == 1
    for minute in range(1, 4):
        await close_window(proc, clock, T0 + 60.0 * minute)
    assert metric(tel, "aggregate_groups") == 0
    clock.now = T0 + 181.0
    await proc.consume(MetricBatch((gauge("g", T0 + 181.0, 1.0, (("k", "a"),)),)))
    await close_window(proc, clock, T0 + 240.0)
    assert sink.values("g.1m_by_k.count") == [1.0, 1.0]


async def test_a_window_of_many_groups_is_sent_whole_in_chunks() -> None:
    rule = RuleConfig(match=["g"], intervals=[Duration(60.0), Duration(300.0)], by=["k"], outputs=["sum"])
    proc, sink, _, clock = make(rule)
    clock.now = T0 + 1.0
    await proc.consume(MetricBatch(tuple(gauge("g", T0, float(i), (("k", str(i)),)) for i in range(4500))))
    await close_window(proc, clock, T0 + 60.0)
    # The next window's points, taken after the swap at the boundary, stay out of the first window.
    clock.now = T0 + 61.0
    await proc.consume(MetricBatch((gauge("g", T0 + 61.0, 1000.0, (("k", "0"),)),)))
    first = {dict(p.labels)["k"]: p.value for p in sink.points() if p.name == "g.1m_by_k.sum"}
    assert len(first) == 4500 and first["0"] == 0.0 and first["4499"] == 4499.0
    await close_window(proc, clock, T0 + 300.0)
    five = {dict(p.labels)["k"]: p.value for p in sink.points() if p.name == "g.5m_by_k.sum"}
    assert len(five) == 4500 and five["0"] == 1000.0 and five["7"] == 7.0


async def test_the_timer_sends_each_window_at_its_end_on_the_wall_clock() -> None:
    tel = Telemetry()
    sink = Sink()
    config = AggregateConfig(rules=[RuleConfig(match=["g"], intervals=[Duration(1.0)], outputs=["count"])])
    proc = AggregateProcessor(component_settings(tel, ComponentKind.PROCESSOR, "aggregate"), config, sink)
    await proc.start()
    try:
        await proc.consume(MetricBatch((gauge("g", time.time(), 1.0),)))
        [p] = await wait_until(lambda: sink.points(), "the window's count", timeout_s=30)
        assert p.name == "g.1s.count" and p.value == 1.0
        assert p.time_unix_nano % 1_000_000_000 == 0  # stamped with the window's end, on a whole second
    finally:
        await proc.shutdown()


def test_factory_registers_the_type() -> None:
    assert factory.type == "aggregate"
    assert factory.config_class is AggregateConfig


# -- end to end: StatsD client → statsd receiver → aggregate → remote-write → a real Prometheus ---------


async def test_statsd_to_prometheus_through_aggregate(
    prometheus: PrometheusServer, agents: AgentGraph
) -> None:
    port = free_tcp_udp_port()
    rules = [
        {"match": ["app.requests"], "intervals": ["2s"], "outputs": ["increase", "rate", "count"]},
        {"match": ["app.temperature"], "intervals": ["2s"], "outputs": ["avg", "min", "max", "last"]},
        {
            "match": ["app.latency"],
            "intervals": ["2s"],
            "outputs": ["quantiles", "count"],
            "quantiles": [0.99],
        },
    ]
    await agents.start(
        to_remote_write(
            prometheus,
            {"statsd": {"udp": f"127.0.0.1:{port}", "flush_interval": "1s"}},
            {"aggregate": {"rules": rules}},
        )
    )
    client = statsd.StatsClient("127.0.0.1", port, prefix="app")
    for _ in range(40):
        client.incr("requests", 3)
    client.gauge("temperature", 22.5)
    for _ in range(100):
        client.timing("latency", 50)  # ms: every observation the same, so any window's quantile is 50 ms

    async with aiohttp.ClientSession() as session:

        async def value(expr: str) -> float | None:
            result = await prom_query(session, prometheus, expr)
            return float(result[0]["value"][1]) if result else None

        async def equals(expr: str, expected: float) -> bool:
            got = await value(expr)
            return got is not None and math.isclose(got, expected, rel_tol=1e-9)

        # Every increment is in exactly one window, however the flushes and windows fall.
        increase = "sum(sum_over_time(app_requests_2s_increase[10m]))"
        await wait_until(lambda: equals(increase, 120.0), f"{increase} == 120", timeout_s=60)
        rate = await value("sum(sum_over_time(app_requests_2s_rate[10m])) * 2")
        assert rate is not None and math.isclose(rate, 120.0)
        samples = "sum(sum_over_time(app_latency_2s_count[10m]))"
        await wait_until(lambda: equals(samples, 100.0), f"{samples} == 100", timeout_s=60)
        for output in ("avg", "min", "max", "last"):
            expr = f"max_over_time(app_temperature_2s_{output}[10m])"

            async def temperature(e: str = expr) -> bool:
                return await equals(e, 22.5)

            await wait_until(temperature, f"{expr} == 22.5", timeout_s=60)
        p99 = await value('max_over_time(app_latency_2s_quantile_seconds{quantile="0.99"}[10m])')
        assert p99 is not None and abs(p99 - 0.05) <= exphist.relative_error(6) * 0.05
        # keep_input is false: the raw series never reach Prometheus (the cardinality saving).
        raw = '{__name__=~"app_requests_total|app_temperature|app_latency_seconds_count"}'
        assert await prom_query(session, prometheus, raw) == []


async def test_gauge_quantiles_and_chained_coarse_windows_against_numpy() -> None:
    """1m → 5m → 15m: each coarser window is made of the one below (chained), gauges' quantiles from
    their samples within the histogram's relative error of numpy's inverted_cdf."""
    rule = RuleConfig(
        match=["g"],
        intervals=[Duration(60.0), Duration(300.0), Duration(900.0)],
        outputs=["count", "sum", "min", "max", "last", "stddev", "quantiles", "histogram"],
        quantiles=[0.05, 0.5, 0.95],
    )
    proc, sink, tel, clock = make(rule, max_buckets=2048)
    rng = np.random.default_rng(21)
    values: list[float] = []
    for m in range(15):
        vs = rng.normal(0.0, 20.0, size=30) * (1 + m / 5)  # both signs, widening
        for k, v in enumerate(vs.tolist()):
            t = T0 + 60.0 * m + 2.0 * k
            clock.now = t
            await proc.consume(MetricBatch((gauge("g", t, v),)))
            values.append(v)
        await close_window(proc, clock, T0 + 60.0 * (m + 1))
    assert len(sink.values("g.1m.count")) == 15 and len(sink.values("g.5m.count")) == 3
    assert metric(tel, "aggregate_windows_total") == 15 + 3 + 1
    for text, span in (("5m", 300.0), ("15m", 900.0)):
        got = [p for p in sink.points() if p.name.startswith(f"g.{text}.")]
        last_end = max(p.time_unix_nano for p in got)
        got = [p for p in got if p.time_unix_nano == last_end]
        v = np.array(values[-round(span / 2.0) :])  # 30 values a minute
        stats = {p.name.rsplit(".", 1)[1]: p.value for p in got if p.kind is Kind.GAUGE}
        assert stats["count"] == v.size and stats["last"] == v[-1]
        assert (stats["min"], stats["max"]) == (np.min(v), np.max(v))
        assert stats["sum"] == pytest.approx(np.sum(v), rel=1e-12, abs=1e-9)
        assert stats["stddev"] == pytest.approx(np.std(v), rel=1e-9)
        h = next(p.histogram for p in got if p.kind is Kind.HISTOGRAM)
        assert h is not None and h.count == v.size
        bound = exphist.relative_error(h.scale)
        assert bound < 0.01
        quantiles = {float(dict(p.labels)["quantile"]): p.value for p in got if p.name.endswith(".quantile")}
        assert set(quantiles) == {0.05, 0.5, 0.95}
        for q, estimate in quantiles.items():
            exact = float(np.quantile(v, q, method="inverted_cdf"))
            assert abs(estimate - exact) <= bound * abs(exact) * (1 + 1e-9)


async def test_coarse_windows_that_are_not_multiples_of_each_other() -> None:
    """1m, 2m, 3m: 3m is no multiple of 2m, so each merges the minute (no chain); counts stay exact."""
    rule = RuleConfig(
        match=["g"], intervals=[Duration(60.0), Duration(120.0), Duration(180.0)], outputs=["count", "sum"]
    )
    proc, sink, _, clock = make(rule)
    for m in range(6):
        clock.now = T0 + 60.0 * m + 1.0
        await proc.consume(MetricBatch(tuple(gauge("g", clock.now, float(m)) for _ in range(m + 1))))
        await close_window(proc, clock, T0 + 60.0 * (m + 1))
    assert sink.values("g.2m.count") == [1 + 2, 3 + 4, 5 + 6]
    assert sink.values("g.3m.count") == [1 + 2 + 3, 4 + 5 + 6]
    assert sink.values("g.3m.sum") == [0 * 1 + 1 * 2 + 2 * 3, 3 * 4 + 4 * 5 + 5 * 6]
