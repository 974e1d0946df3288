"""``headwater test`` as a library: the README's processors example tested on simulated time — tenant
labels ``team:pay`` traffic ``pay``, sample keeps ``billing.*``, the latency rule fires at 1 s and not at
0.4 s, remote-write carries ``http_requests_total`` with the dashboards' labels — and a changed config
making a test fail with the expected item next to the nearest observed ones; the test-file refusals;
JUnit and golden (``--update``) output."""

from __future__ import annotations

import asyncio
import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import pipeline_test
from agent.config import AgentConfig, build_config
from agent.pipeline_test.model import TestFileError, parse
from agent.registry import builtin_factories
from tests.conftest import Certs

README_PROCESSORS: dict[str, Any] = {
    "receivers": {"statsd": {"udp": "127.0.0.1:8125", "flush_interval": "10s"}},
    "processors": {
        "tenant": {"from_label": "team", "default": "anonymous"},
        "sample": {
            "rate": 0.1,
            "rules": [
                {"match": "billing.*", "rate": 1},
                {"match": "http.*", "rate": 1},
                {"match": "api.*", "rate": 1},
            ],
        },
        "threshold/latency": {
            "rules": [
                {
                    "name": "api_p99",
                    "metric": "api.latency",
                    "statistic": "percentile",
                    "quantile": 0.99,
                    "window": "5m",
                    "op": ">",
                    "warning": 0.5,
                    "critical": 1.0,
                    "resolve": 0.4,
                    "for": "2m",
                }
            ],
            "webhook": {"url": "http://slack.invalid/hook"},
            "alertmanager": {"url": "http://alertmanager.invalid:9093"},
        },
    },
    "exporters": {"prometheus_remote_write": {"endpoint": "http://mimir.invalid:8080/api/v1/push"}},
    "service": {
        "pipelines": {
            "metrics": {
                "receivers": ["statsd"],
                "processors": ["tenant", "sample", "threshold/latency"],
                "exporters": ["prometheus_remote_write"],
            }
        }
    },
}

TESTS = """
version: 1
tests:
  - name: pay traffic is labelled pay and reaches remote-write as http_requests_total
    inputs:
      - {at: 0s, receiver: statsd, statsd: ["http.requests:3|c|#team:pay,route:/charge,code:200"]}
    run_for: 10s
    expect:
      - {at: processor/tenant, metric: http.requests, labels: {tenant_id: pay}, value: 3, type: sum}
      - at: exporter/prometheus_remote_write
        metric: http_requests_total
        labels: {tenant_id: pay, route: /charge, code: "200"}
        value: 3
        count: 1
  - name: sample keeps every billing series
    inputs:
      - {at: 0s, receiver: statsd, statsd: ["billing.charge:1|c|#id:1", "billing.charge:1|c|#id:2",
                                             "billing.charge:1|c|#id:3", "billing.charge:1|c|#id:4"]}
    run_for: 10s
    expect:
      - {at: processor/sample, metric: billing.charge, count: 4}
  - name: the latency rule fires at 1 s
    inputs:
      - {at: 0s, receiver: statsd, statsd: ["api.latency:1000|ms", "api.latency:1100|ms"]}
      - {at: 60s, receiver: statsd, statsd: ["api.latency:1100|ms"]}
      - {at: 120s, receiver: statsd, statsd: ["api.latency:1200|ms"]}
    run_for: 3m
    expect:
      - {alert: api_p99, status: firing, labels: {severity: critical}}
  - name: the latency rule does not fire at 0.4 s
    inputs:
      - {at: 0s, receiver: statsd, statsd: ["api.latency:400|ms"]}
      - {at: 60s, receiver: statsd, statsd: ["api.latency:400|ms"]}
      - {at: 120s, receiver: statsd, statsd: ["api.latency:400|ms"]}
    run_for: 3m
    expect:
      - {alert: api_p99, status: firing, count: 0}
"""


def _config(data: dict[str, Any]) -> AgentConfig:
    return build_config(data, builtin_factories())


def _run(tmp_path: Path, data: dict[str, Any], tests: str = TESTS, **kw: Any) -> tuple[int, str]:
    path = tmp_path / "pipeline.tests.yaml"
    if not path.exists():
        path.write_text(tests)
    out = io.StringIO()
    code = pipeline_test.main(_config(data), [str(path)], out, **kw)
    return code, out.getvalue()


def test_the_readme_processors_example_passes_its_tests(tmp_path: Path) -> None:
    code, out = _run(tmp_path, README_PROCESSORS)
    assert code == 0, out
    assert out.count("PASSED") == 4
    assert "4 passed" in out


