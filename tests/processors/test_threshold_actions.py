"""The threshold processor acting on alerts: a rule's ``cooldown`` and ``max_per_day`` hold back firing
notifications per group (counted, listed in /status, kept across a restart), and the webhook's
``body_template`` calls a job API with the alert's fields, JSON-escaped."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from agent.component import validate_config
from agent.config import ConfigError, build_config
from agent.registry import builtin_factories
from processors.threshold import ThresholdConfig, WebhookConfig
from processors.threshold.engine import Notification
from tests.conftest import free_port, wait_until
from tests.processors.test_threshold import (
    FAST,
    T0,
    Clock,
    batch,
    engine,
    gauge,
    make,
    rule,
    statuses,
    step,
)

DAY = 86400.0
MIDNIGHT = (T0 // DAY + 1) * DAY
"""The first UTC midnight after T0."""


def firing(ns: list[Notification]) -> int:
    return sum(n.firing for n in ns)


# -- cooldown ------------------------------------------------------------------------------------------


def test_cooldown_holds_a_new_firing_back_and_counts_it_once() -> None:
    e = engine(rule(cooldown=600.0), group_interval_s=1.0)
    assert statuses(step(e, T0, gauge(90, T0))) == [[("firing", "warning")]]
    # Resolved notifications are not limited: they trigger nothing.
    assert statuses(step(e, T0 + 10, gauge(10, T0 + 10))) == [[("resolved", "warning")]]
    # Fires again 20 s after the last firing notification: held, counted once however often evaluated.
    assert step(e, T0 + 20, gauge(95, T0 + 20)) == []
    assert step(e, T0 + 30, gauge(96, T0 + 30)) == []
    assert e.suppressed == {("high", "cooldown"): 1}
    assert [(h["reason"], h["until"]) for h in e.held()] == [("cooldown", T0 + 600)]
    assert e.next_due() == T0 + 600
    # Still firing when the cooldown ends: sent then, once.
    assert statuses(step(e, T0 + 600, gauge(97, T0 + 600))) == [[("firing", "warning")]]
    assert e.held() == []
    assert step(e, T0 + 601, gauge(97, T0 + 601)) == []


def test_a_firing_held_by_the_cooldown_that_resolves_meanwhile_is_never_sent() -> None:
    e = engine(rule(cooldown=600.0), group_interval_s=1.0)
    step(e, T0, gauge(90, T0))
    step(e, T0 + 10, gauge(10, T0 + 10))
    assert step(e, T0 + 20, gauge(95, T0 + 20)) == []
    assert step(e, T0 + 30, gauge(5, T0 + 30)) == []
    assert step(e, T0 + 700, gauge(5, T0 + 700)) == []
    assert e.groups == {} and e.suppressed == {("high", "cooldown"): 1}
    # After the cooldown a new firing goes out at once.
    assert statuses(step(e, T0 + 800, gauge(99, T0 + 800))) == [[("firing", "warning")]]


def test_cooldown_applies_per_group_and_to_repeats() -> None:
    e = engine(rule(cooldown=1000.0, group_by=["model"]), group_interval_s=1.0, repeat_interval_s=100.0)
    sent = step(e, T0, gauge(90, T0, model="a"))
    assert [n.group_labels["model"] for n in sent] == ["a"]
    # Another group has its own cooldown.
    sent = step(e, T0 + 5, gauge(90, T0 + 5, model="b"))
    assert [n.group_labels["model"] for n in sent] == ["b"]
    # The repeat of `a` after repeat_interval is a firing notification too: held until the cooldown ends.
    assert step(e, T0 + 150) == []
    assert e.suppressed == {("high", "cooldown"): 2}
    released = e.due(T0 + 1000)
    assert [(n.group_labels["model"], n.repeat) for n in released] == [("a", True)]


def test_without_limits_nothing_is_held() -> None:
    e = engine(rule(), group_interval_s=1.0)
    for i in range(5):
        assert firing(step(e, T0 + 10 * i, gauge(90, T0 + 10 * i))) == 1
        step(e, T0 + 10 * i + 5, gauge(10, T0 + 10 * i + 5))
    assert e.suppressed == {} and e.budgets == {}


# -- max_per_day ---------------------------------------------------------------------------------------


def test_max_per_day_holds_the_rest_until_the_next_utc_day() -> None:
    e = engine(rule(max_per_day=2), group_interval_s=1.0)
    t = MIDNIGHT - 100.0
    sent = 0
    for i in range(4):  # fires and resolves four times in the last 100 s of the day
        sent += firing(step(e, t + 20 * i, gauge(90, t + 20 * i)))
        step(e, t + 20 * i + 10, gauge(10, t + 20 * i + 10))
    assert sent == 2
    assert step(e, MIDNIGHT - 5, gauge(90, MIDNIGHT - 5)) == []
    # One held notification: the later firings join the one already waiting for the next day.
    assert e.suppressed == {("high", "max_per_day"): 1}
    assert e.held()[0]["until"] == MIDNIGHT and e.held()[0]["sent_today"] == 2
    # Midnight UTC: a new day's allowance; the held firing (still firing) goes out.
    assert statuses(e.due(MIDNIGHT)) == [[("firing", "warning")]]
    assert e.budgets[("high", ())].sent_today == 1


def test_cooldown_and_max_per_day_together_wait_for_the_later() -> None:
    e = engine(rule(max_per_day=1, cooldown=7200.0), group_interval_s=1.0)
    step(e, MIDNIGHT - 3600, gauge(90, MIDNIGHT - 3600))
    step(e, MIDNIGHT - 3000, gauge(10, MIDNIGHT - 3000))
    assert step(e, MIDNIGHT - 2000, gauge(90, MIDNIGHT - 2000)) == []
    assert e.held()[0]["reason"] == "max_per_day"
    # The new day allows one, but the cooldown (until 1 h after midnight) still holds it.
    assert e.held()[0]["until"] == MIDNIGHT + 3600


async def test_the_daily_count_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock(MIDNIGHT - 1000)
    config = ThresholdConfig(
        rules=[rule(max_per_day=1)], state_directory=str(tmp_path), group_interval=1.0, log=False
    )
    proc, _, _ = make(config, clock)
    await proc.start()
    await proc.consume(batch(gauge(90, clock.t)))
    clock.t += 10
    await proc.consume(batch(gauge(10, clock.t)))  # resolved
    await proc.tick()
    await proc.shutdown()

    clock.t += 10
    proc2, _, tel2 = make(config, clock)
    await proc2.start()
    try:
        await proc2.consume(batch(gauge(95, clock.t)))
        await proc2.tick()
        assert proc2.engine.budgets[("high", ())].sent_today == 1
        assert [h["reason"] for h in proc2.status()["held_notifications"]] == ["max_per_day"]
        assert tel2.value("alert_notifications_suppressed_total", rule="high", reason="max_per_day") == 1
    finally:
        await proc2.shutdown()

    # The held firing is saved too: a run after midnight sends it.
    clock.t = MIDNIGHT + 1
    proc3, _, _ = make(config, clock)
    await proc3.start()
    try:
        sent = proc3.engine.due(clock.t)
        assert statuses(sent) == [[("firing", "warning")]]
    finally:
        await proc3.shutdown()


def test_limit_settings_are_validated() -> None:
    cfg = ThresholdConfig(rules=[rule(cooldown=-1.0, max_per_day=-2)])
    assert {p for p, _ in validate_config(cfg)} == {"rules::0::cooldown", "rules::0::max_per_day"}


# -- webhook body templates ----------------------------------------------------------------------------


class RawHook:
    """A local webhook receiver that keeps each request's Content-Type and raw body."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[str, bytes]] = []
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jobs"

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            self.requests.append((request.headers.get("Content-Type", ""), await request.read()))
            return web.Response(status=201, text="queued")

        app = web.Application()
        app.router.add_post("/jobs", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def jobs() -> AsyncIterator[RawHook]:
    h = RawHook()
    await h.start()
    yield h
    await h.stop()


HOSTILE = 'fraud"v2\\\n</x>{{ rule }}\u2028é'
"""Quotes, a backslash, a newline, template syntax and non-ASCII in a label value."""


async def test_templated_body_reaches_a_job_api_json_escaped(jobs: RawHook) -> None:
    clock = Clock()
    template = (
        '{"model": "{{ labels.model }}", "reason": "psi {{ value }} ({{ severity }})", '
        '"score": {{ value | json }}, "labels": {{ labels | json }}, "team": "{{ labels.team }}", '
        '"since": "{{ starts_at }}", "group": {{ group_labels.model | json }}}'
    )
    config = ThresholdConfig(
        rules=[rule(metric="psi", warning=0.2, group_by=["model"], cooldown=3600.0)],
        webhook=WebhookConfig(
            url=jobs.url, body_template=template, send_resolved=False, headers={"Authorization": "Bearer t"}
        ),
        group_interval=1.0,
        retry_on_failure=FAST,
        log=False,
    )
    proc, _, tel = make(config, clock)
    await proc.start()
    try:
        await proc.consume(batch(gauge(0.31, T0, "psi", model=HOSTILE), gauge(0.25, T0, "psi", model="b")))
        await wait_until(lambda: len(jobs.requests) == 2, "one job request per group")
        clock.t = T0 + 10
        await proc.consume(
            batch(gauge(0.01, T0 + 10, "psi", model=HOSTILE), gauge(0.01, T0 + 10, "psi", model="b"))
        )
        await proc.tick()
        # Resolved (send_resolved: false): no request. Firing again within the cooldown: held.
        clock.t = T0 + 20
        await proc.consume(batch(gauge(0.5, T0 + 20, "psi", model="b")))
        await proc.tick()
        assert tel.value("alert_notifications_suppressed_total", rule="high", reason="cooldown") == 1
    finally:
        await proc.shutdown()
    assert len(jobs.requests) == 2
    bodies = sorted((json.loads(body) for _, body in jobs.requests), key=lambda b: b["score"])
    assert {ct for ct, _ in jobs.requests} == {"application/json"}
    b, hostile = bodies
    assert hostile["model"] == HOSTILE and hostile["group"] == HOSTILE
    assert hostile["labels"]["model"] == HOSTILE and hostile["labels"]["alertname"] == "high"
    assert hostile["reason"] == "psi 0.31 (warning)" and hostile["score"] == 0.31
    assert hostile["team"] == ""  # a missing label renders empty
    assert hostile["since"] == "2023-11-14T22:13:20.000Z"
    assert b["model"] == "b" and b["score"] == 0.25


async def test_a_text_template_goes_as_it_is_and_resolved_ones_are_sent_by_default(jobs: RawHook) -> None:
    clock = Clock()
    config = ThresholdConfig(
        rules=[rule()],
        webhook=WebhookConfig(
            url=jobs.url,
            body_template="{{ status }} {{ rule }} on {{ labels.host }}: {{ value }}",
            headers={"content-type": "text/plain"},
        ),
        group_interval=1.0,
        retry_on_failure=FAST,
        log=False,
    )
    proc, _, _ = make(config, clock)
    await proc.start()
    try:
        await proc.consume(batch(gauge(90.5, T0, host='a"b')))
        clock.t = T0 + 5
        await proc.consume(batch(gauge(1, T0 + 5, host='a"b')))
        await wait_until(lambda: len(jobs.requests) == 2, "firing and resolved requests")
    finally:
        await proc.shutdown()
    assert jobs.requests == [
        ("text/plain", b'firing high on a"b: 90.5'),
        ("text/plain", b'resolved high on a"b: 1.0'),
    ]


def test_without_a_template_the_body_is_the_alertmanager_webhook_json() -> None:
    assert WebhookConfig(url="http://x").template() is None


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('{"m": "{{ model }}"}', "unknown name 'model'"),
        ('{"m": "{{ labels.model | upper }}"}', "unknown filter 'upper'"),
        ('{"m": "{{ labels }}"}', "a whole map needs '| json'"),
        ('{"m": "{{ value.x }}"}', "value has no fields"),
        ('{"m": {{ labels.model }}}', "does not render to JSON"),
        ('{"m": "{{ labels.model }"}', "malformed placeholder"),
        ('{"m": "{{ __import__(\'os\') }}"}', "malformed placeholder"),
    ],
)
def test_template_errors_are_config_errors_with_their_path(template: str, message: str) -> None:
    cfg = ThresholdConfig(rules=[rule()], webhook=WebhookConfig(url="http://x", body_template=template))
    problems = validate_config(cfg)
    assert [p for p, _ in problems] == ["webhook::body_template"]
    assert message in problems[0][1]


