"""Typed attributes end to end: the OpenTelemetry SDK sends metrics whose point, resource and scope
attributes are strings, ints, doubles, bools, bytes, arrays of each and a kvlist → the agent (``tenant``,
``sample``, ``attributes`` in the pipeline) → ``otlp`` (gRPC) and ``otlp_http`` → an independent sink
(grpcio and aiohttp with the generated opentelemetry-proto classes). Every attribute leaves with the
``AnyValue`` it arrived as, except the one the ``attributes`` processor changed (a string now) and the
labels the processors added (strings); the Prometheus pull page shows the same values as text."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tests.conftest import free_port
from tests.exporters.otlp_sink import Sink
from tests.integration.conftest import AgentProcess, http_get, wait_for_peer
from tests.integration.otlp_sinks import ThreadedOtlpSinks

pytestmark = pytest.mark.integration

CONFIG = """\
receivers:
  otlp:
    grpc: 127.0.0.1:{grpc}
processors:
  tenant:
    static: team-a
  sample:
    rules:
      # Below 1, so sample rebuilds every point (adding sample_rate); this series' hash keeps it.
      - {{match: "typed.*", rate: 0.999999}}
  attributes:
    actions:
      - {{action: update, key: changed, value: "404"}}
exporters:
  otlp/grpc:
    endpoint: {sink_grpc}
    tls: {{insecure: true}}
    resource_from_environment: false
    retry_on_failure: {{initial_interval: 100ms, max_interval: 1s}}
  otlp_http:
    endpoint: {sink_http}
    resource_from_environment: false
    retry_on_failure: {{initial_interval: 100ms, max_interval: 1s}}
  prometheus:
    endpoint: 127.0.0.1:{pull}
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [otlp]
      processors: [tenant, sample, attributes]
      exporters: [otlp/grpc, otlp_http, prometheus]
