"""``loadbalancing``: OTLP to a set of gateways, each item to the one its routing key hashes to, so the
stateful processors of a gateway tier (percentiles, aggregate, threshold, drift) see all of a series'
data in one place. The OpenTelemetry Collector's exporter of the same name is the model: the same
``routing_key``, ``protocol: {otlp: …}`` and ``resolver: {static: …, dns: …, k8s: …}`` settings.

- Consistent hashing: a ring with 256 virtual nodes per gateway (``agent/hashring.py``); a gateway
  joining or leaving moves ~1/N of the keys.
- Each gateway has its own otlp (or otlp_http) exporter, hence its own sending queue (memory, or its own
  disk partition named ``<id>@<host:port>``), retries and metrics: the standard exporter metrics carry
  ``exporter="<id>@<host:port>"``. The exporter's own: ``loadbalancer_gateways``,
  ``loadbalancer_membership_changes_total``, ``loadbalancer_resolutions_total{outcome}``,
  ``loadbalancer_routed_points_total{gateway}``, ``loadbalancer_rerouted_points_total{gateway}`` and
  ``exporter_dropped_points_total{reason="no_gateway"}``.
- A gateway that leaves the resolver's answer has its queue drained through the ring again: nothing it
  held is lost (``exporter.py``). A gateway that is down but still resolved keeps its data queued and
  retried, as the otlp exporter does.

Where things are: ``config.py``, ``resolver.py`` (static and DNS), ``k8s.py`` (a Service's EndpointSlices,
listed and watched), ``routing.py`` (routing keys and splitting), ``exporter.py``.
"""

from __future__ import annotations

from agent.component import ComponentKind, Factory, Settings, Signal
from exporters.loadbalancing.config import TYPE, LoadBalancingConfig
from exporters.loadbalancing.exporter import LoadBalancingExporter


def _create(settings: Settings, config: LoadBalancingConfig) -> LoadBalancingExporter:
    return LoadBalancingExporter(settings, config)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.EXPORTER,
    config_class=LoadBalancingConfig,
    create=_create,
    signals=frozenset({Signal.METRICS, Signal.TRACES, Signal.LOGS}),
    description="Sends OTLP to a set of gateways, each series or trace to one of them (consistent hashing).",
)
