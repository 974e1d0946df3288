"""OTLP exporters: ``otlp`` (gRPC) and ``otlp_http`` (HTTP/protobuf), for metrics, traces and logs.

SignOz is the first-class target (self-hosted: its otel-collector on 4317/4318; Cloud:
``ingest.<region>.signoz.cloud:443`` with a ``signoz-ingestion-key`` header); any OTLP receiver works.

Metrics are converted to the configured temporality and histogram form and encoded by a hand encoder
with per-series caches (``metrics.py``, ``wire.py``); traces and logs are forwarded as the
opentelemetry-proto messages they arrived as, with the exporter's resource attributes added where a
resource lacks them (``passthrough.py``). Resource attribute precedence is in ``resource.py``.
Batches are split into requests of at most ``max_request_size`` bytes before compression.

Sending is the shared machinery (``agent/sending.py``): queue → retry with jittered backoff → timeout.
Retry rules (OTLP specification 1.11):

- HTTP 429, 502, 503, 504 are retried, after ``Retry-After`` (seconds or an HTTP date) when given;
  every other 4xx/5xx is dropped and counted as ``dropped{reason="http_<status>"}``.
- gRPC CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE and DATA_LOSS are retried;
  RESOURCE_EXHAUSTED only when the server sent ``google.rpc.RetryInfo``; any ``retry_delay`` is
  waited out. Other codes are dropped as ``dropped{reason="grpc_<code>"}``.
- Connection failures and timeouts are retried.
- A partial success is not retried: its rejected points are counted as
  ``dropped{reason="partial_success"}`` (and not as sent) and its message logged, at most once a
  minute.
- A response body over 4 MiB is not parsed; the request is dropped as ``response_too_large``.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import gzip
import logging
import math
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import cramjam
import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from zlib_ng import zlib_ng

from agent.bucket_layouts import BucketLayout, bounds_problem, validate_layouts
from agent.component import (
    ComponentKind,
    Factory,
    PermanentError,
    RetryableError,
    Settings,
    Signal,
)
from agent.confmodel import Duration, Size, parse_host_port
from agent.model import Batch, LogBatch, MetricBatch, Point, SpanBatch, Temporality
from agent.partitioned import PartitionedSender
from agent.sending import (
    QueueConfig,
    Request,
    RetryConfig,
    Sender,
    retry_after_s,
)
from agent.slicing import slices
from agent.tenancy import TenantRoutingConfig
from agent.tls import ClientTLSConfig
from agent.version import USER_AGENT, VERSION
from exporters.otlp import passthrough, resource
from exporters.otlp.metrics import EncoderOptions, MetricEncoder

GRPC_TYPE = "otlp"
HTTP_TYPE = "otlp_http"

DEFAULT_EXPLICIT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
"""Seconds: the OpenTelemetry semantic-conventions advice for request durations (5 ms … 10 s), widened
with 1 ms and 2.5 ms for cache and database calls and 30 s / 60 s for slow jobs. StatsD timers arrive
in seconds (converted from ms by the receiver), so these fit them without configuration."""

MAX_RESPONSE_BYTES = 4 << 20
"""Responses bigger than this are not parsed (OTLP 1.11 size limits)."""
MAX_REQUEST_BYTES = 64 << 20
"""Largest max_request_size allowed: what OTLP receivers are asked to accept at least."""


def gzip_compress(body: bytes, level: int = 6) -> bytes:
    """A gzip member at ``level``, made by zlib-ng: the same format and levels as zlib, about half the
    CPU (measured on OTLP bodies here: 0.77 against 1.55 µs a data point at level 6)."""
    return bytes(zlib_ng.compress(body, level, wbits=31))


_THREAD_COMPRESS_BYTES = 128 << 10
"""Bodies at least this big are compressed in a thread (gzip-6 runs ~1-3 ms per 128 KiB here)."""
_PARTIAL_LOG_INTERVAL_S = 60.0

_RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-encoding",
        "content-length",
        "accept-encoding",
        "user-agent",
        "host",
        "connection",
        "transfer-encoding",
        "te",
    }
)


@dataclass(frozen=True)
class OtlpTenantRoutingConfig(TenantRoutingConfig):
    resource_attribute: str = "tenant.id"
    """Resource attribute naming the tenant: read from the data (after label), and added to it where
    missing (with the exporter's other resource attributes); empty = neither."""

    def header_problem(self) -> str | None:
        if self.header.lower() in _RESERVED_HEADERS or self.header.lower().startswith(("grpc-", ":")):
            return "this header is set by the exporter or gRPC itself"
        return None


@dataclass(frozen=True)
class OtlpConfig:
    endpoint: str = "127.0.0.1:4317"
    """host:port of the OTLP gRPC receiver. A leading https:// forces TLS, http:// plaintext."""
    protocol: Literal["grpc"] = "grpc"
    """Always grpc for this exporter; for http/protobuf use the otlp_http exporter."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra request metadata, e.g. signoz-ingestion-key: ${env:SIGNOZ_INGESTION_KEY}; names are
    lower-cased; content-type, user-agent, te and grpc-* are set by gRPC itself and refused here."""
    tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)
    """TLS; set insecure: true for a plaintext in-cluster collector."""
    compression: Literal["gzip", "none"] = "gzip"
    """Message compression (gRPC's gzip, zlib level 6). zstd is not available in the Python gRPC client."""
    timeout: Duration = Duration(10.0)
    """Time limit of one export call."""
    max_request_size: Size = Size(1 << 20)
    """Largest request before compression; bigger batches are split. At most the server's limit (4 MiB
    by default in gRPC servers); gRPC compresses on the event loop (~10 ms per MiB), hence 1 MiB."""
    temporality: Literal["delta", "cumulative"] = "delta"
    """Temporality of sums and histograms sent. delta (SignOz recommends it; StatsD data is delta) or
    cumulative (per-series running totals with a fixed start time). Gauges and summaries are unchanged."""
    histograms: Literal["exponential", "explicit"] = "exponential"
    """How distributions are sent: exponential histograms, or explicit-bucket histograms with
    explicit_buckets (SignOz Cloud ingests explicit only). Explicit histograms always stay explicit."""
    explicit_buckets: list[float] = field(default_factory=lambda: list(DEFAULT_EXPLICIT_BUCKETS))
    """Upper bounds when histograms: explicit. Default: 1ms, 2.5ms, 5ms, 10ms, 25ms, 50ms, 75ms, 100ms,
    250ms, 500ms, 750ms, 1s, 2.5s, 5s, 7.5s, 10s, 30s, 60s (in seconds, the unit of StatsD timers)."""
    explicit_bucket_layouts: list[BucketLayout] = field(default_factory=list)
    """Bounds per metric when histograms: explicit: [{match: name glob, bounds: [...]}]; first match wins."""
    series_idle_timeout: Duration = Duration(300.0)
    """A series not seen for this long is forgotten: its cumulative total (or delta baseline) restarts."""
    max_series: int = 100_000
    """Series kept at most (~1.1 KB each); beyond, points needing a temporality conversion are dropped
    (series_limit), the others are sent uncached."""
    resource: dict[str, str] = field(default_factory=dict)
    """Resource attributes added to all data (a resource's own attribute of the same key wins)."""
    deployment_environment: str = ""
    """Sets both deployment.environment and deployment.environment.name (overrides the environment's)."""
    resource_from_environment: bool = True
    """Read OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, HEADWATER_DEPLOYMENT_ENVIRONMENT and the K8S_*
    downward-API variables. Turn off in DaemonSet mode if the pod's K8S_POD_* would mislabel other pods."""
    sending_queue: QueueConfig = field(default_factory=QueueConfig)
    """The queue of encoded requests: in memory, or on disk (storage: disk) to outlast outages, restarts."""
    retry_on_failure: RetryConfig = field(default_factory=RetryConfig)
    """Retries of failed requests."""
    tenant: OtlpTenantRoutingConfig | None = None
    """Per-tenant routing: the tenant as a resource attribute and/or a header, with a queue per tenant
    when a header is used. Unset = off."""

    def environment_problems(self) -> list[tuple[str, str]]:
        return [(f"sending_queue::{path}", msg) for path, msg in self.sending_queue.environment_problems()]

    def validate(self) -> list[tuple[str, str]]:
        problems = _common_problems(self)
        endpoint = self.endpoint
        scheme, sep, rest = endpoint.partition("://")
        if sep:
            if scheme not in ("http", "https"):
                problems.append(("endpoint", f"scheme {scheme!r}: write host:port, or http:// / https://"))
            endpoint = rest
        if "/" in endpoint.rstrip("/"):
            problems.append(("endpoint", f"{self.endpoint!r}: a gRPC endpoint is host:port, without a path"))
        else:
            try:
                parse_host_port(endpoint.rstrip("/"))
            except ValueError as exc:
                problems.append(("endpoint", str(exc)))
        problems += [(f"tls::{path}", msg) for path, msg in self.tls.grpc_problems()]
        for name in self.headers:
            if name.lower().startswith(("grpc-", ":")):
                problems.append(("headers::" + name, "grpc- and : metadata are reserved by gRPC"))
        return problems


