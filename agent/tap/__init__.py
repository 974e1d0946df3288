"""The live stream (``/api/tap``, ``headwater tap``) and the top-metrics tracker: what flows on the
graph's edges, shown while someone watches and costing nothing while nobody does.

Where: every edge of the graph is a service-owned :class:`agent.service.Link` (a receiver's output
per signal, a processor's output, a connector's input and output, an exporter's input). A Link has a
``tap`` slot, None while nobody watches that edge: one attribute read per batch. The agent names each
Link by the component ends it joins (:class:`TapPoint`: ``statsd`` out, ``batch@metrics`` in, ...)
and hands the list to its :class:`TapHub` after start and after each reload; the hub sets a Link's
``tap`` only while a subscription (or the tracker) wants one of its names. A batch is seen once it
was taken downstream (a refused batch is not shown).

Threads: the hub and the Links live on the agent's loop; the WebSocket is served by the admin thread
(:mod:`agent.admin`), on its own loop. On the agent's loop a watched batch costs a deque append per
subscription (the batch itself, never copied: batches are immutable once handed on) and, when the
subscription was idle, one ``call_soon_threadsafe`` to wake the admin loop. Everything else —
filtering points by name and labels, the rate limit, turning items into JSON — runs on the admin
thread. Nothing on the agent's side ever waits for a subscriber:

- at most :data:`PENDING_BATCHES` batches wait for the admin thread per subscription; past that a
  batch is dropped whole (``reason="behind"``, its items counted unfiltered);
- items beyond ``rate_limit_per_s`` (a token bucket holding one second's worth) are dropped
  (``reason="rate"``);
- at most ``buffer`` items wait for a client that reads slowly; the rest are dropped
  (``reason="buffer"``).

What is dropped is counted in ``headwater_tap_dropped_total{reason}`` and told to the subscriber in
the stream (``{"type": "dropped", ...}``) before its next item.

Messages (one JSON object per WebSocket text message; ``time_unix_nano`` as integers):

- ``{"type": "subscribed", "edges": ["statsd out", ...]}``: first, once the taps are in place (what
  matches the component glob now; a reload re-applies the filter to the new graph).
- ``{"type": "point", "component", "component_kind", "direction", "pipeline", "signal": "metrics",
  "name", "kind": "sum"|"gauge"|"histogram"|"summary", "labels": {..}, "time_unix_nano", "unit",
  "value"`` (sum, gauge; sums also ``"temporality"`` and ``"monotonic"``) or ``"histogram": {"count",
  "sum", "min", "max"}`` or ``"summary": {"count", "sum", "quantiles": [[q, v], ..]}}``.
- ``{"type": "span", ..., "signal": "traces", "name", "trace_id", "span_id", "parent_span_id"
  (hex), "span_kind", "start_time_unix_nano", "end_time_unix_nano", "duration_ms", "status":
  {"code", "message"}, "attributes": {..}, "resource": {..}}``.
- ``{"type": "log", ..., "signal": "logs", "name"`` (the event name, or the body's first 80
  characters), ``"time_unix_nano", "severity_text", "severity_number", "body", "attributes",
  "resource", "trace_id", "span_id"}``.
- ``{"type": "dropped", "count": N, "reason": "rate"|"buffer"|"behind"}``.

Filters (:class:`TapFilter`): component glob (over the id, ``batch``, and the label,
``batch@metrics``), name glob (metric, span or log event name), label matchers ``k=v``, ``k!=v``,
``k=~regex``, ``k!~regex`` (over a point's labels, or a span's / log record's attributes and then its
resource's), signals and directions. Attributes named in ``tap.redact`` show ``<redacted>``.

The tracker (:meth:`TapHub.top_metrics`) watches receivers' outputs for ~30 s after each call: per
metric name, the series seen in the last minute, points per second and the labels with the most
distinct values. Its work happens when it is read, on the reader's (the admin) thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

from agent.config import TapConfig
from agent.globs import NameFilter
from agent.model import Batch, LogBatch, MetricBatch, SpanBatch
from agent.tap.items import REDACTED, Direction, LabelMatcher, TapEdge, TapFilter, TapPoint, matching, render
from agent.tap.top import TOP_MAX_SERIES, TOP_WINDOW_S, TopTracker
from agent.telemetry import Telemetry

__all__ = [
    "DROP_REASONS",
    "PENDING_BATCHES",
    "REDACTED",
    "TOP_IDLE_S",
    "TOP_MAX_SERIES",
    "TOP_WINDOW_S",
    "Direction",
    "LabelMatcher",
    "TapEdge",
    "TapFilter",
    "TapFull",
    "TapHub",
    "TapPoint",
    "TapSubscription",
]

log = logging.getLogger("headwater.tap")

PENDING_BATCHES = 64
"""Batches one subscription may have waiting for the admin thread; past that, batches are dropped."""
TOP_IDLE_S = 30.0
"""The tracker stops (and forgets) this long after :meth:`TapHub.top_metrics` was last called."""
DROP_REASONS = ("rate", "buffer", "behind")


# -- subscriptions -------------------------------------------------------------------------------------
_SIGNAL_TYPES = {"metrics": MetricBatch, "traces": SpanBatch, "logs": LogBatch}

Offer = Callable[[tuple[TapPoint, ...], Batch, int], None]


class TapFull(Exception):
    """``max_subscribers`` streams are open already."""


class TapSubscription:
    """One stream. Made and read on the admin thread (:meth:`TapHub.subscribe`); fed on the agent's.

    ``await get()`` returns the next messages (drop notices, then items); ``close()`` ends it.
    ``edges`` resolves to the edges watched once the hub has put its taps in place."""

    def __init__(
        self, hub: TapHub, flt: TapFilter, config: TapConfig, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.filter = flt
        self._hub = hub
        self._loop = loop
        self._types = tuple(_SIGNAL_TYPES[s] for s in sorted(flt.signals))
        self._names = NameFilter([flt.name])
        self._redact = frozenset(config.redact)
        self._rate = float(config.rate_limit_per_s)
        self._burst = max(1.0, self._rate)
        self._tokens = self._burst
        self._refilled = time.monotonic()
        self._buffer = config.buffer
        # The agent's thread appends, the admin thread pops (deque appends and pops are atomic).
        self._pending: collections.deque[tuple[tuple[TapPoint, ...], Batch]] = collections.deque()
        self._woken = False
        self._behind = 0
        """Items of batches dropped on the agent's thread (written there only)."""
        self._behind_told = 0
        # The admin thread only:
        self.items: collections.deque[dict[str, Any]] = collections.deque()
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._ready = asyncio.Event()
        self.closed = False
        self.edges: concurrent.futures.Future[list[str]] = concurrent.futures.Future()

    # -- the agent's thread: one type check, one append and at most one wake-up per batch
    def offer(self, points: tuple[TapPoint, ...], batch: Batch, now_ns: int) -> None:
        if not isinstance(batch, self._types):
            return
        if len(self._pending) >= PENDING_BATCHES:
            self._behind += len(batch)
            self._hub.dropped["behind"].value += len(batch)
        else:
            self._pending.append((points, batch))
        if not self._woken:
            self._woken = True
            with contextlib.suppress(RuntimeError):  # the admin loop has closed: nobody reads any more
                self._loop.call_soon_threadsafe(self._drain)

    # -- the admin thread
    def _drain(self) -> None:
        self._woken = False  # before popping: a batch appended from now on wakes us again
        behind = self._behind
        if behind != self._behind_told:
            self._dropped["behind"] += behind - self._behind_told
            self._behind_told = behind
        while self._pending:
            points, batch = self._pending.popleft()
            for point in points:
                try:
                    self._take(point, batch)
                except Exception as exc:  # an item that cannot be shown must not end the stream
                    log.error("tap: showing a batch at %s: %r", point, exc, exc_info=exc)
        self._ready.set()

    def _take(self, point: TapPoint, batch: Batch) -> None:
        now = time.monotonic()
        tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        rated = over = 0
        items, room = self.items, self._buffer - len(self.items)
        for raw in matching(batch, self.filter, self._names):
            if tokens < 1:
                rated += 1
                continue
            tokens -= 1
            if room <= 0:
                over += 1
                continue
            room -= 1
            items.append(render(raw, point, self._redact))
        self._tokens = tokens
        if rated or over:
            self._dropped["rate"] += rated
            self._dropped["buffer"] += over
            self._hub.dropped["rate"].value += rated
            self._hub.dropped["buffer"].value += over

    def notices(self) -> list[dict[str, Any]]:
        """The drop notices not told yet (and they count as told)."""
        out = [{"type": "dropped", "count": n, "reason": r} for r, n in self._dropped.items() if n]
        if out:
            self._dropped = dict.fromkeys(DROP_REASONS, 0)
        return out

    async def get(self, limit: int = 256) -> list[dict[str, Any]]:
        """The next messages: drop notices first, then up to ``limit`` items. Waits while there are
        none; [] once closed."""
        while not self.closed:
            messages = self.notices()
            n = min(limit, len(self.items))
            if messages or n:
                messages += [self.items.popleft() for _ in range(n)]
                self._hub.sent_items.value += n
                return messages
            self._ready.clear()
            await self._ready.wait()
        return []

    def close(self) -> None:
        """Stop watching (idempotent); the taps are removed on the agent's loop soon after."""
        if not self.closed:
            self.closed = True
            self._ready.set()
            self._hub.unsubscribe(self)


