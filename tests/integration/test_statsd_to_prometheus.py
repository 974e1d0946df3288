"""StatsD clients → the agent → a real Prometheus (remote-write) and the pull endpoint."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest
import statsd
from datadog.dogstatsd import DogStatsd
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.integration.conftest import (
    AgentProcess,
    PrometheusServer,
    free_tcp_udp_port,
    http_get,
    wait_for_peer,
)

pytestmark = pytest.mark.integration

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    tcp: 127.0.0.1:{statsd}
    flush_interval: 1s
exporters:
  prometheus_remote_write:
    endpoint: {write_url}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 1s}}
  prometheus:
    endpoint: 127.0.0.1:{pull}
service:
  shutdown_timeout: 20s
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [prometheus_remote_write, prometheus]
"""


@pytest.fixture
def always_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients drop samples at random when given a rate; make them send every one (the rate still
    goes on the wire, so the agent must scale by 1/rate)."""
    import datadog.dogstatsd.base

    monkeypatch.setattr(random, "random", lambda: 0.0)
    monkeypatch.setattr(datadog.dogstatsd.base, "random", lambda: 0.0)


@pytest.fixture
def agent(prometheus: PrometheusServer, start_agent: Callable[..., AgentProcess]) -> Iterator[AgentProcess]:
    ports = {"statsd": free_tcp_udp_port(), "pull": free_port(), "telemetry": free_port()}
    yield start_agent(CONFIG.format(write_url=prometheus.write_url, **ports), ports)


def pull_samples(agent: AgentProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = http_get(agent.url("pull", "/metrics"))
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def wait_pull(agent: AgentProcess, name: str, labels: dict[str, str], expected: float) -> None:
    key = (name, frozenset(labels.items()))
    try:
        wait_for_peer(
            lambda: abs(pull_samples(agent).get(key, float("nan")) - expected) < 1e-9,
            f"{name}{labels} == {expected} on the pull endpoint",
        )
    except AssertionError:
        got = {k: v for k, v in pull_samples(agent).items() if k[0] == name}
        raise AssertionError(f"{name}{labels}: expected {expected}, pull endpoint has {got}") from None


def test_statsd_client_counters_gauges_timers_sets(
    agent: AgentProcess, prometheus: PrometheusServer, always_sample: None
) -> None:
    port = agent.ports["statsd"]
    udp = statsd.StatsClient("127.0.0.1", port, prefix="app")
    for _ in range(10):
        udp.incr("requests")  # +1 each
    for _ in range(10):
        udp.incr("sampled", 1, rate=0.25)  # each counts as 4
    udp.gauge("temperature", 20)
    udp.gauge("temperature", 5, delta=True)
    udp.gauge("temperature", -3, delta=True)  # 22
    for ms in (100, 200, 300, 400):
        udp.timing("latency", ms)
    for user in ("alice", "bob", "alice", "carol"):
        udp.set("users", user)

    tcp = statsd.TCPStatsClient("127.0.0.1", port, prefix="app")
    tcp.connect()
    tcp.incr("tcp_requests", 7)
    tcp.close()

    prometheus.wait_value("app_requests_total", 10)
    prometheus.wait_value("app_sampled_total", 40)
    prometheus.wait_value("app_temperature", 22)
    prometheus.wait_value("app_latency_seconds_count", 4)
    prometheus.wait_value("app_latency_seconds_sum", 1.0)
    prometheus.wait_value('app_latency_seconds_bucket{le="0.25"}', 2)
    prometheus.wait_value("app_users", 3)
    prometheus.wait_value("app_tcp_requests_total", 7)

    wait_pull(agent, "app_requests_total", {}, 10)
    wait_pull(agent, "app_sampled_total", {}, 40)
    wait_pull(agent, "app_temperature", {}, 22)
    wait_pull(agent, "app_latency_seconds_count", {}, 4)
    wait_pull(agent, "app_latency_seconds_sum", {}, 1.0)
    wait_pull(agent, "app_latency_seconds_bucket", {"le": "0.5"}, 4)
    wait_pull(agent, "app_users", {}, 3)

    # Counters stay cumulative across flushes: more increments add to the total.
    for _ in range(5):
        udp.incr("requests")
    prometheus.wait_value("app_requests_total", 15)
    wait_pull(agent, "app_requests_total", {}, 15)
    assert agent.self_metric("headwater_receiver_accepted_points_total") >= 34
    assert agent.self_metric("headwater_exporter_sent_points_total") > 0


def test_dogstatsd_client_tags_become_labels(
    agent: AgentProcess, prometheus: PrometheusServer, always_sample: None
) -> None:
    dd = DogStatsd(
        host="127.0.0.1",
        port=agent.ports["statsd"],
        disable_telemetry=True,
        origin_detection_enabled=False,
        constant_tags=["service:checkout"],
    )
    try:
        for _ in range(6):
            dd.increment("dd.hits", tags=["env:dev", "team:payments"])
        dd.increment("dd.hits", 2, tags=["env:prod", "team:payments"], sample_rate=0.5)  # counts 4
        dd.gauge("dd.queue.depth", 17, tags=["env:dev"])
        dd.histogram("dd.payload.size", 512, tags=["env:dev"])
        dd.histogram("dd.payload.size", 2048, tags=["env:dev"])
        dd.distribution("dd.render", 3.5, tags=["env:dev"])
        dd.timing("dd.db.query", 40, tags=["env:dev"])
        dd.flush()
    finally:
        dd.close_socket()

    base = 'service="checkout",team="payments"'
    prometheus.wait_value(f'dd_hits_total{{env="dev",{base}}}', 6)
    prometheus.wait_value(f'dd_hits_total{{env="prod",{base}}}', 4)
    prometheus.wait_value('dd_queue_depth{env="dev",service="checkout"}', 17)
    prometheus.wait_value('dd_payload_size_count{env="dev"}', 2)
    prometheus.wait_value('dd_payload_size_sum{env="dev"}', 2560)
    prometheus.wait_value('dd_render_count{env="dev"}', 1)
    prometheus.wait_value('dd_db_query_seconds_sum{env="dev"}', 0.04)
    wait_pull(agent, "dd_hits_total", {"env": "dev", "service": "checkout", "team": "payments"}, 6)
    wait_pull(agent, "dd_queue_depth", {"env": "dev", "service": "checkout"}, 17)


def test_netcat_line_from_readme(agent: AgentProcess) -> None:
    """The README's check: `echo "hits:1|c|#env:dev" | nc -u -w0 127.0.0.1 8125`
    shows hits_total{env="dev"} 1 on the pull endpoint."""
    subprocess.run(
        ["nc", "-u", "-w0", "127.0.0.1", str(agent.ports["statsd"])], input=b"hits:1|c|#env:dev\n", check=True
    )
    wait_pull(agent, "hits_total", {"env": "dev"}, 1)
    _, body = http_get(agent.url("pull", "/metrics"))
    assert 'hits_total{env="dev"} 1\n' in body


def test_bad_lines_are_refused_and_counted_while_good_ones_count(
    agent: AgentProcess, prometheus: PrometheusServer
) -> None:
    packet = b"\n".join(
        [b"good:1|c", b"bad:1_000|c", b"nan:nan|g", b"rate:1|c|@2", b"good:2|c", b"\xff\xfe:1|c", b":1|c"]
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(packet, ("127.0.0.1", agent.ports["statsd"]))
    prometheus.wait_value("good_total", 3)
    wait_for_peer(
        lambda: agent.self_metric("headwater_receiver_refused_points_total") >= 5, "refused lines counted"
    )


def test_sigterm_flushes_and_exports_everything(
    prometheus: PrometheusServer, start_agent: Callable[..., AgentProcess]
) -> None:
    ports = {"statsd": free_tcp_udp_port(), "pull": free_port(), "telemetry": free_port()}
    config = CONFIG.format(write_url=prometheus.write_url, **ports).replace(
        "flush_interval: 1s", "flush_interval: 1h"
    )
    agent = start_agent(config, ports)
    client = statsd.TCPStatsClient("127.0.0.1", ports["statsd"])
    client.connect()
    for _ in range(25):
        client.incr("before_shutdown")
    client.close()
    # TCP delivery is in order and complete once the agent has read it; wait until it has been counted.
    wait_for_peer(
        lambda: agent.self_metric("headwater_receiver_accepted_points_total") >= 25, "lines received"
    )
    assert agent.stop(signal.SIGTERM) == 0, agent.logs()
    prometheus.wait_value("before_shutdown_total", 25)
    assert "stopped" in agent.logs()
