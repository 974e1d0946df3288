"""The tap hub on a running agent: StatsD lines sent with the ``statsd`` client show up on the edges
asked for, filtered by component, name and labels; the Links of an unwatched graph carry no tap; what a
subscriber cannot take is dropped, counted and told; the top-metrics tracker counts series and
labels at the receivers' output and stops when nobody asks."""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import pytest
import statsd

from agent.config import TapConfig
from agent.service import Agent
from agent.tap import TOP_IDLE_S, Direction, LabelMatcher, TapFilter, TapFull, TapSubscription
from tests.conftest import AgentGraph, free_port, wait_until


def _config(
    port: int, processors: list[str] | None = None, tap: dict[str, Any] | None = None
) -> dict[str, Any]:
    procs = processors or []
    return {
        "receivers": {"statsd": {"udp": f"127.0.0.1:{port}", "flush_interval": "50ms"}},
        "processors": {p: {} for p in procs},
        "exporters": {"debug": {"verbosity": "basic"}},
        "service": {
            "telemetry": {"tap": tap or {}},
            "pipelines": {"metrics": {"receivers": ["statsd"], "processors": procs, "exporters": ["debug"]}},
        },
    }


async def _start(agents: AgentGraph, data: dict[str, Any]) -> Agent:
    """``agents.start`` keeping the test's ``service.telemetry.tap`` (AgentGraph turns the endpoint off
    by replacing the telemetry block)."""
    tap = data["service"]["telemetry"]["tap"]
    config = agents.config(data)
    telemetry = dataclasses.replace(
        config.service.telemetry, tap=TapConfig(**{**tap, "redact": tuple(tap.get("redact", ()))})
    )
    agent = Agent(
        dataclasses.replace(config, service=dataclasses.replace(config.service, telemetry=telemetry))
    )
    agents.agents.append(agent)
    await agent.start()
    return agent


def _links(agent: Agent) -> list[Any]:
    return [e.link for e in agent._tap_edges()]


