"""JSON ingest API over HTTP: ``POST /v1/metrics`` and ``GET /healthz`` (default 127.0.0.1:8080).

Request: ``Content-Type: application/json`` (a ``charset`` parameter may only say utf-8), optionally
``Content-Encoding: gzip`` or ``zstd``; ``Authorization: Bearer <token>`` when tokens are configured.
The body is one metric object or a list of up to ``max_items`` of them; the field rules, the
timestamp rule and the item reason codes are in ``agent/json_items.py``. Every item stands alone:
a bad item is refused with its index and a reason, and the others still go through. Configuration::

    receivers:
      http:
        endpoint: 127.0.0.1:8080
        auth:                                   # optional; any token makes it required
          tokens:
            - {token: "${env:TEAM_A_TOKEN}", tenant: team-a}
          tokens_file: /etc/headwater/tokens.yaml   # {<token>: <tenant>, ...}, re-read on change
          jwt:                                  # JWTs, verified by agent/jwt_auth.py
            algorithms: [RS256]
            jwks_file: /etc/headwater/jwks.json  # or key_file (PEM); HS256 takes secret: ${env:VAR}
            audience: headwater
            issuer: https://idp.example.com
            tenant_claim: org.id
        tls: {cert_file: /etc/tls/tls.crt, key_file: /etc/tls/tls.key}

Tokens are a list of {token, tenant} rather than a token → tenant map because the config loader expands
``${env:...}`` in values only, never in keys, and because an error path must never contain a token.

The accepted points travel as one batch whose context holds the request headers (lower-case names,
repeated headers joined with ``", "``) except ``authorization``, ``proxy-authorization``, ``cookie`` and
any ``auth.*`` name (a client cannot forge one), plus ``auth.tenant`` when a bearer token matched.
A token equal to a static one (``tokens``, ``tokens_file``) takes that entry's tenant; any other is
verified as a JWT when ``jwt`` is set, its ``tenant_claim`` giving the tenant.

Routes
------
``routes`` and ``mappings`` serve more POST paths: events turned into metrics by a mapping (one event,
a list, or named arrays in an envelope), or metric objects with ``metadata`` (``format: metrics``, the
ready-made ``POST /metrics`` of in-house metric services); their answers add ``"status"``
(``success``, ``partial``, ``error``). The rules are in ``agent/json_events.py``.

Responses
---------
When the items were examined: ``200`` if at least one was accepted (or the list was empty), ``400`` if
none was, with ``{"accepted": n, "rejected": m, "errors": [{"index": i, "code": c, "reason": r}]}``.
When the request as a whole is refused: ``{"code": c, "error": message}`` with

- ``400`` ``invalid_json`` (not UTF-8, not JSON, nested too deeply, not an object or list),
  ``invalid_compression`` (corrupt or truncated gzip or zstd);
- ``401`` ``unauthorized`` with ``WWW-Authenticate: Bearer`` (missing or unknown token; a refused JWT
  says why: ``expired: the token expired at ...``, ``bad_signature: ...``, one of
  ``agent.jwt_auth.FAILURE_REASONS``, also as ``error_description`` in the header);
- ``408`` ``read_timeout`` (the body did not arrive within ``read_timeout``);
- ``413`` ``body_too_large`` (over ``max_request_body_size`` raw, by Content-Length or counted while
  streaming, or after decompression: a gzip or zstd bomb never inflates past the cap; the body
  reader is ``agent/bodies.py``, shared with the otlp receiver), ``too_many_items``,
  ``too_many_values`` (more than ``max_values`` JSON values, counted by their separators before the
  body is parsed);
- ``415`` ``unsupported_media_type`` (not application/json), ``unsupported_encoding`` (anything but
  gzip, zstd or identity, or more than one encoding);
- ``429`` ``backpressure`` with ``Retry-After`` (the pipeline refused the batch; retry it whole),
  ``tenant_quota`` with ``Retry-After`` and ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``,
  ``X-RateLimit-Reset`` (seconds, as Retry-After: agent/quota.py) when the request's tenant (its token's
  or the header the ``tenant`` processor reads) is over its ``points_per_second`` or
  ``requests_per_minute`` quota and none of the items fit; when some fit, those are taken and the
  rest refused item by item with code ``tenant_quota`` (a ``200`` with the ``X-RateLimit-*`` headers;
  an event route, whose events are summed per series, is refused whole),
  ``memory_budget`` with ``Retry-After`` (the request bytes in flight, this receiver's
  ``max_request_bytes_in_flight`` or the agent's total, are spent; taken by Content-Length before the
  body is read, and as it streams in and inflates);
- ``500`` ``pipeline_error`` (a bug downstream; logged).

Connections (agent/netguard.py): a client has ``header_timeout`` to send a request's headers (from
connecting, or from the first byte of a later request on a kept-alive connection), else the connection
is closed and counted as ``header_timeout``; idle kept-alive connections close after ``idle_timeout``.
At ``max_connections`` (or the agent's file-descriptor budget) the oldest connection not inside a
request is closed to make room, or the new one when all are busy: ``too_many_connections``.

Self-metrics: ``receiver_accepted_points_total``; ``receiver_refused_points_total{reason}`` with the item
codes, counted per item; the request codes above once per request (``too_many_items`` too: a list
refused whole is not counted item by item), except ``backpressure``, ``tenant_quota`` and
``pipeline_error``, which count the points refused; ``header_timeout`` and ``too_many_connections``
once per connection; ``receiver_requests_total{status}``; ``receiver_auth_failures_total{reason}``
(with auth on) for each refused token, by ``agent.jwt_auth.FAILURE_REASONS``. All counted once per request.

Workers: ``workers: N`` (default 1; ``auto``: the cgroup's CPU limit) serves the endpoint from N
processes sharing its port with ``SO_REUSEPORT`` (agent/workers.py). Each runs this receiver's own
code (auth, tokens file, JWT, body reader, limits, TLS, item and route parsing, refusals) and hands
its points to this process's pipeline, answering only once the pipeline took or refused them, so
every answer above (quota, partial takes, 429, 500) is the same. The kernel spreads connections, not
requests. ``max_request_bytes_in_flight`` is shared out between the workers; ``max_connections``
applies to each. A worker that dies is restarted (``receiver_worker_restarts_total``); its clients'
requests in flight fail, and points the pipeline took whose answer could not reach it are counted in
``receiver_worker_unanswered_points_total``.

Bearer tokens are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured
token (no early exit, no length leak); they come from the environment or ``tokens_file`` and are never
logged or echoed in errors. Bodies of 1 MiB or more are parsed in a worker thread, one at a time
process-wide (``netguard.parse_slots``), so a large request does not hold the event loop for its whole
parse.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web

from agent import bodies, exphist, netguard, quota
from agent.capture.recorder import CaptureHook
from agent.component import Backpressure, ComponentKind, Consumer, Factory, Settings, Signal
from agent.confmodel import Duration, Size, parse_host_port
from agent.json_events import (
    EventMapper,
    EventMappingConfig,
    EventRouteConfig,
    EventsParsed,
    RouteParser,
    route_problems,
    status_of,
)
from agent.json_items import ITEM_REASONS, ItemParser, Parsed, Refusal, decode_body, quote
from agent.jwt_auth import FAILURE_REASONS, JwtConfig, JwtRefused, JwtVerifier
from agent.limits import SeriesLimits
from agent.model import MetricBatch, Point
from agent.netcheck import bind_problem
from agent.tls import ServerTLSConfig
from agent.watched_file import WatchedFile
from agent.workers import Pooled, workers_problem

TYPE = "http"

REQUEST_REASONS = (
    "invalid_json",
    "invalid_compression",
    "unauthorized",
    "read_timeout",
    "body_too_large",
    "too_many_items",
    "too_many_values",
    "unsupported_media_type",
    "unsupported_encoding",
    "backpressure",
    "tenant_quota",
    "memory_budget",
    "pipeline_error",
    "header_timeout",
    "too_many_connections",
)
"""Codes of whole-request refusals (the item codes are ``items.ITEM_REASONS``)."""
_THREAD_BODY_BYTES = 2**20
"""Bodies at least this large are parsed in a worker thread (1 MiB takes 10-30 ms to parse and check)."""
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
"""RFC 6750 b64token: what may follow ``Bearer`` in an Authorization header."""


@dataclass(frozen=True)
class HttpTokenConfig:
    token: str = field(repr=False)
    """The bearer token: write ${env:VAR} (or use tokens_file), never the token itself."""
    tenant: str
    """Tenant name the token stands for (auth.tenant in the batch context)."""


@dataclass(frozen=True)
class HttpAuthConfig:
    tokens: list[HttpTokenConfig] = field(default_factory=list)
    """Accepted bearer tokens, each {token, tenant}; any token (or tokens_file) makes auth required."""
    tokens_file: str = ""
    """YAML or JSON file mapping token → tenant (a mounted Secret); re-read when it changes."""
    jwt: JwtConfig = field(default_factory=JwtConfig)
    """JWT bearer tokens (HS256, RS256, ES256), a claim naming the tenant; tried after the static tokens."""

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.tokens_file or self.jwt.enabled)

    def validate(self) -> list[tuple[str, str]]:
        # Paths and messages never quote a token: they end up in logs.
        problems = []
        seen: set[str] = set()
        for i, entry in enumerate(self.tokens):
            problem = _token_problem(entry.token, entry.tenant)
            if problem:
                problems.append((f"tokens::{i}::{problem[0]}", problem[1]))
            elif entry.token in seen:
                problems.append((f"tokens::{i}::token", "the same token is listed twice"))
            seen.add(entry.token)
        problems += [(f"jwt::{path}", message) for path, message in self.jwt.validate()]
        return problems


HttpTLSConfig = ServerTLSConfig
"""The receiver's TLS settings (shared with the other receivers: agent/tls.py)."""


