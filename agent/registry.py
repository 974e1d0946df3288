"""The one list of built-in component types. The only place agent/ imports concrete components.

Modules are imported when a factory is first looked up, not when the list is read: a StatsD-only
agent never loads grpc, the OTLP classes or the processors (~16 MB of its idle RSS), while
``headwater components`` and the tests, which look at every factory, load them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from agent.component import ComponentKind, Factory

R, P, E = ComponentKind.RECEIVER, ComponentKind.PROCESSOR, ComponentKind.EXPORTER
C = ComponentKind.CONNECTOR

BUILTINS: tuple[tuple[ComponentKind, str, str, str], ...] = (
    # (kind, type, module, attribute); each factory's own kind and type must match its row
    (R, "statsd", "receivers.statsd", "factory"),
    (R, "http", "receivers.http", "factory"),
    (R, "otlp", "receivers.otlp", "factory"),
    (P, "tenant", "processors.tenant", "factory"),
    (P, "sample", "processors.sample", "factory"),
    (P, "percentiles", "processors.percentiles", "factory"),
    (P, "anomaly", "processors.anomaly", "factory"),
    (P, "drift", "processors.drift", "factory"),
    (P, "aggregate", "processors.aggregate", "factory"),
    (P, "threshold", "processors.threshold", "factory"),
    (P, "filter", "processors.filter", "factory"),
    (P, "attributes", "processors.attributes", "factory"),
    (P, "batch", "processors.batch", "factory"),
    (P, "memory_limiter", "processors.memory_limiter", "factory"),
    (P, "cardinality", "processors.cardinality", "factory"),
    (E, "prometheus", "exporters.prometheus", "factory"),
    (E, "prometheus_remote_write", "exporters.prometheus_remote_write", "factory"),
    (E, "otlp", "exporters.otlp", "grpc_factory"),
    (E, "otlp_http", "exporters.otlp", "http_factory"),
    (E, "loadbalancing", "exporters.loadbalancing", "factory"),
    (E, "debug", "exporters.debug", "factory"),
    (C, "forward", "connectors.forward", "factory"),
    (C, "spanmetrics", "connectors.spanmetrics", "factory"),
    (C, "logmetrics", "connectors.logmetrics", "factory"),
)


class Factories(Mapping[tuple[ComponentKind, str], Factory]):
    """Factories by (kind, type name) — a receiver and an exporter may share a type name (``otlp``) —
    imported on first lookup."""

    def __init__(self, rows: tuple[tuple[ComponentKind, str, str, str], ...] = BUILTINS) -> None:
        self._rows = {(kind, type_): (module, attr) for kind, type_, module, attr in rows}
        self._loaded: dict[tuple[ComponentKind, str], Factory] = {}

    def __getitem__(self, key: tuple[ComponentKind, str]) -> Factory:
        found = self._loaded.get(key)
        if found is None:
            module, attr = self._rows[key]
            found = getattr(importlib.import_module(module), attr)
            if (found.kind, found.type) != key:
                raise RuntimeError(f"registry row {key} names {module}.{attr}, a {found.kind} {found.type!r}")
            self._loaded[key] = found
        return found

    def __iter__(self) -> Iterator[tuple[ComponentKind, str]]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def builtin_factories() -> Factories:
    """Every built-in component type by kind and type name."""
    return Factories()
