"""Batch processor: gathers points, spans or log records into larger batches before they go on.

Shaped like the OpenTelemetry Collector's batch processor::

    processors:
      batch:
        send_batch_size: 8192       # send once this many points / spans / records are held
        timeout: 200ms              # ... or once the oldest has waited this long
        send_batch_max_size: 0      # split what is sent into batches of at most this many (0: no limit)

Batches with different request context (tenant headers, ``auth.tenant``) are never merged: each
distinct context has its own buffer, so per-tenant routing downstream still sees each tenant's data
apart. Up to ``max_contexts`` buffers are kept; data of further contexts passes straight through
(split if needed) rather than growing memory.

Sending: when a buffer reaches ``send_batch_size`` it is sent by the ``consume`` call that filled it,
so backpressure from downstream reaches that caller: the data already held stays held, the caller's
batch is refused (``Backpressure`` propagates) unless part of it was already delivered, in which case
the rest is kept and the call succeeds. Buffers that time out are sent by a background task; if
downstream refuses then, the data is kept and retried after the refusal's ``retry_after_s`` (or
``timeout``). A buffer therefore never holds more than ``send_batch_size`` plus one incoming batch.
``shutdown`` sends everything held; what downstream refuses then is counted as
``processor_dropped_points_total{reason="shutdown"}``. An error other than a refusal drops only the
chunk it was raised for (``reason="downstream_error"``, logged). With ``timeout: 0`` (or past
``max_contexts``) a refusal is passed to the caller as is, even if earlier chunks of a split batch went.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.component import Backpressure, ComponentKind, Consumer, Factory, Settings, Signal, Tasks
from agent.confmodel import Duration
from agent.counting import PointCounts
from agent.model import Batch, LogBatch, MetricBatch, SpanBatch

TYPE = "batch"


@dataclass(frozen=True)
class BatchConfig:
    send_batch_size: int = 8192
    """Points, spans or log records after which a batch is sent regardless of the timeout."""
    timeout: Duration = Duration(0.2)
    """Longest time data waits before it is sent; 0 sends every batch at once (split only)."""
    send_batch_max_size: int = 0
    """Largest batch sent on (larger ones are split); 0 means no limit. At least send_batch_size."""
    max_contexts: int = 1000
    """Distinct request contexts (e.g. tenants) buffered at once; data of others passes unbatched."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.send_batch_size < 1:
            problems.append(("send_batch_size", "must be at least 1"))
        if self.timeout < 0:
            problems.append(("timeout", "must not be negative"))
        if self.send_batch_max_size < 0:
            problems.append(("send_batch_max_size", "must not be negative (0 means no limit)"))
        elif 0 < self.send_batch_max_size < self.send_batch_size:
            problems.append(("send_batch_max_size", "must be 0 or at least send_batch_size"))
        if self.max_contexts < 1:
            problems.append(("max_contexts", "must be at least 1"))
        return problems


# -- units: what a buffer holds ----------------------------------------------------------------------
#
# Metrics: a unit is a Point (weight 1). Traces / logs: a unit is a (ResourceSpans|ResourceLogs, count)
# pair, as it arrived; only when a chunk is cut is a message split, so that each chunk is filled up to
# send_batch_max_size. A split never mixes two units, so old and new data stay apart.

Unit = Any
_FIELDS: dict[type, tuple[str, str]] = {
    SpanBatch: ("scope_spans", "spans"),
    LogBatch: ("scope_logs", "log_records"),
}


def split_message(
    rm: Any, scope_field: str, item_field: str, max_size: int, first: int = 0
) -> list[tuple[Any, int]]:
    """New messages holding ``first`` items (``max_size`` if 0), then ``max_size`` items each (the last
    fewer), with the resource and scopes copied into each; ``rm`` itself is not changed."""
    parts: list[tuple[Any, int]] = []
    current: Any = None
    count = 0
    limit = first or max_size
    for scope in getattr(rm, scope_field):
        new_scope: Any = None
        for item in getattr(scope, item_field):
            if current is None or count >= limit:
                if current is not None:
                    parts.append((current, count))
                    limit = max_size
                current = rm.__class__()
                current.resource.CopyFrom(rm.resource)
                current.schema_url = rm.schema_url
                count = 0
                new_scope = None
            if new_scope is None:
                new_scope = getattr(current, scope_field).add()
                new_scope.scope.CopyFrom(scope.scope)
                new_scope.schema_url = scope.schema_url
            getattr(new_scope, item_field).add().CopyFrom(item)
            count += 1
    if current is not None:
        parts.append((current, count))
    return parts


