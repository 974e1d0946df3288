"""The resource attributes an OTLP exporter adds: its config, then the process environment.

Precedence, highest first (a higher layer's key wins over a lower one's):

1. the data's own resource (``Point.resource`` for metrics, the ``Resource`` of a ``ResourceSpans`` /
   ``ResourceLogs``): what the application said about itself is never overwritten;
2. the exporter's ``resource`` map, then its ``deployment_environment`` field;
3. ``OTEL_RESOURCE_ATTRIBUTES``, then ``OTEL_SERVICE_NAME`` (which wins over a ``service.name`` inside
   ``OTEL_RESOURCE_ATTRIBUTES``, as in the OpenTelemetry SDKs), then
   ``HEADWATER_DEPLOYMENT_ENVIRONMENT``, then the Kubernetes downward-API variables in
   :data:`K8S_ENV`;
4. ``service.name = unknown_service:headwater``: the SDK's rule (``unknown_service:`` + the executable
   name) for data whose producer never named itself, so it stays visibly unnamed in SignOz.

``deployment.environment`` (older semantic conventions, what SignOz's UI filters on) and
``deployment.environment.name`` (current conventions) are kept equal: whichever layer sets one sets
both, unless that same layer sets both explicitly.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping

DEFAULT_SERVICE_NAME = "unknown_service:headwater"

ENVIRONMENT_KEYS = ("deployment.environment", "deployment.environment.name")

ENVIRONMENT_VARIABLE = "HEADWATER_DEPLOYMENT_ENVIRONMENT"

K8S_ENV: tuple[tuple[str, str], ...] = (
    ("K8S_CLUSTER_NAME", "k8s.cluster.name"),
    ("K8S_NODE_NAME", "k8s.node.name"),
    ("K8S_NAMESPACE_NAME", "k8s.namespace.name"),
    ("K8S_POD_NAME", "k8s.pod.name"),
    ("K8S_POD_UID", "k8s.pod.uid"),
    ("K8S_CONTAINER_NAME", "k8s.container.name"),
    ("K8S_DEPLOYMENT_NAME", "k8s.deployment.name"),
)
"""Environment variable → resource attribute, set from the pod spec with the downward API
(``valueFrom.fieldRef``: ``spec.nodeName``, ``metadata.namespace``, ``metadata.name``, ``metadata.uid``);
the container and deployment names are plain values in the pod spec."""


def parse_resource_attributes(text: str) -> dict[str, str]:
    """``key1=value1,key2=value2`` as the OTel SDKs read OTEL_RESOURCE_ATTRIBUTES (values
    percent-decoded; a malformed pair is skipped, like the SDKs do, rather than failing startup)."""
    out: dict[str, str] = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            continue
        out[key] = urllib.parse.unquote(value.strip())
    return out


def _mirror_environment(layer: dict[str, str]) -> dict[str, str]:
    present = [k for k in ENVIRONMENT_KEYS if layer.get(k)]
    if len(present) == 1:
        value = layer[present[0]]
        for k in ENVIRONMENT_KEYS:
            layer[k] = value
    return layer


def environment_layer(env: Mapping[str, str]) -> dict[str, str]:
    """Attributes taken from the process environment (layer 3)."""
    layer: dict[str, str] = {}
    for variable, key in K8S_ENV:
        if env.get(variable):
            layer[key] = env[variable]
    if env.get(ENVIRONMENT_VARIABLE):
        layer.update(dict.fromkeys(ENVIRONMENT_KEYS, env[ENVIRONMENT_VARIABLE]))
    from_otel = parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    if any(k in from_otel for k in ENVIRONMENT_KEYS):
        for k in ENVIRONMENT_KEYS:
            layer.pop(k, None)
    layer.update(from_otel)
    if env.get("OTEL_SERVICE_NAME"):
        layer["service.name"] = env["OTEL_SERVICE_NAME"]
    return _mirror_environment(layer)


def static_attributes(
    config_resource: Mapping[str, str],
    deployment_environment: str,
    env: Mapping[str, str] | None,
) -> dict[str, str]:
    """Layers 2-4 merged: what the exporter adds where the data's own resource lacks the key.

    ``env`` is None when the exporter is told not to read the environment.
    """
    merged = {"service.name": DEFAULT_SERVICE_NAME}
    if env is not None:
        lower = environment_layer(env)
        if any(k in config_resource for k in ENVIRONMENT_KEYS) or deployment_environment:
            for k in ENVIRONMENT_KEYS:
                lower.pop(k, None)
        merged.update(lower)
    config_layer: dict[str, str] = {}
    if deployment_environment:
        config_layer.update(dict.fromkeys(ENVIRONMENT_KEYS, deployment_environment))
    config_layer.update(config_resource)
    merged.update(_mirror_environment(config_layer))
    return merged


def merge(
    own: Mapping[str, str] | tuple[tuple[str, str], ...], static: Mapping[str, str]
) -> list[tuple[str, str]]:
    """The data's own attributes with the static ones added where the key is missing, in a stable
    order (own attributes first, as they came; then the added ones sorted)."""
    own_pairs = list(own.items()) if isinstance(own, Mapping) else list(own)
    keys = {k for k, _ in own_pairs}
    if ("deployment.environment" in keys or "deployment.environment.name" in keys) and not all(
        k in keys for k in ENVIRONMENT_KEYS
    ):
        # The data named its environment under one key: mirror that, never mix in ours.
        value = next(v for k, v in own_pairs if k in ENVIRONMENT_KEYS)
        own_pairs += [(k, value) for k in ENVIRONMENT_KEYS if k not in keys]
        keys.update(ENVIRONMENT_KEYS)
    return own_pairs + sorted((k, v) for k, v in static.items() if k not in keys)
