"""dashboards/headwater.json: a Grafana dashboard that parses, whose every PromQL expression is valid
(promtool parses it) and reads only metrics that a running agent exposes — the agent started in-process
from config.example.yaml (ports made free, a remote-write exporter added), fed StatsD lines by the
statsd client and JSON by aiohttp, its backend failing once retryably and once for good, and its
/metrics scraped from the admin endpoint — and by a real Prometheus, in which every panel's query then
shows data."""

from __future__ import annotations

import gc
import json
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import statsd
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from agent.admin import AdminServer
from agent.config import build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port, wait_until
from tests.exporters.conftest import serve
from tests.integration.conftest import ROOT, PrometheusServer, free_tcp_udp_port

DASHBOARD = ROOT / "dashboards" / "headwater.json"

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}
"""What Grafana puts in for the dashboard's variables, to hand the expressions to promtool."""

_NOT_NAMES = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_NOT_NAMES |= {"offset", "inf", "nan"}


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def expressions(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["query"]["query"])
            assert m, f"variable {var['name']}: not a label_values(metric, label) query"
            exprs.append(m.group(1))
    return exprs


def promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not inside a string, a label
    matcher, a range, a by/without/on/ignoring list, and are neither a function nor a keyword."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[m.end() :].lstrip().startswith("(") or m.group().lower() in _NOT_NAMES:
            continue
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "."):
            continue  # the exponent of a number (1e3)
        names.add(m.group())
    return names


async def _nonempty(results: Any) -> bool:
    return bool(await results)


def test_the_name_reader_finds_what_an_expression_reads() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (exporter, le) (rate(headwater_x_seconds_bucket{a="b", c=~"$i"}'
        "[$__rate_interval]))) / on (exporter) group_left headwater_y 1e3 > bool 0"
    )
    assert metric_names(expr) == {"headwater_x_seconds_bucket", "headwater_y"}


def test_the_dashboard_is_grafana_shaped() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run ./scripts/install-test-deps (make install)")
    exprs = expressions(json.loads(DASHBOARD.read_text()))
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:expr_{i}", "expr": promql(e)} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


class Backend:
    """Remote-write backend: answers 503 (retried), then 400 (dropped), then 204 to everything."""

    def __init__(self) -> None:
        self.script = [503, 400]
        self.delivered = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.script:
            return web.Response(status=self.script.pop(0), text="scripted")
        self.delivered += 1
        return web.Response(status=204)


@pytest.fixture
async def backend_url() -> AsyncIterator[tuple[Backend, str]]:
    backend = Backend()
    app = web.Application()
    app.router.add_post("/api/v1/write", backend.handle)
    runner, port = await serve(app)
    yield backend, f"http://127.0.0.1:{port}/api/v1/write"
    await runner.cleanup()


def scrape(prometheus: PrometheusServer, port: int) -> None:
    """Point ``prometheus`` at the agent's endpoint (every 250 ms) and have it reload its config."""
    config = {
        "global": {"scrape_interval": "250ms", "scrape_timeout": "250ms", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "headwater", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }
    (prometheus.log_path.parent / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus.proc.send_signal(signal.SIGHUP)


async def query(session: aiohttp.ClientSession, prometheus: PrometheusServer, expr: str) -> list[Any]:
    async with session.get(f"{prometheus.url}/api/v1/query", params={"query": expr}) as resp:
        data = await resp.json()
    assert resp.status == 200 and data["status"] == "success", (expr, data)
    return list(data["data"]["result"])


async def test_every_metric_the_dashboard_reads_is_exposed_by_a_running_agent(
    backend_url: tuple[Backend, str], prometheus: PrometheusServer
) -> None:
    backend, url = backend_url
    data = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    statsd_port, http_port = free_tcp_udp_port(), free_port()
    data["receivers"]["statsd"].update(
        udp=f"127.0.0.1:{statsd_port}", tcp=f"127.0.0.1:{statsd_port}", flush_interval="100ms"
    )
    data["receivers"]["http"]["endpoint"] = f"127.0.0.1:{http_port}"
    # The agent runs inside pytest: its memory_limiter would measure the whole test process (past
    # the example's 512MiB late in a full run) and refuse the traffic this test needs.
    data["processors"]["memory_limiter"]["limit"] = "8GiB"
    data["exporters"]["prometheus"]["endpoint"] = f"127.0.0.1:{free_port()}"
    data["exporters"]["prometheus_remote_write"] = {
        "endpoint": url,
        "retry_on_failure": {"initial_interval": "10ms", "max_interval": "50ms"},
    }
    for pipeline in data["service"]["pipelines"].values():
        pipeline["exporters"].append("prometheus_remote_write")
    agent = Agent(build_config(data, builtin_factories()))
    admin = AdminServer(agent, "127.0.0.1:0")
    await agent.start()
    try:
        await admin.start()
        client = statsd.StatsClient("127.0.0.1", statsd_port, prefix="app")
        for i in range(3):
            client.incr("requests", 1 + i)
            client.timing("latency", 12.5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"no value here\n", ("127.0.0.1", statsd_port))  # refused: a reason to count
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                body = {"name": "jobs", "value": i}
                async with session.post(f"http://127.0.0.1:{http_port}/v1/metrics", json=body) as resp:
                    assert resp.status == 200
            tel = agent.telemetry
            await wait_until(lambda: backend.delivered >= 2 and not backend.script, "remote-write delivered")
            await wait_until(lambda: tel.value("receiver_refused_points_total") >= 1, "the bad line refused")
            await wait_until(lambda: tel.value("event_loop_lag_seconds") >= 1, "the loop watched")
            gc.collect()
            async with session.get(f"http://127.0.0.1:{admin.port}/metrics") as resp:
                text = await resp.text()
            # The same agent scraped by Prometheus: every query of every panel shows data (a rate needs
            # two scrapes; a histogram_quantile of no new observations shows NaN, which is data too).
            scrape(prometheus, admin.port)
            exprs = expressions(json.loads(DASHBOARD.read_text()))
            for expr in exprs:
                await wait_until(
                    lambda e=expr: _nonempty(query(session, prometheus, promql(e))),
                    f"Prometheus to show data for {expr}",
                    timeout_s=60.0,
                )
    finally:
        await admin.shutdown()
        await agent.stop()
    exposed = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert "headwater_nope_total" not in exposed  # the check below can fail
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        names = metric_names(promql(expr))
        assert names, f"no metric read by {expr}"
        missing = names - exposed
        assert not missing, f"{expr} reads {sorted(missing)}, which a running agent does not expose"
