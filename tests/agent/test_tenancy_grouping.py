"""agent.tenancy.group_by_tenant / point_tenants: the one tenant grouping both network exporters use."""

from __future__ import annotations

import time

from agent.model import Kind, MetricBatch, Point, Resource
from agent.tenancy import TenantRoutingConfig, group_by_tenant, named_tenant, point_tenants


def point(name: str, *labels: tuple[str, str], resource: Resource | None = None) -> Point:
    return Point(name, Kind.GAUGE, tuple(sorted(labels)), time.time_ns(), value=1.0, resource=resource)


ROUTE = TenantRoutingConfig(label="tenant_id")
TEAM = Resource((("tenant.id", "team"),))


def test_a_point_names_its_tenant_by_label_first_then_by_resource_attribute() -> None:
    both = point("m", ("tenant_id", "label"), resource=TEAM)
    assert named_tenant(both, "tenant_id", "tenant.id") == "label"
    assert named_tenant(point("m", resource=TEAM), "tenant_id", "tenant.id") == "team"
    assert named_tenant(point("m", resource=TEAM), "tenant_id") == ""  # no attribute: label only


async def test_points_are_grouped_by_tenant_in_batch_order_and_invalid_ones_counted() -> None:
    batch = MetricBatch(
        (
            point("a1", ("tenant_id", "a")),
            point("ctx"),  # names none: the batch context's tenant
            point("bad", ("tenant_id", "no/slash")),
            point("a2", ("tenant_id", "a")),
            point("team", resource=TEAM),
        ),
        context={"tenant": "b"},
    )
    groups, refused = await group_by_tenant(ROUTE, batch, "tenant.id")
    assert {t: [p.name for p in ps] for t, ps in groups.items()} == {
        "a": ["a1", "a2"],
        "b": ["ctx"],
        "team": ["team"],
    }
    assert refused == {"invalid_tenant": 1}


async def test_without_a_tenant_or_default_points_go_to_the_exporters_own_queue() -> None:
    batch = MetricBatch((point("x"), point("y", ("tenant_id", "a"))))
    groups, refused = await group_by_tenant(ROUTE, batch)
    assert {t: [p.name for p in ps] for t, ps in groups.items()} == {None: ["x"], "a": ["y"]}
    assert refused == {}
    defaulted = TenantRoutingConfig(label="tenant_id", default="dflt")
    assert list(point_tenants(defaulted, batch.points, "")) == [("dflt", ""), ("a", "")]
