"""Prometheus remote-write 1.0 exporter (Prometheus, Mimir, Cortex, Thanos, VictoriaMetrics).

Each batch updates per-series cumulative state (StatsD deltas become running totals), is encoded by
a hand encoder with per-series label bytes cached at series creation (``wire.py``; the generated
classes in ``remote_pb2.py`` check it in tests), compressed with snappy's block format, and offered
to the sending queue. One sender worker by default keeps per-series sample order across requests;
every series' timestamps strictly increase. A series idle for ``series_expiration`` gets a stale
marker and is forgotten. 5xx and 429 are retried with jittered backoff honouring Retry-After; other
4xx are dropped and counted, their body logged as is. A batch refused because a queue is full
(``full_policy: block``) changed no series: each queue is asked before the series of its requests
change, so a client resending it counts its increments once.

Distributions go as classic ``_bucket``/``_sum``/``_count`` series, or as native histograms with
``send_native_histograms``. Explicit-bucket histograms (OTLP) always go classic, with their own bounds
as ``le``, even with ``send_native_histograms``: their buckets cannot be converted to exponential ones
exactly. Summaries (OTLP) go as one series per quantile (``quantile`` label) plus ``_sum`` and
``_count``; remote-write 1.0 carries no metadata, so the type is only implied by those names. When a
series' shape changes (new bounds or quantiles, or an exponential histogram becoming an explicit one),
the sub-series that no longer exist get a stale marker at once, so queries do not mix the old buckets
with the new ones during Prometheus' 5-minute lookback; on expiry every sub-series gets one.

With ``sending_queue: {storage: disk}`` the requests wait on disk while Prometheus is away (see
``agent/sending.py``), drained oldest first so per-series order holds. The cumulative state is kept
beside the queue (a snapshot and a journal, ``state.py``), written before each batch's requests and
fsynced with them, so a restart — kill -9 included — neither resets counters nor makes one go down.
(With ``fsync: interval`` or ``never`` that holds for a crash of the agent, not for power loss.)
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import os
import re
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import cast

import aiohttp

from agent.bucket_layouts import BucketLayout
from agent.client_config import ClientConfig, url_problem
from agent.component import (
    Backpressure,
    ComponentKind,
    Factory,
    PermanentError,
    RetryableError,
    Settings,
    Signal,
    Tasks,
)
from agent.confmodel import Duration
from agent.diskqueue import partition_name
from agent.exphist import whole, whole_count
from agent.model import Batch, MetricBatch, Point
from agent.partitioned import PartitionedSender
from agent.sending import Request, Sender, retry_after_s
from agent.slicing import slices
from agent.tenancy import TenantRoutingConfig, group_by_tenant, point_tenants, tenant_problem
from agent.tls import ClientTLSConfig
from agent.version import USER_AGENT
from exporters.prometheus_remote_write import wire
from exporters.prometheus_remote_write.state import SeriesState
from exporters.prometheus_series import (
    DEFAULT_BUCKETS,
    HISTOGRAM,
    SUMMARY,
    Series,
    SeriesStore,
    expiry_interval_s,
    format_value,
    next_timestamp_ms,
    store_problems,
)

TYPE = "prometheus_remote_write"

_Classic = tuple[tuple[float, ...] | None, list[bytes], bytes, bytes]
"""Cached label bytes of a classic histogram or summary: the shape they were built for (``Series.bounds``,
None for the configured buckets), one entry per bucket or quantile, then ``_sum`` and ``_count``."""

RESERVED_HEADERS = frozenset(
    {"content-encoding", "content-type", "x-prometheus-remote-write-version", "user-agent"}
)


@dataclass(frozen=True)
class BasicAuthConfig:
    username: str = ""
    """User name for HTTP basic auth."""
    password: str = ""
    """Password; put it in the environment (${env:VAR}) or use password_file, never in the file itself."""
    password_file: str = ""
    """File holding the password (read at start)."""


@dataclass(frozen=True)
class AuthConfig:
    basic: BasicAuthConfig | None = None
    """HTTP basic auth."""
    bearer_token: str = ""
    """Bearer token; from the environment (${env:VAR})."""
    bearer_token_file: str = ""
    """File holding a bearer token, re-read when it changes (Kubernetes service account tokens rotate)."""

    def validate(self) -> list[tuple[str, str]]:
        given = [bool(self.basic), bool(self.bearer_token), bool(self.bearer_token_file)]
        return [("", "set only one of basic, bearer_token, bearer_token_file")] if sum(given) > 1 else []


_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


@dataclass(frozen=True)
class RemoteWriteTenantRoutingConfig(TenantRoutingConfig):
    header: str = "X-Scope-OrgID"
    """Request header naming each request's tenant: X-Scope-OrgID (Mimir, Cortex), THANOS-TENANT (Thanos
    receive); empty = no header (url_template alone, or per-tenant queues only)."""
    url_template: str = ""
    """URL with {tenant} (URL-encoded) for each tenant's requests, e.g.
    http://vminsert:8480/insert/{tenant}/prometheus/api/v1/write; empty = endpoint for every tenant."""
    drop_label: bool = False
    """Do not send the tenant label (the header or URL already says whose the series are). Series carry
    it otherwise (added when missing): it keeps tenants' series apart."""

    def header_problem(self) -> str | None:
        if self.header.lower() in RESERVED_HEADERS:
            return "this header is set by the remote-write protocol itself"
        return None

    def validate(self) -> list[tuple[str, str]]:
        problems = super().validate()
        if self.url_template:
            if "{tenant}" not in self.url_template:
                problems.append(("url_template", "must contain {tenant}"))
            if not self.url_template.startswith(("http://", "https://")):
                problems.append(("url_template", "is not an http:// or https:// URL"))
        if not _LABEL_NAME.fullmatch(self.label) or self.label.startswith("__"):
            problems.append(("label", f"{self.label!r} is not a valid Prometheus label name"))
        return problems


