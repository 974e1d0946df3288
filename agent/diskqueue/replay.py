"""``headwater queue replay DIR --to URL``: send a disk queue's backlog to another endpoint.

Every unacked record of each partition under ``DIR`` (or the one ``--partition`` names) is sent in
append order, one request per record, exactly as the exporter stored it. The exporter type comes from
the partition's name (``partition_name``: the percent-encoded exporter id, then ``@tenant``); the
part of the exporter id before its first ``/`` is the type:

- ``prometheus_remote_write``: the stored payload (a snappy-compressed WriteRequest) is POSTed as is
  to ``URL`` (the full write URL) with the remote-write 1.0 headers.
- ``otlp_http``: the stored payload is the request body as the exporter compressed it. It is POSTed
  to ``URL/v1/<signal>`` (the signal is the record's kind) with ``Content-Type:
  application/x-protobuf`` and a ``Content-Encoding`` read from its magic bytes (gzip, zstd or none).
  A URL that already ends with ``/v1/<signal>`` is that signal's endpoint; records of another signal
  go to the sibling ``/v1/<their signal>``.
- ``otlp`` (gRPC): the stored payload is an uncompressed serialized Export*ServiceRequest. An
  ``http://`` or ``https://`` URL gets it as OTLP/HTTP (as above, no Content-Encoding). Any other URL
  is a gRPC target, sent with grpc.aio through the opentelemetry-proto service stubs: ``host:port`` and
  ``grpcs://host:port`` use TLS (the system's roots, like the exporter's default), ``grpc://host:port``
  plaintext. An ``otlp_http`` backlog can go to a gRPC target too: its bodies are decompressed first.

Outcomes: 2xx (gRPC OK) is *replayed*; with ``--ack`` the record is then acked in the queue, which
needs the partition's lock (an agent running on the directory holds it: refused, exit 2). Without
``--ack`` the partitions are opened read-only and nothing on disk changes, so a replay can run beside a
live agent. Other 4xx (gRPC: a non-retryable code, or a payload the stubs cannot parse) is *rejected*:
reported, counted and left in the queue, and the replay goes on. 429, 5xx, timeouts and connection
errors (gRPC: UNAVAILABLE and the other retryable codes) are retried ``--retries`` times with
exponential backoff (honouring Retry-After); then the replay *stops* there, never skipping ahead
(remote-write needs per-series order), and later partitions are not attempted.

Exit codes: 0 every unacked record was replayed; 1 the replay ran to the end but some records were
rejected (or found damaged on disk, and skipped); 2 nothing was sent because of a usage or queue
problem (no such directory or partition, an exporter type that cannot be told, a bad URL or header, a
partition locked with ``--ack``); 3 the replay stopped because the endpoint kept failing (the summary
says what was sent before).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.parse
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from agent.diskqueue.partition import Partition, QueueError, Record
from agent.diskqueue.queue import partition_dirs
from agent.sending import retry_after_s
from agent.version import USER_AGENT

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_ERROR = 2
EXIT_STOPPED = 3

REMOTE_WRITE = "prometheus_remote_write"
OTLP_GRPC = "otlp"
OTLP_HTTP = "otlp_http"
TYPES = (REMOTE_WRITE, OTLP_GRPC, OTLP_HTTP)
SIGNALS = ("metrics", "traces", "logs")

KIND_HEADER = "\x00kind"
"""Where :mod:`agent.sending` keeps a request's kind (OTLP: the signal) among the stored headers."""

REMOTE_WRITE_HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "User-Agent": USER_AGENT,
}
PAYLOAD_HEADERS = frozenset({"content-encoding", "content-type"})
"""Headers that describe the stored payload: ``--header`` may not override them."""

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

MAX_BACKOFF_S = 30.0
SYNC_EVERY = 256
"""With --ack: write the ledger (when due) after this many acks, so an interrupted replay keeps most."""


class UsageError(Exception):
    """A problem found before anything is sent (exit 2)."""


@dataclass(frozen=True)
class ReplayOptions:
    to: str
    partition: str | None = None
    ack: bool = False
    dry_run: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    rate: float | None = None
    """Requests per second at most (None: as fast as the endpoint answers)."""
    retries: int = 3
    """Retries of a record after a retryable failure before the replay stops."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubled each time (capped at MAX_BACKOFF_S)."""
    timeout_s: float = 30.0


@dataclass(frozen=True)
class PartitionInfo:
    path: str
    name: str
    exporter_id: str
    type: str
    tenant: str | None


