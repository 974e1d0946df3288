"""Request bodies for the HTTP-serving receivers: read and inflated under one cap, one timeout, one budget.

Every receiver that serves HTTP (``http``, ``otlp``) reads its request bodies with :func:`read_body`,
so a compression bomb, a slow body or a corrupt stream is refused the same way on every port. It
answers the body's bytes (inflated) or raises :class:`BodyRefused`, whose ``status`` is the HTTP
answer and whose ``reason`` is the ``refused{reason}`` label the receiver counts once per request:

- ``415 unsupported_encoding``: a ``Content-Encoding`` other than ``gzip`` (``x-gzip``), ``zstd`` or
  ``identity``, or more than one coding (a list, or the header repeated). ``deflate``, ``br`` and
  the others are refused rather than passed on undecoded;
- ``413 body_too_large``: over ``max_bytes`` raw (by Content-Length before anything is read, or
  counted as the body streams in: empty gzip members inflate to nothing, so the raw size is capped
  too) or once inflated;
- ``400 invalid_compression``: a corrupt or truncated gzip or zstd stream, or junk after it;
- ``408 read_timeout``: the body did not arrive within ``timeout_s``;
- ``429 memory_budget`` (``retry_after_s`` 1): the request bytes the receiver and the agent may hold
  at once (:class:`agent.netguard.ByteBudget`) are spent.

Decompression never produces more than the cap plus one byte, whatever the body claims:

- gzip (concatenated members are one stream, RFC 1952) is inflated as it streams in, with zlib's
  ``max_length`` set to the room left, so a bomb stops at the first byte past the cap;
- zstd (one or more frames) is decompressed once the raw body is in, by
  ``cramjam.zstd.decompress_into`` into a buffer of cap + 1 bytes, which stops writing (and fails)
  when the buffer is full: a 4 GiB zstd bomb is refused after ~1 ms, having written at most cap + 1
  bytes. The buffer is numpy-allocated (lazily zeroed pages), so a small body touches only the
  pages it fills. Bodies of :data:`ZSTD_THREAD_BYTES` or more are decompressed in a worker thread.

Request bytes are taken in the caller's :class:`agent.netguard.Lease` before they are buffered: the
declared Content-Length up front, then the raw bytes as they stream in, gzip output as it inflates,
zstd output once inflated (bounded by the cap). The lease gives them back when the request is done.
"""

from __future__ import annotations

import asyncio
import json
import math
import zlib
from collections.abc import Iterable

import cramjam
import numpy as np
from aiohttp import web

from agent.confmodel import format_duration, format_size
from agent.netguard import Lease

READ_CHUNK_BYTES = 2**16
"""Bytes read from the socket at a time."""
ZSTD_THREAD_BYTES = 2**17
"""zstd bodies at least this large (raw) are decompressed in a worker thread (up to ~1 ms per MiB out)."""
ENCODINGS = ("gzip", "zstd")
"""The content codings :func:`read_body` inflates (besides none)."""
REASONS = ("unsupported_encoding", "body_too_large", "invalid_compression", "read_timeout", "memory_budget")
"""Every ``reason`` a :class:`BodyRefused` carries (receivers create their counters up front)."""
_CODINGS = {"": "", "identity": "", "gzip": "gzip", "x-gzip": "gzip", "zstd": "zstd"}


