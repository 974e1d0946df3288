"""``otlp``: the OTLP exporter over gRPC (unary Export calls over grpc.aio), and the gRPC retry rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

from agent.component import PermanentError, RetryableError, Settings, Signal
from agent.sending import Request
from agent.version import USER_AGENT
from exporters.otlp.config import MAX_REQUEST_BYTES, OtlpConfig
from exporters.otlp.exporter import _SIGNALS, MAX_RESPONSE_BYTES, _OtlpExporter

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
