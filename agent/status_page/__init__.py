"""The status page served at ``/`` on the telemetry endpoint: one self-contained HTML file (inline CSS
and JavaScript, no external scripts or fonts: it runs in clusters without internet access) that polls
``/api/overview`` every second and draws the pipeline graph, live rates, refusals by reason, sending
queues, alerts and top metrics. Opened as ``/?access_token=<token>``
(an endpoint with a bearer token), it sends the token on as ``Authorization: Bearer``."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def page() -> bytes:
    """The page's HTML (package data, read once)."""
    return files(__package__).joinpath("index.html").read_bytes()
