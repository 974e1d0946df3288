"""What both OTLP transports share (:class:`_OtlpExporter`): metric encoding and passthrough of
traces and logs, resource attributes, tenant routing, the senders, hand-over on reload, and partial
success in responses. The transports (``grpc.py``, ``http.py``) add open, close and send."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import gzip
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cramjam
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from agent.component import Settings, Signal
from agent.model import Batch, LogBatch, MetricBatch, Point, SpanBatch, Temporality
from agent.partitioned import PartitionedSender
from agent.sending import Request, Sender
from agent.slicing import slices
from agent.tenancy import group_by_tenant, point_tenants
from agent.version import VERSION
from exporters.otlp import passthrough, resource
from exporters.otlp.config import AnyConfig
from exporters.otlp.metrics import EncoderOptions, MetricEncoder

MAX_RESPONSE_BYTES = 4 << 20
"""Responses bigger than this are not parsed (OTLP 1.11 size limits)."""
_THREAD_COMPRESS_BYTES = 128 << 10
"""Bodies at least this big are compressed in a thread (gzip-6 runs ~1-3 ms per 128 KiB here)."""
_PARTIAL_LOG_INTERVAL_S = 60.0


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
            keys_of=self._batch_tenants if config.tenant and config.tenant.header else None,
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

    def _message_tenants(
        self, messages: Iterable[Any], context: Mapping[str, str]
    ) -> Iterator[tuple[str | None, str]]:
        """Each resource message's (tenant, refusal) by its resource attribute, else the context's."""
        route = self._route
        assert route is not None
        context_tenant = context.get("tenant", "")
        attribute = route.resource_attribute
        for message in messages:
            tenant = ""
            if attribute:
                for kv in message.resource.attributes:
                    if kv.key == attribute:
                        tenant = kv.value.string_value
                        break
            yield route.resolve(tenant or context_tenant)

    def _group_messages(
        self, messages: tuple[Any, ...], context: Mapping[str, str]
    ) -> dict[str | None, list[Any]]:
        groups: dict[str | None, list[Any]] = {}
        refused: dict[str, int] = {}
        for message, (tenant, refusal) in zip(
            messages, self._message_tenants(messages, context), strict=True
        ):
            if refusal:
                refused[refusal] = refused.get(refusal, 0) + 1
            else:
                groups.setdefault(tenant, []).append(message)
        self._count_dropped(refused)
        return groups

    def _batch_tenants(self, batch: Batch) -> Iterator[str | None]:
        """The tenant of each point or resource message of ``batch``, lazily (the admission check)."""
        route = self._route
        assert route is not None
        if isinstance(batch, MetricBatch):
            context_tenant = batch.context.get("tenant", "")
            found = point_tenants(route, batch.points, context_tenant, route.resource_attribute)
        elif isinstance(batch, SpanBatch):
            found = self._message_tenants(batch.resource_spans, batch.context)
        else:
            found = self._message_tenants(batch.resource_logs, batch.context)
        return (tenant for tenant, _ in found)

    def _count_dropped(self, refused: dict[str, int]) -> None:
        for reason, n in refused.items():
            self._settings.telemetry.dropped(reason).value += n

    # -- consuming -----------------------------------------------------------------------------------
    async def consume(self, batch: Batch) -> None:
        touched: dict[int, Sender] = {}
        with self._partitions.admitting(batch):  # refused whole or taken whole
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
            groups, refused = await group_by_tenant(self._route, batch, self._route.resource_attribute)
            self._count_dropped(refused)
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
