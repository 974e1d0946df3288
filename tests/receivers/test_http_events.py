"""Events to metrics at the ``http`` receiver (agent/json_events.py): the routes and mappings of
examples/events-commands-agents.yaml driven with aiohttp posting the JSON shapes of issue 13, the
points checked in a Sink, and once end to end into a real Prometheus over remote-write."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from agent.component import ComponentKind, Signal
from agent.confmodel import Decoder, Size
from agent.json_events import EventMapper, EventMappingConfig
from agent.json_items import _timestamp_ns
from agent.limits import SeriesLimits
from agent.model import Kind, Point, Temporality
from agent.telemetry import Telemetry
from receivers.http import HttpConfig, HttpReceiver
from tests.conftest import AgentGraph, Sink, component_settings, free_port, wait_until
from tests.integration.conftest import PrometheusServer, prom_query
from tests.receivers.conftest import Running

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "events-commands-agents.yaml"


SECRET = "a-shared-secret-of-at-least-32-bytes"


def example_http() -> dict[str, Any]:
    """The example's event routes and mappings (``http/events``) with its ``/metrics`` route
    (``http/metrics``) in one receiver, without the JWT auth (the end-to-end tests below use the
    example as written, tokens and quota included)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    events = dict(data["receivers"]["http/events"])
    events.pop("auth")
    events["routes"] = [*events["routes"], *data["receivers"]["http/metrics"]["routes"]]
    return events


def example(write_url: str) -> tuple[dict[str, Any], int, int]:
    """The example config as written, with free ports, its remote-write endpoint and the JWT secret
    (${env:EVENTS_JWT_SECRET}) filled in: (config, http/metrics port, http/events port)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    metrics_port, events_port = free_port(), free_port()
    data["receivers"]["http/metrics"]["endpoint"] = f"127.0.0.1:{metrics_port}"
    data["receivers"]["http/events"]["endpoint"] = f"127.0.0.1:{events_port}"
    data["receivers"]["http/events"]["auth"]["jwt"]["secret"] = SECRET
    data["exporters"]["prometheus_remote_write"]["endpoint"] = write_url
    data["exporters"]["prometheus"]["endpoint"] = f"127.0.0.1:{free_port()}"
    return data, metrics_port, events_port


def token(org: str) -> str:
    """A client's bearer token: HS256, the organization in org_id, valid for an hour."""
    now = int(datetime.now(UTC).timestamp())
    return jwt.encode({"org_id": org, "sub": "user_456", "iat": now, "exp": now + 3600}, SECRET, "HS256")


def decode(raw: dict[str, Any]) -> HttpConfig:
    decoder = Decoder(lambda path: None)
    config = decoder.decode(HttpConfig, raw, ())
    assert decoder.errors == [] and config.validate() == [], (decoder.errors, config.validate())
    assert isinstance(config, HttpConfig)
    return config


def rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def ns(t: datetime) -> int:
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


@dataclass
class Harness:
    receiver: HttpReceiver
    sink: Sink
    tel: Telemetry
    session: aiohttp.ClientSession

    async def post(self, path: str, payload: Any) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.receiver.port}{path}"
        async with self.session.post(url, json=payload) as resp:
            return resp.status, await resp.json()

    def points(self, name: str) -> list[Point]:
        return [p for p in self.sink.points() if p.name == name]

    def by_labels(self, name: str) -> dict[tuple[tuple[str, str], ...], Point]:
        found = {p.labels: p for p in self.points(name)}
        assert len(found) == len(self.points(name)), "one point per series and request"
        return found


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make(running: Running) -> AsyncIterator[Make]:

    async def build(raw: dict[str, Any] | None = None) -> Harness:
        config = decode({**(raw if raw is not None else example_http()), "endpoint": "127.0.0.1:0"})
        tel = Telemetry()
        sink = Sink()
        settings = component_settings(tel, ComponentKind.RECEIVER, "http")
        receiver = HttpReceiver(settings, config, {Signal.METRICS: sink})
        return Harness(receiver, sink, tel, await running.start(receiver))

    yield build


