"""Where should /healthz be served? On the agent's event loop, or from a thread of its own.

    python bench/health_bench.py [--seconds 10] [--slice-ms 500]

The agent's loop is kept busy with pure-Python work in slices of ``--slice-ms`` (what a large
request conversion, a flush or a scrape does to it), yielding between slices. A client thread asks
/healthz every 50 ms for ``--seconds`` and records each answer's latency. The same run measures the
endpoint served by an aiohttp app on the agent's loop (how it was before issue 10) and by
``agent.admin.AdminServer`` (its own thread), and prints p50 / p99 / max in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from agent.admin import AdminServer
from agent.config import build_config
from agent.registry import builtin_factories
from agent.service import Agent


def _probe(port: int, seconds: float, out: list[float], stop: threading.Event) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as resp:
            resp.read()
        out.append((time.monotonic() - t0) * 1000)
        time.sleep(0.05)
    stop.set()


async def _busy(stop: threading.Event, slice_s: float) -> None:
    while not stop.is_set():
        end = time.monotonic() + slice_s
        x = 0
        while time.monotonic() < end:
            for i in range(1000):
                x += i
        await asyncio.sleep(0)


async def _on_the_loop(seconds: float, slice_s: float) -> list[float]:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    out: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=_probe, args=(port, seconds, out, stop), daemon=True)
    t.start()
    await _busy(stop, slice_s)
    await asyncio.to_thread(t.join)
    await runner.cleanup()
    return out


async def _own_thread(seconds: float, slice_s: float) -> list[float]:
    import yaml

    cfg = yaml.safe_load(
        """
        receivers: {http: {endpoint: "127.0.0.1:0"}}
        exporters: {debug: {}}
        service: {pipelines: {metrics: {receivers: [http], exporters: [debug]}}}
        """
    )
    agent = Agent(build_config(cfg, builtin_factories()))
    admin = AdminServer(agent, "127.0.0.1:0", health_stall_timeout_s=3600)
    await admin.start()
    out: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=_probe, args=(admin.port, seconds, out, stop), daemon=True)
    t.start()
    await _busy(stop, slice_s)
    await asyncio.to_thread(t.join)
    await admin.shutdown()
    return out


def _row(name: str, xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return f"| {name:<28} | {len(xs):>6} | {statistics.median(xs):>8.1f} | {p99:>8.1f} | {xs[-1]:>8.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--slice-ms", type=float, default=500.0)
    args = ap.parse_args()
    slice_s = args.slice_ms / 1000
    loop_ms = asyncio.run(_on_the_loop(args.seconds, slice_s))
    thread_ms = asyncio.run(_own_thread(args.seconds, slice_s))
    print(f"/healthz latency, agent's loop busy in {args.slice_ms:g} ms slices, {args.seconds:g} s each")
    print("| served from                  | probes |  p50 ms  |  p99 ms  |  max ms  |")
    print("|------------------------------|--------|----------|----------|----------|")
    print(_row("the agent's loop (before)", loop_ms))
    print(_row("its own thread (AdminServer)", thread_ms))


if __name__ == "__main__":
    main()