@dataclass(frozen=True)
class HttpConfig:
    endpoint: str = "127.0.0.1:8080"
    """host:port serving POST /v1/metrics and GET /healthz."""
    max_items: int = 1000
    """Metric objects per request at most; a longer list is refused whole (413 too_many_items)."""
    max_values: int = 1_000_000
    """JSON values (numbers, strings, …) per request at most, counted before parsing: 413 too_many_values."""
    max_request_body_size: Size = Size(20 * 2**20)
    """Largest body, raw and after decompression (gzip and zstd bombs stop here): 413 body_too_large."""
    read_timeout: Duration = Duration(30.0)
    """Time allowed to receive a request body (slow senders get 408)."""
    header_timeout: Duration = Duration(10.0)
    """Time allowed to send a request's headers; slower connections are closed (header_timeout)."""
    idle_timeout: Duration = Duration(75.0)
    """Close a kept-alive connection that sends no new request for this long."""
    max_connections: int = 1024
    """Open connections at most; past it the oldest idle one (or the new one) is closed."""
    max_request_bytes_in_flight: Size = Size(64 * 2**20)
    """Request bytes (raw and inflated) held at once; beyond, 429 memory_budget (agent total 64MiB too)."""
    max_timestamp_age: Duration = Duration(86400.0)
    """How far in the past an item's timestamp may lie (timestamp_out_of_range beyond)."""
    max_timestamp_ahead: Duration = Duration(600.0)
    """How far ahead of the agent's clock an item's timestamp may lie."""
    max_buckets: int = 2048
    """Buckets per exponential histogram built from a histogram item's values: scale 6 over 32 octaves."""
    max_scale: int = 8
    """Finest scale of those histograms (8: 0.14 % wide buckets, Prometheus' finest native schema)."""
    auth: HttpAuthConfig = field(default_factory=HttpAuthConfig)
    """Bearer tokens, each naming a tenant (put in the batch context as auth.tenant)."""
    tls: HttpTLSConfig = field(default_factory=HttpTLSConfig)
    """Serve HTTPS (and optionally require client certificates)."""
    limits: SeriesLimits = field(default_factory=SeriesLimits)
    """Size limits on each item's series (name, label count, label name and value lengths, bytes)."""
    routes: list[EventRouteConfig] = field(default_factory=list)
    """More POST paths: events through a mapping, an envelope of arrays, or format metrics (+metadata)."""
    mappings: dict[str, EventMappingConfig] = field(default_factory=dict)
    """Event mappings by name (counters, gauges, histograms from event fields; labels allow-listed)."""
    workers: str = "1"
    """Processes sharing the port (SO_REUSEPORT), parsing for this one; auto: the cgroup's CPUs."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        try:
            port = parse_host_port(self.endpoint)[1]
        except ValueError as exc:
            problems.append(("endpoint", str(exc)))
            port = None
        problem = workers_problem(self.workers)
        if problem:
            problems.append(("workers", problem))
        elif self.workers != "1" and port == 0:
            problems.append(("workers", "more than one worker shares the endpoint's port: it cannot be 0"))
        if self.max_items < 1:
            problems.append(("max_items", "must be at least 1"))
        if self.max_values < self.max_items:
            problems.append(("max_values", "must be at least max_items"))
        problems += netguard.server_problems(self)
        for name in ("max_timestamp_age", "max_timestamp_ahead"):
            if getattr(self, name) <= 0:
                problems.append((name, "must be greater than 0"))
        if not 3 <= self.max_buckets <= 16384:
            problems.append(("max_buckets", "must be between 3 and 16384"))
        if not exphist.MIN_SCALE <= self.max_scale <= exphist.MAX_SCALE:
            problems.append(("max_scale", f"must be between {exphist.MIN_SCALE} and {exphist.MAX_SCALE}"))
        for section in ("auth", "tls", "limits"):
            for path, message in getattr(self, section).validate():
                problems.append((f"{section}::{path}" if path else section, message))
        problems += route_problems(self.routes, self.mappings, self.limits)
        return problems

    def environment_problems(self) -> list[tuple[str, str]]:
        problems = []
        problem = bind_problem("tcp", self.endpoint)
        if problem:
            problems.append(("endpoint", problem))
        problems += [(f"tls::{name}", message) for name, message in self.tls.file_problems()]
        if self.auth.tokens_file:
            try:
                load_tokens_file(self.auth.tokens_file)
            except (OSError, ValueError) as exc:
                problems.append(("auth::tokens_file", str(exc)))
        problems += [(f"auth::jwt::{name}", message) for name, message in self.auth.jwt.file_problems()]
        return problems


def _token_problem(token: Any, tenant: Any) -> tuple[str, str] | None:
    """("token" | "tenant", message) when the pair is unusable, never quoting the token."""
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        return (
            "token",
            "the token is empty or has characters a bearer token cannot carry (letters, digits, "
            "- . _ ~ + / and trailing = only); is its environment variable set?",
        )
    if not isinstance(tenant, str) or not tenant:
        return ("tenant", "a token needs a non-empty tenant name")
    return None


def event_mappers(config: HttpConfig) -> dict[str, EventMapper]:
    """The receiver's event mappers by mapping name, with its timestamp bounds, histogram shape and
    series limits."""
    return {
        name: EventMapper(
            mapping,
            max_timestamp_age_s=config.max_timestamp_age,
            max_timestamp_ahead_s=config.max_timestamp_ahead,
            max_buckets=config.max_buckets,
            max_scale=config.max_scale,
            limits=config.limits,
        )
        for name, mapping in config.mappings.items()
    }


def _hashed_tokens(path: str) -> list[tuple[bytes, str]]:
    """tokens_file's tokens as (SHA-256 digest, tenant): the tokens themselves are not kept."""
    return [(hashlib.sha256(t.encode()).digest(), tenant) for t, tenant in load_tokens_file(path).items()]