def test_a_changed_config_fails_with_the_expected_item_beside_the_nearest_observed(tmp_path: Path) -> None:
    changed = yaml.safe_load(yaml.safe_dump(README_PROCESSORS))
    changed["processors"]["tenant"]["from_label"] = "squad"  # the dashboards' tenant label breaks
    code, out = _run(tmp_path, changed)
    assert code == 1
    assert "pay traffic is labelled pay and reaches remote-write as http_requests_total FAILED" in out
    assert 'expected: processor/tenant: http.requests {tenant_id="pay", ...}' in out
    assert "observed: 0 matching of 1 points at processor/tenant" in out
    # The nearest observed item shows what the change did: the tenant fell back to the default.
    assert 'http.requests{code="200", route="/charge", team="pay", tenant_id="anonymous"} 3 (sum)' in out
    assert 'http_requests_total{code="200", route="/charge", team="pay", tenant_id="anonymous"} 3' in out
    assert "1 failed" in out and "3 passed" in out


def test_a_higher_critical_threshold_makes_the_firing_test_fail(tmp_path: Path) -> None:
    changed = yaml.safe_load(yaml.safe_dump(README_PROCESSORS))
    changed["processors"]["threshold/latency"]["rules"][0]["critical"] = 2.0
    code, out = _run(tmp_path, changed)
    assert code == 1
    assert "the latency rule fires at 1 s FAILED" in out
    assert 'expected: alerts: alert api_p99 status=firing {severity="critical", ...}' in out
    # It still fires, at warning: the nearest notification says so.
    assert 'alert api_p99 firing {alertname="api_p99", metric="api.latency", severity="warning"' in out


def test_junit_names_each_test_and_carries_the_diff(tmp_path: Path) -> None:
    changed = yaml.safe_load(yaml.safe_dump(README_PROCESSORS))
    changed["processors"]["sample"]["rules"] = [{"match": "http.*", "rate": 1}, {"match": "api.*", "rate": 1}]
    changed["processors"]["sample"]["rate"] = 0.000001
    junit = tmp_path / "out.xml"
    code, _ = _run(tmp_path, changed, junit_path=str(junit))
    assert code == 1
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "4" and suite.get("failures") == "1"
    failed = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["sample keeps every billing series"]
    text = failed[0].find("failure").text or ""  # type: ignore[union-attr]
    assert "expected: processor/sample: billing.charge count=4" in text
    assert "observed: 0 matching of 0 points at processor/sample" in text


def test_update_writes_the_observed_outputs_and_they_pass_next_time(tmp_path: Path) -> None:
    code, out = _run(tmp_path, README_PROCESSORS, update=True)
    assert code == 0, out
    written = yaml.safe_load((tmp_path / "pipeline.tests.yaml").read_text())
    assert written["version"] == 1
    first = written["tests"][0]
    assert first["inputs"][0]["statsd"] == ["http.requests:3|c|#team:pay,route:/charge,code:200"]
    assert {
        "at": "exporter/prometheus_remote_write",
        "metric": "http_requests_total",
        "labels": {"code": "200", "route": "/charge", "team": "pay", "tenant_id": "pay"},
        "value": 3.0,
        "labels_exact": True,
        "count": 1,
    } in first["expect"]
    fires = written["tests"][2]["expect"]
    assert any(e.get("alert") == "api_p99" and e["labels"]["severity"] == "critical" for e in fires)
    code, out = _run(tmp_path, README_PROCESSORS)
    assert code == 0, out


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("version: 2\ntests: [{name: a, inputs: []}]", "version: this headwater reads version 1, got 2"),
        (
            "version: 1\ntests: [{name: a, inputs: [{receiver: statsd}]}]",
            "give exactly one of statsd, json, otlp",
        ),
        (
            "version: 1\ntests: [{name: a, inputs: [{at: soon, receiver: statsd, statsd: [x]}]}]",
            "tests[0].inputs[0].at: expected a duration such as 2s, 500ms or 1h30m, got 'soon'",
        ),
        (
            "version: 1\ntests: [{name: a, inputs: [], expect: [{at: out, metric: m}]}]",
            "expected processor/<id>",
        ),
        (
            "version: 1\ntests: [{name: a, inputs: [], expect: [{metric: m, colour: red}]}]",
            "colour: unknown key",
        ),
        (
            "version: 1\ntests: [{name: a, inputs: [{receiver: http, jwt: acme, json: []}]}]",
            "tests[0].inputs[0].jwt: expected a mapping of claims such as {org_id: acme}",
        ),
        (
            "version: 1\ntests: [{name: a, inputs: [{receiver: http, path: metrics, json: []}]}]",
            "tests[0].inputs[0].path: expected a route such as /api/metrics/commands, got 'metrics'",
        ),
        (
            "version: 1\ntests: [{name: a, inputs: [{receiver: http, jwt: {sub: a},"
            " headers: {authorization: x}, json: []}]}]",
            "tests[0].inputs[0]: give jwt or an Authorization header, not both",
        ),
    ],
)
def test_a_bad_test_file_is_refused_naming_the_place(text: str, problem: str) -> None:
    with pytest.raises(TestFileError) as caught:
        parse(text, "t.yaml")
    assert problem in str(caught.value)


