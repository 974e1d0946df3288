"""The OTLP exporters' configuration: ``otlp`` (:class:`OtlpConfig`, gRPC) and ``otlp_http``
(:class:`OtlpHttpConfig`), the tenant routing block they share, and their validation. The field
docstrings are the user documentation shown by ``headwater components``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from agent.bucket_layouts import BucketLayout, bounds_problem, validate_layouts
from agent.client_config import ClientConfig, url_problem
from agent.confmodel import Duration, Size, parse_host_port
from agent.tenancy import TenantRoutingConfig
from agent.tls import ClientTLSConfig

GRPC_TYPE = "otlp"
HTTP_TYPE = "otlp_http"

DEFAULT_EXPLICIT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
"""Seconds: the OpenTelemetry semantic-conventions advice for request durations (5 ms … 10 s), widened
with 1 ms and 2.5 ms for cache and database calls and 30 s / 60 s for slow jobs. StatsD timers arrive
in seconds (converted from ms by the receiver), so these fit them without configuration."""

MAX_REQUEST_BYTES = 64 << 20
"""Largest max_request_size allowed: what OTLP receivers are asked to accept at least."""

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
class _GrpcFields:
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


@dataclass(frozen=True)
class _HttpFields:
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


@dataclass(frozen=True)
class _EncodingFields:
    """How both OTLP exporters encode metrics and which resource attributes they add."""

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


@dataclass(frozen=True)
class _OtlpClientConfig(ClientConfig):
    """The client block of both OTLP exporters, and the checks they share."""

    reserved_headers = _RESERVED_HEADERS

    tenant: OtlpTenantRoutingConfig | None = None
    """Per-tenant routing: the tenant as a resource attribute and/or a header, with a queue per tenant
    when a header is used. Unset = off."""


# The client block last: see agent.client_config.
@dataclass(frozen=True)
class OtlpConfig(_OtlpClientConfig, _EncodingFields, _GrpcFields):
    def validate(self) -> list[tuple[str, str]]:
        problems = self.client_problems() + _encoding_problems(self)
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
class OtlpHttpConfig(_OtlpClientConfig, _EncodingFields, _HttpFields):
    def validate(self) -> list[tuple[str, str]]:
        problems = self.client_problems() + _encoding_problems(self)
        for name in ("endpoint", "metrics_endpoint", "traces_endpoint", "logs_endpoint"):
            url = getattr(self, name)
            if url or name == "endpoint":
                problems += url_problem(name, url)
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


def _encoding_problems(cfg: AnyConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
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
    return problems