def load_tokens_file(path: str) -> dict[str, str]:
    """The token → tenant map in ``path``; raises OSError or ValueError (never quoting a token)."""
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError:
            raise ValueError(f"{path} is not valid YAML or JSON") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} must hold a non-empty mapping of token to tenant name")
    for token, tenant in data.items():
        problem = _token_problem(token, tenant)
        if problem:
            raise ValueError(f"{path}: {problem[1]}")
    return {str(k): str(v) for k, v in data.items()}


# -- the receiver -------------------------------------------------------------------------------------
class HttpReceiver(Pooled):
    reuse_port = False
    """Bind with SO_REUSEPORT (set in a worker process: agent/workers.py)."""

    def __init__(self, settings: Settings, config: HttpConfig, consumers: Mapping[Signal, Consumer]) -> None:
        self.settings = settings
        self.config = config
        self.tel = settings.telemetry
        self._log = settings.logger
        self._consumer = consumers[Signal.METRICS]
        self._capture: CaptureHook | None = None
        self._parser = ItemParser(
            max_timestamp_age_s=config.max_timestamp_age,
            max_timestamp_ahead_s=config.max_timestamp_ahead,
            max_buckets=config.max_buckets,
            max_scale=config.max_scale,
            limits=config.limits,
        )
        mappers = event_mappers(config)
        self._routes: dict[str, ItemParser | RouteParser] = {
            route.path: (
                ItemParser(
                    max_timestamp_age_s=config.max_timestamp_age,
                    max_timestamp_ahead_s=config.max_timestamp_ahead,
                    max_buckets=config.max_buckets,
                    max_scale=config.max_scale,
                    limits=config.limits,
                    metadata_labels=route.metadata_labels,
                )
                if route.format == "metrics"
                else RouteParser(route, mappers, config.max_items)
            )
            for route in config.routes
        }
        self._runner: web.AppRunner | None = None
        self._stopped = False
        self.port: int | None = None
        """The bound TCP port once started (useful with port 0)."""
        self._accepted = self.tel.accepted()
        # Every reason up front: the counters show at 0 before the first refusal, and counting is a
        # dict lookup.
        self._refused = {code: self.tel.refused(code) for code in ITEM_REASONS + REQUEST_REASONS}
        self._static_tokens = [
            (hashlib.sha256(t.token.encode()).digest(), t.tenant) for t in config.auth.tokens
        ]
        self._tokens_file = (
            WatchedFile(config.auth.tokens_file, _hashed_tokens, "bearer tokens", self._log)
            if config.auth.tokens_file
            else None
        )
        self._jwt = JwtVerifier(config.auth.jwt, self._log) if config.auth.jwt.enabled else None
        self._auth_failures = {
            reason: self.tel.counter(
                "receiver_auth_failures_total", "Bearer tokens refused, by reason.", reason=reason
            )
            for reason in (FAILURE_REASONS if config.auth.enabled else ())
        }
        self._bytes = netguard.ByteBudget(config.max_request_bytes_in_flight, netguard.request_bytes())
        self._make_pool(settings, __name__, config, consumers, port_attrs=("port",))
        self.tel.gauge(
            "receiver_request_bytes_in_flight",
            "Request bytes (raw and inflated) a receiver holds now.",
            lambda: self._bytes.in_use + self._pooled("receiver_request_bytes_in_flight"),
        )
        self._gate = netguard.ConnectionGate(config.max_connections, self._refused["too_many_connections"])
        self.tel.gauge(
            "receiver_connections",
            "Open connections.",
            lambda: len(self._gate) + self._pooled("receiver_connections"),
        )

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        if self.pool is not None:
            await self.pool.start()
            self.port = self.pool.ports["port"]
            self._log.info("%d workers listening on %s", len(self.pool.pids), cfg.endpoint)
            self.settings.ready()
            return
        if self._tokens_file is not None:
            self._tokens_file.load()
        if self._jwt is not None:
            self._jwt.load()
        ssl_ctx = cfg.tls.server_context()
        app = web.Application()
        app.router.add_post("/v1/metrics", self._handle_metrics)
        app.router.add_get("/healthz", self._handle_healthz)
        for path, route in self._routes.items():
            app.router.add_post(path, self._route_handler(route))
        # auto_decompress off: aiohttp would inflate without our cap; we stream-inflate ourselves.
        handler_kwargs: dict[str, Any] = {"access_log": None, "auto_decompress": False}
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0, **handler_kwargs)
        await runner.setup()
        self._runner = runner
        host, port = parse_host_port(cfg.endpoint)
        site = netguard.GuardedSite(
            runner,
            host,
            port,
            gate=self._gate,
            header_timeout_s=cfg.header_timeout,
            idle_timeout_s=cfg.idle_timeout,
            header_timeouts=self._refused["header_timeout"],
            ssl_context=ssl_ctx,
            handler_kwargs=handler_kwargs,
            reuse_port=self.reuse_port,
        )
        await site.start()
        self.port = site.port
        scheme = "https" if ssl_ctx else "http"
        self._log.info("listening on %s://%s:%s (POST /v1/metrics)", scheme, host, self.port)
        self.settings.ready()

    async def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.pool is not None:
            await self.pool.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- auth ----------------------------------------------------------------------------------------
    def _authenticate(self, request: web.Request) -> str | None:
        """The tenant of the request's bearer token; None when auth is off. Raises 401 otherwise."""
        if not self.config.auth.enabled:
            return None
        if self._tokens_file is not None:
            self._tokens_file.refresh()
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self._auth_failures["missing_token"].value += 1
            exc = Refusal(401, "unauthorized", "send Authorization: Bearer <token>")
            exc.headers["WWW-Authenticate"] = 'Bearer realm="headwater"'
            raise exc
        # Compare digests, all of them, in constant time: no early exit, no length leak.
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        tenant = None
        from_file = self._tokens_file.value if self._tokens_file is not None else None
        for known, name in self._static_tokens + (from_file or []):
            if hmac.compare_digest(known, digest) and tenant is None:
                tenant = name
        if tenant is None and self._jwt is not None:
            try:
                tenant = self._jwt.verify(token)
            except JwtRefused as refused:
                self._auth_failures[refused.reason].value += 1
                exc = Refusal(401, "unauthorized", str(refused))
                exc.headers["WWW-Authenticate"] = (
                    f'Bearer realm="headwater", error="invalid_token", error_description="{refused.reason}"'
                )
                raise exc from None
        if tenant is None:
            self._auth_failures["unknown_token"].value += 1
            exc = Refusal(401, "unauthorized", "the bearer token is not valid")
            exc.headers["WWW-Authenticate"] = 'Bearer realm="headwater", error="invalid_token"'
            raise exc
        return tenant

    # -- the body ------------------------------------------------------------------------------------
    @staticmethod
    def _check_media_type(request: web.Request) -> None:
        """Raises 415 unsupported_media_type unless the body is JSON in UTF-8."""
        ctype = request.headers.get("Content-Type", "")
        mime, _, params = ctype.partition(";")
        charset = ""
        for param in params.split(";"):
            key, _, val = param.partition("=")
            if key.strip().lower() == "charset":
                charset = val.strip().strip('"').lower()
        if mime.strip().lower() != "application/json" or charset not in ("", "utf-8", "utf8"):
            raise Refusal(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json (charset utf-8), got {quote(ctype)}",
            )

    async def _read_body(self, request: web.Request, lease: netguard.Lease) -> bytes:
        """The body, inflated, under the body cap, the read timeout and ``lease`` (agent/bodies.py)."""
        cfg = self.config
        try:
            return await bodies.read_body(
                request, lease, max_bytes=cfg.max_request_body_size, timeout_s=cfg.read_timeout
            )
        except bodies.BodyRefused as exc:
            refusal = Refusal(exc.status, exc.reason, exc.message)
            refusal.headers.update(exc.retry_after_header)
            raise refusal from None

    def _parse(self, body: bytes, now_ns: int, route: ItemParser | RouteParser | None = None) -> Parsed:
        if isinstance(route, RouteParser):
            return route.parse_body(body, now_ns, self.config.max_values)
        items = decode_body(body, self.config.max_items, self.config.max_values)
        return (route or self._parser).parse(items, now_ns)

    # -- handlers ------------------------------------------------------------------------------------
    def _context(self, request: web.Request, tenant: str | None) -> dict[str, str]:
        context: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            if key in _SECRET_HEADERS or key.startswith("auth."):
                continue
            context[key] = f"{context[key]}, {value}" if key in context else value
        if tenant is not None:
            context["auth.tenant"] = tenant
        return context

    def _respond(
        self,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        *,
        answer_status: str | None = None,
    ) -> web.Response:
        """``answer_status`` (a route's answer): put first in the body as ``"status"``."""
        if answer_status is not None:
            body = {"status": answer_status, **body}
        self.tel.counter(
            "receiver_requests_total", "HTTP requests answered, by status.", status=str(status)
        ).value += 1
        return web.json_response(body, status=status, headers=headers)

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        with self._bytes.lease() as lease:
            return await self._handle_metrics_held(request, lease)

    def _route_handler(
        self, route: ItemParser | RouteParser
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            with self._bytes.lease() as lease:
                return await self._handle_metrics_held(request, lease, route)

        return handle

    async def _handle_metrics_held(
        self, request: web.Request, lease: netguard.Lease, route: ItemParser | RouteParser | None = None
    ) -> web.Response:
        """POST /v1/metrics, or a ``route`` (whose answers carry ``status``)."""
        now_ns = time.time_ns()
        error = "error" if route is not None else None
        try:
            tenant = self._authenticate(request)
            self._check_media_type(request)
            body = await self._read_body(request, lease)
            capture = self.capture
            if capture is not None:
                capture("http", body, {"path": request.path, "content_type": request.content_type})
            if len(body) >= _THREAD_BODY_BYTES:
                async with netguard.parse_slots():
                    parsed = await asyncio.to_thread(self._parse, body, now_ns, route)
            else:
                parsed = self._parse(body, now_ns, route)
        except Refusal as exc:
            # Once per request, too_many_items included: the request is refused whole.
            self._refused[exc.code].value += 1
            return self._respond(
                exc.status, {"code": exc.code, "error": exc.message}, exc.headers, answer_status=error
            )
        for code, n in parsed.refused.items():
            self._refused[code].value += n
        points = parsed.points
        errors = parsed.errors
        headers: dict[str, str] = {}
        if points:
            context = self._context(request, tenant)
            try:
                refusal = await self._take(points, context)
                # A tenant's quota says how many points fit now: one point per item (not for event
                # routes, whose points are per series), so the first ones are taken, the rest refused.
                fits = (
                    refusal.fits
                    if isinstance(refusal, quota.QuotaExceeded) and not isinstance(parsed, EventsParsed)
                    else 0
                )
                if refusal is not None and 0 < fits < len(points):
                    taken = await self._take(points[:fits], context)
                    if taken is None:
                        assert isinstance(refusal, quota.QuotaExceeded)
                        errors, headers = self._quota_items(refusal, parsed, fits)
                        self._refused[quota.QUOTA_REASON].value += len(points) - fits
                        points = points[:fits]
                    refusal = taken or refusal
                if refusal is not None and not headers:
                    answer = quota.answer(refusal)
                    self._refused[answer.reason].value += len(points)
                    return self._respond(
                        answer.http_status,
                        {"code": answer.reason, "error": answer.message},
                        answer.headers,
                        answer_status=error,
                    )
            except Exception:
                self._log.exception("the pipeline failed on a batch of %d points", len(points))
                self._refused["pipeline_error"].value += len(points)
                return self._respond(
                    500,
                    {"code": "pipeline_error", "error": "the agent failed to take the batch"},
                    answer_status=error,
                )
            self._accepted.value += len(points)
        # An event route accepts events, which become fewer points (one per series).
        accepted = parsed.accepted if isinstance(parsed, EventsParsed) else len(points)
        status = 400 if errors and not accepted else 200
        return self._respond(
            status,
            {"accepted": accepted, "rejected": len(errors), "errors": errors},
            headers,
            answer_status=status_of(accepted, len(errors)) if route is not None else None,
        )

    async def _take(self, points: list[Point], context: dict[str, str]) -> Backpressure | None:
        """Hand ``points`` on as one batch; the refusal when downstream refused it (nothing taken)."""
        try:
            await self._consumer.consume(MetricBatch(tuple(points), context=context))
        except Backpressure as exc:
            return exc
        return None

    @staticmethod
    def _quota_items(
        refusal: quota.QuotaExceeded, parsed: Parsed, fits: int
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The answer's errors once the first ``fits`` accepted items were taken: the item errors and
        a ``tenant_quota`` error for each accepted item after them, in index order; and the
        X-RateLimit headers (what remains after the items taken)."""
        n_items = len(parsed.points) + len(parsed.errors)  # one point per accepted item
        bad = {e["index"] for e in parsed.errors}
        over = [i for i in range(n_items) if i not in bad][fits:]
        wait = quota.answer(refusal).retry_after_s
        reason = f"{refusal}: this item and the {len(over) - 1} other(s) after it; retry in {wait}s"
        errors = parsed.errors + [{"index": i, "code": quota.QUOTA_REASON, "reason": reason} for i in over]
        errors.sort(key=lambda e: int(e["index"]))
        headers = quota.rate_limit_headers(refusal)
        if refusal.remaining is not None:
            headers["X-RateLimit-Remaining"] = str(max(0, refusal.remaining - fits))
        return errors, headers

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def _create(settings: Settings, config: HttpConfig, consumers: Mapping[Signal, Consumer]) -> HttpReceiver:
    return HttpReceiver(settings, config, consumers)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.RECEIVER,
    config_class=HttpConfig,
    create=_create,
    signals=frozenset({Signal.METRICS}),
    description=(
        "JSON metrics over HTTP (POST /v1/metrics): per-item validation, gzip/zstd, bearer tokens, TLS, "
        "workers: N processes."
    ),
)
