"""The sending machinery every network exporter composes: queue → retry → timeout → send.

An exporter encodes a batch into one or more :class:`Request` s, offers them to its :class:`Sender`
and then awaits :meth:`Sender.commit`. Workers take requests, call the exporter's ``send`` under a
timeout, and classify the outcome: success counts ``sent``; a :class:`PermanentError` drops and counts;
anything else is retried with capped, jittered exponential backoff that honours the server's
``Retry-After``.

The queue is in memory or on disk (``storage``):

- memory: ``queue_size`` requests. Retries stop after ``max_elapsed_time`` (dropped, counted). On
  shutdown the queue drains until the deadline; what is left is counted as dropped{shutdown}.
- disk: a partition of :mod:`agent.diskqueue` per exporter, ``max_bytes`` on disk. A request is
  appended on ``offer`` and made durable by ``commit`` (``fsync: batch``; ``interval`` syncs in the
  background, ``never`` leaves it to the page cache); it leaves the disk only when the backend took it
  or refused it for good (at-least-once). Retryable failures are retried without a time limit — giving
  up after ``max_elapsed_time`` is how other queues lose the oldest hours of an outage. On shutdown
  whatever is not delivered by the deadline stays on disk for the next run; nothing is counted lost.
  Order: ``fifo`` senders (remote-write: Prometheus refuses older samples after newer ones) always
  send the oldest record first; the others alternate oldest and newest, so live data keeps flowing
  while a backlog drains.

Vital signs: every send attempt is timed into ``exporter_send_duration_seconds{exporter, outcome}``
(outcome ``success``, ``retryable`` — a failure that will be retried or was given up on, timeouts
included — or ``permanent``), and every acknowledged request into ``pipeline_latency_seconds{exporter}``:
from the receipt of the batch it came from (:func:`agent.vitals.received_s`, stamped on ``offer``) to
the backend's acknowledgement, queueing and retries included. A disk-queue record counts from when it
was written (its stored wall-clock time, so a record sent after a restart counts the time the agent
was down; encoding before the write is not counted). Two clock reads and two histogram observations
per request (0.4 µs), none per point.

Full queue: ``block`` raises :class:`Backpressure` from ``offer`` (receivers answer 429 / UNAVAILABLE,
StatsD counts the points refused) — before any consumer took part of the batch: the sender registers
:meth:`Sender.refusal` in its exporter's ``Settings.admission``, which the service's fan-outs ask first,
and a queue takes a batch they admitted whole, past ``queue_size`` (memory) or ``max_bytes`` (disk) by
at most the batches admitted while it still had room. A tenant's queue can still refuse part-way (it is
not asked at admission), and so can a full filesystem: ENOSPC is a real limit, not a budget, and is
treated as a full queue (reason ``disk_full``), part-way through a batch if it comes to that.
``drop_oldest`` / ``drop_newest`` drop and count (dropped{queue_full}).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from agent.component import Backpressure, PermanentError, RetryableError, Settings, Tasks, admitted
from agent.confmodel import Duration, Size
from agent.diskqueue import (
    DiskFull,
    DiskQueue,
    DiskQueueConfig,
    Partition,
    QueueError,
    QueueFull,
    RecordTooLarge,
    queue_directory_problems,
)
from agent.telemetry import Cell, HistogramCell
from agent.vitals import PIPELINE_LATENCY_BUCKETS_S, SEND_DURATION_BUCKETS_S, received_s

RETRY_AFTER_MAX_S = 3600.0
"""The longest Retry-After taken from a server: an hour; a longer one (or a date years ahead) is a
server's mistake, and the sender caps the wait further (``RetryConfig.max_interval``, 300 s at least)."""

STOP_GRACE_S = 1.0
"""How long stopping waits for cancelled workers to end (a send being torn down, a record released)
before it gives up on them, logs them and counts what they held."""