"""


class FrozenMap(Mapping[str, Any]):
    """A hashable mapping: the SDK keys its aggregations by the attribute set, and encodes a Mapping
    value as a kvlist."""

    def __init__(self, items: dict[str, Any]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))


def av(**kw: Any) -> AnyValue:
    return AnyValue(**kw)


def array(*values: AnyValue) -> AnyValue:
    return AnyValue(array_value=ArrayValue(values=values))


# What the SDK is given, and the AnyValue each must arrive as (built here by hand, not by the SDK).
POINT_ATTRIBUTES: dict[str, tuple[Any, AnyValue]] = {
    "str": ("GET", av(string_value="GET")),
    "int": (200, av(int_value=200)),
    "double": (1.5, av(double_value=1.5)),
    "bool": (True, av(bool_value=True)),
    "bytes": (b"\x00\xff", av(bytes_value=b"\x00\xff")),
    "arr_str": (("a", "b"), array(av(string_value="a"), av(string_value="b"))),
    "arr_int": ((1, -2), array(av(int_value=1), av(int_value=-2))),
    "arr_double": ((0.5, 2.0), array(av(double_value=0.5), av(double_value=2.0))),
    "arr_bool": ((True, False), array(av(bool_value=True), av(bool_value=False))),
    "arr_bytes": ((b"\x01",), array(av(bytes_value=b"\x01"))),
    "kvlist": (
        FrozenMap({"k": 7, "s": "v"}),
        AnyValue(
            kvlist_value=KeyValueList(
                values=[
                    KeyValue(key="k", value=av(int_value=7)),
                    KeyValue(key="s", value=av(string_value="v")),
                ]
            )
        ),
    ),
    "changed": (500, av(int_value=500)),  # the attributes processor sets it to "404"
}
RESOURCE_ATTRIBUTES: dict[str, tuple[Any, AnyValue]] = {
    "service.name": ("typed-svc", av(string_value="typed-svc")),
    "r.int": (7, av(int_value=7)),
    "r.double": (0.25, av(double_value=0.25)),
    "r.bool": (False, av(bool_value=False)),
    "r.bytes": (b"\x02", av(bytes_value=b"\x02")),
    "r.arr_int": ([3, 4], array(av(int_value=3), av(int_value=4))),
    "r.arr_str": (["x"], array(av(string_value="x"))),
}
SCOPE_ATTRIBUTES: dict[str, tuple[Any, AnyValue]] = {
    "s.str": ("lib", av(string_value="lib")),
    "s.int": (3, av(int_value=3)),
    "s.double": (2.5, av(double_value=2.5)),
    "s.bool": (True, av(bool_value=True)),
    "s.arr_double": ((1.0,), array(av(double_value=1.0))),
}


def kinds(kvs: Any) -> dict[str, AnyValue]:
    return {kv.key: kv.value for kv in kvs}


def check(where: str, got: dict[str, AnyValue], expected: dict[str, AnyValue]) -> None:
    for key, value in expected.items():
        assert key in got, f"{where}: {key} missing from {sorted(got)}"
        assert got[key] == value, f"{where}: {key} arrived as {got[key]!r}, sent as {value!r}"


@pytest.fixture
def otlp_sinks() -> Iterator[ThreadedOtlpSinks]:
    with ThreadedOtlpSinks() as sinks:
        yield sinks


def test_attribute_types_survive_otlp_to_otlp(
    start_agent: Callable[..., AgentProcess], otlp_sinks: ThreadedOtlpSinks
) -> None:
    grpc_sink, grpc_address = otlp_sinks.grpc()
    http_sink, http_url = otlp_sinks.http()
    ports = {k: free_port() for k in ("grpc", "pull", "telemetry")}
    agent = start_agent(CONFIG.format(sink_grpc=grpc_address, sink_http=http_url, **ports), ports)
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(
            endpoint=f"127.0.0.1:{ports['grpc']}",
            insecure=True,
            preferred_temporality={Counter: AggregationTemporality.DELTA},
        ),
        export_interval_millis=3_600_000,
    )
    resource = Resource({k: v for k, (v, _) in RESOURCE_ATTRIBUTES.items()})
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    try:
        meter = provider.get_meter(
            "typed.scope", "1.0", attributes={k: v for k, (v, _) in SCOPE_ATTRIBUTES.items()}
        )
        meter.create_counter("typed.requests").add(3, {k: v for k, (v, _) in POINT_ATTRIBUTES.items()})
        meter.create_gauge("typed.temperature").set(21.5, {k: v for k, (v, _) in POINT_ATTRIBUTES.items()})
        assert reader.force_flush()

        expected_point = {k: v for k, (_, v) in POINT_ATTRIBUTES.items()}
        expected_point["changed"] = av(string_value="404")  # changed by a processor: the user's string
        expected_point["tenant_id"] = av(string_value="team-a")  # added by tenant
        expected_point["sample_rate"] = av(string_value="0.999999")  # added by sample
        for name, sink in (("otlp", grpc_sink), ("otlp_http", http_sink)):

            def both(sink: Sink = sink) -> list[tuple[Any, Any, Any, Any]] | None:
                found = sink.metrics()
                return found if len(found) >= 2 else None

            got = wait_for_peer(both, f"both metrics at {name}")
            assert sorted(m.name for _, _, m, _ in got) == ["typed.requests", "typed.temperature"]
            for resource_pb, scope_pb, metric, dp in got:
                where = f"{name} {metric.name}"
                check(f"{where} point", kinds(dp.attributes), expected_point)
                assert len(dp.attributes) == len(expected_point), f"{where}: {sorted(kinds(dp.attributes))}"
                check(
                    f"{where} resource",
                    kinds(resource_pb.attributes),
                    {k: v for k, (_, v) in RESOURCE_ATTRIBUTES.items()},
                )
                check(
                    f"{where} scope",
                    kinds(scope_pb.attributes),
                    {k: v for k, (_, v) in SCOPE_ATTRIBUTES.items()},
                )
                assert (scope_pb.name, scope_pb.version) == ("typed.scope", "1.0")

        # The Prometheus edge writes the same values as text (the receiver's rendering).
        _, page = http_get(agent.url("pull", "/metrics"))
        line = next(line for line in page.splitlines() if line.startswith("typed_temperature{"))
        for text in ('int="200"', 'double="1.5"', 'bool="true"', 'bytes="AP8="', 'arr_int="[1,-2]"'):
            assert text in line, f"{text} not in {line}"
        assert 'kvlist="{\\"k\\":7,\\"s\\":\\"v\\"}"' in line, line
        assert 'changed="404"' in line
        assert agent.self_metric("headwater_receiver_refused_points_total") == 0
    finally:
        # Only after the checks: shutdown exports the (cumulative) gauge once more, and the checks
        # count what the one force_flush sent.
        provider.shutdown()