def test_an_input_for_a_receiver_no_pipeline_has_fails_the_test_naming_it(tmp_path: Path) -> None:
    tests = "version: 1\ntests: [{name: a, inputs: [{receiver: statsd/other, statsd: ['x:1|c']}]}]"
    code, out = _run(tmp_path, README_PROCESSORS, tests)
    assert code == 1
    assert "inputs[0]: no metrics pipeline takes receiver statsd/other (known: statsd)" in out


OTLP_HTTP: dict[str, Any] = {
    "receivers": {"statsd": {"udp": "127.0.0.1:8125", "flush_interval": "10s"}},
    "processors": {"attributes": {"actions": [{"key": "env", "value": "prod", "action": "insert"}]}},
    "exporters": {"otlp_http": {"endpoint": "https://otel.invalid:4318"}},
    "service": {
        "pipelines": {
            "metrics": {"receivers": ["statsd"], "processors": ["attributes"], "exporters": ["otlp_http"]}
        }
    },
}


def test_otlp_http_requests_are_decoded_with_the_opentelemetry_proto_classes(tmp_path: Path) -> None:
    tests = """
version: 1
tests:
  - name: counters and timers leave as OTLP sums and histograms
    inputs:
      - {at: 0s, receiver: statsd, statsd: ["jobs.done:5|c|#queue:mail", "job.time:300|ms"]}
    run_for: 10s
    expect:
      - {at: exporter/otlp_http, metric: jobs.done, labels: {queue: mail, env: prod}, type: sum, value: 5}
      - {at: exporter/otlp_http, metric: job.time, labels: {env: prod}, type: histogram, value: 1}
"""
    code, out = _run(tmp_path, OTLP_HTTP, tests)
    assert code == 0, out
    broken = yaml.safe_load(yaml.safe_dump(OTLP_HTTP))
    broken["processors"]["attributes"]["actions"][0]["value"] = "staging"
    code, out = _run(tmp_path, broken, tests)
    assert code == 1
    # As sent: the attributes, and the resource's as resource.<key>.
    assert (
        'jobs.done{env="staging", queue="mail", resource.service.name="unknown_service:headwater"} 5 (sum)'
        in out
    )


AGGREGATE: dict[str, Any] = {
    "receivers": {"statsd": {"udp": "127.0.0.1:8125", "flush_interval": "10s"}},
    "processors": {
        "aggregate": {"rules": [{"match": ["http.requests"], "intervals": ["1m"], "outputs": ["sum"]}]}
    },
    "exporters": {"debug": {}},
    "service": {
        "pipelines": {
            "metrics": {"receivers": ["statsd"], "processors": ["aggregate"], "exporters": ["debug"]}
        }
    },
}


def test_window_ends_pass_on_simulated_time_at_the_exact_instant(tmp_path: Path) -> None:
    # The 1m window closes at 60 s of simulated time: nothing of it leaves by 59 s, one sum by 60 s —
    # the five StatsD flushes at 10 s … 50 s (the one at 60 s lands in the next window).
    tests = """
version: 1
tests:
  - name: one sum per minute
    inputs:
      - {at: 5s, every: 10s, times: 6, receiver: statsd, statsd: ["http.requests:1|c"]}
    run_for: 2m
    expect:
      - {at: processor/aggregate, metric: http.requests.1m.sum, count: 0, by: 59s}
      - {at: processor/aggregate, metric: http.requests.1m.sum, value: 5, count: 1, by: 60s}
      - {at: exporter/debug, metric: http.requests.1m.sum, value: 5, count: 1, by: 60s}
"""
    code, out = _run(tmp_path, AGGREGATE, tests)
    assert code == 0, out


