"""``GET /api/tap``: the live stream as a WebSocket, served on the admin thread (:mod:`agent.admin`).

Query parameters (each optional): ``component`` (glob over component ids and labels), ``metric``
(glob over metric, span and log event names), ``match`` (repeatable: ``name=value``, ``name!=value``,
``name=~regex``, ``name!~regex``), ``signal`` (``metrics``, ``traces``, ``logs``, comma-separated),
``direction`` (``out``, the default, ``in`` or ``both``), ``format`` (``json``, the only one). A bad one
is answered 400 naming it, one stream too many 503, a browser page from another origin 403 unless a
token is configured or the origin is in ``tap.allowed_origins``. Messages are JSON text frames (see
:mod:`agent.tap`); the stream ends when the client closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence

from aiohttp import WSMsgType, web

from agent.tap import TapFilter, TapFull, TapHub

HEARTBEAT_S = 30.0
"""Pings on an open stream: a client gone without closing is noticed within two of these."""


def cross_origin_refusal(
    request: web.Request, allowed: Sequence[str], token_checked: bool
) -> web.Response | None:
    """A browser sends its page's Origin with a WebSocket upgrade and lets any page open one (no CORS
    for WebSockets): without a token, a web page the operator visits could read the stream of an agent
    on 127.0.0.1. So, without a token, only the endpoint's own pages, ``allowed`` origins and clients
    that are not browsers (no Origin) get the stream; 403 otherwise, naming the setting."""
    origin = request.headers.get("Origin")
    if token_checked or origin is None or origin in allowed:
        return None
    if origin.lower() in (f"http://{request.host}".lower(), f"https://{request.host}".lower()):
        return None
    return web.Response(
        status=403,
        text=f"the tap refuses pages from {origin}: add it to"
        " service::telemetry::tap::allowed_origins, or configure service::telemetry::auth\n",
    )


def filter_of(request: web.Request) -> TapFilter:
    """The request's filter; raises ValueError naming the parameter that is wrong."""
    q = request.query
    fmt = q.get("format", "json")
    if fmt != "json":
        raise ValueError(f"format: {fmt!r} is not json (the CLI renders text itself)")
    return TapFilter.parse(
        component=q.get("component", ""),
        name=q.get("metric", ""),
        match=q.getall("match", []),
        signal=q.get("signal", ""),
        direction=q.get("direction", ""),
    )


async def serve_tap(request: web.Request, hub: TapHub, *, token_checked: bool) -> web.StreamResponse:
    """Answer one ``/api/tap`` request (authorization is the caller's; ``token_checked`` when the
    request had to carry the bearer token)."""
    refused = cross_origin_refusal(request, hub.config.allowed_origins, token_checked)
    if refused is not None:
        return refused
    try:
        flt = filter_of(request)
    except ValueError as exc:
        return web.Response(status=400, text=f"bad tap request: {exc}\n")
    try:
        sub = hub.subscribe(flt)
    except TapFull as exc:
        return web.Response(status=503, text=f"too many tap streams: {exc}\n")
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S)
    reader: asyncio.Task[None] | None = None
    try:
        await ws.prepare(request)
        edges = await asyncio.wrap_future(sub.edges)
        await ws.send_str(json.dumps({"type": "subscribed", "edges": edges}))
        # Owned here: cancelled and awaited below. It reads (and answers pings) until the client goes.
        reader = asyncio.ensure_future(_until_closed(ws))
        while not ws.closed:
            getting = asyncio.ensure_future(sub.get())
            await asyncio.wait({getting, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getting
                break
            for message in getting.result():
                await ws.send_str(json.dumps(message, default=str))
    except (ConnectionError, RuntimeError):  # the client went while we wrote
        pass
    finally:
        sub.close()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await ws.close()
    return ws


async def _until_closed(ws: web.WebSocketResponse) -> None:
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break