async def _items(sub: TapSubscription, want: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len([m for m in got if m["type"] == "point"]) < want:
        got += await sub.get()
    return got


def _send(port: int, lines: list[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto("\n".join(lines).encode(), ("127.0.0.1", port))


async def test_an_unwatched_graph_has_no_tap_on_any_link(agents: AgentGraph) -> None:
    agent = await _start(agents, _config(free_port(socket.SOCK_DGRAM), ["batch"]))
    links = _links(agent)
    assert len(links) == 3  # statsd out (+ batch in), batch out, debug in
    assert all(link.tap is None for link in links)
    sub = agent.tap.subscribe(TapFilter.parse(component="debug", direction="in"))
    assert sorted(sub.edges.result()) == ["debug in"]
    assert [link.tap is not None for link in links] == [False, False, True]
    sub.close()
    assert all(link.tap is None for link in links)
    assert agent.tap.subscribers == 0


async def test_statsd_lines_appear_at_the_edges_asked_for(agents: AgentGraph) -> None:
    port = free_port(socket.SOCK_DGRAM)
    agent = await _start(agents, _config(port, ["batch"]))
    out = agent.tap.subscribe(TapFilter.parse(component="statsd", name="app.*"))
    into = agent.tap.subscribe(TapFilter.parse(component="batch", direction="in"))
    assert out.edges.result() == ["statsd out"]
    assert into.edges.result() == ["batch@metrics in"]
    client = statsd.StatsClient("127.0.0.1", port)
    client.incr("app.requests", 3)
    client.gauge("other.temp", 21.5)
    points = [m for m in await _items(out, 1) if m["type"] == "point"]
    assert {p["name"] for p in points} == {"app.requests"}  # other.temp: not the name asked for
    [p] = points
    assert p["component"] == "statsd" and p["component_kind"] == "receiver" and p["direction"] == "out"
    assert p["signal"] == "metrics" and p["kind"] == "sum" and p["value"] == 3.0
    entering = await _items(into, 2)
    assert {(m["component"], m["direction"], m["name"]) for m in entering} == {
        ("batch@metrics", "in", "app.requests"),
        ("batch@metrics", "in", "other.temp"),
    }
    out.close()
    into.close()


async def test_label_matchers_and_redaction(agents: AgentGraph) -> None:
    port = free_port(socket.SOCK_DGRAM)
    agent = await _start(agents, _config(port, tap={"redact": ["user"]}))
    sub = agent.tap.subscribe(TapFilter.parse(match=["route=~/api/.*", "code!=500"]))
    _send(
        port,
        [
            "hits:1|c|#route:/api/a,code:200,user:alice",
            "hits:1|c|#route:/api/b,code:500,user:bob",
            "hits:1|c|#route:/static,code:200,user:carol",
        ],
    )
    [p] = [m for m in await _items(sub, 1) if m["type"] == "point"]
    assert p["labels"] == {"route": "/api/a", "code": "200", "user": "<redacted>"}
    sub.close()


def test_label_matchers_parse_and_refuse() -> None:
    assert LabelMatcher.parse("a=b").matches("b")
    assert not LabelMatcher.parse("a!=b").matches("b")
    assert LabelMatcher.parse("a=~b.*").matches("bcd") and not LabelMatcher.parse("a=~b").matches("bc")
    assert LabelMatcher.parse("a!~b.*").matches("cb")
    assert LabelMatcher.parse("a=").matches("")  # a missing label is the empty value
    with pytest.raises(ValueError, match="not a label matcher"):
        LabelMatcher.parse("justaname")
    with pytest.raises(ValueError, match="regex is not valid"):
        LabelMatcher.parse("a=~(")
    with pytest.raises(ValueError, match="signal"):
        TapFilter.parse(signal="metrics,spans")
    with pytest.raises(ValueError, match="direction"):
        TapFilter.parse(direction="sideways")
    assert TapFilter.parse(direction="both").directions == {Direction.IN, Direction.OUT}


async def test_what_the_rate_limit_and_the_buffer_cannot_take_is_dropped_counted_and_told(
    agents: AgentGraph,
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    agent = await _start(agents, _config(port, tap={"rate_limit_per_s": 1, "buffer": 1}))
    sub = agent.tap.subscribe(TapFilter.parse(component="statsd"))
    _send(port, [f"m{i}:1|c" for i in range(20)])  # one flush of 20 series: 1 shown, 19 dropped
    messages: list[dict[str, Any]] = []
    while (
        sum(m["count"] for m in messages if m["type"] == "dropped")
        + len([m for m in messages if m["type"] == "point"])
        < 20
    ):
        messages += await sub.get()
    assert len([m for m in messages if m["type"] == "point"]) == 1
    assert {m["reason"] for m in messages if m["type"] == "dropped"} == {"rate"}
    t = agent.telemetry
    assert t.value("tap_dropped_total", reason="rate") == 19
    # The buffer: a client that does not read keeps at most `buffer` items.
    sub2 = agent.tap.subscribe(TapFilter.parse(component="statsd"))
    sub2._rate = sub2._burst = sub2._tokens = 1000.0  # only the buffer limits this one
    _send(port, [f"n{i}:1|c" for i in range(5)])
    await wait_until(lambda: t.value("tap_dropped_total", reason="buffer") >= 4, "buffer drops")
    assert len(sub2.items) == 1
    assert sub2.notices() == [{"type": "dropped", "count": 4, "reason": "buffer"}]
    sub.close()
    sub2.close()


async def test_max_subscribers_refuses_one_more(agents: AgentGraph) -> None:
    agent = await _start(agents, _config(free_port(socket.SOCK_DGRAM), tap={"max_subscribers": 1}))
    first = agent.tap.subscribe(TapFilter())
    with pytest.raises(TapFull, match="max_subscribers"):
        agent.tap.subscribe(TapFilter())
    first.close()
    agent.tap.subscribe(TapFilter()).close()


async def test_top_metrics_counts_series_points_and_labels_while_asked(agents: AgentGraph) -> None:
    port = free_port(socket.SOCK_DGRAM)
    agent = await _start(agents, _config(port))
    assert agent.tap.top_metrics(5) == []  # the first call starts it
    receiver_link = _links(agent)[0]
    assert receiver_link.tap is not None
    _send(port, [f"req:1|c|#path:/p{i},code:{i % 2}" for i in range(6)] + ["one:1|g"])

    def both_seen() -> list[dict[str, Any]]:
        top = agent.tap.top_metrics(5)
        return top if {r["name"] for r in top} == {"req", "one"} else []

    top = await wait_until(both_seen, "the tracker to see both metrics")
    assert top[0]["name"] == "req" and top[0]["series"] == 6
    assert top[0]["labels"] == [{"name": "path", "values": 6}, {"name": "code", "values": 2}]
    assert top[1] == {"name": "one", "series": 1, "points_per_s": top[1]["points_per_s"], "labels": []}
    assert top[1]["points_per_s"] > 0
    # Nobody asks for TOP_IDLE_S: the next batch removes the tracker's tap.
    agent.tap._top_asked -= TOP_IDLE_S + 1
    _send(port, ["one:2|g"])
    await wait_until(lambda: receiver_link.tap is None, "the tracker to stop")


async def test_a_subscription_survives_a_reload_and_follows_the_new_graph(agents: AgentGraph) -> None:
    port = free_port(socket.SOCK_DGRAM)
    agent = await _start(agents, _config(port))
    sub = agent.tap.subscribe(TapFilter.parse(direction="both"))
    assert sub.edges.result() == ["debug in", "statsd out"]
    assert await agent.reload(agents.config(_config(port, ["batch"])))
    assert sorted(str(p) for e in agent._tap_edges() for p in e.points if e.link.tap is not None) == [
        "batch@metrics in",
        "batch@metrics out",
        "debug in",
        "statsd out",
    ]
    statsd.StatsClient("127.0.0.1", port).incr("after.reload")
    seen = {(m["component"], m["direction"]) for m in await _items(sub, 4) if m["type"] == "point"}
    assert seen == {("statsd", "out"), ("batch@metrics", "in"), ("batch@metrics", "out"), ("debug", "in")}
    sub.close()


async def test_max_subscribers_0_turns_the_tap_off(agents: AgentGraph) -> None:
    agent = await _start(agents, _config(free_port(socket.SOCK_DGRAM), tap={"max_subscribers": 0}))
    with pytest.raises(TapFull, match="the tap is off"):
        agent.tap.subscribe(TapFilter())
    assert all(link.tap is None for link in _links(agent))