class _Kind:
    """How one signal's batches are taken apart into units and rebuilt from them."""

    def __init__(self, signal: type, max_size: int) -> None:
        self.signal = signal
        self.max_size = max_size
        self.fields = _FIELDS.get(signal, ("", ""))

    def units(self, batch: Any) -> list[Unit]:
        if isinstance(batch, MetricBatch):
            return list(batch.points)
        scope_field, item_field = self.fields
        messages = batch.resource_spans if isinstance(batch, SpanBatch) else batch.resource_logs
        return [(rm, sum(len(getattr(s, item_field)) for s in getattr(rm, scope_field))) for rm in messages]

    def weight(self, unit: Unit) -> int:
        return 1 if self.signal is MetricBatch else int(unit[1])

    def total(self, units: list[Unit]) -> int:
        return len(units) if self.signal is MetricBatch else sum(u[1] for u in units)

    def build(self, units: list[Unit], context: Mapping[str, str]) -> Batch:
        if self.signal is MetricBatch:
            return MetricBatch(tuple(units), context)
        count = sum(u[1] for u in units)
        messages = tuple(u[0] for u in units)
        if self.signal is SpanBatch:
            return SpanBatch(messages, context, span_count=count)
        return LogBatch(messages, context, record_count=count)

    def chunks(self, units: list[Unit]) -> list[tuple[list[Unit], int]]:
        """Consecutive runs of units, each weighing at most max_size (all of them when max_size is 0);
        OTLP messages are split where a chunk boundary falls inside one."""
        m = self.max_size
        if m <= 0:
            return [(units, self.total(units))] if units else []
        if self.signal is MetricBatch:
            return [(units[i : i + m], len(units[i : i + m])) for i in range(0, len(units), m)]
        out: list[tuple[list[Unit], int]] = []
        current: list[Unit] = []
        weight = 0
        for unit in units:
            pieces = [unit]
            if weight + unit[1] > m:
                pieces = split_message(unit[0], *self.fields, m, first=m - weight)
            for piece in pieces:
                if current and weight + piece[1] > m:
                    out.append((current, weight))
                    current, weight = [], 0
                current.append(piece)
                weight += piece[1]
        if current:
            out.append((current, weight))
        return out


class _Buffer:
    __slots__ = ("context", "count", "deadline", "kind", "units")

    def __init__(self, kind: _Kind, context: Mapping[str, str], deadline: float) -> None:
        self.kind = kind
        self.context = context
        self.units: list[Unit] = []
        self.count = 0
        self.deadline = deadline


def _context_key(signal: type, context: Mapping[str, str]) -> tuple[Any, ...]:
    return (signal, *sorted(context.items())) if context else (signal,)


