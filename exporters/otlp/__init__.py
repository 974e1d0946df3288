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

Where things are: ``config.py`` (OtlpConfig, OtlpHttpConfig, their validation), ``exporter.py`` (what
both transports share: encoding, tenants, senders, partial success), ``grpc.py`` and ``http.py`` (the
transports), ``metrics.py`` / ``wire.py`` / ``passthrough.py`` / ``resource.py`` (encoding). This module
holds the two factories the registry loads.
"""

from __future__ import annotations

from agent.component import ComponentKind, Factory, Settings, Signal
from exporters.otlp.config import GRPC_TYPE, HTTP_TYPE, OtlpConfig, OtlpHttpConfig
from exporters.otlp.grpc import OtlpGrpcExporter
from exporters.otlp.http import OtlpHttpExporter


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