@dataclass(frozen=True)
class OtlpHttpConfig:
    endpoint: str = "http://127.0.0.1:4318"
    """Base URL; /v1/metrics, /v1/traces and /v1/logs are appended (like OTEL_EXPORTER_OTLP_ENDPOINT)."""
    metrics_endpoint: str = ""
    """Full URL for metrics, used as given (like OTEL_EXPORTER_OTLP_METRICS_ENDPOINT); overrides endpoint."""
    traces_endpoint: str = ""
    """Full URL for traces, used as given; overrides endpoint."""
    logs_endpoint: str = ""
    """Full URL for logs, used as given; overrides endpoint."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra request headers, e.g. signoz-ingestion-key: ${env:SIGNOZ_INGESTION_KEY}; may not override
    content-type, content-encoding, user-agent or other headers the protocol sets."""
    tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)
    """TLS settings for https URLs (insecure is not used: the URL scheme decides)."""
    compression: Literal["gzip", "zstd", "none"] = "gzip"
    """Body compression (Content-Encoding). zstd is cheaper; check that the receiver accepts it."""
    compression_level: int = 0
    """0 = default (gzip 6, zstd 3). gzip accepts 1-8: 9 costs ~3x level 6 for ~1 % smaller bodies."""
    timeout: Duration = Duration(10.0)
    """Time limit of one request."""
    max_request_size: Size = Size(4 << 20)
    """Largest request body before compression; bigger batches are split into several requests."""
    temporality: Literal["delta", "cumulative"] = "delta"
    """Temporality of sums and histograms sent. delta (SignOz recommends it; StatsD data is delta) or
    cumulative (per-series running totals with a fixed start time). Gauges and summaries are unchanged."""
    histograms: Literal["exponential", "explicit"] = "exponential"
    """How distributions are sent: exponential histograms, or explicit-bucket histograms with
    explicit_buckets (SignOz Cloud ingests explicit only). Explicit histograms always stay explicit."""
    explicit_buckets: list[float] = field(default_factory=lambda: list(DEFAULT_EXPLICIT_BUCKETS))
    """Upper bounds when histograms: explicit. Default: 1ms, 2.5ms, 5ms, 10ms, 25ms, 50ms, 75ms, 100ms,
    250ms, 500ms, 750ms, 1s, 2.5s, 5s, 7.5s, 10s, 30s, 60s (in seconds, the unit of StatsD timers)."""
    explicit_bucket_layouts: list[BucketLayout] = field(default_factory=list)
    """Bounds per metric when histograms: explicit: [{match: name glob, bounds: [...]}]; first match wins."""
    series_idle_timeout: Duration = Duration(300.0)
    """A series not seen for this long is forgotten: its cumulative total (or delta baseline) restarts."""
    max_series: int = 100_000
    """Series kept at most (~1.1 KB each); beyond, points needing a temporality conversion are dropped
    (series_limit), the others are sent uncached."""
    resource: dict[str, str] = field(default_factory=dict)
    """Resource attributes added to all data (a resource's own attribute of the same key wins)."""
    deployment_environment: str = ""
    """Sets both deployment.environment and deployment.environment.name (overrides the environment's)."""
    resource_from_environment: bool = True
    """Read OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, HEADWATER_DEPLOYMENT_ENVIRONMENT and the K8S_*
    downward-API variables. Turn off in DaemonSet mode if the pod's K8S_POD_* would mislabel other pods."""
    sending_queue: QueueConfig = field(default_factory=QueueConfig)
    """The queue of encoded requests: in memory, or on disk (storage: disk) to outlast outages, restarts."""
    retry_on_failure: RetryConfig = field(default_factory=RetryConfig)
    """Retries of failed requests."""
    tenant: OtlpTenantRoutingConfig | None = None
    """Per-tenant routing: the tenant as a resource attribute and/or a header, with a queue per tenant
    when a header is used. Unset = off."""

    def environment_problems(self) -> list[tuple[str, str]]:
        return [(f"sending_queue::{path}", msg) for path, msg in self.sending_queue.environment_problems()]

    def validate(self) -> list[tuple[str, str]]:
        problems = _common_problems(self)
        for name in ("endpoint", "metrics_endpoint", "traces_endpoint", "logs_endpoint"):
            url = getattr(self, name)
            if (url or name == "endpoint") and not url.startswith(("http://", "https://")):
                problems.append((name, f"{url!r} is not an http:// or https:// URL"))
        problems += [(f"tls::{path}", msg) for path, msg in self.tls.http_problems(HTTP_TYPE)]
        level = self.compression_level
        if level and self.compression == "gzip" and not 1 <= level <= 8:
            problems.append(("compression_level", "gzip levels are 1-8 (0 for the default, 6)"))
        if level and self.compression == "zstd" and not 1 <= level <= 19:
            problems.append(("compression_level", "zstd levels are 1-19 (0 for the default, 3)"))
        if level < 0:
            problems.append(("compression_level", "must be 0 (default) or a level"))
        return problems


