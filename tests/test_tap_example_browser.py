"""examples/tap_client.html in a real headless browser (Debian's chromium, over the DevTools protocol):
opened from file://, given the agent's endpoint, a filter and the token, it subscribes to /api/tap
and shows the StatsD series sent with the ``statsd`` client, with their values."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import statsd

from agent.admin import AdminServer
from agent.config import build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port, wait_until
from tests.helpers import BROWSER_TIMEOUT_S, chromium

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tap_client.html"
ROWS = (
    "JSON.stringify([...document.querySelectorAll('#rows tr')]"
    ".map(r => [...r.cells].map(c => c.textContent)))"
)


async def test_the_example_dashboard_shows_live_values(tmp_path: Path) -> None:
    statsd_port, telemetry = free_port(socket.SOCK_DGRAM), free_port()
    data = {
        "receivers": {"statsd": {"udp": f"127.0.0.1:{statsd_port}", "flush_interval": "100ms"}},
        "exporters": {"debug": {"verbosity": "basic"}},
        "service": {
            "telemetry": {"endpoint": f"127.0.0.1:{telemetry}", "auth": {"bearer_token": "dash-t0k"}},
            "pipelines": {"metrics": {"receivers": ["statsd"], "exporters": ["debug"]}},
        },
    }
    agent = Agent(build_config(data, builtin_factories()))
    admin = AdminServer(agent, f"127.0.0.1:{telemetry}")
    await admin.start()
    await agent.start()
    client = statsd.StatsClient("127.0.0.1", statsd_port)
    try:
        async with chromium(tmp_path) as page:
            await page.call("Page.navigate", url=EXAMPLE.as_uri())
            await wait_until(
                lambda: page.evaluate("!!document.getElementById('f')"), "the page", BROWSER_TIMEOUT_S
            )
            fill = {"endpoint": f"127.0.0.1:{telemetry}", "metric": "dash.*", "token": "dash-t0k"}
            await page.evaluate(
                f"Object.entries({json.dumps(fill)})"
                ".forEach(([k, v]) => document.getElementById(k).value = v);"
                "document.querySelector('#f button').click()"
            )
            await wait_until(
                lambda: page.evaluate("document.getElementById('status').textContent.startsWith('watching')"),
                "the page to subscribe",
                BROWSER_TIMEOUT_S,
            )
            sent = 0

            async def shown() -> list[list[str]]:
                nonlocal sent
                if sent < 100:  # traffic while waiting, bounded
                    sent += 1
                    client.gauge("dash.temp,room=lab", 21.5)
                    client.gauge("hidden.temp", 1)
                return [r for r in json.loads(await page.evaluate(ROWS)) if "dash.temp" in r[1]]

            rows = await wait_until(shown, "the series on the page", BROWSER_TIMEOUT_S)
            assert rows[0][:4] == ["statsd out", 'dash.temp{room="lab"}', "gauge", "21.5"]
            assert not [r for r in json.loads(await page.evaluate(ROWS)) if "hidden" in r[1]]
    finally:
        await agent.stop()
        await admin.shutdown()
