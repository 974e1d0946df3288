"""OTLP receiver: metrics, traces and logs over gRPC (default 127.0.0.1:4317) and HTTP (127.0.0.1:4318).

Configuration::

    receivers:
      otlp:
        grpc: 127.0.0.1:4317          # null disables the gRPC server
        http: 127.0.0.1:4318          # null disables the HTTP server
        max_request_body_size: 20MiB  # after decompression, for both
        tls: {cert_file: /etc/tls/tls.crt, key_file: /etc/tls/tls.key}

Signals
-------
Like the OpenTelemetry Collector, the receiver serves only the signals of the pipelines it is in: a
receiver listed only in a metrics pipeline registers ``/v1/metrics`` and ``MetricsService``, so a
trace export answers HTTP 404 or gRPC UNIMPLEMENTED (the server's own answers for an unknown path or
service) instead of being accepted and silently dropped. Metrics become :class:`agent.model.Point`
(rules, refusal reasons and the attribute rendering in ``receivers/otlp/convert.py``). Traces and logs
pass through untouched as :class:`SpanBatch` / :class:`LogBatch` of the opentelemetry-proto
``ResourceSpans`` / ``ResourceLogs`` messages.

Every batch's context holds the request headers or gRPC metadata (lower-case names, repeated ones
joined with ``", "``) except ``authorization``, ``proxy-authorization``, ``cookie``, any ``auth.*`` name
(a client cannot forge one) and binary ``*-bin`` metadata, so a later ``tenant`` processor can read
``x-scope-orgid``.

HTTP
----
``POST /v1/metrics``, ``/v1/traces``, ``/v1/logs`` with ``Content-Type: application/x-protobuf`` (or
``application/protobuf``) or ``application/json`` (OTLP/JSON); the answer uses the request's type.
``Content-Encoding``: none, ``gzip`` or ``zstd``; bodies are read, capped and inflated by
``agent/bodies.py``, the reader the http receiver uses too. Answers:

- ``200`` with ``Export*ServiceResponse``; for metrics, ``partial_success`` holds the number of refused
  points and an English message naming each reason, metric and data point index (first 10);
- ``400`` ``invalid_request`` (not a valid protobuf / OTLP/JSON request), ``invalid_compression``;
- ``408`` ``read_timeout``; ``413`` ``body_too_large`` (raw or after decompression; a bomb is never
  inflated past the cap); ``415`` ``unsupported_media_type``, ``unsupported_encoding`` (anything but
  gzip, zstd or identity, or more than one coding);
- ``429`` ``backpressure`` with ``Retry-After`` (the pipeline refused the batch, or the first chunk
  of a large metrics request: nothing was taken; retry it whole), ``tenant_quota`` with
  ``Retry-After`` and ``X-RateLimit-Limit``, ``-Remaining``, ``-Reset`` (the request's tenant, named by
  the header the ``tenant`` processor reads, is over its ``points_per_second`` or
  ``requests_per_minute``; agent/quota.py),
  ``memory_budget`` with ``Retry-After`` (the request bytes in flight, ``max_request_bytes_in_flight``
  or the agent's total, are spent; taken by Content-Length before the body is read, then as it
  streams in and inflates; zstd output once inflated, bounded by ``max_request_body_size``);
- ``500`` ``pipeline_error`` (a bug downstream; logged).

Connections are guarded as in the http receiver (agent/netguard.py): ``header_timeout`` to send the
request headers (``header_timeout``), ``idle_timeout`` for kept-alive connections, ``max_connections``
with the oldest idle connection closed to make room (``too_many_connections``).

Error answers carry a ``google.rpc.Status`` (protobuf, or JSON for JSON requests and for 415), with
``RetryInfo`` for 429 and ``BadRequest`` for 400.

gRPC
----
``opentelemetry.proto.collector.{metrics,trace,logs}.v1.*Service/Export`` on grpc.aio. Messages over
``max_request_body_size`` (after gRPC decompression) are refused by gRPC itself with
RESOURCE_EXHAUSTED while it reads them; grpc.aio then hands the receiver a cancelled call without a
message, which it cannot tell from a client cancelling before its message arrived: both count as
``cancelled`` (code ``CANCELLED``). A tenant's quota answers RESOURCE_EXHAUSTED, backpressure
and ``memory_budget`` UNAVAILABLE, each with a ``google.rpc.Status`` holding ``RetryInfo`` in the
``grpc-status-details-bin`` trailer; an undecodable request INVALID_ARGUMENT; a pipeline failure
INTERNAL. Partial success as over HTTP. gRPC reads a whole message before the receiver sees it, so
the request-bytes budget is kept by bounding the calls served at once:
``max_request_bytes_in_flight // max_request_body_size`` (3 with the defaults; more calls wait for
a slot up to ``read_timeout``, then get ``memory_budget``); the bytes of a call being served count in
the budget the HTTP requests share. gRPC's own limits: ``max_connections``
(``grpc.max_allowed_incoming_connections``), ``header_timeout`` (the HTTP/2 handshake) and
``idle_timeout`` (``grpc.max_connection_idle_ms``).

Every call gRPC starts is counted once in ``receiver_grpc_requests_total{code}``:

- a call the client cancels (or whose deadline passes) while the receiver holds it, waiting for a
  read slot, for its message or for the pipeline, is refused ``cancelled`` (code ``CANCELLED``, or
  ``DEADLINE_EXCEEDED`` when its deadline passed);
- a call gRPC ends before handing it to the receiver is refused ``cancelled_in_queue`` (code
  ``CANCELLED``, the answer the client gets). grpc.aio takes calls from gRPC's queue one at a time
  on the event loop; when a burst arrives faster (measured: 2,000 concurrent calls on one channel),
  gRPC's queue passes 1,000 calls and it cancels new ones at random, all of them past 3,000 (its
  ``grpc.server.max_pending_requests`` and ``..._hard_limit``, kept: each waiting call costs ~16 KiB,
  20,000 of them 315 MiB). The client also may cancel a call while it waits there. No Python code
  sees these calls, so they are counted from gRPC's own count (channelz ``callsStarted``) minus the
  calls handed to the receiver, checked every 0.5 s: once neither moved for a whole interval (the
  event loop running freely) nothing is waiting in the queue and the difference is exactly the calls
  ended there. A steady stream of calls defers the count until a pause; it is never over-counted.

A call cancelled after the pipeline has taken its data counts as ``OK``: the data was accepted. A
client whose own deadline passes before its call reaches the agent (say, queued in its channel) is
invisible to the agent.

Workers
-------
``workers: N`` (default 1; ``auto``: the cgroup's CPU limit) serves both endpoints from N processes
sharing their ports with ``SO_REUSEPORT`` (agent/workers.py; gRPC's ``grpc.so_reuseport`` on in the
workers only). Each runs this receiver's own code (body reader, limits, TLS, decoding, conversion,
per-point refusals, chunking, gRPC's read slots and queue-loss count) and hands each batch to this
process's pipeline, answering its client only once the pipeline took or refused it, so every answer
above is the same. The kernel spreads connections, not requests: a client that keeps one connection
(every gRPC exporter, an HTTP client with keep-alive) stays on one worker. ``max_request_bytes_in_flight``
is shared out between the workers; ``max_connections`` applies to each. A worker that dies is
restarted (``receiver_worker_restarts_total``); its clients' requests in flight fail (they resend
them), and a batch the pipeline took whose answer could not reach its client is counted in
``receiver_worker_unanswered_points_total`` (a possible duplicate, never a loss). A gRPC call
cancelled while its batch is with this process counts as ``cancelled`` (and, if the pipeline then
takes the batch, as unanswered), where one process would count it ``OK``.

Self-metrics
------------
Metrics: ``receiver_accepted_points_total`` and ``receiver_refused_points_total{reason}`` in data
points. Traces: ``receiver_accepted_spans_total`` / ``receiver_refused_spans_total{reason}`` in spans.
Logs: ``receiver_accepted_log_records_total`` / ``receiver_refused_log_records_total{reason}`` in log
records. Refusals of a decoded request (backpressure, pipeline errors, per-point reasons) count its
items; refusals before decoding (size, type, encoding, bad body, memory_budget, cancelled,
cancelled_in_queue) count 1 per request; ``header_timeout``
and ``too_many_connections`` (in the points counter) 1 per connection. Requests:
``receiver_requests_total{status}`` (HTTP status) and ``receiver_grpc_requests_total{code}``.

Decoding bodies of 1 MiB or more (after decompression, ~6k points, ~25 ms of work) runs in a worker
thread. It costs no throughput (the work holds the GIL either way) but the interpreter hands the GIL
back every 5 ms: measured on a 9 MiB body of 60k points, the longest event-loop stall fell from
~230 ms inline to 20-45 ms, so small requests keep being answered while a large one is parsed.
Such decodes run one at a time process-wide (``netguard.parse_slots``).

Large metrics requests
----------------------
A metrics request is converted and passed on in chunks of ``CHUNK_POINTS`` (50,000) points, in
request order, each converted (off the loop) only once the previous one is taken: a 20 MiB request
holds up to 1 M ordinary points (~240 bytes each as points) or ~10 M of the smallest, so it costs one
chunk of points plus its parsed message (~40 bytes per gauge point) instead of all its points
(measured on 1 M gauge points under ``memory_limiter``: RSS peak 397 -> 202 MiB, accepted whole
instead of refused). A request within one chunk takes exactly the single pass it always took.
Backpressure on the first chunk refuses the request as above (nothing was taken). Once a chunk is
taken, answering 429 would make the client resend it, so a later chunk refused for backpressure is
offered again after the delay the refusal asks for (50 ms to 1 s) for up to ``LATER_CHUNK_RETRY_S``
(5 s) per request; then the answer is a success whose ``partial_success`` starts with "the last N
data point(s) were not taken: the agent stayed overloaded (reason) ...", those points counted as
refused ``backpressure`` (a pipeline failure on a later chunk: the same, ``pipeline_error``).
Per-point refusals of all chunks make one ``partial_success``, as for a request taken whole.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from agent import bodies, netguard, quota
from agent.capture.recorder import CaptureHook
from agent.component import Backpressure, ComponentKind, Consumer, Factory, Settings, Signal, Tasks
from agent.confmodel import Duration, Size, parse_host_port
from agent.limits import SeriesLimits
from agent.model import Batch, LogBatch, MetricBatch, Point, SpanBatch
from agent.netcheck import bind_problem
from agent.tls import ServerTLSConfig
from agent.workers import Pooled, workers_problem
from receivers.otlp.convert import (
    POINT_REASONS,
    Converted,
    MetricsConverter,
    ShadowMetricsRequest,
    count_points,
    to_shadow,
)
from receivers.otlp.wire import RequestError, decode_problem, parse_json, status, to_json

TYPE = "otlp"

REQUEST_REASONS = (
    "invalid_request",
    "invalid_compression",
    "read_timeout",
    "body_too_large",
    "unsupported_media_type",
    "unsupported_encoding",
    "backpressure",
    "tenant_quota",
    "memory_budget",
    "pipeline_error",
    "cancelled",
    "cancelled_in_queue",
)
"""Reasons a whole request is refused (the per-point ones are ``convert.POINT_REASONS``)."""
_GRPC_QUEUE_CHECK_S = 0.5
"""How often the calls gRPC ended in its queue are counted (see the module docs)."""
_CANCEL_NOTICE_S = 1.0
"""How long a call whose message never came waits to learn it was cancelled (see _receive_grpc)."""
CHUNK_POINTS = 50_000
"""Most data points of one metrics request converted and handed downstream at once. A 20 MiB request
holds up to 1 M ordinary points (~10 M of the smallest valid ones), ~240 bytes each once converted:
taken whole, one request cost ~240 MiB (measured: 1 M gauge points took RSS from 75 to 397 MiB).
Chunk by chunk it costs one chunk (~12 MiB) plus its parsed message."""
LATER_CHUNK_RETRY_S = 5.0
"""How long, in all, a request waits for downstream to take a chunk after the first one was taken."""
_THREAD_BODY_BYTES = 2**20
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_CONTENT_TYPES = {True: "application/json", False: "application/x-protobuf"}
"""What a capture records as a request's content type."""
_PROTOBUF_TYPES = frozenset({"application/x-protobuf", "application/protobuf"})
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


