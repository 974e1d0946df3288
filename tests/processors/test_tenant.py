"""The tenant processor: source order, invalid names, quotas with a visible overflow, context, traces/logs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from opentelemetry.proto.logs.v1.logs_pb2 import ResourceLogs
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from agent.component import Backpressure, ComponentKind, validate_config
from agent.model import Batch, Kind, LogBatch, MetricBatch, Point, Resource, SpanBatch
from agent.telemetry import Telemetry
from processors.tenant import QuotaConfig, TenantConfig, TenantProcessor, factory, tenant_problem
from tests.conftest import Sink, component_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    config: TenantConfig | None = None, clock: Clock | None = None
) -> tuple[TenantProcessor, Sink, Telemetry]:
    tel = Telemetry()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "tenant")
    sink = Sink()
    proc = TenantProcessor(
        settings, config or TenantConfig(), sink, clock=clock or Clock(), wall_clock_ns=lambda: 42
    )
    return proc, sink, tel


def point(
    name: str = "hits", labels: tuple[tuple[str, str], ...] = (), resource: Resource | None = None
) -> Point:
    return Point(name, Kind.SUM, labels, 1, value=1.0, resource=resource)


def tenants_of(sink: Sink) -> list[str]:
    return [dict(p.labels)["tenant_id"] for b in sink.batches for p in b.points]


SOURCES = TenantConfig(from_label="ns", from_resource_attribute="k8s.namespace.name", static="static-t")


@pytest.mark.parametrize(
    ("labels", "resource", "context", "expected"),
    [
        (
            (("ns", "from-label"),),
            (("k8s.namespace.name", "from-attr"),),
            {"x-scope-orgid": "h"},
            "from-label",
        ),
        ((), (("k8s.namespace.name", "from-attr"),), {"x-scope-orgid": "h"}, "from-attr"),
        ((), (), {"x-scope-orgid": "from-header", "auth.tenant": "a"}, "a"),  # the token wins by default
        ((), (), {"x-scope-orgid": "from-header"}, "from-header"),
        ((), (), {"auth.tenant": "from-token"}, "from-token"),
        ((), (), {}, "static-t"),
        ((("ns", ""),), (), {"x-scope-orgid": ""}, "static-t"),  # empty values count as absent
    ],
)
async def test_source_order(labels: Any, resource: Any, context: dict[str, str], expected: str) -> None:
    proc, sink, _ = make(SOURCES)
    await proc.consume(MetricBatch((point(labels=labels, resource=Resource(resource)),), context=context))
    assert tenants_of(sink) == [expected]
    assert sink.batches[0].context["tenant"] == expected


async def test_default_when_no_source_names_a_tenant() -> None:
    proc, sink, _ = make()
    await proc.consume(MetricBatch((point(),)))
    assert tenants_of(sink) == ["anonymous"]


async def test_authenticated_tenant_beats_a_forged_label_unless_told_otherwise() -> None:
    batch = MetricBatch((point(labels=(("ns", "victim"),)),), context={"auth.tenant": "me"})
    proc, sink, _ = make(TenantConfig(from_label="ns"))
    await proc.consume(batch)
    assert tenants_of(sink) == ["me"]
    proc, sink, _ = make(TenantConfig(from_label="ns", auth_tenant_wins=False))
    await proc.consume(batch)
    assert tenants_of(sink) == ["victim"]
    # ...and without the label the header comes before the token.
    proc, sink, _ = make(TenantConfig(auth_tenant_wins=False))
    await proc.consume(MetricBatch((point(),), context={"auth.tenant": "me", "x-scope-orgid": "h"}))
    assert tenants_of(sink) == ["h"]


async def test_custom_header_and_label_and_source_label_removal() -> None:
    cfg = TenantConfig(label="org", header="X-Tenant", from_label="team", drop_source_label=True)
    proc, sink, _ = make(cfg)
    batch = MetricBatch(
        (point(labels=(("a", "1"), ("team", "t1"))), point(labels=(("org", "forged"),))),
        context={"x-tenant": "hdr"},
    )
    await proc.consume(batch)
    assert [b.points[0].labels for b in sink.batches] == [(("a", "1"), ("org", "t1")), (("org", "hdr"),)]
    assert batch.points[0].labels == (("a", "1"), ("team", "t1"))  # the input is untouched


async def test_a_batch_of_several_tenants_is_split_with_the_tenant_in_each_context() -> None:
    proc, sink, tel = make(TenantConfig(from_label="ns"))
    pts = (point("a", (("ns", "t1"),)), point("b", (("ns", "t2"),)), point("c", (("ns", "t1"),)))
    await proc.consume(MetricBatch(pts, context={"user-agent": "x"}))
    assert [(b.context["tenant"], [p.name for p in b.points]) for b in sink.batches] == [
        ("t1", ["a", "c"]),
        ("t2", ["b"]),
    ]
    assert all(b.context["user-agent"] == "x" for b in sink.batches)
    assert tel.value("processor_incoming_points_total") == 3
    assert tel.value("processor_outgoing_points_total") == 3


async def test_a_point_already_labelled_with_its_tenant_is_shared_not_copied() -> None:
    proc, sink, _ = make(TenantConfig(from_label="tenant_id"))
    p = point(labels=(("tenant_id", "t1"),))
    await proc.consume(MetricBatch((p,)))
    assert sink.batches[0].points[0] is p


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a" * 150, None),
        ("a" * 151, "too_long"),
        ("team-1_(prod).*!'", None),
        ("a b", "bad_character"),
        ("a,b", "bad_character"),
        ("a/b", "bad_character"),
        ("é", "bad_character"),
        ("a\nb", "bad_character"),
        (".", "reserved"),
        ("..", "reserved"),
        ("__mimir_cluster", "reserved"),
        ("", "empty"),
    ],
)
def test_tenant_names_follow_mimir(name: str, problem: str | None) -> None:
    assert tenant_problem(name) == problem


async def test_invalid_tenant_gets_the_default_and_is_counted() -> None:
    proc, sink, tel = make()
    await proc.consume(MetricBatch((point(), point("b")), context={"x-scope-orgid": "evil tenant"}))
    assert tenants_of(sink) == ["anonymous", "anonymous"]
    assert tel.value("processor_tenant_invalid_points_total", reason="bad_character") == 2


async def test_invalid_tenant_dropped_when_configured() -> None:
    proc, sink, tel = make(TenantConfig(invalid="drop", from_label="ns"))
    await proc.consume(MetricBatch((point(labels=(("ns", ".."),)), point(labels=(("ns", "ok"),)))))
    assert tenants_of(sink) == ["ok"]
    assert tel.value("processor_tenant_invalid_points_total", reason="reserved") == 1
    assert tel.value("processor_dropped_points_total", reason="invalid_tenant") == 1


def test_config_validation() -> None:
    assert validate_config(TenantConfig()) == []
    bad = TenantConfig(
        label="tenant.id",
        default="a b",
        static="..",
        quota=QuotaConfig(points_per_second=-1),
        tenant_quotas={"x y": QuotaConfig()},
    )
    paths = {path for path, _ in validate_config(bad)}
    assert paths == {"label", "default", "static", "quota::points_per_second", "tenant_quotas::x y"}
    assert factory.type == "tenant"


async def test_points_per_second_quota_overflow_is_counted_per_tenant_and_refills() -> None:
    clock = Clock()
    cfg = TenantConfig(quota=QuotaConfig(points_per_second=10, burst=10), from_label="ns")
    proc, sink, tel = make(cfg, clock)
    a = [point(f"m{i}", (("ns", "a"),)) for i in range(15)]
    b = [point(f"m{i}", (("ns", "b"),)) for i in range(5)]
    await proc.consume(MetricBatch(tuple(a + b)))
    passed = {bt.context["tenant"]: len(bt) for bt in sink.batches}
    assert passed == {"a": 10, "b": 5}  # b's budget is its own
    overflow = "processor_tenant_overflow_points_total"
    assert tel.value(overflow, tenant="a", reason="points_per_second") == 5
    assert tel.value(overflow, tenant="b") == 0
    assert tel.value("processor_dropped_points_total", reason="quota_points_per_second") == 5
    sink.batches.clear()
    clock.now += 0.5  # half a second refills 5 points
    await proc.consume(MetricBatch(tuple(a)))
    assert sum(len(bt) for bt in sink.batches) == 5
    assert tel.value(overflow, tenant="a", reason="points_per_second") == 15


async def test_active_series_quota_keeps_known_series_and_frees_idle_ones() -> None:
    clock = Clock()
    cfg = TenantConfig(quota=QuotaConfig(max_active_series=2), active_series_window=60.0)
    proc, sink, tel = make(cfg, clock)

    async def send(*names: str) -> list[str]:
        sink.batches.clear()
        await proc.consume(MetricBatch(tuple(point(n) for n in names)))
        return [p.name for bt in sink.batches for p in bt.points]

    assert await send("s1", "s2", "s3") == ["s1", "s2"]
    assert await send("s3", "s1") == ["s1"]  # s3 is still one too many; s1 is known
    assert (
        tel.value("processor_tenant_overflow_points_total", tenant="anonymous", reason="active_series") == 2
    )
    clock.now += 30
    assert await send("s1") == ["s1"]
    clock.now += 40  # s2 idle for 70 s (> 60 s window), s1 for 40 s
    assert await send("s3", "s4") == ["s3"]


async def test_per_tenant_quotas_override_the_default_and_overflow_series_is_emitted() -> None:
    cfg = TenantConfig(
        from_label="ns",
        quota=QuotaConfig(points_per_second=1, burst=1),
        tenant_quotas={"big": QuotaConfig()},
        overflow_metric="headwater_tenant_overflow_points",
    )
    proc, sink, _ = make(cfg)
    pts = [point(f"m{i}", (("ns", t),)) for t in ("big", "small") for i in range(3)]
    await proc.consume(MetricBatch(tuple(pts)))
    by_tenant = {bt.context["tenant"]: bt.points for bt in sink.batches}
    assert len(by_tenant["big"]) == 3
    small = by_tenant["small"]
    assert [p.name for p in small] == ["m0", "headwater_tenant_overflow_points"]
    overflow = small[1]
    assert (overflow.kind, overflow.value, overflow.time_unix_nano) == (Kind.SUM, 2.0, 42)
    assert dict(overflow.labels) == {"tenant_id": "small", "reason": "points_per_second"}


async def test_max_tenants_overflow_uses_one_label_value() -> None:
    cfg = TenantConfig(from_label="ns", quota=QuotaConfig(points_per_second=100), max_tenants=2)
    proc, sink, tel = make(cfg)
    await proc.consume(MetricBatch(tuple(point(labels=(("ns", f"t{i}"),)) for i in range(4))))
    assert sorted(bt.context["tenant"] for bt in sink.batches) == ["t0", "t1"]
    assert tel.value("processor_tenant_overflow_points_total", tenant="__other__", reason="max_tenants") == 2


async def test_backpressure_propagates() -> None:
    class Full:
        async def consume(self, batch: Batch) -> None:
            raise Backpressure("queue_full")

    proc, _, _ = make()
    proc._next = Full()
    with pytest.raises(Backpressure):
        await proc.consume(MetricBatch((point(),)))


def spans(*resources: tuple[tuple[str, str], ...], per: int = 2) -> tuple[ResourceSpans, ...]:
    out = []
    for attrs in resources:
        rs = ResourceSpans()
        for k, v in attrs:
            rs.resource.attributes.add(key=k).value.string_value = v
        ss = rs.scope_spans.add()
        for i in range(per):
            ss.spans.add(name=f"s{i}", trace_id=bytes(16), span_id=bytes(8))
        out.append(rs)
    return tuple(out)


def attrs(message: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in message.resource.attributes}


async def test_traces_get_the_resource_attribute_and_context_without_mutating_input() -> None:
    proc, sink, tel = make(TenantConfig(from_resource_attribute="k8s.namespace.name"))
    messages = spans((("k8s.namespace.name", "ns1"),), (("service.name", "x"),))
    before = [m.SerializeToString() for m in messages]
    await proc.consume(SpanBatch(messages, context={"x-scope-orgid": "hdr"}, span_count=4))
    assert [m.SerializeToString() for m in messages] == before
    out = {b.context["tenant"]: b for b in sink.batches}
    assert set(out) == {"ns1", "hdr"}
    assert attrs(out["ns1"].resource_spans[0])["tenant.id"] == "ns1"
    assert attrs(out["hdr"].resource_spans[0]) == {"service.name": "x", "tenant.id": "hdr"}
    assert [len(b) for b in sink.batches] == [2, 2]
    assert tel.value("processor_outgoing_points_total") == 4


async def test_a_resource_that_already_names_its_tenant_is_passed_as_is() -> None:
    proc, sink, _ = make()
    messages = spans((("tenant.id", "anonymous"),))
    await proc.consume(SpanBatch(messages, span_count=2))
    assert sink.batches[0].resource_spans[0] is messages[0]


async def test_logs_with_a_rate_quota_are_admitted_whole_resources() -> None:
    def logs(n: int) -> ResourceLogs:
        rl = ResourceLogs()
        sl = rl.scope_logs.add()
        for _ in range(n):
            sl.log_records.add().body.string_value = "x"
        return rl

    cfg = TenantConfig(resource_attribute="org", quota=QuotaConfig(points_per_second=5, burst=5))
    proc, sink, tel = make(cfg)
    await proc.consume(LogBatch((logs(3), logs(3), logs(2)), context={"auth.tenant": "t"}, record_count=8))
    (batch,) = sink.batches
    assert [len(m.scope_logs[0].log_records) for m in batch.resource_logs] == [3, 2]
    assert batch.record_count == 5 and batch.context["tenant"] == "t"
    assert attrs(batch.resource_logs[0]) == {"org": "t"}
    assert tel.value("processor_tenant_overflow_points_total", tenant="t", reason="points_per_second") == 3


async def test_lifecycle_with_the_default_config() -> None:
    proc, sink, tel = make()
    await proc.shutdown()  # safe before start
    await proc.start()
    await proc.consume(MetricBatch((point(), replace(point(), kind=Kind.GAUGE))))
    await proc.shutdown()
    await proc.shutdown()
    assert tel.value("processor_outgoing_points_total") == 2 and len(sink.batches) == 1
