"""The forward connector (connectors/forward.py): hands each batch on unchanged to the pipelines that
receive from it, counting per batch; a refusal downstream reaches the caller and counts nothing. End to
end: JSON posted with aiohttp to the real ``http`` receiver crosses ``forward`` into a second pipeline
and is scraped from the real ``prometheus`` exporter over HTTP."""

from __future__ import annotations

import aiohttp
import pytest

from agent.component import Backpressure, ComponentKind, Signal
from agent.model import Kind, LogBatch, MetricBatch, Point, SpanBatch
from agent.registry import builtin_factories
from agent.telemetry import Telemetry
from connectors.forward import Forward, ForwardConfig, factory
from tests.conftest import AgentGraph, Sink, component_settings, free_port, wait_until


def forward(tel: Telemetry, sink: Sink) -> Forward:
    settings = component_settings(tel, ComponentKind.CONNECTOR, "forward")
    connector = factory.create(settings, ForwardConfig(), sink)
    assert isinstance(connector, Forward)
    return connector


def test_forward_joins_pipelines_of_one_signal_only() -> None:
    assert factory.kind is ComponentKind.CONNECTOR
    assert factory.signal_pairs == {(s, s) for s in Signal}
    assert builtin_factories()[(ComponentKind.CONNECTOR, "forward")] is factory


@pytest.mark.parametrize(
    "batch",
    [
        MetricBatch((Point("a", Kind.GAUGE, (), 1, value=1.0), Point("b", Kind.GAUGE, (), 1, value=2.0))),
        SpanBatch((), span_count=2),
        LogBatch((), record_count=2),
    ],
    ids=["metrics", "traces", "logs"],
)
async def test_each_batch_is_handed_on_as_it_is_and_counted_once(batch: MetricBatch) -> None:
    tel, sink = Telemetry(), Sink()
    connector = forward(tel, sink)
    await connector.start()
    await connector.consume(batch)
    await connector.consume(batch)
    assert sink.batches == [batch, batch] and sink.batches[0] is batch
    assert tel.value("connector_incoming_points_total", connector="forward") == 4
    assert tel.value("connector_outgoing_points_total", connector="forward") == 4
    await connector.shutdown()
    await connector.shutdown()


async def test_a_refusal_downstream_reaches_the_caller_and_counts_nothing() -> None:
    tel, sink = Telemetry(), Sink(refuse_times=1, reason="memory_limit", retry_after_s=2.0)
    connector = forward(tel, sink)
    batch = MetricBatch((Point("a", Kind.GAUGE, (), 1, value=1.0),))
    with pytest.raises(Backpressure) as refused:
        await connector.consume(batch)
    assert (refused.value.reason, refused.value.retry_after_s) == ("memory_limit", 2.0)
    assert tel.value("connector_incoming_points_total", connector="forward") == 0
    await connector.consume(batch)  # the resend, counted once
    assert tel.value("connector_incoming_points_total", connector="forward") == 1
    assert tel.value("connector_outgoing_points_total", connector="forward") == 1


async def test_json_posted_to_http_crosses_forward_and_is_scraped_from_prometheus(agents: AgentGraph) -> None:
    http_port, prom_port = free_port(), free_port()
    await agents.start(
        {
            "receivers": {"http": {"endpoint": f"127.0.0.1:{http_port}"}},
            "processors": {
                "attributes": {"actions": [{"key": "path", "value": "forwarded", "action": "upsert"}]}
            },
            "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{prom_port}"}},
            "connectors": {"forward": {}},
            "service": {
                "pipelines": {
                    "metrics/in": {"receivers": ["http"], "exporters": ["forward"]},
                    "metrics/out": {
                        "receivers": ["forward"],
                        "processors": ["attributes"],
                        "exporters": ["prometheus"],
                    },
                }
            },
        }
    )
    body = [
        {"name": "orders", "value": 3, "type": "counter", "labels": {"shop": "north"}},
        {"name": "orders", "value": 4, "type": "counter", "labels": {"shop": "north"}},
        {"name": "queue.depth", "value": 7, "type": "gauge"},
    ]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{http_port}/v1/metrics", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["accepted"] == 3

        async def scraped() -> str | None:
            async with session.get(f"http://127.0.0.1:{prom_port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            return text if 'orders_total{path="forwarded",shop="north"} 7' in text else None

        text = await wait_until(scraped, "the counter scraped from prometheus")
    assert 'queue_depth{path="forwarded"} 7' in text
