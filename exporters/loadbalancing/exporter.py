"""The ``loadbalancing`` exporter: one OTLP exporter (``exporters/otlp``, unchanged) per gateway, each with
its own sending queue, and a hash ring (``agent/hashring.py``) deciding which one takes each item.

A membership change (a new static list on reload, a new DNS answer) builds a new ring under the routing
lock, so no batch is split by one ring and offered by another. A gateway that left stops sending over
the network: its queued requests (memory, or its disk partition) are drained through :meth:`_reroute`,
which decodes each one and routes its items again by the new ring, then the gateway's exporter shuts
down. A rerouted request counts as rerouted, not as sent by the gateway that left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gzip
import logging
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import cramjam
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from agent.component import Backpressure, ComponentId, Settings, Signal, Tasks, admitted
from agent.diskqueue.queue import partition_dirs, partition_name
from agent.hashring import HashRing
from agent.model import Batch, LogBatch, MetricBatch, SpanBatch
from agent.partitioned import PartitionedSender
from agent.sending import STOP_GRACE_S, Request
from agent.telemetry import Cell, ComponentTelemetry
from exporters.loadbalancing.config import LOG_KEYS, METRIC_KEYS, SPAN_KEYS, LoadBalancingConfig
from exporters.loadbalancing.k8s import K8sResolver
from exporters.loadbalancing.resolver import Lookup, resolve_dns, system_lookup
from exporters.loadbalancing.routing import Router
from exporters.otlp import resource
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig
from exporters.otlp.grpc import OtlpGrpcExporter
from exporters.otlp.http import OtlpHttpExporter
from receivers.otlp.convert import MetricsConverter, ShadowMetricsRequest

Reroute = Callable[[Request], Awaitable[None]]

_THREAD_DECODE_BYTES = 128 << 10
"""Queued requests at least this big are decoded in a thread when rerouted."""


class _Rerouting:
    """What a gateway's exporter adds: once :meth:`reroute_to` is called (the gateway left), every request
    its queue hands out goes there instead of over the network."""

    reroute: Reroute | None = None
    _partitions: PartitionedSender

    def reroute_to(self, reroute: Reroute) -> None:
        """Send every request from now on through ``reroute``, including one whose attempt to the gateway
        is in flight or waiting to be retried (:meth:`~agent.sending.Sender.redirect`): it is rerouted at
        once, not kept on disk until the next membership change or dropped with the gateway's sender."""
        self.reroute = reroute
        self._partitions.redirect()

    def refusal_of(self, part: Batch) -> Backpressure | None:
        """What this gateway's queues would refuse ``part`` with, taking nothing (None: it takes it)."""
        return self._partitions.refusal_whole(part)


class _GrpcGateway(_Rerouting, OtlpGrpcExporter):
    async def _send(self, request: Request, tenant: str | None = None) -> None:
        if self.reroute is not None:
            await self.reroute(request)
        else:
            await super()._send(request, tenant)


class _HttpGateway(_Rerouting, OtlpHttpExporter):
    async def _send(self, request: Request, tenant: str | None = None) -> None:
        if self.reroute is not None:
            await self.reroute(request)
        else:
            await super()._send(request, tenant)


_Gateway = _GrpcGateway | _HttpGateway


def gateway_id(parent: ComponentId, gateway: str) -> ComponentId:
    """The id a gateway's exporter reports its metrics under and names its disk partition by:
    ``<exporter id>@<host:port>`` (``loadbalancing@10.0.0.5:4317``, ``loadbalancing/east@10.0.0.5:4317``)."""
    if parent.name:
        return ComponentId(parent.type, f"{parent.name}@{gateway}")
    return ComponentId(f"{parent.type}@{gateway}")


