"""exporters/loadbalancing/config.py: the refusals, each naming its path, and the YAML shape of the
Collector's exporter loading as written."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from agent.cli import main
from agent.config import load_config
from agent.registry import builtin_factories
from exporters.loadbalancing.config import (
    DnsResolverConfig,
    K8sResolverConfig,
    LoadBalancingConfig,
    ProtocolConfig,
    ResolverConfig,
    StaticResolverConfig,
)
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig, OtlpTenantRoutingConfig


def paths(config: LoadBalancingConfig) -> dict[str, str]:
    return dict(config.validate())


def test_the_default_validates() -> None:
    assert LoadBalancingConfig().validate() == []


@pytest.mark.parametrize(
    ("config", "path", "says"),
    [
        (LoadBalancingConfig(resolver=ResolverConfig()), "resolver", "exactly one of static, dns and k8s"),
        (
            LoadBalancingConfig(
                resolver=ResolverConfig(static=StaticResolverConfig(), dns=DnsResolverConfig(hostname="gw"))
            ),
            "resolver",
            "exactly one",
        ),
        (
            LoadBalancingConfig(resolver=ResolverConfig(static=StaticResolverConfig(["gw1:4317", "gw1"]))),
            "resolver::static::hostnames::1",
            "not host:port",
        ),
        (
            LoadBalancingConfig(resolver=ResolverConfig(static=StaticResolverConfig(["a:1", "a:1"]))),
            "resolver::static::hostnames",
            "listed twice",
        ),
        (
            LoadBalancingConfig(resolver=ResolverConfig(dns=DnsResolverConfig())),
            "resolver::dns::hostname",
            "required",
        ),
        (
            LoadBalancingConfig(resolver=ResolverConfig(dns=DnsResolverConfig(hostname="gw", port=0))),
            "resolver::dns::port",
            "1-65535",
        ),
        (
            LoadBalancingConfig(
                resolver=ResolverConfig(dns=DnsResolverConfig(hostname="gw"), k8s=K8sResolverConfig("gw.obs"))
            ),
            "resolver",
            "exactly one of static, dns and k8s",
        ),
        (
            LoadBalancingConfig(resolver=ResolverConfig(k8s=K8sResolverConfig())),
            "resolver::k8s::service",
            "required",
        ),
        (
            LoadBalancingConfig(
                resolver=ResolverConfig(k8s=K8sResolverConfig("gw-headless.obs.svc.cluster.local"))
            ),
            "resolver::k8s::service",
            "is not name.namespace or name",
        ),
        (
            LoadBalancingConfig(resolver=ResolverConfig(k8s=K8sResolverConfig("GW_svc"))),
            "resolver::k8s::service",
            "lowercase letters, digits and '-'",
        ),
        (
            LoadBalancingConfig(resolver=ResolverConfig(k8s=K8sResolverConfig("gw", ports=[4317, 70000]))),
            "resolver::k8s::ports::1",
            "70000 is not a port",
        ),
        (
            LoadBalancingConfig(resolver=ResolverConfig(k8s=K8sResolverConfig("gw", ports=[4317, 4317]))),
            "resolver::k8s::ports",
            "listed twice",
        ),
        (
            LoadBalancingConfig(resolver=ResolverConfig(k8s=K8sResolverConfig("gw", timeout=0))),  # type: ignore[arg-type]
            "resolver::k8s::timeout",
            "greater than 0",
        ),
        (
            LoadBalancingConfig(
                resolver=ResolverConfig(k8s=K8sResolverConfig("gw", api_server="10.0.0.1:6443"))
            ),
            "resolver::k8s::api_server",
            "http:// or https:// URL",
        ),
        (
            LoadBalancingConfig(protocol=ProtocolConfig(otlp=OtlpConfig(), otlp_http=OtlpHttpConfig())),
            "protocol",
            "not both",
        ),
        (
            LoadBalancingConfig(protocol=ProtocolConfig(otlp=OtlpConfig(endpoint="collector:4317"))),
            "protocol::otlp::endpoint",
            "resolver names the gateways",
        ),
        (
            LoadBalancingConfig(protocol=ProtocolConfig(otlp=OtlpConfig(tenant=OtlpTenantRoutingConfig()))),
            "protocol::otlp::tenant",
            "not available",
        ),
        (
            LoadBalancingConfig(protocol=ProtocolConfig(otlp=OtlpConfig(max_request_size=1))),  # type: ignore[arg-type]
            "protocol::otlp::max_request_size",
            "between",
        ),
    ],
)
def test_refusals_name_their_path(config: LoadBalancingConfig, path: str, says: str) -> None:
    problems = paths(config)
    assert path in problems, problems
    assert says in problems[path]


def test_the_collectors_yaml_shape_loads(tmp_path: Any) -> None:
    text: dict[str, Any] = {
        "receivers": {"statsd": {}},
        "exporters": {
            "loadbalancing": {
                "routing_key": "streamID",
                "protocol": {"otlp": {"timeout": "1s", "tls": {"insecure": True}}},
                "resolver": {
                    "dns": {
                        "hostname": "gw-headless.monitoring.svc",
                        "port": 4317,
                        "interval": "5s",
                        "timeout": "1s",
                    }
                },
            }
        },
        "service": {"pipelines": {"metrics": {"receivers": ["statsd"], "exporters": ["loadbalancing"]}}},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(text))
    config = load_config(str(path), builtin_factories())
    lb = next(
        spec.config for spec in config.exporters.values() if isinstance(spec.config, LoadBalancingConfig)
    )
    assert lb.routing_key == "streamID"
    assert lb.resolver.dns is not None and lb.resolver.dns.interval == 5.0
    assert lb.protocol.otlp is not None and lb.protocol.otlp.timeout == 1.0


def test_the_collectors_k8s_resolver_yaml_loads(tmp_path: Any) -> None:
    text: dict[str, Any] = {
        "receivers": {"statsd": {}},
        "exporters": {
            "loadbalancing": {
                "protocol": {"otlp": {"tls": {"insecure": True}}},
                "resolver": {
                    "k8s": {"service": "gw-headwater-headless.obs-gw", "ports": [4317], "timeout": "2s"}
                },
            }
        },
        "service": {"pipelines": {"metrics": {"receivers": ["statsd"], "exporters": ["loadbalancing"]}}},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(text))
    config = load_config(str(path), builtin_factories())
    lb = next(
        spec.config for spec in config.exporters.values() if isinstance(spec.config, LoadBalancingConfig)
    )
    k8s = lb.resolver.k8s
    assert k8s is not None and k8s.service == "gw-headwater-headless.obs-gw"
    assert list(k8s.ports) == [4317] and k8s.timeout == 2.0 and k8s.api_server == ""
    assert k8s.service_account_dir == "/var/run/secrets/kubernetes.io/serviceaccount"
    assert (
        K8sResolverConfig("gw").api_server == ""
        and LoadBalancingConfig(resolver=ResolverConfig(k8s=K8sResolverConfig("gw"))).validate() == []
    )


def test_headwater_components_documents_the_k8s_resolver(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["components", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    lb = next(c for c in described if (c["kind"], c["type"]) == ("exporter", "loadbalancing"))
    resolver = next(f for f in lb["fields"] if f["name"] == "resolver")
    k8s = next(f for f in resolver["fields"] if f["name"] == "k8s")
    fields = {f["name"]: f for f in k8s["fields"]}
    assert set(fields) == {"service", "ports", "timeout", "api_server", "service_account_dir"}
    assert all(f["doc"] for f in fields.values())
    assert fields["timeout"]["default"] == "1s"
    assert "name.namespace" in fields["service"]["doc"] and "4318 for otlp_http" in fields["ports"]["doc"]