def command(
    name: str = "plan-product", ms: Any = 1500, status: str = "success", **extra: Any
) -> dict[str, Any]:
    """A command event as the issue's client posts it."""
    return {
        "user_id": "user_456",
        "command_name": name,
        "execution_time_ms": ms,
        "status": status,
        "context": {"session_id": "sess_789"},
        **extra,
    }


# -- the shapes of the issue ---------------------------------------------------------------------------
async def test_one_command_event_makes_a_counter_and_a_duration_histogram_in_seconds(make: Make) -> None:
    h = await make()
    at = datetime.now(UTC).replace(microsecond=250_000) - timedelta(minutes=1)
    status, body = await h.post("/api/metrics/commands", command(timestamp=rfc3339(at)))
    assert status == 200
    assert body == {"status": "success", "accepted": 1, "rejected": 0, "errors": []}
    [count] = h.points("command_executions_total")
    assert count.labels == (("command_name", "plan-product"), ("status", "success"))
    assert (count.kind, count.value, count.temporality, count.monotonic) == (
        Kind.SUM,
        1.0,
        Temporality.DELTA,
        True,
    )
    assert count.time_unix_nano == ns(at)
    [duration] = h.points("command_execution_duration_seconds")
    assert duration.labels == (("command_name", "plan-product"),)
    assert duration.kind is Kind.HISTOGRAM and duration.unit == "s"
    assert duration.histogram is not None
    assert (duration.histogram.count, duration.histogram.sum) == (1, 1.5)
    assert duration.histogram.min == duration.histogram.max == 1.5
    assert duration.time_unix_nano == ns(at)
    # The allow-list: user_id and the session never become labels.
    assert not any(
        name in ("user_id", "session_id", "context_session_id")
        for p in h.sink.points()
        for name, _ in p.labels
    )
    assert h.tel.value("receiver_accepted_points_total") == 2


async def test_a_list_of_events_is_aggregated_per_series_and_stamped_with_the_latest_event(
    make: Make,
) -> None:
    h = await make()
    now = datetime.now(UTC).replace(microsecond=0)
    events = [
        command("plan-product", 1000, timestamp=int((now - timedelta(seconds=30)).timestamp())),  # epoch s
        command("plan-product", 2000, timestamp=int((now - timedelta(seconds=10)).timestamp() * 1000)),  # ms
        command("plan-product", 3000, "error", timestamp=rfc3339(now - timedelta(seconds=20))),
        command("ship-it", 500),  # no timestamp: the time the request arrived
    ]
    before = datetime.now(UTC)
    status, body = await h.post("/api/metrics/commands", events)
    assert status == 200 and body["status"] == "success" and body["accepted"] == 4
    counts = h.by_labels("command_executions_total")
    assert {labels: p.value for labels, p in counts.items()} == {
        (("command_name", "plan-product"), ("status", "success")): 2.0,
        (("command_name", "plan-product"), ("status", "error")): 1.0,
        (("command_name", "ship-it"), ("status", "success")): 1.0,
    }
    assert counts[(("command_name", "plan-product"), ("status", "success"))].time_unix_nano == ns(
        now - timedelta(seconds=10)
    )
    assert counts[(("command_name", "ship-it"), ("status", "success"))].time_unix_nano >= ns(before)
    durations = h.by_labels("command_execution_duration_seconds")
    plan = durations[(("command_name", "plan-product"),)].histogram
    assert plan is not None and (plan.count, plan.sum, plan.min, plan.max) == (3, 6.0, 1.0, 3.0)
    assert len(h.sink.batches) == 1