OtlpTLSConfig = ServerTLSConfig
"""The receiver's TLS settings (shared with the other receivers: agent/tls.py)."""


@dataclass(frozen=True)
class OtlpConfig:
    grpc: str | None = "127.0.0.1:4317"
    """host:port of the OTLP/gRPC server; null disables it."""
    http: str | None = "127.0.0.1:4318"
    """host:port of the OTLP/HTTP server (/v1/metrics, /v1/traces, /v1/logs); null disables it."""
    max_request_body_size: Size = Size(20 * 2**20)
    """Largest request, raw and after decompression (HTTP 413 / gRPC RESOURCE_EXHAUSTED beyond)."""
    read_timeout: Duration = Duration(30.0)
    """Time allowed to receive an HTTP request body (slow senders get 408)."""
    header_timeout: Duration = Duration(10.0)
    """Time allowed to send HTTP request headers (gRPC: the HTTP/2 handshake); slower ones are closed."""
    idle_timeout: Duration = Duration(75.0)
    """Close a connection (HTTP kept-alive or gRPC) that sends no new request for this long."""
    max_connections: int = 1024
    """Open connections at most, per endpoint; past it the oldest idle one (or the new one) is closed."""
    max_request_bytes_in_flight: Size = Size(64 * 2**20)
    """Request bytes (raw and inflated) held at once; beyond, 429 / UNAVAILABLE memory_budget."""
    tls: OtlpTLSConfig = field(default_factory=OtlpTLSConfig)
    """Serve TLS on both endpoints (and optionally require client certificates)."""
    limits: SeriesLimits = field(default_factory=SeriesLimits)
    """Size limits on each metric point's series (name, own attributes) and on its resource + scope."""
    workers: str = "1"
    """Processes sharing the gRPC and HTTP ports (SO_REUSEPORT), decoding for this one; auto: cgroup CPUs."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.grpc is None and self.http is None:
            problems.append(("", "grpc and http are both null: enable at least one endpoint"))
        problem = workers_problem(self.workers)
        if problem:
            problems.append(("workers", problem))
        elif self.workers != "1":
            for name in ("grpc", "http"):
                endpoint = getattr(self, name)
                if endpoint is not None and _port_of(endpoint) == 0:
                    problems.append(
                        ("workers", f"more than one worker shares the {name} port: it cannot be 0")
                    )
        for name in ("grpc", "http"):
            endpoint = getattr(self, name)
            if endpoint is not None:
                try:
                    parse_host_port(endpoint)
                except ValueError as exc:
                    problems.append((name, str(exc)))
        problems += netguard.server_problems(self)
        if self.max_request_body_size > 2**31 - 1:
            problems.append(("max_request_body_size", "must be below 2GiB (gRPC's message limit)"))
        for path, message in self.tls.validate():
            problems.append((f"tls::{path}" if path else "tls", message))
        problems += [(f"limits::{path}", message) for path, message in self.limits.validate()]
        return problems

    def environment_problems(self) -> list[tuple[str, str]]:
        problems = []
        for name in ("grpc", "http"):
            endpoint = getattr(self, name)
            problem = bind_problem("tcp", endpoint) if endpoint is not None else None
            if problem:
                problems.append((name, problem))
        problems += [(f"tls::{name}", message) for name, message in self.tls.file_problems()]
        return problems


@dataclass(frozen=True)
class _Route:
    """How one signal travels: its HTTP path, gRPC service, messages and self-metric unit."""

    signal: Signal
    path: str
    service: str
    request_class: Any
    response_class: Any
    unit: str
    """Counter infix: ``points`` (the standard receiver counters), ``spans`` or ``log_records``."""


_ROUTES = (
    _Route(
        Signal.METRICS,
        "/v1/metrics",
        "opentelemetry.proto.collector.metrics.v1.MetricsService",
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
        "points",
    ),
    _Route(
        Signal.TRACES,
        "/v1/traces",
        "opentelemetry.proto.collector.trace.v1.TraceService",
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
        "spans",
    ),
    _Route(
        Signal.LOGS,
        "/v1/logs",
        "opentelemetry.proto.collector.logs.v1.LogsService",
        logs_service_pb2.ExportLogsServiceRequest,
        logs_service_pb2.ExportLogsServiceResponse,
        "log_records",
    ),
)


@dataclass
class _Decoded:
    batch: Batch | None
    """None when the request held nothing to pass on; for metrics, the first chunk of points."""
    response: Message
    refused: dict[str, int] = field(default_factory=dict)
    metrics: Any = None
    """Metrics: the parsed ``ShadowMetricsRequest``, released once its points are all passed on."""
    chunks: Generator[list[Point], None, None] | None = None
    """Metrics: the chunks after ``batch`` (``MetricsConverter.chunks``); refusals go to ``converted``."""
    converted: Converted = field(default_factory=Converted)


class _Counters:
    def __init__(self, settings: Settings, route: _Route) -> None:
        tel = settings.telemetry
        reasons = REQUEST_REASONS + (POINT_REASONS if route.signal is Signal.METRICS else ())
        if route.unit == "points":
            self.accepted = tel.accepted()
            self.refused = {r: tel.refused(r) for r in reasons}
        else:
            what = route.unit.replace("_", " ")
            self.accepted = tel.counter(
                f"receiver_accepted_{route.unit}_total", f"OTLP {what} a receiver took in and passed on."
            )
            self.refused = {
                r: tel.counter(
                    f"receiver_refused_{route.unit}_total",
                    f"OTLP {what} a receiver refused, by reason.",
                    reason=r,
                )
                for r in reasons
            }


def _context(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    context: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        if key in _SECRET_HEADERS or key.startswith("auth.") or key.endswith("-bin"):
            continue
        if not isinstance(value, str):
            continue
        context[key] = f"{context[key]}, {value}" if key in context else value
    return context


class OtlpReceiver(Pooled):
    reuse_port = False
    """Bind the HTTP port with SO_REUSEPORT (set in a worker process: agent/workers.py)."""

    def __init__(self, settings: Settings, config: OtlpConfig, consumers: Mapping[Signal, Consumer]) -> None:
        self.settings = settings
        self.config = config
        self.tel = settings.telemetry
        self._log = settings.logger
        self._routes = [r for r in _ROUTES if r.signal in consumers]
        self._capture: CaptureHook | None = None
        self._consumers = dict(consumers)
        self._counters = {r.signal: _Counters(settings, r) for r in self._routes}
        self._converter = MetricsConverter(limits=config.limits)
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._stopped = False
        self.http_port: int | None = None
        """The bound HTTP port once started (useful with port 0)."""
        self.grpc_port: int | None = None
        """The bound gRPC port once started."""
        self._bytes = netguard.ByteBudget(config.max_request_bytes_in_flight, netguard.request_bytes())
        self._make_pool(settings, __name__, config, consumers, port_attrs=("http_port", "grpc_port"))
        self.tel.gauge(
            "receiver_request_bytes_in_flight",
            "Request bytes (raw and inflated) a receiver holds now.",
            lambda: self._bytes.in_use + self._pooled("receiver_request_bytes_in_flight"),
        )
        self._gate = netguard.ConnectionGate(config.max_connections, self.tel.refused("too_many_connections"))
        self.tel.gauge(
            "receiver_connections",
            "Open connections.",
            lambda: len(self._gate) + self._pooled("receiver_connections"),
        )
        self._grpc_reads = asyncio.Semaphore(
            max(1, config.max_request_bytes_in_flight // config.max_request_body_size)
        )
        """gRPC messages being read at once: their size is unknown until read, so each may be the
        largest; once read, the call holds its real size in the byte budget instead."""
        self._grpc_tally = _CallTally()
        self._grpc_tasks = Tasks("otlp-grpc", self._log)
        self.grpc_channelz_id: int | None = None
        """The gRPC server's channelz id once started (None without channelz)."""

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            if self.pool is not None:
                await self.pool.start()
                self.http_port, self.grpc_port = self.pool.ports["http_port"], self.pool.ports["grpc_port"]
                self._log.info(
                    "%d OTLP workers on grpc %s, http %s",
                    len(self.pool.pids),
                    self.config.grpc,
                    self.config.http,
                )
            else:
                if self.config.grpc is not None:
                    await self._start_grpc(self.config.grpc)
                if self.config.http is not None:
                    await self._start_http(self.config.http)
        except BaseException:
            await self.shutdown()
            raise
        self.settings.ready()

    async def _start_http(self, endpoint: str) -> None:
        ssl_ctx = self.config.tls.server_context()
        app = web.Application()
        for route in self._routes:
            app.router.add_post(route.path, self._http_handler(route))
        # auto_decompress off: aiohttp would inflate without our cap; we inflate under it ourselves.
        handler_kwargs: dict[str, Any] = {"access_log": None, "auto_decompress": False}
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0, **handler_kwargs)
        await runner.setup()
        self._runner = runner
        host, port = parse_host_port(endpoint)
        cfg = self.config
        site = netguard.GuardedSite(
            runner,
            host,
            port,
            gate=self._gate,
            header_timeout_s=cfg.header_timeout,
            idle_timeout_s=cfg.idle_timeout,
            header_timeouts=self.tel.refused("header_timeout"),
            ssl_context=ssl_ctx,
            handler_kwargs=handler_kwargs,
            reuse_port=self.reuse_port,
        )
        await site.start()
        self.http_port = site.port
        paths = ", ".join(r.path for r in self._routes) or "no signal"
        self._log.info(
            "OTLP/HTTP on %s://%s:%s (%s)", "https" if ssl_ctx else "http", host, self.http_port, paths
        )

    async def _start_grpc(self, endpoint: str) -> None:
        host, port = parse_host_port(endpoint)
        cfg = self.config
        servers_before = _channelz_server_ids()
        server = grpc.aio.server(
            options=[
                ("grpc.enable_channelz", 1),  # its calls-started count: see _count_queue_losses
                ("grpc.max_receive_message_length", cfg.max_request_body_size),
                # grpc sets SO_REUSEPORT by default: a second agent would share the port silently.
                # Only worker processes share it (agent/workers.py).
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                ("grpc.max_allowed_incoming_connections", cfg.max_connections),
                ("grpc.server_handshake_timeout_ms", int(cfg.header_timeout * 1000)),
                ("grpc.max_connection_idle_ms", int(cfg.idle_timeout * 1000)),
            ]
        )
        # Created synchronously: no other server can appear in channelz in between.
        servers_new = (_channelz_server_ids() or set()) - (servers_before or set())
        handlers: list[Any] = [self._grpc_tally]  # first: asked about every call
        handlers += [
            grpc.method_handlers_generic_handler(
                route.service,
                {
                    # No deserializer: the handler gets the bytes, so decoding is ours to time,
                    # thread and refuse with a reason. Served as stream-unary (the wire is the
                    # same) so that the message is read only once the budget lets it in.
                    "Export": grpc.stream_unary_rpc_method_handler(
                        self._grpc_handler(route), response_serializer=route.response_class.SerializeToString
                    )
                },
            )
            for route in self._routes
        ]
        server.add_generic_rpc_handlers(handlers)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tls = self.config.tls
        if tls.cert_file:
            with open(tls.key_file, "rb") as k, open(tls.cert_file, "rb") as c:
                pair = (k.read(), c.read())
            ca = None
            if tls.client_ca_file:
                with open(tls.client_ca_file, "rb") as f:
                    ca = f.read()
            creds = grpc.ssl_server_credentials(
                [pair], root_certificates=ca, require_client_auth=ca is not None
            )
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
        self._grpc = server
        await server.start()
        self.grpc_port = bound
        if servers_before is not None and len(servers_new) == 1:
            self.grpc_channelz_id = servers_new.pop()
            self._grpc_tasks.spawn(self._count_queue_losses(self.grpc_channelz_id), "queue-losses")
        else:
            self._log.warning("no channelz in grpcio: calls gRPC cancels in its queue go uncounted")
        services = ", ".join(r.service.rsplit(".", 1)[1] for r in self._routes) or "no service"
        self._log.info("OTLP/gRPC on %s:%s%s (%s)", host, bound, " (TLS)" if tls.cert_file else "", services)

    async def shutdown(self) -> None:
        """Stop both servers; idempotent and safe before ``start``. In-flight requests get 5 s."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[BaseException] = []
        if self.pool is not None:
            try:
                await self.pool.stop()
            except Exception as exc:
                errors.append(exc)
        if self._runner is not None:
            try:
                await self._runner.cleanup()
            except Exception as exc:
                errors.append(exc)
            self._runner = None
        await self._grpc_tasks.close()
        if self._grpc is not None:
            try:
                await self._grpc.stop(grace=5.0)
            except Exception as exc:
                errors.append(exc)
            self._grpc = None
        if errors:
            self._log.error("errors while stopping: %r", errors)

    # -- decoding and delivery (shared by both transports) -------------------------------------------
    def _decode(
        self, route: _Route, body: bytes, is_json: bool, context: dict[str, str], now_ns: int
    ) -> _Decoded:
        try:
            if route.signal is Signal.METRICS:
                if is_json:
                    real = route.request_class()
                    parse_json(body, real)
                    request = to_shadow(real)
                else:
                    request = ShadowMetricsRequest.FromString(body)
            else:
                request = route.request_class()
                if is_json:
                    parse_json(body, request)
                else:
                    request.ParseFromString(body)
        except (DecodeError, ValueError) as exc:
            kind = "OTLP/JSON" if is_json else "protobuf"
            name = route.request_class.DESCRIPTOR.name
            raise RequestError(
                400,
                code_pb2.INVALID_ARGUMENT,
                "invalid_request",
                f"the body is not a valid {name} ({kind}): {decode_problem(exc)}",
            ) from None
        if route.signal is Signal.METRICS:
            # Only the first chunk here (in the same thread hop as the parse): _take_metrics converts
            # the others once this one is taken. An ordinary request is all in it.
            converted = Converted()
            chunks = self._converter.chunks(request, now_ns, CHUNK_POINTS, converted)
            points = next(chunks, None)
            batch: Batch | None = MetricBatch(tuple(points), context) if points else None
            return _Decoded(batch, route.response_class(), {}, request, chunks, converted)
        if route.signal is Signal.TRACES:
            resource_spans = tuple(request.resource_spans)
            n = sum(len(ss.spans) for rs in resource_spans for ss in rs.scope_spans)
            batch = SpanBatch(resource_spans, context, n) if n else None
        else:
            resource_logs = tuple(request.resource_logs)
            n = sum(len(sl.log_records) for rl in resource_logs for sl in rl.scope_logs)
            batch = LogBatch(resource_logs, context, n) if n else None
        return _Decoded(batch, route.response_class())

    async def _export(self, route: _Route, body: bytes, is_json: bool, context: dict[str, str]) -> Message:
        """Decode, pass on and count one request; its response, or RequestError (counted here)."""
        counters = self._counters[route.signal]
        now_ns = time.time_ns()
        try:
            if len(body) >= _THREAD_BODY_BYTES:
                async with netguard.parse_slots():
                    decoded = await asyncio.to_thread(self._decode, route, body, is_json, context, now_ns)
            else:
                decoded = self._decode(route, body, is_json, context, now_ns)
        except RequestError as err:
            counters.refused[err.reason].value += 1
            raise
        if decoded.chunks is not None:
            return await self._take_metrics(decoded, context)
        for reason, n in decoded.refused.items():
            counters.refused[reason].value += n
        batch = decoded.batch
        if batch is not None:
            n = len(batch)
            try:
                await self._consumers[route.signal].consume(batch)
            except Backpressure as exc:
                raise _refused(exc, counters, n) from None
            except Exception:
                self._log.exception("the pipeline failed on a batch of %d %s", n, route.unit)
                counters.refused["pipeline_error"].value += n
                raise RequestError(
                    500, code_pb2.INTERNAL, "pipeline_error", "the agent failed to take the batch"
                ) from None
            counters.accepted.value += n
        return decoded.response

    async def _take_metrics(self, decoded: _Decoded, context: dict[str, str]) -> Message:
        """Pass a decoded metrics request on chunk by chunk (:data:`CHUNK_POINTS` points each, in
        request order), so that one chunk of converted points is alive at a time, and answer it.

        Refuse before you take: Backpressure on the first chunk means nothing was taken, so the whole
        request is refused (429 / UNAVAILABLE with RetryInfo, its points counted as backpressure) and
        the client resends it, as for any request. Once a chunk has been taken, a refusal must not
        answer 429: the client would resend the whole request and the chunks taken would arrive
        twice. So a later chunk refused for backpressure is offered again after the delay the
        refusal asks for (between 50 ms and 1 s: the memory limiter re-reads RSS every
        ``check_interval``), for up to :data:`LATER_CHUNK_RETRY_S` over the whole request; if it is
        still refused, that chunk and the rest of the request are not converted and the answer is a
        partial success naming how many points (the last ones of the request) were not taken and
        why, counted as refused ``backpressure``. A pipeline failure after the first chunk is
        answered the same way (``pipeline_error``). Per-point refusals are summed over all chunks
        into one ``partial_success``. The parsed request is released before the answer is built."""
        counters = self._counters[Signal.METRICS]
        consumer = self._consumers[Signal.METRICS]
        out = decoded.converted
        chunks = decoded.chunks
        assert chunks is not None
        batch, decoded.batch, decoded.chunks = decoded.batch, None, None
        taken = 0
        deadline: float | None = None  # when later chunks stop being offered again
        try:
            while batch is not None:
                n = len(batch)
                try:
                    if taken:
                        deadline = await self._offer_again(consumer, batch, deadline)
                    else:
                        await consumer.consume(batch)
                except Backpressure as exc:
                    rest = count_points(decoded.metrics) - taken - sum(out.refused.values())
                    if not taken:
                        raise _refused(exc, counters, rest) from None
                    out.refuse_rest(
                        "backpressure",
                        rest,
                        f"the last {rest} data point(s) were not taken: the agent stayed overloaded "
                        f"({exc.reason}) for {LATER_CHUNK_RETRY_S:g}s after taking the first {taken} "
                        "(resending the request would duplicate those)",
                    )
                    break
                except Exception:
                    self._log.exception("the pipeline failed on a batch of %d points", n)
                    rest = count_points(decoded.metrics) - taken - sum(out.refused.values())
                    if not taken:
                        counters.refused["pipeline_error"].value += rest
                        raise RequestError(
                            500, code_pb2.INTERNAL, "pipeline_error", "the agent failed to take the batch"
                        ) from None
                    out.refuse_rest(
                        "pipeline_error",
                        rest,
                        f"the last {rest} data point(s) were not taken: the agent failed on them after "
                        f"taking the first {taken}",
                    )
                    break
                counters.accepted.value += n
                taken += n
                batch = None  # released before the next chunk is converted
                # Only a full chunk can have a successor: an ordinary request takes no thread hop.
                points = await self._next_chunk(chunks) if n >= CHUNK_POINTS else None
                if points:
                    batch = MetricBatch(tuple(points), context)
                del points
        finally:
            # A worker thread may still be converting if we were cancelled during the hop: leave the
            # iterator to it (it is dropped when the thread is done) rather than close it under it.
            if inspect.getgeneratorstate(chunks) != inspect.GEN_RUNNING:
                chunks.close()
            del chunks
            decoded.metrics = None  # the parsed request goes before the answer is built
            for reason, k in list(out.refused.items()):
                counters.refused[reason].value += k
        response = decoded.response
        if out.rejected:
            response.partial_success.rejected_data_points = out.rejected
            response.partial_success.error_message = out.error_message
        return response

    @staticmethod
    async def _next_chunk(chunks: Generator[list[Point], None, None]) -> list[Point] | None:
        """The next chunk, converted in a worker thread under a parse slot (see the module docs)."""
        async with netguard.parse_slots():
            return await asyncio.to_thread(next, chunks, None)

    @staticmethod
    async def _offer_again(consumer: Consumer, batch: Batch, deadline: float | None) -> float | None:
        """Consume ``batch``, offering it again after each Backpressure until ``deadline`` (set to
        :data:`LATER_CHUNK_RETRY_S` from the first refusal when None); the deadline, or the last
        Backpressure once it has passed."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await consumer.consume(batch)
                return deadline
            except Backpressure as exc:
                now = loop.time()
                if deadline is None:
                    deadline = now + LATER_CHUNK_RETRY_S
                if now >= deadline:
                    raise
                delay = min(max(exc.retry_after_s or 1.0, 0.05), 1.0, deadline - now)
                await asyncio.sleep(delay)

    # -- HTTP ----------------------------------------------------------------------------------------
    def _http_handler(self, route: _Route) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            return await self._handle_http(route, request)

        return handle

    @staticmethod
    def _media(request: web.Request) -> bool:
        """Whether the body is OTLP/JSON (else protobuf); raises BodyRefused 415 for other types."""
        ctype = request.headers.get("Content-Type", "")
        mime, _, params = ctype.partition(";")
        mime = mime.strip().lower()
        charset = ""
        for param in params.split(";"):
            key, _, val = param.partition("=")
            if key.strip().lower() == "charset":
                charset = val.strip().strip('"').lower()
        if (mime not in _PROTOBUF_TYPES and mime != "application/json") or charset not in (
            "",
            "utf-8",
            "utf8",
        ):
            shown = ctype[:60] or "(none)"
            raise bodies.BodyRefused(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/x-protobuf or application/json, got {shown}",
            )
        return mime == "application/json"

    def _http_response(
        self, status_code: int, body: bytes, is_json: bool, headers: dict[str, str]
    ) -> web.Response:
        self.tel.counter(
            "receiver_requests_total", "HTTP requests answered, by status.", status=str(status_code)
        ).value += 1
        ctype = "application/json" if is_json else "application/x-protobuf"
        return web.Response(status=status_code, body=body, headers={"Content-Type": ctype, **headers})

    async def _handle_http(self, route: _Route, request: web.Request) -> web.Response:
        is_json = True  # answers before the type is known are JSON
        cfg = self.config
        with self._bytes.lease() as lease:
            try:
                is_json = self._media(request)
                body = await bodies.read_body(
                    request, lease, max_bytes=cfg.max_request_body_size, timeout_s=cfg.read_timeout
                )
            except bodies.BodyRefused as exc:
                err = _request_error(exc)
                self._counters[route.signal].refused[err.reason].value += 1
                # Every 415 answers in JSON (module docs), unsupported_encoding of a protobuf body too.
                return self._http_error(err, is_json or err.http_status == 415)
            capture = self.capture
            if capture is not None:
                capture("http", body, {"path": route.path, "content_type": _CONTENT_TYPES[is_json]})
            try:
                response = await self._export(route, body, is_json, _context(request.headers.items()))
            except RequestError as err:  # counted by _export
                return self._http_error(err, is_json)
        payload = to_json(response) if is_json else response.SerializeToString()
        return self._http_response(200, payload, is_json, {})

    def _http_error(self, err: RequestError, is_json: bool) -> web.Response:
        st = status(err)
        headers = dict(err.headers)
        if err.retry_after_s is not None:
            headers["Retry-After"] = str(int(err.retry_after_s))
        payload = to_json(st) if is_json else st.SerializeToString()
        return self._http_response(err.http_status, payload, is_json, headers)

    # -- gRPC ----------------------------------------------------------------------------------------
    def _grpc_handler(
        self, route: _Route
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext[Any, Any]], Any]:
        async def handle(
            messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Message:
            return await self._handle_grpc(route, messages, context)

        return handle

    def _count_grpc(self, code: grpc.StatusCode, n: int = 1) -> None:
        self.tel.counter(
            "receiver_grpc_requests_total", "gRPC requests answered, by status code.", code=code.name
        ).value += n

    async def _count_queue_losses(self, server_id: int) -> None:
        """Count the calls gRPC ended before handing them to the receiver (module docs, gRPC): gRPC
        started ``callsStarted`` calls, it handed ``_grpc_tally.taken`` to the receiver, and the rest
        are waiting in its queue or were ended there. While the loop runs freely grpc.aio takes a
        waiting call within a few loop turns, so when neither count moved over a whole interval
        without a loop stall, none is waiting and the difference is exactly the calls lost there."""
        refused = self.tel.refused("cancelled_in_queue")
        loop = asyncio.get_running_loop()
        last: tuple[int, int] | None = None
        lost = 0
        while True:
            began = loop.time()
            await asyncio.sleep(_GRPC_QUEUE_CHECK_S)
            started = _channelz_calls_started(server_id)
            if started is None:
                self._log.warning("channelz stopped answering: calls gRPC cancels in its queue go uncounted")
                return
            now = (started, self._grpc_tally.taken)
            if loop.time() - began > 1.5 * _GRPC_QUEUE_CHECK_S:
                last = None  # the loop stalled: a call may have been handed over and not yet seen
                continue
            if now == last and started - now[1] > lost:
                new = started - now[1] - lost
                lost += new
                refused.value += new
                self._count_grpc(grpc.StatusCode.CANCELLED, new)
            last = now

    async def _receive_grpc(
        self,
        messages: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
        lease: netguard.Lease,
    ) -> bytes:
        """The call's one message, read once a read slot is free (within ``read_timeout``) and held in
        ``lease``; RequestError (not counted) when the budget stays spent or the call is not unary,
        CancelledError when the call was cancelled before its message came."""
        try:
            async with asyncio.timeout(self.config.read_timeout):
                await self._grpc_reads.acquire()
        except TimeoutError:
            raise _over_budget() from None
        try:
            body: bytes | None = None
            async for message in messages:
                if body is not None:
                    raise RequestError(
                        400, code_pb2.INVALID_ARGUMENT, "invalid_request", "Export takes one message"
                    )
                body = message
        finally:
            self._grpc_reads.release()
        if body is None:
            # A cancellation ends the read (no message) before grpc.aio cancels the handler: wait for
            # it, or the call would count as invalid_request. A client that really half-closed
            # without a message waits _CANCEL_NOTICE_S for its answer.
            if await _cancelled(context, _CANCEL_NOTICE_S):
                raise asyncio.CancelledError
            raise RequestError(400, code_pb2.INVALID_ARGUMENT, "invalid_request", "no request message")
        if not lease.cover(len(body)):
            raise _over_budget()
        return body

    async def _handle_grpc(
        self, route: _Route, messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Message:
        metadata = context.invocation_metadata() or ()
        with self._bytes.lease() as lease:
            try:
                try:
                    body = await self._receive_grpc(messages, context, lease)
                except RequestError as err:
                    self._counters[route.signal].refused[err.reason].value += 1
                    raise
                capture = self.capture
                if capture is not None:
                    capture("grpc", body, {"path": route.path, "content_type": "application/grpc"})
                response = await self._export(route, body, False, _context((m[0], m[1]) for m in metadata))
            except RequestError as err:
                code = _GRPC_CODES.get(err.grpc_code, grpc.StatusCode.UNKNOWN)
                self._count_grpc(code)
                details = status(err).SerializeToString()
                await context.abort(
                    code, err.message, trailing_metadata=(("grpc-status-details-bin", details),)
                )
                raise AssertionError("abort returns only by raising") from None
            except asyncio.CancelledError:
                # The client cancelled or its deadline passed while we held the call; whatever
                # _export had not yet passed on is lost to it and would otherwise go uncounted.
                self._counters[route.signal].refused["cancelled"].value += 1
                remaining = context.time_remaining()  # None without a deadline
                expired = remaining is not None and remaining <= _DEADLINE_SLACK_S
                self._count_grpc(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
                raise
        self._count_grpc(grpc.StatusCode.OK)
        return response


_DEADLINE_SLACK_S = 0.1
"""A call cancelled this close to its deadline counts as DEADLINE_EXCEEDED: the server's deadline is
taken when the call arrives, a little after the client's, so a client whose deadline fired cancels
the call while the server still sees a few milliseconds left."""


class _CallTally:
    """The server's first generic handler (a ``grpc.GenericRpcHandler``): grpc.aio asks it about
    every call it hands to the receiver (including ones for an unknown method), before any other; it
    counts them and serves none. One attribute increment per call (~40 ns)."""

    def __init__(self) -> None:
        self.taken = 0

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        self.taken += 1


def _channelz_server_ids() -> set[int] | None:
    """Ids of this process's gRPC servers in channelz; None when grpcio does not expose channelz."""
    try:
        from grpc._cython import cygrpc  # what grpcio-channelz reads too

        ids: set[int] = set()
        while True:
            page = json.loads(cygrpc.channelz_get_servers(max(ids, default=-1) + 1))
            found = {int(s["ref"]["serverId"]) for s in page.get("server", ())}
            ids |= found
            if page.get("end", True) or not found:
                return ids
    except Exception:
        return None


def _channelz_calls_started(server_id: int) -> int | None:
    """Calls gRPC has started on server ``server_id`` (channelz); None when it cannot tell."""
    try:
        from grpc._cython import cygrpc

        data = json.loads(cygrpc.channelz_get_server(server_id))["server"].get("data", {})
        return int(data.get("callsStarted", 0))  # proto3 JSON leaves out a zero
    except Exception:
        return None


async def _cancelled(context: grpc.aio.ServicerContext[Any, Any], timeout_s: float) -> bool:
    """Whether the call ends cancelled within ``timeout_s``; grpc.aio usually cancels the waiting
    handler first (CancelledError out of here)."""
    ended = asyncio.Event()
    context.add_done_callback(lambda _: ended.set())
    try:
        async with asyncio.timeout(timeout_s):
            await ended.wait()
    except TimeoutError:
        pass
    return bool(context.cancelled())


_GRPC_CODE_OF_STATUS = {
    400: code_pb2.INVALID_ARGUMENT,
    408: code_pb2.DEADLINE_EXCEEDED,
    413: code_pb2.RESOURCE_EXHAUSTED,
    415: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.UNAVAILABLE,
}
"""The gRPC code (in the ``google.rpc.Status`` of an HTTP answer) of each status a body refusal has."""


def _refused(exc: Backpressure, counters: _Counters, n: int) -> RequestError:
    """The answer to a batch of ``n`` items refused downstream before anything was taken (counted
    here): agent/quota.py maps it — a tenant's quota 429 / RESOURCE_EXHAUSTED with the X-RateLimit
    headers, any other 429 / UNAVAILABLE; both with Retry-After and RetryInfo."""
    refused = quota.answer(exc)
    counters.refused[refused.reason].value += n
    headers = {k: v for k, v in refused.headers.items() if k != "Retry-After"}
    return RequestError(
        refused.http_status,
        refused.grpc_code,
        refused.reason,
        refused.message,
        retry_after_s=float(refused.retry_after_s),
        headers=headers,
    )


def _request_error(exc: bodies.BodyRefused) -> RequestError:
    return RequestError(
        exc.status, _GRPC_CODE_OF_STATUS[exc.status], exc.reason, exc.message, exc.retry_after_s
    )


def _over_budget() -> RequestError:
    return _request_error(bodies.over_budget())


def _port_of(endpoint: str) -> int | None:
    try:
        return parse_host_port(endpoint)[1]
    except ValueError:
        return None  # reported as the endpoint's problem


def _create(settings: Settings, config: OtlpConfig, consumers: Mapping[Signal, Consumer]) -> OtlpReceiver:
    return OtlpReceiver(settings, config, consumers)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.RECEIVER,
    config_class=OtlpConfig,
    create=_create,
    signals=frozenset({Signal.METRICS, Signal.TRACES, Signal.LOGS}),
    description=(
        "OTLP over gRPC and HTTP (protobuf and JSON, gzip/zstd): metrics into the agent's model, "
        "traces and logs passed through; partial success, backpressure, TLS; workers: N processes."
    ),
)
FACTORY = factory
"""The same factory under the upper-case name some callers use."""
