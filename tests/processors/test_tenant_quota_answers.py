"""The tenant processor's admission check: quotas of tenants a request names are kept before any
pipeline takes the batch (refused with the figures a 429 needs), and what it admitted is never dropped
afterwards; data whose tenant only the points name (StatsD) is still counted as overflow."""

from __future__ import annotations

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from agent.component import Admission, Backpressure, ComponentKind, validate_config
from agent.model import Kind, MetricBatch, Point, SpanBatch
from agent.quota import QuotaExceeded
from agent.service import Fanout
from agent.telemetry import Telemetry
from processors.tenant import QuotaConfig, TenantConfig, TenantProcessor
from tests.conftest import Sink, component_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(config: TenantConfig) -> tuple[TenantProcessor, Admission, Sink, Clock, Telemetry]:
    tel = Telemetry()
    admission = Admission()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "tenant", admission=admission)
    sink, clock = Sink(), Clock()
    proc = TenantProcessor(settings, config, sink, clock=clock, wall_clock_ns=lambda: 42)
    return proc, admission, sink, clock, tel


def batch(n: int, context: dict[str, str], name: str = "hits") -> MetricBatch:
    return MetricBatch(
        tuple(Point(name, Kind.SUM, (("i", str(i)),), 1, value=1.0) for i in range(n)), context=context
    )


def overflow(tel: Telemetry, tenant: str, reason: str) -> float:
    return tel.value(
        "processor_tenant_overflow_points_total",
        processor="tenant",
        tenant=tenant,
        reason=reason,
    )


TOKEN = {"auth.tenant": "team-a"}
PPS = TenantConfig(tenant_quotas={"team-a": QuotaConfig(points_per_second=10, burst=10)})


async def test_admitted_points_pass_and_the_rest_is_refused_with_its_figures() -> None:
    proc, admission, sink, clock, tel = make(PPS)
    first = batch(6, TOKEN)
    assert admission.refusal(first) is None
    await proc.consume(first)
    refused = admission.refusal(batch(8, TOKEN))
    assert isinstance(refused, QuotaExceeded)
    assert (refused.tenant, refused.limit, refused.reason) == ("team-a", "points_per_second", "tenant_quota")
    assert (refused.limit_value, refused.remaining, refused.fits) == (10, 4, 4)
    assert refused.retry_after_s is not None and abs(refused.retry_after_s - 0.4) < 1e-9
    # What fits is admitted: the receiver takes it and refuses the rest item by item.
    second = batch(4, TOKEN)
    assert admission.refusal(second) is None
    await proc.consume(second)
    assert len(sink.points()) == 10
    assert overflow(tel, "team-a", "points_per_second") == 0
    assert (
        tel.value(
            "processor_tenant_quota_refusals_total",
            processor="tenant",
            tenant="team-a",
            reason="points_per_second",
        )
        == 1
    )
    clock.now += 1.0
    assert admission.refusal(batch(10, TOKEN)) is None


async def test_admitted_points_are_not_charged_twice_nor_dropped() -> None:
    # The same tenant, named by the header for one batch and by nothing the receiver knows for the
    # other (static): the unchecked batch spends the bucket; the admitted one still passes whole.
    proc, admission, sink, _, tel = make(
        TenantConfig(static="team-a", tenant_quotas={"team-a": QuotaConfig(points_per_second=10, burst=10)})
    )
    admitted = batch(10, {"x-scope-orgid": "team-a"})
    assert admission.refusal(admitted) is None
    statsd = batch(5, {})
    assert admission.refusal(statsd) is None  # not known at the receiver: the processor keeps it
    await proc.consume(statsd)
    await proc.consume(admitted)
    assert len(sink.points()) == 10
    assert overflow(tel, "team-a", "points_per_second") == 5


async def test_a_batch_larger_than_the_bucket_is_admitted_when_it_is_full_and_then_paid_back() -> None:
    proc, admission, sink, clock, _ = make(PPS)
    big = batch(25, TOKEN)
    assert admission.refusal(big) is None
    await proc.consume(big)
    assert len(sink.points()) == 25
    refused = admission.refusal(batch(1, TOKEN))
    assert isinstance(refused, QuotaExceeded)
    assert refused.remaining == 0 and refused.fits == 0
    assert refused.retry_after_s is not None and abs(refused.retry_after_s - 1.6) < 1e-9  # 15 owed + 1
    clock.now += 1.6
    assert admission.refusal(batch(1, TOKEN)) is None


async def test_requests_per_minute() -> None:
    _, admission, _, clock, _ = make(TenantConfig(quota=QuotaConfig(requests_per_minute=2)))
    assert admission.refusal(batch(100, TOKEN)) is None
    assert admission.refusal(batch(100, TOKEN)) is None
    refused = admission.refusal(batch(1, TOKEN))
    assert isinstance(refused, QuotaExceeded)
    assert (refused.limit, refused.limit_value, refused.remaining, refused.fits) == (
        "requests_per_minute",
        2,
        0,
        0,
    )
    assert refused.retry_after_s is not None and abs(refused.retry_after_s - 30.0) < 1e-9
    assert admission.refusal(batch(1, {"auth.tenant": "team-b"})) is None  # each tenant its own budget
    clock.now += 30.0
    assert admission.refusal(batch(1, TOKEN)) is None