async def test_the_envelope_batch_takes_each_array_through_its_own_mapping(make: Make) -> None:
    h = await make()
    agent = {
        "agent_name": "planner",
        "interaction_type": "chat",
        "execution_time_ms": 3000,
        "status": "success",
        "input_tokens": 500,
        "output_tokens": 1200,
    }
    no_tokens = {k: v for k, v in agent.items() if not k.endswith("_tokens")}
    status, body = await h.post(
        "/api/metrics/batch",
        {
            "command_executions": [command(), command(ms=2500)],
            "agent_interactions": [agent, agent, no_tokens],
        },
    )
    assert status == 200 and body == {"status": "success", "accepted": 5, "rejected": 0, "errors": []}
    assert (
        h.by_labels("command_executions_total")[
            (("command_name", "plan-product"), ("status", "success"))
        ].value
        == 2.0
    )
    labels = (("agent_name", "planner"), ("interaction_type", "chat"), ("status", "success"))
    assert h.by_labels("agent_interactions_total")[labels].value == 3.0
    [duration] = h.points("agent_interaction_duration_seconds")
    assert duration.labels == (("agent_name", "planner"), ("interaction_type", "chat"))
    assert duration.histogram is not None and (duration.histogram.count, duration.histogram.sum) == (3, 9.0)
    tokens = {p.labels: (p.value, p.unit) for p in h.points("agent_tokens_total")}
    assert tokens == {
        (("agent_name", "planner"), ("direction", "input")): (1000.0, "{token}"),
        (("agent_name", "planner"), ("direction", "output")): (2400.0, "{token}"),
    }


async def test_a_thousand_events_in_one_request_and_no_more(make: Make) -> None:
    h = await make()
    events = [command(f"cmd-{i % 10}", i) for i in range(1000)]
    status, body = await h.post("/api/metrics/commands", events)
    assert status == 200 and body["accepted"] == 1000 and body["status"] == "success"
    assert sum(p.value for p in h.points("command_executions_total")) == 1000
    hists = [p.histogram for p in h.points("command_execution_duration_seconds")]
    assert len(hists) == 10 and sum(x.count for x in hists if x is not None) == 1000
    assert math.isclose(sum(x.sum for x in hists if x is not None), sum(range(1000)) / 1000)

    status, body = await h.post("/api/metrics/commands", [*events, command()])
    assert status == 413 and body["status"] == "error" and body["code"] == "too_many_items"
    envelope = {"command_executions": events[:600], "agent_interactions": [{}] * 401}
    status, body = await h.post("/api/metrics/batch", envelope)
    assert status == 413 and body["code"] == "too_many_items", body
    assert len(h.sink.batches) == 1


# -- refusals ------------------------------------------------------------------------------------------
async def test_bad_events_are_refused_by_index_and_reason_and_the_rest_accepted(make: Make) -> None:
    h = await make()
    old = datetime.now(UTC) - timedelta(days=3)
    events = [
        command(),
        {k: v for k, v in command().items() if k != "execution_time_ms"},
        command(ms="1500"),
        command(timestamp="yesterday"),
        command(timestamp=rfc3339(old)),
        "not an event",
        command(command_name={"nested": "object"}),
        command(ms=-5),  # a histogram takes negative values: accepted
    ]
    status, body = await h.post("/api/metrics/commands", events)
    assert status == 200 and body["status"] == "partial"
    assert (body["accepted"], body["rejected"]) == (2, 6)
    errors = {e["index"]: (e["code"], e["reason"]) for e in body["errors"]}
    assert errors[1] == ("invalid_value", "execution_time_ms: must be a finite number, it is missing")
    assert errors[2] == (
        "invalid_value",
        'execution_time_ms: must be a finite number, got the string "1500"',
    )
    assert errors[3][0] == "invalid_timestamp" and errors[3][1].startswith(
        'timestamp: "yesterday" is not RFC 3339'
    )
    assert errors[4][0] == "timestamp_out_of_range" and "in the past" in errors[4][1]
    assert errors[5] == ("invalid_item", 'must be an event object, got the string "not an event"')
    assert errors[6] == (
        "invalid_labels",
        "command_name: a label takes a string, number or boolean, got an object",
    )
    assert sum(p.value for p in h.points("command_executions_total")) == 2
    assert h.tel.value("receiver_refused_points_total", reason="invalid_value") == 2
    assert h.tel.value("receiver_refused_points_total", reason="invalid_timestamp") == 1

    status, body = await h.post("/api/metrics/commands", [command(ms=None), command(ms=True)])
    assert status == 400 and body["status"] == "error" and body["accepted"] == 0
    assert [e["index"] for e in body["errors"]] == [0, 1]
    assert "got the boolean true" in body["errors"][1]["reason"]


