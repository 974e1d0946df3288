"""Quotas that answer the client: a request whose tenant (bearer token or X-Scope-OrgID) is over its
``tenant`` quota is refused at the receiver, before any pipeline takes it — the JSON ``http`` receiver
answers 429 with Retry-After and X-RateLimit-* (or takes the items that fit and refuses the rest with
``tenant_quota``), OTLP/HTTP 429 with a google.rpc.Status, OTLP/gRPC RESOURCE_EXHAUSTED with RetryInfo —
and nothing it answered as taken is dropped afterwards. StatsD, which cannot be answered, is counted
as overflow as before.

The agent runs in process, built from config with the built-in receivers and ``tenant`` processor; the
exporter is a test ``sink`` keeping every batch. The quotas refill at 0.001 points per second, so the
test's own duration cannot give a tenant a point back.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
import statsd
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from agent.component import ComponentKind, Factory, Signal
from agent.model import Batch
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import AgentGraph, Sink, free_port, wait_until

SLOW = 0.001
"""points_per_second of every quota here: no point comes back within a test."""


@dataclass(frozen=True)
class SinkConfig:
    pass


class SinkExporter:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def consume(self, batch: Batch) -> None:
        await self._sink.consume(batch)


class Graph(AgentGraph):
    def __init__(self) -> None:
        super().__init__()
        self.sink = Sink()

    def factories(self) -> Mapping[tuple[ComponentKind, str], Factory]:
        own = {
            (ComponentKind.EXPORTER, "sink"): Factory(
                "sink",
                ComponentKind.EXPORTER,
                SinkConfig,
                lambda s, c: SinkExporter(self.sink),
                signals=frozenset(Signal),
            )
        }
        return collections.ChainMap(own, builtin_factories())  # type: ignore[arg-type]


@pytest.fixture
async def graph() -> AsyncIterator[Graph]:
    g = Graph()
    yield g
    await g.close()


def config(receivers: dict[str, Any], quotas: dict[str, Any], **tenant: Any) -> dict[str, Any]:
    return {
        "receivers": receivers,
        "processors": {"tenant": {"tenant_quotas": quotas, **tenant}},
        "exporters": {"sink": {}},
        "service": {
            "pipelines": {
                "metrics": {"receivers": list(receivers), "processors": ["tenant"], "exporters": ["sink"]}
            }
        },
    }


def items(n: int, name: str = "hits") -> list[dict[str, Any]]:
    return [{"name": name, "value": 1, "type": "counter", "labels": {"i": str(i)}} for i in range(n)]


def overflow(agent: Agent) -> float:
    return agent.telemetry.value("processor_tenant_overflow_points_total")


# -- the JSON http receiver ---------------------------------------------------------------------------
async def test_http_quota_answers_200_then_a_half_over_batch_per_item_then_429(graph: Graph) -> None:
    port = free_port()
    agent = await graph.start(
        config(
            {
                "http": {
                    "endpoint": f"127.0.0.1:{port}",
                    "auth": {"tokens": [{"token": "tok-a", "tenant": "a"}]},
                }
            },
            {"a": {"points_per_second": SLOW, "burst": 10}},
        )
    )
    url = f"http://127.0.0.1:{port}/v1/metrics"
    auth = {"Authorization": "Bearer tok-a"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=items(6), headers=auth) as r:
            assert r.status == 200
            assert (await r.json())["accepted"] == 6

        # 4 points left; 6 valid items with an invalid one at index 2: the first 4 valid are taken.
        batch = items(7, "second")
        batch[2] = {"name": "second", "value": "NaN?", "type": "counter"}
        async with session.post(url, json=batch, headers=auth) as r:
            assert r.status == 200
            body = await r.json()
            assert body["accepted"] == 4 and body["rejected"] == 3
            assert [(e["index"], e["code"]) for e in body["errors"]] == [
                (2, "invalid_value"),
                (5, "tenant_quota"),
                (6, "tenant_quota"),
            ]
            assert "points_per_second" in body["errors"][1]["reason"]
            assert r.headers["X-RateLimit-Limit"] == "10"
            assert r.headers["X-RateLimit-Remaining"] == "0"
            assert int(r.headers["X-RateLimit-Reset"]) > 900  # one point at 0.001/s

        async with session.post(url, json=items(1, "third"), headers=auth) as r:
            assert r.status == 429
            body = await r.json()
            assert body["code"] == "tenant_quota" and "'a'" in body["error"]
            retry_after = int(r.headers["Retry-After"])
            assert retry_after > 900
            assert r.headers["X-RateLimit-Reset"] == str(retry_after)
            assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == ("10", "0")

    # Exactly what was answered as taken, and nothing dropped afterwards.
    assert sorted((p.name, dict(p.labels)["i"]) for p in graph.sink.points()) == sorted(
        [("hits", str(i)) for i in range(6)] + [("second", str(i)) for i in (0, 1, 3, 4)]
    )
    assert overflow(agent) == 0
    assert agent.telemetry.value("receiver_refused_points_total", reason="tenant_quota") == 3
    assert agent.telemetry.value("receiver_accepted_points_total") == 10


async def test_http_requests_per_minute_by_header(graph: Graph) -> None:
    port = free_port()
    agent = await graph.start(
        config({"http": {"endpoint": f"127.0.0.1:{port}"}}, {"b": {"requests_per_minute": 2}})
    )
    url = f"http://127.0.0.1:{port}/v1/metrics"
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(url, json=items(50), headers={"X-Scope-OrgID": "b"}) as r:
                assert r.status == 200
        async with session.post(url, json=items(1), headers={"X-Scope-OrgID": "b"}) as r:
            assert r.status == 429
            assert (await r.json())["code"] == "tenant_quota"
            assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == ("2", "0")
            assert 1 <= int(r.headers["Retry-After"]) <= 30  # one request back every 30 s
        async with session.post(url, json=items(1), headers={"X-Scope-OrgID": "c"}) as r:
            assert r.status == 200  # another tenant, its own budget
    assert len(graph.sink.points()) == 101
    assert (
        agent.telemetry.value(
            "processor_tenant_quota_refusals_total", tenant="b", reason="requests_per_minute"
        )
        == 1
    )


async def test_http_new_series_over_max_active_series_are_refused_per_item(graph: Graph) -> None:
    port = free_port()
    agent = await graph.start(
        config({"http": {"endpoint": f"127.0.0.1:{port}"}}, {"d": {"max_active_series": 3}})
    )
    url = f"http://127.0.0.1:{port}/v1/metrics"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=items(5), headers={"X-Scope-OrgID": "d"}) as r:
            assert r.status == 200
            body = await r.json()
            assert body["accepted"] == 3
            assert [(e["index"], e["code"]) for e in body["errors"]] == [
                (3, "tenant_quota"),
                (4, "tenant_quota"),
            ]
            assert "max_active_series" in body["errors"][0]["reason"]
            assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == ("3", "0")
        # The active series still pass; a new one is refused whole.
        async with session.post(url, json=items(3), headers={"X-Scope-OrgID": "d"}) as r:
            assert r.status == 200
        async with session.post(url, json=items(1, "new"), headers={"X-Scope-OrgID": "d"}) as r:
            assert r.status == 429
            assert (await r.json())["code"] == "tenant_quota"
    assert len(graph.sink.points()) == 6
    assert overflow(agent) == 0


# -- OTLP ---------------------------------------------------------------------------------------------
def otlp_request(n: int) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="otlp_hits")
    for i in range(n):
        dp = m.gauge.data_points.add(time_unix_nano=1_700_000_000_000_000_000, as_double=1.0)
        dp.attributes.append(KeyValue(key="i", value=AnyValue(string_value=str(i))))
    return req


def _serialize(message: ExportMetricsServiceRequest) -> bytes:
    return message.SerializeToString()


async def test_otlp_grpc_and_http_answer_a_quota_with_resource_exhausted_and_429(graph: Graph) -> None:
    grpc_port, http_port = free_port(), free_port()
    agent = await graph.start(
        config(
            {"otlp": {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}"}},
            {"team-a": {"points_per_second": SLOW, "burst": 5}},
        )
    )
    metadata = (("x-scope-orgid", "team-a"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            request_serializer=_serialize,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )
        await export(otlp_request(5), metadata=metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await export(otlp_request(2), metadata=metadata, timeout=10)
    err = info.value
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "team-a" in (err.details() or "") and "points_per_second" in (err.details() or "")
    st = status_pb2.Status.FromString(dict(err.trailing_metadata() or ())["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert st.code == code_pb2.RESOURCE_EXHAUSTED and st.details[0].Unpack(retry)
    assert retry.retry_delay.seconds > 900

    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{http_port}/v1/metrics",
            data=otlp_request(1).SerializeToString(),
            headers={"Content-Type": "application/x-protobuf", "X-Scope-OrgID": "team-a"},
        ) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) > 900
            assert r.headers["X-RateLimit-Reset"] == r.headers["Retry-After"]
            assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == ("5", "0")
            st = status_pb2.Status.FromString(await r.read())
            assert st.code == code_pb2.RESOURCE_EXHAUSTED and st.details[0].Unpack(retry)
        # Another tenant is not held back by team-a's quota.
        async with session.post(
            f"http://127.0.0.1:{http_port}/v1/metrics",
            data=otlp_request(3).SerializeToString(),
            headers={"Content-Type": "application/x-protobuf", "X-Scope-OrgID": "team-b"},
        ) as r:
            assert r.status == 200

    assert len(graph.sink.points()) == 8
    assert overflow(agent) == 0
    assert agent.telemetry.value("receiver_refused_points_total", reason="tenant_quota") == 3


# -- StatsD: cannot be answered, so counted as before ---------------------------------------------------
async def test_statsd_over_quota_is_counted_as_overflow(graph: Graph) -> None:
    port = free_port()
    agent = await graph.start(
        config(
            {"statsd": {"udp": f"127.0.0.1:{port}", "flush_interval": "50ms"}},
            {"apps": {"points_per_second": SLOW, "burst": 3}},
            static="apps",
        )
    )
    client = statsd.StatsClient("127.0.0.1", port)
    for i in range(5):
        client.incr(f"statsd_hits_{i}")
    await wait_until(lambda: len(graph.sink.points()) + overflow(agent) >= 5, "the flush")
    assert len(graph.sink.points()) == 3
    assert (
        agent.telemetry.value(
            "processor_tenant_overflow_points_total", tenant="apps", reason="points_per_second"
        )
        == 2
    )
    assert agent.telemetry.value("processor_tenant_quota_refusals_total") == 0
