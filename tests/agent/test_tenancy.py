"""agent.tenancy: tenant names, and the ``tenant`` routing block both network exporters build on."""

from __future__ import annotations

import pytest

from agent.confmodel import describe_fields
from agent.tenancy import INVALID_TENANT, TenantRoutingConfig, tenant_problem
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig, OtlpTenantRoutingConfig
from exporters.prometheus_remote_write import PrometheusRemoteWriteConfig, RemoteWriteTenantRoutingConfig
from processors import tenant as tenant_processor


@pytest.mark.parametrize(
    ("name", "problem"),
    [("team-a", None), ("", "empty"), ("a" * 151, "too_long"), ("a/b", "bad_character"), ("..", "reserved")],
)
def test_tenant_problem(name: str, problem: str | None) -> None:
    assert tenant_problem(name) == problem


def test_the_tenant_processor_names_tenants_by_the_same_rule() -> None:
    assert tenant_processor.tenant_problem is tenant_problem


@pytest.mark.parametrize(
    ("default", "named", "resolved"),
    [
        ("", "team-a", ("team-a", "")),
        ("", "", (None, "")),
        ("shared", "", ("shared", "")),
        ("shared", "team-a", ("team-a", "")),
        ("shared", "a/b", (None, INVALID_TENANT)),
    ],
)
def test_resolve(default: str, named: str, resolved: tuple[str | None, str]) -> None:
    assert TenantRoutingConfig(default=default).resolve(named) == resolved


def test_the_keys_users_write_are_unchanged() -> None:
    rw = {f["name"]: f for f in describe_fields(RemoteWriteTenantRoutingConfig)}
    otlp = {f["name"]: f for f in describe_fields(OtlpTenantRoutingConfig)}
    assert set(rw) == {"header", "url_template", "label", "drop_label", "default", "max_tenants"}
    assert set(otlp) == {"header", "resource_attribute", "label", "default", "max_tenants"}
    assert rw["header"]["default"] == "X-Scope-OrgID" and otlp["header"]["default"] == '""'
    # Inherited fields keep their one-line docs (the user docs of `headwater components`).
    assert all(f["doc"] for f in (*rw.values(), *otlp.values()))
    assert "Mimir, Cortex" in rw["header"]["doc"] and "Thanos receive" in rw["header"]["doc"]


def test_shared_checks_hold_in_every_exporter() -> None:
    for config in (
        PrometheusRemoteWriteConfig(
            headers={"X-Scope-OrgID": "x"}, tenant=RemoteWriteTenantRoutingConfig(default="..", max_tenants=0)
        ),
        OtlpHttpConfig(
            headers={"X-Scope-OrgID": "x"},
            tenant=OtlpTenantRoutingConfig(header="X-Scope-OrgID", default="..", max_tenants=0),
        ),
        OtlpConfig(
            headers={"x-scope-orgid": "x"},
            tenant=OtlpTenantRoutingConfig(header="X-Scope-OrgID", default="..", max_tenants=0),
        ),
    ):
        problems = dict(config.validate())
        assert problems["tenant::default"] == "'..' is not a valid tenant (reserved)"
        assert problems["tenant::max_tenants"] == "must be at least 1"
        assert problems["tenant::header"] == "also set in headers: the tenant header is per request"


def test_each_protocol_keeps_its_own_headers() -> None:
    rw = RemoteWriteTenantRoutingConfig(header="Content-Encoding").validate()
    assert rw == [("header", "this header is set by the remote-write protocol itself")]
    for header in ("grpc-timeout", "content-type", ":authority"):
        otlp = OtlpTenantRoutingConfig(header=header).validate()
        assert otlp == [("header", "this header is set by the exporter or gRPC itself")]
    assert RemoteWriteTenantRoutingConfig(header="").validate() == []