async def test_envelope_errors_name_their_array_and_unknown_arrays_refuse_the_request(make: Make) -> None:
    h = await make()
    status, body = await h.post(
        "/api/metrics/batch",
        {"command_executions": [command(), command(ms="slow")], "agent_interactions": [{"agent_name": "a"}]},
    )
    assert status == 200 and body["status"] == "partial" and body["accepted"] == 1
    assert [(e["array"], e["index"], e["code"]) for e in body["errors"]] == [
        ("command_executions", 1, "invalid_value"),
        ("agent_interactions", 0, "invalid_value"),
    ]
    status, body = await h.post("/api/metrics/batch", {"command_executions": [], "agent_interactons": []})
    assert status == 400 and body["code"] == "unknown_field" and body["status"] == "error"
    assert '"agent_interactons"' in body["error"] and '"agent_interactions"' in body["error"]
    status, body = await h.post("/api/metrics/batch", [command()])
    assert status == 400 and body["code"] == "invalid_json"
    status, body = await h.post("/api/metrics/batch", {"command_executions": command()})
    assert status == 400 and "must be a list of events, got an object" in body["error"]


async def test_a_negative_counter_increment_is_refused() -> None:
    mapper = EventMapper(
        mapping_config({"metrics": [{"name": "bytes_total", "field": "bytes", "unit": "By"}]}),
        max_timestamp_age_s=3600,
        max_timestamp_ahead_s=60,
        max_buckets=160,
    )
    parsed = mapper.map([{"bytes": 10}, {"bytes": -1}, {"bytes": 5.5}], now_ns=10**18)
    assert parsed.errors == [
        {
            "index": 1,
            "code": "negative_counter",
            "reason": "bytes: counts up by its value, and -1 is negative",
        }
    ]
    assert [(p.value, p.unit) for p in parsed.points] == [(15.5, "By")]


# -- mappings ------------------------------------------------------------------------------------------
def mapping_config(raw: dict[str, Any]) -> EventMappingConfig:
    decoder = Decoder(lambda path: None)
    config = decoder.decode(EventMappingConfig, raw, ())
    assert decoder.errors == [] and config.validate() == [], (decoder.errors, config.validate())
    assert isinstance(config, EventMappingConfig)
    return config


async def test_nested_label_paths_renames_and_gauges_take_the_latest_value(make: Make) -> None:
    raw = {
        "routes": [{"path": "/events", "mapping": "queue"}],
        "mappings": {
            "queue": {
                "labels": ["context.queue", "context.region", "shard"],
                "label_names": {"context.queue": "queue"},
                "timestamp": {"field": "at", "format": "epoch_ms"},
                "metrics": [
                    {"name": "queue_depth", "type": "gauge", "field": "stats.depth"},
                    {"name": "queue_wait_seconds", "type": "gauge", "field": "stats.wait_us", "unit": "us"},
                ],
            }
        },
    }
    h = await make(raw)
    at_ms = int(datetime.now(UTC).timestamp() * 1000)
    events = [
        {"at": at_ms, "context": {"queue": "mail", "region": "eu"}, "shard": 3, "stats": {"depth": 7}},
        {"at": at_ms - 5, "context": {"queue": "mail", "region": "eu"}, "shard": 3, "stats": {"depth": 99}},
        {"at": at_ms, "context": {"queue": "sms"}, "shard": True, "stats": {"depth": 1, "wait_us": 1500}},
    ]
    status, body = await h.post("/events", events)
    # queue_wait_seconds needs stats.wait_us, which only the last event has.
    assert status == 200 and body["status"] == "partial", body
    assert [e["index"] for e in body["errors"]] == [0, 1]
    raw["mappings"]["queue"]["metrics"][1]["optional"] = True
    h = await make(raw)
    status, body = await h.post("/events", events)
    assert status == 200 and body["accepted"] == 3
    depth = {p.labels: (p.value, p.time_unix_nano) for p in h.points("queue_depth")}
    assert depth == {
        (("context_region", "eu"), ("queue", "mail"), ("shard", "3")): (7.0, at_ms * 10**6),
        (("queue", "sms"), ("shard", "true")): (1.0, at_ms * 10**6),
    }
    [wait] = h.points("queue_wait_seconds")
    assert (wait.value, wait.unit, wait.kind) == (0.0015, "s", Kind.GAUGE)
    status, body = await h.post("/events", [{"at": "2024-01-01T00:00:00Z", "stats": {"depth": 1}}])
    assert body["errors"][0]["code"] == "invalid_timestamp" and "(epoch_ms)" in body["errors"][0]["reason"]