def test_no_output_at_all_is_expressed_by_count_zero_without_a_metric(tmp_path: Path) -> None:
    tests = """
version: 1
tests:
  - name: the sample processor drops series it does not keep
    inputs:
      - {at: 0s, receiver: statsd, statsd: ["misc.a:1|c", "misc.b:1|c"]}
    expect:
      - {at: processor/sample, count: 0}
"""
    dropping = yaml.safe_load(yaml.safe_dump(README_PROCESSORS))
    dropping["processors"]["sample"]["rate"] = 0.000001
    code, out = _run(tmp_path, dropping, tests)
    assert code == 0, out
    keeping = yaml.safe_load(yaml.safe_dump(README_PROCESSORS))
    keeping["processors"]["sample"]["rate"] = 1
    code, out = _run(tmp_path, keeping, tests)
    assert code == 1
    assert "expected: processor/sample: any metric count=0" in out
    assert "observed: 2 matching of 2 points at processor/sample" in out


def test_json_requests_carry_their_headers_to_the_receiver(tmp_path: Path) -> None:
    data = yaml.safe_load(yaml.safe_dump(README_PROCESSORS))
    data["receivers"]["http"] = {"endpoint": "127.0.0.1:8080"}
    data["service"]["pipelines"]["metrics"]["receivers"].append("http")
    data["processors"]["tenant"] = {"header": "x-scope-orgid"}
    tests = """
version: 1
tests:
  - name: the X-Scope-OrgID header names the tenant
    inputs:
      - {at: 0s, receiver: http, headers: {X-Scope-OrgID: pay}, json: [{name: http.jobs, value: 3}]}
      - {at: 0s, receiver: http, json: [{name: http.jobs, value: 4}]}
    expect:
      - {at: exporter/prometheus_remote_write, metric: http_jobs, labels: {tenant_id: pay}, value: 3}
      - {at: exporter/prometheus_remote_write, metric: http_jobs, labels: {tenant_id: anonymous}, value: 4}
"""
    code, out = _run(tmp_path, data, tests)
    assert code == 0, out


SECRET = "s" * 32


def _events(jwt: dict[str, Any]) -> dict[str, Any]:
    """An http receiver with an events route behind JWT auth, the tenant from the org_id claim."""
    receiver = {
        "endpoint": "127.0.0.1:8081",
        "auth": {"jwt": {"tenant_claim": "org_id", **jwt}},
        "routes": [{"path": "/api/commands", "mapping": "commands"}],
        "mappings": {
            "commands": {
                "labels": ["command_name"],
                "metrics": [{"name": "command_executions_total", "type": "counter"}],
            }
        },
    }
    return {
        "receivers": {"http/events": receiver},
        "processors": {"tenant": {}},
        "exporters": {"prometheus_remote_write": {"endpoint": "http://mimir.invalid:8080/api/v1/push"}},
        "service": {
            "pipelines": {
                "metrics": {
                    "receivers": ["http/events"],
                    "processors": ["tenant"],
                    "exporters": ["prometheus_remote_write"],
                }
            }
        },
    }


JWT_TESTS = """
version: 1
tests:
  - name: the runner signs the claims with the receiver's secret
    inputs:
      - at: 0s
        receiver: http/events
        path: /api/commands
        jwt: {org_id: acme}
        json: [{command_name: deploy}, {command_name: deploy}]
    expect:
      - at: exporter/prometheus_remote_write
        metric: command_executions_total
        labels: {command_name: deploy, tenant_id: acme}
        value: 2
"""


def test_jwt_claims_become_a_token_signed_with_the_receivers_secret(tmp_path: Path) -> None:
    jwt = {"algorithms": ["HS256"], "secret": SECRET, "audience": "headwater", "issuer": "idp"}
    code, out = _run(tmp_path, _events(jwt), JWT_TESTS)
    assert code == 0, out


def test_an_input_without_its_token_is_answered_401_and_the_test_fails(tmp_path: Path) -> None:
    tests = JWT_TESTS.replace("        jwt: {org_id: acme}\n", "")
    code, out = _run(tmp_path, _events({"algorithms": ["HS256"], "secret": SECRET}), tests)
    assert code == 1
    assert "tests[0].inputs[0]: http/events answered 401" in out


def test_jwt_claims_for_a_receiver_verifying_with_a_public_key_are_refused_naming_why(
    tmp_path: Path, tls_certs: Certs
) -> None:
    jwt = {"algorithms": ["RS256"], "key_file": tls_certs.cert}
    code, out = _run(tmp_path, _events(jwt), JWT_TESTS)
    assert code == 1
    assert "inputs[0].jwt: http/events verifies RS256 with a public key the runner cannot sign with" in out


