"""``headwater selftest`` against a locally started agent (a subprocess on free ports)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.cli import main
from agent.selftest import Selftest, SelftestOptions, otlp_gauge_request
from tests.integration.conftest import ROOT, AgentProcess, free_tcp_udp_port, start_agent

__all__ = ["start_agent"]  # the fixture, imported so that pytest finds it here

pytestmark = pytest.mark.integration

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    flush_interval: 1s
{otlp}
exporters:
  prometheus:
    endpoint: 127.0.0.1:{prometheus}
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [{receivers}]
      exporters: [prometheus]
"""


def _agent(start_agent, with_otlp: bool) -> AgentProcess:  # type: ignore[no-untyped-def]
    ports = {name: free_tcp_udp_port() for name in ("statsd", "otlp_http", "prometheus", "telemetry")}
    otlp = f"  otlp:\n    grpc: null\n    http: 127.0.0.1:{ports['otlp_http']}\n" if with_otlp else ""
    config = CONFIG.format(otlp=otlp, receivers="statsd, otlp" if with_otlp else "statsd", **ports)
    return start_agent(config, ports)  # type: ignore[no-any-return]


def _selftest_cli(agent: AgentProcess, timeout: str) -> subprocess.CompletedProcess[str]:
    p = agent.ports
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "selftest",
            "--target",
            "127.0.0.1",
            "--statsd-port",
            str(p["statsd"]),
            "--otlp-http-port",
            str(p["otlp_http"]),
            "--telemetry-port",
            str(p["telemetry"]),
            "--prometheus-port",
            str(p["prometheus"]),
            "--timeout",
            timeout,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_selftest_passes_against_a_running_agent(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = _agent(start_agent, with_otlp=True)
    done = _selftest_cli(agent, "30s")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "ok   readyz" in out and "ok   statsd" in out and "ok   otlp_http" in out
    assert "passed" in out
    # The series it reported really are on the agent's pull endpoint, and the agent counted them in.
    from tests.integration.conftest import http_get

    _, page = http_get(agent.url("prometheus", "/metrics"))
    assert "headwater_selftest_otlp_" in page and '_total{headwater_selftest="1"}' in page
    assert agent.self_metric("headwater_receiver_accepted_points_total") >= 2
    assert agent.stop() == 0


def test_selftest_names_what_did_not_arrive(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = _agent(start_agent, with_otlp=False)  # nothing listens on the OTLP port
    done = _selftest_cli(agent, "4s")
    assert done.returncode == 1, done.stdout
    assert "ok   statsd" in done.stdout
    assert "FAIL otlp_http" in done.stdout and "/v1/metrics" in done.stdout
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith("headwater selftest: FAILED after ") and verdict.endswith(": otlp_http")


def test_selftest_without_an_agent_fails_on_readiness(capsys) -> None:  # type: ignore[no-untyped-def]
    telemetry = free_tcp_udp_port()
    code = main(["selftest", "--target", "127.0.0.1", "--telemetry-port", str(telemetry), "--timeout", "1s"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"FAIL readyz: http://127.0.0.1:{telemetry}/readyz" in out
    assert "FAILED" in out and "readyz" in out.rsplit("FAILED", 1)[1]


def test_selftest_rejects_bad_arguments(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["selftest", "--target", "x", "--timeout", "soon"]) == 2
    assert "'soon' is not a duration" in capsys.readouterr().err
    assert main(["selftest", "--target", "x", "--prometheus-port", "0"]) == 2
    assert main(["selftest", "--target", "x", "--statsd-port", "70000"]) == 2


def test_otlp_request_decodes_with_the_generated_classes() -> None:
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

    req = metrics_service_pb2.ExportMetricsServiceRequest()
    req.ParseFromString(otlp_gauge_request("probe", 2.5, 123))
    metric = req.resource_metrics[0].scope_metrics[0].metrics[0]
    assert metric.name == "probe"
    assert metric.gauge.data_points[0].as_double == 2.5
    assert metric.gauge.data_points[0].time_unix_nano == 123
    assert req.resource_metrics[0].resource.attributes[0].value.string_value == "headwater-selftest"


def test_selftest_gives_up_at_the_deadline_with_a_fake_clock() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += max(s, 0.5)

    closed = free_tcp_udp_port()
    opts = SelftestOptions(
        target="127.0.0.1",
        statsd_port=0,
        otlp_http_port=0,
        telemetry_port=closed,
        prometheus_port=closed,
        timeout_s=5.0,
    )
    result = Selftest(opts, clock=lambda: now[0], sleep=sleep).run()
    assert not result.ok
    assert [c.name for c in result.checks] == ["readyz"]
    assert 5.0 <= now[0] <= 6.5  # stopped at the deadline, not before, not much after


def test_selftest_survives_a_malformed_http_answer(capsys) -> None:  # type: ignore[no-untyped-def]
    """An endpoint answering garbage (BadStatusLine, an http.client error that is not an OSError) is a
    failed check, retried until the deadline, never a traceback."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    stop = threading.Event()

    def answer_garbage() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"not http at all\r\n\r\n")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        code = main(["selftest", "--target", "127.0.0.1", "--telemetry-port", str(port), "--timeout", "2s"])
    finally:
        stop.set()
        thread.join(5)
        server.close()
    out = capsys.readouterr().out
    assert code == 1
    assert f"FAIL readyz: http://127.0.0.1:{port}/readyz: BadStatusLine" in out
