"""``headwater capture``: start a capture on a running agent through its telemetry endpoint, wait
for it to end (its duration or size bound, or Ctrl-C, which stops it), download the file and print
what was recorded. A plain blocking HTTP client: this is a command-line process, not the agent."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

POLL_S = 0.25
"""How often the command asks whether the capture ended."""


class CaptureCommandError(Exception):
    pass


def _call(endpoint: str, path: str, token: str | None, body: dict[str, Any] | None = None) -> bytes:
    request = urllib.request.Request(
        f"http://{endpoint}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            text = json.loads(text).get("error", text)
        raise CaptureCommandError(f"{path} answered {exc.code}: {text}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CaptureCommandError(f"cannot reach the telemetry endpoint {endpoint}: {reason}") from None


def capture_command(
    endpoint: str,
    output: str,
    receivers: Sequence[str],
    duration_s: float | None,
    max_bytes: int | None,
    token: str | None,
) -> int:
    """0 once the file is written, 1 when the agent refused or could not be reached."""
    body: dict[str, Any] = {"receivers": list(receivers)}
    if duration_s is not None:
        body["max_duration_s"] = duration_s
    if max_bytes is not None:
        body["max_bytes"] = max_bytes
    try:
        status = json.loads(_call(endpoint, "/api/capture/start", token, body))
        print(
            f"headwater capture: recording {', '.join(status['receivers'])} on {endpoint}"
            f" (at most {status['max_duration_s']:g}s, {status['max_bytes']} bytes; Ctrl-C stops)",
            file=sys.stderr,
        )
        try:
            while status["state"] == "running":
                time.sleep(POLL_S)
                status = json.loads(_call(endpoint, "/api/capture", token))
        except KeyboardInterrupt:
            pass
        if status["state"] == "running":
            status = json.loads(_call(endpoint, "/api/capture/stop", token, {}))
        data = _call(endpoint, "/api/capture/download", token)
    except CaptureCommandError as exc:
        print(f"headwater capture: {exc}", file=sys.stderr)
        return 1
    with open(output, "wb") as f:
        f.write(data)
    dropped = f", {status['dropped_records']} dropped (buffer full)" if status["dropped_records"] else ""
    print(
        f"headwater capture: {status['records']} records, {len(data)} bytes written to {output};"
        f" ended: {status['reason']}{dropped}",
        file=sys.stderr,
    )
    return 0
