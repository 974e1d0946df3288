"""The one list of built-in component types. The only place agent/ imports concrete components."""

from __future__ import annotations

from agent.component import Factory


def builtin_factories() -> dict[str, Factory]:
    """Every built-in component type by type name."""
    from exporters import debug, prometheus, prometheus_remote_write
    from receivers import http, statsd

    factories = [
        statsd.factory,
        http.factory,
        prometheus.factory,
        prometheus_remote_write.factory,
        debug.factory,
    ]
    return {f.type: f for f in factories}
