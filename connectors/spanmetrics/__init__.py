"""``spanmetrics``: request, error and duration (RED) metrics from spans, as the Collector's connector.

    connectors:
      spanmetrics:
        dimensions: [{name: http.route}, {name: deployment.environment, default: none}]
        preset: red    # adds http_requests_total, http_request_duration_seconds, db_queries_total, ...
    service:
      pipelines:
        traces:  {receivers: [otlp], exporters: [spanmetrics, otlp]}
        metrics: {receivers: [spanmetrics], exporters: [prometheus_remote_write]}

The connector is an exporter of a traces pipeline and a receiver of a metrics pipeline. Every span it
is handed counts: for each (service, span name, kind, status code and the configured dimensions) it
keeps a calls counter (``traces.span.metrics.calls``: ``traces_span_metrics_calls_total`` in
Prometheus) and a duration histogram in seconds (``traces.span.metrics.duration``:
``traces_span_metrics_duration_seconds``), exponential by default (``histogram.exponential.max_size``
buckets), explicit bounds with ``histogram.explicit.buckets``. Labels: ``service.name``,
``span.name``, ``span.kind`` (``SPAN_KIND_SERVER``...), ``status.code`` (``STATUS_CODE_ERROR``...)
and each dimension: the span's attribute, else its resource's, else the dimension's ``default``, else
the label is left off. ``renames`` give labels other names. The output points' resource holds the
span resource's ``resource_metrics_key_attributes`` (``service.name`` always), so Prometheus
exporters label them ``job``/``instance`` as for any OTLP metric.

Metric sets are further families with their own names, span kinds, dimensions and renames (several
attributes can feed one label; the first present wins). ``preset: red`` adds the two that SignOz's
dashboards expect, for SERVER spans with an HTTP method and CLIENT spans with a database system:
``http_requests_total{method, route, status_code, tenant_id}``,
``http_request_duration_seconds{method, route, tenant_id}``, ``db_queries_total{query_type, table,
tenant_id}`` and ``db_query_duration_seconds{query_type, table, tenant_id}`` (attribute names of the
old and the current HTTP and database semantic conventions both read).

Tenants stay apart: the tenant a request was authenticated as (``auth.tenant``, a bearer token's)
becomes the label ``auth_tenant_label`` (``tenant_id``) on every metric, over any ``tenant.id``
attribute the spans carry (as the ``tenant`` processor lets the token win); unauthenticated spans
take ``tenant_id`` from ``tenant.id`` only where a dimension (the red preset) asks for it.

Counts are exact only if the connector sees every span: list it in a traces pipeline with no
``sample`` processor (or any that drops spans) before it; sample in another traces pipeline that
takes the same receiver. Temporality: ``delta`` (default) sends each flush's spans and forgets idle
series; ``cumulative`` sends running totals of every series seen (forgotten after
``metrics_expiration`` without spans, if set). A flush that downstream refuses (backpressure) is kept
and sent with the next one, so no span is lost. Beyond ``max_series``, each
family's new series go to one series labelled ``otel.metric.overflow="true"``, counted as
``headwater_spanmetrics_overflow_spans_total``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.component import (
    Backpressure,
    ComponentKind,
    Consumer,
    Factory,
    Settings,
    Signal,
    Tasks,
    run_periodically,
)
from agent.confmodel import Duration
from agent.model import Batch, MetricBatch, SpanBatch, Temporality
from connectors import ConnectorCounts
from connectors.spanmetrics.aggregate import (
    AUTH_TENANT,
    INTRINSICS,
    SERVICE_NAME,
    SPAN_KINDS,
    Aggregation,
    Aggregator,
    Plan,
    plan_groups,
)

TYPE = "spanmetrics"

SpanKindName = Literal[
    "SPAN_KIND_UNSPECIFIED",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_SERVER",
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_PRODUCER",
    "SPAN_KIND_CONSUMER",
]

DEFAULT_EXPLICIT_BUCKETS_S = (
    0.002, 0.004, 0.006, 0.008, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.4, 2.0, 5.0, 10.0, 15.0,
)  # fmt: skip
"""The Collector's default explicit bounds (2ms ... 15s)."""


@dataclass(frozen=True)
class DimensionConfig:
    name: str
    """Span attribute (then resource attribute) whose value becomes a label, e.g. http.route."""
    default: str | None = None
    """Label value when the span carries neither; unset = leave the label off."""


@dataclass(frozen=True)
class ExponentialConfig:
    max_size: int = 160
    """Buckets per side at most (the scale drops until the durations fit)."""