@dataclass
class Summary:
    partition: str
    path: str
    type: str
    tenant: str | None
    records: int = 0
    """Unacked records found at open."""
    replayed: int = 0
    points: int = 0
    """Points (stored ``items``) in the replayed records."""
    bytes: int = 0
    """Payload bytes of the replayed records."""
    rejected: int = 0
    rejected_points: int = 0
    partially_rejected_points: int = 0
    """OTLP partial success: points the endpoint accepted the request with but refused."""
    failed: int = 0
    """Records that could not be delivered after the retries (the replay stopped at the first)."""
    not_attempted: int = 0
    unreadable: int = 0
    """Records whose checksum failed when read (skipped: nothing to send)."""
    acked: int = 0
    status: str = "ok"
    """ok | rejected | stopped | not_started | error"""
    error: str = ""
    messages: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    kind: str
    """replayed | rejected | retry"""
    detail: str = ""
    retry_after_s: float | None = None
    partially_rejected: int = 0


def parse_partition_name(name: str) -> tuple[str, str, str | None]:
    """(exporter id, exporter type, tenant) from a partition directory's name (see ``partition_name``).

    ``otlp%2Fsignoz@acme`` → (``otlp/signoz``, ``otlp``, ``acme``). ``@`` inside an id or a tenant is
    percent-encoded, so the first literal ``@`` separates them.
    """
    encoded_id, sep, encoded_tenant = name.partition("@")
    exporter_id = urllib.parse.unquote(encoded_id)
    tenant = urllib.parse.unquote(encoded_tenant) if sep else None
    return exporter_id, exporter_id.partition("/")[0], tenant


def describe_partition(path: str) -> PartitionInfo:
    name = os.path.basename(path.rstrip("/"))
    exporter_id, type_, tenant = parse_partition_name(name)
    if type_ not in TYPES:
        raise UsageError(
            f"{name}: cannot tell which exporter wrote this partition (its exporter id {exporter_id!r}"
            f" does not start with one of {', '.join(TYPES)}); nothing was sent"
        )
    return PartitionInfo(path, name, exporter_id, type_, tenant)


def content_encoding(payload: bytes) -> str | None:
    """The compression of a stored otlp_http body, from its magic bytes (None: uncompressed)."""
    if payload.startswith(GZIP_MAGIC):
        return "gzip"
    if payload.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def decompress(payload: bytes) -> bytes:
    encoding = content_encoding(payload)
    if encoding == "gzip":
        return zlib.decompress(payload, wbits=31)
    if encoding == "zstd":
        import cramjam

        return bytes(cramjam.zstd.decompress(payload))
    return payload


def record_signal(record: Record) -> str:
    return record.headers.get(KIND_HEADER) or "metrics"


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def otlp_url(base: str, signal: str) -> str:
    """``base/v1/<signal>``; a base already ending with ``/v1/<some signal>`` has that suffix replaced."""
    trimmed = base.rstrip("/")
    for s in SIGNALS:
        if trimmed.endswith("/v1/" + s):
            trimmed = trimmed[: -len("/v1/" + s)]
            break
    return f"{trimmed}/v1/{signal}"


