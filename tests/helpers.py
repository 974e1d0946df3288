"""Helpers shared by the tests that drive the agent as a user sees it: a headless chromium over the
DevTools protocol (:func:`chromium`, :class:`DevTools`), keeping screenshots and screens as test
artifacts (:func:`keep_artifact`), and the small statsd → debug config those tests run
(:data:`STATSD_TO_DEBUG`, formatted with ``statsd``, ``telemetry`` ports and ``out``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

STATSD_TO_DEBUG = """
receivers:
  statsd: {{udp: "127.0.0.1:{statsd}", flush_interval: 200ms}}
processors:
  memory_limiter: {{limit: 8GiB}}  # in-process: it measures the whole pytest process, not the agent
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


def keep_artifact(tmp_path: Path, name: str, data: bytes | str) -> Path:
    """Writes ``data`` to ``name`` under the test's tmp dir and copies it to ``$HEADWATER_ARTIFACTS`` when
    that is set (where CI collects screenshots and screens); returns the tmp dir's copy."""
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    target = os.environ.get("HEADWATER_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path
