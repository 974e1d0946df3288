"""exporters/loadbalancing/k8s.py: the k8s resolver against an API server on 127.0.0.1 speaking the list /
watch wire format of EndpointSlices (tests/exporters/k8s_api.py: no Kubernetes API server can be installed
here), over TLS with the service account's CA and token, the gateways real gRPC OTLP receivers at
127.0.0.1 and [::1]. Watch events move the series as DNS answers do; a 410 lists again; an outage, an
answer with no ready endpoint or a refused token keep the ring; a rotated token is read again."""

from __future__ import annotations

import logging
import shutil
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

from agent.component import ComponentKind
from agent.confmodel import Duration
from agent.model import Kind, MetricBatch, Point
from agent.sending import RetryConfig
from agent.telemetry import Telemetry
from agent.tls import ClientTLSConfig
from exporters.loadbalancing.config import (
    K8sResolverConfig,
    LoadBalancingConfig,
    ProtocolConfig,
    ResolverConfig,
)
from exporters.loadbalancing.exporter import LoadBalancingExporter
from exporters.loadbalancing.k8s import K8sUnavailable, gateways, ready_endpoints
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig
from tests.conftest import AgentGraph, Certs, component_settings, free_port, wait_until
from tests.exporters.k8s_api import KubeApi, Pod

LOGGER = "test.loadbalancing"
_SERVICE: Any = metrics_service_pb2_grpc  # generated, untyped


class Receiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """A gateway: a gRPC OTLP metrics receiver at one host:port, keeping (series, round) of each point."""

    def __init__(self) -> None:
        self.points: list[tuple[str, int]] = []
        self.server: grpc.aio.Server | None = None

    async def Export(self, request: Any, context: Any) -> Any:
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for dp in m.gauge.data_points:
                        series = next(kv.value.string_value for kv in dp.attributes if kv.key == "i")
                        self.points.append((series, int(dp.as_double)))
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def series(self, round_: int) -> set[str]:
        return {s for s, r in self.points if r == round_}


class Gateways:
    """Receivers at 127.0.0.1 and [::1], each on the same two ports: an endpoint address of a slice
    (127.0.0.1 or ::1) with the resolver's two ports is two gateways."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.at: dict[str, Receiver] = {}

    async def start(self) -> None:
        for _ in range(2):
            for _attempt in range(20):  # a port free on 127.0.0.1 may be taken on ::1
                port = free_port()
                bound = []
                try:
                    for host in ("127.0.0.1", "[::1]"):
                        receiver = Receiver()
                        receiver.server = grpc.aio.server()
                        _SERVICE.add_MetricsServiceServicer_to_server(receiver, receiver.server)
                        bound.append(receiver)
                        receiver.server.add_insecure_port(f"{host}:{port}")
                        await receiver.server.start()
                        self.at[f"{host}:{port}"] = receiver
                except RuntimeError:
                    for receiver in bound:
                        assert receiver.server is not None
                        await receiver.server.stop(None)
                    self.at = {k: v for k, v in self.at.items() if v not in bound}
                    continue
                self.ports.append(port)
                break
        assert len(self.ports) == 2

    def of(self, host: str) -> list[str]:
        return [f"{host}:{p}" for p in self.ports]

    def received(self, round_: int) -> int:
        return sum(len(r.series(round_)) for r in self.at.values())

    def owner(self, round_: int) -> dict[str, str]:
        """Each series of a round: the gateway it reached (it must reach exactly one)."""
        found: dict[str, str] = {}
        for gw, receiver in self.at.items():
            for series in receiver.series(round_):
                assert series not in found, f"series {series} reached {found[series]} and {gw}"
                found[series] = gw
        return found

    async def stop(self) -> None:
        for receiver in self.at.values():
            assert receiver.server is not None
            await receiver.server.stop(None)


@pytest.fixture
async def gws() -> AsyncIterator[Gateways]:
    found = Gateways()
    try:
        await found.start()
        yield found
    finally:
        await found.stop()


@pytest.fixture
def account(tmp_path: Path, tls_certs: Certs) -> Path:
    """A mounted service account: token, the API's CA, namespace obs."""
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("token-1\n")
    shutil.copy(tls_certs.ca, sa / "ca.crt")
    (sa / "namespace").write_text("obs")
    return sa