@dataclass(frozen=True)
class ExplicitConfig:
    buckets: list[Duration] = field(default_factory=lambda: [Duration(b) for b in DEFAULT_EXPLICIT_BUCKETS_S])
    """Upper bounds of the duration buckets, increasing, like [5ms, 10ms, 100ms, 1s]."""


@dataclass(frozen=True)
class HistogramConfig:
    exponential: ExponentialConfig | None = None
    """Exponential buckets (the default when explicit is not set)."""
    explicit: ExplicitConfig | None = None
    """Fixed bucket bounds instead of exponential buckets."""


@dataclass(frozen=True)
class ExemplarsConfig:
    enabled: bool = False
    """Attach exemplars (trace ids) to the metrics: not supported yet, must stay false."""


@dataclass(frozen=True)
class MetricSetConfig:
    calls: str = ""
    """Name of the span counter, e.g. http_requests_total; empty = no counter."""
    duration: str = ""
    """Name of the duration histogram in seconds, e.g. http_request_duration_seconds; empty = none."""
    span_kinds: list[SpanKindName] = field(default_factory=list)
    """Only spans of these kinds (SPAN_KIND_SERVER, SPAN_KIND_CLIENT, ...); empty = every kind."""
    when_any: list[str] = field(default_factory=list)
    """Only spans carrying at least one of these attributes (span or resource); empty = every span."""
    dimensions: list[DimensionConfig] = field(default_factory=list)
    """Attributes that become labels (also span.name, span.kind, status.code, service.name)."""
    renames: dict[str, str] = field(default_factory=dict)
    """Label names by attribute, e.g. {http.route: route}; attributes renamed alike share a label."""
    duration_exclude: list[str] = field(default_factory=list)
    """Labels (after renames) left off the duration histogram, e.g. [status_code]."""


RED_RENAMES = {
    "http.request.method": "method",
    "http.method": "method",
    "http.route": "route",
    "http.response.status_code": "status_code",
    "http.status_code": "status_code",
    "db.operation": "query_type",
    "db.operation.name": "query_type",
    "db.sql.table": "table",
    "db.collection.name": "table",
    "tenant.id": "tenant_id",
}
"""Attribute → label names of ``preset: red`` (current and older semantic conventions)."""

RED_SETS = (
    MetricSetConfig(
        calls="http_requests_total",
        duration="http_request_duration_seconds",
        span_kinds=["SPAN_KIND_SERVER"],
        when_any=["http.request.method", "http.method"],
        dimensions=[
            DimensionConfig(n)
            for n in ("http.request.method", "http.method", "http.route")
            + ("http.response.status_code", "http.status_code", "tenant.id")
        ],
        renames=dict(RED_RENAMES),
        duration_exclude=["status_code"],
    ),
    MetricSetConfig(
        calls="db_queries_total",
        duration="db_query_duration_seconds",
        span_kinds=["SPAN_KIND_CLIENT"],
        when_any=["db.system", "db.system.name"],
        dimensions=[
            DimensionConfig(n)
            for n in ("db.operation", "db.operation.name", "db.sql.table", "db.collection.name", "tenant.id")
        ],
        renames=dict(RED_RENAMES),
    ),
)
"""The metric sets ``preset: red`` adds."""


