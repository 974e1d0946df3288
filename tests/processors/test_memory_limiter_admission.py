"""The memory limiter refuses before any pipeline takes a batch: it is an admission check
(agent.component.Admission) of the fan-outs upstream, so a batch it refuses in one pipeline enters no
other pipeline of the same receiver either — and a batch those fan-outs admitted it takes whole.

The agent graph is built as in tests/agent/test_fanout.py (its ``feed`` receiver and ``queued``
exporter on a real Sender)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.component import Backpressure, ComponentKind, admit, end_admission
from agent.model import Kind, MetricBatch, Point
from agent.service import Agent
from agent.telemetry import Telemetry
from processors.memory_limiter import MemoryLimiter, MemoryLimiterConfig
from tests.agent.test_fanout import Graph, batch, feed, idle, names
from tests.conftest import Sink, component_settings, wait_until

# The soft limit is far above any RSS and the check interval long: the test alone decides when the
# limiter refuses (``refusing``).
LIMITER = {"limit": "1TiB", "check_interval": "1h"}

TWO_PIPELINES: dict[str, Any] = {
    "receivers": {"feed": {}},
    "processors": {"memory_limiter": LIMITER},
    "exporters": {"queued/a": {"queue_size": 1000}, "queued/b": {"queue_size": 1000}},
    "service": {
        "pipelines": {
            "metrics/a": {"receivers": ["feed"], "exporters": ["queued/a"]},
            "metrics/b": {
                "receivers": ["feed"],
                "processors": ["memory_limiter"],
                "exporters": ["queued/b"],
            },
        }
    },
}


@pytest.fixture
async def graph() -> AsyncIterator[Graph]:
    g = Graph()
    yield g
    await g.close()


def limiter(agent: Agent) -> MemoryLimiter:
    (running,) = agent._processors
    assert isinstance(running.instance, MemoryLimiter)
    return running.instance


async def test_a_refusing_limiter_in_one_pipeline_keeps_the_batch_out_of_the_other(graph: Graph) -> None:
    agent = await graph.start(TWO_PIPELINES)
    await feed(agent).consume(batch("a"))
    limiter(agent).refusing = True

    for _ in range(3):  # the client resends while memory stays high
        with pytest.raises(Backpressure) as refused:
            await feed(agent).consume(batch("c1", "c2"))
        assert refused.value.reason == "memory_limit"
    # Counted once per refused batch, as before; nothing of it reached either exporter.
    assert agent.telemetry.value("processor_refused_points_total", reason="memory_limit") == 6
    for eid in ("queued/a", "queued/b"):
        await wait_until(lambda: idle(agent, graph, eid), f"{eid} idle")  # noqa: B023
        assert graph.backends[eid].got == names("a"), eid

    limiter(agent).refusing = False
    await feed(agent).consume(batch("c1", "c2"))
    for eid in ("queued/a", "queued/b"):
        await wait_until(lambda: len(graph.backends[eid].got) >= 3, f"{eid} sent c")  # noqa: B023
        assert sorted(graph.backends[eid].got) == sorted(names("a", "c1", "c2")), eid


async def test_an_admitted_batch_is_taken_even_when_the_limiter_refuses_meanwhile() -> None:
    """Admitted, the batch may already be in another pipeline: refusing it now would duplicate it on
    the client's resend. Outside an admitted hand-over (a batch processor's flush) it still refuses."""
    tel = Telemetry()
    sink = Sink()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "memory_limiter")
    config = MemoryLimiterConfig(check_interval=3600.0)  # type: ignore[arg-type]
    memory_limiter = MemoryLimiter(settings, config, sink, read_rss=lambda: 0, physical_memory=1 << 30)
    memory_limiter.refusing = True
    b = MetricBatch((Point("x", Kind.GAUGE, (), 1, value=1.0),))
    assert settings.admission.refusal(b) is not None
    token = admit()
    try:
        await memory_limiter.consume(b)
    finally:
        end_admission(token)
    assert sink.batches == [b]
    with pytest.raises(Backpressure):
        await memory_limiter.consume(b)
    assert sink.batches == [b]
    await memory_limiter.shutdown()
    assert settings.admission.refusal(b) is None  # a stopped limiter leaves the admission