OTLP_GRPC: dict[str, Any] = {
    "receivers": {"statsd": {"udp": "127.0.0.1:8125", "flush_interval": "10s"}},
    "exporters": {
        "otlp/collector": {
            "endpoint": "collector.invalid:4317",  # TLS on: the runner's plaintext capture replaces it
            "deployment_environment": "prod",
            "resource": {"team": "pay"},
        }
    },
    "service": {"pipelines": {"metrics": {"receivers": ["statsd"], "exporters": ["otlp/collector"]}}},
}


def test_otlp_grpc_export_calls_are_decoded_with_their_resource_as_sent(tmp_path: Path) -> None:
    tests = """
version: 1
tests:
  - name: the resource settings reach the wire
    inputs:
      - {at: 0s, receiver: statsd, statsd: ["jobs.done:5|c|#queue:mail"]}
    run_for: 10s
    expect:
      - at: exporter/otlp/collector
        metric: jobs.done
        labels: {queue: mail, resource.team: pay, resource.deployment.environment: prod}
        type: sum
        value: 5
"""
    code, out = _run(tmp_path, OTLP_GRPC, tests)
    assert code == 0, out
    broken = yaml.safe_load(yaml.safe_dump(OTLP_GRPC))
    broken["exporters"]["otlp/collector"]["resource"] = {"team": "ops"}
    code, out = _run(tmp_path, broken, tests)
    assert code == 1
    assert 'resource.team="ops"' in out


async def test_the_capture_server_keeps_an_sdk_exporters_grpc_call_under_its_metadata_place() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource

    from agent.pipeline_test.capture import CAPTURE_METADATA, CaptureServer, decode_otlp

    capture = CaptureServer()
    await capture.start()
    try:
        reader = InMemoryMetricReader()
        provider = MeterProvider(resource=Resource({"service.name": "shop"}), metric_readers=[reader])
        provider.get_meter("t").create_counter("orders").add(3, {"region": "eu"})
        data = reader.get_metrics_data()
        assert data is not None
        exporter = OTLPMetricExporter(
            endpoint=capture.grpc_target, insecure=True, headers={CAPTURE_METADATA: "/t0/otlp"}
        )
        # The SDK exporter blocks: run it off the loop, as the loop-block guard asks.
        await asyncio.to_thread(exporter.export, data)
        await asyncio.to_thread(exporter.shutdown)
        provider.shutdown()
    finally:
        await capture.stop()
    [request] = capture.under("/t0/otlp")
    assert request.path == "/t0/otlp/v1/metrics"
    [point] = decode_otlp(request)
    assert (point.metric, point.type, point.value) == ("orders", "sum", 3.0)
    assert ("resource.service.name", "shop") in point.labels
    assert ("region", "eu") in point.labels


FORWARDED: dict[str, Any] = {
    "receivers": {"statsd": {"udp": "127.0.0.1:8125", "flush_interval": "10s"}},
    "processors": {
        "aggregate": {"rules": [{"match": ["http.requests"], "intervals": ["1m"], "outputs": ["sum"]}]},
        "attributes": {"actions": [{"key": "env", "value": "prod", "action": "insert"}]},
    },
    "connectors": {"forward": {}},
    "exporters": {"debug": {}},
    "service": {
        "pipelines": {
            "metrics/in": {"receivers": ["statsd"], "processors": ["aggregate"], "exporters": ["forward"]},
            "metrics/out": {"receivers": ["forward"], "processors": ["attributes"], "exporters": ["debug"]},
        }
    },
}


def test_a_connector_feeds_the_pipelines_that_receive_from_it(tmp_path: Path) -> None:
    # Both the sum the window closes at 60 s and the one the end of the test sends from the open
    # window pass the connector and the downstream pipeline's processor.
    tests = """
version: 1
tests:
  - name: through forward to metrics/out
    inputs:
      - {at: 5s, every: 10s, times: 8, receiver: statsd, statsd: ["http.requests:1|c"]}
    run_for: 90s
    expect:
      - {at: connector/forward, metric: http.requests.1m.sum, value: 5, count: 1, by: 60s}
      - {at: processor/attributes, metric: http.requests.1m.sum, labels: {env: prod}, value: 5, by: 60s}
      - {at: exporter/debug, metric: http.requests.1m.sum, labels: {env: prod}, value: 5, count: 1, by: 60s}
      - {at: exporter/debug, metric: http.requests.1m.sum, labels: {env: prod}, value: 3}
"""
    code, out = _run(tmp_path, FORWARDED, tests)
    assert code == 0, out
