"""StatsD → tenant → sample → percentiles → threshold → remote-write into a real Prometheus, configured
from YAML as a user would; the threshold's webhook fires at a local HTTP server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
import pytest

from tests.conftest import free_port
from tests.integration.conftest import AgentProcess, PrometheusServer, wait_for_peer

pytestmark = pytest.mark.integration

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    flush_interval: 1s
processors:
  tenant:
    static: team-a
  sample:
    rate: 1.0
  percentiles:
    windows: [1m]
    quantiles: [0.5, 0.99]
    slice_interval: 1s
    emit_interval: 1s
  threshold/latency:
    rules:
      - name: api_latency_p99
        metric: api.latency
        statistic: percentile
        quantile: 0.99
        window: 1m
        op: ">"
        warning: 0.1
        for: 0s
    evaluation_interval: 1s
    group_wait: 0s
    webhook: {{url: "http://127.0.0.1:{webhook}/hook"}}
exporters:
  prometheus_remote_write:
    endpoint: {write_url}
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [statsd]
      processors: [tenant, sample, percentiles, threshold/latency]
      exporters: [prometheus_remote_write]
"""


class Webhook:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def test_the_four_processors_from_yaml(
    prometheus: PrometheusServer, webhook: Webhook, start_agent: Callable[..., AgentProcess]
) -> None:
    ports = {"statsd": free_port(socket.SOCK_DGRAM), "telemetry": free_port()}
    config = CONFIG.format(write_url=prometheus.write_url, webhook=webhook.port, **ports)
    agent = start_agent(config, ports)
    rng = np.random.default_rng(7)
    values_ms = rng.lognormal(mean=4.0, sigma=0.6, size=400)  # ~55 ms median, p99 ~ 220 ms
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for chunk in np.array_split(values_ms, 20):
            s.sendto(
                "\n".join(f"api.latency:{v:.3f}|ms" for v in chunk).encode(), ("127.0.0.1", ports["statsd"])
            )
    received = agent.self_metric("headwater_receiver_accepted_points_total")
    expected_p99 = float(np.percentile(values_ms / 1000.0, 99, method="inverted_cdf"))
    expr = 'api_latency_quantile_seconds{quantile="0.99",window="1m",tenant_id="team-a"}'

    def p99() -> float | None:
        v = prometheus.value(expr)
        return v if v is not None and abs(v - expected_p99) <= 0.011 * expected_p99 else None

    got = wait_for_peer(p99, "p99 gauge in Prometheus")
    assert got == pytest.approx(expected_p99, rel=0.011), (received, got)
    # The timer itself arrives too, with the tenant label.
    assert prometheus.wait_value('api_latency_seconds_count{tenant_id="team-a"}', 400.0) == 400.0

    def firing() -> list[dict[str, Any]] | None:
        alerts = [a for b in webhook.bodies for a in b.get("alerts", []) if a.get("status") == "firing"]
        return alerts or None

    (alert, *_) = wait_for_peer(firing, "a firing webhook")  # p99 ~0.2 s is over the 0.1 s warning level
    assert alert["labels"]["alertname"] == "api_latency_p99"
    assert any("text" in b for b in webhook.bodies)  # Slack-compatible
    assert agent.self_metric("headwater_alert_state") >= 1