def test_config_problems_name_their_path() -> None:
    raw = {
        "routes": [
            {"path": "/a", "mapping": "nope"},
            {"path": "/b", "mapping": "m", "envelope": {"x": "m"}},
            {"path": "/v1/metrics", "mapping": "m"},
            {"path": "/c", "mapping": "m", "metadata_labels": ["x"]},
        ],
        "mappings": {
            "m": {
                "metrics": [
                    {"name": "h", "type": "histogram"},
                    {"name": "c", "labels": ["a..b"]},
                    {"name": "c", "type": "gauge", "field": "v"},
                ],
                "label_names": {"zzz": "z"},
            },
            "empty": {},
        },
    }
    decoder = Decoder(lambda path: None)
    config = decoder.decode(HttpConfig, raw, ())
    assert decoder.errors == []
    problems = dict(config.validate())
    assert problems["routes::0::mapping"] == 'no mapping named "nope" (mappings: empty, m)'
    assert problems["routes::1"].startswith("give either mapping")
    assert problems["routes::2::path"] == "/v1/metrics is served twice"
    assert problems["routes::3::metadata_labels"] == "only for format: metrics"
    assert problems["mappings::m::metrics::0::field"] == "a histogram needs the field holding its value"
    assert "is not a field path" in problems["mappings::m::metrics::1::labels::0"]
    assert problems["mappings::m::metrics::2::name"] == "c is also a metric of another type or unit"
    assert problems["mappings::m::label_names::zzz"] == "renames a field that no labels list names"
    assert problems["mappings::empty::metrics"] == "a mapping needs at least one metric"


# -- the ready-made POST /metrics ---------------------------------------------------------------------
async def test_post_metrics_takes_the_in_house_shape_with_metadata_and_answers_status(make: Make) -> None:
    h = await make()
    at = datetime.now(UTC).replace(microsecond=0)
    one = {
        "metric_name": "model_inference_latency",
        "value": 85.2,
        "timestamp": at.isoformat().replace("+00:00", "Z"),
        "tags": {"model_name": "bert-base"},
        "metadata": {"request_id": "req_123", "user_id": "user_456"},
    }
    status, body = await h.post("/metrics", one)
    assert status == 200 and body["status"] == "success" and body["accepted"] == 1
    [point] = h.sink.points()
    assert (point.name, point.value, point.labels, point.time_unix_nano) == (
        "model_inference_latency",
        85.2,
        (("model_name", "bert-base"),),
        ns(at),
    )
    status, body = await h.post("/metrics", [one, {**one, "value": "fast"}, {**one, "metadata": "x"}])
    assert status == 200 and body["status"] == "partial" and body["accepted"] == 1
    assert [(e["index"], e["code"]) for e in body["errors"]] == [(1, "invalid_value"), (2, "invalid_labels")]
    status, body = await h.post("/metrics", {**one, "value": None})
    assert status == 400 and body["status"] == "error"
    status, body = await h.post("/metrics", "not json")
    assert status == 400 and body["status"] == "error" and body["code"] == "invalid_json"
    # /v1/metrics keeps its answer and still refuses metadata.
    url = f"http://127.0.0.1:{h.receiver.port}/v1/metrics"
    async with h.session.post(url, json=one) as resp:
        assert resp.status == 400
        v1 = await resp.json()
    assert "status" not in v1 and v1["errors"][0]["code"] == "unknown_field"


async def test_metadata_becomes_labels_only_where_allow_listed(make: Make) -> None:
    raw = example_http()
    raw["routes"] = [{"path": "/metrics", "format": "metrics", "metadata_labels": ["model_version", "gpu"]}]
    h = await make(raw)
    item = {
        "metric_name": "m",
        "value": 1,
        "tags": {"model_version": "from-tags"},
        "metadata": {"request_id": "req_1", "user_id": "u", "model_version": "v2", "gpu": True},
    }
    status, body = await h.post("/metrics", item)
    assert status == 200 and body["status"] == "success"
    [point] = h.sink.points()
    assert point.labels == (("gpu", "true"), ("model_version", "from-tags"))