@pytest.fixture
async def api(tls_certs: Certs, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KubeApi]:
    """The API over TLS, found in the cluster's way (KUBERNETES_SERVICE_HOST / _PORT)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_certs.cert, tls_certs.key)
    server = KubeApi(namespace="obs")
    await server.start(context)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    yield server
    await server.stop()


def config(account: Path, ports: list[int], service: str = "gw", http: bool = False) -> LoadBalancingConfig:
    retry = RetryConfig(initial_interval=Duration(0.05), max_interval=Duration(0.2))
    protocol = (
        ProtocolConfig(otlp_http=OtlpHttpConfig(resource_from_environment=False, retry_on_failure=retry))
        if http
        else ProtocolConfig(
            otlp=OtlpConfig(
                tls=ClientTLSConfig(insecure=True), resource_from_environment=False, retry_on_failure=retry
            )
        )
    )
    k8s = K8sResolverConfig(service=service, ports=ports, service_account_dir=str(account))
    return LoadBalancingConfig(protocol=protocol, resolver=ResolverConfig(k8s=k8s))


def new(config: LoadBalancingConfig, tel: Telemetry) -> LoadBalancingExporter:
    settings = component_settings(tel, ComponentKind.EXPORTER, "loadbalancing", shutdown_timeout_s=5.0)
    return LoadBalancingExporter(settings, config)


def points(round_: int, n: int = 200) -> MetricBatch:
    """Series 0..n-1 of one metric, the round as the value (the same series every round)."""
    now = time.time_ns()
    return MetricBatch(
        tuple(Point("m", Kind.GAUGE, (("i", str(i)),), now, value=float(round_)) for i in range(n))
    )


def resolutions(tel: Telemetry, outcome: str) -> float:
    return tel.value("loadbalancer_resolutions_total", exporter="loadbalancing", outcome=outcome)


V4, V6 = "127.0.0.1", "::1"


async def serve_v4_and_v6(api: KubeApi, v6_ready: bool | None = True) -> None:
    """Pod gw-0 at 127.0.0.1 (ready unset: ready), pod gw-1 at ::1 (in the Service's IPv6 slice)."""
    await api.put("gw-ipv4", [Pod(V4, ready=None, name="gw-0", uid="u0")])
    await api.put("gw-ipv6", [Pod(V6, ready=v6_ready, name="gw-1", uid="u1")], address_type="IPv6")


async def test_watch_events_move_the_series_as_dns_answers_do(
    api: KubeApi, account: Path, gws: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await serve_v4_and_v6(api, v6_ready=False)
    await api.put("other-abcde", [Pod(V6, name="other-0", uid="o0")], service="other")  # not our Service
    listed_at = str(api.version)
    tel = Telemetry()
    exporter = new(config(account, gws.ports), tel)
    await exporter.start()
    try:
        assert exporter.gateways == tuple(sorted(gws.of(V4)))  # ::1 not ready, other's slice not ours
        await exporter.consume(points(1))
        await wait_until(lambda: gws.received(1) == 200, "round 1 delivered")
        first = gws.owner(1)
        assert set(first.values()) == set(gws.of(V4))

        await api.put("gw-ipv6", [Pod(V6, ready=True, name="gw-1", uid="u1")], address_type="IPv6")
        await wait_until(lambda: len(exporter.gateways) == 4, "gw-1 ready: its two gateways added")
        await exporter.consume(points(2))
        await wait_until(lambda: gws.received(2) == 200, "round 2 delivered")
        second = gws.owner(2)
        moved = {s for s in second if second[s] != first[s]}
        # Consistent hashing: a series moves only to a new gateway, and about half of them do (2 -> 4).
        assert all(second[s] in gws.of("[::1]") for s in moved)
        assert 60 <= len(moved) <= 140, len(moved)

        await api.delete("gw-ipv6")
        await wait_until(lambda: len(exporter.gateways) == 2, "gw-1's slice deleted")
        await exporter.consume(points(3))
        await wait_until(lambda: gws.received(3) == 200, "round 3 delivered")
        assert gws.owner(3) == first  # every series back where it was
    finally:
        await exporter.shutdown()
    value = tel.value
    assert value("loadbalancer_membership_changes_total", exporter="loadbalancing") == 3
    assert resolutions(tel, "success") == 3 and resolutions(tel, "failure") == 0  # list, MODIFIED, DELETED
    lists, watches = api.lists(), api.watches()
    assert lists[0].path == "/apis/discovery.k8s.io/v1/namespaces/obs/endpointslices"  # namespace file
    assert lists[0].query == {"labelSelector": "kubernetes.io/service-name=gw", "resourceVersion": "0"}
    assert len(lists) == 1 and watches
    assert watches[0].query["allowWatchBookmarks"] == "true"
    assert watches[0].query["resourceVersion"] == listed_at  # the list's resourceVersion
    assert {r.token for r in api.requests} == {"token-1"}
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gateways:")]
    v4, v6 = ", ".join(sorted(gws.of(V4))), ", ".join(sorted(gws.of("[::1]")))
    assert logged[-1] == f"gateways: {v4} (added: none; removed: {v6})"


@pytest.mark.parametrize("as_status", [False, True], ids=["ERROR event", "HTTP 410"])
async def test_a_watch_too_old_lists_again(
    api: KubeApi, account: Path, gws: Gateways, as_status: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    api.gone_as_status = as_status
    await api.put("gw-ipv4", [Pod(V4, name="gw-0", uid="u0")])
    tel = Telemetry()
    exporter = new(config(account, gws.ports), tel)
    await exporter.start()
    try:
        await wait_until(lambda: api.open_watches == 1, "the watch open")
        # gw-1 joins while the watch is cut, and the history that had it is compacted: only a list shows it.
        await api.put("gw-ipv6", [Pod(V6, name="gw-1", uid="u1")], address_type="IPv6", silent=True)
        await api.compact()
        await wait_until(lambda: len(exporter.gateways) == 4, "gw-1 found by listing again")
    finally:
        await exporter.shutdown()
    lists = api.lists()
    assert len(lists) == 2
    assert "resourceVersion" not in lists[1].query  # a consistent list, not the cache's
    assert resolutions(tel, "failure") == 0  # 410 is the protocol, not a failure
    assert any("too old resource version" in r.getMessage() for r in caplog.records)


async def test_a_bookmark_moves_the_resource_version_the_next_watch_starts_from(
    api: KubeApi, account: Path, gws: Gateways
) -> None:
    await api.put("gw-ipv4", [Pod(V4, name="gw-0", uid="u0")])
    exporter = new(config(account, gws.ports), Telemetry())
    await exporter.start()
    try:
        await wait_until(lambda: api.open_watches == 1, "the watch open")
        version = await api.bookmark()
        await api.end_watches()  # the server's timeoutSeconds
        await wait_until(lambda: len(api.watches()) == 2, "a new watch")
        assert api.watches()[1].query["resourceVersion"] == str(version)
        assert len(api.lists()) == 1  # resumed, not listed again
    finally:
        await exporter.shutdown()


async def test_an_api_outage_keeps_the_gateways_and_the_data_flowing(
    api: KubeApi, account: Path, gws: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await serve_v4_and_v6(api)
    tel = Telemetry()
    exporter = new(config(account, gws.ports), tel)
    await exporter.start()
    try:
        assert len(exporter.gateways) == 4
        await wait_until(lambda: api.open_watches == 1, "the watch open")
        await api.outage()
        await wait_until(lambda: resolutions(tel, "failure") >= 2, "two failed reconnects")
        assert len(exporter.gateways) == 4
        await exporter.consume(points(1))
        await wait_until(lambda: gws.received(1) == 200, "sent while the API is down")
        assert len(set(gws.owner(1).values())) == 4
        # gw-1 stops being ready during the outage: the resolver sees it once the API is back.
        await api.put("gw-ipv6", [Pod(V6, ready=False, name="gw-1", uid="u1")], address_type="IPv6")
        await api.recover()
        await wait_until(lambda: len(exporter.gateways) == 2, "the change made during the outage")
    finally:
        await exporter.shutdown()
    assert any(
        "k8s obs/gw:" in (m := r.getMessage()) and "keeping the 4 gateways known, trying again" in m
        for r in caplog.records
    )
    assert len(api.lists()) == 1  # the watch resumed from where it was


async def test_a_malformed_event_is_counted_and_the_watch_goes_on(
    api: KubeApi, account: Path, gws: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await api.put("gw-ipv4", [Pod(V4, name="gw-0", uid="u0")])
    tel = Telemetry()
    exporter = new(config(account, gws.ports), tel)
    await exporter.start()
    try:
        await wait_until(lambda: api.open_watches == 1, "the watch open")
        await api.malformed("gw-bad")
        await wait_until(lambda: resolutions(tel, "failure") == 1, "the malformed event counted")
        await api.put("gw-ipv6", [Pod(V6, name="gw-1", uid="u1")], address_type="IPv6")
        await wait_until(lambda: len(exporter.gateways) == 4, "a later event applied")
    finally:
        await exporter.shutdown()
    assert any("'str' object has no attribute 'get'" in r.getMessage() for r in caplog.records)


async def test_no_ready_endpoint_keeps_the_gateways(
    api: KubeApi, account: Path, gws: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await api.put("gw-ipv4", [Pod(V4, name="gw-0", uid="u0")])
    tel = Telemetry()
    exporter = new(config(account, gws.ports), tel)
    await exporter.start()
    try:
        await api.put("gw-ipv4", [Pod(V4, ready=False, name="gw-0", uid="u0")])
        await wait_until(lambda: resolutions(tel, "failure") == 1, "the empty answer counted")
        assert exporter.gateways == tuple(sorted(gws.of(V4)))
        await api.put("gw-ipv6", [Pod(V6, name="gw-1", uid="u1")], address_type="IPv6")
        await wait_until(lambda: exporter.gateways == tuple(sorted(gws.of("[::1]"))), "gw-1 replaces gw-0")
    finally:
        await exporter.shutdown()
    assert any("no ready endpoint: keeping the 2 gateways known" in r.getMessage() for r in caplog.records)


async def test_the_token_is_read_again_after_it_is_rotated(
    api: KubeApi, account: Path, gws: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await api.put("gw-ipv4", [Pod(V4, name="gw-0", uid="u0")])
    tel = Telemetry()
    exporter = new(config(account, gws.ports), tel)
    await exporter.start()
    try:
        await wait_until(lambda: api.open_watches == 1, "the watch open")
        api.tokens = {"token-2"}  # the old token expired
        await api.end_watches()
        await wait_until(lambda: resolutions(tel, "failure") >= 1, "the old token refused")
        assert any("HTTP 401: Unauthorized" in r.getMessage() for r in caplog.records)
        (account / "token").write_text("token-2\n")  # the kubelet rotates the projected token
        await api.put("gw-ipv6", [Pod(V6, name="gw-1", uid="u1")], address_type="IPv6")
        await wait_until(lambda: len(exporter.gateways) == 4, "watching again with the new token")
    finally:
        await exporter.shutdown()
    assert api.watches()[-1].token == "token-2"


async def test_a_forbidden_namespace_is_logged_with_the_apis_message(
    api: KubeApi, account: Path, gws: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    tel = Telemetry()
    exporter = new(config(account, gws.ports, service="gw.elsewhere"), tel)
    await exporter.start()  # not a start refusal: RBAC can be granted later
    try:
        assert exporter.gateways == ()
        assert resolutions(tel, "failure") >= 1
    finally:
        await exporter.shutdown()
    assert any('cannot list resource "endpointslices"' in r.getMessage() for r in caplog.records)
    assert api.lists()[0].path.endswith("/namespaces/elsewhere/endpointslices")


async def test_otlp_http_gateways_default_to_port_4318(api: KubeApi, account: Path) -> None:
    await api.put("gw-ipv4", [Pod(V4, name="gw-0", uid="u0")])
    exporter = new(config(account, [], http=True), Telemetry())
    await exporter.start()
    try:
        assert exporter.gateways == ("127.0.0.1:4318",)
    finally:
        await exporter.shutdown()


async def test_an_explicit_plain_http_api_server_needs_no_cluster(
    account: Path, gws: Gateways, monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. kubectl proxy on the agent's host: no KUBERNETES_SERVICE_HOST, no token needed.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (account / "token").unlink()
    server = KubeApi(namespace="obs", tokens={""})
    url = await server.start()
    try:
        await server.put("gw-ipv4", [Pod(V4, name="gw-0", uid="u0")])
        lb = config(account, gws.ports, service="gw.obs")
        assert lb.resolver.k8s is not None
        k8s = K8sResolverConfig(
            service="gw.obs", ports=gws.ports, api_server=url, service_account_dir="/nonexistent"
        )
        exporter = new(
            LoadBalancingConfig(protocol=lb.protocol, resolver=ResolverConfig(k8s=k8s)), Telemetry()
        )
        await exporter.start()
        try:
            assert exporter.gateways == tuple(sorted(gws.of(V4)))
        finally:
            await exporter.shutdown()
    finally:
        await server.stop()
    assert {r.token for r in server.requests} == {""}


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("no cluster", "not in a Kubernetes cluster (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT"),
        ("no namespace", "names no namespace and the pod's own cannot be read"),
        ("no token", "no service-account token at"),
        ("no CA", "no service-account CA certificate at"),
    ],
)
async def test_start_refuses_what_cannot_reach_the_api(
    account: Path, monkeypatch: pytest.MonkeyPatch, case: str, says: str
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    if case == "no cluster":
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    else:
        (account / {"no namespace": "namespace", "no token": "token", "no CA": "ca.crt"}[case]).unlink()
    exporter = new(config(account, [4317]), Telemetry())
    with pytest.raises(K8sUnavailable, match="resolver::k8s") as refused:
        await exporter.start()
    await exporter.shutdown()
    assert says in str(refused.value)


def test_ready_endpoints_and_dual_stack_pods() -> None:
    def slice_(address_type: str, *endpoints: dict[str, Any]) -> dict[str, Any]:
        return {"addressType": address_type, "endpoints": list(endpoints)}

    def pod(name: str) -> dict[str, str]:
        return {"kind": "Pod", "namespace": "obs", "name": name, "uid": f"uid-{name}"}

    v4 = slice_(
        "IPv4",
        {"addresses": ["10.0.0.1"], "targetRef": pod("a")},  # conditions left out: ready
        {"addresses": ["10.0.0.2"], "conditions": {"ready": None}, "targetRef": pod("b")},
        {
            "addresses": ["10.0.0.3"],
            "conditions": {"ready": False, "terminating": True},
            "targetRef": pod("c"),
        },
        {"addresses": ["10.0.0.4", "10.0.0.44"], "conditions": {"ready": True}},  # no pod: first address
        {"addresses": [], "conditions": {"ready": True}},
    )
    v6 = slice_("IPv6", {"addresses": ["fd00::1"], "targetRef": pod("a")}, {"addresses": ["fd00::9"]})
    assert [a for _, _, a in ready_endpoints(v4)] == ["10.0.0.1", "10.0.0.2", "10.0.0.4"]
    members = gateways({"v4": ready_endpoints(v4), "v6": ready_endpoints(v6)}, [4317, 14317])
    # Pod a is in both slices: once, at its IPv4 address; fd00::9 names no pod: its own gateway.
    assert members == {
        f"{host}:{port}"
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.4", "[fd00::9]")
        for port in (4317, 14317)
    }
    assert gateways({"v6": ready_endpoints(v6)}, [4317]) == {"[fd00::1]:4317", "[fd00::9]:4317"}


def agent_config(account: Path, ports: list[int], otlp_port: int) -> dict[str, Any]:
    """An agent as the chart renders one: OTLP in, the loadbalancing exporter with the k8s resolver."""
    return {
        "receivers": {"otlp": {"http": f"127.0.0.1:{otlp_port}"}},
        "exporters": {
            "loadbalancing": {
                "protocol": {"otlp": {"tls": {"insecure": True}, "resource_from_environment": False}},
                "resolver": {"k8s": {"service": "gw", "ports": ports, "service_account_dir": str(account)}},
            }
        },
        "service": {"pipelines": {"metrics": {"receivers": ["otlp"], "exporters": ["loadbalancing"]}}},
    }


def otlp_request(round_: int, n: int = 100) -> bytes:
    request = metrics_service_pb2.ExportMetricsServiceRequest()
    metric = request.resource_metrics.add().scope_metrics.add().metrics.add(name="m")
    now = time.time_ns()
    for i in range(n):
        dp = metric.gauge.data_points.add(time_unix_nano=now, as_double=float(round_))
        dp.attributes.add(key="i").value.string_value = str(i)
    return bytes(request.SerializeToString())


async def test_an_agent_configured_in_yaml_follows_the_service(
    agents: AgentGraph, api: KubeApi, account: Path, gws: Gateways
) -> None:
    await api.put("gw-ipv4", [Pod(V4, name="gw-0", uid="u0")])
    port = free_port()
    await agents.start(agent_config(account, gws.ports, port))
    url = f"http://127.0.0.1:{port}/v1/metrics"
    headers = {"Content-Type": "application/x-protobuf"}
    async with aiohttp.ClientSession() as client:
        async with client.post(url, data=otlp_request(1), headers=headers) as response:
            assert response.status == 200
        await wait_until(lambda: gws.received(1) == 100, "round 1 at the IPv4 gateways")
        assert set(gws.owner(1).values()) == set(gws.of(V4))
        await api.put("gw-ipv6", [Pod(V6, name="gw-1", uid="u1")], address_type="IPv6")

        async def spread() -> bool:
            # Posting until a series lands at gw-1: the watch event is applied without a restart.
            async with client.post(url, data=otlp_request(2), headers=headers) as response:
                assert response.status == 200
            return any(receiver.series(2) for gw, receiver in gws.at.items() if gw.startswith("[::1]"))

        await wait_until(spread, "series at gw-1 once its slice is watched")


async def test_an_agent_outside_a_cluster_refuses_to_start(
    agents: AgentGraph, account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(K8sUnavailable, match=r"resolver::k8s: not in a Kubernetes cluster"):
        await agents.start(agent_config(account, [4317], free_port()))
