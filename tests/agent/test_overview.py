"""/api/overview: the configured graph with its edges, per component totals and rates from the last two
snapshots (taken at most once a second, and afresh after a silence), reasons, queues, alerts and top
metrics; served on the telemetry endpoint behind its bearer token, with the status page at /."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from agent.admin import AdminServer
from agent.config import build_config
from agent.overview import MIN_INTERVAL_S, STALE_AFTER_S, Overview
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port, wait_until

CONFIG = """
receivers:
  http: {{endpoint: "127.0.0.1:{http_port}"}}
processors:
  threshold/cpu:
    rules:
      - {{name: cpu_high, metric: "cpu.*", statistic: last, op: ">=", warning: 80, critical: 95, for: 0s}}
connectors:
  forward: {{}}
exporters:
  debug: {{path: "{out}"}}
  otlp_http/down:  # nothing listens there: its queue holds what it could not send
    endpoint: "http://127.0.0.1:{dead_port}"
    retry_on_failure: {{initial_interval: 1h, max_interval: 1h}}
service:
  shutdown_timeout: 100ms  # what the unreachable exporter holds is not waited for
  telemetry: {{endpoint: "{telemetry}", auth: {auth}}}
  pipelines:
    metrics: {{receivers: [http], processors: [threshold/cpu], exporters: [forward]}}
    metrics/out: {{receivers: [forward], exporters: [debug, otlp_http/down]}}