AnyConfig = OtlpConfig | OtlpHttpConfig


def _common_problems(cfg: AnyConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for name in cfg.headers:
        if name.lower() in _RESERVED_HEADERS:
            problems.append(("headers::" + name, "this header is set by the exporter itself"))
    if cfg.timeout <= 0:
        problems.append(("timeout", "must be greater than 0"))
    if not 1024 <= cfg.max_request_size <= MAX_REQUEST_BYTES:
        problems.append(("max_request_size", "must be between 1KiB and 64MiB"))
    bounds = bounds_problem(cfg.explicit_buckets)
    if bounds is not None:
        problems.append(("explicit_buckets", bounds))
    problems += validate_layouts(cfg.explicit_bucket_layouts, "explicit_bucket_layouts")
    if cfg.series_idle_timeout <= 0:
        problems.append(("series_idle_timeout", "must be greater than 0"))
    if cfg.max_series < 1:
        problems.append(("max_series", "must be at least 1"))
    for key in cfg.resource:
        if not key:
            problems.append(("resource", "attribute keys must not be empty"))
    for section in ("tls", "sending_queue", "retry_on_failure"):
        for path, message in getattr(cfg, section).validate():
            problems.append((f"{section}::{path}" if path else section, message))
    if cfg.tenant is not None:
        problems += [(f"tenant::{p}" if p else "tenant", m) for p, m in cfg.tenant.validate()]
        problems += cfg.tenant.header_clash(cfg.headers)
    return problems


@dataclass(frozen=True)
class _SignalSpec:
    path: str
    grpc_method: str
    response: Any
    rejected_field: str


_SIGNALS: dict[Signal, _SignalSpec] = {
    Signal.METRICS: _SignalSpec(
        "/v1/metrics",
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        metrics_service_pb2.ExportMetricsServiceResponse,
        "rejected_data_points",
    ),
    Signal.TRACES: _SignalSpec(
        "/v1/traces",
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        trace_service_pb2.ExportTraceServiceResponse,
        "rejected_spans",
    ),
    Signal.LOGS: _SignalSpec(
        "/v1/logs",
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        logs_service_pb2.ExportLogsServiceResponse,
        "rejected_log_records",
    ),
}


_GRPC_RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


def grpc_retry_delay_s(trailing_metadata: Any) -> float | None:
    """``RetryInfo.retry_delay`` from a ``grpc-status-details-bin`` trailer, None without one."""
    for key, value in trailing_metadata or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a malformed trailer is the server's bug, not a reason to crash the send
            return None
        for detail in status.details:
            if detail.type_url == _RETRY_INFO_TYPE:
                info = error_details_pb2.RetryInfo.FromString(detail.value)
                return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


class _OtlpExporter(abc.ABC):
    """What both transports share: encoding, resource attributes, the sender, partial success."""

    def __init__(self, settings: Settings, config: AnyConfig) -> None:
        self._settings = settings
        self._config = config
        self._log = settings.logger
        env = os.environ if config.resource_from_environment else None
        self._static = resource.static_attributes(config.resource, config.deployment_environment, env)
        self._options = EncoderOptions(
            temporality=Temporality.DELTA if config.temporality == "delta" else Temporality.CUMULATIVE,
            histograms=config.histograms,
            explicit_buckets=tuple(config.explicit_buckets),
            explicit_layouts=tuple(config.explicit_bucket_layouts),
            max_request_size=config.max_request_size,
            series_idle_timeout_s=config.series_idle_timeout,
            max_series=config.max_series,
            static_resource=self._static,
            scope_name="headwater",
            scope_version=VERSION,
            started_ns=time.time_ns(),
        )
        self._encoder = MetricEncoder(self._options)
        self._route = config.tenant
        self._encoders: dict[str | None, MetricEncoder] = {None: self._encoder}
        """Per-tenant encoders (routing): a tenant's series state is its own, whatever its labels."""
        self._lock = asyncio.Lock()
        # No ordering constraint in OTLP: a disk backlog drains interleaved with live data.
        self._partitions = PartitionedSender(
            settings,
            self._send,
            config.sending_queue,
            config.retry_on_failure,
            config.timeout,
            max_partitions=config.tenant.max_tenants if config.tenant and config.tenant.header else 0,
            fifo=False,
        )
        """The default sender and, with a tenant header, one per tenant (on its first batch, or at
        start for a tenant with a backlog on disk)."""
        self._sender = self._partitions.default
        tel = settings.telemetry
        self._partial = tel.counter(
            "exporter_otlp_partial_success_total", "Responses that reported a partial success."
        )
        self._baseline = tel.counter(
            "exporter_otlp_baseline_points_total",
            "Cumulative points kept as a series' baseline for cumulative-to-delta, not sent.",
        )
        self._counted: dict[str | None, dict[str, int]] = {}
        self._partial_logged_at = -math.inf
        self._partial_suppressed = 0
        tel.gauge(
            "exporter_series",
            "Live series held by the exporter.",
            lambda: sum(e.series for e in self._encoders.values()),
        )

    @property
    def static_resource(self) -> Mapping[str, str]:
        """The attributes this exporter adds where a resource lacks them."""
        return self._static

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._open()
        try:
            await self._partitions.start()  # takes the disk queue's lock, or fails
        except BaseException:
            await self._close()
            raise
        if self._route is not None and self._route.header:
            await self._partitions.open_backlogs()

    async def shutdown(self) -> None:
        await self._partitions.shutdown(self._settings.shutdown_timeout_s)
        await self._close()

    async def hand_over(self) -> tuple[str, dict[str | None, list[Request]]]:
        """A reload replaces this exporter (its config changed): stop without draining and return how
        the queued bodies are encoded (Content-Encoding, "" for none) and the queued requests by tenant
        (None: the default queue), for :meth:`adopt` of the successor. A disk queue keeps its records in
        the directory the successor reopens once this returns (the lock is released)."""
        queued = await self._partitions.hand_over()
        await self._close()
        return self._content_encoding, queued

    async def adopt(self, handed: tuple[str, dict[str | None, list[Request]]]) -> None:
        """Queue a predecessor's requests (:meth:`hand_over`) ahead of new data, each tenant's in that
        tenant's queue, re-compressed when the compression setting changed. Requests of a tenant this
        exporter cannot route (no tenant header now, or over max_tenants) are dropped and counted
        (tenant_routing_changed): their tenant is only in the header, and sent through this exporter's
        own queue without it they would land in the wrong tenant."""
        encoding, queued = handed

        async def recompress(requests: list[Request]) -> list[Request]:
            return await asyncio.to_thread(self._recompress, requests, encoding)

        await self._partitions.adopt(
            queued,
            partitioned=self._route is not None and bool(self._route.header),
            convert=recompress if encoding != self._content_encoding else None,
        )

    @property
    def _content_encoding(self) -> str:
        """How queued bodies are compressed: transports that compress themselves queue them raw."""
        return ""

    def _recompress(self, requests: list[Request], encoding: str) -> list[Request]:
        out = []
        for r in requests:
            if encoding == "gzip":
                body = gzip.decompress(r.payload)
            elif encoding == "zstd":
                body = bytes(cramjam.zstd.decompress(r.payload))
            else:
                body = r.payload
            out.append(dataclasses.replace(r, payload=self._compress(body)))
        return out

    @abc.abstractmethod
    async def _open(self) -> None:
        """The transport's part (gRPC or HTTP)."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """The transport's part (gRPC or HTTP)."""

    @abc.abstractmethod
    async def _send(self, request: Request, tenant: str | None = None) -> None:
        """The transport's part (gRPC or HTTP)."""

    def _compress(self, body: bytes) -> bytes:
        """The body as queued: transports that compress themselves return it unchanged."""
        return body

    # -- tenants -------------------------------------------------------------------------------------
    def _encoder_for(self, tenant: str | None) -> MetricEncoder | None:
        """The tenant's metric encoder (its resource attribute among the static ones); None beyond
        max_tenants."""
        encoder = self._encoders.get(tenant)
        if encoder is not None:
            return encoder
        route = self._route
        assert route is not None and tenant is not None
        if len(self._encoders) > route.max_tenants:
            return None
        static = dict(self._static)
        if route.resource_attribute:
            static[route.resource_attribute] = tenant
        encoder = self._encoders[tenant] = MetricEncoder(
            dataclasses.replace(self._options, static_resource=static)
        )
        return encoder

    async def _sender_for(self, tenant: str | None) -> Sender | None:
        """The tenant's sender when tenants have a header, else the exporter's; None beyond
        max_tenants, after shutdown began, or when its queue cannot open."""
        route = self._route
        if tenant is None or route is None or not route.header:
            return self._sender
        return await self._partitions.get(tenant)

    def _static_for(self, tenant: str | None) -> Mapping[str, str]:
        route = self._route
        if tenant is None or route is None or not route.resource_attribute:
            return self._static
        return {**self._static, route.resource_attribute: tenant}

    def _checked(self, tenant: str, refused: dict[str, int], n: int) -> str | None:
        """``tenant`` if valid ("" → the default or None); an invalid one is refused and counted."""
        route = self._route
        assert route is not None
        resolved, refusal = route.resolve(tenant)
        if refusal:
            refused[refusal] = refused.get(refusal, 0) + n
            return ""
        return resolved

    async def _group_points(self, batch: MetricBatch) -> dict[str | None, list[Point]]:
        """The batch's points by tenant, in slices that yield to the loop (~1 µs a point)."""
        route = self._route
        assert route is not None
        context_tenant = batch.context.get("tenant", "")
        label, attribute = route.label, route.resource_attribute
        groups: dict[str | None, list[Point]] = {}
        refused: dict[str, int] = {}
        async for chunk in slices(batch.points):
            for p in chunk:
                tenant = next((v for k, v in p.labels if k == label), "")
                if not tenant and attribute and p.resource is not None:
                    tenant = next((v for k, v in p.resource.attributes if k == attribute), "")
                checked = self._checked(tenant or context_tenant, refused, 1)
                if checked != "":
                    groups.setdefault(checked, []).append(p)
        self._count_dropped(refused)
        return groups

    def _group_messages(
        self, messages: tuple[Any, ...], context: Mapping[str, str]
    ) -> dict[str | None, list[Any]]:
        route = self._route
        assert route is not None
        context_tenant = context.get("tenant", "")
        groups: dict[str | None, list[Any]] = {}
        refused: dict[str, int] = {}
        for message in messages:
            tenant = ""
            if route.resource_attribute:
                for kv in message.resource.attributes:
                    if kv.key == route.resource_attribute:
                        tenant = kv.value.string_value
                        break
            checked = self._checked(tenant or context_tenant, refused, 1)
            if checked != "":
                groups.setdefault(checked, []).append(message)
        self._count_dropped(refused)
        return groups

    def _count_dropped(self, refused: dict[str, int]) -> None:
        for reason, n in refused.items():
            self._settings.telemetry.dropped(reason).value += n

    # -- consuming -----------------------------------------------------------------------------------
    async def consume(self, batch: Batch) -> None:
        touched: dict[int, Sender] = {}
        if isinstance(batch, MetricBatch):
            await self._consume_metrics(batch, touched)
        elif isinstance(batch, SpanBatch):
            await self._consume_passthrough(
                Signal.TRACES, batch, batch.resource_spans, "scope_spans", "spans", touched
            )
        elif isinstance(batch, LogBatch):
            await self._consume_passthrough(
                Signal.LOGS, batch, batch.resource_logs, "scope_logs", "log_records", touched
            )
        for sender in touched.values() or [self._sender]:
            await sender.commit()

    async def _consume_metrics(self, batch: MetricBatch, touched: dict[int, Sender]) -> None:
        if not batch.points:
            return
        if self._route is None:
            groups: Mapping[str | None, Sequence[Point]] = {None: batch.points}
        else:
            groups = await self._group_points(batch)
        # One batch at a time: the per-series state must see a series' points in order, and the
        # encoding (temporality conversion included, ~1-20 µs a point) is done in slices that yield
        # to the loop (agent.slicing), so a batch of any size never holds it for long.
        async with self._lock:
            for tenant, points in groups.items():
                encoder = self._encoder_for(tenant)
                sender = await self._sender_for(tenant) if encoder is not None else None
                if encoder is None or sender is None:
                    self._count_dropped(
                        {"shutdown" if self._partitions.closing else "tenant_limit": len(points)}
                    )
                    continue
                touched[id(sender)] = sender
                encoder.begin(time.monotonic())
                async for chunk in slices(points):
                    for body, n in encoder.add(chunk):
                        await self._offer(Signal.METRICS, body, n, sender)
                for body, n in encoder.finish():
                    await self._offer(Signal.METRICS, body, n, sender)
                self._report(tenant, encoder.counts)

    async def _consume_passthrough(
        self,
        signal: Signal,
        batch: Batch,
        messages: tuple[Any, ...],
        scopes: str,
        items: str,
        touched: dict[int, Sender],
    ) -> None:
        if not messages:
            return
        if self._route is None:
            groups: Mapping[str | None, Sequence[Any]] = {None: messages}
        else:
            groups = self._group_messages(messages, batch.context)
        for tenant, group in groups.items():
            sender = await self._sender_for(tenant)
            if sender is None or (tenant is not None and self._encoder_for(tenant) is None):
                n = sum(len(getattr(s, items)) for m in group for s in getattr(m, scopes))
                self._count_dropped({"shutdown" if self._partitions.closing else "tenant_limit": n})
                continue
            touched[id(sender)] = sender
            requests, too_large = passthrough.encode(
                group, scopes, items, self._static_for(tenant), self._config.max_request_size
            )
            for body, n in requests:
                await self._offer(signal, body, n, sender)
            if too_large:
                self._settings.telemetry.dropped("too_large").value += too_large

    def _report(self, tenant: str | None, counts: dict[str, int]) -> None:
        tel = self._settings.telemetry
        counted = self._counted.setdefault(tenant, {})
        for reason, n in counts.items():
            new = n - counted.get(reason, 0)
            if not new:
                continue
            counted[reason] = n
            if reason == "baseline":
                self._baseline.value += new
            else:
                tel.dropped(reason).value += new

    async def _offer(self, signal: Signal, body: bytes, points: int, sender: Sender | None = None) -> None:
        if len(body) >= _THREAD_COMPRESS_BYTES:
            payload = await asyncio.to_thread(self._compress, body)
        else:
            payload = self._compress(body)
        (sender or self._sender).offer(Request(payload, points, kind=signal.value))

    # -- responses -----------------------------------------------------------------------------------
    def _partial_success(self, request: Request, signal: Signal, body: bytes) -> None:
        """Count and log a partial success in a 2xx response body; the request is then done."""
        if not body:
            return
        spec = _SIGNALS[signal]
        try:
            response = spec.response.FromString(body)
        except Exception:
            self._log.debug("unreadable %s export response (%d bytes) ignored", signal.value, len(body))
            return
        if not response.HasField("partial_success"):
            return
        rejected = int(getattr(response.partial_success, spec.rejected_field))
        message = response.partial_success.error_message
        if not rejected and not message:
            return
        self._partial.value += 1
        if rejected:
            rejected = min(rejected, request.points)
            self._settings.telemetry.dropped("partial_success").value += rejected
            # The sender counts request.points as sent once this returns: only what was accepted.
            request.points -= rejected
        now = time.monotonic()
        if now - self._partial_logged_at >= _PARTIAL_LOG_INTERVAL_S:
            suppressed = (
                f" ({self._partial_suppressed} more since the last one)" if self._partial_suppressed else ""
            )
            level = logging.WARNING
            self._log.log(
                level,
                "partial success: the server rejected %d of the %s sent: %s%s",
                rejected,
                signal.value,
                message or "(no message)",
                suppressed,
            )
            self._partial_logged_at = now
            self._partial_suppressed = 0
        else:
            self._partial_suppressed += 1


class OtlpGrpcExporter(_OtlpExporter):
    """``otlp``: unary Export calls over grpc.aio."""

    def __init__(self, settings: Settings, config: OtlpConfig) -> None:
        super().__init__(settings, config)
        self._grpc_config = config
        scheme, sep, rest = config.endpoint.partition("://")
        self._target = (rest if sep else config.endpoint).rstrip("/")
        self._plaintext = scheme == "http" if sep else config.tls.insecure
        self._metadata = tuple((k.lower(), v) for k, v in config.headers.items())
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[Signal, Callable[..., Any]] = {}

    async def _open(self) -> None:
        cfg = self._grpc_config
        options = [
            ("grpc.primary_user_agent", USER_AGENT),
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
            ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
            ("grpc.enable_retries", 0),  # the sender retries, by the OTLP rules
        ]
        compression = grpc.Compression.Gzip if cfg.compression == "gzip" else grpc.Compression.NoCompression
        if self._plaintext:
            channel = grpc.aio.insecure_channel(self._target, options=options, compression=compression)
        else:
            ca, key, cert = cfg.tls.pem_files()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            channel = grpc.aio.secure_channel(
                self._target, credentials, options=options, compression=compression
            )
        self._channel = channel
        # No serializers: requests are already bytes, responses are parsed (size-capped) by us.
        self._calls = {signal: channel.unary_unary(spec.grpc_method) for signal, spec in _SIGNALS.items()}

    async def _close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _send(self, request: Request, tenant: str | None = None) -> None:
        signal = Signal(request.kind or Signal.METRICS.value)
        call = self._calls[signal]
        metadata = self._metadata
        if tenant is not None and self._route is not None and self._route.header:
            metadata = (*metadata, (self._route.header.lower(), tenant))
        try:
            response = await call(request.payload, timeout=self._grpc_config.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            reason = f"grpc_{code.name.lower()}"
            delay = grpc_retry_delay_s(exc.trailing_metadata())
            message = f"gRPC {code.name}: {exc.details()}"
            if code in _GRPC_RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None):
                raise RetryableError(message, reason=reason, retry_after_s=delay) from None
            raise PermanentError(message, reason=reason) from None
        self._partial_success(request, signal, response)


class OtlpHttpExporter(_OtlpExporter):
    """``otlp_http``: POST application/x-protobuf over aiohttp."""

    def __init__(self, settings: Settings, config: OtlpHttpConfig) -> None:
        super().__init__(settings, config)
        self._http_config = config
        base = config.endpoint.rstrip("/")
        given = {
            Signal.METRICS: config.metrics_endpoint,
            Signal.TRACES: config.traces_endpoint,
            Signal.LOGS: config.logs_endpoint,
        }
        self.urls = {signal: given[signal] or base + spec.path for signal, spec in _SIGNALS.items()}
        self._headers = {**config.headers, "Content-Type": "application/x-protobuf", "User-Agent": USER_AGENT}
        level = config.compression_level
        if config.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
            gzip_level = level or 6
            self._compressor: Callable[[bytes], bytes] | None = lambda body: gzip_compress(body, gzip_level)
        elif config.compression == "zstd":
            self._headers["Content-Encoding"] = "zstd"
            zstd_level = level or 3
            self._compressor = lambda body: bytes(cramjam.zstd.compress(body, level=zstd_level))
        else:
            self._compressor = None
        self._session: aiohttp.ClientSession | None = None

    def _compress(self, body: bytes) -> bytes:
        return self._compressor(body) if self._compressor is not None else body

    @property
    def _content_encoding(self) -> str:
        return self._headers.get("Content-Encoding", "")

    async def _open(self) -> None:
        cfg = self._http_config
        ssl_ctx: ssl.SSLContext | bool = True
        if any(url.startswith("https://") for url in self.urls.values()):
            ssl_ctx = cfg.tls.ssl_context()
        # No pool limit: each sender (the exporter's, and one per tenant with a tenant header) already
        # sends at most num_consumers requests at once; a shared limit would let a tenant whose requests
        # hang hold the connections every other tenant waits for.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=0),
            timeout=aiohttp.ClientTimeout(total=cfg.timeout),
        )

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send(self, request: Request, tenant: str | None = None) -> None:
        assert self._session is not None
        signal = Signal(request.kind or Signal.METRICS.value)
        url = self.urls[signal]
        headers = self._headers
        if tenant is not None and self._route is not None and self._route.header:
            headers = {**headers, self._route.header: tenant}
        async with self._session.post(url, data=request.payload, headers=headers) as resp:
            body = await _read_capped(resp)
            status = resp.status
            if 200 <= status < 300:
                self._partial_success(request, signal, body)
                return
            detail = _error_text(body, resp.headers.get("Content-Type", ""))
            if status in (429, 502, 503, 504):
                raise RetryableError(
                    f"HTTP {status}: {detail}",
                    reason=f"http_{status}",
                    retry_after_s=retry_after_s(resp.headers.get("Retry-After")),
                )
            raise PermanentError(f"HTTP {status} from {url}: {detail}", reason=f"http_{status}")


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The response body, or PermanentError when it is over MAX_RESPONSE_BYTES (not parsed)."""
    too_large = PermanentError(
        f"HTTP {resp.status} response over {MAX_RESPONSE_BYTES} bytes, not parsed",
        reason="response_too_large",
    )
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 << 10):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _error_text(body: bytes, content_type: str) -> str:
    """A person-readable line from an error body: google.rpc.Status.message when it is protobuf."""
    if "protobuf" in content_type:
        try:
            return status_pb2.Status.FromString(body).message[:512] or "(empty status)"
        except Exception:
            pass
    return body[:512].decode("utf-8", errors="replace")


def _create_grpc(settings: Settings, config: OtlpConfig) -> OtlpGrpcExporter:
    return OtlpGrpcExporter(settings, config)


def _create_http(settings: Settings, config: OtlpHttpConfig) -> OtlpHttpExporter:
    return OtlpHttpExporter(settings, config)


_ALL_SIGNALS = frozenset({Signal.METRICS, Signal.TRACES, Signal.LOGS})

grpc_factory = Factory(
    type=GRPC_TYPE,
    kind=ComponentKind.EXPORTER,
    config_class=OtlpConfig,
    create=_create_grpc,
    signals=_ALL_SIGNALS,
    description="Sends metrics, traces and logs with OTLP over gRPC (SignOz, OpenTelemetry Collector).",
)

http_factory = Factory(
    type=HTTP_TYPE,
    kind=ComponentKind.EXPORTER,
    config_class=OtlpHttpConfig,
    create=_create_http,
    signals=_ALL_SIGNALS,
    description="Sends metrics, traces and logs with OTLP over HTTP (application/x-protobuf).",
)

FACTORIES = (grpc_factory, http_factory)
"""Both OTLP exporter types, for the registry."""