@dataclass(frozen=True)
class RetryConfig:
    enabled: bool = True
    """Retry failed sends the exporter calls retryable (remote-write: 5xx and 429; OTLP: 429, 502, 503,
    504 and the retryable gRPC codes), timeouts and connection errors; the rest are dropped."""
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
    storage: Literal["memory", "disk"] = "memory"
    """memory: lost on restart; disk: survives restarts and crashes (at-least-once), see directory."""
    queue_size: int = 1000
    """memory: requests held while waiting to be sent."""
    full_policy: Literal["block", "drop_oldest", "drop_newest"] = "drop_oldest"
    """When full: block (refuse new data: receivers answer 429), or drop the oldest / newest request
    (counted as dropped{queue_full}). Disk queues block or drop the oldest."""
    num_consumers: int = 1
    """Requests sent at once. Remote-write keeps per-series order only with 1."""
    directory: str = "/var/lib/headwater/queue"
    """disk: root directory; each exporter gets its own subdirectory (locked: one agent per directory)."""
    max_bytes: Size = Size(1 << 30)
    """disk: space the exporter's queue may use."""
    fsync: Literal["batch", "interval", "never"] = "batch"
    """disk: batch = durable before the receiver is answered; interval = every fsync_interval; never =
    the page cache only (survives a crash of the agent, not of the machine)."""
    fsync_interval: Duration = Duration(0.1)
    """disk: period of background syncs (the fsync for interval; acks and freed segments for all)."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.queue_size < 1:
            problems.append(("queue_size", "must be at least 1"))
        if self.num_consumers < 1:
            problems.append(("num_consumers", "must be at least 1"))
        if self.storage == "disk":
            if self.full_policy == "drop_newest":
                problems.append(("full_policy", "a disk queue blocks or drops the oldest records"))
            problems.extend(self.disk().validate())
        return problems

    def environment_problems(self) -> list[tuple[str, str]]:
        if self.storage != "disk":
            return []
        return [("directory", p) for p in queue_directory_problems(self.directory)]

    def disk(self) -> DiskQueueConfig:
        return DiskQueueConfig(
            directory=self.directory,
            max_bytes=self.max_bytes,
            full_policy="block" if self.full_policy == "block" else "drop_oldest",
            fsync=self.fsync,
            fsync_interval=self.fsync_interval,
        )


@dataclass
class Request:
    """One encoded request: ``points`` is what it carries, for loss accounting. ``kind`` is a short
    string the exporter routes by (OTLP: the signal); it is stored with the request on disk."""

    payload: bytes
    points: int
    headers: dict[str, str] = field(default_factory=dict)
    kind: str = ""
    received_s: float = 0.0
    """``time.monotonic()`` when the data was received (0: not known yet; ``offer`` stamps it)."""


_KIND = "\x00kind"
"""Where a request's ``kind`` is kept among its stored headers (no HTTP header can hold a NUL)."""


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
        fifo: bool = True,
        rng: random.Random | None = None,
        tenant: str | None = None,
    ) -> None:
        """``tenant``: this sender serves one tenant of a per-tenant routing exporter. Its disk queue is
        the tenant's own partition (``DiskQueue.partition(tenant)``), its queue size is reported as
        ``exporter_tenant_queue_size{tenant}`` and its sent and failed points also per tenant, so a
        tenant whose backend fails is visible and never holds up another tenant's queue."""
        self._settings = settings
        self._tenant = tenant
        self._send = send
        self._queue_cfg = queue
        self._retry = retry
        self._timeout_s = timeout_s
        self._fifo = fifo
        self._rng = rng or random.Random()
        self._log: logging.Logger = settings.logger
        self._items: collections.deque[Request] = collections.deque()
        self._available = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._closing = False
        self._handing_over = False
        self._queued_points = 0
        """Memory queue: points in the queued requests and in the ones being sent."""
        self._deadline = float("inf")
        self._tasks = Tasks(str(settings.id), settings.logger)
        self._disk: DiskQueue | None = None
        self._part: Partition | None = None
        self._stop_syncer = asyncio.Event()
        self._before_sync: Callable[[], None] | None = None
        self._turn = 0
        self._uncommitted = 0
        self._closed = asyncio.Event()
        """Set when shutdown starts: durable requests stop waiting to be retried."""
        self._redirected = asyncio.Event()
        """Set by :meth:`redirect`: the send function no longer reaches the backend."""
        self._ended_workers = 0
        """Disk workers that ended at shutdown (nothing left to hand out, or the backend failing)."""
        self._largest = 0
        """Disk: the largest request offered so far, the room a batch needs to be admitted."""
        if tenant is None and queue.full_policy == "block":
            # A tenant's queue is asked by its exporter's one check (agent.partitioned), for the
            # batches that name the tenant: a full one must not refuse the other tenants' data.
            settings.admission.add(self.refusal)
        tel = settings.telemetry
        self._sent = tel.sent()
        self._requests_sent = tel.counter("exporter_sent_requests_total", "Requests an exporter delivered.")
        self._retries = tel.counter("exporter_retries_total", "Send attempts that were retried.")
        self._tenant_sent: Cell | None = None
        self._tenant_failed: Cell | None = None
        if tenant is None:
            tel.gauge("exporter_queue_size", "Requests waiting in the sending queue.", lambda: self.queued)
        else:
            tel.gauge(
                "exporter_tenant_queue_size",
                "Requests waiting in one tenant's sending queue.",
                lambda: self.queued,
                tenant=tenant,
            )
            self._tenant_sent = tel.counter(
                "exporter_tenant_sent_points_total", "Points an exporter delivered, by tenant.", tenant=tenant
            )
            self._tenant_failed = tel.counter(
                "exporter_tenant_failed_points_total",
                "Points whose send attempt failed (may be retried), by tenant.",
                tenant=tenant,
            )
        # Created up front so they show at 0 before the first send (a dashboard sees the exporter).
        self._durations = {
            outcome: tel.histogram(
                "exporter_send_duration_seconds",
                "Duration of each send attempt to the backend, by outcome (success, retryable, permanent).",
                SEND_DURATION_BUCKETS_S,
                outcome=outcome,
            )
            for outcome in ("success", "retryable", "permanent")
        }
        self._latency: HistogramCell = tel.histogram(
            "pipeline_latency_seconds",
            "From receipt of the data to the backend's acknowledgement of the request carrying it.",
            PIPELINE_LATENCY_BUCKETS_S,
        )
        self._durable = tel.counter(
            "exporter_durable_points_total",
            "Points in requests fsynced to the disk queue (fsync: batch): safe from a crash from then on.",
        )
        if queue.storage == "memory" and tenant is None:
            tel.gauge(
                "exporter_queue_capacity",
                "Capacity of the sending queue in requests.",
                lambda: queue.queue_size,
            )
            tel.gauge(
                "exporter_queue_points",
                "Points in the memory sending queue's requests, those being sent included.",
                lambda: self._queued_points,
            )

    @property
    def queued(self) -> int:
        part = self._part
        return part.records if part is not None else len(self._items)

    async def start(self) -> None:
        """Open the disk queue (recovering what a previous run left) and start the workers."""
        if self._queue_cfg.storage == "disk" and self._part is None:
            disk = DiskQueue(self._queue_cfg.disk(), str(self._settings.id), self._settings.telemetry)
            # Scans the segments: not on the loop.
            self._part = await asyncio.to_thread(disk.partition, self._tenant)
            self._part.before_sync = self._before_sync
            self._disk = disk
            if self._part.records:
                self._log.info(
                    "disk queue %s%s: %d requests from a previous run will be sent first",
                    self._queue_cfg.directory,
                    "" if self._tenant is None else f" (tenant {self._tenant})",
                    self._part.records,
                )
                self._idle.clear()
            self._tasks.spawn(disk.run_syncer(self._stop_syncer), "disk-syncer")
        worker = self._disk_worker if self._part is not None else self._worker
        for i in range(self._queue_cfg.num_consumers):
            self._tasks.spawn(worker(), f"sender-{i}")

    def sync_first(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (blocking, in the syncing thread) before every sync of the disk queue, whether
        ``commit``, the background syncer or the final one makes it: what it makes durable is then
        durable before any request offered after it was written."""
        self._before_sync = hook
        if self._part is not None:
            self._part.before_sync = hook

    def refusal(self, batch: object = None) -> Backpressure | None:
        """The refusal a batch meets now (``block`` and the queue full), or None: an admission check
        (:class:`agent.component.Admission`); takes nothing."""
        if self._closing or self._queue_cfg.full_policy != "block":
            return None
        part = self._part
        if part is not None:
            if part.used_bytes + self._largest > self._queue_cfg.max_bytes:
                return Backpressure("queue_full")
            return None
        return Backpressure("queue_full") if len(self._items) >= self._queue_cfg.queue_size else None

    def offer(self, request: Request) -> None:
        """Queue a request without waiting. When full: raise :class:`Backpressure` (``block``) or drop by
        policy and count. A queue takes the requests of an admitted batch (:func:`agent.component.admitted`)
        past its size (memory) or ``max_bytes`` (disk) rather than refuse the batch part-way; a full
        filesystem still refuses (``disk_full``)."""
        tel = self._settings.telemetry
        if self._closing:
            tel.dropped("shutdown").value += request.points
            return
        if not request.received_s:
            request.received_s = received_s()
        if self._part is not None:
            self._offer_disk(self._part, request)
            return
        policy = self._queue_cfg.full_policy
        if len(self._items) >= self._queue_cfg.queue_size and not (policy == "block" and admitted()):
            if policy == "block":
                raise Backpressure("queue_full")
            if policy == "drop_newest":
                tel.dropped("queue_full").value += request.points
                return
            oldest = self._items.popleft()
            self._queued_points -= oldest.points
            tel.dropped("queue_full").value += oldest.points
        self._items.append(request)
        self._queued_points += request.points
        self._idle.clear()
        self._available.set()

    def _offer_disk(self, part: Partition, request: Request) -> None:
        headers = dict(request.headers)
        if request.kind:
            headers[_KIND] = request.kind
        tel = self._settings.telemetry
        self._largest = max(self._largest, len(request.payload))
        # An admitted batch goes in whole, past max_bytes if need be, as into a memory queue; a
        # tenant's queue is not asked at admission, so it is not covered by one.
        whole = self._queue_cfg.full_policy == "block" and self._tenant is None and admitted()
        try:
            result = part.append(request.payload, items=request.points, headers=headers, admitted=whole)
        except DiskFull:
            if self._queue_cfg.full_policy == "block":
                raise Backpressure("disk_full") from None
            tel.dropped("disk_full").value += request.points
            return
        except QueueFull:
            raise Backpressure("queue_full") from None
        except RecordTooLarge:
            tel.dropped("too_large").value += request.points
            return
        if result.dropped_items:
            tel.dropped("queue_full").value += result.dropped_items
        self._uncommitted += request.points
        self._idle.clear()
        self._available.set()

    async def commit(self) -> None:
        """Make what was offered durable as the queue's fsync policy says (``batch``: now, off the loop).
        Exporters await it once per batch, before the batch counts as taken."""
        if self._part is not None and self._queue_cfg.fsync == "batch":
            points, self._uncommitted = self._uncommitted, 0
            await self._part.sync_async()
            self._durable.value += points

    async def _worker(self) -> None:
        while True:
            while not self._items:
                self._available.clear()
                if self._in_flight == 0:
                    self._idle.set()
                if self._closing:
                    return  # nothing more can come: end without waiting to be cancelled
                await self._available.wait()
            request = self._items.popleft()
            # What _queued_points counted for it: a send may lower request.points (a partial success,
            # a request routed elsewhere) and the queue must still let go of all it held.
            held = request.points
            self._in_flight += 1
            requeued = False
            try:
                await self._deliver(request, durable=False)
            except asyncio.CancelledError:
                if self._handing_over:
                    # The successor sends it (again, if this send had reached the backend: at least once).
                    self._items.appendleft(request)
                    requeued = True
                else:
                    # Only shutdown cancels a worker; what it held is lost to this run and counted.
                    self._settings.telemetry.dropped("shutdown").value += request.points
                raise
            finally:
                self._in_flight -= 1
                if not requeued:
                    self._queued_points -= held
                if not self._items and self._in_flight == 0:
                    self._idle.set()

    async def _disk_worker(self) -> None:
        part = self._part
        assert part is not None
        while True:
            oldest = self._fifo or self._turn % 2 == 0
            self._turn += 1
            record = part.next(oldest=oldest)
            if record is None:
                self._available.clear()
                if self._in_flight == 0 and part.pending == 0:
                    self._idle.set()
                if self._closing:
                    self._worker_ended()  # what is left stays on disk
                    return
                await self._available.wait()
                continue
            headers = dict(record.headers)
            kind = headers.pop(_KIND, "")
            # Written at record.time_ms (wall clock: it survives restarts), as a monotonic time.
            written_s = time.monotonic() - max(0.0, time.time() - record.time_ms / 1000)
            request = Request(record.payload, record.items, headers, kind, written_s)
            self._in_flight += 1
            try:
                done = await self._deliver(request, durable=True)
            except asyncio.CancelledError:
                part.release(record.seq)  # stays on disk for the next run: not lost, not counted
                raise
            finally:
                self._in_flight -= 1
            if done:
                part.ack(record.seq)
            else:
                part.release(record.seq)
                self._worker_ended()
                return  # shutting down: leave the rest on disk

    def _worker_ended(self) -> None:
        # However each ended — one kept its record, another found nothing to hand out while the first
        # was still sending — once every worker has ended nothing more leaves before the next run:
        # shutdown must not wait out its deadline for them.
        self._ended_workers += 1
        if self._ended_workers >= self._queue_cfg.num_consumers:
            self._idle.set()

    async def _deliver(self, request: Request, *, durable: bool) -> bool:
        """Send with retries. True when the request is finished with (sent, or dropped and counted);
        False when a durable request is kept for the next run because shutdown came first."""
        tel = self._settings.telemetry
        durations = self._durations
        started = time.monotonic()
        attempt = 0
        while True:
            sent_at = time.monotonic()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the send's outcome when
                # the worker is cancelled just as the send finishes, swallowing the cancellation — the
                # worker then went back to waiting for work and shutdown waited for it forever.
                async with asyncio.timeout(self._timeout_s):
                    await self._send(request)
            except PermanentError as exc:
                durations["permanent"].observe(time.monotonic() - sent_at)
                self._log.warning("dropping %d points: %s", request.points, exc)
                tel.dropped(exc.reason).value += request.points
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                durations["retryable"].observe(time.monotonic() - sent_at)
                reason, retry_after = _classify(exc)
                tel.failed(reason).value += request.points
                if self._tenant_failed is not None:
                    self._tenant_failed.value += request.points
                waited = time.monotonic() - started
                redirected = self._redirected.is_set()
                exhausted = not self._retry.enabled or (
                    self._retry.max_elapsed_time and waited >= self._retry.max_elapsed_time
                )
                if not durable and not redirected and exhausted:
                    self._log.warning(
                        "dropping %d points after %.1fs of retries: %s", request.points, waited, exc
                    )
                    tel.dropped("retries_exhausted").value += request.points
                    return True
                if durable and self._closing and not redirected:
                    return False  # safe on disk: no point retrying a failing backend during shutdown
                delay = self._retry.backoff_s(attempt, self._rng)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, max(self._retry.max_interval, 300.0)))
                if time.monotonic() + delay > self._deadline:
                    if durable:
                        return False
                    tel.dropped("shutdown").value += request.points
                    return True
                if attempt == 0 or self._log.isEnabledFor(logging.DEBUG):
                    self._log.warning("send failed (%s), retrying in %.2fs: %s", reason, delay, exc)
                attempt += 1
                self._retries.value += 1
                if redirected:
                    await asyncio.sleep(delay)  # the new way refused it (a full queue): back off
                else:
                    # A redirect ends the wait: the next attempt goes the new way. For a durable request
                    # so does a shutdown: it stays on disk for the next run.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await (self._closed if durable else self._redirected).wait()
                continue
            now = time.monotonic()
            durations["success"].observe(now - sent_at)
            self._latency.observe(now - (request.received_s or sent_at))
            self._sent.value += request.points
            if self._tenant_sent is not None:
                self._tenant_sent.value += request.points
            self._requests_sent.value += 1
            return True

    def redirect(self) -> None:
        """The send function no longer reaches the backend but hands each request elsewhere (a
        ``loadbalancing`` gateway that left reroutes its queue to the new owners of its keys): waits
        for a retry end now, and a request whose attempt fails — one in flight to the old backend when
        this was called — is tried again, the new way, however its retries stood and even once
        shutdown has begun (until its deadline), rather than kept on disk for the next run or dropped."""
        self._redirected.set()
        self._closed.set()

    async def shutdown(self, timeout_s: float) -> None:
        """Stop taking requests, drain for up to ``timeout_s``; then count what is left as dropped
        (memory) or leave it on disk for the next run (disk). Returns within ``timeout_s`` plus
        :data:`STOP_GRACE_S`, whatever the backend does — and by the agent's stop deadline
        (``Settings.stop_remaining_s``) when that comes first. Idempotent."""
        if self._closing:
            return
        timeout_s = max(0.0, min(timeout_s, self._settings.stop_remaining_s()))
        self._closing = True
        self._closed.set()
        self._available.set()  # idle workers end at once
        self._deadline = time.monotonic() + timeout_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        await self._stop(hand_over=False)

    async def hand_over(self) -> list[Request]:
        """Stop at once, without draining, for a successor that takes the queue over (a reload changed
        the exporter's config). Memory: the queued requests are returned oldest first — a request being
        sent is abandoned and returned too (the successor sends it again: at least once) — and nothing is
        counted as dropped. Disk: the records stay in the partition, which is synced, closed and unlocked
        for the successor to reopen; nothing is returned. Afterwards this sender is shut down (``offer``
        counts dropped{shutdown}). Returns [] when shutdown had begun."""
        if self._closing:
            return []
        self._closing = True
        self._handing_over = True
        self._closed.set()
        self._available.set()
        return await self._stop(hand_over=True)

    async def adopt(self, requests: list[Request]) -> None:
        """Queue a predecessor's requests (from :meth:`hand_over`) ahead of everything offered here: they
        are older. A memory queue takes them all, past queue_size if need be (they were accepted already;
        new offers meet the full queue until it drains); a disk queue appends and syncs them, counting
        what it cannot write as dropped{write_error}. Never raises (there is no caller to refuse to)."""
        if not requests:
            return
        if self._closing:
            self._settings.telemetry.dropped("shutdown").value += sum(r.points for r in requests)
            return
        part = self._part
        if part is None:
            self._items.extendleft(reversed(requests))
            self._queued_points += sum(r.points for r in requests)
            self._idle.clear()
            self._available.set()
            return
        tel = self._settings.telemetry
        for request in requests:
            try:
                self._offer_disk(part, request)
            except Backpressure as exc:
                tel.dropped(exc.reason).value += request.points
            except (OSError, QueueError) as exc:  # no caller to refuse to: count it, keep the rest
                self._log.error("cannot queue a handed-over request of %d points: %s", request.points, exc)
                tel.dropped("write_error").value += request.points
        try:
            await self.commit()
        except OSError as exc:  # queued all the same: not durable yet, sent like the rest
            self._log.error("cannot sync the handed-over requests to disk: %s", exc)

    async def _stop(self, *, hand_over: bool) -> list[Request]:
        self._settings.admission.remove(self.refusal)
        self._stop_syncer.set()
        stuck = await self._tasks.close(STOP_GRACE_S)
        taken = list(self._items) if hand_over else []
        # What the queue and the workers still held; a worker that would not stop (``stuck``) took its
        # request with it: counted too.
        lost = self._queued_points - sum(r.points for r in taken)
        if lost > 0:
            self._log.warning(
                "shutdown deadline reached: dropping %d queued points%s",
                lost,
                f" ({len(stuck)} sender workers did not stop)" if stuck else "",
            )
            self._settings.telemetry.dropped("shutdown").value += lost
        self._items.clear()
        self._queued_points = 0
        if taken:
            self._log.info("handing %d queued requests to the reloaded exporter", len(taken))
        if self._disk is not None and self._part is not None:
            kept = self._part.records
            await asyncio.to_thread(self._disk.close)  # final sync and unlock
            if kept:
                self._log.warning(
                    "%d requests stay in the disk queue %s for the %s",
                    kept,
                    self._queue_cfg.directory,
                    "reloaded exporter" if hand_over else "next run",
                )
            self._part = None
        tel = self._settings.telemetry
        if self._tenant is None:
            tel.telemetry.unregister_gauges(exporter=tel.id)
        else:  # only this tenant's: the exporter's other senders may still be draining
            tel.telemetry.unregister_gauges(exporter=tel.id, tenant=self._tenant)
        return taken


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


def drop_unroutable(settings: Settings, tenant: str | None, requests: list[Request]) -> None:
    """A reloaded exporter cannot route a handed-over tenant's requests (routing now off, or over its
    tenant limit): sent anywhere else they would land in the wrong tenant, so they are dropped and
    counted as dropped{tenant_routing_changed}."""
    points = sum(r.points for r in requests)
    settings.logger.warning("dropping %d queued points of tenant %s: cannot route them", points, tenant)
    settings.telemetry.dropped("tenant_routing_changed").value += points


def retry_after_s(value: str | None, now_s: float | None = None) -> float | None:
    """The delay a ``Retry-After`` header asks for, in seconds (RFC 9110 10.2.3): delta-seconds (ASCII
    digits only) or an HTTP date (0 once past), at most :data:`RETRY_AFTER_MAX_S`. None when absent
    or unreadable (negative, fractional, other digits): the caller's own backoff applies. Never raises."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is true too, and float() refuses it
        return min(float(value), RETRY_AFTER_MAX_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    delay = when.timestamp() - (time.time() if now_s is None else now_s)
    return min(max(0.0, delay), RETRY_AFTER_MAX_S)
