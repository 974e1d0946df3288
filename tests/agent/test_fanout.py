"""Refusal is all or nothing (agent.service.Fanout, agent.component.Admission): a batch refused with
Backpressure was taken by no exporter of any pipeline it would have reached, and one accepted was taken
whole by every one of them — so a client that resends a refused batch never duplicates data.

The graph is the agent's own (agent.service.Agent built from config), with two test component types
registered beside the built-ins: ``feed``, a receiver whose consumers the test calls, and ``queued``, an
exporter on the real agent.sending.Sender (memory queue, ``full_policy: block``) whose backend holds
every send until the test opens it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from agent.component import (
    Admission,
    Backpressure,
    ComponentId,
    ComponentKind,
    Consumer,
    Factory,
    Settings,
    Signal,
    Tasks,
    admit,
    admitted,
    end_admission,
)
from agent.model import Kind, MetricBatch, Point
from agent.registry import builtin_factories
from agent.sending import QueueConfig, Request, RetryConfig, Sender
from agent.service import Agent, Fanout
from agent.telemetry import Telemetry
from tests.conftest import AgentGraph, Sink, component_settings, wait_until


class Backend:
    """Where a ``queued`` exporter sends: keeps each payload once its send completes; while closed,
    every send waits (the exporter's queue then fills up)."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.open = asyncio.Event()
        self.open.set()
        self.sending = 0

    async def send(self, request: Request) -> None:
        self.sending += 1
        try:
            await self.open.wait()
        finally:
            self.sending -= 1
        self.got.append(request.payload)


@dataclass(frozen=True)
class QueuedConfig:
    queue_size: int = 1
    """Requests the memory queue holds (one request per point) before it refuses (block)."""


class Queued:
    """A test exporter: one request per point (its name), on a real Sender with a blocking queue.
    ``hold``, when set, makes ``consume`` wait for it before it offers anything."""

    def __init__(self, settings: Settings, config: QueuedConfig, backend: Backend) -> None:
        queue = QueueConfig(queue_size=config.queue_size, full_policy="block")
        self._sender = Sender(settings, backend.send, queue, RetryConfig(), 30.0)
        self.hold: asyncio.Event | None = None

    async def start(self) -> None:
        await self._sender.start()

    async def shutdown(self) -> None:
        await self._sender.shutdown(1.0)

    async def consume(self, batch: MetricBatch) -> None:
        if self.hold is not None:
            await self.hold.wait()
        for p in batch.points:
            self._sender.offer(Request(p.name.encode(), 1))
        await self._sender.commit()


@dataclass(frozen=True)
class FeedConfig:
    pass


class Feed:
    """A test receiver: the test hands batches to ``consumers`` as a network receiver would."""

    def __init__(self, settings: Settings, consumers: Mapping[Signal, Consumer]) -> None:
        self.consumers = consumers
        self._ready = settings.ready

    async def start(self) -> None:
        self._ready()

    async def shutdown(self) -> None:
        pass


class Graph(AgentGraph):
    """An agent built from ``yaml``-shaped data with the test types; ``backends`` by exporter id."""

    def __init__(self) -> None:
        super().__init__()
        self.backends: dict[str, Backend] = collections.defaultdict(Backend)

    def factories(self) -> Mapping[tuple[ComponentKind, str], Factory]:
        own = {
            (ComponentKind.RECEIVER, "feed"): Factory(
                "feed", ComponentKind.RECEIVER, FeedConfig, lambda s, c, consumers: Feed(s, consumers)
            ),
            (ComponentKind.EXPORTER, "queued"): Factory(
                "queued",
                ComponentKind.EXPORTER,
                QueuedConfig,
                lambda s, c: Queued(s, c, self.backends[str(s.id)]),
            ),
        }
        return collections.ChainMap(own, builtin_factories())  # type: ignore[arg-type]

    async def close(self) -> None:
        for backend in self.backends.values():
            backend.open.set()
        await super().close()


@pytest.fixture
async def graph() -> AsyncIterator[Graph]:
    g = Graph()
    yield g
    await g.close()


def feed(agent: Agent, rid: str = "feed") -> Consumer:
    instance = agent._receivers[ComponentId.parse(rid)].instance
    assert isinstance(instance, Feed)
    return instance.consumers[Signal.METRICS]


def exporter(agent: Agent, eid: str) -> Queued:
    instance = agent._exporters[ComponentId.parse(eid)].instance
    assert isinstance(instance, Queued)
    return instance


def batch(*names: str) -> MetricBatch:
    return MetricBatch(tuple(Point(n, Kind.GAUGE, (), 1, value=1.0) for n in names))


def names(*values: str) -> list[bytes]:
    return [v.encode() for v in values]


async def fill(agent: Agent, graph: Graph, eid: str, first: str, second: str) -> None:
    """Close ``eid``'s backend and fill its queue (size 1): ``first`` is being sent (held by the
    backend), ``second`` waits in the queue."""
    graph.backends[eid].open.clear()
    await feed(agent).consume(batch(first))
    await wait_until(lambda: graph.backends[eid].sending == 1, f"{eid} sending {first}")
    await feed(agent).consume(batch(second))


def idle(agent: Agent, graph: Graph, eid: str) -> bool:
    """Nothing queued in exporter ``eid`` nor being sent by it."""
    queued = agent.telemetry.value("exporter_queue_size", exporter=eid)
    return graph.backends[eid].sending == 0 and queued == 0


async def each_exactly_once(agent: Agent, graph: Graph, *want: str) -> None:
    """Once both exporters are idle with every point sent: each point in each backend exactly once."""
    for eid in ("queued/fast", "queued/full"):
        await wait_until(
            lambda: idle(agent, graph, eid) and len(graph.backends[eid].got) >= len(want),  # noqa: B023
            f"{eid} drained",
        )
        assert sorted(graph.backends[eid].got) == sorted(names(*want)), eid


async def resend_until_taken(agent: Agent, b: MetricBatch, rid: str = "feed") -> int:
    """Resend ``b`` after each refusal, as a client does after a 429 — each time once the exporters
    admit again, instead of after a backoff; the number of refusals."""
    refused = 0
    while True:
        try:
            await feed(agent, rid).consume(b)
            return refused
        except Backpressure:
            refused += 1
            await wait_until(
                lambda: all(a.refusal(b) is None for a in agent._admissions.values()), "room again"
            )


ONE_PIPELINE: dict[str, Any] = {
    "receivers": {"feed": {}},
    "exporters": {"queued/fast": {"queue_size": 1000}, "queued/full": {"queue_size": 1}},
    "service": {
        "pipelines": {"metrics": {"receivers": ["feed"], "exporters": ["queued/fast", "queued/full"]}}
    },
}


async def test_a_batch_one_exporter_refuses_is_taken_by_none_and_its_resends_arrive_once(
    graph: Graph,
) -> None:
    agent = await graph.start(ONE_PIPELINE)
    await fill(agent, graph, "queued/full", "a", "b")

    for _ in range(3):  # the client resends while the exporter stays full
        with pytest.raises(Backpressure) as refused:
            await feed(agent).consume(batch("c1", "c2", "c3"))
        assert refused.value.reason == "queue_full"
    await wait_until(lambda: idle(agent, graph, "queued/fast"), "fast idle")
    assert graph.backends["queued/fast"].got == names("a", "b")  # nothing of the refused batch
    assert agent.telemetry.value("exporter_queue_size", exporter="queued/fast") == 0

    # Once the full exporter drains, the resend is taken: each point then in each backend once.
    graph.backends["queued/full"].open.set()
    await resend_until_taken(agent, batch("c1", "c2", "c3"))
    await resend_until_taken(agent, batch("d"))
    await each_exactly_once(agent, graph, "a", "b", "c1", "c2", "c3", "d")


async def test_an_admitted_batch_is_taken_whole_past_the_queue_size(graph: Graph) -> None:
    agent = await graph.start(ONE_PIPELINE)
    graph.backends["queued/full"].open.clear()
    await feed(agent).consume(batch("a"))
    await wait_until(lambda: graph.backends["queued/full"].sending == 1, "full sending a")

    # The queue has room for one request: the batch of three is admitted and taken whole, not one of
    # its requests queued and then the batch refused (which a resend would have duplicated).
    await feed(agent).consume(batch("b1", "b2", "b3"))
    assert agent.telemetry.value("exporter_queue_size", exporter="queued/full") == 3
    with pytest.raises(Backpressure):  # now it is full: the next batch is refused whole
        await feed(agent).consume(batch("c"))
    graph.backends["queued/full"].open.set()
    await each_exactly_once(agent, graph, "a", "b1", "b2", "b3")


async def test_a_queue_filled_after_the_admission_still_takes_the_batch(graph: Graph) -> None:
    """Between the admission and the hand-over to the second exporter the first one awaits (its
    encoding yields to the loop); another receiver fills the second exporter's queue meanwhile. The
    batch was admitted, so the second exporter takes it all the same: the first had taken it."""
    agent = await graph.start(
        {
            "receivers": {"feed": {}, "feed/other": {}},
            "exporters": {"queued/fast": {"queue_size": 1000}, "queued/full": {"queue_size": 1}},
            "service": {
                "pipelines": {
                    "metrics": {"receivers": ["feed"], "exporters": ["queued/fast", "queued/full"]},
                    "metrics/other": {"receivers": ["feed/other"], "exporters": ["queued/full"]},
                }
            },
        }
    )
    graph.backends["queued/full"].open.clear()
    await feed(agent, "feed/other").consume(batch("a"))
    await wait_until(lambda: graph.backends["queued/full"].sending == 1, "full sending a")
    fast = exporter(agent, "queued/fast")
    fast.hold = asyncio.Event()
    handing = asyncio.create_task(feed(agent).consume(batch("x1", "x2")))
    await wait_until(lambda: agent._entries[ComponentId.parse("queued/fast")]._active == 1, "x in fast")
    await feed(agent, "feed/other").consume(batch("y"))  # the full exporter's queue is full now
    with pytest.raises(Backpressure):
        await feed(agent, "feed/other").consume(batch("z"))
    fast.hold.set()
    await handing  # no Backpressure: admitted before the queue filled
    graph.backends["queued/full"].open.set()
    await wait_until(lambda: len(graph.backends["queued/full"].got) >= 4, "full sent everything")
    assert sorted(graph.backends["queued/full"].got) == sorted(names("a", "y", "x1", "x2"))
    await wait_until(lambda: len(graph.backends["queued/fast"].got) >= 2, "fast sent x")
    assert sorted(graph.backends["queued/fast"].got) == sorted(names("x1", "x2"))


async def test_a_refusal_in_one_pipeline_keeps_the_batch_out_of_the_others(graph: Graph) -> None:
    """A receiver feeding two pipelines (one through a processor): the second pipeline's exporter is
    full, so the batch enters neither — not the first pipeline's processor, nor its exporter."""
    agent = await graph.start(
        {
            "receivers": {"feed": {}},
            "processors": {"batch": {"timeout": "0s"}},
            "exporters": {"queued/fast": {"queue_size": 1000}, "queued/full": {"queue_size": 1}},
            "service": {
                "pipelines": {
                    "metrics/a": {
                        "receivers": ["feed"],
                        "processors": ["batch"],
                        "exporters": ["queued/fast"],
                    },
                    "metrics/b": {"receivers": ["feed"], "exporters": ["queued/full"]},
                }
            },
        }
    )
    await fill(agent, graph, "queued/full", "a", "b")
    incoming = agent.telemetry.value("processor_incoming_points_total", processor="batch@metrics/a")
    for _ in range(3):  # the client retries while the exporter stays full
        with pytest.raises(Backpressure):
            await feed(agent).consume(batch("c"))
    assert agent.telemetry.value("processor_incoming_points_total", processor="batch@metrics/a") == incoming
    await wait_until(lambda: idle(agent, graph, "queued/fast"), "fast idle")
    assert graph.backends["queued/fast"].got == names("a", "b")
    graph.backends["queued/full"].open.set()
    await resend_until_taken(agent, batch("c"))
    await each_exactly_once(agent, graph, "a", "b", "c")


async def test_a_replaced_exporter_answers_through_the_same_admission(graph: Graph) -> None:
    """A reload that changes the full exporter replaces its instance behind the same entry; the
    fan-outs keep asking it: the successor's full queue refuses a batch before the other took it."""
    agent = await graph.start(ONE_PIPELINE)
    changed = {**ONE_PIPELINE, "exporters": {**ONE_PIPELINE["exporters"], "queued/full": {"queue_size": 2}}}
    assert await agent.reload(graph.config(changed))
    graph.backends["queued/full"].open.clear()
    await feed(agent).consume(batch("a"))
    await wait_until(lambda: graph.backends["queued/full"].sending == 1, "full sending a")
    await feed(agent).consume(batch("b", "c"))
    with pytest.raises(Backpressure):
        await feed(agent).consume(batch("d"))
    await wait_until(lambda: idle(agent, graph, "queued/fast"), "fast idle")
    assert sorted(graph.backends["queued/fast"].got) == sorted(names("a", "b", "c"))


# -- the Fanout and Admission on their own ---------------------------------------------------------


async def test_fanout_asks_every_gate_before_any_consumer_and_hands_on_admitted() -> None:
    first, second = Sink(), Sink()
    seen: list[bool] = []

    class Recorder(Sink):
        async def consume(self, batch: Any) -> None:
            seen.append(admitted())
            await super().consume(batch)

    gate = Admission()
    full = [True]
    gate.add(lambda b: Backpressure("queue_full") if full[0] else None)
    fanout = Fanout([first, Recorder(), second], [Admission(), gate])
    with pytest.raises(Backpressure):
        await fanout.consume(batch("x"))
    assert first.calls == second.calls == 0 and seen == []
    full[0] = False
    await fanout.consume(batch("x"))
    assert len(first.batches) == len(second.batches) == 1 and seen == [True]
    assert not admitted()  # only for the hand-over


async def test_an_admitted_hand_over_does_not_ask_the_gates_again() -> None:
    gate = Admission()
    gate.add(lambda b: Backpressure("queue_full"))
    sink = Sink()
    token = admit()
    try:
        await Fanout([sink], [gate]).consume(batch("x"))  # an outer fan-out admitted it
    finally:
        end_admission(token)
    assert len(sink.batches) == 1
    with pytest.raises(Backpressure):
        await Fanout([sink], [gate]).consume(batch("y"))


async def test_tasks_started_during_an_admitted_hand_over_are_not_admitted() -> None:
    tasks = Tasks("test", logging.getLogger("test.fanout"))
    seen: list[bool] = []

    async def note() -> None:
        seen.append(admitted())

    token = admit()
    try:
        task = tasks.spawn(note(), "note")
    finally:
        end_admission(token)
    await task
    assert seen == [False]


async def test_a_stopped_sender_leaves_the_admission() -> None:
    settings = component_settings(Telemetry(), ComponentKind.EXPORTER, "test")
    backend = Backend()
    backend.open.clear()
    sender = Sender(settings, backend.send, QueueConfig(queue_size=1, full_policy="block"), RetryConfig(), 5)
    await sender.start()
    sender.offer(Request(b"a", 1))
    await wait_until(lambda: backend.sending == 1, "a being sent")
    sender.offer(Request(b"b", 1))
    assert settings.admission.refusal(batch("c")) is not None
    backend.open.set()
    await sender.shutdown(5.0)
    assert settings.admission.refusal(batch("c")) is None
    assert backend.got == [b"a", b"b"]
