"""The ``loadbalancing`` exporter's configuration, in the OpenTelemetry Collector's shape: ``routing_key``,
``protocol: {otlp: …}`` (or ``otlp_http``) and ``resolver: {static: …}`` or ``{dns: …}``. The field
docstrings are the user documentation shown by ``headwater components``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from agent.confmodel import Duration, parse_host_port
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig

TYPE = "loadbalancing"

_DEFAULTS: dict[str, OtlpConfig | OtlpHttpConfig] = {"otlp": OtlpConfig(), "otlp_http": OtlpHttpConfig()}

RoutingKey = Literal["", "series", "streamID", "tenant", "service", "resource", "metric", "traceID"]

METRIC_KEYS = frozenset({"series", "streamID", "tenant", "service", "resource", "metric"})
"""Routing keys a metrics pipeline may use (streamID: the Collector's name for series)."""
SPAN_KEYS = frozenset({"traceID", "service", "resource", "tenant"})
LOG_KEYS = frozenset({"traceID", "service", "resource", "tenant"})


@dataclass(frozen=True)
class ProtocolConfig:
    otlp: OtlpConfig | None = None
    """Send with the otlp (gRPC) exporter (the default): every setting of that exporter but endpoint
    (the resolver's gateways; TLS unless tls.insecure), each gateway with its own sending queue."""
    otlp_http: OtlpHttpConfig | None = None
    """Send with the otlp_http exporter instead; each gateway is http://<host:port> (or https:// with
    tls.ca_file set)."""


@dataclass(frozen=True)
class StaticResolverConfig:
    hostnames: list[str] = field(default_factory=list)
    """The gateways, host:port each (port of their OTLP receiver)."""


@dataclass(frozen=True)
class DnsResolverConfig:
    hostname: str = ""
    """A name whose A/AAAA records are the gateways, e.g. a Kubernetes headless Service
    (gateway-headless.monitoring.svc.cluster.local)."""
    port: int = 4317
    """Port of the gateways' OTLP receiver."""
    interval: Duration = Duration(5.0)
    """How often the name is resolved again; a changed answer changes the members."""
    timeout: Duration = Duration(1.0)
    """Time limit of one resolution; a failed or timed-out one keeps the last members."""


@dataclass(frozen=True)
class ResolverConfig:
    static: StaticResolverConfig | None = None
    """A fixed list of gateways."""
    dns: DnsResolverConfig | None = None
    """Gateways from DNS, re-resolved every interval."""


@dataclass(frozen=True)
class LoadBalancingConfig:
    routing_key: RoutingKey = ""
    """What decides the gateway of an item: series (each series to one gateway: its name, labels and
    resource; streamID is the Collector's name for it), tenant (resource attribute tenant.id, else the
    request's tenant), service (resource service.name), resource (all resource attributes), metric
    (metric name), traceID (traces and logs: all spans of a trace to one gateway; logs without a trace
    ID by resource). Empty: series for metrics, traceID for traces and logs."""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """How to send to each gateway: otlp or otlp_http, with that exporter's settings (not endpoint)."""
    resolver: ResolverConfig = field(default_factory=lambda: ResolverConfig(static=StaticResolverConfig()))
    """Where the gateways come from: static or dns (exactly one)."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        protocols = [p for p in ("otlp", "otlp_http") if getattr(self.protocol, p) is not None]
        if len(protocols) > 1:
            problems.append(("protocol", "set one of otlp and otlp_http, not both"))
        for name in protocols:
            if getattr(self.protocol, name).endpoint != _DEFAULTS[name].endpoint:
                problems.append(
                    (f"protocol::{name}::endpoint", "the resolver names the gateways: leave it out")
                )
            for path, message in getattr(self.protocol, name).validate():
                problems.append((f"protocol::{name}::{path}", message))
            if getattr(self.protocol, name).tenant is not None:
                problems.append((f"protocol::{name}::tenant", "tenant routing is not available here"))
        static, dns = self.resolver.static, self.resolver.dns
        if (static is None) == (dns is None):
            problems.append(("resolver", "set exactly one of static and dns"))
        if static is not None:
            for i, host in enumerate(static.hostnames):
                try:
                    parse_host_port(host)
                except ValueError as exc:
                    problems.append((f"resolver::static::hostnames::{i}", str(exc)))
            if len(set(static.hostnames)) != len(static.hostnames):
                problems.append(("resolver::static::hostnames", "a gateway is listed twice"))
        if dns is not None:
            if not dns.hostname:
                problems.append(("resolver::dns::hostname", "required: the name to resolve"))
            if not 1 <= dns.port <= 65535:
                problems.append(("resolver::dns::port", "must be 1-65535"))
            if dns.interval <= 0:
                problems.append(("resolver::dns::interval", "must be greater than 0"))
            if dns.timeout <= 0:
                problems.append(("resolver::dns::timeout", "must be greater than 0"))
        return problems
