"""exporters/loadbalancing/config.py: the refusals, each naming its path, and the YAML shape of the
Collector's exporter loading as written."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from agent.config import load_config
from agent.registry import builtin_factories
from exporters.loadbalancing.config import (
    DnsResolverConfig,
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
