"""The agent's own endpoint (``service.telemetry.endpoint``): /metrics, /healthz, /readyz, /status,
the status page at / and its JSON, /api/overview (agent.overview).

It is served from its own thread with its own event loop, so that work on the agent's loop (a large
request being converted, a flush, a scrape of the pull exporter) cannot make the kubelet's probes
time out. Measured on the 2-core machine with the main loop busy in 0.5 s slices of pure-Python
work: on the agent's loop /healthz waited for the slice (p50 ~250 ms, max ~500 ms); from its own
thread the answer waits only for the interpreter's thread switch (``sys.getswitchinterval()``,
5 ms) — see ``tests/agent/test_admin.py``. C code that holds the GIL for long (a single huge
``json.loads``) still delays it: receivers keep such calls bounded (body caps, sliced parsing).

``/healthz`` still fails when the agent is really stuck: a heartbeat task on the agent's loop stamps
the time every 100 ms, and ``/healthz`` answers 503 once the stamp is older than
``health_stall_timeout`` (the loop has not run for that long — a deadlock or an endless loop), so
the kubelet restarts the pod. ``/readyz`` is 503 until every receiver is bound and while stopping.

Everything read from the agent's thread is read-only: gauges and counters are plain floats; the
families and the component lists are iterated over snapshots (``list(...)``, one C call under the
GIL), and a status that raced a change is taken again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import threading
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.capture import CaptureControl, CaptureRefused
from agent.component import Tasks
from agent.config import is_loopback
from agent.confmodel import parse_duration, parse_host_port, parse_size
from agent.netguard import ConnectionGate, FdBudget, GuardedSite
from agent.overview import Overview
from agent.service import Agent
from agent.status_page import page
from agent.tap.websocket import serve_tap
from agent.telemetry import Cell
from agent.version import VERSION
from agent.watched_file import WatchedFile

log = logging.getLogger("headwater.admin")

HEARTBEAT_PERIOD_S = 0.1
MAX_CONNECTIONS = 64
"""The kubelet's probes and a scraper or two are the audience; beyond this idle connections are closed."""
HEADER_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 0.5
"""Stopping, how long a request still in progress may take (aiohttp waits this twice: to end, then once
cancelled). Every answer here takes milliseconds: one still going is a client not reading its page,
and aiohttp's default (60 s) would hold the agent's exit for two minutes."""