"""

GOOD = {"name": "cpu.user", "value": 97, "type": "gauge", "labels": {"host": "web-1"}}
BAD = {"name": "cpu.user", "value": "ninety"}


def _agent(tmp_path: Path, http_port: int, telemetry: str = "", auth: str = "{}") -> Agent:
    text = CONFIG.format(
        http_port=http_port,
        dead_port=free_port(),
        out=tmp_path / "out.jsonl",
        telemetry=telemetry,
        auth=auth,
    )
    return Agent(build_config(yaml.safe_load(textwrap.dedent(text)), builtin_factories()))


async def _post(port: int, body: list[dict[str, Any]]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/v1/metrics", json=body) as resp,
    ):
        assert resp.status < 500, await resp.text()


def _component(doc: dict[str, Any], key: str) -> dict[str, Any]:
    (found,) = [c for c in doc["components"] if c["key"] == key]
    return found


async def test_graph_rates_reasons_and_alerts(tmp_path: Path) -> None:
    http_port = free_port()
    agent = _agent(tmp_path, http_port)
    now = [100.0]
    overview = Overview(clock=lambda: now[0])
    await agent.start()
    try:
        first = overview.document(agent)
        await _post(http_port, [GOOD, GOOD, BAD])
        await wait_until(
            lambda: agent.telemetry.value("exporter_failed_points_total", exporter="otlp_http/down"),
            "the unreachable exporter's first attempt",
        )

        now[0] += MIN_INTERVAL_S / 2  # within the interval: the same snapshot, nothing moves yet
        same = overview.document(agent)
        now[0] += MIN_INTERVAL_S * 2 - MIN_INTERVAL_S / 2
        second = overview.document(agent)
        now[0] += STALE_AFTER_S + 1  # nobody looked for a while: no average over the silence
        after_silence = overview.document(agent)
    finally:
        await agent.stop()

    assert [p["id"] for p in first["pipelines"]] == ["metrics", "metrics/out"]
    assert first["pipelines"][0] == {
        "id": "metrics",
        "signal": "metrics",
        "receivers": ["receiver:http"],
        "processors": ["processor:threshold/cpu@metrics"],
        "exporters": ["connector:forward"],
    }
    assert first["pipelines"][1]["receivers"] == ["connector:forward"]
    assert [(e["pipeline"], e["from"], e["to"]) for e in first["edges"]] == [
        ("metrics", "receiver:http", "processor:threshold/cpu@metrics"),
        ("metrics", "processor:threshold/cpu@metrics", "connector:forward"),
        ("metrics/out", "connector:forward", "exporter:debug"),
        ("metrics/out", "connector:forward", "exporter:otlp_http/down"),
    ]
    assert first["connectors"] == ["forward"]
    assert first["window_s"] is None and all(c["per_s"] is None for c in first["components"])
    assert _component(first, "receiver:http")["total"]["in"] == 0
    assert first["top_metrics"] == []  # the tracker starts when first asked
    assert same["components"] == first["components"]

    assert second["window_s"] == 2 * MIN_INTERVAL_S
    http = _component(second, "receiver:http")
    assert http["total"] == {"in": 3, "out": 2, "refused": 1, "dropped": 0, "failed": None}
    assert http["per_s"] == {"in": 1.5, "out": 1.0, "refused": 0.5, "dropped": 0.0, "failed": None}
    [reason] = http["reasons"]
    assert reason["measure"] == "refused" and reason["total"] == 1 and reason["per_s"] == 0.5
    assert {"component": "receiver:http", **reason} in second["refusals"]
    threshold = _component(second, "processor:threshold/cpu@metrics")
    assert threshold["total"]["in"] == 2 and threshold["per_s"]["out"] == 1.0
    assert _component(second, "connector:forward")["total"]["out"] == 2
    debug = _component(second, "exporter:debug")
    assert debug["total"]["out"] == 2 and debug["total"]["in"] is None and debug["queue"] == {}
    down = _component(second, "exporter:otlp_http/down")
    assert down["total"]["out"] == 0 and down["total"]["failed"] == 2 and down["per_s"]["failed"] == 1.0
    assert down["queue"]["points"] == 2 and down["queue"]["capacity"] > 1  # held while it retries
    assert [(r["measure"], r["total"]) for r in down["reasons"]] == [("failed", 2)]
    edge_rates = {(e["from"], e["to"]): e["points_per_s"] for e in second["edges"]}
    assert edge_rates[("receiver:http", "processor:threshold/cpu@metrics")] == 1.0
    [alert] = second["alerts"]
    assert (alert["component"], alert["rule"], alert["state"], alert["severity"], alert["labels"]) == (
        "threshold/cpu",
        "cpu_high",
        "firing",
        "critical",
        {"host": "web-1"},
    )
    [top] = second["top_metrics"]
    assert (top["name"], top["series"], top["labels"]) == ("cpu.user", 1, [{"name": "host", "values": 1}])
    process = second["process"]
    assert process["rss_bytes"] > 0 and process["cpu_percent"] >= 0 and process["loop_lag_max_s"] >= 0

    assert after_silence["window_s"] is None and _component(after_silence, "receiver:http")["per_s"] is None
    assert _component(after_silence, "receiver:http")["total"]["in"] == 3


async def test_served_behind_the_token_with_the_page(tmp_path: Path) -> None:
    http_port, admin_port = free_port(), free_port()
    agent = _agent(tmp_path, http_port, f"127.0.0.1:{admin_port}", "{bearer_token: s3cret}")
    admin = AdminServer(agent, f"127.0.0.1:{admin_port}")
    await agent.start()
    await admin.start()
    base = f"http://127.0.0.1:{admin_port}"
    bearer = {"Authorization": "Bearer s3cret"}
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/api/overview", "/"):
                async with session.get(base + path) as resp:
                    assert resp.status == 401, path
            async with session.get(base + "/api/overview", headers=bearer) as resp:
                assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
                doc = await resp.json()
            async with session.get(base + "/?access_token=s3cret") as resp:
                assert resp.status == 200 and resp.content_type == "text/html"
                html = await resp.text()
    finally:
        await admin.shutdown()
        await agent.stop()
    assert {c["key"] for c in doc["components"]} == {
        "receiver:http",
        "processor:threshold/cpu@metrics",
        "connector:forward",
        "exporter:debug",
        "exporter:otlp_http/down",
    }
    # Self-contained and light: nothing fetched from elsewhere (no script or font source, no link, no
    # import, no absolute URL); the only url() is the SVG's own arrow marker.
    assert len(html.encode()) < 40_000
    assert not re.search(r"\b(src|href)\s*=|@import|@font-face|https?://|url\((?!#)", html)
    assert 'fetch("api/overview"' in html