def test_template_errors_from_yaml_name_the_key() -> None:
    text = textwrap.dedent(
        """
        receivers: {statsd: {}}
        processors:
          threshold:
            rules: [{name: drift, metric: psi, warning: 0.2}]
            webhook:
              url: "http://127.0.0.1:1/jobs"
              body_template: '{"model": "{{ labels.model }}", "x": "{{ nope }}"}'
        exporters: {prometheus: {}}
        service:
          pipelines:
            metrics: {receivers: [statsd], processors: [threshold], exporters: [prometheus]}
        """
    )
    with pytest.raises(ConfigError) as info:
        build_config(yaml.safe_load(text), builtin_factories())
    assert "processors::threshold::webhook::body_template" in str(info.value)
    assert "unknown name 'nope'" in str(info.value)


def test_a_non_finite_value_renders_empty_or_null() -> None:
    from processors.threshold.template import BodyTemplate

    t = BodyTemplate('{"a": "{{ value }}", "b": {{ value | json }}, "c": {{ annotations.x | json }}}')
    assert json.loads(t.render({"value": math.nan, "annotations": {}})) == {"a": "", "b": None, "c": None}


def test_annotations_may_name_a_label_and_a_missing_one_renders_empty() -> None:
    r = rule(annotations={"summary": "{labels[model]}: {value:.3f}"})
    assert validate_config(ThresholdConfig(rules=[r])) == []
    e = engine(r)
    sent = step(e, T0, gauge(90, T0, model="fraud"), gauge(91, T0, host="a"))
    assert sorted(a.annotations["summary"] for n in sent for a in n.alerts) == [": 91.000", "fraud: 90.000"]
