"""exporters/loadbalancing: each item goes to the gateway its routing key hashes to (real gRPC OTLP
receivers as gateways), the static and DNS resolvers, per-gateway metrics, and a gateway that leaves
having its queued data rerouted to the new owners of its keys."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent.component import Backpressure, ComponentKind, Signal
from agent.model import Kind, LogBatch, MetricBatch, Point, Resource, SpanBatch
from agent.sending import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from agent.tls import ClientTLSConfig
from exporters.loadbalancing.config import (
    DnsResolverConfig,
    LoadBalancingConfig,
    ProtocolConfig,
    ResolverConfig,
    StaticResolverConfig,
)
from exporters.loadbalancing.exporter import LoadBalancingExporter
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig
from tests.conftest import component_settings, wait_until
from tests.exporters.otlp_sink import Answer, Sink


def otlp(**fields: Any) -> OtlpConfig:
    fields.setdefault("retry_on_failure", RetryConfig(initial_interval=0.05, max_interval=0.2))
    return OtlpConfig(tls=ClientTLSConfig(insecure=True), resource_from_environment=False, **fields)


def static(*hosts: str, routing_key: str = "", **proto: Any) -> LoadBalancingConfig:
    return LoadBalancingConfig(
        routing_key=routing_key,  # type: ignore[arg-type]
        protocol=ProtocolConfig(otlp=otlp(**proto)),
        resolver=ResolverConfig(static=StaticResolverConfig(hostnames=list(hosts))),
    )


@pytest.fixture
async def gateways() -> AsyncIterator[list[tuple[str, Sink]]]:
    sinks = [Sink() for _ in range(3)]
    found = [(await s.start_grpc(), s) for s in sinks]
    yield found
    for s in sinks:
        await s.stop()


def points(n: int, name: str = "m", service: str | None = None) -> MetricBatch:
    now = time.time_ns()
    res = Resource((("service.name", service),)) if service else None
    return MetricBatch(
        tuple(Point(name, Kind.GAUGE, (("i", str(i)),), now, value=float(i), resource=res) for i in range(n))
    )


def series_at(sink: Sink) -> set[str]:
    return {
        next(kv.value.string_value for kv in dp.attributes if kv.key == "i") for _, _, _, dp in sink.metrics()
    }


def new(config: LoadBalancingConfig, tel: Telemetry, **kwargs: Any) -> LoadBalancingExporter:
    settings = component_settings(tel, ComponentKind.EXPORTER, "loadbalancing", shutdown_timeout_s=5.0)
    return LoadBalancingExporter(settings, config, **kwargs)


async def test_each_series_goes_to_one_gateway_every_time(gateways: list[tuple[str, Sink]]) -> None:
    tel = Telemetry()
    (a, sink_a), (b, sink_b), _ = gateways
    exporter = new(static(a, b), tel)
    await exporter.start()
    try:
        for _ in range(3):
            await exporter.consume(points(200))
        await wait_until(lambda: len(sink_a.metrics()) + len(sink_b.metrics()) == 600, "all points sent")
    finally:
        await exporter.shutdown()
    at_a, at_b = series_at(sink_a), series_at(sink_b)
    assert at_a and at_b and not at_a & at_b  # split, and no series in both
    assert len(at_a | at_b) == 200
    # Each gateway got each of its series three times: nothing of a series went elsewhere.
    assert len(sink_a.metrics()) == 3 * len(at_a)
    for gw, at in ((a, at_a), (b, at_b)):
        assert tel.value("loadbalancer_routed_points_total", exporter="loadbalancing", gateway=gw) == (
            3 * len(at)
        )
        assert tel.value("exporter_sent_points_total", exporter=f"loadbalancing@{gw}") == 3 * len(at)
    assert tel.value("loadbalancer_gateways", exporter="loadbalancing") == 0  # after shutdown


async def test_two_agents_route_a_series_to_the_same_gateway(gateways: list[tuple[str, Sink]]) -> None:
    (a, sink_a), (b, sink_b), _ = gateways
    # Two exporters listing the gateways in different orders stand for two agents.
    first, second = new(static(a, b), Telemetry()), new(static(b, a), Telemetry())
    await first.start()
    await second.start()
    try:
        await first.consume(points(100))
        await second.consume(points(100))
        await wait_until(lambda: len(sink_a.metrics()) + len(sink_b.metrics()) == 200, "all points sent")
    finally:
        await first.shutdown()
        await second.shutdown()
    assert not series_at(sink_a) & series_at(sink_b)


@pytest.mark.parametrize("key", ["service", "metric", "resource"])
async def test_resource_and_name_keys_keep_their_group_together(
    gateways: list[tuple[str, Sink]], key: str
) -> None:
    (a, sink_a), (b, sink_b), _ = gateways
    exporter = new(static(a, b, routing_key=key), Telemetry())
    await exporter.start()
    try:
        batches = [points(20, name=f"m{i}", service=f"svc{i}") for i in range(12)]
        for batch in batches:
            await exporter.consume(batch)
        await wait_until(lambda: len(sink_a.metrics()) + len(sink_b.metrics()) == 240, "all points sent")
    finally:
        await exporter.shutdown()
    group = {
        "service": lambda r, m: next(
            kv.value.string_value for kv in r.attributes if kv.key == "service.name"
        ),
        "metric": lambda r, m: m.name,
        "resource": lambda r, m: str(sorted((kv.key, kv.value.string_value) for kv in r.attributes)),
    }[key]
    at_a = {group(r, m) for r, _, m, _ in sink_a.metrics()}
    at_b = {group(r, m) for r, _, m, _ in sink_b.metrics()}
    assert at_a and at_b and not at_a & at_b


async def test_spans_of_a_trace_go_to_one_gateway(gateways: list[tuple[str, Sink]]) -> None:
    (a, sink_a), (b, sink_b), _ = gateways
    exporter = new(static(a, b), Telemetry())
    await exporter.start()
    rs = trace_pb2.ResourceSpans()
    spans = rs.scope_spans.add().spans
    for t in range(40):
        for s in range(5):
            spans.add(trace_id=t.to_bytes(16, "big"), span_id=(t * 5 + s + 1).to_bytes(8, "big"), name="op")
    try:
        await exporter.consume(SpanBatch((rs,), {}, 200))
        received = lambda sink: [  # noqa: E731
            sp
            for rec in sink.received
            for r in rec.message.resource_spans
            for ss in r.scope_spans
            for sp in ss.spans
        ]
        await wait_until(lambda: len(received(sink_a)) + len(received(sink_b)) == 200, "all spans sent")
    finally:
        await exporter.shutdown()
    traces_a = {sp.trace_id for sp in received(sink_a)}
    traces_b = {sp.trace_id for sp in received(sink_b)}
    assert traces_a and traces_b and not traces_a & traces_b
    assert len(received(sink_a)) == 5 * len(traces_a)


async def test_no_gateway_drops_and_counts() -> None:
    tel = Telemetry()
    exporter = new(static(), tel)
    await exporter.start()
    await exporter.consume(points(7))
    await exporter.shutdown()
    assert tel.value("exporter_dropped_points_total", exporter="loadbalancing", reason="no_gateway") == 7


class FakeDns:
    """Answers each lookup with the next entry of a script (a list of addresses, or an exception)."""

    def __init__(self, *answers: list[str] | Exception) -> None:
        self.answers = list(answers)
        self.asked = 0
        self.answered = asyncio.Event()

    async def __call__(self, hostname: str) -> list[str]:
        assert hostname == "gateways.test"
        self.asked += 1
        self.answered.set()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def dns_config(port: int, interval: float = 3600.0) -> LoadBalancingConfig:
    return LoadBalancingConfig(
        protocol=ProtocolConfig(otlp=otlp()),
        resolver=ResolverConfig(
            dns=DnsResolverConfig(hostname="gateways.test", port=port, interval=interval)  # type: ignore[arg-type]
        ),
    )


async def test_dns_answers_change_the_members_and_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.loadbalancing")
    tel = Telemetry()
    fake = FakeDns(["127.0.0.1"], ["127.0.0.1", "::1"], OSError("SERVFAIL"), ["::1"])
    exporter = new(dns_config(4317), tel, lookup=fake)
    await exporter.start()
    try:
        assert exporter.gateways == ("127.0.0.1:4317",)
        await exporter.resolve()
        assert exporter.gateways == ("127.0.0.1:4317", "[::1]:4317")
        await exporter.resolve()  # a failure keeps the members
        assert exporter.gateways == ("127.0.0.1:4317", "[::1]:4317")
        await exporter.resolve()
        assert exporter.gateways == ("[::1]:4317",)
        await exporter.resolve()  # the same answer: no change
    finally:
        await exporter.shutdown()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gateways:")]
    assert logged[-1] == "gateways: [::1]:4317 (added: none; removed: 127.0.0.1:4317)"
    assert any("cannot resolve gateways.test (SERVFAIL)" in r.getMessage() for r in caplog.records)
    value = tel.value
    assert value("loadbalancer_membership_changes_total", exporter="loadbalancing") == 3
    assert value("loadbalancer_resolutions_total", exporter="loadbalancing", outcome="success") == 4
    assert value("loadbalancer_resolutions_total", exporter="loadbalancing", outcome="failure") == 1


async def test_dns_is_resolved_again_every_interval() -> None:
    fake = FakeDns(["127.0.0.1"], ["127.0.0.2"])
    exporter = new(dns_config(4317, interval=0.05), Telemetry(), lookup=fake)
    await exporter.start()
    try:
        await wait_until(lambda: exporter.gateways == ("127.0.0.2:4317",), "the second answer applied")
    finally:
        await exporter.shutdown()


async def test_dns_resolves_localhost_with_the_system_resolver(gateways: list[tuple[str, Sink]]) -> None:
    addr = gateways[0][0]
    port = int(addr.rpartition(":")[2])
    config = replace(
        dns_config(port), resolver=ResolverConfig(dns=DnsResolverConfig(hostname="localhost", port=port))
    )
    exporter = new(config, Telemetry())
    await exporter.start()
    try:
        assert f"127.0.0.1:{port}" in exporter.gateways
        for gw in exporter.gateways:
            assert gw in (f"127.0.0.1:{port}", f"[::1]:{port}")
    finally:
        await exporter.shutdown()


@pytest.mark.parametrize("storage", ["memory", "disk"])
async def test_a_removed_gateways_queue_is_rerouted_to_the_new_owners(
    gateways: list[tuple[str, Sink]], storage: str, tmp_path: Any
) -> None:
    tel = Telemetry()
    (a, sink_a), (b, sink_b), _ = gateways
    sink_b.script = [Answer(kind="grpc", code=grpc.StatusCode.UNAVAILABLE)] * 10_000  # b is down
    queue = QueueConfig(storage=storage, directory=str(tmp_path))  # type: ignore[arg-type]
    exporter = new(static(a, b, sending_queue=queue), tel)
    await exporter.start()
    try:
        await exporter.consume(points(300))
        await wait_until(lambda: len(sink_b.attempts) >= 2, "b refused a send")
        at_a_before = series_at(sink_a)
        assert 0 < len(at_a_before) < 300 and not sink_b.received
        await exporter.set_gateways(frozenset({a}))
        await wait_until(lambda: len(sink_a.metrics()) == 300, "b's queue delivered to a")
        assert series_at(sink_a) == {str(i) for i in range(300)}
        # New points of b's former series go to a as well.
        await exporter.consume(points(300))
        await wait_until(lambda: len(sink_a.metrics()) == 600, "new points sent to a")
        rerouted = tel.value("loadbalancer_rerouted_points_total", exporter="loadbalancing", gateway=b)
        assert rerouted == 300 - len(at_a_before)
        assert tel.value("exporter_sent_points_total", exporter=f"loadbalancing@{b}") == 0
        if storage == "disk":
            assert os.listdir(tmp_path)
    finally:
        await exporter.shutdown()
    assert not sink_b.received
    assert tel.value("exporter_dropped_points_total", exporter=f"loadbalancing@{b}", reason="shutdown") == 0


@pytest.mark.parametrize("storage", ["memory", "disk"])
async def test_a_send_in_flight_to_a_removed_gateway_is_rerouted_when_it_fails(
    gateways: list[tuple[str, Sink]], storage: str, tmp_path: Any
) -> None:
    # b is removed while a send to it is in flight; that send then fails. Its request goes to the new
    # owner at once: not kept on disk until the next membership change, nor dropped with b's sender.
    tel = Telemetry()
    (a, sink_a), (b, sink_b), _ = gateways
    sink_b.script = [Answer(kind="grpc", code=grpc.StatusCode.UNAVAILABLE)] * 10_000
    sink_b.hold = asyncio.Event()
    queue = QueueConfig(storage=storage, directory=str(tmp_path))  # type: ignore[arg-type]
    config = static(a, b, sending_queue=queue, retry_on_failure=RetryConfig(enabled=False))
    exporter = new(config, tel)
    await exporter.start()
    try:
        await exporter.consume(points(300))
        await wait_until(lambda: sink_b.held >= 1, "a send to b in flight")
        await wait_until(lambda: sink_a.received, "a's share delivered")
        at_a_before = series_at(sink_a)
        assert 0 < len(at_a_before) < 300
        removed = asyncio.create_task(exporter.set_gateways(frozenset({a})))
        await wait_until(lambda: exporter.gateways == (a,), "b removed")
        sink_b.hold.set()  # the send in flight fails now, after b's sender began to shut down
        await removed
        await wait_until(lambda: len(sink_a.metrics()) == 300, "b's in-flight request delivered to a")
        assert series_at(sink_a) == {str(i) for i in range(300)}
        rerouted = tel.value("loadbalancer_rerouted_points_total", exporter="loadbalancing", gateway=b)
        assert rerouted == 300 - len(at_a_before)
    finally:
        await exporter.shutdown()
    assert not sink_b.received
    for reason in ("shutdown", "retries_exhausted"):
        assert tel.value("exporter_dropped_points_total", exporter=f"loadbalancing@{b}", reason=reason) == 0


async def test_a_reroute_refused_until_shutdown_is_counted_as_dropped(
    gateways: list[tuple[str, Sink]],
) -> None:
    # b leaves while a (its keys' new owner) is down with a full queue: rerouting b's requests is refused
    # until shutdown. Each point taken is then counted as dropped by one gateway, none lost uncounted.
    tel = Telemetry()
    (a, sink_a), (b, sink_b), _ = gateways
    for sink in (sink_a, sink_b):
        sink.script = [Answer(kind="grpc", code=grpc.StatusCode.UNAVAILABLE)] * 10_000
    exporter = new(static(a, b, sending_queue=QueueConfig(queue_size=1, full_policy="block")), tel)
    await exporter.start()
    try:
        await exporter.consume(points(300))
        await wait_until(lambda: sink_a.attempts and sink_b.attempts, "both gateways failing")
        await exporter.consume(points(300))  # queued behind the sends in flight: both queues full
        with pytest.raises(Backpressure):
            await exporter.consume(points(300))
        await exporter.set_gateways(frozenset({a}))  # b's retiring sender drains until its deadline
    finally:
        await exporter.shutdown()
    assert not sink_a.received and not sink_b.received
    assert tel.value("exporter_dropped_points_total") == 600
    assert tel.value("loadbalancer_rerouted_points_total", gateway=b) == 0


async def test_a_batch_one_gateway_refuses_is_offered_to_none(gateways: list[tuple[str, Sink]]) -> None:
    # A batch not admitted by a fan-out (a gateway that left rerouting its queue) whose parts go to a
    # (free) and c (queue full) is refused whole: had a taken its part first, every retry of the
    # reroute would offer that part to a again (duplicates).
    tel = Telemetry()
    (a, sink_a), _, (c, sink_c) = gateways
    sink_c.script = [Answer(kind="grpc", code=grpc.StatusCode.UNAVAILABLE)] * 10_000
    exporter = new(static(a, c, sending_queue=QueueConfig(queue_size=1, full_policy="block")), tel)
    await exporter.start()
    try:
        await exporter.consume(points(300))
        await wait_until(lambda: sink_c.attempts and sink_a.received, "first sends")
        await exporter.consume(points(300))  # queued behind c's send in flight: c's queue is full
        await wait_until(lambda: len(sink_a.received) == 2, "a sent both of its parts")
        parts = await exporter._routers[Signal.METRICS].split_metrics(points(300), exporter._ring)
        a_first = MetricBatch(parts[a].points + parts[c].points)  # a's part would be offered first
        routed_a = tel.value("loadbalancer_routed_points_total", gateway=a)
        with pytest.raises(Backpressure):
            await exporter.consume(a_first)
        assert tel.value("loadbalancer_routed_points_total", gateway=a) == routed_a
        assert len(sink_a.received) == 2
    finally:
        await exporter.shutdown()


async def test_a_gateway_that_comes_back_gets_its_keys_again(gateways: list[tuple[str, Sink]]) -> None:
    (a, sink_a), (b, sink_b), _ = gateways
    exporter = new(static(a, b), Telemetry())
    await exporter.start()
    try:
        await exporter.set_gateways(frozenset({a}))
        await exporter.set_gateways(frozenset({a, b}))
        await exporter.consume(points(100))
        await wait_until(lambda: len(sink_a.metrics()) + len(sink_b.metrics()) == 100, "all points sent")
        assert sink_b.metrics()
    finally:
        await exporter.shutdown()


@pytest.mark.parametrize("kept", [True, False], ids=["gateway kept", "gateway removed"])
async def test_a_reload_hands_each_gateways_memory_queue_over(
    gateways: list[tuple[str, Sink]], kept: bool
) -> None:
    tel = Telemetry()
    (a, sink_a), (b, sink_b), _ = gateways
    sink_b.script = [Answer(kind="grpc", code=grpc.StatusCode.UNAVAILABLE)] * 2
    old = new(static(a, b), tel)
    await old.start()
    await old.consume(points(300))
    await wait_until(lambda: len(sink_b.attempts) >= 1 and sink_a.metrics(), "a sent, b refused")
    handed = await old.hand_over()
    assert sum(r.points for _, queued in handed.values() for rs in queued.values() for r in rs) > 0
    successor = new(static(a, b) if kept else static(a), Telemetry())
    await successor.start()
    try:
        await successor.adopt(handed)
        await wait_until(lambda: len(sink_a.metrics()) + len(sink_b.metrics()) == 300, "b's share delivered")
    finally:
        await successor.shutdown()
    assert series_at(sink_a) | series_at(sink_b) == {str(i) for i in range(300)}
    assert bool(sink_b.metrics()) == kept
    assert tel.value("exporter_dropped_points_total") == 0


async def test_a_disk_queue_left_for_a_gateway_no_longer_listed_is_rerouted(
    gateways: list[tuple[str, Sink]], tmp_path: Any
) -> None:
    (a, sink_a), (b, sink_b), _ = gateways
    sink_b.script = [Answer(kind="grpc", code=grpc.StatusCode.UNAVAILABLE)] * 10_000
    queue = QueueConfig(storage="disk", directory=str(tmp_path))
    first = new(static(a, b, sending_queue=queue), Telemetry())
    await first.start()
    await first.consume(points(300))
    await wait_until(lambda: len(sink_b.attempts) >= 1 and sink_a.metrics(), "a sent, b refused")
    await first.shutdown()  # b's records stay in its partition
    delivered = len(sink_a.metrics())
    assert delivered < 300
    tel = Telemetry()
    second = new(static(a, sending_queue=queue), tel)  # the next run lists a only
    await second.start()
    try:
        await wait_until(lambda: len(sink_a.metrics()) == 300, "b's partition drained to a")
    finally:
        await second.shutdown()
    assert series_at(sink_a) == {str(i) for i in range(300)}
    rerouted = tel.value("loadbalancer_rerouted_points_total", gateway=b)
    assert rerouted == 300 - delivered


async def test_otlp_http_gateways() -> None:
    sinks = [Sink(), Sink()]
    urls = [await s.start_http() for s in sinks]
    hosts = [u.removeprefix("http://") for u in urls]
    config = LoadBalancingConfig(
        protocol=ProtocolConfig(otlp_http=OtlpHttpConfig(resource_from_environment=False)),
        resolver=ResolverConfig(static=StaticResolverConfig(hostnames=hosts)),
    )
    exporter = new(config, Telemetry())
    await exporter.start()
    try:
        await exporter.consume(points(100))
        await wait_until(lambda: sum(len(s.metrics()) for s in sinks) == 100, "all points sent")
    finally:
        await exporter.shutdown()
        for s in sinks:
            await s.stop()
    assert series_at(sinks[0]) and series_at(sinks[1])
    assert not series_at(sinks[0]) & series_at(sinks[1])


async def test_logs_go_with_their_trace_and_without_one_with_their_resource(
    gateways: list[tuple[str, Sink]],
) -> None:
    (a, sink_a), (b, sink_b), _ = gateways
    exporter = new(static(a, b), Telemetry())
    await exporter.start()
    batch_logs = []
    for r in range(10):
        rl = logs_pb2.ResourceLogs()
        rl.resource.attributes.add(key="service.name").value.string_value = f"svc{r}"
        records = rl.scope_logs.add().log_records
        for t in range(10):
            records.add(trace_id=t.to_bytes(16, "big")).body.string_value = f"r{r} t{t}"
        records.add().body.string_value = f"r{r} untraced"
        batch_logs.append(rl)
    try:
        await exporter.consume(LogBatch(tuple(batch_logs), {}, 110))

        def received(sink: Sink) -> list[tuple[str, Any]]:
            return [
                (next(kv.value.string_value for kv in rl.resource.attributes), lr)
                for rec in sink.received
                for rl in rec.message.resource_logs
                for sl in rl.scope_logs
                for lr in sl.log_records
            ]

        await wait_until(lambda: len(received(sink_a)) + len(received(sink_b)) == 110, "all records sent")
    finally:
        await exporter.shutdown()
    traces = [{lr.trace_id for _, lr in received(s) if lr.trace_id} for s in (sink_a, sink_b)]
    assert traces[0] and traces[1] and not traces[0] & traces[1]
    untraced = [{svc for svc, lr in received(s) if not lr.trace_id} for s in (sink_a, sink_b)]
    assert not untraced[0] & untraced[1] and len(untraced[0] | untraced[1]) == 10


async def test_tenant_key_keeps_a_tenant_in_one_gateway(gateways: list[tuple[str, Sink]]) -> None:
    (a, sink_a), (b, sink_b), _ = gateways
    exporter = new(static(a, b, routing_key="tenant"), Telemetry())
    await exporter.start()
    now = time.time_ns()
    try:
        for t in range(12):
            res = Resource((("tenant.id", f"t{t}"),))
            await exporter.consume(
                MetricBatch(
                    tuple(Point(f"m{i}", Kind.GAUGE, (), now, value=1.0, resource=res) for i in range(10))
                )
            )
        await wait_until(lambda: len(sink_a.metrics()) + len(sink_b.metrics()) == 120, "all points sent")
    finally:
        await exporter.shutdown()

    def tenants(sink: Sink) -> set[str]:
        return {
            kv.value.string_value
            for r, _, _, _ in sink.metrics()
            for kv in r.attributes
            if kv.key == "tenant.id"
        }

    assert tenants(sink_a) and tenants(sink_b) and not tenants(sink_a) & tenants(sink_b)


async def test_rerouted_series_land_where_their_new_points_go(gateways: list[tuple[str, Sink]]) -> None:
    # The routing key survives the OTLP round trip (queued request -> decoded -> routed again): a
    # rerouted series and its later points meet in the same gateway.
    (a, sink_a), (b, sink_b), (c, sink_c) = gateways
    sink_c.script = [Answer(kind="grpc", code=grpc.StatusCode.UNAVAILABLE)] * 10_000
    exporter = new(static(a, b, c, resource={"deployment.environment": "test"}), Telemetry())
    await exporter.start()
    try:
        await exporter.consume(points(300, service="svc"))
        await wait_until(lambda: sink_c.attempts and sink_a.metrics() and sink_b.metrics(), "c refused")
        await exporter.set_gateways(frozenset({a, b}))
        await exporter.consume(points(300, service="svc"))
        await wait_until(
            lambda: len(sink_a.metrics()) + len(sink_b.metrics()) == 600, "all points at a and b"
        )
    finally:
        await exporter.shutdown()
    assert not series_at(sink_a) & series_at(sink_b)
    assert len(sink_a.metrics()) == 2 * len(series_at(sink_a))
