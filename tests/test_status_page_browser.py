"""The status page at / in a real headless browser (Debian's chromium, driven over the DevTools protocol
with aiohttp's WebSocket client): it loads from the agent alone (every request the page makes goes to
the agent's endpoint), shows the components of the running config in its graph and tables, and its
numbers move when the ``statsd`` client sends traffic (the DOM read before and after).

A screenshot is kept as a test artifact: ``status-page.png`` under the test's tmp dir, copied to
``$HEADWATER_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import base64
import json
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest
import statsd
import yaml

from agent.admin import AdminServer
from agent.config import build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port, wait_until
from tests.helpers import BROWSER_TIMEOUT_S, STATSD_TO_DEBUG, chromium, keep_artifact
from tests.integration.conftest import free_tcp_udp_port

pytestmark = pytest.mark.integration

CELLS = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('td[data-k="receiver:statsd"]')]
    .map(td => [td.dataset.m, td.textContent])))"""


async def test_page_shows_the_graph_and_its_numbers_move(tmp_path: Path) -> None:
    ports = {"statsd": free_tcp_udp_port(), "telemetry": free_port()}
    text = STATSD_TO_DEBUG.format(out=tmp_path / "out.jsonl", **ports)
    agent = Agent(build_config(yaml.safe_load(textwrap.dedent(text)), builtin_factories()))
    admin = AdminServer(agent, f"127.0.0.1:{ports['telemetry']}")
    await agent.start()
    await admin.start()
    base = f"http://127.0.0.1:{ports['telemetry']}/"
    client = statsd.StatsClient("127.0.0.1", ports["statsd"])
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        async with chromium(tmp_path) as page:
            await page.call("Network.enable")
            await page.call("Page.navigate", url=base)

            async def updated(times: int) -> Any:
                count = await page.evaluate("Number(document.body && document.body.dataset.updates || 0)")
                return count >= times

            await wait_until(lambda: updated(1), "the page's first update", BROWSER_TIMEOUT_S)
            before = json.loads(await page.evaluate(CELLS))
            nodes = await page.evaluate(
                "[...document.querySelectorAll('[data-node]')].map(n => n.dataset.node)"
            )
            listed = await page.evaluate("document.getElementById('components').textContent")
            assert before["total.in"] == "0"
            assert nodes == ["receiver:statsd", "processor:memory_limiter@metrics", "exporter:debug"]
            assert all(name in listed for name in ("statsd", "memory_limiter", "debug"))

            sent = 0

            async def moved() -> dict[str, str] | None:
                # Traffic while waiting, bounded: at most 100 rounds of 20 counters and one bad line.
                nonlocal sent
                if sent < 100:
                    sent += 1
                    for i in range(20):
                        client.incr(f"page.hits{i % 4}")
                    raw.sendto(b"not a statsd line", ("127.0.0.1", ports["statsd"]))
                now = json.loads(await page.evaluate(CELLS))
                rates_shown = now["per_s.in"] not in ("0", "–") and now["per_s.refused"] not in ("0", "–")
                return now if now["total.in"] != before["total.in"] and rates_shown else None

            after = await wait_until(moved, "the statsd figures to move on the page", BROWSER_TIMEOUT_S)
            assert float(after["total.in"].rstrip("k")) > 0
            for section, text in (("refusals", "malformed_line"), ("top", "page.hits")):
                shown = f"document.getElementById('{section}').textContent.includes('{text}')"
                await wait_until(
                    lambda js=shown: page.evaluate(js), f"{text} in the page's {section}", BROWSER_TIMEOUT_S
                )
            edge = await page.evaluate(
                "document.querySelector('[data-edge=\"receiver:statsd>processor:memory_limiter@metrics\"]').textContent"
            )
            assert edge.endswith("/s")

            shot = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            png = keep_artifact(tmp_path, "status-page.png", base64.b64decode(shot["data"]))
            assert png.read_bytes().startswith(b"\x89PNG")

            requested = {
                e["params"]["request"]["url"]
                for e in page.events
                if e.get("method") == "Network.requestWillBeSent"
            }
            assert requested and all(url.startswith(base) for url in requested), requested
    finally:
        raw.close()
        await admin.shutdown()
        await agent.stop()