class _EdgeTap:
    """What a watched Link calls with each batch it passed on: each watcher's ``offer``."""

    __slots__ = ("_offers",)

    def __init__(self, offers: tuple[tuple[Offer, tuple[TapPoint, ...]], ...]) -> None:
        self._offers = offers

    def __call__(self, batch: Batch) -> None:
        now_ns = time.time_ns()
        for offer, points in self._offers:
            try:
                offer(points, batch, now_ns)
            except Exception as exc:  # a watcher must never fail the pipeline
                log.error("tap: %r", exc, exc_info=exc)


# -- the hub -------------------------------------------------------------------------------------------
class TapHub:
    """One per :class:`agent.service.Agent`, for its lifetime (reloads keep it and its subscriptions).

    The agent calls :meth:`set_edges` on its loop after start and after each reload. Subscriptions and
    :meth:`top_metrics` come from the admin thread; they reach the agent's loop by
    ``call_soon_threadsafe``."""

    def __init__(self, telemetry: Telemetry, config: TapConfig | None = None) -> None:
        self.config = config or TapConfig()
        self._edges: list[TapEdge] = []
        self._subs: tuple[TapSubscription, ...] = ()
        """The agent's thread: the subscriptions whose taps are in place."""
        self._open: set[TapSubscription] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        help = "Items the tap did not show a subscriber, by reason (rate limit, slow client, behind)."
        self.dropped = {r: telemetry.counter("tap_dropped_total", help, reason=r) for r in DROP_REASONS}
        self.sent_items = telemetry.counter("tap_sent_items_total", "Items the tap handed to subscribers.")
        telemetry.gauge("tap_subscribers", "Tap streams open now.", lambda: float(len(self._open)))
        self._top = TopTracker(0.0)
        self._top_on = False
        """The agent's thread: whether the tracker's taps are in place."""
        self._top_asked = -math.inf
        self._top_generation = 0
        self._top_seen_generation = 0
        self._top_pending: collections.deque[tuple[MetricBatch, float]] = collections.deque()
        self._top_skipped = 0
        self._top_lock = threading.Lock()

    # -- the agent's loop
    def set_edges(self, edges: Iterable[TapEdge]) -> None:
        """The graph's edges now (on the agent's loop, after start and each reload)."""
        self._loop = asyncio.get_running_loop()
        edges = list(edges)
        kept = {id(e.link) for e in edges}
        for old in self._edges:
            if id(old.link) not in kept:
                old.link.tap = None
        self._edges = edges
        self._rewire()

    def configure(self, config: TapConfig) -> None:
        """Limits and redaction for subscriptions made from now on (a reload)."""
        self.config = config

    def _rewire(self) -> None:
        for edge in self._edges:
            offers: list[tuple[Offer, tuple[TapPoint, ...]]] = []
            for sub in self._subs:
                points = tuple(p for p in edge.points if sub.filter.takes(p))
                if points:
                    offers.append((sub.offer, points))
            if self._top_on:
                points = tuple(p for p in edge.points if p.kind == "receiver")
                if points:
                    offers.append((self._top_offer, points))
            edge.link.tap = _EdgeTap(tuple(offers)) if offers else None
        for sub in self._subs:
            if not sub.edges.done():
                sub.edges.set_result(
                    sorted({str(p) for e in self._edges for p in e.points if sub.filter.takes(p)})
                )

    def _add(self, sub: TapSubscription) -> None:
        if not sub.closed:
            self._subs += (sub,)
            self._rewire()
        elif not sub.edges.done():
            sub.edges.set_result([])

    def _remove(self, sub: TapSubscription) -> None:
        self._subs = tuple(s for s in self._subs if s is not sub)
        self._rewire()

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the agent's loop (inline before the agent has started)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            fn(*args)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: the agent has gone
                loop.call_soon_threadsafe(fn, *args)

    # -- any thread (the admin thread)
    def subscribe(self, flt: TapFilter, loop: asyncio.AbstractEventLoop | None = None) -> TapSubscription:
        """A new stream delivered on ``loop`` (the caller's running loop by default); raises
        :class:`TapFull` at ``max_subscribers``."""
        config = self.config
        sub = TapSubscription(self, flt, config, loop or asyncio.get_running_loop())
        with self._lock:
            if config.max_subscribers == 0:
                raise TapFull("the tap is off (service::telemetry::tap::max_subscribers is 0)")
            if len(self._open) >= config.max_subscribers:
                raise TapFull(
                    f"{len(self._open)} tap streams are open (service::telemetry::tap::max_subscribers)"
                )
            self._open.add(sub)
        self._call(self._add, sub)
        return sub

    def unsubscribe(self, sub: TapSubscription) -> None:
        with self._lock:
            if sub not in self._open:
                return
            self._open.discard(sub)
        sub.closed = True
        self._call(self._remove, sub)

    @property
    def subscribers(self) -> int:
        return len(self._open)

    # -- the top-metrics tracker
    def top_metrics(
        self, limit: int = 10, by: Literal["series", "points_per_s"] = "series"
    ) -> list[dict[str, Any]]:
        """The metric names with the most active series (or points per second) at the receivers'
        outputs, biggest first: ``{"name", "series", "points_per_s", "labels": [{"name", "values"}]}``
        (labels by distinct values, biggest first). Each call keeps the tracker on for
        :data:`TOP_IDLE_S` more; the first call starts it (and returns [] until batches came). Call it
        from one thread (the admin thread): the work of counting happens here, on the caller's thread,
        and the result is a new list each time (nobody else holds it)."""
        self._top_asked = time.monotonic()
        if not self._top_on:
            self._call(self._top_start)
        with self._top_lock:
            if self._top_generation != self._top_seen_generation:
                self._top_seen_generation = self._top_generation
                self._top = TopTracker(time.time())
            top = self._top
            if not top.started:
                top.started = time.time()
            while self._top_pending:
                batch, t = self._top_pending.popleft()
                top.add(batch, t)
            skipped, self._top_skipped = self._top_skipped, 0
            top.skipped += skipped
            return top.snapshot(limit, by, time.time())

    def _top_start(self) -> None:
        if not self._top_on:
            self._top_on = True
            self._top_generation += 1  # the reader starts afresh
            self._top_pending.clear()
            self._rewire()

    def _top_offer(self, points: tuple[TapPoint, ...], batch: Batch, now_ns: int) -> None:
        if time.monotonic() - self._top_asked > TOP_IDLE_S:
            self._top_on = False  # nobody asked for a while: the taps go, the reader forgets
            self._top_pending.clear()
            self._rewire()
            return
        if not isinstance(batch, MetricBatch):
            return
        if len(self._top_pending) >= PENDING_BATCHES:
            self._top_skipped += len(batch)
            return
        self._top_pending.append((batch, now_ns / 1e9))