def grpc_target(url: str) -> tuple[str, bool]:
    """(host:port, plaintext) of a gRPC URL: ``grpc://`` is plaintext; ``grpcs://`` and bare use TLS."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.rstrip("/"), False
    if scheme not in ("grpc", "grpcs"):
        raise UsageError(f"--to {url}: use http://, https://, grpc://, grpcs:// or host:port")
    return rest.rstrip("/"), scheme == "grpc"


def _stored_headers(record: Record) -> dict[str, str]:
    return {k: v for k, v in record.headers.items() if k != KIND_HEADER}


def http_request(
    info: PartitionInfo, record: Record, url: str, extra: dict[str, str]
) -> tuple[str, bytes, dict[str, str]]:
    """(URL, body, headers) of one record sent over HTTP."""
    if info.type == REMOTE_WRITE:
        return url, record.payload, {**_stored_headers(record), **extra, **REMOTE_WRITE_HEADERS}
    headers = {**_stored_headers(record), "User-Agent": USER_AGENT, **extra}
    headers["Content-Type"] = "application/x-protobuf"
    encoding = content_encoding(record.payload) if info.type == OTLP_HTTP else None
    if encoding:
        headers["Content-Encoding"] = encoding
    return otlp_url(url, record_signal(record)), record.payload, headers


def _check_options(infos: Sequence[PartitionInfo], opts: ReplayOptions) -> None:
    if opts.rate is not None and opts.rate <= 0:
        raise UsageError("--rate must be greater than 0")
    if opts.retries < 0:
        raise UsageError("--retries must be 0 or more")
    for key, _ in opts.headers:
        if not key or key.lower() in PAYLOAD_HEADERS:
            raise UsageError(
                f"--header {key!r}: the payload's own headers (Content-Type, Content-Encoding)"
                " cannot be replaced"
            )
    http = is_http(opts.to)
    if http:
        parsed = urllib.parse.urlsplit(opts.to)
        if not parsed.hostname:
            raise UsageError(f"--to {opts.to}: not a URL")
        return
    target, _ = grpc_target(opts.to)
    host, colon, port = target.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise UsageError(f"--to {opts.to}: a gRPC target is host:port (or give an http(s):// URL)")
    for key, _ in opts.headers:
        if key.lower().startswith(("grpc-", ":")) or key.lower() in ("user-agent", "te"):
            raise UsageError(f"--header {key!r}: reserved by gRPC")
    for info in infos:
        if info.type == REMOTE_WRITE:
            raise UsageError(
                f"{info.name}: a remote-write backlog is sent over HTTP; --to must be the full http(s)://"
                " write URL"
            )


# -- transports --------------------------------------------------------------------------------------


class HttpTransport:
    def __init__(self, timeout_s: float) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s), auto_decompress=False
        )

    async def send(
        self, info: PartitionInfo, record: Record, to: str, extra: dict[str, str]
    ) -> tuple[Outcome, str]:
        url, body, headers = http_request(info, record, to, extra)
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                text = await resp.content.read(4 << 20)
                status = resp.status
                if 200 <= status < 300:
                    return Outcome("replayed", partially_rejected=_partial(info, record, text)), url
                detail = f"HTTP {status}: {_error_text(text)}"
                if status == 429 or status >= 500:
                    return Outcome("retry", detail, retry_after_s(resp.headers.get("Retry-After"))), url
                return Outcome("rejected", detail), url
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Outcome("retry", f"{type(exc).__name__}: {exc}".rstrip(": ")), url

    async def close(self) -> None:
        await self._session.close()


def _partial(info: PartitionInfo, record: Record, body: bytes) -> int:
    """Points an OTLP endpoint refused in a partial success (0 when none, or not OTLP)."""
    if info.type == REMOTE_WRITE or not body:
        return 0
    try:
        cls, rejected_field = _otlp_response(record_signal(record))
        response = cls.FromString(body)
    except Exception:
        return 0
    return int(getattr(response.partial_success, rejected_field))


def _otlp_response(signal: str) -> tuple[Any, str]:
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    return {
        "metrics": (metrics_service_pb2.ExportMetricsServiceResponse, "rejected_data_points"),
        "traces": (trace_service_pb2.ExportTraceServiceResponse, "rejected_spans"),
        "logs": (logs_service_pb2.ExportLogsServiceResponse, "rejected_log_records"),
    }[signal]


def _error_text(body: bytes) -> str:
    try:
        from google.rpc import status_pb2

        message = str(status_pb2.Status.FromString(body).message)
        if message:
            return message[:300]
    except Exception:
        pass
    return body[:300].decode("utf-8", errors="replace").strip() or "(empty body)"


class GrpcTransport:
    """Export calls through the opentelemetry-proto service stubs over one grpc.aio channel."""

    def __init__(self, url: str, timeout_s: float) -> None:
        import grpc
        import grpc.aio
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self._grpc = grpc
        target, plaintext = grpc_target(url)
        self.target = target
        options = [
            ("grpc.primary_user_agent", USER_AGENT),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.enable_retries", 0),
        ]
        if plaintext:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
        self._timeout_s = timeout_s
        stubs: Any = (metrics_service_pb2_grpc, trace_service_pb2_grpc, logs_service_pb2_grpc)
        self._calls: dict[str, tuple[Any, Any, str]] = {
            "metrics": (
                stubs[0].MetricsServiceStub(self._channel).Export,
                metrics_service_pb2.ExportMetricsServiceRequest,
                "rejected_data_points",
            ),
            "traces": (
                stubs[1].TraceServiceStub(self._channel).Export,
                trace_service_pb2.ExportTraceServiceRequest,
                "rejected_spans",
            ),
            "logs": (
                stubs[2].LogsServiceStub(self._channel).Export,
                logs_service_pb2.ExportLogsServiceRequest,
                "rejected_log_records",
            ),
        }
        code = grpc.StatusCode
        self._retryable = {
            code.CANCELLED,
            code.DEADLINE_EXCEEDED,
            code.ABORTED,
            code.OUT_OF_RANGE,
            code.UNAVAILABLE,
            code.DATA_LOSS,
            code.RESOURCE_EXHAUSTED,
        }

    async def send(
        self, info: PartitionInfo, record: Record, to: str, extra: dict[str, str]
    ) -> tuple[Outcome, str]:
        signal = record_signal(record)
        where = f"{self.target} ({signal})"
        call, request_cls, rejected_field = self._calls[signal]
        try:
            request = request_cls.FromString(decompress(record.payload))
        except Exception as exc:
            return Outcome("rejected", f"the stored payload is not an OTLP {signal} request: {exc}"), where
        metadata = tuple((k.lower(), v) for k, v in {**_stored_headers(record), **extra}.items())
        try:
            response = await call(request, timeout=self._timeout_s, metadata=metadata)
        except self._grpc.aio.AioRpcError as exc:
            detail = f"gRPC {exc.code().name}: {exc.details()}"
            return Outcome("retry" if exc.code() in self._retryable else "rejected", detail), where
        return Outcome(
            "replayed", partially_rejected=int(getattr(response.partial_success, rejected_field))
        ), where

    async def close(self) -> None:
        await self._channel.close()


Transport = HttpTransport | GrpcTransport


# -- the replay --------------------------------------------------------------------------------------


class _Pacer:
    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = time.monotonic()

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval


async def _replay_partition(
    info: PartitionInfo,
    part: Partition,
    opts: ReplayOptions,
    transport: Transport | None,
    pacer: _Pacer,
    out: Summary,
    say: Any,
) -> None:
    extra = dict(opts.headers)
    since_sync = 0
    for record in part.iter_unacked():
        if opts.dry_run or transport is None:
            url, body, headers = (
                http_request(info, record, opts.to, extra)
                if is_http(opts.to)
                else (f"{grpc_target(opts.to)[0]} ({record_signal(record)})", record.payload, extra)
            )
            shown = ", ".join(f"{k}: {v}" for k, v in headers.items())
            say(
                f"  would send record {record.seq}: {record.items} points, {len(body)} bytes"
                f" to {url}" + (f" [{shown}]" if shown else "")
            )
            out.replayed += 1
            out.points += record.items
            out.bytes += len(body)
            continue
        attempt = 0
        while True:
            await pacer.wait()
            outcome, where = await transport.send(info, record, opts.to, extra)
            if outcome.kind != "retry":
                break
            if attempt >= opts.retries:
                out.failed += 1
                out.status = "stopped"
                out.error = f"record {record.seq} to {where}: {outcome.detail} (after {attempt + 1} attempts)"
                out.not_attempted = max(0, out.records - out.replayed - out.rejected - out.failed)
                return
            delay = min(MAX_BACKOFF_S, opts.backoff_s * 2**attempt)
            if outcome.retry_after_s is not None:
                delay = max(delay, min(outcome.retry_after_s, MAX_BACKOFF_S))
            say(f"  record {record.seq}: {outcome.detail}; retrying in {delay:.2f}s")
            attempt += 1
            await asyncio.sleep(delay)
        if outcome.kind == "rejected":
            out.rejected += 1
            out.rejected_points += record.items
            out.messages.append(f"record {record.seq} rejected by {where}: {outcome.detail}")
            say(f"  record {record.seq} ({record.items} points) rejected by {where}: {outcome.detail}")
            continue
        out.replayed += 1
        out.points += record.items
        out.bytes += len(record.payload)
        out.partially_rejected_points += outcome.partially_rejected
        if opts.ack and part.ack(record.seq):
            out.acked += 1
            since_sync += 1
            if since_sync >= SYNC_EVERY:
                await asyncio.to_thread(part.sync)
                since_sync = 0
    # Records found damaged while reading are skipped by iter_unacked (and counted by the partition).
    out.unreadable = max(0, out.records - out.replayed - out.rejected)
    if out.rejected or out.unreadable:
        out.status = "rejected"


def _select(root: str, partition: str | None) -> list[str]:
    if not os.path.isdir(root):
        raise UsageError(f"{root} is not a directory")
    dirs = partition_dirs(root)
    if partition is not None:
        dirs = [d for d in dirs if os.path.basename(d.rstrip("/")) == partition]
        if not dirs:
            raise UsageError(f"no disk-queue partition named {partition} under {root}")
    if not dirs:
        raise UsageError(f"no disk-queue partitions under {root}")
    return dirs


async def replay(root: str, opts: ReplayOptions, say: Any = print) -> tuple[int, list[Summary]]:
    """Replay the partitions under ``root``; (exit code, one summary per partition)."""
    infos = [describe_partition(d) for d in _select(root, opts.partition)]
    _check_options(infos, opts)
    readonly = not opts.ack or opts.dry_run
    opened: list[Partition] = []
    try:
        for info in infos:
            # --ack takes the lock (QueueLocked while an agent runs on the directory) before anything
            # is sent, for every partition, so a replay never stops halfway on a lock.
            opened.append(await asyncio.to_thread(Partition.open, info.path, None, readonly=readonly))
        summaries = [
            Summary(i.name, i.path, i.type, i.tenant, records=p.records)
            for i, p in zip(infos, opened, strict=True)
        ]
        transport: Transport | None = None
        if not opts.dry_run:
            transport = (
                HttpTransport(opts.timeout_s) if is_http(opts.to) else GrpcTransport(opts.to, opts.timeout_s)
            )
        pacer = _Pacer(opts.rate)
        stopped = False
        try:
            for info, part, out in zip(infos, opened, summaries, strict=True):
                if stopped:
                    out.status = "not_started"
                    out.not_attempted = out.records
                    continue
                say(
                    f"{info.name}: {out.records} unacked records ({info.type}"
                    + (f", tenant {info.tenant}" if info.tenant is not None else "")
                    + ")"
                )
                await _replay_partition(info, part, opts, transport, pacer, out, say)
                stopped = out.status == "stopped"
        finally:
            if transport is not None:
                await transport.close()
    finally:
        for part in opened:
            await asyncio.to_thread(part.close)  # with --ack: writes the ledger holding the acks
    if any(s.status == "stopped" for s in summaries):
        return EXIT_STOPPED, summaries
    if any(s.rejected or s.unreadable for s in summaries):
        return EXIT_REJECTED, summaries
    return EXIT_OK, summaries


def _summary_line(s: Summary, dry_run: bool) -> str:
    verb = "would send" if dry_run else "replayed"
    line = (
        f"{s.partition}: {verb} {s.replayed} of {s.records} records, {s.points} points, {s.bytes} bytes;"
        f" {s.rejected} rejected ({s.rejected_points} points), {s.failed} failed"
    )
    if s.acked:
        line += f"; {s.acked} acked"
    if s.unreadable:
        line += f"; {s.unreadable} unreadable (damaged) records skipped"
    if s.partially_rejected_points:
        line += f"; {s.partially_rejected_points} points refused in partial successes"
    if s.status == "stopped":
        line += f"; STOPPED: {s.error}; {s.not_attempted} records not attempted"
    elif s.status == "not_started":
        line += f"; not started (an earlier partition stopped); {s.not_attempted} records not attempted"
    return line


def replay_command(root: str, opts: ReplayOptions, as_json: bool = False) -> int:
    """Run ``headwater queue replay``; returns the exit code (see the module docstring)."""

    def say(text: str) -> None:
        if not as_json:
            print(text, flush=True)

    try:
        code, summaries = asyncio.run(replay(root, opts, say))
    except UsageError as exc:
        print(f"headwater queue replay: {exc}")
        return EXIT_ERROR
    except (QueueError, OSError) as exc:
        print(f"headwater queue replay: {exc}; nothing was sent")
        return EXIT_ERROR
    if as_json:
        print(json.dumps([asdict(s) for s in summaries], indent=2))
        return code
    for s in summaries:
        print(_summary_line(s, opts.dry_run))
    total = sum(s.replayed for s in summaries)
    if opts.dry_run:
        print(f"dry run: {total} records would be sent to {opts.to}; nothing was sent or acked")
    elif code == EXIT_OK:
        print(f"every unacked record was replayed to {opts.to}" + (" and acked" if opts.ack else ""))
    elif code == EXIT_REJECTED:
        print(f"{total} records replayed; some were rejected and stay in the queue")
    else:
        again = "acked ones are not sent again" if opts.ack else "without --ack it sends them all again"
        print(f"stopped: {total} records replayed before {opts.to} kept failing; a rerun resumes ({again})")
    return code
