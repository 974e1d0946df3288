"""The one list of built-in component types. The only place agent/ imports concrete components."""

from __future__ import annotations

from agent.component import ComponentKind, Factory

Factories = dict[tuple[ComponentKind, str], Factory]
"""Factories by (kind, type name): a receiver and an exporter may share a type name (``otlp``)."""


def builtin_factories() -> Factories:
    """Every built-in component type by kind and type name."""
    from exporters import debug, prometheus, prometheus_remote_write
    from exporters import otlp as otlp_exporters
    from processors import (
        anomaly,
        attributes,
        batch,
        cardinality,
        filter,
        memory_limiter,
        percentiles,
        sample,
        tenant,
        threshold,
    )
    from receivers import http, otlp, statsd

    factories = [
        statsd.factory,
        http.factory,
        otlp.factory,
        tenant.factory,
        sample.factory,
        percentiles.factory,
        anomaly.factory,
        threshold.factory,
        filter.factory,
        attributes.factory,
        batch.factory,
        memory_limiter.factory,
        cardinality.factory,
        prometheus.factory,
        prometheus_remote_write.factory,
        otlp_exporters.grpc_factory,
        otlp_exporters.http_factory,
        debug.factory,
    ]
    return {(f.kind, f.type): f for f in factories}
