"""The status page at / in a real headless browser (Debian's chromium, driven over the DevTools protocol
with aiohttp's WebSocket client): it loads from the agent alone (every request the page makes goes to
the agent's endpoint), shows the components of the running config in its graph and tables, and its
numbers move when the ``statsd`` client sends traffic (the DOM read before and after).

A screenshot is kept as a test artifact: ``status-page.png`` under the test's tmp dir, copied to
``$HEADWATER_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import statsd
import yaml

from agent.admin import AdminServer
from agent.config import build_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import free_port, wait_until
from tests.integration.conftest import free_tcp_udp_port

pytestmark = pytest.mark.integration

CONFIG = """
receivers:
  statsd: {{udp: "127.0.0.1:{statsd}", flush_interval: 200ms}}
processors:
  memory_limiter: {{limit: 512MiB}}
exporters:
  debug: {{path: "{out}"}}
service:
  telemetry: {{endpoint: "127.0.0.1:{telemetry}"}}
  pipelines:
    metrics: {{receivers: [statsd], processors: [memory_limiter], exporters: [debug]}}
"""

BROWSER_TIMEOUT_S = 60.0


class DevTools:
    """One page of a headless chromium, over the DevTools protocol: ``call`` sends a command and returns
    its result; the events seen meanwhile are kept in ``events``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._id = 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        await self._ws.send_json({"id": self._id, "method": method, "params": params})
        async with asyncio.timeout(BROWSER_TIMEOUT_S):
            while True:
                msg = await self._ws.receive_json()
                if msg.get("id") == self._id:
                    assert "error" not in msg, f"{method}: {msg['error']}"
                    return dict(msg["result"])
                self.events.append(msg)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[DevTools]:
    """A headless chromium with a blank page, on a DevTools port of its choosing; killed on exit."""
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed: scripts/install-test-deps installs it"
    args = [
        binary,
        "--headless=new",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--window-size=1280,900",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "about:blank",
    ]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        seen = []
        async with asyncio.timeout(BROWSER_TIMEOUT_S):
            while True:
                line = (await proc.stderr.readline()).decode(errors="replace")
                assert line, f"chromium exited before listening: {''.join(seen)[-2000:]}"
                seen.append(line)
                if found := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                    port = int(found.group(1))
                    break
        # Keep draining its log so that it never blocks on a full pipe.
        drain = asyncio.ensure_future(proc.stderr.read())
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            [page] = [t for t in targets if t["type"] == "page"]
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield DevTools(ws)
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _keep(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    target = os.environ.get("HEADWATER_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


CELLS = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('td[data-k="receiver:statsd"]')]
    .map(td => [td.dataset.m, td.textContent])))"""


async def test_page_shows_the_graph_and_its_numbers_move(tmp_path: Path) -> None:
    ports = {"statsd": free_tcp_udp_port(), "telemetry": free_port()}
    text = CONFIG.format(out=tmp_path / "out.jsonl", **ports)
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
            png = _keep(tmp_path, "status-page.png", base64.b64decode(shot["data"]))
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