@dataclass(frozen=True)
class SpanMetricsConfig:
    histogram: HistogramConfig = field(default_factory=HistogramConfig)
    """Duration buckets: exponential (default) or explicit."""
    dimensions: list[DimensionConfig] = field(default_factory=list)
    """Labels of calls and duration besides service.name, span.name, span.kind and status.code."""
    renames: dict[str, str] = field(default_factory=dict)
    """Label names of calls and duration by attribute, e.g. {http.route: route}; default: as named."""
    calls_and_duration: bool = True
    """Emit the Collector's calls and duration metrics (false: only the metric sets)."""
    namespace: str = "traces.span.metrics"
    """Prefix of the calls and duration names (traces.span.metrics.calls); empty = calls, duration."""
    preset: Literal["none", "red"] = "none"
    """red: also http_requests_total, http_request_duration_seconds, db_queries_total, db_query_duration_*."""
    metric_sets: list[MetricSetConfig] = field(default_factory=list)
    """Further metric families with their own names, span kinds and dimensions."""
    exemplars: ExemplarsConfig = field(default_factory=ExemplarsConfig)
    """Exemplars on the metrics (off; not supported yet)."""
    aggregation_temporality: Literal["delta", "cumulative"] = "delta"
    """delta: each flush's counts, idle series forgotten; cumulative: running totals of every series."""
    metrics_flush_interval: Duration = Duration(15.0)
    """How often the metrics are sent (and once more on shutdown)."""
    metrics_expiration: Duration = Duration(0.0)
    """cumulative: forget a series without spans for this long (it restarts from 0); 0 = never."""
    resource_metrics_key_attributes: list[str] = field(
        default_factory=lambda: ["service.name", "service.namespace", "service.instance.id"]
    )
    """Resource attributes the metrics' resource keeps (service.name always): job/instance in Prometheus."""
    max_series: int = 10_000
    """Series held at most; further series' spans are counted in one otel.metric.overflow series."""
    auth_tenant_label: str = "tenant_id"
    """Label naming the tenant a request was authenticated as (over any attribute); empty = none."""

    def sets(self) -> list[MetricSetConfig]:
        return [*(RED_SETS if self.preset == "red" else ()), *self.metric_sets]

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        h = self.histogram
        if h.exponential is not None and h.explicit is not None:
            problems.append(("histogram", "set exponential or explicit, not both"))
        if h.exponential is not None and h.exponential.max_size < 3:
            problems.append(("histogram::exponential::max_size", "must be at least 3"))
        if h.explicit is not None:
            b = [float(x) for x in h.explicit.buckets]
            if not b:
                problems.append(("histogram::explicit::buckets", "give at least one bound, like 100ms"))
            elif any(not (x > 0 and math.isfinite(x)) for x in b) or any(
                y <= x for x, y in itertools.pairwise(b)
            ):
                problems.append(("histogram::explicit::buckets", "bounds must be positive and increasing"))
        if self.exemplars.enabled:
            problems.append(
                ("exemplars::enabled", "exemplars are not carried by Headwater's metrics yet: set false")
            )
        if not self.metrics_flush_interval >= 0.1:
            problems.append(("metrics_flush_interval", "must be at least 100ms"))
        if self.max_series < 1:
            problems.append(("max_series", "must be at least 1"))
        if not self.calls_and_duration and not self.sets():
            problems.append(("calls_and_duration", "false with no metric_sets or preset emits nothing"))
        problems += _dimension_problems("dimensions", self.dimensions)
        problems += _rename_problems("renames", self.renames)
        for i, ms in enumerate(self.metric_sets):
            where = f"metric_sets::{i}"
            if not ms.calls and not ms.duration:
                problems.append((where, "name calls, duration or both"))
            if ms.calls and ms.calls == ms.duration:
                problems.append((f"{where}::duration", "must differ from calls"))
            problems += _dimension_problems(f"{where}::dimensions", ms.dimensions)
            problems += _rename_problems(f"{where}::renames", ms.renames)
            labels = {ms.renames.get(d.name, d.name) for d in ms.dimensions}
            for j, name in enumerate(ms.duration_exclude):
                if name not in labels:
                    problems.append((f"{where}::duration_exclude::{j}", f"{name!r} is not one of its labels"))
        return problems


def _dimension_problems(where: str, dimensions: list[DimensionConfig]) -> list[tuple[str, str]]:
    problems = []
    for i, d in enumerate(dimensions):
        if not d.name:
            problems.append((f"{where}::{i}::name", "must not be empty"))
    return problems


def _rename_problems(where: str, renames: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(f"{where}::{name}", "give the label a name") for name, label in renames.items() if not label]


def plans_of(config: SpanMetricsConfig) -> list[Plan]:
    """The aggregation plans of a config: calls/duration first, then each metric set."""
    plans: list[Plan] = []
    if config.calls_and_duration:
        prefix = f"{config.namespace}." if config.namespace else ""
        groups = plan_groups(
            ((d.name, d.default) for d in config.dimensions),
            config.renames,
            INTRINSICS,
            config.auth_tenant_label,
        )
        both = Aggregation(f"{prefix}calls", f"{prefix}duration", None)
        plans.append(Plan(groups, (both,), None, (), "calls and duration"))
    for ms in config.sets():
        groups = plan_groups(
            ((d.name, d.default) for d in ms.dimensions), ms.renames, tenant_label=config.auth_tenant_label
        )
        kinds = frozenset(SPAN_KINDS.index(k) for k in ms.span_kinds) or None
        excluded = set(ms.duration_exclude)
        calls = ms.calls or None
        duration = ms.duration or None
        if excluded and calls and duration:
            kept = tuple(i for i, g in enumerate(groups) if g.label not in excluded)
            aggs: tuple[Aggregation, ...] = (
                Aggregation(calls, None, None),
                Aggregation(None, duration, kept),
            )
        elif excluded and duration:
            aggs = (
                Aggregation(
                    None, duration, tuple(i for i, g in enumerate(groups) if g.label not in excluded)
                ),
            )
        else:
            aggs = (Aggregation(calls, duration, None),)
        plans.append(Plan(groups, aggs, kinds, tuple(ms.when_any), calls or duration or ""))
    return plans


