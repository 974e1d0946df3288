"""Tenants: what a valid tenant name is, and the ``tenant`` routing block the network exporters share.

A tenant name follows Mimir's rules (the strictest of the backends: Cortex, Thanos and VictoriaMetrics
accept all it accepts). The ``tenant`` processor names tenants with :func:`tenant_problem`; exporters
route by them with a :class:`TenantRoutingConfig` subclass that adds the fields of their protocol
(remote-write: ``url_template``, ``drop_label``; OTLP: ``resource_attribute``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from agent.model import MetricBatch, Point
from agent.slicing import slices

MAX_TENANT_LENGTH = 150
_TENANT_CHARS = re.compile(r"[A-Za-z0-9!\-_.*'()]+", re.ASCII)
_RESERVED_TENANTS = frozenset({".", "..", "__mimir_cluster"})

INVALID_TENANT = "invalid_tenant"
"""The dropped{reason} of data whose tenant is not a valid name."""


def tenant_problem(name: str) -> str | None:
    """Why ``name`` is not a valid tenant by Mimir's rules (a short reason label), or None when it is."""
    if not name:
        return "empty"
    if len(name) > MAX_TENANT_LENGTH:
        return "too_long"
    if not _TENANT_CHARS.fullmatch(name):
        return "bad_character"
    if name in _RESERVED_TENANTS:
        return "reserved"
    return None


@dataclass(frozen=True)
class TenantRoutingConfig:
    """What every exporter's ``tenant`` block holds. Subclasses add their protocol's fields, may give
    ``header`` another default, and say which headers their protocol keeps (:meth:`header_problem`)."""

    header: str = ""
    """Request header (gRPC: metadata, lower-cased) naming each request's tenant, e.g. X-Scope-OrgID
    (Mimir, Cortex) or THANOS-TENANT (Thanos receive); with one, each tenant has its own queue. "" = none."""
    label: str = "tenant_id"
    """Point label naming a point's tenant (the tenant processor sets it), read first; then (otlp) the
    resource attribute, the batch context's tenant, and default."""
    default: str = ""
    """Tenant of data naming none; empty = sent without a tenant, through the exporter's own queue."""
    max_tenants: int = 1000
    """Tenants at most (each has its own queue and series state); data of further tenants is dropped
    (tenant_limit)."""

    def header_problem(self) -> str | None:
        """Why ``header`` cannot carry the tenant in the exporter's protocol; None when it can."""
        return None

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.header and (problem := self.header_problem()):
            problems.append(("header", problem))
        if self.default and (problem := tenant_problem(self.default)):
            problems.append(("default", f"{self.default!r} is not a valid tenant ({problem})"))
        if self.max_tenants < 1:
            problems.append(("max_tenants", "must be at least 1"))
        return problems

    def header_clash(self, headers: Mapping[str, str]) -> list[tuple[str, str]]:
        """The problem of an exporter whose fixed ``headers`` also set the per-request tenant header
        (paths relative to the exporter's config)."""
        clash = self.header.lower()
        if clash and any(name.lower() == clash for name in headers):
            return [("tenant::header", "also set in headers: the tenant header is per request")]
        return []

    def resolve(self, named: str) -> tuple[str | None, str]:
        """The tenant of data that names ``named`` ("" = none: then ``default``): (tenant, "") for a
        valid one, (None, "") for none at all (the exporter's own queue), (None, INVALID_TENANT) for a
        name that is not a valid tenant (to drop and count)."""
        tenant = named or self.default
        if not tenant:
            return None, ""
        if tenant_problem(tenant) is not None:
            return None, INVALID_TENANT
        return tenant, ""


def named_tenant(point: Point, label: str, attribute: str = "") -> str:
    """The tenant ``point`` names: its ``label``, else (when ``attribute`` is given) its resource's
    attribute of that key; "" when it names none."""
    for key, value in point.labels:
        if key == label:
            return value
    if attribute and point.resource is not None:
        for key, value in point.resource.attributes:
            if key == attribute:
                return value
    return ""


def point_tenants(
    route: TenantRoutingConfig, points: Iterable[Point], context_tenant: str, attribute: str = ""
) -> Iterator[tuple[str | None, str]]:
    """Each point's (tenant, refusal) by :meth:`TenantRoutingConfig.resolve`, in order: the name it
    carries (:func:`named_tenant`), else ``context_tenant`` (the batch context's), else the route's
    default. Each distinct name is checked once."""
    resolved: dict[str, tuple[str | None, str]] = {}
    label = route.label
    for point in points:
        name = named_tenant(point, label, attribute) or context_tenant
        known = resolved.get(name)
        if known is None:
            known = resolved[name] = route.resolve(name)
        yield known


async def group_by_tenant(
    route: TenantRoutingConfig, batch: MetricBatch, attribute: str = ""
) -> tuple[dict[str | None, list[Point]], dict[str, int]]:
    """The batch's points by tenant (None: they name none, for the exporter's own queue), in batch
    order within each, and the points refused (``invalid_tenant``: to count as dropped). In slices
    that yield to the loop (:mod:`agent.slicing`)."""
    context_tenant = batch.context.get("tenant", "")
    groups: dict[str | None, list[Point]] = {}
    refused: dict[str, int] = {}
    async for chunk in slices(batch.points):
        for point, (tenant, refusal) in zip(
            chunk, point_tenants(route, chunk, context_tenant, attribute), strict=True
        ):
            if refusal:
                refused[refusal] = refused.get(refusal, 0) + 1
                continue
            group = groups.get(tenant)
            if group is None:
                group = groups[tenant] = []
            group.append(point)
    return groups, refused