@dataclass(frozen=True)
class _RemoteWriteFields:
    endpoint: str = "http://127.0.0.1:9090/api/v1/write"
    """URL to POST to, exactly as given (Prometheus: /api/v1/write; Mimir: /api/v1/push)."""
    timeout: Duration = Duration(10.0)
    """Time limit of one request."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra request headers (e.g. X-Scope-OrgID); may not override the four remote-write headers."""
    external_labels: dict[str, str] = field(default_factory=dict)
    """Labels added to every series (a series' own label of the same name wins)."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """Basic or bearer authentication."""
    tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)
    """TLS settings for https endpoints (insecure is not used: the URL scheme decides)."""
    send_native_histograms: bool = False
    """Send distributions as native histograms (Prometheus needs --enable-feature=native-histograms);
    explicit-bucket histograms from OTLP still go as classic series (they cannot be converted exactly)."""
    histogram_buckets: list[float] = field(default_factory=lambda: list(DEFAULT_BUCKETS))
    """Upper bounds of classic histogram buckets, when not sending native histograms."""
    bucket_layouts: list[BucketLayout] = field(default_factory=list)
    """Bounds per metric: [{match: glob on the Prometheus name, bounds: [...]}]; first match wins."""
    max_samples_per_request: int = 2000
    """Samples per request at most (a classic histogram counts one sample per bucket)."""
    series_expiration: Duration = Duration(300.0)
    """A series not updated for this long gets a stale marker and is forgotten."""
    max_series: int = 200_000
    """Live series at most (~750 B each); points of new series beyond it are dropped (series_limit)."""


# The client block last: see agent.client_config.
@dataclass(frozen=True)
class PrometheusRemoteWriteConfig(ClientConfig, _RemoteWriteFields):
    reserved_headers = RESERVED_HEADERS
    reserved_headers_reason = "this header is set by the remote-write protocol itself"

    tenant: RemoteWriteTenantRoutingConfig | None = None
    """Per-tenant routing: each tenant gets its own requests (tenant header and/or URL) and its own
    queue (memory, or its own disk partition), so a failing tenant never delays another. Unset = off."""

    def validate(self) -> list[tuple[str, str]]:
        problems = self.client_problems() + url_problem("endpoint", self.endpoint)
        if self.max_samples_per_request < 1:
            problems.append(("max_samples_per_request", "must be at least 1"))
        problems += store_problems(
            self.histogram_buckets,
            self.bucket_layouts,
            ("series_expiration", self.series_expiration),
            self.max_series,
        )
        problems += [(f"auth::{path}" if path else "auth", msg) for path, msg in self.auth.validate()]
        problems += [(f"tls::{path}", msg) for path, msg in self.tls.http_problems(TYPE)]
        return problems


class PrometheusRemoteWriteExporter:
    def __init__(self, settings: Settings, config: PrometheusRemoteWriteConfig) -> None:
        self._settings = settings
        self._config = config
        self._log = settings.logger
        self._store = SeriesStore(
            config.histogram_buckets,
            layouts=config.bucket_layouts,
            keep_native=config.send_native_histograms,
            max_series=config.max_series,
        )
        self._les: dict[tuple[float, ...], list[str]] = {}
        """``le`` texts per family bounds (a few shared tuples: the default and one per layout)."""
        self._external = tuple(sorted(config.external_labels.items()))
        self._route = config.tenant
        self._drop_label = config.tenant.label if config.tenant and config.tenant.drop_label else None
        self._partitions = PartitionedSender(
            settings,
            self._post,
            config.sending_queue,
            config.retry_on_failure,
            config.timeout,
            max_partitions=config.tenant.max_tenants if config.tenant else 0,
            keys_of=self._batch_tenants if config.tenant else None,
        )
        """The default sender and, with routing, one per tenant (on its first batch, or at start for a
        tenant with a backlog on disk), kept until shutdown."""
        self._sender = self._partitions.default
        self._applying = asyncio.Lock()
        """Held while a batch (or expiry) changes series state and queues requests, in slices."""
        self._session: aiohttp.ClientSession | None = None
        self._tasks = Tasks(str(settings.id), settings.logger)
        self._headers = {
            **config.headers,
            "Content-Encoding": "snappy",
            "Content-Type": "application/x-protobuf",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
            "User-Agent": USER_AGENT,
        }
        self._token_file_state: tuple[float, str] = (0.0, "")
        self._state: SeriesState | None = None
        self._stale = settings.telemetry.counter(
            "exporter_stale_markers_total", "Stale markers sent for series that expired."
        )
        settings.telemetry.gauge(
            "exporter_series", "Live series held by the exporter.", lambda: self._store.size
        )

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self._config
        ssl_ctx: ssl.SSLContext | bool = True
        if cfg.endpoint.startswith("https://"):
            ssl_ctx = cfg.tls.ssl_context()
        if cfg.auth.basic is not None:
            password = cfg.auth.basic.password
            if cfg.auth.basic.password_file:
                with open(cfg.auth.basic.password_file, encoding="utf-8") as f:
                    password = f.read().strip()
            userpass = f"{cfg.auth.basic.username}:{password}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(userpass).decode("ascii")
        if cfg.auth.bearer_token:
            self._headers["Authorization"] = f"Bearer {cfg.auth.bearer_token}"
        self._session = aiohttp.ClientSession(
            # No pool cap: each (tenant) sender bounds its own requests in flight, and a shared cap
            # would let one tenant's hanging request hold the connection another tenant needs.
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=0),
        )
        try:
            await self._partitions.start()  # takes the queue directory's lock, or fails
        except BaseException:
            await self._session.close()
            self._session = None
            raise
        await self._load_state()  # only once the lock is ours: the state file belongs to the queue
        if self._route is not None:
            await self._partitions.open_backlogs()
        self._tasks.spawn(self._expire_loop(), "expire")

    async def shutdown(self) -> None:
        self._partitions.stop_opening()
        await self._tasks.close()
        await self._partitions.shutdown(self._settings.shutdown_timeout_s)
        await self._close_state()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def hand_over(self) -> dict[str | None, list[Request]]:
        """A reload replaces this exporter (its config changed): stop without draining and return the
        queued requests by tenant (None: the default queue) for :meth:`adopt` of the successor. A disk
        queue keeps its records, and the cumulative state its snapshot, in the directory the successor
        reopens once this returns (the lock is released)."""
        self._partitions.stop_opening()
        await self._tasks.close()
        queued = await self._partitions.hand_over()
        await self._close_state()
        if self._session is not None:
            await self._session.close()
            self._session = None
        return queued

    async def adopt(self, queued: dict[str | None, list[Request]]) -> None:
        """Queue a predecessor's requests (:meth:`hand_over`) ahead of new data, each tenant's in that
        tenant's queue. Requests of a tenant this exporter cannot route (routing now off, or over
        max_tenants) are dropped and counted (tenant_routing_changed): sent to the default endpoint
        they would land in the wrong tenant."""
        await self._partitions.adopt(queued, partitioned=self._route is not None)

    def _make_state(self) -> SeriesState | None:
        q = self._config.sending_queue
        if q.storage != "disk":
            return None
        base = os.path.join(q.directory, partition_name(str(self._settings.id)))
        return SeriesState(base, durable=q.fsync != "never")

    async def _load_state(self) -> None:
        state = self._make_state()
        if state is None:
            return
        restored = await asyncio.to_thread(state.load, self._store)
        self._state = state
        # Journal fsync before queue fsync, for every sync of the queue (the background syncer's too).
        self._partitions.sync_first(state.sync)
        if restored:
            self._settings.logger.info("restored the cumulative state of %d series", restored)
        await state.maybe_compact(self._store, force=True)

    async def _close_state(self) -> None:
        state, self._state = self._state, None
        if state is None:
            return
        try:
            await state.maybe_compact(self._store, force=True)
        except OSError as exc:
            self._settings.logger.warning("could not save the cumulative state: %s", exc)
        await asyncio.to_thread(state.close)

    # -- encoding ------------------------------------------------------------------------------------
    def _label_bytes(self, series: Series, name: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        labels = dict(self._external)
        labels.update(series.labels)
        labels.update(extra)
        if self._drop_label is not None:
            labels.pop(self._drop_label, None)
        labels["__name__"] = name
        return wire.encode_labels(sorted(labels.items()))

    def _classic_cache(self, series: Series) -> _Classic:
        """Label bytes of every sub-series of a classic histogram or a summary, for its current shape."""
        name, shape = series.name, series.bounds
        if series.kind == SUMMARY:
            assert shape is not None
            per_value = [self._label_bytes(series, name, (("quantile", format_value(q)),)) for q in shape]
        else:
            if shape is None:
                layout = self._store.bounds_of(name)
                les = self._les.get(layout) or self._les.setdefault(
                    layout, [*(format_value(b) for b in layout), "+Inf"]
                )
            else:
                les = [*(format_value(b) for b in shape), "+Inf"]
            per_value = [self._label_bytes(series, name + "_bucket", (("le", le),)) for le in les]
        return (
            shape,
            per_value,
            self._label_bytes(series, name + "_sum"),
            self._label_bytes(series, name + "_count"),
        )

    def _encode(self, series: Series, ts_ms: int, stale: bool = False) -> tuple[list[bytes], int]:
        """Encoded TimeSeries entries for one series' current state, and their sample count."""
        if series.kind != HISTOGRAM and series.bounds is None:  # counters and gauges (summaries have bounds)
            if series.cache is None:
                series.cache = self._label_bytes(series, series.name)
            value = wire.STALE_NAN if stale else series.value
            return [wire.encode_series(series.cache, [(value, ts_ms)])], 1  # type: ignore[arg-type]
        if self._config.send_native_histograms and series.bounds is None and series.kind == HISTOGRAM:
            out: list[bytes] = []
            if type(series.cache) is not bytes:  # new, or was an explicit histogram (classic series)
                out += self._retire(series.cache, (), ts_ms)
                series.cache = self._label_bytes(series, series.name)
            native = series.cache
            if stale:
                out.append(wire.encode_series(native, [(wire.STALE_NAN, ts_ms)]))
            else:
                assert series.native is not None
                out.append(wire.encode_histogram_series(native, series.native, ts_ms))
            return out, len(out)
        return self._encode_classic(series, ts_ms, stale)

    def _encode_classic(self, series: Series, ts_ms: int, stale: bool) -> tuple[list[bytes], int]:
        """A classic histogram (``_bucket`` per bound, ``_sum``, ``_count``) or a summary (one series
        per quantile, ``_sum``, ``_count``), with stale markers for sub-series a shape change removed."""
        out: list[bytes] = []
        cache = series.cache
        if type(cache) is not tuple or cache[0] is not series.bounds:
            fresh = self._classic_cache(series)
            out += self._retire(cache, (*fresh[1], fresh[2], fresh[3]), ts_ms)
            cache = series.cache = fresh
        _, per_value, sum_labels, count_labels = cast(_Classic, cache)
        values = series.bucket_counts
        assert values is not None
        if stale:
            out += [
                wire.encode_series(labels, [(wire.STALE_NAN, ts_ms)])
                for labels in (*per_value, sum_labels, count_labels)
            ]
            return out, len(out)
        if series.kind == HISTOGRAM:  # buckets, +Inf, _sum, _count
            # Whole counts (exphist.whole): integers, non-decreasing, +Inf == _count.
            count = whole_count(series.count)
            samples = [*whole(values).tolist(), count, series.sum, count]
        else:  # quantiles, _sum, _count
            samples = [*values.tolist(), series.sum, series.count]
        out += wire.encode_each([*per_value, sum_labels, count_labels], samples, ts_ms)
        return out, len(out)

    @staticmethod
    def _retire(old: object, kept: tuple[bytes, ...], ts_ms: int) -> list[bytes]:
        """Stale markers for the sub-series of a previous shape (``old`` cache) that ``kept`` lacks."""
        if old is None:
            return []
        if type(old) is bytes:
            gone: list[bytes] = [old]
        else:
            _, per_value, sum_labels, count_labels = cast(_Classic, old)
            gone = [*per_value, sum_labels, count_labels]
        keep = set(kept)
        return [
            wire.encode_series(labels, [(wire.STALE_NAN, ts_ms)]) for labels in gone if labels not in keep
        ]

    # -- tenants -------------------------------------------------------------------------------------
    def _batch_tenants(self, batch: Batch) -> Iterator[str | None]:
        """The tenant of each point of ``batch``, lazily (the admission check)."""
        route = self._route
        assert route is not None and isinstance(batch, MetricBatch)
        context_tenant = batch.context.get("tenant", "")
        return (tenant for tenant, _ in point_tenants(route, batch.points, context_tenant))

    async def _route_points(
        self, batch: MetricBatch
    ) -> tuple[list[Point], list[str | None], dict[str | None, Sender]]:
        """The batch's points (grouped by tenant, each with the tenant label) with each one's tenant,
        and the tenants' senders, resolved before any series state changes, so that the encoding loop
        never waits for a sender to open. In slices: a point costs ~1 µs here."""
        route = self._route
        assert route is not None
        groups, refused = await group_by_tenant(route, batch)
        label = route.label
        points: list[Point] = []
        tenants: list[str | None] = []
        senders: dict[str | None, Sender] = {None: self._sender}
        for tenant, group in groups.items():
            if tenant is not None:
                sender = await self._partitions.get(tenant)
                if sender is None:
                    reason = "tenant_limit" if not self._partitions.closing else "shutdown"
                    refused[reason] = refused.get(reason, 0) + len(group)
                    continue
                senders[tenant] = sender
                async for chunk in slices(group):
                    for point in chunk:
                        if not any(k == label for k, _ in point.labels):
                            # The label is the series' identity in the cumulative state: without it
                            # two tenants' same-named series would be added together.
                            labels = list(point.labels)
                            bisect.insort(labels, (label, tenant))
                            point = replace(point, labels=tuple(labels))
                        points.append(point)
            else:
                points += group
            tenants += [tenant] * len(group)
        for reason, n in refused.items():
            self._settings.telemetry.dropped(reason).value += n
        return points, tenants, senders

    # -- consuming -----------------------------------------------------------------------------------
    async def consume(self, batch: MetricBatch) -> None:
        """Take ``batch``: cumulative state, journal frames and requests, in slices that yield to the
        loop (``agent.slicing``: a 1M-point batch is seconds of work). Batches, and expiry's stale
        markers, are applied one at a time and whole under ``_applying``, so every series' samples are
        queued in order; the batch's commit (fsync) runs after the lock is released, so the next batch
        is encoded while this one's fsync runs, as it was before slicing."""
        # Not asked by a fan-out: the queues (the tenants' too) are asked once the lock is ours,
        # before any series changes — a refused batch must leave the counters as they were, or the
        # client's resend would count it twice — and the batch is then taken whole.
        async with self._applying:
            with self._partitions.admitting(batch):
                touched, blocked = await self._apply(batch)
        state = self._state
        if state is not None:
            if self._config.sending_queue.fsync == "batch":
                await asyncio.to_thread(state.sync)  # the state is durable before the requests are
            for sender in touched:
                await sender.commit()
            await state.maybe_compact(self._store)
        else:
            for sender in touched:
                await sender.commit()
        if blocked:
            # A tenant's disk queue refused its part (full_policy: block) — after the other tenants'
            # requests were queued, so that one tenant's outage never stops the others.
            raise blocked[0]

    async def _apply(self, batch: MetricBatch) -> tuple[list[Sender], list[Backpressure]]:
        """Update the series, record them in the journal and offer the batch's requests: (the senders
        offered to, the refusals of tenants' full queues).

        The batch was admitted (:meth:`consume`): every queue of a tenant it names had room, and a
        memory queue takes it whole. A disk queue is asked again before the first point of each
        request (``Sender.refusal``: the request may be larger than any before): the points of a
        request it refuses then change no series — a tenant's are left out of this batch, the default
        queue's refuse it — so the client's resend counts them once. What no check foresees (a full
        disk) can still be refused at the offer, after that request's series changed."""
        if self._route is None:
            points: list[Point] | tuple[Point, ...] = batch.points
            tenants: list[str | None] | None = None
            senders: dict[str | None, Sender] = {None: self._sender}
        else:
            points, tenants, senders = await self._route_points(batch)
        limit = self._config.max_samples_per_request
        update = self._store.update
        encode = self._encode
        recording = self._state is not None
        changed: dict[str, tuple[str, list[Series]]] = {}
        # Per tenant: entries, samples and points of the request being built.
        pending: dict[str | None, tuple[list[bytes], list[int]]] = {}
        blocked: list[Backpressure] = []
        refusing: set[str | None] = set()
        """Tenants whose sender refused a request of this batch: their later points are left out."""
        disk = self._config.sending_queue.storage == "disk"
        async for span in slices(range(len(points))):
            for i in span:
                point = points[i]
                tenant = tenants[i] if tenants is not None else None
                acc = pending.get(tenant)
                if acc is None or not acc[0]:
                    # The first point of a request: ask its sender before any series changes.
                    if tenant in refusing:
                        continue
                    if disk:
                        refused = senders[tenant].refusal(batch)
                        if refused is not None:
                            if self._route is None:
                                raise refused  # one queue: backpressure stops the batch
                            blocked.append(refused)
                            refusing.add(tenant)
                            continue
                series = update(point)
                if series is None:
                    continue
                encoded, n = encode(series, next_timestamp_ms(series, point.time_unix_nano))
                if acc is None:
                    acc = pending[tenant] = ([], [0, 0])
                entries, counts = acc
                entries += encoded
                counts[0] += n
                counts[1] += 1
                if recording:
                    family = changed.get(series.name)  # not setdefault: it would build a tuple per point
                    if family is None:
                        family = changed[series.name] = (series.kind, [])
                    family[1].append(series)
                if counts[0] >= limit:
                    self._offer_to(senders[tenant], entries, counts[1], changed, blocked)
                    pending[tenant] = ([], [0, 0])
        for tenant, (entries, counts) in pending.items():
            if entries:
                self._offer_to(senders[tenant], entries, counts[1], changed, blocked)
        self._count_refused()
        return [senders[t] for t in pending], blocked

    def _offer_to(
        self,
        sender: Sender,
        entries: list[bytes],
        points: int,
        changed: dict[str, tuple[str, list[Series]]],
        blocked: list[Backpressure],
    ) -> None:
        if self._route is None:
            self._offer(entries, points, changed, sender)  # one queue: backpressure stops the batch
            return
        try:
            self._offer(entries, points, changed, sender)
        except Backpressure as exc:
            blocked.append(exc)

    def _offer(
        self,
        entries: list[bytes],
        points: int,
        changed: dict[str, tuple[str, list[Series]]],
        sender: Sender | None = None,
    ) -> None:
        if self._state is not None and changed:
            self._state.record(changed)  # before the request: the state is never older than the queue
            changed.clear()
        body = wire.compress(wire.encode_write_request(entries))
        (sender or self._sender).offer(Request(body, points))

    def _count_refused(self) -> None:
        for reason, n in self._store.new_refusals().items():
            self._settings.telemetry.dropped(reason).value += n

    async def _expire_loop(self) -> None:
        ttl = self._config.series_expiration
        while True:
            await asyncio.sleep(expiry_interval_s(ttl))
            async with self._applying:  # between batches: a stale marker never lands inside one
                touched = await self._expire(ttl)
            for sender in touched:
                try:
                    await sender.commit()
                except OSError as exc:
                    # The markers stay queued (the syncer retries the sync); a failed fsync must not
                    # end expiry for good, or idle series would pile up in memory.
                    self._log.warning("could not sync stale markers to the disk queue: %s", exc)

    async def _expire(self, ttl: float) -> list[Sender]:
        """Forget the series idle for ``ttl`` and offer their stale markers (both in slices); returns
        the senders offered to."""
        gone = await self._store.expire_sliced(ttl)  # in slices: never stalls the loop
        if not gone:
            return []
        now_ns = time.time_ns()
        limit = self._config.max_samples_per_request
        by_sender: dict[int, tuple[Sender, list[bytes]]] = {}
        async for chunk in slices(gone):
            for series in chunk:
                sender = await self._series_sender(series)
                if sender is None:
                    continue  # a tenant over max_tenants never had series here; nothing to mark
                encoded, _ = self._encode(series, next_timestamp_ms(series, now_ns), stale=True)
                _, entries = by_sender.setdefault(id(sender), (sender, []))
                entries += encoded
                if len(entries) >= limit:
                    self._offer_stale(entries, sender)
                    entries.clear()
        for sender, entries in by_sender.values():
            if entries:
                self._offer_stale(entries, sender)
        self._stale.value += len(gone)
        return [sender for sender, _ in by_sender.values()]

    async def _series_sender(self, series: Series) -> Sender | None:
        """The sender a series' samples went to (its tenant's, by the tenant label it carries)."""
        if self._route is None:
            return self._sender
        label = self._route.label
        tenant = next((v for k, v in series.labels if k == label), "")
        if not tenant or tenant_problem(tenant) is not None:
            return self._sender
        return await self._partitions.get(tenant)

    def _offer_stale(self, entries: list[bytes], sender: Sender | None = None) -> None:
        try:
            self._offer(entries, 0, {}, sender)
        except Backpressure:
            # A full queue under `block`: stale markers only speed up what Prometheus' 5-minute
            # lookback does anyway, so they are dropped (and counted) rather than retried.
            self._settings.telemetry.dropped("queue_full_stale_markers").value += len(entries)

    # -- sending -------------------------------------------------------------------------------------
    def _request_headers(self) -> dict[str, str]:
        path = self._config.auth.bearer_token_file
        if not path:
            return self._headers
        import os

        mtime = os.stat(path).st_mtime
        if mtime != self._token_file_state[0]:
            with open(path, encoding="utf-8") as f:
                self._token_file_state = (mtime, f.read().strip())
        return {**self._headers, "Authorization": f"Bearer {self._token_file_state[1]}"}

    async def _post(self, request: Request, tenant: str | None = None) -> None:
        assert self._session is not None
        url = self._config.endpoint
        headers = self._request_headers()
        route = self._route
        if tenant is not None and route is not None:
            if route.url_template:
                url = route.url_template.replace("{tenant}", urllib.parse.quote(tenant, safe=""))
            if route.header:
                headers = {**headers, route.header: tenant}
        async with self._session.post(url, data=request.payload, headers=headers) as resp:
            if 200 <= resp.status < 300:
                return
            # Only what the error message shows is read: a backend's error body is not ours to buffer.
            body = (await resp.content.read(512)).decode("utf-8", errors="replace")
            if resp.status == 429 or resp.status >= 500:
                raise RetryableError(
                    f"HTTP {resp.status}: {body}",
                    reason=f"http_{resp.status}",
                    retry_after_s=retry_after_s(resp.headers.get("Retry-After")),
                )
            raise PermanentError(f"HTTP {resp.status} from {url}: {body}")


def _create(settings: Settings, config: PrometheusRemoteWriteConfig) -> PrometheusRemoteWriteExporter:
    return PrometheusRemoteWriteExporter(settings, config)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.EXPORTER,
    config_class=PrometheusRemoteWriteConfig,
    create=_create,
    signals=frozenset({Signal.METRICS}),
    description="Pushes metrics with the Prometheus remote-write 1.0 protocol (snappy protobuf over HTTP).",
)
