"""``headwater tap``: print a running agent's live stream (``/api/tap``), one line per item.

Text lines: ``<time> <component> <in|out> <name>{labels} <kind> <value>`` for points (histograms as
``count= sum= min= max=``), ``<time> <component> <in|out> span <name> trace=<id> span=<id> <ms>ms
status=<code> {attributes}`` for spans, ``<time> <component> <in|out> log <severity> <body>
{attributes}`` for log records, and ``-- dropped N (<reason>)`` where the stream dropped items.
``--format json`` prints each message as it came (see :mod:`agent.tap`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp

EXIT_UNREACHABLE = 1
EXIT_REFUSED = 2
_REASONS = {"rate": "rate limit", "buffer": "slow reader", "behind": "tap fell behind"}


def tap_command(
    endpoint: str,
    *,
    component: str = "",
    metric: str = "",
    match: Sequence[str] = (),
    signal: str = "",
    direction: str = "",
    fmt: str = "text",
    token: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Stream until the agent closes the stream or Ctrl-C; the exit code."""
    params: list[tuple[str, str]] = [("format", "json")]
    for key, value in (("component", component), ("metric", metric), ("signal", signal)):
        if value:
            params.append((key, value))
    if direction:
        params.append(("direction", direction))
    params += [("match", m) for m in match]
    try:
        return asyncio.run(_stream(endpoint, params, fmt, token, out))
    except KeyboardInterrupt:
        return 0


async def _stream(
    endpoint: str, params: list[tuple[str, str]], fmt: str, token: str | None, out: TextIO
) -> int:
    url = f"http://{endpoint}/api/tap"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(url, params=params, headers=headers, heartbeat=30.0)
        except aiohttp.WSServerHandshakeError as exc:
            print(f"headwater tap: {url} answered {exc.status}: {exc.message}", file=sys.stderr)
            if exc.status in (400, 401, 503):
                async with http.get(url, params=params, headers=headers) as resp:  # the reason, in words
                    print(f"  {(await resp.text()).strip()}", file=sys.stderr)
            return EXIT_REFUSED
        except aiohttp.ClientError as exc:
            print(f"headwater tap: cannot reach the agent at {endpoint}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        async with ws:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                message = json.loads(msg.data)
                if message.get("type") == "subscribed":
                    edges = ", ".join(message.get("edges", [])) or "nothing (no component matches)"
                    print(f"headwater tap: watching {edges}", file=sys.stderr, flush=True)
                    continue
                line = msg.data if fmt == "json" else text_line(message)
                print(line, file=out, flush=True)
    print("headwater tap: the agent closed the stream", file=sys.stderr)
    return 0


def text_line(m: dict[str, Any]) -> str:
    """One readable line for a tap message."""
    kind = m.get("type")
    if kind == "dropped":
        return f"-- dropped {m['count']} ({_REASONS.get(m['reason'], m['reason'])})"
    where = f"{m.get('component')} {m.get('direction')}"
    if kind == "point":
        labels = ",".join(f'{k}="{v}"' for k, v in m.get("labels", {}).items())
        name = f"{m['name']}{{{labels}}}" if labels else m["name"]
        if "value" in m:
            value = f"{m['value']:g}" if isinstance(m["value"], float) else str(m["value"])
        elif "histogram" in m:
            h = m["histogram"]
            value = f"count={h['count']:g} sum={h['sum']:g} min={h['min']} max={h['max']}"
        elif "summary" in m:
            value = f"count={m['summary']['count']} sum={m['summary']['sum']:g}"
        else:
            value = ""
        return f"{_time(m.get('time_unix_nano'))} {where} {name} {m['kind']} {value}".rstrip()
    if kind == "span":
        return (
            f"{_time(m.get('start_time_unix_nano'))} {where} span {m['name']} trace={m['trace_id']}"
            f" span={m['span_id']} {m['duration_ms']:.3f}ms status={m['status']['code']}"
            f"{_attrs(m.get('attributes'))}"
        )
    if kind == "log":
        severity = m.get("severity_text") or m.get("severity_number") or "-"
        body = m.get("body")
        body_text = body if isinstance(body, str) else json.dumps(body)
        attrs = _attrs(m.get("attributes"))
        return f"{_time(m.get('time_unix_nano'))} {where} log {severity} {body_text}{attrs}"
    return json.dumps(m)


def _attrs(attrs: dict[str, Any] | None) -> str:
    return " " + json.dumps(attrs, separators=(",", ":")) if attrs else ""


def _time(unix_nano: int | None) -> str:
    if not unix_nano:
        return "-"
    return (
        datetime.fromtimestamp(unix_nano / 1e9, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