class LoadBalancingExporter:
    """Routes each item to one gateway of the resolver's set by its routing key."""

    def __init__(self, settings: Settings, config: LoadBalancingConfig, lookup: Lookup | None = None) -> None:
        self._settings = settings
        self._config = config
        self._log = settings.logger
        self._lookup = lookup or system_lookup
        self._protocol: OtlpConfig | OtlpHttpConfig = (
            config.protocol.otlp_http or config.protocol.otlp or OtlpConfig()
        )
        proto = self._protocol
        env = os.environ if proto.resource_from_environment else None
        static = resource.static_attributes(proto.resource, proto.deployment_environment, env)
        key = config.routing_key
        self._routers = {
            Signal.METRICS: Router(key if key in METRIC_KEYS else "series", static),
            Signal.TRACES: Router(key if key in SPAN_KEYS else "traceID", static),
            Signal.LOGS: Router(key if key in LOG_KEYS else "traceID", static),
        }
        self._gateways: dict[str, _Gateway] = {}
        self._ring = HashRing(())
        self._lock = asyncio.Lock()
        """Held while a batch is split and offered, and while the ring and the gateways change."""
        self._membership_lock = asyncio.Lock()
        """One membership change at a time."""
        self._retiring: dict[str, asyncio.Task[Any]] = {}
        self._tasks = Tasks(str(settings.id), settings.logger)
        self._retire_tasks = Tasks(str(settings.id), settings.logger)
        self._converter = MetricsConverter()
        self._started = False
        self._closing = False
        tel = settings.telemetry
        tel.gauge(
            "loadbalancer_gateways", "Gateways the loadbalancing exporter routes to.", lambda: len(self._ring)
        )
        self._changes = tel.counter(
            "loadbalancer_membership_changes_total", "Changes of the loadbalancing exporter's gateway set."
        )
        self._resolutions = {
            outcome: tel.counter(
                "loadbalancer_resolutions_total",
                "Resolutions of the gateway set, by outcome (success, failure).",
                outcome=outcome,
            )
            for outcome in ("success", "failure")
        }
        self._routed: dict[str, Cell] = {}
        self._rerouted: dict[str, Cell] = {}
        tel.sent()  # shows at 0: the gateways' exporters count what they deliver, by gateway id

    # -- metrics ---------------------------------------------------------------------------------------
    def _gateway_cell(self, cells: dict[str, Cell], gateway: str, name: str, doc: str) -> Cell:
        """The counter ``name`` of ``gateway``, made (and kept in ``cells``) the first time it counts."""
        cell = cells.get(gateway)
        if cell is None:
            cell = cells[gateway] = self._settings.telemetry.counter(name, doc, gateway=gateway)
        return cell

    def _routed_cell(self, gateway: str) -> Cell:
        return self._gateway_cell(
            self._routed,
            gateway,
            "loadbalancer_routed_points_total",
            "Points (spans, log records) routed to each gateway.",
        )

    def _rerouted_cell(self, gateway: str) -> Cell:
        return self._gateway_cell(
            self._rerouted,
            gateway,
            "loadbalancer_rerouted_points_total",
            "Points (spans, log records) queued for a gateway that left, routed again by the new ring.",
        )

    @property
    def gateways(self) -> tuple[str, ...]:
        """The current members (host:port), sorted."""
        return self._ring.members

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        resolver = self._config.resolver
        if resolver.static is not None:
            self._resolutions["success"].value += 1
            await self.set_gateways(frozenset(resolver.static.hostnames))
        elif resolver.k8s is not None:
            port = 4318 if isinstance(self._protocol, OtlpHttpConfig) else 4317
            k8s = K8sResolver(resolver.k8s, port, self.set_gateways, self._resolutions, self._log)
            await k8s.start(self._tasks)  # raises when the API cannot be reached as configured
        else:
            await self.resolve()
            self._tasks.spawn(self._resolve_every_interval(), "loadbalancing-dns")
        self._started = True

    async def _close(self) -> dict[str, _Gateway]:
        """Stops resolving, waits for the retiring gateways, and empties the ring: the gateways it had,
        by id, for the caller to stop or hand over."""
        self._closing = True
        await self._tasks.close()
        async with self._membership_lock:
            # A retiring gateway's sender returns within its timeout plus STOP_GRACE_S (then it counts
            # what it could not send): cancelled earlier, in its last step, what it held went uncounted.
            await self._retire_tasks.wait(self._settings.shutdown_timeout_s + 2 * STOP_GRACE_S)
            await self._retire_tasks.close()
            async with self._lock:
                gateways, self._gateways, self._ring = self._gateways, {}, HashRing(())
        return gateways

    async def shutdown(self) -> None:
        if self._closing:
            return
        gateways = list((await self._close()).values())
        results = await asyncio.gather(*(g.shutdown() for g in gateways), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self._log.error("error stopping a gateway's exporter: %r", result)

    async def hand_over(self) -> dict[str, tuple[str, dict[str | None, list[Request]]]]:
        """A reload replaces this exporter: stop without draining and return each gateway's handed-over
        queue (its exporter's :meth:`~exporters.otlp.exporter._OtlpExporter.hand_over`), by gateway, for
        :meth:`adopt`. Disk partitions stay in the directory for the successor."""
        if self._closing:
            return {}
        gateways = await self._close()
        handed: dict[str, tuple[str, dict[str | None, list[Request]]]] = {}
        for gw, child in gateways.items():
            try:
                handed[gw] = await child.hand_over()
            except Exception as exc:
                self._log.error("gateway %s: handing its queue over failed: %r", gw, exc)
                await child.shutdown()
        return handed

    async def adopt(self, handed: dict[str, tuple[str, dict[str | None, list[Request]]]]) -> None:
        """Take a predecessor's queues (:meth:`hand_over`): a gateway still a member gets its own back
        (ahead of new data); the requests of one that is not are routed again by the ring."""
        for gw, (encoding, queued) in handed.items():
            child = self._gateways.get(gw)
            if child is not None:
                await child.adopt((encoding, queued))
                continue
            for requests in queued.values():
                for request in requests:
                    await self._reroute(gw, encoding, request)

    # -- resolution ------------------------------------------------------------------------------------
    async def _resolve_every_interval(self) -> None:
        dns = self._config.resolver.dns
        assert dns is not None
        while True:
            await asyncio.sleep(dns.interval)
            await self.resolve()

    async def resolve(self) -> None:
        """Resolve the DNS name once and apply the answer; a failure keeps the members (logged, counted)."""
        dns = self._config.resolver.dns
        assert dns is not None
        try:
            members = await resolve_dns(dns, self._lookup)
        except (OSError, TimeoutError) as exc:
            self._resolutions["failure"].value += 1
            self._log.warning(
                "cannot resolve %s (%s): keeping the %d gateways known",
                dns.hostname,
                exc or "timeout",
                len(self._ring),
            )
            return
        self._resolutions["success"].value += 1
        await self.set_gateways(members)

    async def set_gateways(self, members: frozenset[str]) -> None:
        """Make ``members`` (host:port each) the gateway set: start an exporter for each new one, then
        swap the ring; a gateway that left has its queue rerouted in the background."""
        async with self._membership_lock:
            if self._closing:
                return
            added = sorted(members - set(self._gateways))
            removed = sorted(set(self._gateways) - members)
            if not added and not removed:
                return
            started: dict[str, _Gateway] = {}
            try:
                for gw in added:
                    retiring = self._retiring.get(gw)
                    if retiring is not None:  # it came back: its old queue must let go of its partition
                        await asyncio.wait([retiring], timeout=self._settings.shutdown_timeout_s)
                    child = self._make_gateway(gw)
                    try:
                        await child.start()
                    except Exception as exc:
                        self._log.error("cannot start sending to gateway %s: %s", gw, exc)
                        continue
                    started[gw] = child
            except asyncio.CancelledError:  # shutdown stopped the resolver: stop what was started
                for gw, child in started.items():
                    self._retire_tasks.spawn(child.shutdown(), f"stop-{gw}")
                raise
            async with self._lock:
                retired = {gw: self._gateways.pop(gw) for gw in removed}
                self._gateways.update(started)
                self._ring = HashRing(self._gateways)
            self._changes.value += 1
            self._log.log(
                logging.INFO if self._started or removed else logging.DEBUG,
                "gateways: %s (added: %s; removed: %s)",
                ", ".join(self._ring.members) or "none",
                ", ".join(started) or "none",
                ", ".join(retired) or "none",
            )
            for gw, child in retired.items():
                self._start_retiring(gw, child)
            if started and self._protocol.sending_queue.storage == "disk":
                await self._reroute_orphans()

    def _start_retiring(self, gateway: str, child: _Gateway) -> None:
        child.reroute_to(functools.partial(self._reroute, gateway, child._content_encoding))
        self._retiring[gateway] = self._retire_tasks.spawn(self._retire(gateway, child), f"retire-{gateway}")

    async def _reroute_orphans(self) -> None:
        """Drain through the ring the disk partitions of gateways that are no longer members (a previous
        run's, or a previous config's): their records would otherwise wait for that gateway forever."""
        prefix = partition_name(str(gateway_id(self._settings.id, "")))
        root = self._protocol.sending_queue.directory
        found = await asyncio.to_thread(partition_dirs, root) if os.path.isdir(root) else []
        for path in found:
            name = os.path.basename(path)
            if not name.startswith(prefix):
                continue
            gw = urllib.parse.unquote(name[len(prefix) :])
            if gw in self._gateways or gw in self._retiring:
                continue
            child = self._make_gateway(gw)
            child.reroute_to(functools.partial(self._reroute, gw, child._content_encoding))
            try:
                await child.start()
            except Exception as exc:
                self._log.error("cannot open the queue left for gateway %s: %s", gw, exc)
                continue
            self._log.info("rerouting what is queued on disk for gateway %s, no longer a member", gw)
            self._retiring[gw] = self._retire_tasks.spawn(self._retire(gw, child), f"retire-{gw}")

    async def _retire(self, gateway: str, child: _Gateway) -> None:
        try:
            await child.shutdown()  # drains the queue through _reroute
        finally:
            self._retiring.pop(gateway, None)

    def _make_gateway(self, gateway: str) -> _Gateway:
        s = self._settings
        cid = gateway_id(s.id, gateway)
        settings = dataclasses.replace(
            s,
            id=cid,
            telemetry=ComponentTelemetry(s.telemetry.telemetry, s.telemetry.kind, str(cid)),
            logger=s.logger.getChild(gateway),
        )
        proto = self._protocol
        if isinstance(proto, OtlpHttpConfig):
            scheme = "https" if proto.tls.ca_file else "http"
            return _HttpGateway(settings, dataclasses.replace(proto, endpoint=f"{scheme}://{gateway}"))
        return _GrpcGateway(settings, dataclasses.replace(proto, endpoint=gateway))

    # -- routing ---------------------------------------------------------------------------------------
    async def consume(self, batch: Batch) -> None:
        async with self._lock:
            ring = self._ring
            if not len(ring):
                self._settings.telemetry.dropped("no_gateway").value += len(batch)
                return
            parts: dict[str, Any]
            if isinstance(batch, MetricBatch):
                parts = await self._routers[Signal.METRICS].split_metrics(batch, ring)
            elif isinstance(batch, SpanBatch):
                parts = self._routers[Signal.TRACES].split_spans(batch, ring)
            else:
                parts = self._routers[Signal.LOGS].split_logs(batch, ring)
            if not admitted():
                # Not asked by a fan-out (a reroute): refused whole before any gateway takes its part,
                # or a retry would offer the parts taken already a second time.
                for gw, part in parts.items():
                    refused = self._gateways[gw].refusal_of(part)
                    if refused is not None:
                        raise refused
            for gw, part in parts.items():
                self._routed_cell(gw).value += len(part)
                await self._gateways[gw].consume(part)

    async def _reroute(self, gateway: str, encoding: str, request: Request) -> None:
        """Route a request queued for ``gateway`` (which left) again, by the current ring; ``encoding``:
        how its payload is compressed (Content-Encoding, "" for none)."""
        payload = request.payload
        if len(payload) >= _THREAD_DECODE_BYTES:
            batch = await asyncio.to_thread(self._decode, request.kind, payload, encoding)
        else:
            batch = self._decode(request.kind, payload, encoding)
        if batch is not None and len(batch):
            # Refused (Backpressure): the request stays the gateway's, points and all, to try again or
            # count as dropped at its deadline; zeroed before, a refusal until shutdown lost them uncounted.
            await self.consume(batch)
        n, request.points = request.points, 0  # not sent by the gateway that left: counted as rerouted
        self._rerouted_cell(gateway).value += n

    def _decode(self, kind: str, payload: bytes, encoding: str) -> Batch | None:
        if encoding == "gzip":
            payload = gzip.decompress(payload)
        elif encoding == "zstd":
            payload = bytes(cramjam.zstd.decompress(payload))
        if kind == Signal.METRICS.value:
            converted = self._converter.convert(ShadowMetricsRequest.FromString(payload), time.time_ns())
            return MetricBatch(tuple(converted.points))
        if kind == Signal.TRACES.value:
            spans = trace_service_pb2.ExportTraceServiceRequest.FromString(payload).resource_spans
            n = sum(len(ss.spans) for rs in spans for ss in rs.scope_spans)
            return SpanBatch(tuple(spans), {}, n)
        if kind == Signal.LOGS.value:
            logs = logs_service_pb2.ExportLogsServiceRequest.FromString(payload).resource_logs
            n = sum(len(sl.log_records) for rl in logs for sl in rl.scope_logs)
            return LogBatch(tuple(logs), {}, n)
        return None
