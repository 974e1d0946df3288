"""Gauges as observations: the percentiles processor's opt-in ``gauges`` globs.

The main test posts gauge values over real HTTP with aiohttp's client to the JSON ``http`` receiver,
whose consumer is the processor (on an injected clock, ticked by hand), whose consumer keeps every
point. Expected quantiles are numpy's with ``method="inverted_cdf"`` (the rank rule the processor
estimates), within the error bound the processor states (``percentiles_worst_error_ratio``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pytest

from agent import exphist
from agent.component import Backpressure, ComponentKind, Signal
from agent.confmodel import Decoder, Duration
from agent.model import Kind, MetricBatch, Point
from agent.telemetry import Telemetry
from processors.percentiles import QUANTILE_SUFFIX, PercentilesConfig, PercentilesProcessor
from receivers.http import HttpConfig, HttpReceiver
from tests.conftest import Sink, component_settings

T0 = 1_700_000_000.0  # a multiple of 10 s: the first emit boundary is T0 + 10
QS = [0.5, 0.9, 0.95, 0.99]


class ObservedSink(Sink):
    def quantiles(self) -> dict[tuple[str, str, str], float]:
        """(observed name, quantile, window) -> value of the quantile gauges received."""
        return {
            (
                p.name.removesuffix(QUANTILE_SUFFIX),
                dict(p.labels)["quantile"],
                dict(p.labels)["window"],
            ): p.value
            for p in self.points()
            if p.name.endswith(QUANTILE_SUFFIX)
        }

    def gauge_values(self, name: str) -> list[float]:
        return [p.value for p in self.points() if p.name == name and p.kind is Kind.GAUGE]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Pipeline:
    receiver: HttpReceiver
    proc: PercentilesProcessor
    sink: ObservedSink
    tel: Telemetry
    clock: Clock
    session: aiohttp.ClientSession

    async def post(self, items: list[dict[str, Any]]) -> None:
        url = f"http://127.0.0.1:{self.receiver.port}/v1/metrics"
        body = json.dumps(items).encode()
        headers = {"Content-Type": "application/json"}
        async with self.session.post(url, data=body, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
            assert answer["accepted"] == len(items), answer

    async def emit(self) -> None:
        """Advance to the next 10 s boundary and emit (the data arrived within the slice before it)."""
        self.clock.now += 10.0
        await self.proc.tick()


@pytest.fixture
async def pipeline() -> AsyncIterator[Any]:
    made: list[Pipeline] = []

    async def build(config: PercentilesConfig) -> Pipeline:
        assert config.validate() == []
        tel = Telemetry()
        sink = ObservedSink()
        clock = Clock()
        proc = PercentilesProcessor(
            component_settings(tel, ComponentKind.PROCESSOR, "percentiles"),
            config,
            sink,
            clock=clock,
            run_timer=False,
        )
        receiver = HttpReceiver(
            component_settings(tel, ComponentKind.RECEIVER, "http"),
            HttpConfig(endpoint="127.0.0.1:0"),
            {Signal.METRICS: proc},
        )
        p = Pipeline(receiver, proc, sink, tel, clock, aiohttp.ClientSession())
        made.append(p)
        await proc.start()
        await receiver.start()
        return p

    yield build
    for p in made:
        await p.session.close()
        await p.receiver.shutdown()
        await p.proc.shutdown()


def latencies(n: int, seed: int) -> np.ndarray:
    """Request latencies in seconds: lognormal around 120 ms, narrow enough for the default 160 buckets
    to hold scale 6 (a 0.54 % bound)."""
    return np.random.default_rng(seed).lognormal(mean=np.log(0.12), sigma=0.2, size=n)


async def post_gauges(p: Pipeline, name: str, values: np.ndarray, per_request: int = 100) -> None:
    for start in range(0, len(values), per_request):
        chunk = values[start : start + per_request]
        await p.post([{"name": name, "value": float(v), "tags": {"route": "/a"}} for v in chunk])


async def test_posted_gauges_get_quantiles_within_the_stated_error(pipeline: Any) -> None:
    p: Pipeline = await pipeline(
        PercentilesConfig(gauges=["api.*"], windows=[Duration(60.0), Duration(300.0)], quantiles=QS)
    )
    data = latencies(1000, seed=42)
    other = latencies(50, seed=43)
    await post_gauges(p, "api.latency", data)
    await post_gauges(p, "queue.depth", other)  # not matched by the globs
    await p.emit()

    bound = p.tel.value("percentiles_worst_error_ratio")
    assert 0 < bound <= exphist.relative_error(6) <= 0.01  # the bound the processor states, at its defaults
    got = p.sink.quantiles()
    assert {k for k in got} == {("api.latency", f"{q:g}", w) for q in QS for w in ("1m", "5m")}
    exact = np.percentile(data, [q * 100 for q in QS], method="inverted_cdf")
    for q, want in zip(QS, exact, strict=True):
        for window in ("1m", "5m"):
            value = got[("api.latency", f"{q:g}", window)]
            assert abs(value - want) / want <= bound + 1e-12, (q, window, value, want)
    # The quantile gauges keep the gauge's labels and add quantile and window.
    quantile_points = [pt for pt in p.sink.points() if pt.name == "api.latency" + QUANTILE_SUFFIX]
    assert all(dict(pt.labels)["route"] == "/a" for pt in quantile_points)
    # Every gauge passed on unchanged, matched or not.
    assert sorted(p.sink.gauge_values("api.latency")) == sorted(float(v) for v in data)
    assert sorted(p.sink.gauge_values("queue.depth")) == sorted(float(v) for v in other)
    assert p.tel.value("percentiles_series") == 1


async def test_without_globs_gauges_are_passed_on_and_nothing_else(pipeline: Any) -> None:
    p: Pipeline = await pipeline(PercentilesConfig())
    data = latencies(200, seed=5)
    await post_gauges(p, "api.latency", data)
    await p.emit()
    assert p.sink.quantiles() == {}
    assert [pt.kind for pt in p.sink.points()] == [Kind.GAUGE] * len(data)
    assert sorted(p.sink.gauge_values("api.latency")) == sorted(float(v) for v in data)
    assert p.tel.value("percentiles_series") == 0


async def test_exclude_applies_to_gauges_and_include_does_not_select_them(pipeline: Any) -> None:
    config = PercentilesConfig(
        gauges=["api.*"], include=["nothing.*"], exclude=["api.internal.*"], windows=[Duration(60.0)]
    )
    p: Pipeline = await pipeline(config)
    await post_gauges(p, "api.latency", latencies(100, seed=1))
    await post_gauges(p, "api.internal.latency", latencies(100, seed=2))
    await p.emit()
    assert {name for name, _, _ in p.sink.quantiles()} == {"api.latency"}


def direct(config: PercentilesConfig) -> tuple[PercentilesProcessor, ObservedSink, Telemetry, Clock]:
    tel = Telemetry()
    sink = ObservedSink()
    clock = Clock()
    proc = PercentilesProcessor(
        component_settings(tel, ComponentKind.PROCESSOR, "percentiles"),
        config,
        sink,
        clock=clock,
        run_timer=False,
    )
    return proc, sink, tel, clock


def gauge(name: str, value: float, labels: tuple[tuple[str, str], ...] = ()) -> Point:
    return Point(name, Kind.GAUGE, labels, 0, value=value, unit="s")


async def test_gauges_across_batches_and_beside_distributions_share_the_windows() -> None:
    proc, sink, _, clock = direct(
        PercentilesConfig(gauges=["lat"], windows=[Duration(60.0)], quantiles=[0.0, 0.5, 1.0])
    )
    clock.now += 1.0
    await proc.consume(MetricBatch(tuple(gauge("lat", float(v)) for v in (1.0, 2.0, 3.0))))
    await proc.consume(MetricBatch((gauge("lat", 4.0), gauge("lat", 5.0))))
    clock.now = T0 + 10.0
    await proc.tick()
    got = sink.quantiles()
    assert got[("lat", "0", "1m")] == 1.0  # q = 0 and 1 are the window's exact min and max
    assert got[("lat", "1", "1m")] == 5.0
    assert got[("lat", "0.5", "1m")] == pytest.approx(3.0, rel=exphist.relative_error(6))


async def test_non_finite_gauge_values_are_counted_and_the_rest_observed() -> None:
    proc, sink, tel, clock = direct(
        PercentilesConfig(gauges=["lat"], windows=[Duration(60.0)], quantiles=[1.0])
    )
    batch = MetricBatch((gauge("lat", float("nan")), gauge("lat", 2.0), gauge("lat", float("inf"))))
    await proc.consume(batch)
    assert tel.value("percentiles_ignored_points_total", reason="non_finite") == 2
    clock.now += 10.0
    await proc.tick()
    assert sink.quantiles() == {("lat", "1", "1m"): 2.0}
    assert len([pt for pt in sink.points() if pt.name == "lat"]) == 3  # all passed on


async def test_refused_batch_observes_nothing_and_overflow_is_counted() -> None:
    proc, sink, tel, clock = direct(PercentilesConfig(gauges=["*"], windows=[Duration(60.0)], max_series=1))
    sink.refuse = True
    with pytest.raises(Backpressure):
        await proc.consume(MetricBatch((gauge("a", 1.0),)))
    sink.refuse = False
    clock.now += 10.0
    await proc.tick()
    assert sink.quantiles() == {}  # the refused batch will be offered again: observing it now doubles it
    await proc.consume(MetricBatch((gauge("a", 1.0), gauge("b", 1.0), gauge("b", 2.0))))
    assert tel.value("percentiles_overflow_points_total") == 2
    clock.now += 10.0
    await proc.tick()
    assert {name for name, _, _ in sink.quantiles()} == {"a"}


def test_gauges_setting_is_validated() -> None:
    assert ("gauges::1", "give a non-empty metric name glob") in PercentilesConfig(
        gauges=["api.*", ""]
    ).validate()
    decoder = Decoder(lambda _: None)
    decoder.decode(PercentilesConfig, {"gauges": "api.*"}, ("processors", "percentiles"))
    assert [path for path, _ in decoder.errors] == [("processors", "percentiles", "gauges")], decoder.errors
    decoder = Decoder(lambda _: None)
    config = decoder.decode(PercentilesConfig, {"gauges": ["api.*"]}, ("processors", "percentiles"))
    assert decoder.errors == [] and list(config.gauges) == ["api.*"] and config.validate() == []