class BodyRefused(Exception):
    """A request refused for its body: the HTTP ``status``, a bounded ``reason``, a message for the
    sender, and the delay a retry should wait (``memory_budget`` only)."""

    def __init__(self, status: int, reason: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> dict[str, str]:
        """``{"Retry-After": whole seconds}`` when a retry should wait, else empty."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def too_large(cap: int, inflated: bool) -> BodyRefused:
    how = "inflates past" if inflated else "is larger than"
    return BodyRefused(413, "body_too_large", f"body {how} max_request_body_size ({format_size(cap)})")


def invalid_compression(encoding: str, detail: str) -> BodyRefused:
    return BodyRefused(400, "invalid_compression", f"body is not valid {encoding}: {detail}")


def over_budget() -> BodyRefused:
    """The refusal of a request whose bytes the request-bytes budget cannot take now."""
    return BodyRefused(
        429,
        "memory_budget",
        "the agent holds as many request bytes as it may (max_request_bytes_in_flight); retry later",
        retry_after_s=1.0,
    )


def content_encoding(values: Iterable[str]) -> str:
    """``""``, ``"gzip"`` or ``"zstd"`` for the ``Content-Encoding`` header ``values`` (every
    occurrence); raises 415 ``unsupported_encoding`` for any other coding or more than one."""
    codings = [c.strip().lower() for value in values for c in value.split(",")]
    if len(codings) > 1 or (codings and codings[0] not in _CODINGS):
        listed = ", ".join(codings)
        shown = json.dumps(listed[:40] + "…" if len(listed) > 40 else listed)
        raise BodyRefused(
            415,
            "unsupported_encoding",
            f"Content-Encoding {shown} is not supported: send gzip, zstd or none",
        )
    return _CODINGS[codings[0]] if codings else ""


class GzipInflater:
    """Inflates gzip members as the body streams in, refusing past ``limit`` inflated bytes."""

    __slots__ = ("_d", "_limit", "_parts", "_size")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        """Inflate ``data``; BodyRefused 413 past the limit, 400 when it is not gzip."""
        try:
            while data:
                # max_length one past the room left: the first byte over the cap is seen, never more.
                out = self._d.decompress(data, self._limit - self._size + 1)
                self._size += len(out)
                if self._size > self._limit:
                    raise too_large(self._limit, inflated=True)
                self._parts.append(out)
                if self._d.eof:  # concatenated members are one stream (RFC 1952)
                    data = self._d.unused_data
                    if data:
                        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    data = self._d.unconsumed_tail
        except zlib.error as exc:
            raise invalid_compression("gzip", str(exc)) from None

    @property
    def inflated(self) -> int:
        """Bytes inflated so far (at most ``limit + 1``): what the request-bytes budget holds."""
        return self._size

    def finish(self) -> bytes:
        """The whole inflated body; BodyRefused 400 when the last member is incomplete."""
        if not self._d.eof:
            raise invalid_compression("gzip", "the stream ends early")
        return b"".join(self._parts)


def zstd_decompress(data: bytes, limit: int) -> bytes:
    """``data`` (one or more zstd frames) decompressed; BodyRefused 413 past ``limit`` bytes, 400
    when it is not zstd or ends early."""
    buffer = np.empty(limit + 1, dtype=np.uint8)
    try:
        size = int(cramjam.zstd.decompress_into(data, buffer.data))
    except cramjam.DecompressionError as exc:
        # cramjam reports a full output buffer with this message (pinned by a test).
        if "whole buffer" in str(exc):
            raise too_large(limit, inflated=True) from None
        raise invalid_compression("zstd", str(exc)) from None
    if size > limit:
        raise too_large(limit, inflated=True)
    return buffer[:size].tobytes()


async def read_body(request: web.BaseRequest, lease: Lease, *, max_bytes: int, timeout_s: float) -> bytes:
    """The body of ``request``, inflated, at most ``max_bytes`` raw and inflated, received within
    ``timeout_s``, its bytes held in ``lease`` before they are buffered; raises :class:`BodyRefused`
    (see the module docs). The request's ``Content-Encoding`` is checked before anything is read."""
    encoding = content_encoding(request.headers.getall("Content-Encoding", []))
    declared = request.content_length or 0
    if declared > max_bytes:
        raise too_large(max_bytes, inflated=False)
    if not lease.cover(declared):
        raise over_budget()
    inflater = GzipInflater(max_bytes) if encoding == "gzip" else None
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.read(READ_CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:  # raw bytes are capped too: empty gzip members inflate to nothing
                    raise too_large(max_bytes, inflated=False)
                if inflater is not None:
                    inflater.feed(chunk)
                    held = max(declared, inflater.inflated + len(chunk))
                else:
                    parts.append(chunk)
                    held = size
                if not lease.cover(held):  # chunked, or inflating past what was declared
                    raise over_budget()
    except TimeoutError:
        raise BodyRefused(
            408, "read_timeout", f"the body did not arrive within {format_duration(timeout_s)}"
        ) from None
    if inflater is not None:
        return inflater.finish()
    raw = b"".join(parts)
    if encoding != "zstd":
        return raw
    if len(raw) >= ZSTD_THREAD_BYTES:
        out = await asyncio.to_thread(zstd_decompress, raw, max_bytes)
    else:
        out = zstd_decompress(raw, max_bytes)
    if not lease.cover(len(raw) + len(out)):
        raise over_budget()
    return out