class SpanMetricsConnector:
    """See the module docstring. ``clock`` (unix seconds) is injectable for tests; ``run_timer=False``
    leaves flushing to :meth:`flush` (tests, the benchmark)."""

    def __init__(
        self,
        settings: Settings,
        config: SpanMetricsConfig,
        next_consumer: Consumer,
        *,
        clock: Callable[[], float] = time.time,
        run_timer: bool = True,
    ) -> None:
        self._settings = settings
        self._config = config
        self._next = next_consumer
        self._clock = clock
        self._run_timer = run_timer
        self._logger = settings.logger
        self._tasks = Tasks(str(settings.id), self._logger)
        h = config.histogram
        bounds = tuple(float(b) for b in h.explicit.buckets) if h.explicit is not None else None
        max_size = h.exponential.max_size if h.exponential is not None else ExponentialConfig().max_size
        temporality = (
            Temporality.DELTA if config.aggregation_temporality == "delta" else Temporality.CUMULATIVE
        )
        self._aggregator = Aggregator(
            plans_of(config),
            resource_keys=[SERVICE_NAME, *config.resource_metrics_key_attributes],
            temporality=temporality,
            max_series=config.max_series,
            max_size=max_size,
            bounds=bounds,
            now_ns=self._now_ns(),
            expiration_ns=round(float(config.metrics_expiration) * 1e9),
        )
        tel = settings.telemetry
        self._counts = ConnectorCounts(tel)
        """Incoming: spans counted; outgoing: metric points handed on."""
        self._overflow = tel.counter(
            "spanmetrics_overflow_spans_total",
            "Spans counted in an otel.metric.overflow series because max_series was reached (once per "
            "metric family they reached).",
        )
        self._refused = tel.counter(
            "spanmetrics_refused_flushes_total",
            "Flushes refused downstream (backpressure): kept and sent with the next flush.",
        )
        tel.gauge("spanmetrics_series", "Series the spanmetrics connector holds.", self._series_count)
        self._started = False
        self._stopped = False
        self._flushing = asyncio.Lock()

    def _series_count(self) -> float:
        return float(len(self._aggregator.series))

    def _now_ns(self) -> int:
        return int(self._clock() * 1e9)

    async def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        if self._run_timer:
            interval = float(self._config.metrics_flush_interval)
            self._tasks.spawn(
                run_periodically(
                    lambda: interval, self.flush, self._logger, "spanmetrics: flush (kept for the next)"
                ),
                "flush",
            )

    async def shutdown(self) -> None:
        """Stop the timer, then flush what is held (once); idempotent, safe before start."""
        if self._stopped:
            return
        self._stopped = True
        await self._tasks.close()
        try:
            await self.flush()
        except Backpressure as exc:
            self._logger.warning("spanmetrics: final flush refused downstream: %s", exc.reason)

    async def consume(self, batch: Batch) -> None:
        """Count the spans of ``batch`` (a SpanBatch; other batches are not offered by the factory).
        Never refuses: the counting is in memory and bounded by ``max_series``."""
        if not isinstance(batch, SpanBatch):
            return
        agg = self._aggregator
        before = agg.overflow_spans
        n = agg.add(batch.resource_spans, self._now_ns(), batch.context.get(AUTH_TENANT))
        self._counts.incoming(n)
        self._overflow.value += agg.overflow_spans - before

    async def flush(self) -> None:
        """Hand on the points of the spans counted since the last flush (delta) or so far (cumulative).
        Raises :class:`Backpressure` when downstream refuses them; they are then kept for the next flush."""
        async with self._flushing:
            agg = self._aggregator
            points = agg.flush(self._now_ns())
            if not points:
                agg.sent()  # forgets the idle series
                return
            try:
                # One batch: downstream takes all of it or refuses all of it, so a refused flush is
                # kept whole for the next one (the exporters slice large batches themselves).
                await self._next.consume(MetricBatch(tuple(points)))
            except Backpressure:
                agg.refused()
                self._refused.value += 1
                raise
            except BaseException:  # cancelled, or a broken consumer: kept too, nothing is lost
                agg.refused()
                raise
            agg.sent()
            self._counts.outgoing(len(points))


def _create(settings: Settings, config: SpanMetricsConfig, next_consumer: Consumer) -> SpanMetricsConnector:
    return SpanMetricsConnector(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.CONNECTOR,
    config_class=SpanMetricsConfig,
    create=_create,
    signal_pairs=frozenset({(Signal.TRACES, Signal.METRICS)}),
    description="Calls counters and duration histograms (RED metrics) per service, span name, kind, "
    "status and configured dimensions, from every span of a traces pipeline.",
)
