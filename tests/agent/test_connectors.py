"""Connectors in the pipeline graph (agent.config, agent.service): a connector is the exporter of some
pipelines and the receiver of others. The config refuses a connector used on one side only, a signal
no supported pair joins, a cycle of pipelines through connectors and an unknown id, each at its path;
the agent runs one instance per connector, fans what it makes out to every pipeline that receives from
it, keeps refusal all or nothing across it, starts it after the pipelines it feeds and before the
receivers that feed it, and reload adds, keeps and removes connectors.

The graph is the agent's own, with test component types beside the built-ins: ``feed``, a receiver
whose consumers the test calls; ``sink``, an exporter keeping what it takes in a
:class:`tests.conftest.Sink` that, while told to refuse, refuses through its admission check (as a
full ``block`` queue does); ``mark``, a processor passing batches on; ``spans_to_count``, a connector
turning each span batch into one metric point. Each records its start and shutdown in ``graph.log``.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from agent.component import (
    Backpressure,
    ComponentId,
    ComponentKind,
    Consumer,
    Factory,
    Settings,
    Signal,
)
from agent.config import ConfigError, connector_uses
from agent.model import Kind, MetricBatch, Point, SpanBatch
from agent.registry import builtin_factories
from agent.service import Agent
from connectors.forward import Forward
from tests.conftest import AgentGraph, Sink, wait_until


@dataclass(frozen=True)
class EmptyConfig:
    pass


class Feed:
    """A test receiver: the test hands batches to ``consumers`` as a network receiver would."""

    def __init__(self, settings: Settings, consumers: Mapping[Signal, Consumer], log: list[str]) -> None:
        self.consumers = consumers
        self._settings = settings
        self._log = log

    async def start(self) -> None:
        self._log.append(f"start {self._settings.id}")
        self._settings.ready()

    async def shutdown(self) -> None:
        self._log.append(f"stop {self._settings.id}")


class SinkExporter:
    """A test exporter over a Sink: while ``sink.refuse`` is set, its admission check refuses (the
    fan-outs ask it before any consumer takes the batch); ``consume`` refuses then too."""

    def __init__(self, settings: Settings, sink: Sink, log: list[str]) -> None:
        self.sink = sink
        self._id = settings.id
        self._log = log
        settings.admission.add(self.refusal)

    def refusal(self, batch: object) -> Backpressure | None:
        return Backpressure(self.sink.reason) if self.sink.refuse else None

    async def start(self) -> None:
        self._log.append(f"start {self._id}")

    async def shutdown(self) -> None:
        self._log.append(f"stop {self._id}")

    async def consume(self, batch: Any) -> None:
        await self.sink.consume(batch)


class Mark:
    """A test processor: passes each batch on, and counts the batches it took."""

    def __init__(self, settings: Settings, next_consumer: Consumer, log: list[str]) -> None:
        self._next = next_consumer
        self._id = settings.id
        self._log = log
        self.taken = 0

    async def start(self) -> None:
        self._log.append(f"start {self._id}")

    async def shutdown(self) -> None:
        self._log.append(f"stop {self._id}")

    async def consume(self, batch: Any) -> None:
        self.taken += 1
        await self._next.consume(batch)


@dataclass(frozen=True)
class SpansToCountConfig:
    metric: str = "spans"
    """Name of the point made of each span batch."""


class SpansToCount:
    """A test connector (traces → metrics): one ``metric`` sum point per span batch."""

    def __init__(
        self, settings: Settings, config: SpansToCountConfig, next_consumer: Consumer, log: list[str]
    ) -> None:
        self._metric = config.metric
        self._next = next_consumer
        self._id = settings.id
        self._log = log

    async def start(self) -> None:
        self._log.append(f"start {self._id}")

    async def shutdown(self) -> None:
        self._log.append(f"stop {self._id}")

    async def consume(self, batch: SpanBatch) -> None:
        await self._next.consume(MetricBatch((Point(self._metric, Kind.SUM, (), 1, value=len(batch)),)))


class Graph(AgentGraph):
    """An agent built from ``yaml``-shaped data with the test types; ``sinks`` by exporter id."""

    def __init__(self) -> None:
        super().__init__()
        self.sinks: dict[str, Sink] = collections.defaultdict(Sink)
        self.log: list[str] = []
        self._factories: Mapping[tuple[ComponentKind, str], Factory] = collections.ChainMap(
            self._own(),
            builtin_factories(),  # type: ignore[arg-type]
        )

    def _own(self) -> dict[tuple[ComponentKind, str], Factory]:
        signals = frozenset(Signal)
        own = {
            (ComponentKind.RECEIVER, "feed"): Factory(
                "feed",
                ComponentKind.RECEIVER,
                EmptyConfig,
                lambda s, c, consumers: Feed(s, consumers, self.log),
                signals=signals,
            ),
            (ComponentKind.EXPORTER, "sink"): Factory(
                "sink",
                ComponentKind.EXPORTER,
                EmptyConfig,
                lambda s, c: SinkExporter(s, self.sinks[str(s.id)], self.log),
                signals=signals,
            ),
            (ComponentKind.PROCESSOR, "mark"): Factory(
                "mark",
                ComponentKind.PROCESSOR,
                EmptyConfig,
                lambda s, c, n: Mark(s, n, self.log),
                signals=signals,
            ),
            (ComponentKind.CONNECTOR, "spans_to_count"): Factory(
                "spans_to_count",
                ComponentKind.CONNECTOR,
                SpansToCountConfig,
                lambda s, c, n: SpansToCount(s, c, n, self.log),
                signal_pairs=frozenset({(Signal.TRACES, Signal.METRICS)}),
            ),
            # A receiver type named like a connector type: their ids could clash.
            (ComponentKind.RECEIVER, "forward"): Factory(
                "forward",
                ComponentKind.RECEIVER,
                EmptyConfig,
                lambda s, c, consumers: Feed(s, consumers, self.log),
            ),
        }
        return own

    def factories(self) -> Mapping[tuple[ComponentKind, str], Factory]:
        # The same Factory objects every time: a reload keeps a component only of the same factory.
        return self._factories


@pytest.fixture
async def graph() -> AsyncIterator[Graph]:
    g = Graph()
    yield g
    await g.close()


def feed(agent: Agent, rid: str = "feed", signal: Signal = Signal.METRICS) -> Consumer:
    instance = agent._receivers[ComponentId.parse(rid)].instance
    assert isinstance(instance, Feed)
    return instance.consumers[signal]


def batch(*names: str) -> MetricBatch:
    return MetricBatch(tuple(Point(n, Kind.GAUGE, (), 1, value=1.0) for n in names))


def problems(graph: Graph, data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        graph.config(data)
    return refused.value.problems


FORK: dict[str, Any] = {
    "receivers": {"feed": {}},
    "exporters": {"sink/b": {}, "sink/c": {}},
    "connectors": {"forward": {}},
    "service": {
        "pipelines": {
            "metrics/a": {"receivers": ["feed"], "exporters": ["forward"]},
            "metrics/b": {"receivers": ["forward"], "processors": ["mark"], "exporters": ["sink/b"]},
            "metrics/c": {"receivers": ["forward"], "exporters": ["sink/c"]},
        }
    },
    "processors": {"mark": {}},
}


# -- the config ------------------------------------------------------------------------------------


def test_a_connector_joins_the_pipelines_listing_it(graph: Graph) -> None:
    config = graph.config(FORK)
    forward = ComponentId("forward")
    assert list(config.connectors) == [forward]
    by_id = {p.id: p for p in config.pipelines}
    assert by_id["metrics/a"].connectors_out == (forward,) and by_id["metrics/a"].exporters == ()
    assert by_id["metrics/b"].connectors_in == (forward,) and by_id["metrics/b"].receivers == ()
    [use] = connector_uses(config)
    assert (use.id, use.input, use.output) == (forward, Signal.METRICS, Signal.METRICS)
    assert (use.upstream, use.downstream) == (("metrics/a",), ("metrics/b", "metrics/c"))


def test_a_connector_used_only_as_an_exporter_is_refused_naming_the_missing_side(graph: Graph) -> None:
    data = {
        "receivers": {"feed": {}},
        "exporters": {"sink": {}},
        "connectors": {"forward": {}},
        "service": {"pipelines": {"metrics": {"receivers": ["feed"], "exporters": ["sink", "forward"]}}},
    }
    assert problems(graph, data) == [
        "connectors::forward: connector 'forward' is used as an exporter (pipelines: metrics) but no "
        "pipeline lists it under `receivers`: a connector joins the pipelines that export to it to the "
        "pipelines that receive from it"
    ]


def test_a_connector_used_only_as_a_receiver_is_refused_naming_the_missing_side(graph: Graph) -> None:
    data = {
        "receivers": {"feed": {}},
        "exporters": {"sink": {}},
        "connectors": {"forward/in": {}},
        "service": {"pipelines": {"logs/x": {"receivers": ["feed", "forward/in"], "exporters": ["sink"]}}},
    }
    [problem] = problems(graph, data)
    assert problem.startswith(
        "connectors::forward/in: connector 'forward/in' is used as a receiver (pipelines: logs/x) but no "
        "pipeline lists it under `exporters`"
    )


def test_a_signal_pair_the_connector_does_not_support_is_refused_naming_both_signals(graph: Graph) -> None:
    data = {
        "receivers": {"feed": {}},
        "exporters": {"sink": {}},
        "connectors": {"forward": {}, "spans_to_count": {}},
        "service": {
            "pipelines": {
                "metrics": {"receivers": ["feed"], "exporters": ["forward", "spans_to_count"]},
                "traces": {"receivers": ["forward", "spans_to_count"], "exporters": ["sink"]},
            }
        },
    }
    assert problems(graph, data) == [
        "service::pipelines::metrics::exporters::0: connector 'forward' cannot turn metrics into traces "
        "(it supports: logs → logs, metrics → metrics, traces → traces)",
        "service::pipelines::traces::receivers::0: connector 'forward' cannot make traces from metrics "
        "(it supports: logs → logs, metrics → metrics, traces → traces)",
        "service::pipelines::metrics::exporters::1: connector 'spans_to_count' cannot turn metrics into "
        "traces (it supports: traces → metrics)",
        "service::pipelines::traces::receivers::1: connector 'spans_to_count' cannot make traces from "
        "metrics (it supports: traces → metrics)",
    ]


def test_a_cycle_through_connectors_is_refused_and_named(graph: Graph) -> None:
    data = {
        "receivers": {"feed": {}},
        "exporters": {"sink": {}},
        "connectors": {"forward/ab": {}, "forward/bc": {}, "forward/ca": {}},
        "service": {
            "pipelines": {
                "metrics/a": {"receivers": ["feed", "forward/ca"], "exporters": ["forward/ab"]},
                "metrics/b": {"receivers": ["forward/ab"], "exporters": ["forward/bc"]},
                "metrics/c": {"receivers": ["forward/bc"], "exporters": ["sink", "forward/ca"]},
            }
        },
    }
    assert problems(graph, data) == [
        "service::pipelines::metrics/a: the pipelines form a cycle through connectors: metrics/a → "
        "forward/ab → metrics/b → forward/bc → metrics/c → forward/ca → metrics/a; a batch would go "
        "round it forever"
    ]


def test_a_connector_feeding_its_own_pipeline_is_a_cycle(graph: Graph) -> None:
    data = {
        "receivers": {"feed": {}},
        "exporters": {"sink": {}},
        "connectors": {"forward": {}},
        "service": {
            "pipelines": {"traces": {"receivers": ["feed", "forward"], "exporters": ["sink", "forward"]}}
        },
    }
    [problem] = problems(graph, data)
    assert problem.startswith(
        "service::pipelines::traces: the pipelines form a cycle through connectors: "
        "traces → forward → traces;"
    )


def test_unknown_connector_ids_in_a_pipeline_are_refused_like_unknown_receivers(graph: Graph) -> None:
    data = {
        "receivers": {"feed": {}},
        "exporters": {"sink": {}},
        "connectors": {"forward": {}},
        "service": {
            "pipelines": {
                "metrics/a": {"receivers": ["feed"], "exporters": ["forward", "forward/typo"]},
                "metrics/b": {"receivers": ["forward", "forward/nope"], "exporters": ["sink"]},
            }
        },
    }
    assert problems(graph, data) == [
        "service::pipelines::metrics/a::exporters::1: 'forward/typo' is not defined under `exporters` or "
        "`connectors`",
        "service::pipelines::metrics/b::receivers::1: 'forward/nope' is not defined under `receivers` or "
        "`connectors`",
    ]


def test_connector_configs_are_decoded_and_checked_like_every_component(graph: Graph) -> None:
    data = {
        "receivers": {"feed": {}, "forward": {}},
        "exporters": {"sink": {}},
        "connectors": {"forward": {"unknown": 1}, "nosuch": {}, "forward/unused": {}},
        "service": {"pipelines": {"metrics": {"receivers": ["feed", "forward"], "exporters": ["sink"]}}},
    }
    found = problems(graph, data)
    unknown_type = [p for p in found if p.startswith("connectors::nosuch:")]
    assert unknown_type[0].startswith("connectors::nosuch: unknown connector type 'nosuch'; known: forward,")
    assert [p for p in found if p not in unknown_type] == [
        "connectors::forward::unknown: unknown setting; known: ",
        "connectors::forward: 'forward' is also defined under `receivers`: a pipeline could not tell which "
        "one it lists; give the connector another name (type/name)",
        # The pipeline's `forward` is the receiver: the connector of that id is used nowhere.
        "connectors::forward: defined but not used in any pipeline",
        "connectors::forward/unused: defined but not used in any pipeline",
    ]


# -- the running graph -----------------------------------------------------------------------------


async def test_every_batch_reaches_every_pipeline_the_connector_feeds(graph: Graph) -> None:
    agent = await graph.start(FORK)
    sent = [batch("a1"), batch("a2", "a3")]
    for b in sent:
        await feed(agent).consume(b)
    # forward hands the batch on as it is: both pipelines get the very same objects.
    assert graph.sinks["sink/b"].batches == sent
    assert graph.sinks["sink/c"].batches == sent
    counted = {"connector": "forward"}
    assert agent.telemetry.value("connector_incoming_points_total", **counted) == 3
    assert agent.telemetry.value("connector_outgoing_points_total", **counted) == 3
    status = agent.status()
    assert status["pipelines"]["metrics/b"]["receivers"] == ["forward"]
    assert status["pipelines"]["metrics/a"]["exporters"] == ["forward"]
    [entry] = [c for c in status["components"] if c["kind"] == "connector"]
    assert (entry["id"], entry["state"], entry["incoming"], entry["outgoing"]) == ("forward", "running", 3, 3)


async def test_a_refusal_beyond_the_connector_refuses_the_batch_before_any_pipeline_took_it(
    graph: Graph,
) -> None:
    agent = await graph.start(FORK)
    mark = next(p.instance for p in agent._processors if str(p.id) == "mark")
    graph.sinks["sink/c"].refuse = True
    for _ in range(3):  # the client resends while sink/c refuses
        with pytest.raises(Backpressure) as refused:
            await feed(agent).consume(batch("x"))
        assert refused.value.reason == "queue_full"
    # Refused at admission: not even pipeline b's processor, nor the connector, took it.
    assert graph.sinks["sink/b"].batches == [] and mark.taken == 0
    assert graph.sinks["sink/c"].calls == 0
    assert agent.telemetry.value("connector_incoming_points_total", connector="forward") == 0

    graph.sinks["sink/c"].refuse = False
    await feed(agent).consume(batch("x"))  # the resend is taken once by each
    assert [b.points[0].name for b in graph.sinks["sink/b"].batches] == ["x"]
    assert [b.points[0].name for b in graph.sinks["sink/c"].batches] == ["x"]


async def test_a_refusal_beyond_a_signal_changing_connector_refuses_the_spans(graph: Graph) -> None:
    agent = await graph.start(
        {
            "receivers": {"feed": {}},
            "exporters": {"sink/spans": {}, "sink/counts": {}},
            "connectors": {"spans_to_count": {}},
            "service": {
                "pipelines": {
                    "traces": {"receivers": ["feed"], "exporters": ["sink/spans", "spans_to_count"]},
                    "metrics": {"receivers": ["spans_to_count"], "exporters": ["sink/counts"]},
                }
            },
        }
    )
    spans = SpanBatch((), span_count=2)  # what the graph reads of a span batch is its size
    traces = feed(agent, signal=Signal.TRACES)
    graph.sinks["sink/counts"].refuse = True
    with pytest.raises(Backpressure):
        await traces.consume(spans)
    assert graph.sinks["sink/spans"].batches == []
    graph.sinks["sink/counts"].refuse = False
    await traces.consume(spans)
    assert graph.sinks["sink/spans"].batches == [spans]
    assert graph.sinks["sink/counts"].values("spans") == [2.0]


async def test_connectors_start_after_what_they_feed_and_before_what_feeds_them(graph: Graph) -> None:
    data = {
        "receivers": {"feed": {}},
        "processors": {"mark/a": {}, "mark/b": {}, "mark/c": {}},
        "exporters": {"sink/c": {}},
        "connectors": {"forward/ab": {}, "forward/bc": {}},
        "service": {
            "pipelines": {
                # Listed upstream first: the order in the file is not the order of the graph.
                "metrics/a": {"receivers": ["feed"], "processors": ["mark/a"], "exporters": ["forward/ab"]},
                "metrics/b": {
                    "receivers": ["forward/ab"],
                    "processors": ["mark/b"],
                    "exporters": ["forward/bc"],
                },
                "metrics/c": {"receivers": ["forward/bc"], "processors": ["mark/c"], "exporters": ["sink/c"]},
            }
        },
    }
    agent = await graph.start(data)
    assert graph.log == ["start sink/c", "start mark/c", "start mark/b", "start mark/a", "start feed"]
    # The connectors (forward has no log of its own) sit between the pipelines in the graph's order.
    started = [str(r.id) for group in agent._groups(start=True) for r in group]
    assert started == ["sink/c", "mark/c", "forward/bc", "mark/b", "forward/ab", "mark/a", "feed"]
    await feed(agent).consume(batch("deep"))
    assert [b.points[0].name for b in graph.sinks["sink/c"].batches] == ["deep"]
    graph.log.clear()
    await agent.stop()
    assert graph.log == ["stop feed", "stop mark/a", "stop mark/b", "stop mark/c", "stop sink/c"]


async def test_a_connector_starts_after_the_pipelines_it_feeds_and_stops_before_them(graph: Graph) -> None:
    agent = await graph.start(
        {
            "receivers": {"feed": {}},
            "processors": {"mark/up": {}, "mark/down": {}},
            "exporters": {"sink": {}},
            "connectors": {"spans_to_count": {}},
            "service": {
                "pipelines": {
                    "traces": {
                        "receivers": ["feed"],
                        "processors": ["mark/up"],
                        "exporters": ["spans_to_count"],
                    },
                    "metrics": {
                        "receivers": ["spans_to_count"],
                        "processors": ["mark/down"],
                        "exporters": ["sink"],
                    },
                }
            },
        }
    )
    assert graph.log == [
        "start sink",
        "start mark/down",
        "start spans_to_count",
        "start mark/up",
        "start feed",
    ]
    graph.log.clear()
    await agent.stop()
    assert graph.log == ["stop feed", "stop mark/up", "stop spans_to_count", "stop mark/down", "stop sink"]


async def test_a_reload_adds_keeps_and_removes_a_connector(graph: Graph) -> None:
    direct = {
        "receivers": {"feed": {}},
        "exporters": {"sink/b": {}},
        "service": {"pipelines": {"metrics/a": {"receivers": ["feed"], "exporters": ["sink/b"]}}},
    }
    agent = await graph.start(direct)
    await feed(agent).consume(batch("before"))

    assert await agent.reload(graph.config(FORK))
    [forward] = agent._connectors.values()
    assert isinstance(forward.instance, Forward) and forward.state == "running"
    await feed(agent).consume(batch("through"))
    assert [b.points[0].name for b in graph.sinks["sink/b"].batches] == ["before", "through"]
    assert [b.points[0].name for b in graph.sinks["sink/c"].batches] == ["through"]
    assert "start sink/c" in graph.log and "stop sink/b" not in graph.log  # sink/b kept running

    # Unchanged, the connector is kept (the same instance), its Link re-pointed at the new pipelines.
    fewer = {**FORK, "exporters": {"sink/b": {}}}
    fewer["service"] = {
        "pipelines": {k: v for k, v in FORK["service"]["pipelines"].items() if k != "metrics/c"}
    }
    assert await agent.reload(graph.config(fewer))
    assert list(agent._connectors.values()) == [forward]
    await feed(agent).consume(batch("kept"))
    assert [b.points[0].name for b in graph.sinks["sink/b"].batches] == ["before", "through", "kept"]
    assert [b.points[0].name for b in graph.sinks["sink/c"].batches] == ["through"]

    # Removed: it retires; the batches go straight to the exporter again.
    assert await agent.reload(graph.config(direct))
    assert agent._connectors == {}
    await wait_until(lambda: forward.state == "stopped", "the removed connector retired")
    await feed(agent).consume(batch("after"))
    assert [b.points[0].name for b in graph.sinks["sink/b"].batches][-1] == "after"


async def test_a_reload_that_changes_a_connector_replaces_it_behind_the_pipelines_feeding_it(
    graph: Graph,
) -> None:
    def data(metric: str) -> dict[str, Any]:
        return {
            "receivers": {"feed": {}},
            "exporters": {"sink": {}},
            "connectors": {"spans_to_count": {"metric": metric}},
            "service": {
                "pipelines": {
                    "traces": {"receivers": ["feed"], "exporters": ["spans_to_count"]},
                    "metrics": {"receivers": ["spans_to_count"], "exporters": ["sink"]},
                }
            },
        }

    agent = await graph.start(data("spans"))
    [old] = agent._connectors.values()
    await feed(agent, signal=Signal.TRACES).consume(SpanBatch((), span_count=1))
    assert await agent.reload(graph.config(data("calls")))
    [new] = agent._connectors.values()
    assert new is not old and new.state == "running"
    await feed(agent, signal=Signal.TRACES).consume(SpanBatch((), span_count=3))
    assert [(p.name, p.value) for p in graph.sinks["sink"].points()] == [("spans", 1.0), ("calls", 3.0)]
    await wait_until(lambda: old.state == "stopped", "the replaced connector retired")
    assert graph.log.count("start spans_to_count") == 2 and graph.log.count("stop spans_to_count") == 1
    assert "stop sink" not in graph.log and "stop feed" not in graph.log  # the rest kept running


async def test_one_connector_joins_pipelines_of_two_signals_and_merges_pipelines(graph: Graph) -> None:
    agent = await graph.start(
        {
            "receivers": {"feed": {}, "feed/2": {}},
            "exporters": {"sink/metrics": {}, "sink/traces": {}},
            "connectors": {"forward": {}},
            "service": {
                "pipelines": {
                    "metrics/a": {"receivers": ["feed"], "exporters": ["forward"]},
                    "metrics/b": {"receivers": ["feed/2"], "exporters": ["forward"]},
                    "metrics/merged": {"receivers": ["forward"], "exporters": ["sink/metrics"]},
                    "traces/a": {"receivers": ["feed"], "exporters": ["forward"]},
                    "traces/b": {"receivers": ["forward"], "exporters": ["sink/traces"]},
                }
            },
        }
    )
    # One instance per signal pair used, each counted under its own label.
    assert sorted((k[1].value, k[2].value) for k in agent._connectors) == [
        ("metrics", "metrics"),
        ("traces", "traces"),
    ]
    await feed(agent).consume(batch("from-a"))
    await feed(agent, "feed/2").consume(batch("from-b"))
    spans = SpanBatch((), span_count=2)
    await feed(agent, signal=Signal.TRACES).consume(spans)
    assert [b.points[0].name for b in graph.sinks["sink/metrics"].batches] == ["from-a", "from-b"]
    assert graph.sinks["sink/traces"].batches == [spans]
    value = agent.telemetry.value
    assert value("connector_incoming_points_total", connector="forward@metrics-to-metrics") == 2
    assert value("connector_incoming_points_total", connector="forward@traces-to-traces") == 2
