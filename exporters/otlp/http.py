"""``otlp_http``: the OTLP exporter over HTTP (POST application/x-protobuf over aiohttp), its body
compression, and reading size-capped responses."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import aiohttp
import cramjam
from google.rpc import status_pb2
from zlib_ng import zlib_ng

from agent.component import PermanentError, RetryableError, Settings, Signal
from agent.sending import Request, retry_after_s
from agent.version import USER_AGENT
from exporters.otlp.config import OtlpHttpConfig
from exporters.otlp.exporter import _SIGNALS, MAX_RESPONSE_BYTES, _OtlpExporter


def gzip_compress(body: bytes, level: int = 6) -> bytes:
    """A gzip member at ``level``, made by zlib-ng: the same format and levels as zlib, about half the
    CPU (measured on OTLP bodies here: 0.77 against 1.55 µs a data point at level 6)."""
    return bytes(zlib_ng.compress(body, level, wbits=31))


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