async def test_new_series_over_max_active_series_are_refused_at_admission_not_dropped() -> None:
    proc, admission, sink, clock, tel = make(
        TenantConfig(quota=QuotaConfig(max_active_series=3), active_series_window=60.0)
    )
    first = batch(2, TOKEN)
    assert admission.refusal(first) is None
    await proc.consume(first)
    # Known series i=0, i=1 and one new one (i=2) fit; i=3 is the fourth series.
    refused = admission.refusal(batch(5, TOKEN))
    assert isinstance(refused, QuotaExceeded)
    assert (refused.limit, refused.limit_value, refused.remaining, refused.fits) == (
        "max_active_series",
        3,
        1,
        3,
    )
    assert refused.retry_after_s == 60.0  # until the oldest series leaves the window
    part = batch(3, TOKEN)
    assert admission.refusal(part) is None
    # Admitted series are active from admission: a batch of another new series cannot take their room
    # before they arrive.
    assert isinstance(admission.refusal(batch(1, TOKEN, name="other")), QuotaExceeded)
    await proc.consume(part)
    assert len(sink.points()) == 5
    assert overflow(tel, "team-a", "active_series") == 0
    clock.now += 61.0
    assert admission.refusal(batch(1, TOKEN, name="other")) is None


async def test_a_tenant_only_the_points_name_is_kept_by_the_processor_as_before() -> None:
    proc, admission, sink, _, tel = make(
        TenantConfig(from_label="ns", quota=QuotaConfig(points_per_second=5, burst=5))
    )
    labelled = MetricBatch(
        tuple(Point("hits", Kind.SUM, (("i", str(i)), ("ns", "team-a")), 1, value=1.0) for i in range(8)),
        context={"x-scope-orgid": "team-a"},  # a label may name another tenant: not known at admission
    )
    assert admission.refusal(labelled) is None
    await proc.consume(labelled)
    assert len(sink.points()) == 5
    assert overflow(tel, "team-a", "points_per_second") == 3


async def test_spans_admitted_are_not_dropped() -> None:
    proc, admission, sink, _, tel = make(PPS)
    message = ResourceSpans()
    message.scope_spans.add().spans.add(name="a")
    message.scope_spans[0].spans.add(name="b")
    spans = SpanBatch((message,) * 5, context=TOKEN, span_count=10)
    assert admission.refusal(spans) is None
    assert isinstance(admission.refusal(SpanBatch((message,), context=TOKEN, span_count=2)), QuotaExceeded)
    await proc.consume(spans)
    assert sum(len(b) for b in sink.batches) == 10
    assert overflow(tel, "team-a", "points_per_second") == 0


async def test_the_check_is_registered_only_with_a_quota_and_removed_on_shutdown() -> None:
    proc, admission, _, _, _ = make(TenantConfig())
    assert admission.refusal(batch(20_000, TOKEN)) is None  # no quota: no check, any size passes
    proc, admission, _, _, _ = make(TenantConfig(quota=QuotaConfig(requests_per_minute=1)))
    assert admission.refusal(batch(1, TOKEN)) is None
    assert admission.refusal(batch(1, TOKEN)) is not None
    await proc.shutdown()
    assert admission.refusal(batch(1, TOKEN)) is None


def test_requests_per_minute_is_validated() -> None:
    problems = validate_config(TenantConfig(tenant_quotas={"t": QuotaConfig(requests_per_minute=-1)}))
    assert ("tenant_quotas::t::requests_per_minute", "must be 0 (no limit) or positive") in problems


async def test_a_batch_a_later_check_refuses_gets_its_charge_back() -> None:
    """The fan-out asks the tenant's check, then an exporter's (full, on block): the batch is refused
    whole, and the client's resend is charged once — the request, its points and its new series."""
    config = TenantConfig(
        tenant_quotas={
            "team-a": QuotaConfig(points_per_second=10, burst=10, requests_per_minute=1, max_active_series=5)
        }
    )
    proc, admission, sink, _clock, tel = make(config)
    full = Admission()
    full.add(lambda b: Backpressure("queue_full"))
    first = batch(5, TOKEN)
    with pytest.raises(Backpressure) as refused:
        await Fanout([sink], gates=[admission, full]).consume(first)
    assert refused.value.reason == "queue_full" and sink.batches == []
    # The resend: one request a minute, 10 points, 5 series — all still there for it.
    await Fanout([proc], gates=[admission]).consume(first)
    assert len(sink.points()) == 5
    assert overflow(tel, "team-a", "points_per_second") == 0
    again = admission.refusal(batch(1, TOKEN, name="other"))
    assert isinstance(again, QuotaExceeded) and again.limit == "requests_per_minute"


async def test_a_refusal_inside_one_admission_releases_the_checks_before_it() -> None:
    config = TenantConfig(tenant_quotas={"team-a": QuotaConfig(requests_per_minute=1)})
    _proc, admission, _sink, _clock, _tel = make(config)

    def memory_limit(b: object) -> Backpressure:
        return Backpressure("memory_limit")

    admission.add(memory_limit)  # asked after the tenant's check
    assert isinstance(admission.refusal(batch(1, TOKEN)), Backpressure)
    admission.remove(memory_limit)
    assert admission.refusal(batch(1, TOKEN)) is None  # the request given back is there to use
