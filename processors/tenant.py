"""``tenant``: names the tenant of every point, span and log record, and enforces per-tenant quotas.

Where the tenant comes from, first match wins (an empty value counts as absent):

1. the bearer-token tenant (``auth.tenant``, set by a receiver that authenticated the request), when
   ``auth_tenant_wins`` (the default): an authenticated client cannot write into another tenant by
   setting a label or a header;
2. the point label ``from_label`` (metrics), then the resource attribute ``from_resource_attribute``;
3. the request header ``header`` (``X-Scope-OrgID`` by default), then ``auth.tenant`` when it does not
   win outright;
4. ``static`` (e.g. ``${env:POD_NAMESPACE}`` from the downward API), then ``default``.

Tenant names follow Grafana Mimir's rules (so any Mimir/Cortex/Loki/Tempo accepts them): 1-150
characters of ``A-Z a-z 0-9 ! - _ . * ' ( )``, not ``.``, ``..`` or ``__mimir_cluster``. An invalid
name is counted in ``headwater_processor_tenant_invalid_points_total{reason}`` and, by ``invalid``,
replaced by the default tenant or dropped (``dropped{reason="invalid_tenant"}``); it is never passed
on, since it would end up in an HTTP header, a URL or a queue directory.

Output: metrics get the label ``label`` (overwriting one the client sent); spans and logs get the
resource attribute ``resource_attribute``. Each outgoing batch holds one tenant and carries it in its
context as ``tenant``, so exporters route without reading labels: a batch of several tenants (labels
or resource attributes) is split, one batch per tenant, in order of first appearance.

Quotas (``quota``, overridden per tenant by ``tenant_quotas``): points per second (token bucket of
``burst`` points, refilled at ``points_per_second``; spans and log records count as points, a whole
``ResourceSpans``/``ResourceLogs`` at a time) and active series (metrics: series seen within
``active_series_window``; a known series always passes, a new one only while there is room). What
exceeds a quota is the overflow: it is not passed on, and is counted per tenant and reason in
``headwater_processor_tenant_overflow_points_total{tenant, reason}`` (and in the standard
``dropped{reason}``); with ``overflow_metric`` set, each tenant's batch also carries a delta counter
of its refused points, so the tenant's own backend shows what it lost. Reasons: ``points_per_second``,
``active_series``, ``max_tenants`` (more tenants with quota state than ``max_tenants``; counted under
``tenant="__other__"`` so a flood of tenant names cannot explode the label).

Quotas that answer the client: when a batch's request names its tenant (the bearer token's
``auth.tenant``, or the header; not when a label or resource attribute may name another per point),
the quota is kept at admission (:meth:`TenantProcessor.refusal`, asked by the receiver's fan-out
before any pipeline takes the batch), so a request over it is refused at the receiver: HTTP 429 with
``Retry-After`` and ``X-RateLimit-*`` headers, gRPC ``RESOURCE_EXHAUSTED`` with ``RetryInfo``
(agent/quota.py; the ``http`` receiver takes the items that fit and refuses the rest with
``tenant_quota``). ``requests_per_minute`` is kept there only. Points admitted there were charged
there, and their new series made active there: the processor passes them without charging them
again, so nothing a client was told was taken is dropped for a quota. The processor's own enforcement
(the overflow above) remains for data whose tenant only the points name, and for StatsD, which cannot
be answered. Refusals are counted per request in
``headwater_processor_tenant_quota_refusals_total{tenant, reason}`` (reason: the quota).
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.component import Backpressure, ComponentKind, Consumer, Factory, Settings, Signal
from agent.confmodel import Duration
from agent.counting import PointCounts
from agent.model import (
    Batch,
    Kind,
    Labels,
    LogBatch,
    MetricBatch,
    Point,
    Resource,
    SpanBatch,
    key_of,
    relabelled,
)
from agent.quota import QuotaExceeded
from agent.telemetry import Cell
from agent.tenancy import tenant_problem

TYPE = "tenant"

_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
OTHER_TENANT = "__other__"
"""The ``tenant`` label of overflow counted beyond ``max_tenants``."""
_CACHE_LIMIT = 10_000
_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class QuotaConfig:
    points_per_second: float = 0.0
    """Points (spans, log records) a tenant may pass per second on average; 0 = no limit."""
    burst: int = 0
    """Points a tenant may pass at once above the rate (the token bucket's size); 0 = one second's worth."""
    max_active_series: int = 0
    """Metric series a tenant may have active (seen within active_series_window); 0 = no limit."""
    requests_per_minute: int = 0
    """Requests a tenant known at a push receiver may make per minute (up to a minute's worth at once);
    0 = no limit. Counted at admission only: StatsD and tenants named by labels make no requests."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not (math.isfinite(self.points_per_second) and self.points_per_second >= 0):
            problems.append(("points_per_second", "must be 0 (no limit) or positive"))
        if self.burst < 0:
            problems.append(("burst", "must be 0 (one second's worth) or positive"))
        if self.max_active_series < 0:
            problems.append(("max_active_series", "must be 0 (no limit) or positive"))
        if self.requests_per_minute < 0:
            problems.append(("requests_per_minute", "must be 0 (no limit) or positive"))
        return problems


@dataclass(frozen=True)
class TenantConfig:
    label: str = "tenant_id"
    """Metric label that receives the tenant (overwritten when the client sent one)."""
    resource_attribute: str = "tenant.id"
    """Resource attribute that receives the tenant on spans and logs."""
    from_label: str = ""
    """Read the tenant from this point label first (e.g. namespace); empty = do not."""
    drop_source_label: bool = False
    """Remove the from_label label from the points once read (when it is not the label itself)."""
    from_resource_attribute: str = ""
    """Then from this resource attribute (e.g. k8s.namespace.name); empty = do not."""
    header: str = "x-scope-orgid"
    """Then from this request header (case-insensitive; the receivers pass headers in the context)."""
    auth_tenant_wins: bool = True
    """The tenant a bearer token stands for (auth.tenant) overrides labels, attributes and the header, so
    an authenticated client cannot write as another tenant; false: it comes after the header."""
    static: str = ""
    """Then this fixed tenant, e.g. ${env:POD_NAMESPACE} set from the downward API; empty = none."""
    default: str = "anonymous"
    """Tenant of data no source named (Mimir's and Cortex's own no-auth tenant is anonymous)."""
    invalid: Literal["default", "drop"] = "default"
    """A tenant name breaking Mimir's rules (1-150 of A-Za-z0-9!-_.*'(), not . .. __mimir_cluster) is
    counted (processor_tenant_invalid_points_total{reason}) and replaced by default, or dropped."""
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    """Quotas every tenant gets (each tenant has its own budget); zeros = no limit."""
    tenant_quotas: dict[str, QuotaConfig] = field(default_factory=dict)
    """Quotas of named tenants, replacing quota for them."""
    active_series_window: Duration = Duration(300.0)
    """A series counts as active for max_active_series while seen within this window."""
    max_tenants: int = 10_000
    """Tenants with quota state at most (only when a quota is set); data of further tenants is overflow
    (reason max_tenants) until idle tenants are forgotten after active_series_window."""
    overflow_metric: str = ""
    """When set (e.g. headwater_tenant_overflow_points), each tenant's batch carries a delta counter of
    this name, labelled with the tenant and reason, of the points its quota refused."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not _LABEL_NAME.fullmatch(self.label) or self.label.startswith("__"):
            problems.append(("label", f"{self.label!r} is not a valid Prometheus label name"))
        if not self.resource_attribute:
            problems.append(("resource_attribute", "must not be empty"))
        problem = tenant_problem(self.default)
        if problem:
            problems.append(("default", f"{self.default!r} is not a valid tenant ({problem})"))
        if self.static and (problem := tenant_problem(self.static)):
            problems.append(("static", f"{self.static!r} is not a valid tenant ({problem})"))
        for tenant in self.tenant_quotas:
            if problem := tenant_problem(tenant):
                problems.append((f"tenant_quotas::{tenant}", f"not a valid tenant ({problem})"))
        for path, quota in [
            ("quota", self.quota),
            *((f"tenant_quotas::{t}", q) for t, q in self.tenant_quotas.items()),
        ]:
            problems.extend((f"{path}::{p}", m) for p, m in quota.validate())
        if self.active_series_window <= 0:
            problems.append(("active_series_window", "must be greater than 0"))
        if self.max_tenants < 1:
            problems.append(("max_tenants", "must be at least 1"))
        if self.overflow_metric and not _LABEL_NAME.fullmatch(self.overflow_metric.replace(".", "_")):
            problems.append(("overflow_metric", f"{self.overflow_metric!r} is not a valid metric name"))
        return problems


class _Bucket:
    """A token bucket of ``burst`` points refilled at ``rate`` points per second."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def take(self, n: int, now: float, *, whole: bool = False) -> int:
        """Take up to ``n`` tokens (all or none with ``whole``); returns how many were taken."""
        self.refill(now)
        # Tokens are below zero while a batch admitted whole past the bucket's size is paid back.
        k = max(0, min(n, int(self.tokens)))
        if whole and k < n:
            return 0
        self.tokens -= k
        return k


class _TenantState:
    """One tenant's quota state: its buckets (points, requests), the points it paid for at admission
    and not yet passed (``prepaid``), and its active series (key → last seen, monotonic s)."""

    __slots__ = ("bucket", "last_sweep", "last_used", "max_series", "prepaid", "requests", "series")

    def __init__(self, quota: QuotaConfig, now: float) -> None:
        rate = quota.points_per_second
        self.bucket = _Bucket(rate, float(quota.burst or max(rate, 1.0)), now) if rate > 0 else None
        rpm = quota.requests_per_minute
        self.requests = _Bucket(rpm / 60.0, float(rpm), now) if rpm > 0 else None
        self.prepaid = 0
        self.max_series = quota.max_active_series
        self.series: dict[tuple[str, Labels], float] = {}
        self.last_sweep = now
        self.last_used = now


_Overflow = dict[str, int]
"""Refused points of one tenant in one batch, by reason."""


class TenantProcessor:
    def __init__(
        self,
        settings: Settings,
        config: TenantConfig,
        next_consumer: Consumer,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._settings = settings
        self._config = config
        self._next = next_consumer
        self._clock = clock
        self._wall_clock_ns = wall_clock_ns
        self._log: logging.Logger = settings.logger
        tel = settings.telemetry
        self._counts = PointCounts(tel)
        self._header = config.header.lower()
        self._problems: dict[str, str | None] = {}
        self._states: dict[str, _TenantState] = {}
        self._quotas_on = any(
            q.points_per_second > 0 or q.max_active_series > 0 or q.requests_per_minute > 0
            for q in (config.quota, *config.tenant_quotas.values())
        )
        self._admission = settings.admission
        if self._quotas_on:
            self._admission.add(self.refusal, self.release)
        self._reserved: tuple[Batch, str, int, bool, list[tuple[str, Labels]]] | None = None
        """What :meth:`refusal` charged for the batch it admitted last: (batch, tenant, points, a
        request, new series), given back by :meth:`release` when a later check refuses that batch."""
        self._last_forget = 0.0
        self._invalid_logged_at = -math.inf
        tel.gauge("processor_tenant_tenants", "Tenants with quota state.", lambda: len(self._states))

    async def start(self) -> None:
        """Nothing to start: the processor owns no task and no socket."""

    async def shutdown(self) -> None:
        """Idempotent and safe before start; only the scrape-time gauge is left to remove."""
        self._admission.remove(self.refusal)
        tel = self._settings.telemetry
        tel.telemetry.unregister_gauges(processor=tel.id)

    # -- choosing the tenant ------------------------------------------------------------------------------
    def _problem(self, name: str) -> str | None:
        problem = self._problems.get(name, "")
        if problem == "":
            if len(self._problems) >= _CACHE_LIMIT:
                self._problems.clear()
            problem = self._problems[name] = tenant_problem(name)
        return problem

    def _fallback(self, context: Mapping[str, str]) -> str:
        """The tenant from the batch-wide sources: header, auth.tenant, static, default."""
        cfg = self._config
        if self._header and context.get(self._header):
            return context[self._header]
        if context.get("auth.tenant"):
            return context["auth.tenant"]
        return cfg.static or cfg.default

    def _checked(self, name: str) -> tuple[str | None, str | None]:
        """(tenant, problem): ``name`` if valid; else the default or None (drop) by the invalid policy,
        with the reason it was refused."""
        problem = self._problem(name)
        if problem is None:
            return name, None
        return (None if self._config.invalid == "drop" else self._config.default), problem

    def _report_invalid(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        tel = self._settings.telemetry
        total = 0
        for reason, n in counts.items():
            tel.counter(
                "processor_tenant_invalid_points_total",
                "Points (spans, log records) whose tenant name was invalid, by reason.",
                reason=reason,
            ).value += n
            total += n
        if self._config.invalid == "drop":
            self._counts.dropped("invalid_tenant", total)
        now = self._clock()
        if now - self._invalid_logged_at >= _LOG_INTERVAL_S:
            self._invalid_logged_at = now
            action = "dropped" if self._config.invalid == "drop" else f"given tenant {self._config.default!r}"
            self._log.warning(
                "%d points had an invalid tenant name (%s): %s", total, ", ".join(sorted(counts)), action
            )

    # -- quotas -------------------------------------------------------------------------------------------
    def _limited(self, tenant: str) -> bool:
        """Whether ``tenant`` has any quota (tenants without one need no state and no tenant slot)."""
        quota = self._config.tenant_quotas.get(tenant, self._config.quota)
        return quota.points_per_second > 0 or quota.max_active_series > 0 or quota.requests_per_minute > 0

    def _state(self, tenant: str, now: float) -> _TenantState | None:
        state = self._states.get(tenant)
        if state is None:
            if len(self._states) >= self._config.max_tenants:
                self._forget_idle(now)
                if len(self._states) >= self._config.max_tenants:
                    return None
            quota = self._config.tenant_quotas.get(tenant, self._config.quota)
            state = self._states[tenant] = _TenantState(quota, now)
        state.last_used = now
        return state

    def _forget_idle(self, now: float) -> None:
        # At most once per second: a flood of new tenants must not make every batch scan all states.
        if now - self._last_forget < 1.0:
            return
        self._last_forget = now
        cutoff = now - self._config.active_series_window
        self._states = {t: s for t, s in self._states.items() if s.last_used >= cutoff}

    # -- admission: quotas answered at the receiver -----------------------------------------------------
    def request_tenant(self, batch: Batch) -> str | None:
        """The tenant of ``batch`` when its request names it (the bearer token's ``auth.tenant`` or the
        header) and no label or resource attribute can name another per point; else None. Such a
        batch is one tenant's, known before any point is read: its quota is kept at admission."""
        cfg = self._config
        context = batch.context
        name = context.get("auth.tenant") if cfg.auth_tenant_wins else None
        if not name:
            if cfg.from_resource_attribute or (cfg.from_label and isinstance(batch, MetricBatch)):
                return None
            name = (context.get(self._header) if self._header else None) or context.get("auth.tenant")
            if not name:
                return None
        return self._checked(name)[0]

    def refusal(self, batch: Batch) -> Backpressure | None:
        """The admission check (:class:`agent.component.Admission`) the fan-outs ask before any pipeline
        takes ``batch``: for a tenant its request names (:meth:`request_tenant`), a
        :class:`agent.quota.QuotaExceeded` when a request or the points would go over its
        ``requests_per_minute``, ``max_active_series`` or ``points_per_second`` — the receiver answers
        429 / RESOURCE_EXHAUSTED; ``fits`` counts the first points that would pass. When admitted, the
        request and the points are charged here (``prepaid``) and their new series made active, so
        :meth:`consume` passes them without charging them again and never drops them for a quota.

        A batch larger than the bucket is admitted whole once the bucket is full, leaving it in debt
        (the average rate still holds), rather than refused forever. A batch admitted here and then
        refused by a later check (a full exporter queue) is given its charge back (:meth:`release`),
        so the client's retry pays once."""
        tenant = self.request_tenant(batch)
        if tenant is None or not self._limited(tenant):
            return None
        now = self._clock()
        state = self._state(tenant, now)
        if state is None:
            return self._refused(QuotaExceeded(tenant, "max_tenants", retry_after_s=1.0))
        requests, bucket = state.requests, state.bucket
        if requests is not None:
            requests.refill(now)
            if requests.tokens < 1:
                return self._refused(
                    QuotaExceeded(
                        tenant,
                        "requests_per_minute",
                        retry_after_s=(1 - requests.tokens) / requests.rate,
                        limit_value=int(requests.burst),
                        remaining=0,
                    )
                )
        n = len(batch)
        left = n
        if bucket is not None:
            bucket.refill(now)
            left = min(n, max(0, math.floor(bucket.tokens)))
        new: list[tuple[str, Labels]] = []
        if state.max_series and isinstance(batch, MetricBatch):
            room = self._new_series(tenant, state, batch, now, new)
            if room < n:
                oldest = min(state.series.values(), default=now)
                return self._refused(
                    QuotaExceeded(
                        tenant,
                        "max_active_series",
                        retry_after_s=max(1.0, oldest + self._config.active_series_window - now),
                        limit_value=state.max_series,
                        remaining=max(0, state.max_series - len(state.series)),
                        fits=min(room, left),
                    )
                )
        if bucket is not None and n:
            need = min(n, bucket.burst)
            if bucket.tokens < need:
                return self._refused(
                    QuotaExceeded(
                        tenant,
                        "points_per_second",
                        retry_after_s=(need - bucket.tokens) / bucket.rate,
                        limit_value=int(bucket.burst),
                        remaining=left,
                        fits=left,
                    )
                )
            bucket.tokens -= n
            state.prepaid += n
        if requests is not None:
            requests.tokens -= 1
        for key in new:
            state.series[key] = now
        charged = n if bucket is not None else 0
        self._reserved = (batch, tenant, charged, requests is not None, new)
        return None

    def release(self, batch: Batch) -> None:
        """A later check refused ``batch`` after :meth:`refusal` admitted it: its points, its request
        and the series it made active are given back, so the client's resend is not charged twice.
        The fan-out asks every check and releases in one synchronous pass, so the batch is the one
        admitted last."""
        reserved, self._reserved = self._reserved, None
        if reserved is None or reserved[0] is not batch:
            return
        _, tenant, points, request, new = reserved
        state = self._states.get(tenant)
        if state is None:
            return
        if state.bucket is not None and points:
            state.bucket.tokens = min(state.bucket.burst, state.bucket.tokens + points)
            state.prepaid = max(0, state.prepaid - points)
        if request and state.requests is not None:
            state.requests.tokens = min(state.requests.burst, state.requests.tokens + 1)
        for key in new:
            state.series.pop(key, None)

    def _new_series(
        self, tenant: str, state: _TenantState, batch: MetricBatch, now: float, new: list[tuple[str, Labels]]
    ) -> int:
        """How many of ``batch``'s first points are of active series or of new ones there is room for
        (those are appended to ``new``, not yet made active): the series keys :meth:`_admit_series`
        will see, with the tenant label, derived once per series (memoised on its key)."""
        cfg = self._config
        self._sweep(state, now)
        series = state.series
        dropped = cfg.from_label if cfg.drop_source_label and cfg.from_label != cfg.label else ""
        change = (cfg.label, tenant, dropped)
        room = state.max_series - len(series)
        seen: set[tuple[str, Labels]] = set()
        for i, p in enumerate(batch.points):
            key = (p.name, key_of(p).derive(change, _with_label, cfg.label, tenant, dropped).labels)
            if key in series or key in seen:
                continue
            if len(seen) >= room:
                return i
            seen.add(key)
            new.append(key)
        return len(batch.points)

    def _refused(self, refusal: QuotaExceeded) -> QuotaExceeded:
        self._settings.telemetry.counter(
            "processor_tenant_quota_refusals_total",
            "Requests refused at a receiver (429 / RESOURCE_EXHAUSTED) for a tenant's quota, by tenant "
            "and quota; what the receiver then took of a partly refused request is not overflow.",
            tenant=OTHER_TENANT if refusal.limit == "max_tenants" else refusal.tenant,
            reason=refusal.limit,
        ).value += 1
        return refusal

    def _admit_points(
        self, tenant: str, points: list[Point], overflow: _Overflow, prepaid: bool = False
    ) -> list[Point]:
        """The points within ``tenant``'s quotas; the rest is added to ``overflow`` by reason. With
        ``prepaid`` (the batch's tenant was known at admission) the points paid for there pass first."""
        now = self._clock()
        state = self._state(tenant, now)
        if state is None:
            overflow["max_tenants"] = overflow.get("max_tenants", 0) + len(points)
            return []
        new: set[tuple[str, Labels]] = set()
        if state.max_series:
            points = self._admit_series(state, points, now, overflow, new)
        if state.bucket is not None and points:
            credit = min(state.prepaid, len(points)) if prepaid else 0
            state.prepaid -= credit
            k = credit
            if credit < len(points):
                k += state.bucket.take(len(points) - credit, now)
            if k < len(points):
                overflow["points_per_second"] = overflow.get("points_per_second", 0) + len(points) - k
                refused = points[k:]
                points = points[:k]
                if new:
                    # Series first seen in the refused points did not become active after all.
                    kept = {(p.name, p.labels) for p in points}
                    for p in refused:
                        key = (p.name, p.labels)
                        if key in new and key not in kept:
                            state.series.pop(key, None)
        return points

    def _sweep(self, state: _TenantState, now: float) -> None:
        """Forget series not seen within the window, when full (at most ten times a window)."""
        window = self._config.active_series_window
        if len(state.series) >= state.max_series and now - state.last_sweep >= window / 10:
            state.last_sweep = now
            cutoff = now - window
            state.series = {k: t for k, t in state.series.items() if t >= cutoff}

    def _admit_series(
        self,
        state: _TenantState,
        points: list[Point],
        now: float,
        overflow: _Overflow,
        new: set[tuple[str, Labels]],
    ) -> list[Point]:
        """The points of active series, and of new ones while there is room (added to ``new``)."""
        self._sweep(state, now)
        series = state.series
        out: list[Point] = []
        refused = 0
        for p in points:
            key = (p.name, p.labels)
            if key in series:
                series[key] = now
                out.append(p)
            elif len(series) < state.max_series:
                series[key] = now
                new.add(key)
                out.append(p)
            else:
                refused += 1
        if refused:
            overflow["active_series"] = overflow.get("active_series", 0) + refused
        return out

    def _report_overflow(self, tenant: str, overflow: _Overflow) -> list[Point]:
        """Count ``overflow``; returns the overflow series points to add to the tenant's batch."""
        tel = self._settings.telemetry
        extra: list[Point] = []
        now_ns = self._wall_clock_ns()
        for reason, n in overflow.items():
            label = OTHER_TENANT if reason == "max_tenants" else tenant
            cell: Cell = tel.counter(
                "processor_tenant_overflow_points_total",
                "Points (spans, log records) over a tenant's quota, not passed on, by tenant and reason.",
                tenant=label,
                reason=reason,
            )
            cell.value += n
            self._counts.dropped(f"quota_{reason}", n)
            if self._config.overflow_metric and reason != "max_tenants":
                labels = tuple(sorted(((self._config.label, tenant), ("reason", reason))))
                extra.append(Point(self._config.overflow_metric, Kind.SUM, labels, now_ns, value=float(n)))
        return extra

    # -- consuming ----------------------------------------------------------------------------------------
    async def consume(self, batch: Batch) -> None:
        self._counts.incoming(len(batch))
        if isinstance(batch, MetricBatch):
            out: list[Batch] = list(self._metrics(batch))
        elif isinstance(batch, SpanBatch):
            prepaid = self._quotas_on and self.request_tenant(batch) is not None
            out = [
                SpanBatch(tuple(msgs), context=ctx, span_count=n)
                for msgs, ctx, n in self._resources(
                    batch.resource_spans, batch.context, "scope_spans", "spans", prepaid
                )
            ]
        else:
            prepaid = self._quotas_on and self.request_tenant(batch) is not None
            out = [
                LogBatch(tuple(msgs), context=ctx, record_count=n)
                for msgs, ctx, n in self._resources(
                    batch.resource_logs, batch.context, "scope_logs", "log_records", prepaid
                )
            ]
        for new in out:
            self._counts.outgoing(len(new))
            await self._next.consume(new)

    def _metrics(self, batch: MetricBatch) -> Iterable[MetricBatch]:
        cfg = self._config
        context = batch.context
        auth = context.get("auth.tenant") if cfg.auth_tenant_wins else None
        fallback = auth or self._fallback(context)
        from_label, from_attr = cfg.from_label, cfg.from_resource_attribute
        per_point = not auth and bool(from_label or from_attr)
        invalid: dict[str, int] = {}
        groups: dict[str, list[Point]] = {}
        checked: dict[str, tuple[str | None, str | None]] = {}
        last_resource: Resource | None = None
        resource_tenant = ""
        drop = cfg.drop_source_label and from_label and from_label != cfg.label
        label = cfg.label
        for p in batch.points:
            name = ""
            if per_point:
                if from_label:
                    name = _label_value(p.labels, from_label)
                if not name and from_attr and p.resource is not None:
                    if p.resource is not last_resource:
                        last_resource = p.resource
                        resource_tenant = _label_value(p.resource.attributes, from_attr)
                    name = resource_tenant
            name = name or fallback
            verdict = checked.get(name)
            if verdict is None:
                verdict = checked[name] = self._checked(name)
            tenant, problem = verdict
            if problem is not None:
                invalid[problem] = invalid.get(problem, 0) + 1
            if tenant is None:
                continue
            # The series' key says what the tenant label makes of it, once per series (memoised on the
            # key), and the point is copied only when its labels change.
            key = key_of(p)
            dropped = from_label if drop else ""
            out = key.derive((label, tenant, dropped), _with_label, label, tenant, dropped)
            groups.setdefault(tenant, []).append(p if out is key else relabelled(p, out))
        self._report_invalid(invalid)
        prepaid = self._quotas_on and self.request_tenant(batch) is not None
        for tenant, points in groups.items():
            if self._quotas_on and self._limited(tenant):
                overflow: _Overflow = {}
                points = self._admit_points(tenant, points, overflow, prepaid)
                if overflow:
                    points += self._report_overflow(tenant, overflow)
            if points:
                yield MetricBatch(tuple(points), context={**context, "tenant": tenant})

    def _resources(
        self,
        messages: tuple[Any, ...],
        context: Mapping[str, str],
        scopes: str,
        items: str,
        prepaid: bool,
    ) -> Iterable[tuple[list[Any], dict[str, str], int]]:
        cfg = self._config
        auth = context.get("auth.tenant") if cfg.auth_tenant_wins else None
        fallback = auth or self._fallback(context)
        invalid: dict[str, int] = {}
        groups: dict[str, tuple[list[Any], list[int]]] = {}
        for message in messages:
            count = sum(len(getattr(s, items)) for s in getattr(message, scopes))
            name = ""
            if not auth and cfg.from_resource_attribute:
                name = _attribute(message.resource.attributes, cfg.from_resource_attribute)
            tenant, problem = self._checked(name or fallback)
            if problem is not None:
                invalid[problem] = invalid.get(problem, 0) + count
            if tenant is None:
                continue
            group = groups.setdefault(tenant, ([], [0]))
            group[0].append(_with_attribute(message, cfg.resource_attribute, tenant))
            group[1][0] += count
        self._report_invalid(invalid)
        for tenant, (kept, counts) in groups.items():
            total = counts[0]
            if self._quotas_on and self._limited(tenant):
                kept, total = self._admit_resources(tenant, kept, scopes, items, total, prepaid)
            if kept:
                yield kept, {**context, "tenant": tenant}, total

    def _admit_resources(
        self, tenant: str, messages: list[Any], scopes: str, items: str, total: int, prepaid: bool
    ) -> tuple[list[Any], int]:
        now = self._clock()
        state = self._state(tenant, now)
        overflow: _Overflow = {}
        if state is None:
            overflow["max_tenants"] = total
            self._report_overflow(tenant, overflow)
            return [], 0
        if state.bucket is None:
            return messages, total
        kept: list[Any] = []
        passed = 0
        # What admission charged already (module docs) passes first, and is not charged again.
        credit = min(state.prepaid, total) if prepaid else 0
        state.prepaid -= credit
        for message in messages:
            n = sum(len(getattr(s, items)) for s in getattr(message, scopes))
            if n <= credit:
                credit -= n
            # Whole messages: cutting spans out of a resource would need a copy of each message.
            elif state.bucket.take(n - credit, now, whole=True) == n - credit:
                credit = 0
            else:
                continue
            kept.append(message)
            passed += n
        state.prepaid += credit
        if passed < total:
            overflow["points_per_second"] = total - passed
            self._report_overflow(tenant, overflow)  # no overflow metric: this is not a metrics pipeline
        return kept, passed


def _label_value(labels: Labels, name: str) -> str:
    for k, v in labels:
        if k == name:
            return v
    return ""


def _with_label(labels: Labels, name: str, value: str, drop: str) -> Labels:
    """``labels`` with ``name`` set to ``value`` and ``drop`` removed; the same tuple if unchanged."""
    if not drop and _label_value(labels, name) == value:
        return labels
    rest = [(k, v) for k, v in labels if k != name and k != drop]
    bisect.insort(rest, (name, value))
    return tuple(rest)


def _attribute(attributes: Any, key: str) -> str:
    for kv in attributes:
        if kv.key == key:
            return str(kv.value.string_value) if kv.value.WhichOneof("value") == "string_value" else ""
    return ""


def _with_attribute(message: Any, key: str, tenant: str) -> Any:
    """``message`` (ResourceSpans/ResourceLogs) with the resource attribute ``key`` = ``tenant``: the
    message itself when it already says so, else a copy (a batch's messages are never mutated)."""
    attributes = message.resource.attributes
    if _attribute(attributes, key) == tenant and sum(1 for kv in attributes if kv.key == key) == 1:
        return message
    new = type(message)()
    new.CopyFrom(message)
    kept = [kv for kv in new.resource.attributes if kv.key != key]
    del new.resource.attributes[:]
    new.resource.attributes.extend(kept)
    new.resource.attributes.add(key=key).value.string_value = tenant
    return new


def _create(settings: Settings, config: TenantConfig, next_consumer: Consumer) -> TenantProcessor:
    return TenantProcessor(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=TenantConfig,
    create=_create,
    signals=frozenset({Signal.METRICS, Signal.TRACES, Signal.LOGS}),
    description="Labels data with its tenant (label, attribute, header, token, static) and enforces "
    "per-tenant quotas with a visible overflow.",
)
