"""The service graph (agent.service.Agent) built from config: fan-out, start and stop order, rollback.

Three test component types are registered beside the built-ins, and each writes what it does to one
journal, in order: ``source`` (a receiver whose consumers the test calls), ``step`` (a processor that
passes each batch on, or with ``hold`` keeps them until it stops and then flushes them), and ``keep`` (an
exporter that keeps every batch, a :class:`tests.conftest.Sink`). Any of them fails to start with
``fail_start``, the way a taken port does: with an error that does not name the component. A source
with ``listen`` opens a listening socket on 127.0.0.1 first, which only its shutdown closes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import ChainMap
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from agent.component import ComponentKind, Consumer, Factory, Settings, Signal
from agent.model import Batch, Kind, MetricBatch, Point
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import AgentGraph, Sink, wait_until

Journal = list[tuple[str, str]]
"""(what, component) in the order it happened: what is start, stop, stopping or consume; the component
is its telemetry label (``kind/name``, a processor's with ``@pipeline``)."""


def _start(journal: Journal, label: str, fail: bool) -> None:
    if fail:
        raise OSError(errno.EADDRINUSE, "Address already in use")
    journal.append(("start", label))


@dataclass(frozen=True)
class PartConfig:
    fail_start: bool = False
    """Raise from start, as a component whose port is taken does."""
    hold: bool = False
    """A step only: keep every batch until it stops, then pass them on (as the batch processor does)."""
    listen: bool = False
    """A source only: open a listening socket on 127.0.0.1 in start, before ``fail_start`` fails it."""


class Source:
    """A test receiver: the test hands batches to ``consumers`` as a network receiver would."""

    def __init__(
        self, settings: Settings, config: PartConfig, consumers: Mapping[Signal, Consumer], journal: Journal
    ) -> None:
        self.label = settings.telemetry.id
        self.config = config
        self.consumers = consumers
        self.journal = journal
        self._ready = settings.ready
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.config.listen:
            self.server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        _start(self.journal, self.label, self.config.fail_start)
        self._ready()

    async def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.journal.append(("stop", self.label))


class Step:
    """A test processor: passes each batch on unchanged, or with ``hold`` keeps them until shutdown, which
    waits for ``flush`` (the test sets it) and then passes them on."""

    def __init__(self, settings: Settings, config: PartConfig, next: Consumer, journal: Journal) -> None:
        self.label = settings.telemetry.id
        self.config = config
        self.next = next
        self.journal = journal
        self.held: list[Batch] = []
        self.flush = asyncio.Event()

    async def start(self) -> None:
        _start(self.journal, self.label, self.config.fail_start)

    async def consume(self, batch: Batch) -> None:
        self.journal.append(("consume", self.label))
        if self.config.hold:
            self.held.append(batch)
            return
        await self.next.consume(batch)

    async def shutdown(self) -> None:
        if self.held:
            self.journal.append(("stopping", self.label))
            await self.flush.wait()
            held, self.held = self.held, []
            for batch in held:
                await self.next.consume(batch)
        self.journal.append(("stop", self.label))


class Keep(Sink):
    """A test exporter: keeps every batch (a Sink)."""

    def __init__(self, settings: Settings, config: PartConfig, journal: Journal) -> None:
        super().__init__()
        self.label = settings.telemetry.id
        self.config = config
        self.journal = journal

    async def start(self) -> None:
        _start(self.journal, self.label, self.config.fail_start)

    async def consume(self, batch: Batch) -> None:
        self.journal.append(("consume", self.label))
        await super().consume(batch)

    async def shutdown(self) -> None:
        self.journal.append(("stop", self.label))


class Graph(AgentGraph):
    """Agents built from ``yaml``-shaped data with the test types; every instance by its label."""

    def __init__(self) -> None:
        super().__init__()
        self.journal: Journal = []
        self.parts: dict[str, Any] = {}

    def _made(self, part: Any) -> Any:
        self.parts[part.label] = part
        return part

    def factories(self) -> Mapping[tuple[ComponentKind, str], Factory]:
        j = self.journal
        own = {
            (ComponentKind.RECEIVER, "source"): Factory(
                "source", ComponentKind.RECEIVER, PartConfig, lambda s, c, cs: self._made(Source(s, c, cs, j))
            ),
            (ComponentKind.PROCESSOR, "step"): Factory(
                "step", ComponentKind.PROCESSOR, PartConfig, lambda s, c, n: self._made(Step(s, c, n, j))
            ),
            (ComponentKind.EXPORTER, "keep"): Factory(
                "keep", ComponentKind.EXPORTER, PartConfig, lambda s, c: self._made(Keep(s, c, j))
            ),
        }
        return ChainMap(own, builtin_factories())  # type: ignore[arg-type]

    async def feed(self, source: str, batch: MetricBatch) -> None:
        part = self.parts[source]
        assert isinstance(part, Source)
        await part.consumers[Signal.METRICS].consume(batch)

    def kept(self, exporter: str) -> list[Batch]:
        part = self.parts[exporter]
        assert isinstance(part, Keep)
        return part.batches

    def did(self, what: str) -> list[str]:
        """The components that did ``what``, in order."""
        return [label for w, label in self.journal if w == what]


@pytest.fixture
async def graph() -> AsyncIterator[Graph]:
    g = Graph()
    yield g
    for part in g.parts.values():
        if isinstance(part, Step):
            part.flush.set()
    await g.close()


def batch(name: str) -> MetricBatch:
    return MetricBatch((Point(name, Kind.GAUGE, (), 1, value=1.0),))


def kind_of(label: str) -> str:
    return label.split("/")[0]


# -- fan-out ----------------------------------------------------------------------------------------


async def test_one_receiver_feeding_two_pipelines_gives_each_every_batch_once(graph: Graph) -> None:
    """Each pipeline has its own instance of a processor both list; each sees every batch once."""
    await graph.start(
        {
            "receivers": {"source": {}},
            "processors": {"step": {}},
            "exporters": {"keep/a": {}, "keep/b": {}},
            "service": {
                "pipelines": {
                    "metrics/a": {"receivers": ["source"], "processors": ["step"], "exporters": ["keep/a"]},
                    "metrics/b": {"receivers": ["source"], "processors": ["step"], "exporters": ["keep/b"]},
                }
            },
        }
    )
    sent = [batch("x"), batch("y"), batch("z")]
    for b in sent:
        await graph.feed("source", b)
    assert graph.kept("keep/a") == sent
    assert graph.kept("keep/b") == sent
    assert graph.parts["step@metrics/a"] is not graph.parts["step@metrics/b"]
    consumed = graph.did("consume")
    assert consumed.count("step@metrics/a") == consumed.count("step@metrics/b") == 3


async def test_one_pipeline_fanning_to_two_exporters_gives_each_every_batch_once(graph: Graph) -> None:
    """Both exporters take the very batch the processor passed on: no copy per exporter."""
    await graph.start(
        {
            "receivers": {"source": {}},
            "processors": {"step": {}},
            "exporters": {"keep/a": {}, "keep/b": {}},
            "service": {
                "pipelines": {
                    "metrics": {
                        "receivers": ["source"],
                        "processors": ["step"],
                        "exporters": ["keep/a", "keep/b"],
                    }
                }
            },
        }
    )
    sent = [batch("x"), batch("y")]
    for b in sent:
        await graph.feed("source", b)
    assert graph.kept("keep/a") == sent
    assert graph.kept("keep/b") == sent
    assert all(a is b for a, b in zip(graph.kept("keep/a"), graph.kept("keep/b"), strict=True))
    assert graph.did("consume").count("step@metrics") == 2


async def test_an_exporter_two_pipelines_list_is_one_instance_taking_each_pipelines_batches(
    graph: Graph,
) -> None:
    await graph.start(
        {
            "receivers": {"source/a": {}, "source/b": {}},
            "exporters": {"keep": {}},
            "service": {
                "pipelines": {
                    "metrics/a": {"receivers": ["source/a"], "exporters": ["keep"]},
                    "metrics/b": {"receivers": ["source/b"], "exporters": ["keep"]},
                }
            },
        }
    )
    from_a, from_b = batch("a"), batch("b")
    await graph.feed("source/a", from_a)
    await graph.feed("source/b", from_b)
    assert graph.kept("keep") == [from_a, from_b]
    assert graph.did("start").count("keep") == 1


# -- start and stop order ---------------------------------------------------------------------------

TWO_PIPELINES: dict[str, Any] = {
    "receivers": {"source/a": {}, "source/b": {}},
    "processors": {"step/first": {}, "step/second": {}},
    "exporters": {"keep/a": {}, "keep/b": {}},
    "service": {
        "pipelines": {
            "metrics/a": {
                "receivers": ["source/a"],
                "processors": ["step/first", "step/second"],
                "exporters": ["keep/a"],
            },
            "metrics/b": {"receivers": ["source/a", "source/b"], "exporters": ["keep/a", "keep/b"]},
        }
    },
}


def kinds_in_order(labels: list[str]) -> list[str]:
    """The kinds of ``labels``, each once, in the order they first appear."""
    seen: list[str] = []
    for label in labels:
        if kind_of(label) not in seen:
            seen.append(kind_of(label))
    return seen


async def test_exporters_start_before_processors_before_receivers_and_stop_in_reverse(graph: Graph) -> None:
    agent = await graph.start(TWO_PIPELINES)
    started = graph.did("start")
    assert kinds_in_order(started) == ["keep", "step", "source"]
    assert sorted(started) == sorted(
        ["keep/a", "keep/b", "step/first@metrics/a", "step/second@metrics/a", "source/a", "source/b"]
    )
    # Within a pipeline, downstream first: nothing is started before what it feeds.
    assert started.index("step/second@metrics/a") < started.index("step/first@metrics/a")

    await agent.stop()
    stopped = graph.did("stop")
    assert kinds_in_order(stopped) == ["source", "step", "keep"]
    assert sorted(stopped) == sorted(started)
    assert stopped.index("step/first@metrics/a") < stopped.index("step/second@metrics/a")


async def test_a_processor_flushing_as_it_stops_reaches_the_processor_after_it_still_running(
    graph: Graph,
) -> None:
    """Processors stop upstream first, each once the one before it has stopped: what the first flushes
    when it stops goes through the second before that one stops, and reaches the exporter."""
    agent = await graph.start(
        {
            "receivers": {"source": {}},
            "processors": {"step/hold": {"hold": True}, "step/next": {}},
            "exporters": {"keep": {}},
            "service": {
                "pipelines": {
                    "metrics": {
                        "receivers": ["source"],
                        "processors": ["step/hold", "step/next"],
                        "exporters": ["keep"],
                    }
                }
            },
        }
    )
    held = batch("held")
    await graph.feed("source", held)
    assert graph.kept("keep") == []
    stopping = asyncio.ensure_future(agent.stop())
    await wait_until(lambda: ("stopping", "step/hold@metrics") in graph.journal, "step/hold stopping")
    assert "step/next@metrics" not in graph.did("stop"), "stopped while the processor before it flushes"
    graph.parts["step/hold@metrics"].flush.set()
    await stopping
    assert graph.kept("keep") == [held]
    after_stop = graph.journal[graph.journal.index(("stopping", "step/hold@metrics")) :]
    assert after_stop == [
        ("stopping", "step/hold@metrics"),
        ("consume", "step/next@metrics"),
        ("consume", "keep"),
        ("stop", "step/hold@metrics"),
        ("stop", "step/next@metrics"),
        ("stop", "keep"),
    ]


# -- rollback ---------------------------------------------------------------------------------------


def failing(kind: str, label: str) -> dict[str, Any]:
    """TWO_PIPELINES with the ``kind`` component ``label`` failing to start."""
    data = {k: (dict(v) if k != "service" else v) for k, v in TWO_PIPELINES.items()}
    data[kind] = {**data[kind], label: {"fail_start": True}}
    return data


@pytest.mark.parametrize(
    ("kind", "failed", "section", "started_before"),
    [
        ("exporter", "keep/b", "exporters", ["keep/a"]),
        (
            "processor",
            "step/first@metrics/a",
            "processors",
            ["keep/a", "keep/b", "step/second@metrics/a"],
        ),
        (
            "receiver",
            "source/b",
            "receivers",
            ["keep/a", "keep/b", "step/second@metrics/a", "step/first@metrics/a", "source/a"],
        ),
    ],
)
async def test_a_component_that_cannot_start_stops_those_started_in_reverse_and_is_named(
    graph: Graph,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    failed: str,
    section: str,
    started_before: list[str],
) -> None:
    agent = Agent(graph.config(failing(section, failed.split("@")[0])))
    graph.agents.append(agent)
    with caplog.at_level(logging.ERROR, logger="headwater.service"), pytest.raises(OSError):
        await agent.start()

    assert graph.did("start") == started_before
    # The one that failed is shut down first (what it opened before failing is released), then the
    # rollback stops the others.
    assert graph.did("stop")[0] == failed
    stopped = graph.did("stop")[1:]
    assert sorted(stopped) == sorted(started_before)
    # Reverse order: kinds in the reverse of their start order, a pipeline's processors upstream first.
    assert kinds_in_order(stopped) == list(reversed(kinds_in_order(started_before)))
    if "step/first@metrics/a" in stopped:
        assert stopped.index("step/first@metrics/a") < stopped.index("step/second@metrics/a")
    assert not agent.ready
    assert any(r.levelno >= logging.ERROR and f"{kind} {failed}" in r.getMessage() for r in caplog.records), (
        f"no error names {kind} {failed}: {[r.getMessage() for r in caplog.records]}"
    )


async def test_a_component_that_fails_at_first_start_is_shut_down_and_named(
    graph: Graph, caplog: pytest.LogCaptureFixture
) -> None:
    """What it opened before failing (here a listening socket) is released by its shutdown; the
    components started before it are stopped after it."""
    data = failing("receivers", "source/b")
    data["receivers"]["source/b"] = {"fail_start": True, "listen": True}
    agent = Agent(graph.config(data))
    graph.agents.append(agent)
    with caplog.at_level(logging.ERROR, logger="headwater.service"), pytest.raises(OSError):
        await agent.start()

    failed = graph.parts["source/b"]
    assert failed.server is not None and not failed.server.is_serving()
    assert graph.did("stop")[0] == "source/b"  # first, then the rollback of the others
    assert sorted(graph.did("stop")[1:]) == sorted(graph.did("start"))
    assert any(r.levelno >= logging.ERROR and "receiver source/b" in r.getMessage() for r in caplog.records)


async def test_a_component_that_fails_to_start_in_a_reload_is_shut_down(graph: Graph) -> None:
    """The reload is refused (the running config stays) and the new receiver's socket is closed."""
    agent = await graph.start(TWO_PIPELINES)
    data = {k: (dict(v) if k != "service" else v) for k, v in TWO_PIPELINES.items()}
    data["receivers"]["source/c"] = {"fail_start": True, "listen": True}
    data["service"] = {
        "pipelines": {
            **TWO_PIPELINES["service"]["pipelines"],
            "metrics/c": {"receivers": ["source/c"], "exporters": ["keep/b"]},
        }
    }
    assert not await agent.reload(graph.config(data))

    failed = graph.parts["source/c"]
    assert failed.server is not None and not failed.server.is_serving()
    assert "source/c" in graph.did("stop")
