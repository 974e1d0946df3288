"""The sending machinery every network exporter composes: queue → retry → timeout → send.

An exporter encodes a batch into one or more :class:`Request` s and offers them to its
:class:`Sender`. Workers take requests in order (one worker keeps per-series order for remote-write),
call the exporter's ``send`` under a timeout, and classify the outcome: success counts ``sent``; a
:class:`PermanentError` drops and counts; anything else is retried with capped, jittered exponential
backoff that honours the server's ``Retry-After`` until ``max_elapsed_time``. A full queue drops by the
configured policy and counts it. On shutdown the queue drains until the deadline; what is left is
counted as dropped with reason ``shutdown``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from agent.component import PermanentError, RetryableError, Settings, Tasks
from agent.confmodel import Duration


@dataclass(frozen=True)
class RetryConfig:
    enabled: bool = True
    """Retry failed sends (5xx, 429, timeouts, connection errors). 4xx other than 429 are never retried."""
    initial_interval: Duration = Duration(1.0)
    """Wait before the first retry."""
    max_interval: Duration = Duration(30.0)
    """Cap on the wait between retries."""
    multiplier: float = 1.5
    """Each wait is the previous one times this."""
    randomization_factor: float = 0.5
    """Jitter: each wait is drawn uniformly from wait × (1 ± this)."""
    max_elapsed_time: Duration = Duration(300.0)
    """Give up on a request (drop and count it) after retrying this long; 0 retries forever."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.initial_interval <= 0:
            problems.append(("initial_interval", "must be greater than 0"))
        if self.max_interval < self.initial_interval:
            problems.append(("max_interval", "must be at least initial_interval"))
        if self.multiplier < 1:
            problems.append(("multiplier", "must be at least 1"))
        if not 0 <= self.randomization_factor < 1:
            problems.append(("randomization_factor", "must be in [0, 1)"))
        if self.max_elapsed_time < 0:
            problems.append(("max_elapsed_time", "must be 0 (forever) or positive"))
        return problems

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """The jittered wait before retry number ``attempt`` (0-based), capped at max_interval."""
        base = min(self.max_interval, self.initial_interval * self.multiplier**attempt)
        jitter = base * self.randomization_factor
        return float(min(self.max_interval, max(0.0, rng.uniform(base - jitter, base + jitter))))