class AdminServer:
    """Serves the agent's endpoint from a thread of its own.

    ``start`` binds (raising ``OSError`` when the address is taken) and starts the heartbeat on the
    caller's loop; ``shutdown`` is idempotent and safe before ``start``; ``attach`` switches the agent
    reported on (a reload) without closing the listener."""

    def __init__(self, agent: Agent, endpoint: str, health_stall_timeout_s: float = 10.0) -> None:
        self._agent = agent
        self._host, self._port = parse_host_port(endpoint)
        # Fixed for the life of the listener, as its address is: a reload must not drop the token of
        # an endpoint that stays bound where it was.
        self._auth = agent.config.service.telemetry.auth
        self._locked = not self._auth.enabled and not is_loopback(self._host)
        """Bound beyond loopback without a token: what shows the data itself (the tap, the page,
        /api/*) answers 403 saying how to open it; the probes, /metrics and /status stay as they were,
        so an existing config (the image's binds 0.0.0.0 for the kubelet) still starts."""
        self._token_file: WatchedFile[str] | None = None
        self._stall_timeout_s = health_stall_timeout_s
        self._overview = Overview()
        """Its snapshots, used on the admin thread only."""
        self._beat = time.monotonic()
        self._tasks = Tasks("admin", log)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = self._port
        self.capture: CaptureControl | None = None
        """/api/capture (agent.capture): made on the agent's loop at start, driven from the admin thread."""
        self.refused_connections = Cell()
        """Connections closed at MAX_CONNECTIONS (read from this thread and the admin thread: a float)."""
        self.header_timeouts = Cell()
        """The bound port (the configured one, or the one the kernel chose for port 0)."""

    def attach(self, agent: Agent) -> None:
        self._agent = agent
        if self.capture is not None:
            self.capture.attach(agent)

    async def start(self) -> None:
        if self._thread is not None:
            return
        self.capture = CaptureControl(self._agent, asyncio.get_running_loop())
        if self._locked:
            log.warning(
                "the telemetry endpoint %s:%s is reachable beyond this machine and has no token: the tap,"
                " the status page and /api/* answer 403 until service.telemetry.auth.bearer_token (or"
                " bearer_token_file) is set",
                self._host,
                self._port,
            )
        if self._auth.bearer_token_file and self._token_file is None:
            token_file = WatchedFile(self._auth.bearer_token_file, _read_token, "bearer token", log)
            await asyncio.to_thread(token_file.load)  # OSError / ValueError: the start fails
            self._token_file = token_file
        bound: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._serve, args=(bound,), name="headwater-admin", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(bound)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise
        self._beat = time.monotonic()
        self._tasks.spawn(self._heartbeat(), "heartbeat")

    async def shutdown(self) -> None:
        await self._tasks.close()
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)
        thread, loop, stop = self._thread, self._loop, self._stop
        self._thread = None
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join)

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_PERIOD_S)

    # -- the admin thread ----------------------------------------------------------------------------
    def _serve(self, bound: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._run(bound))
        except BaseException as exc:
            if not bound.done():
                bound.set_exception(exc)
            else:
                log.error("the admin endpoint stopped: %r", exc)
        finally:
            loop.close()

    async def _run(self, bound: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/", self._page)
        app.router.add_get("/api/overview", self._api_overview)
        app.router.add_get("/api/tap", self._api_tap)
        app.router.add_post("/api/capture/start", self._capture_start)
        app.router.add_post("/api/capture/stop", self._capture_stop)
        app.router.add_get("/api/capture", self._capture_status)
        app.router.add_get("/api/capture/download", self._capture_download)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=STOP_TIMEOUT_S)
        await runner.setup()
        try:
            # Its own small connection cap out of the descriptors the receivers leave in reserve
            # (agent.netguard): a flood of connections to this port evicts idle ones, not the probes.
            site = GuardedSite(
                runner,
                self._host,
                self._port,
                gate=ConnectionGate(MAX_CONNECTIONS, self.refused_connections, FdBudget(MAX_CONNECTIONS)),
                header_timeout_s=HEADER_TIMEOUT_S,
                idle_timeout_s=IDLE_TIMEOUT_S,
                header_timeouts=self.header_timeouts,
            )
            await site.start()
            self.port = site.port
            bound.set_result(None)
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def authorized(self, request: web.Request) -> web.Response | None:
        """None when ``request`` may see what flows (the tap, the status page, ``/api/*``); else the
        401 to answer. With no token configured everything is allowed on a loopback address; bound
        wider without one, the answer is a 403 saying how to open it. The token comes as
        ``Authorization: Bearer <token>``, or as ``?access_token=<token>`` for a browser's WebSocket,
        which cannot set headers (RFC 6750 2.3). /metrics, /healthz and /readyz do not ask.
        Called on the admin thread."""
        if self._locked:
            return web.Response(
                status=403,
                text=f"forbidden: the telemetry endpoint {self._host}:{self._port} is reachable beyond this"
                " machine and no token is set; set service::telemetry::auth::bearer_token (or"
                " bearer_token_file) to see what flows here, or bind 127.0.0.1\n",
            )
        if not self._auth.enabled:
            return None
        if self._token_file is not None:
            self._token_file.refresh()  # one stat: a rotated token applies to the next request
            expected = self._token_file.value or ""
        else:
            expected = self._auth.bearer_token
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = request.query.get("access_token", "")
        if not given:
            return _unauthorized("this needs a bearer token (Authorization: Bearer <token>)")
        if not expected or not hmac.compare_digest(given.strip().encode(), expected.encode()):
            return _unauthorized("the bearer token is not the configured one")
        return None

    def stalled_s(self) -> float:
        """Seconds since the agent's loop last ran the heartbeat, beyond one period."""
        return max(0.0, time.monotonic() - self._beat - HEARTBEAT_PERIOD_S)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._agent.telemetry.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        stalled = self.stalled_s()
        if stalled > self._stall_timeout_s:
            return web.Response(
                status=503,
                text=f"stuck: the agent's event loop has not run for {stalled:.1f}s"
                f" (health_stall_timeout {self._stall_timeout_s:g}s)\n",
            )
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._agent.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _api_tap(self, request: web.Request) -> web.StreamResponse:
        """The live stream (WebSocket; :mod:`agent.tap.websocket`)."""
        refused = self.authorized(request)
        if refused is not None:
            return refused
        return await serve_tap(request, self._agent.tap, token_checked=self._auth.enabled)

    async def _status(self, request: web.Request) -> web.Response:
        # Counts only, no data: open as before unless a token is set.
        refused = self.authorized(request) if self._auth.enabled else None
        if refused is not None:
            return refused
        status: dict[str, Any] | None = None
        for _ in range(3):
            try:
                status = {"version": VERSION, **self._agent.status()}
                break
            except RuntimeError:  # a dict the agent's thread changed while it was read: read again
                continue
        if status is None:
            return web.Response(status=503, text="busy: the status kept changing while read; try again\n")
        return web.Response(text=json.dumps(status, indent=2) + "\n", content_type="application/json")

    async def _page(self, request: web.Request) -> web.Response:
        # A browser's address bar cannot send a header: the token comes as /?access_token=<token>, and
        # the page sends it on as a bearer token to /api/overview.
        refused = self.authorized(request)
        if refused is not None:
            return refused
        return web.Response(body=page(), content_type="text/html", charset="utf-8")

    async def _api_overview(self, request: web.Request) -> web.Response:
        refused = self.authorized(request)
        if refused is not None:
            return refused
        for _ in range(3):
            try:
                document = self._overview.document(self._agent)
                break
            except RuntimeError:  # a dict the agent's thread changed while it was read: read again
                continue
        else:
            return web.Response(status=503, text="busy: the agent kept changing while read; try again\n")
        return web.json_response(document, headers={"Cache-Control": "no-store"})

    # -- capture (agent.capture): behind the token, as anything showing data -------------------------
    async def _capture_start(self, request: web.Request) -> web.Response:
        """POST /api/capture/start {"receivers": [id, ...], "max_bytes": N | "100MiB", "max_duration_s":
        N | "duration": "60s"}: 200 with the status, 400 naming the bad field, 409 when one runs."""
        refused = self.authorized(request)
        if refused is not None:
            return refused
        assert self.capture is not None
        try:
            doc = await request.json() if request.can_read_body else {}
            receivers, max_bytes, max_duration_s = _capture_arguments(doc)
            status = await asyncio.to_thread(self.capture.start, receivers, max_bytes, max_duration_s)
        except ValueError as exc:  # json.JSONDecodeError too
            return web.json_response({"error": f"bad capture request: {exc}"}, status=400)
        except CaptureRefused as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except OSError as exc:
            return web.json_response({"error": f"cannot write the capture file: {exc}"}, status=500)
        return web.json_response(status)

    async def _capture_stop(self, request: web.Request) -> web.Response:
        refused = self.authorized(request)
        if refused is not None:
            return refused
        assert self.capture is not None
        try:
            return web.json_response(await asyncio.to_thread(self.capture.stop))
        except CaptureRefused as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)

    async def _capture_status(self, request: web.Request) -> web.Response:
        refused = self.authorized(request)
        if refused is not None:
            return refused
        assert self.capture is not None
        return web.json_response(self.capture.status(), headers={"Cache-Control": "no-store"})

    async def _capture_download(self, request: web.Request) -> web.StreamResponse:
        """The file of the last capture, once it ended (409 while it runs)."""
        refused = self.authorized(request)
        if refused is not None:
            return refused
        assert self.capture is not None
        try:
            path = self.capture.download_path()
        except CaptureRefused as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        return web.FileResponse(path, headers={"Content-Type": "application/vnd.headwater.capture"})