# -- end to end: a real Prometheus ---------------------------------------------------------------------


async def test_command_events_reach_prometheus_as_counts_and_a_latency_histogram(
    prometheus: PrometheusServer,
) -> None:
    data, metrics_port, port = example(prometheus.write_url)
    graph = AgentGraph()
    try:
        await graph.start(data)
        durations_ms = [100 * (i % 20 + 1) for i in range(200)]  # 0.1 s to 2 s, median 1.0-1.1 s
        events = [command(f"cmd-{i % 2}", ms) for i, ms in enumerate(durations_ms)]
        auth = {"Authorization": f"Bearer {token('acme')}"}
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/api/metrics/commands"
            async with session.post(url, json=events[:1]) as resp:
                assert resp.status == 401  # the events API wants the organization's token
            for chunk in (events[:100], events[100:]):
                async with session.post(url, json=chunk, headers=auth) as resp:
                    assert resp.status == 200 and (await resp.json())["status"] == "success"
            # The in-house metric client's shape, on its own receiver, without a token.
            item = {"metric_name": "model_inference_latency", "value": 85.2,
                    "tags": {"model_name": "bert-base"},
                    "metadata": {"request_id": "req_123", "user_id": "user_456"}}  # fmt: skip
            async with session.post(f"http://127.0.0.1:{metrics_port}/metrics", json=[item]) as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "success"

            async def total() -> bool:
                result = await prom_query(session, prometheus, "sum(command_executions_total)")
                return bool(result) and float(result[0]["value"][1]) == 200

            await wait_until(total, "sum(command_executions_total) == 200 in Prometheus", timeout_s=60)
            per_name = await prom_query(
                session, prometheus, "sum by (command_name) (command_executions_total)"
            )
            assert {r["metric"]["command_name"]: float(r["value"][1]) for r in per_name} == {
                "cmd-0": 100.0,
                "cmd-1": 100.0,
            }
            bucket = "sum by (le) (command_execution_duration_seconds_bucket)"

            async def counted() -> bool:
                result = await prom_query(
                    session, prometheus, "sum(command_execution_duration_seconds_count)"
                )
                return bool(result) and float(result[0]["value"][1]) == 200

            await wait_until(counted, "the duration histogram's 200 observations in Prometheus", timeout_s=60)
            buckets = sorted(
                (float(r["metric"]["le"]), float(r["value"][1]))
                for r in await prom_query(session, prometheus, bucket)
            )
            [result] = await prom_query(session, prometheus, f"histogram_quantile(0.5, {bucket})")
            median = float(result["value"][1])
            # The estimate lies in the bucket holding the 100th observation (the exact median is 1.0 s).
            upper = next(le for le, n in buckets if n >= 100)
            lower = max([0.0] + [le for le, n in buckets if n < 100])
            assert lower <= 1.0 <= upper and lower <= median <= upper, (median, buckets)
            [total_s] = await prom_query(session, prometheus, "sum(command_execution_duration_seconds_sum)")
            assert math.isclose(float(total_s["value"][1]), sum(durations_ms) / 1000)
            orgs = await prom_query(session, prometheus, "sum by (tenant_id) (command_executions_total)")
            assert {r["metric"]["tenant_id"]: float(r["value"][1]) for r in orgs} == {"acme": 200.0}

            async def inference() -> list[Any]:
                return await prom_query(session, prometheus, "model_inference_latency")

            [latency] = await wait_until(inference, "the in-house client's gauge in Prometheus", timeout_s=60)
            assert latency["metric"]["model_name"] == "bert-base" and float(latency["value"][1]) == 85.2
            assert "request_id" not in latency["metric"] and "user_id" not in latency["metric"]
    finally:
        await graph.close()


