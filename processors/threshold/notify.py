"""Where the ``threshold`` processor's notifications go: the log, a webhook, Alertmanager's v2 API.

The webhook body is Alertmanager's webhook shape (``version: "4"``, ``status``, ``groupLabels``,
``alerts: [{status, labels, annotations, startsAt, endsAt, ...}]``) plus Slack's ``text`` field, so one
body serves a Slack incoming webhook and any tool that reads Alertmanager webhooks.

HTTP receivers each own an :class:`agent.sending.Sender`: a queue (memory, or disk that survives a
restart), retries with jittered backoff for 5xx, 429 and connection errors, drops (counted) for other
4xx. The Sender reports through exporter-style self-metrics labelled ``exporter="<processor>:<receiver>"``
(its metric families are labelled by exporter), and its disk partition is named the same way.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import aiohttp

from agent.component import (
    Backpressure,
    ComponentId,
    ComponentKind,
    PermanentError,
    RetryableError,
    Settings,
)
from agent.sending import QueueConfig, Request, RetryConfig, Sender
from agent.telemetry import ComponentTelemetry
from agent.version import USER_AGENT
from processors.threshold.engine import FIRING, RESOLVED, AlertEvent, Notification
from processors.threshold.template import BodyTemplate


def rfc3339(t: float) -> str:
    return (
        datetime.datetime.fromtimestamp(t, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


_ZERO_TIME = "0001-01-01T00:00:00Z"
"""Alertmanager's webhook writes this as the endsAt of a firing alert."""


def slack_text(n: Notification) -> str:
    """Slack mrkdwn: a headline, then one line per alert."""
    firing = n.firing
    head = f"[FIRING:{firing}] {n.rule}" if firing else f"[RESOLVED] {n.rule}"
    extra = {k: v for k, v in n.group_labels.items() if k != "alertname"}
    if extra:
        head += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
    if n.repeat:
        head += " - still firing"
    lines = [head]
    for a in n.alerts:
        what = a.severity.upper() if a.status == FIRING else "resolved"
        lines.append(f"• *{what}* {a.annotations.get('summary', '')}")
    return "\n".join(lines)


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    common = dict(maps[0])
    for m in maps[1:]:
        common = {k: v for k, v in common.items() if m.get(k) == v}
    return common


def webhook_body(n: Notification, receiver: str, generator_url: str) -> dict[str, Any]:
    alerts = [
        {
            "status": a.status,
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": rfc3339(a.starts_at),
            "endsAt": rfc3339(a.ends_at) if a.ends_at is not None else _ZERO_TIME,
            "generatorURL": generator_url,
            "fingerprint": fingerprint(a.labels),
            "value": a.value if math.isfinite(a.value) else None,
        }
        for a in n.alerts
    ]
    return {
        "text": slack_text(n),
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "status": FIRING if n.firing else RESOLVED,
        "receiver": receiver,
        "groupLabels": n.group_labels,
        "commonLabels": _common([a.labels for a in n.alerts]),
        "commonAnnotations": _common([a.annotations for a in n.alerts]),
        "externalURL": generator_url,
        "repeat": n.repeat,
        "alerts": alerts,
    }


def templated_bodies(
    template: BodyTemplate, n: Notification, *, send_resolved: bool = True
) -> list[tuple[bytes, int]]:
    """One request per alert of the notification (a job API acts on one thing at a time: group_by
    the labels naming it, so that cooldown and max_per_day apply to it). Resolved alerts of a mixed
    notification are left out with ``send_resolved`` off, as are resolved-only notifications."""
    out = []
    for a in n.alerts:
        if a.status != FIRING and not send_resolved:
            continue
        fields = {
            "rule": a.rule,
            "status": a.status,
            "severity": a.severity,
            "value": a.value,
            "starts_at": rfc3339(a.starts_at),
            "ends_at": rfc3339(a.ends_at) if a.ends_at is not None else "",
            "fingerprint": fingerprint(a.labels),
            "labels": a.labels,
            "annotations": a.annotations,
            "group_labels": n.group_labels,
        }
        out.append((template.render(fields).encode(), 1))
    return out


def fingerprint(labels: dict[str, str]) -> str:
    """A stable id of a label set (hex), like Alertmanager's, though not the same hash."""
    import hashlib

    text = "\xff".join(f"{k}\xfe{v}" for k, v in sorted(labels.items()))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def alertmanager_body(
    events: list[AlertEvent], now: float, firing_for_s: float, generator_url: str
) -> list[dict[str, Any]]:
    """POST /api/v2/alerts: a firing alert carries endsAt = now + ``firing_for_s`` (it is re-sent
    before then, as Prometheus does); a resolved one its resolve time. A severity change resolves the
    alert of the previous severity (a different label set to Alertmanager)."""
    out = []
    for a in events:
        ends = a.ends_at if a.ends_at is not None else now + firing_for_s
        entry: dict[str, Any] = {
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": rfc3339(a.starts_at),
            "endsAt": rfc3339(ends),
        }
        if generator_url:
            entry["generatorURL"] = generator_url
        out.append(entry)
        if a.previous_severity is not None:
            old = {**entry, "labels": {**a.labels, "severity": a.previous_severity}, "endsAt": rfc3339(now)}
            out.append(old)
    return out


