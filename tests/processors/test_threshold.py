"""The threshold processor: rule evaluation with an injected clock (no sleeping for `for_duration`),
notifications to a real local webhook server and to a real Alertmanager, retries and a disk queue that
survives a restart."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml
from aiohttp import web

from agent import exphist
from agent.admin import AdminServer
from agent.component import Backpressure, ComponentKind, validate_config
from agent.config import build_config
from agent.confmodel import Duration
from agent.model import ExplicitHistogram, Kind, MetricBatch, Point, Summary, Temporality
from agent.registry import builtin_factories
from agent.sending import QueueConfig, RetryConfig
from agent.service import Agent
from agent.telemetry import Telemetry
from processors.threshold import (
    AlertmanagerConfig,
    RuleConfig,
    ThresholdConfig,
    ThresholdProcessor,
    WebhookConfig,
    factory,
)
from processors.threshold.engine import Engine, Notification, Timing
from processors.threshold.selector import Selector, SelectorError, name_matcher
from tests.conftest import Sink, component_settings, free_port, wait_until

T0 = 1_700_000_000.0
FAST = RetryConfig(initial_interval=0.01, max_interval=0.05, max_elapsed_time=30.0)


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def gauge(value: float, t: float, name: str = "cpu", **labels: str) -> Point:
    return Point(name, Kind.GAUGE, tuple(sorted(labels.items())), int(t * 1e9), value=value)


def rule(**kw: Any) -> RuleConfig:
    base: dict[str, Any] = {"name": "high", "metric": "cpu", "warning": 80.0}
    base.update(kw)
    return RuleConfig(**base)


def engine(*rules: RuleConfig, **timing: Any) -> Engine:
    return Engine(rules, Timing(**timing))


def step(e: Engine, now: float, *points: Point) -> list[Notification]:
    """Feed points at ``now``, evaluate every series, return what is due."""
    e.observe(points, now)
    e.evaluate(now)
    return e.due(now)


def statuses(ns: list[Notification]) -> list[list[tuple[str, str]]]:
    return [[(a.status, a.severity) for a in n.alerts] for n in ns]


# -- statistics ---------------------------------------------------------------------------------------


def test_last_value_fires_once_and_resolves_once() -> None:
    e = engine(rule())
    assert step(e, T0, gauge(50, T0)) == []
    fired = step(e, T0 + 1, gauge(90, T0 + 1))
    assert statuses(fired) == [[("firing", "warning")]]
    assert fired[0].alerts[0].value == 90
    assert fired[0].alerts[0].labels["alertname"] == "high"
    # Still above the level: the state did not change, so nothing is sent (dedup).
    assert step(e, T0 + 2, gauge(95, T0 + 2)) == []
    resolved = step(e, T0 + 100, gauge(10, T0 + 100))
    assert statuses(resolved) == [[("resolved", "warning")]]
    assert resolved[0].alerts[0].ends_at == T0 + 100
    assert step(e, T0 + 200, gauge(5, T0 + 200)) == []


@pytest.mark.parametrize(
    ("op", "value", "fires"),
    [
        (">", 80.0, False),
        (">", 80.5, True),
        (">=", 80.0, True),
        (">=", 79.9, False),
        ("<", 80.0, False),
        ("<", 79.0, True),
        ("<=", 80.0, True),
        ("<=", 80.1, False),
    ],
)
def test_comparisons(op: str, value: float, fires: bool) -> None:
    e = engine(rule(op=op))
    assert bool(step(e, T0, gauge(value, T0))) is fires


def test_warning_then_critical_then_back() -> None:
    e = engine(rule(warning=80.0, critical=95.0), group_interval_s=10.0)
    assert statuses(step(e, T0, gauge(85, T0))) == [[("firing", "warning")]]
    # A change inside group_interval waits for it.
    assert step(e, T0 + 1, gauge(99, T0 + 1)) == []
    up = step(e, T0 + 10, gauge(99, T0 + 10))
    assert statuses(up) == [[("firing", "critical")]]
    assert up[0].alerts[0].previous_severity == "warning"
    down = step(e, T0 + 20, gauge(85, T0 + 20))
    assert statuses(down) == [[("firing", "warning")]]
    assert statuses(step(e, T0 + 30, gauge(1, T0 + 30))) == [[("resolved", "warning")]]
    assert e.firing_counts == {}


def test_rate_of_delta_counter() -> None:
    e = engine(rule(statistic="rate", warning=4.0, window=60.0))
    for i in range(1, 4):  # 50 per 10 s, each point carrying its interval's start: 5/s
        t = T0 + 10 * i
        point = Point("cpu", Kind.SUM, (), int(t * 1e9), value=50.0, start_time_unix_nano=int((t - 10) * 1e9))
        out = step(e, t, point)
    series = next(iter(e.series.values()))
    assert e.statistic(series, T0 + 30) == pytest.approx(5.0)
    assert statuses(out) == [] or statuses(out) == [[("firing", "warning")]]
    assert series.state == "firing"


def test_rate_of_cumulative_counter_counts_a_reset_as_an_increase() -> None:
    e = engine(rule(statistic="rate", warning=1000.0, window=60.0))
    for t, v in ((T0, 100.0), (T0 + 10, 150.0), (T0 + 20, 20.0)):
        point = Point("cpu", Kind.SUM, (), int(t * 1e9), value=v, temporality=Temporality.CUMULATIVE)
        step(e, t, point)
    series = next(iter(e.series.values()))
    assert e.statistic(series, T0 + 20) == pytest.approx((50.0 + 20.0) / 20.0)


def test_avg_over_a_sliding_window() -> None:
    e = engine(rule(statistic="avg", warning=50.0, window=30.0), group_interval_s=1.0)
    step(e, T0, gauge(100, T0))
    step(e, T0 + 10, gauge(40, T0 + 10))
    series = next(iter(e.series.values()))
    assert e.statistic(series, T0 + 10) == pytest.approx(70.0)
    assert series.state == "firing"
    # At T0+30 the first point has left the window: only 40 remains.
    assert statuses(step(e, T0 + 30)) == [[("resolved", "warning")]]
    assert e.statistic(series, T0 + 30) == pytest.approx(40.0)


def test_percentile_merges_exponential_histograms_over_the_window() -> None:
    rng = np.random.default_rng(7)
    e = engine(rule(metric="latency", statistic="percentile", quantile=0.99, warning=0.5, window=60.0))
    batches = [rng.lognormal(-3, 1, 2000) for _ in range(3)]
    for i, values in enumerate(batches):
        t = T0 + 10 * i
        point = Point("latency", Kind.HISTOGRAM, (), int(t * 1e9), histogram=exphist.from_values(values))
        step(e, t, point)
    series = next(iter(e.series.values()))
    got = e.statistic(series, T0 + 20)
    assert got is not None
    merged = exphist.merge(
        exphist.merge(*(exphist.from_values(v) for v in batches[:2])), exphist.from_values(batches[2])
    )
    assert got == exphist.quantile(merged, 0.99)
    truth = float(np.quantile(np.concatenate(batches), 0.99, method="inverted_cdf"))
    assert got == pytest.approx(truth, rel=exphist.relative_error(merged.scale) * 1.0001)
    assert series.state == ("firing" if got > 0.5 else "inactive")


def test_percentile_of_wide_timers_keeps_the_scale_they_arrived_at() -> None:
    """Timers spanning 1 ms .. 1000 s, as the receivers build them (2048 buckets, scale <= 8): the window
    is read at their scale, not squeezed into 160 buckets (three scales coarser, ~4 % off)."""
    rng = np.random.default_rng(11)
    e = engine(rule(metric="latency", statistic="percentile", quantile=0.99, warning=1e9, window=60.0))
    batches = [np.exp(rng.uniform(math.log(1e-3), math.log(1e3), 4000)) for _ in range(3)]
    hists = [exphist.from_values(v, max_buckets=2048, max_scale=8) for v in batches]
    assert all(h.scale >= 6 for h in hists)
    for i, h in enumerate(hists):
        t = T0 + 10 * i
        step(e, t, Point("latency", Kind.HISTOGRAM, (), int(t * 1e9), histogram=h))
    series = next(iter(e.series.values()))
    got = e.statistic(series, T0 + 20)
    truth = float(np.quantile(np.concatenate(batches), 0.99, method="inverted_cdf"))
    scale = min(h.scale for h in hists)
    assert got == pytest.approx(truth, rel=exphist.relative_error(scale) * 1.0001)


def test_percentile_of_explicit_histograms_and_of_gauges() -> None:
    e = engine(
        rule(name="explicit", metric="req", statistic="percentile", quantile=0.5, warning=1.0),
        rule(name="values", metric="cpu", statistic="percentile", quantile=0.5, warning=1.0),
    )
    h = ExplicitHistogram(bounds=(1.0, 2.0, 4.0), counts=(0, 10, 10, 0), sum=50.0, min=1.5, max=3.5)
    step(e, T0, Point("req", Kind.HISTOGRAM, (), int(T0 * 1e9), explicit=h))
    step(e, T0, gauge(1.0, T0), gauge(5.0, T0), gauge(3.0, T0))
    by_rule = {s.rule.name: e.statistic(s, T0) for s in e.series.values()}
    assert by_rule["explicit"] == pytest.approx(2.0)  # the median sits at the 2.0 bound
    assert by_rule["values"] == 3.0  # nearest rank of [1, 3, 5]


def test_count_of_observations_and_of_points() -> None:
    e = engine(
        rule(name="obs", metric="latency", statistic="count", warning=100.0, window=60.0),
        rule(name="points", metric="cpu", statistic="count", warning=2.0, window=60.0),
    )
    for i in range(3):
        t = T0 + i
        hist = exphist.from_values(np.full(50, 0.1))
        step(e, t, Point("latency", Kind.HISTOGRAM, (), int(t * 1e9), histogram=hist), gauge(1, t))
    counts = {s.rule.name: e.statistic(s, T0 + 2) for s in e.series.values()}
    assert counts == {"obs": 150.0, "points": 3.0}
    assert e.firing_counts == {("obs", "warning"): 1, ("points", "warning"): 1}


# -- state machine --------------------------------------------------------------------------------------


def test_for_duration_holds_before_firing_and_a_dip_restarts_it() -> None:
    e = engine(rule(for_duration=60.0))
    assert step(e, T0, gauge(90, T0)) == []
    assert e.active()[0]["state"] == "pending"
    assert step(e, T0 + 30, gauge(90, T0 + 30)) == []
    assert step(e, T0 + 40, gauge(10, T0 + 40)) == []  # dip: back to inactive, timer restarts
    assert e.active() == []
    assert step(e, T0 + 50, gauge(90, T0 + 50)) == []
    assert step(e, T0 + 109, gauge(90, T0 + 109)) == []
    fired = step(e, T0 + 110)  # no new point: the periodic evaluation fires it
    assert statuses(fired) == [[("firing", "warning")]]
    assert fired[0].alerts[0].starts_at == T0 + 50  # when the condition began, as Prometheus' activeAt


def test_pending_that_clears_never_notifies() -> None:
    e = engine(rule(for_duration=60.0))
    step(e, T0, gauge(90, T0))
    assert step(e, T0 + 10, gauge(10, T0 + 10)) == []
    assert step(e, T0 + 100) == []


def test_hysteresis_keeps_firing_until_the_resolve_level() -> None:
    e = engine(rule(warning=None, critical=90.0, resolve=70.0))
    assert statuses(step(e, T0, gauge(95, T0))) == [[("firing", "critical")]]
    assert step(e, T0 + 100, gauge(80, T0 + 100)) == []  # below critical, above resolve: still firing
    assert e.firing_counts == {("high", "critical"): 1}
    assert statuses(step(e, T0 + 200, gauge(69, T0 + 200))) == [[("resolved", "critical")]]


def test_stale_series_resolves_and_is_forgotten() -> None:
    e = engine(rule(), stale_after_s=300.0)
    step(e, T0, gauge(90, T0, host="a"))
    assert statuses(step(e, T0 + 301)) == [[("resolved", "warning")]]
    assert e.series == {}


def test_a_forgotten_series_that_returns_fires_again() -> None:
    e = engine(rule(), stale_after_s=300.0)
    step(e, T0, gauge(90, T0, host="a"))
    assert statuses(step(e, T0 + 301)) == [[("resolved", "warning")]]
    assert e.series == {}
    # The same series key as before: a new series is watched, not the forgotten one.
    assert statuses(step(e, T0 + 310, gauge(95, T0 + 310, host="a"))) == [[("firing", "warning")]]
    assert [s.value for s in e.series.values()] == [95.0]


def test_a_point_beyond_max_series_is_counted_each_time_and_watched_once_there_is_room() -> None:
    e = engine(rule(), rule(name="low", op="<", warning=10.0), stale_after_s=300.0, max_series=1)
    step(e, T0, gauge(90, T0, host="a"))  # rule high takes the one place; rule low is refused
    step(e, T0 + 1, gauge(90, T0 + 1, host="a"))
    assert e.ignored["series_limit"] == 2
    assert [s.rule.name for s in e.series.values()] == ["high"]
    step(e, T0 + 400)  # high goes stale and is forgotten
    assert e.series == {}
    step(e, T0 + 401, gauge(5, T0 + 401, host="a"))
    assert sorted(s.rule.name for s in e.series.values()) == ["high"]  # the first selecting rule again
    assert e.ignored["series_limit"] == 3


# -- notifications ------------------------------------------------------------------------------------


def test_grouping_by_labels_with_group_wait_and_interval() -> None:
    e = engine(rule(group_by=["service"]), group_wait_s=30.0, group_interval_s=60.0)
    assert step(e, T0, gauge(90, T0, service="api", host="a")) == []
    assert (
        step(e, T0 + 10, gauge(90, T0 + 10, service="api", host="b"), gauge(90, T0 + 10, service="db")) == []
    )
    first = step(e, T0 + 30)
    assert [(n.group_labels, len(n.alerts)) for n in first] == [({"alertname": "high", "service": "api"}, 2)]
    second = step(e, T0 + 40)  # the db group started 10 s later: its group_wait ends now
    assert [(n.group_labels, len(n.alerts)) for n in second] == [({"alertname": "high", "service": "db"}, 1)]
    # host b resolves at +50; the api group last notified at +30, so it waits until +90.
    assert step(e, T0 + 50, gauge(10, T0 + 50, service="api", host="b")) == []
    later = step(e, T0 + 90)
    assert [sorted((a.labels["host"], a.status) for a in n.alerts) for n in later] == [
        [("a", "firing"), ("b", "resolved")]
    ]


def test_resolved_before_its_first_notification_is_never_sent() -> None:
    e = engine(rule(), group_wait_s=30.0)
    step(e, T0, gauge(90, T0))
    step(e, T0 + 10, gauge(10, T0 + 10))
    assert step(e, T0 + 30) == []
    assert e.groups == {}


def test_repeat_interval_reminds_of_a_still_firing_group() -> None:
    e = engine(rule(), repeat_interval_s=3600.0)
    step(e, T0, gauge(90, T0))
    assert step(e, T0 + 3599, gauge(90, T0 + 3599)) == []
    repeat = step(e, T0 + 3600, gauge(90, T0 + 3600))
    assert [(n.repeat, statuses([n])) for n in repeat] == [(True, [[("firing", "warning")]])]
    assert step(e, T0 + 3700) == []


def test_label_matchers_and_name_globs() -> None:
    sel = Selector('{env="prod", host=~"web-\\d+", region!="eu", path!~"/health.*", team=""}')
    assert sel.matches((("env", "prod"), ("host", "web-12"), ("path", "/api")))
    assert not sel.matches((("env", "prod"), ("host", "web-x")))  # regex is anchored
    assert not sel.matches((("env", "prod"), ("host", "web-1"), ("region", "eu")))
    assert not sel.matches((("env", "prod"), ("host", "web-1"), ("path", "/healthz")))
    assert not sel.matches((("env", "prod"), ("host", "web-1"), ("team", "x")))  # team="" = absent
    assert Selector("").matches((("a", "b"),))
    assert Selector('dc.name="x\\"y"').matches((("dc.name", 'x"y'),))  # StatsD-style names, escapes
    for bad in ('{env="prod"', "env=prod", 'a=~"("', 'a="1" b="2"'):
        with pytest.raises(SelectorError):
            Selector(bad)
    assert name_matcher("http.*.duration")("http.server.duration")
    assert not name_matcher("http.*.duration")("http.server.duration.max")
    assert not name_matcher("cpu")("cpu2")

    e = engine(rule(metric="cpu.*", match='{env=~"prod|stage"}'))
    step(
        e,
        T0,
        gauge(90, T0, "cpu.user", env="prod"),
        gauge(90, T0, "cpu.user", env="dev"),
        gauge(90, T0, "mem"),
    )
    assert [(s.metric, s.labels) for s in e.series.values()] == [("cpu.user", (("env", "prod"),))]


def test_config_validation_names_each_problem() -> None:
    assert validate_config(ThresholdConfig()) == []
    assert validate_config(replace(ThresholdConfig(), alertmanager=AlertmanagerConfig())) == []
    cfg = ThresholdConfig(
        rules=[
            RuleConfig(name="a", metric="m", warning=5.0, critical=1.0, resolve=9.0, match="{x=~'('}"),
            RuleConfig(name="a", metric="", summary="{value:zz}"),
        ],
        webhook=WebhookConfig(url="ftp://x"),
        group_interval=0.0,
    )
    paths = {p for p, _ in validate_config(cfg)}
    assert {
        "rules::0::match",
        "rules::0::warning",
        "rules::0::resolve",
        "rules::1::name",
        "rules::1::metric",
        "rules::1",
        "rules::1::summary",
        "webhook::url",
        "group_interval",
    } <= paths


def test_odd_input_never_raises() -> None:
    e = engine(rule(metric="*", statistic="avg"))
    points = [
        gauge(math.nan, T0),
        gauge(math.inf, T0, host="b"),
        Point("s", Kind.SUMMARY, (), int(T0 * 1e9), summary=Summary(1, 1.0)),
        Point("h", Kind.HISTOGRAM, (), 0),  # neither histogram set
        gauge(1.0, T0 + 10**6, host="future"),  # a clock ahead of ours
    ]
    step(e, T0, *points)
    step(e, T0, gauge(1.0, T0 - 100, host="future"))  # out of order
    assert e.ignored == {"not_finite": 2, "unsupported_kind": 2, "out_of_order": 1}


# -- the processor ------------------------------------------------------------------------------------


def make(
    config: ThresholdConfig, clock: Clock, tel: Telemetry | None = None, shutdown_timeout_s: float = 5.0
) -> tuple[ThresholdProcessor, Sink, Telemetry]:
    tel = tel or Telemetry()
    settings = component_settings(
        tel,
        ComponentKind.PROCESSOR,
        "threshold/test",
        telemetry_id="threshold/test@metrics",
        logger="test.threshold",
        shutdown_timeout_s=shutdown_timeout_s,
    )
    sink = Sink()
    return ThresholdProcessor(settings, config, sink, clock=clock), sink, tel


def batch(*points: Point) -> MetricBatch:
    return MetricBatch(tuple(points))


async def test_passes_batches_on_unchanged_and_exports_alert_state(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    proc, sink, tel = make(ThresholdConfig(rules=[rule(critical=95.0)]), clock)
    await proc.start()
    b = batch(gauge(99, T0, host="a"), gauge(90, T0, host="b"), gauge(1, T0, "other"))
    with caplog.at_level(logging.INFO, "test.threshold"):
        await proc.consume(b)
    assert sink.batches == [b] and sink.batches[0] is b
    assert tel.value("processor_incoming_points_total") == 3
    assert tel.value("processor_outgoing_points_total") == 3
    assert tel.value("alert_state", rule="high", severity="critical") == 1
    assert tel.value("alert_state", rule="high", severity="warning") == 1
    active = proc.status()["alerts"]
    assert sorted((a["labels"]["host"], a["severity"]) for a in active) == [
        ("a", "critical"),
        ("b", "warning"),
    ]
    assert sum("alert high firing" in r.getMessage() for r in caplog.records) == 2
    await proc.shutdown()
    await proc.shutdown()


async def test_contract_defaults_start_consume_shutdown() -> None:
    proc, sink, tel = make(ThresholdConfig(), Clock())
    await proc.shutdown()  # safe before start
    proc, sink, tel = make(ThresholdConfig(), Clock())
    await proc.start()
    await proc.consume(batch(gauge(1, T0)))
    await proc.shutdown()
    await proc.shutdown()
    assert len(sink.batches) == 1 and tel.value("processor_incoming_points_total") == 1
    assert factory.type == "threshold" and factory.kind is ComponentKind.PROCESSOR


async def test_alert_state_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    config = ThresholdConfig(
        rules=[rule(name="slow", for_duration=60.0), rule(name="fast")], state_directory=str(tmp_path)
    )
    proc, _, _ = make(config, clock)
    await proc.start()
    await proc.consume(batch(gauge(90, T0)))  # fast fires; slow is pending since T0
    await proc.tick()
    await proc.shutdown()

    clock.t = T0 + 61
    proc2, _, tel2 = make(config, clock)
    await proc2.start()
    states = {a["rule"]: a["state"] for a in proc2.status()["alerts"]}
    assert states == {"slow": "pending", "fast": "firing"}
    assert tel2.value("alert_state", rule="fast", severity="warning") == 1
    await proc2.consume(batch(gauge(90, T0 + 61)))
    # `slow` has held since T0 across the restart: it fires now, and `fast` is not notified again.
    fired = [(a.rule, a.status) for n in proc2.engine.due(clock.t, everything=True) for a in n.alerts]
    assert ("fast", "firing") not in fired
    assert {a["rule"]: a["state"] for a in proc2.status()["alerts"]} == {"slow": "firing", "fast": "firing"}
    await proc2.shutdown()


# -- webhook ------------------------------------------------------------------------------------------


class Hook:
    """A local webhook receiver; answers with ``statuses`` in turn (then 200)."""

    def __init__(self, port: int | None = None, statuses: list[int] | None = None) -> None:
        self.port = port or free_port()
        self.bodies: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.hits = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            status = self.statuses.pop(0) if self.statuses else 200
            if status == 200:
                self.bodies.append(await request.json())
            return web.Response(status=status, text="ok" if status == 200 else "no")

        app = web.Application()
        app.router.add_post("/hook", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    h = Hook()
    await h.start()
    yield h
    await h.stop()


async def test_webhook_firing_repeat_resolved(hook: Hook) -> None:
    clock = Clock()
    config = ThresholdConfig(
        rules=[rule(labels={"team": "infra"}, annotations={"runbook": "see {metric} on {labels[host]}"})],
        webhook=WebhookConfig(url=hook.url),
        repeat_interval=600.0,
        generator_url="http://grafana/d/cpu",
        retry_on_failure=FAST,
    )
    proc, _, tel = make(config, clock)
    await proc.start()
    try:
        await proc.consume(batch(gauge(91.5, T0, host="web-1")))
        await wait_until(lambda: len(hook.bodies) == 1, "the firing notification")
        clock.t = T0 + 600
        await proc.consume(batch(gauge(92, T0 + 600, host="web-1")))
        await wait_until(lambda: len(hook.bodies) == 2, "the repeat notification")
        clock.t = T0 + 700
        await proc.consume(batch(gauge(3, T0 + 700, host="web-1")))
        await wait_until(lambda: len(hook.bodies) == 3, "the resolved notification")
    finally:
        await proc.shutdown()
    firing, repeat, resolved = hook.bodies
    assert firing["text"].startswith("[FIRING:1] high")
    assert 'cpu{host="web-1"}: value is 91.5 (warning when > 80)' in firing["text"]
    assert firing["status"] == "firing" and firing["repeat"] is False
    alert = firing["alerts"][0]
    assert alert["labels"] == {
        "alertname": "high",
        "severity": "warning",
        "metric": "cpu",
        "host": "web-1",
        "team": "infra",
    }
    assert alert["annotations"]["runbook"] == "see cpu on web-1"
    assert alert["startsAt"] == "2023-11-14T22:13:20.000Z" and alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["generatorURL"] == "http://grafana/d/cpu" and alert["value"] == 91.5
    assert repeat["repeat"] is True and "still firing" in repeat["text"]
    assert resolved["status"] == "resolved" and resolved["text"].startswith("[RESOLVED] high")
    assert resolved["alerts"][0]["endsAt"] == "2023-11-14T22:25:00.000Z"
    assert tel.value("alert_notifications_sent_total", receiver="webhook") == 3


async def test_webhook_503_is_retried_and_400_is_dropped() -> None:
    hook = Hook(statuses=[503, 503, 200, 400])
    await hook.start()
    clock = Clock()
    config = ThresholdConfig(rules=[rule()], webhook=WebhookConfig(url=hook.url), retry_on_failure=FAST)
    proc, _, tel = make(config, clock)
    await proc.start()
    try:
        await proc.consume(batch(gauge(90, T0)))
        await wait_until(lambda: len(hook.bodies) == 1, "the notification after two 503s")
        clock.t = T0 + 100
        await proc.consume(batch(gauge(1, T0 + 100)))
        await wait_until(lambda: hook.hits == 4, "the resolved notification (answered 400)")
    finally:
        await proc.shutdown()
        await hook.stop()
    assert tel.value("alert_notifications_failed_total", receiver="webhook", reason="http_503") == 2
    assert tel.value("alert_notifications_failed_total", receiver="webhook", reason="http_400") == 1
    assert tel.value("alert_notifications_sent_total", receiver="webhook") == 1
    # The 400 was not retried: the Sender dropped it and counted it under the receiver's queue id.
    assert hook.hits == 4
    assert tel.value("exporter_dropped_points_total", exporter="threshold/test@metrics:webhook") == 1


async def test_disk_queue_delivers_after_a_restart(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet: the webhook is down
    clock = Clock()
    config = ThresholdConfig(
        rules=[rule()],
        webhook=WebhookConfig(url=f"http://127.0.0.1:{port}/hook"),
        sending_queue=QueueConfig(storage="disk", directory=str(tmp_path / "queue")),
        retry_on_failure=FAST,
    )
    proc, _, tel = make(config, clock, shutdown_timeout_s=0.3)
    await proc.start()
    await proc.consume(batch(gauge(90, T0, host="a")))
    await wait_until(
        lambda: tel.value("alert_notifications_failed_total", receiver="webhook") > 0, "a failed attempt"
    )
    await proc.shutdown()  # the notification stays on disk
    assert (tmp_path / "queue" / "threshold%2Ftest%40metrics.alerts").exists()  # alert state beside it

    hook = Hook(port=port)
    await hook.start()
    proc2, _, _ = make(config, clock)
    try:
        await proc2.start()
        await wait_until(lambda: len(hook.bodies) == 1, "the queued notification after the restart")
        # The restored state knows the alert was notified: evaluating it again sends nothing new.
        await proc2.consume(batch(gauge(95, T0, host="a")))
        await proc2.tick()
    finally:
        await proc2.shutdown()
        await hook.stop()
    assert [a["labels"]["host"] for a in hook.bodies[0]["alerts"]] == ["a"]
    assert len(hook.bodies) == 1


# -- Alertmanager ---------------------------------------------------------------------------------------


@pytest.fixture
async def alertmanager(tmp_path: Path) -> AsyncIterator[str]:
    """A real Alertmanager (Debian package prometheus-alertmanager) on a free port with a null route."""
    exe = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if exe is None:
        pytest.fail("Alertmanager is not installed: apt-get install -y prometheus-alertmanager")
    data = tmp_path / "alertmanager"
    data.mkdir()
    (data / "alertmanager.yml").write_text('route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n')
    port = free_port()
    log = open(data / "alertmanager.log", "wb")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={data / 'alertmanager.yml'}",
            f"--storage.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port: nothing else to collide with
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        async def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    "alertmanager did not start:\n" + (data / "alertmanager.log").read_text()
                )
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{url}/-/ready") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, "alertmanager to start", timeout_s=60.0)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def am_alerts(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v2/alerts") as r:
        assert r.status == 200
        return list(await r.json())


async def test_alertmanager_receives_firing_then_resolved(alertmanager: str) -> None:
    clock = Clock(time.time())  # Alertmanager compares endsAt with its own clock
    config = ThresholdConfig(
        rules=[rule(critical=95.0, group_by=["host"])],
        alertmanager=AlertmanagerConfig(url=alertmanager),
        group_interval=0.001,  # the resolve goes out at once: its endsAt must not be ahead of Alertmanager
        generator_url="http://headwater.example/status",
        retry_on_failure=FAST,
    )
    proc, _, tel = make(config, clock)
    await proc.start()
    try:
        await proc.consume(batch(gauge(99, clock.t, host="web-1", **{"dc.name": "eu-1"})))

        async def fetch() -> list[dict[str, Any]]:
            return [a for a in await am_alerts(alertmanager) if a["labels"].get("alertname") == "high"]

        (alert,) = await wait_until(fetch, "the alert to reach Alertmanager")
        assert alert["labels"] == {
            "alertname": "high",
            "severity": "critical",
            "metric": "cpu",
            "host": "web-1",
            "dc_name": "eu-1",  # Alertmanager label names cannot hold dots
        }
        assert alert["status"]["state"] == "active"
        assert alert["generatorURL"] == "http://headwater.example/status"
        assert "value is 99" in alert["annotations"]["summary"]

        clock.t = time.time()
        await proc.consume(batch(gauge(10, clock.t, host="web-1", **{"dc.name": "eu-1"})))

        # Alertmanager lists only unresolved alerts: the resolved one (endsAt now) leaves the list.
        async def resolved() -> bool:
            return not await fetch()

        await wait_until(resolved, "the alert to resolve in Alertmanager")
        assert tel.value("alert_notifications_sent_total", receiver="alertmanager") == 2
    finally:
        await proc.shutdown()


async def test_alertmanager_resend_keeps_firing_alerts_alive(alertmanager: str) -> None:
    clock = Clock(time.time())
    config = ThresholdConfig(
        rules=[rule()],
        alertmanager=AlertmanagerConfig(url=alertmanager, resend_interval=60.0),
        retry_on_failure=FAST,
    )
    proc, _, tel = make(config, clock)
    await proc.start()
    try:
        await proc.consume(batch(gauge(90, clock.t)))
        await wait_until(
            lambda: tel.value("alert_notifications_sent_total", receiver="alertmanager") == 1, "first send"
        )
        clock.t += 60  # a resend is due; nothing changed, so the webhook-style dedup sends nothing else
        await proc.tick()
        await wait_until(
            lambda: tel.value("alert_notifications_sent_total", receiver="alertmanager") == 2, "the resend"
        )
        (alert,) = [a for a in await am_alerts(alertmanager) if a["labels"]["alertname"] == "high"]
        # endsAt moved 4 resend intervals past the resend time.
        assert alert["endsAt"].startswith(time.strftime("%Y-%m-%dT%H:%M", time.gmtime(clock.t + 240))), alert[
            "endsAt"
        ]
    finally:
        await proc.shutdown()


# -- through the agent: YAML config and /status ------------------------------------------------------------


async def test_yaml_config_and_status_endpoint_list_active_alerts() -> None:
    http_port, admin_port = free_port(), free_port()
    text = f"""
    receivers:
      http: {{endpoint: "127.0.0.1:{http_port}"}}
    processors:
      threshold/cpu:
        rules:
          - name: cpu_high
            metric: "cpu.*"
            match: '{{env="prod", host=~"web-.*"}}'
            statistic: last
            op: ">="
            warning: 80
            critical: 95
            resolve: 70
            for: 0s
            group_by: [host]
    exporters:
      debug: {{}}
    service:
      pipelines:
        metrics: {{receivers: [http], processors: [threshold/cpu], exporters: [debug]}}
    """
    factories = {**builtin_factories(), (ComponentKind.PROCESSOR, "threshold"): factory}
    config = build_config(yaml.safe_load(textwrap.dedent(text)), factories)
    agent = Agent(config)
    admin = AdminServer(agent, f"127.0.0.1:{admin_port}")
    await agent.start()
    await admin.start()
    try:
        body = [
            {"name": "cpu.user", "value": 97, "type": "gauge", "labels": {"env": "prod", "host": "web-1"}},
            {"name": "cpu.user", "value": 97, "type": "gauge", "labels": {"env": "dev", "host": "web-2"}},
        ]
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{http_port}/v1/metrics", json=body) as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{admin_port}/status") as resp:
                status = await resp.json()
    finally:
        await admin.shutdown()
        await agent.stop()
    (entry,) = [c for c in status["components"] if c["id"] == "threshold/cpu"]
    assert [(a["rule"], a["labels"], a["state"], a["severity"]) for a in entry["status"]["alerts"]] == [
        ("cpu_high", {"env": "prod", "host": "web-1"}, "firing", "critical")
    ]


async def test_a_refused_batch_is_not_observed_so_its_retry_counts_once() -> None:
    clock = Clock()
    proc, _, tel = make(
        ThresholdConfig(rules=[rule(statistic="count", window=Duration(60.0), warning=1.5)]), clock
    )
    sink = Sink(refuse_times=1)
    proc._next = sink
    await proc.start()
    b = batch(gauge(1, T0))
    with pytest.raises(Backpressure):
        await proc.consume(b)  # downstream refused: the receiver offers the same batch again
    await proc.consume(b)
    assert sink.batches == [b]
    assert tel.value("alert_state", rule="high", severity="warning") == 0  # one point, not two
    assert proc.status()["alerts"] == []
    await proc.shutdown()