class BatchProcessor:
    def __init__(
        self,
        settings: Settings,
        config: BatchConfig,
        next_consumer: Consumer,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._next = next_consumer
        self._config = config
        self._clock = clock
        self._logger = settings.logger
        self.tel = settings.telemetry
        self._counts = PointCounts(self.tel)
        self._sends = {
            t: self.tel.counter(
                "processor_batch_sends_total", "Batches sent, by what triggered them.", trigger=t
            )
            for t in ("size", "timeout", "shutdown", "passthrough")
        }
        self._kinds = {s: _Kind(s, config.send_batch_max_size) for s in (MetricBatch, SpanBatch, LogBatch)}
        self._buffers: dict[tuple[Any, ...], _Buffer] = {}
        self._tasks = Tasks(f"processor/{settings.id}", settings.logger)
        self._wake = asyncio.Event()
        self._started = False
        self._stopped = False
        self.tel.gauge(
            "processor_batch_buffered_points",
            "Points, spans or log records held by the batch processor.",
            lambda: float(sum(b.count for b in self._buffers.values())),
        )

    async def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        if self._config.timeout > 0:
            self._tasks.spawn(self._timer(), "timeout")

    async def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._tasks.close()
        buffers = list(self._buffers.values())
        self._buffers.clear()
        for buf in buffers:
            rest, refusal = await self._send_units(buf.kind, buf.units, buf.context, "shutdown")
            if refusal is not None:
                lost = buf.kind.total(rest)
                self._counts.dropped("shutdown", lost)
                self._logger.warning("batch: %d items refused downstream on shutdown: %s", lost, refusal)
        self.tel.telemetry.unregister_gauges(**{self.tel.kind: self.tel.id})

    async def consume(self, batch: Batch) -> None:
        kind = self._kinds.get(type(batch))
        if kind is None:  # not a batch type this processor knows: pass it on untouched
            await self._next.consume(batch)
            return
        n = len(batch)
        self._counts.incoming(n)
        new = kind.units(batch)
        if not new:
            return
        cfg = self._config
        key = _context_key(kind.signal, batch.context)
        buf = self._buffers.get(key)
        if cfg.timeout <= 0 or self._stopped or (buf is None and len(self._buffers) >= cfg.max_contexts):
            # Not held: sent now, in the caller's task, so a refusal reaches the caller directly.
            _, refusal = await self._send_units(kind, new, batch.context, "passthrough")
            if refusal is not None:
                raise refusal
            return
        weight = kind.total(new)
        if buf is None:
            buf = self._buffers[key] = _Buffer(kind, batch.context, self._clock() + cfg.timeout)
            self._wake.set()  # the timer may be sleeping with no buffers, or until a later deadline
        if buf.count + weight < cfg.send_batch_size:
            buf.units.extend(new)
            buf.count += weight
            return
        # Full: take the buffer out before awaiting, so concurrent callers start a fresh one.
        del self._buffers[key]
        rest, refusal = await self._send_units(kind, buf.units + new, buf.context, "size")
        if refusal is None:
            return
        deadline = self._clock() + (refusal.retry_after_s or cfg.timeout)
        if kind.total(rest) > weight:
            # Data we already accepted is still undelivered: keep it, and refuse the caller's batch
            # (the caller's units are the tail of ``rest`` weighing ``weight``: splits never mix units).
            cut, tail = len(rest), 0
            while tail < weight:
                cut -= 1
                tail += kind.weight(rest[cut])
            self._hold(key, kind, buf.context, rest[:cut], deadline)
            raise refusal
        # Part of the caller's batch went on: keep the rest (accepted), so nothing is sent twice.
        self._hold(key, kind, buf.context, rest, deadline)

    # -- sending --

    async def _send_units(
        self,
        kind: _Kind,
        units: list[Unit],
        context: Mapping[str, str],
        trigger: str,
        on_cancel: Callable[[list[Unit]], None] | None = None,
    ) -> tuple[list[Unit], Backpressure | None]:
        """Send ``units`` chunk by chunk, stopping at the first refusal: (units not sent, the refusal),
        or ([], None) when all went.

        Any other error from downstream drops that chunk (counted, logged) and sending goes on: a broken
        consumer must not wedge the buffer or kill the timer. If the sending task is cancelled,
        ``on_cancel`` gets the units not yet delivered (the interrupted chunk included)."""
        chunks = kind.chunks(units)
        for i, (chunk, weight) in enumerate(chunks):
            try:
                await self._next.consume(kind.build(chunk, context))
            except Backpressure as exc:
                return [u for c, _ in chunks[i:] for u in c], exc
            except asyncio.CancelledError:
                if on_cancel is not None:
                    on_cancel([u for c, _ in chunks[i:] for u in c])
                raise
            except Exception as exc:
                self._counts.dropped("downstream_error", weight)
                self._logger.warning("batch: downstream failed on %d items, dropped: %r", weight, exc)
            else:
                self._counts.outgoing(weight)
                self._sends[trigger].value += 1
        return [], None

    def _hold(
        self,
        key: tuple[Any, ...],
        kind: _Kind,
        context: Mapping[str, str],
        units: list[Unit],
        deadline: float,
    ) -> None:
        """Put undelivered units back in front of whatever was buffered for ``key`` meanwhile."""
        weight = kind.total(units)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _Buffer(kind, context, deadline)
        else:
            buf.deadline = min(buf.deadline, deadline)
        buf.units[:0] = units
        buf.count += weight
        self._wake.set()

    async def _timer(self) -> None:
        """Sends buffers whose deadline passed; sleeps until the next deadline or a new buffer."""
        while True:
            self._wake.clear()
            if not self._buffers:
                await self._wake.wait()
                continue
            now = self._clock()
            due = [k for k, b in self._buffers.items() if b.deadline <= now]
            if not due:
                delay = min(b.deadline for b in self._buffers.values()) - now
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
                # comes as the wait ends (a new buffer woke the timer as shutdown cancelled it), and
                # this loop then kept shutdown waiting for it forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            for key in due:
                buf = self._buffers.pop(key, None)
                if buf is None:
                    continue
                # Cancelled mid-send (shutdown): what did not go is put back, for shutdown to flush.
                keep = functools.partial(self._hold, key, buf.kind, buf.context, deadline=now)
                rest, refusal = await self._send_units(buf.kind, buf.units, buf.context, "timeout", keep)
                if refusal is not None:
                    retry = self._clock() + (refusal.retry_after_s or self._config.timeout)
                    self._hold(key, buf.kind, buf.context, rest, retry)


def create(settings: Settings, config: BatchConfig, next_consumer: Consumer) -> BatchProcessor:
    return BatchProcessor(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=BatchConfig,
    create=create,
    signals=frozenset({Signal.METRICS, Signal.TRACES, Signal.LOGS}),
    description="Gathers points, spans and log records into larger batches, per request context.",
)