class LogNotifier:
    """One log line per alert of a notification: WARNING when firing, INFO when resolved."""

    name = "log"

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def notify(self, n: Notification, now: float) -> None:
        for a in n.alerts:
            level = logging.WARNING if a.status == FIRING else logging.INFO
            self._log.log(
                level,
                "alert %s%s %s [%s]: %s",
                a.rule,
                " (repeat)" if n.repeat else "",
                a.status,
                a.severity,
                a.annotations.get("summary", ""),
            )


class HttpNotifier:
    """A receiver reached over HTTP through its own sending queue."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        url: str,
        headers: dict[str, str],
        timeout_s: float,
        queue: QueueConfig,
        retry: RetryConfig,
        encode: Callable[[Notification, float], list[tuple[Any, int]]],
        *,
        send_resolved: bool = True,
    ) -> None:
        self.name = name
        self.url = url
        self._encode = encode
        self._send_resolved = send_resolved
        self._headers = {**headers, "User-Agent": USER_AGENT}
        if not any(k.lower() == "content-type" for k in headers):  # a body_template may be other than JSON
            self._headers["Content-Type"] = "application/json"
        self._log = settings.logger
        proc = settings.telemetry
        sender_id = f"{proc.id}:{name}"
        # The Sender's metric families are exporter-labelled; a processor label there would clash.
        sender_settings = Settings(
            id=ComponentId.parse(sender_id),
            kind=ComponentKind.EXPORTER,
            telemetry=ComponentTelemetry(proc.telemetry, ComponentKind.EXPORTER.value, sender_id),
            logger=settings.logger.getChild(name),
            shutdown_timeout_s=settings.shutdown_timeout_s,
        )
        self.sender = Sender(sender_settings, self._post, queue, retry, timeout_s, fifo=True)
        self._session: aiohttp.ClientSession | None = None
        self._queued = proc.counter(
            "alert_notifications_total", "Notifications queued for delivery, by receiver.", receiver=name
        )
        self._sent = proc.counter(
            "alert_notifications_sent_total", "Notifications a receiver accepted, by receiver.", receiver=name
        )
        self._proc = proc
        self._pending = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        try:
            await self.sender.start()  # takes the disk queue's lock, or fails
        except BaseException:
            await self._session.close()
            self._session = None
            raise

    def notify(self, n: Notification, now: float) -> None:
        """Queue the requests ``encode`` makes of ``n`` (none for a resolved-only notification when
        ``send_resolved`` is off)."""
        if not n.firing and not self._send_resolved:
            return
        for body, alerts in self._encode(n, now):
            self.offer(body, alerts)

    def offer(self, body: Any, alerts: int) -> None:
        """Queue one request: ``body`` as JSON, or as it is when already bytes (a rendered template)."""
        payload = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        try:
            self.sender.offer(Request(payload, alerts, kind=self.name))
        except Backpressure as exc:
            # full_policy block with a full queue: a notification cannot wait for space inside consume
            self._failed(exc.reason).value += 1
            self._log.warning("%s: notification dropped: %s", self.name, exc.reason)
            return
        self._queued.value += 1
        self._pending += 1

    async def commit(self) -> None:
        """Make what was offered durable (disk queue, fsync: batch)."""
        if self._pending:
            self._pending = 0
            await self.sender.commit()

    def _failed(self, reason: str) -> Any:
        return self._proc.counter(
            "alert_notifications_failed_total",
            "Notification send attempts that failed (retried unless permanent), by receiver and reason.",
            receiver=self.name,
            reason=reason,
        )

    async def _post(self, request: Request) -> None:
        session = self._session
        if session is None:  # the Sender's workers start after the session; kept for safety, retried
            raise RetryableError("not started", reason="not_started")
        try:
            async with session.post(self.url, data=request.payload, headers=self._headers) as resp:
                if 200 <= resp.status < 300:
                    self._sent.value += 1
                    return
                body = (await resp.text(errors="replace"))[:512]
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._failed("connection_error").value += 1
            raise RetryableError(f"{self.url}: {exc!r}", reason="connection_error") from None
        reason = f"http_{resp.status}"
        self._failed(reason).value += 1
        if resp.status == 429 or resp.status >= 500:
            raise RetryableError(
                f"HTTP {resp.status}: {body}", reason=reason, retry_after_s=_retry_after(resp)
            )
        raise PermanentError(f"HTTP {resp.status} from {self.url}: {body}", reason=reason)

    async def shutdown(self, timeout_s: float) -> None:
        """Drain for up to ``timeout_s`` (a disk queue keeps the rest for the next run). Idempotent."""
        await self.sender.shutdown(timeout_s)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None