@dataclass(frozen=True)
class QueueConfig:
    queue_size: int = 1000
    """Requests held in memory while waiting to be sent."""
    full_policy: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    """When the queue is full: drop the oldest queued request, or the new one (both counted)."""
    num_consumers: int = 1
    """Requests sent at once. Remote-write keeps per-series order only with 1."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.queue_size < 1:
            problems.append(("queue_size", "must be at least 1"))
        if self.num_consumers < 1:
            problems.append(("num_consumers", "must be at least 1"))
        return problems


@dataclass
class Request:
    """One encoded request: ``points`` is what it carries, for loss accounting."""

    payload: bytes
    points: int
    headers: dict[str, str] = field(default_factory=dict)


class Sender:
    """Owns the queue and the workers of one exporter."""

    def __init__(
        self,
        settings: Settings,
        send: Callable[[Request], Awaitable[None]],
        queue: QueueConfig,
        retry: RetryConfig,
        timeout_s: float,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._send = send
        self._queue_cfg = queue
        self._retry = retry
        self._timeout_s = timeout_s
        self._rng = rng or random.Random()
        self._log: logging.Logger = settings.logger
        self._items: collections.deque[Request] = collections.deque()
        self._available = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._closing = False
        self._deadline = float("inf")
        self._tasks = Tasks(str(settings.id), settings.logger)
        tel = settings.telemetry
        self._sent = tel.sent()
        self._requests_sent = tel.counter("exporter_sent_requests_total", "Requests an exporter delivered.")
        self._retries = tel.counter("exporter_retries_total", "Send attempts that were retried.")
        tel.gauge("exporter_queue_size", "Requests waiting in the sending queue.", lambda: len(self._items))
        tel.gauge(
            "exporter_queue_capacity", "Capacity of the sending queue in requests.", lambda: queue.queue_size
        )

    @property
    def queued(self) -> int:
        return len(self._items)

    def start(self) -> None:
        for i in range(self._queue_cfg.num_consumers):
            self._tasks.spawn(self._worker(), f"sender-{i}")

    def offer(self, request: Request) -> None:
        """Queue a request without waiting; when full, drop by policy and count."""
        if self._closing:
            self._settings.telemetry.dropped("shutdown").value += request.points
            return
        if len(self._items) >= self._queue_cfg.queue_size:
            self._settings.telemetry.dropped("queue_full").value += (
                self._items.popleft().points
                if self._queue_cfg.full_policy == "drop_oldest"
                else request.points
            )
            if self._queue_cfg.full_policy == "drop_newest":
                return
        self._items.append(request)
        self._idle.clear()
        self._available.set()

    async def _worker(self) -> None:
        while True:
            while not self._items:
                self._available.clear()
                if self._in_flight == 0:
                    self._idle.set()
                await self._available.wait()
            request = self._items.popleft()
            self._in_flight += 1
            try:
                await self._deliver(request)
            except asyncio.CancelledError:
                # Only shutdown cancels a worker; what it held is lost to this run and counted.
                self._settings.telemetry.dropped("shutdown").value += request.points
                raise
            finally:
                self._in_flight -= 1
                if not self._items and self._in_flight == 0:
                    self._idle.set()

    async def _deliver(self, request: Request) -> None:
        tel = self._settings.telemetry
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                await asyncio.wait_for(self._send(request), self._timeout_s)
            except PermanentError as exc:
                self._log.warning("dropping %d points: %s", request.points, exc)
                tel.dropped(exc.reason).value += request.points
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason, retry_after = _classify(exc)
                tel.failed(reason).value += request.points
                waited = time.monotonic() - started
                if not self._retry.enabled or (
                    self._retry.max_elapsed_time and waited >= self._retry.max_elapsed_time
                ):
                    self._log.warning(
                        "dropping %d points after %.1fs of retries: %s", request.points, waited, exc
                    )
                    tel.dropped("retries_exhausted").value += request.points
                    return
                delay = self._retry.backoff_s(attempt, self._rng)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, max(self._retry.max_interval, 300.0)))
                if time.monotonic() + delay > self._deadline:
                    tel.dropped("shutdown").value += request.points
                    return
                if attempt == 0 or self._log.isEnabledFor(logging.DEBUG):
                    self._log.warning("send failed (%s), retrying in %.2fs: %s", reason, delay, exc)
                attempt += 1
                self._retries.value += 1
                await asyncio.sleep(delay)
                continue
            self._sent.value += request.points
            self._requests_sent.value += 1
            return

    async def shutdown(self, timeout_s: float) -> None:
        """Stop taking requests, drain for up to ``timeout_s``, count the rest as dropped. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._deadline = time.monotonic() + timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        await self._tasks.close()
        left = sum(r.points for r in self._items)
        if left:
            self._log.warning("shutdown deadline reached: dropping %d queued points", left)
            self._settings.telemetry.dropped("shutdown").value += left
            self._items.clear()
        self._settings.telemetry.telemetry.unregister_gauges(exporter=self._settings.telemetry.id)


def _classify(exc: BaseException) -> tuple[str, float | None]:
    """A bounded reason label for a failed send, and the server's requested delay if any."""
    if isinstance(exc, RetryableError):
        return exc.reason, exc.retry_after_s
    if isinstance(exc, TimeoutError):
        return "timeout", None
    if isinstance(exc, (ConnectionError, OSError)):
        return "connection_error", None
    import aiohttp

    if isinstance(exc, aiohttp.ClientError):
        return "connection_error", None
    return "error", None
