"""Partitioned sending: an exporter's own :class:`~agent.sending.Sender` plus one per partition key (a
tenant), each with its own queue — in memory, or its own disk partition — so a partition whose backend
fails never delays another.

An exporter supplies how a request is sent for a key (``send(request, tenant)``, ``tenant`` None for
its own queue); this module creates a key's sender on first use and starts it, caps how many there are,
reopens the backlogs a previous run left on disk, and stops them all together (concurrently: every
partition drains within the same deadline, a stuck one does not eat the others').

With ``full_policy: block``, given how to find the keys a batch names (``keys_of``), it registers one
admission check (:meth:`PartitionedSender.refusal`, in the exporter's ``Settings.admission``): a batch
is refused whole when the queue of any key it names is full — before any key's queue took its part —
and batches naming only other keys still pass. (The default sender registers its own check.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Protocol

from agent.component import Backpressure, Settings, admit, admitted, end_admission
from agent.diskqueue import DiskQueue
from agent.model import Batch
from agent.sending import QueueConfig, Request, RetryConfig, Sender, drop_unroutable


class SendTo(Protocol):
    """How an exporter sends one request of a partition (``tenant`` None: its own queue)."""

    def __call__(self, request: Request, tenant: str | None = None) -> Awaitable[None]: ...


class PartitionedSender:
    """The senders of one exporter: :attr:`default` (created here, started by :meth:`start`) and one
    per key, created by :meth:`get`. Shutdown is idempotent and safe before start."""

    def __init__(
        self,
        settings: Settings,
        send: SendTo,
        queue: QueueConfig,
        retry: RetryConfig,
        timeout_s: float,
        *,
        max_partitions: int,
        fifo: bool = True,
        keys_of: Callable[[Batch], Iterable[str | None]] | None = None,
    ) -> None:
        """``max_partitions``: keys with their own sender at most; :meth:`get` answers None beyond.
        ``keys_of``: the key of each item of a batch (None: the default sender's), lazily and without
        taking anything; with ``full_policy: block`` it makes :meth:`refusal` an admission check."""
        self._settings = settings
        self._send = send
        self._queue = queue
        self._retry = retry
        self._timeout_s = timeout_s
        self._fifo = fifo
        self._max = max_partitions
        self.default = Sender(settings, send, queue, retry, timeout_s, fifo=fifo)
        """The exporter's own sender: data without a partition key."""
        self._senders: dict[str, Sender] = {}
        self._lock = asyncio.Lock()
        """Held while a sender is created and started, and while they are collected to stop: no
        sender is half-started when they stop."""
        self._sync_hooks: list[Callable[[], None]] = []
        self._closing = False
        self._redirected = False
        self._keys_of = keys_of
        if keys_of is not None and queue.full_policy == "block":
            settings.admission.add(self.refusal)

    @property
    def closing(self) -> bool:
        """True once :meth:`stop_opening` (or shutdown, hand-over) was called: no new partitions."""
        return self._closing

    def stop_opening(self) -> None:
        """From now on :meth:`get` opens no partition (shutdown has begun)."""
        self._closing = True

    def refusal(self, batch: Batch) -> Backpressure | None:
        """The refusal of the first full key's queue that ``batch`` names, or None; takes nothing. Asks
        every key's sender (a few calls per key), and reads the batch's keys only when one is full —
        then as far as the first item of a full key."""
        full: dict[str, Backpressure] = {}
        for key, sender in self._senders.items():
            refused = sender.refusal(batch)
            if refused is not None:
                full[key] = refused
        if not full or self._keys_of is None:
            return None
        for named in self._keys_of(batch):
            if named is not None and named in full:
                return full[named]
        return None

    def refusal_whole(self, batch: Batch) -> Backpressure | None:
        """What taking ``batch`` whole would be refused with (the default sender's refusal, then the
        first full key's it names), or None; takes nothing."""
        return self.default.refusal(batch) or self.refusal(batch)

    @contextlib.contextmanager
    def admitting(self, batch: Batch) -> Iterator[None]:
        """Take ``batch`` whole inside: when no fan-out admitted it (a direct caller, or a batch that
        waited for the exporter's lock), first ask the default sender and the tenants' (raising the
        refusal, nothing taken), then mark the hand-over admitted (:func:`agent.component.admit`), so
        each queue takes its part even past its size."""
        if admitted():
            yield
            return
        refused = self.refusal_whole(batch)
        if refused is not None:
            raise refused
        token = admit()
        try:
            yield
        finally:
            end_admission(token)

    async def start(self) -> None:
        """Start the default sender (a disk queue takes its directory's lock here, or fails)."""
        await self.default.start()

    async def open_backlogs(self) -> None:
        """Start the sender of every key with a partition a previous run left on disk, so its backlog
        drains now rather than once the key sends again. Nothing to do with a memory queue."""
        if self._queue.storage != "disk":
            return
        disk = DiskQueue(self._queue.disk(), str(self._settings.id))
        for key in await asyncio.to_thread(disk.existing_tenants):
            if key is not None:
                await self.get(key)

    def sync_first(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` before every sync of every disk queue, present and future
        (:meth:`Sender.sync_first`)."""
        self._sync_hooks.append(hook)
        for sender in (self.default, *self._senders.values()):
            sender.sync_first(hook)

    async def get(self, key: str) -> Sender | None:
        """The sender of ``key``, created and started on first use; None beyond ``max_partitions``,
        once closing, or when its queue cannot be opened (logged; the next call tries again)."""
        sender = self._senders.get(key)
        if sender is not None:
            return sender
        async with self._lock:
            sender = self._senders.get(key)
            if sender is not None or self._closing or len(self._senders) >= self._max:
                return sender
            sender = Sender(
                self._settings,
                functools.partial(self._send, tenant=key),
                self._queue,
                self._retry,
                self._timeout_s,
                fifo=self._fifo,
                tenant=key,
            )
            for hook in self._sync_hooks:
                sender.sync_first(hook)
            if self._redirected:
                sender.redirect()
            try:
                await sender.start()
            except Exception as exc:
                self._settings.logger.error("cannot open the queue of tenant %s: %s", key, exc)
                await sender.shutdown(0)
                return None
            self._senders[key] = sender
            return sender

    def redirect(self) -> None:
        """:meth:`Sender.redirect` every sender, present and future."""
        self._redirected = True
        for sender in (self.default, *self._senders.values()):
            sender.redirect()

    async def shutdown(self, timeout_s: float) -> None:
        """Stop every sender, draining each until ``timeout_s`` (concurrently)."""
        self._closing = True
        self._settings.admission.remove(self.refusal)
        async with self._lock:
            senders = [self.default, *self._senders.values()]
        await asyncio.gather(*(s.shutdown(timeout_s) for s in senders))

    async def hand_over(self) -> dict[str | None, list[Request]]:
        """Stop without draining (a reload replaces the exporter) and return the queued requests by key
        (None: the default sender's), for :meth:`adopt` of the successor."""
        self._closing = True
        self._settings.admission.remove(self.refusal)
        async with self._lock:
            senders: dict[str | None, Sender] = {None: self.default}
            senders.update(self._senders)
        taken = await asyncio.gather(*(s.hand_over() for s in senders.values()))
        return {key: requests for key, requests in zip(senders, taken, strict=True) if requests}

    async def adopt(
        self,
        queued: dict[str | None, list[Request]],
        *,
        partitioned: bool,
        convert: Callable[[list[Request]], Awaitable[list[Request]]] | None = None,
    ) -> None:
        """Queue a predecessor's requests (:meth:`hand_over`) ahead of new data, each key's in that
        key's sender, through ``convert`` when given. Requests of a key this exporter cannot route
        (``partitioned`` false: routing by key is now off; or over ``max_partitions``) are dropped and
        counted (tenant_routing_changed): sent through the default queue they would land in the wrong
        tenant."""
        for key, requests in queued.items():
            if key is None:
                sender: Sender | None = self.default
            else:
                sender = await self.get(key) if partitioned else None
            if sender is None:
                drop_unroutable(self._settings, key, requests)
                continue
            if convert is not None:
                requests = await convert(requests)
            await sender.adopt(requests)