def _capture_arguments(doc: Any) -> tuple[list[str], int | None, float | None]:
    """(receivers, max_bytes, max_duration_s) of a start request; ValueError names the bad field."""
    if not isinstance(doc, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(doc) - {"receivers", "max_bytes", "max_duration_s", "duration"}
    if unknown:
        raise ValueError(f"unknown fields {', '.join(sorted(unknown))}")
    receivers = doc.get("receivers") or []
    if not isinstance(receivers, list) or not all(isinstance(r, str) for r in receivers):
        raise ValueError("receivers must be a list of receiver ids")
    raw_bytes = doc.get("max_bytes")
    max_bytes = parse_size(raw_bytes) if isinstance(raw_bytes, str) else raw_bytes
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool)):
        raise ValueError("max_bytes must be a number of bytes or a size such as 100MiB")
    raw_duration = doc.get("max_duration_s", doc.get("duration"))
    max_duration_s = parse_duration(raw_duration) if isinstance(raw_duration, str) else raw_duration
    if max_duration_s is not None and (
        not isinstance(max_duration_s, int | float) or isinstance(max_duration_s, bool)
    ):
        raise ValueError("max_duration_s must be a number of seconds (or duration a text such as 60s)")
    return receivers, max_bytes, None if max_duration_s is None else float(max_duration_s)


def _unauthorized(reason: str) -> web.Response:
    return web.Response(
        status=401, text=f"unauthorized: {reason}\n", headers={"WWW-Authenticate": 'Bearer realm="headwater"'}
    )


def _read_token(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"{path} holds no bearer token")
    return token