async def test_an_organization_over_1000_requests_a_minute_is_answered_429_with_rate_limit_headers() -> None:
    # The example as written; remote-write goes nowhere (the queue holds what it cannot send).
    data, _, port = example(f"http://127.0.0.1:{free_port()}/api/v1/write")
    graph = AgentGraph()
    try:
        await graph.start(data)
        url = f"http://127.0.0.1:{port}/api/metrics/agents"
        event = {"agent_name": "planner", "interaction_type": "chat", "execution_time_ms": 3000,
                 "status": "success", "input_tokens": 500, "output_tokens": 1200}  # fmt: skip
        acme = {"Authorization": f"Bearer {token('acme')}"}
        async with aiohttp.ClientSession() as session:
            # A minute's worth at once, then the bucket refills at 1,000 a minute: the requests go
            # through until the refill cannot keep up (bounded: the loop refills ~17 a second).
            answered: list[int] = []
            while len(answered) < 3000 and (not answered or answered[-1] == 200):
                async with session.post(url, json=event, headers=acme) as resp:
                    answered.append(resp.status)
                    body = await resp.json()
                    headers = resp.headers
            assert answered[:1000] == [200] * 1000 and answered[-1] == 429, answered[-5:]
            assert body["code"] == "tenant_quota" and body["status"] == "error"
            assert headers["X-RateLimit-Limit"] == "1000" and headers["X-RateLimit-Remaining"] == "0"
            assert (
                0 < float(headers["Retry-After"]) <= 60
                and headers["X-RateLimit-Reset"] == headers["Retry-After"]
            )
            # Another organization has its own budget.
            other = {"Authorization": f"Bearer {token('globex')}"}
            async with session.post(url, json=event, headers=other) as resp:
                assert resp.status == 200
    finally:
        await graph.close()


def test_rfc3339_times_read_through_the_seconds_cache_equal_the_full_parse() -> None:
    mapper = EventMapper(
        mapping_config({"metrics": [{"name": "n_total"}]}),
        max_timestamp_age_s=86400,
        max_timestamp_ahead_s=600,
        max_buckets=160,
    )
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    base = now.strftime("%Y-%m-%dT%H:%M:%S")
    good = [f"{base}Z", f"{base}.5Z", f"{base}.250Z", f"{base}.123456789Z", f"{base}.000001Z"]
    bad = [f"{base}.Z", f"{base}.1234567890Z", f"{base}.12x4Z", f"{base}+01:00Z"]
    # Twice: the first pass fills the cache, the second reads through it.
    for _ in range(2):
        for text in good:
            parsed = mapper.map([{"timestamp": text}], now_ns=time.time_ns())
            assert parsed.errors == [], text
            [point] = parsed.points
            assert point.time_unix_nano == _timestamp_ns(text)[0], text
        for text in bad:
            parsed = mapper.map([{"timestamp": text}], now_ns=time.time_ns())
            assert [e["code"] for e in parsed.errors] == ["invalid_timestamp"], text
    # A cached second is still checked against the accepted range.
    late = mapper.map([{"timestamp": f"{base}.5Z"}], now_ns=time.time_ns() + 2 * 86400 * 10**9)
    assert [e["code"] for e in late.errors] == ["timestamp_out_of_range"]


def test_label_values_and_series_are_held_to_the_receivers_limits() -> None:
    mapping = mapping_config({"labels": ["a", "b"], "metrics": [{"name": "n_total"}]})
    short = EventMapper(
        mapping,
        max_timestamp_age_s=60,
        max_timestamp_ahead_s=60,
        max_buckets=160,
        limits=SeriesLimits(max_label_value_length=10),
    )
    parsed = short.map([{"a": "x" * 10}, {"a": "x" * 11}, {"b": "é" * 6}], now_ns=10**18)
    assert [(e["index"], e["code"]) for e in parsed.errors] == [
        (1, "label_value_too_long"),
        (2, "label_value_too_long"),
    ]
    assert (
        parsed.errors[0]["reason"] == "a: is 11 bytes long; the limit is 10 (limits::max_label_value_length)"
    )
    small = EventMapper(
        mapping,
        max_timestamp_age_s=60,
        max_timestamp_ahead_s=60,
        max_buckets=160,
        limits=SeriesLimits(max_series_bytes=Size(40)),
    )
    parsed = small.map([{"a": "x" * 10, "b": "y" * 10}, {"a": "x" * 20, "b": "y" * 20}], now_ns=10**18)
    assert [(e["index"], e["code"]) for e in parsed.errors] == [(1, "series_too_large")]
    assert [p.labels for p in parsed.points] == [(("a", "x" * 10), ("b", "y" * 10))]
