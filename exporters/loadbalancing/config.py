"""The ``loadbalancing`` exporter's configuration, in the OpenTelemetry Collector's shape: ``routing_key``,
``protocol: {otlp: …}`` (or ``otlp_http``) and ``resolver: {static: …}``, ``{dns: …}`` or ``{k8s: …}``.
The field docstrings are the user documentation shown by ``headwater components``."""

from __future__ import annotations

import re
import urllib.parse
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


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where Kubernetes mounts a pod's service account: token, ca.crt and namespace."""

_SERVICE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?")
"""name (a DNS-1035 label, as Service names are) and optionally .namespace (a DNS-1123 label)."""


@dataclass(frozen=True)
class K8sResolverConfig:
    service: str = ""
    """The gateways' Service as name.namespace, or name (the agent's own namespace): its ready endpoints
    are the gateways, followed by watching its EndpointSlices (every change applied when it happens)."""
    ports: list[int] = field(default_factory=list)
    """Ports of the gateways' OTLP receiver: each endpoint address with each port is a gateway. Empty:
    the protocol's default port (4317 for otlp, 4318 for otlp_http)."""
    timeout: Duration = Duration(1.0)
    """Time limit of a list request and of opening a watch; a failed one keeps the last members and is
    tried again with back-off."""
    api_server: str = ""
    """URL of the Kubernetes API. Empty: the pod's cluster, at
    https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT (refused at start when those are not set)."""
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    """Where the pod's service account is mounted: token (read again when it changes, so a rotated
    token is picked up), ca.crt (trusted for the API's certificate) and namespace."""


@dataclass(frozen=True)
class ResolverConfig:
    static: StaticResolverConfig | None = None
    """A fixed list of gateways."""
    dns: DnsResolverConfig | None = None
    """Gateways from DNS, re-resolved every interval."""
    k8s: K8sResolverConfig | None = None
    """Gateways from a Kubernetes Service's endpoints, watched through the API (needs get, list and
    watch on endpointslices in its namespace)."""


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
    """Where the gateways come from: static, dns or k8s (exactly one)."""

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
        static, dns, k8s = self.resolver.static, self.resolver.dns, self.resolver.k8s
        if sum(r is not None for r in (static, dns, k8s)) != 1:
            problems.append(("resolver", "set exactly one of static, dns and k8s"))
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
        if k8s is not None:
            problems += validate_k8s(k8s)
        return problems


def validate_k8s(k8s: K8sResolverConfig) -> list[tuple[str, str]]:
    """The k8s resolver's own problems (paths under resolver::k8s)."""
    problems: list[tuple[str, str]] = []
    if not k8s.service:
        problems.append(("resolver::k8s::service", "required: the gateways' Service, name.namespace"))
    elif not _SERVICE.fullmatch(k8s.service):
        problems.append(
            (
                "resolver::k8s::service",
                f"{k8s.service!r} is not name.namespace or name (lowercase letters, digits and '-', "
                "63 at most each; not a DNS name such as name.namespace.svc.cluster.local)",
            )
        )
    for i, port in enumerate(k8s.ports):
        if not 1 <= port <= 65535:
            problems.append((f"resolver::k8s::ports::{i}", f"{port} is not a port: must be 1-65535"))
    if len(set(k8s.ports)) != len(k8s.ports):
        problems.append(("resolver::k8s::ports", "a port is listed twice"))
    if k8s.timeout <= 0:
        problems.append(("resolver::k8s::timeout", "must be greater than 0"))
    if k8s.api_server:
        url = urllib.parse.urlsplit(k8s.api_server)
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(("resolver::k8s::api_server", "must be an http:// or https:// URL with a host"))
    if not k8s.service_account_dir:
        problems.append(
            ("resolver::k8s::service_account_dir", "required (the default is where pods have it)")
        )
    return problems
