"""The agent's vital signs on ``/metrics``: how late the event loop runs, how long garbage collection
pauses it, the process' memory, CPU, descriptors and threads, and when a batch was received — which
the sending path (:mod:`agent.sending`) turns into the end-to-end latency of an acknowledged export.

Costs (measured on the 2-core test machine): the loop-lag watcher is one timer per 20 ms (the agent's
``_watch_loop``) and one observation; the GC hook 1.1 µs per collection, nearly all of it CPython's
own cost of calling any ``gc.callbacks`` entry (a no-op callback costs 1.07 µs) — the StatsD →
remote-write path collects gen 0 about 0.24 times per 1,000 lines, so ~0.0003 µs per line; the
receipt stamp 0.4 µs per batch at the pipeline head and 0.07 µs at each further Link (three chained
Links: +0.47 µs per batch); the process figures are read only when ``/metrics`` is scraped
(``/proc/self/stat`` and ``/proc/self/fd``, by prometheus_client's process collector).

**Receipt times.** A batch's receipt time travels beside it, not in it: the service's :class:`Link`
that first hands a batch on (a receiver's, or a processor's releasing data it held on purpose — the
batch processor's timeout, an aggregation window, the StatsD flush) opens a :class:`Receipt` in a
ContextVar for the duration of that hand-over; every stage downstream runs inside the same call (or
in a thread it starts with ``asyncio.to_thread``, which copies the context), so the exporter's
:meth:`agent.sending.Sender.offer` reads it and stamps the request. Batches are rebuilt by processors
(and keyed by their context in the batch processor), so a field on the batch would have to be carried
by every one of them; the ContextVar costs them nothing. When the hand-over returns the receipt is
closed, so a task a stage spawned inside it (and which inherited the context) does not stamp later
batches with a stale time: the next Link it passes opens a fresh one.
"""

from __future__ import annotations

import contextvars
import gc
import os
import time
from typing import Any

from prometheus_client import ProcessCollector

from agent.telemetry import PREFIX, HistogramCell, Telemetry

LOOP_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
"""Event-loop lag: a healthy agent stays under a few ms; a stall of 100 ms already delays every socket."""
GC_PAUSE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""GC pauses: gen 0 takes tens of µs, a full collection of a large heap hundreds of ms."""
SEND_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""One request to a backend: the default timeout is 5 s, a configured one at most minutes."""
PIPELINE_LATENCY_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
    3600.0,
)
"""Receipt to acknowledged export: milliseconds when the backend keeps up, up to hours of an outage."""


class Receipt:
    """When the batch being handed on was received (``time.monotonic()``); ``open`` while that hand-over
    is in progress."""

    __slots__ = ("monotonic_s", "open")

    def __init__(self, monotonic_s: float) -> None:
        self.monotonic_s = monotonic_s
        self.open = True


_RECEIPT: contextvars.ContextVar[Receipt | None] = contextvars.ContextVar("headwater_receipt", default=None)

Token = contextvars.Token[Receipt | None]


def open_receipt() -> Token | None:
    """Stamp the batch about to be handed on with the time now, unless it is already inside an open
    hand-over (a Link further down the same call). Returns the token to give :func:`close_receipt`."""
    receipt = _RECEIPT.get()
    if receipt is not None and receipt.open:
        return None
    return _RECEIPT.set(Receipt(time.monotonic()))


def close_receipt(token: Token | None) -> None:
    """End the hand-over :func:`open_receipt` began (in the same task; a no-op for ``None``)."""
    if token is None:
        return
    receipt = _RECEIPT.get()
    if receipt is not None:
        receipt.open = False
    _RECEIPT.reset(token)


def received_s() -> float:
    """The monotonic receipt time of the batch being handed on in this context, or now when there is
    none (an exporter offering from a task of its own)."""
    receipt = _RECEIPT.get()
    if receipt is not None and receipt.open:
        return receipt.monotonic_s
    return time.monotonic()


class GcPauses:
    """Times each garbage collection through ``gc.callbacks`` into ``gc_pause_seconds{generation}``.

    A collection runs in whichever thread allocated when the threshold was crossed (the agent's, the
    admin endpoint's, a worker's) and never two at once, so one start time suffices. ``install`` /
    ``uninstall`` are idempotent: the hook is process-wide and an agent must not leave it behind."""

    __slots__ = ("_cells", "_started")

    def __init__(self, telemetry: Telemetry) -> None:
        self._cells: tuple[HistogramCell, ...] = tuple(
            telemetry.histogram(
                "gc_pause_seconds",
                "Time the garbage collector stopped the process, per collection, by generation.",
                GC_PAUSE_BUCKETS_S,
                generation=str(g),
            )
            for g in range(3)
        )
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen = info.get("generation", 2)
        self._cells[gen if 0 <= gen < 3 else 2].observe(time.perf_counter() - self._started)

    def install(self) -> None:
        if not any(cb is self for cb in gc.callbacks):
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        gc.callbacks[:] = [cb for cb in gc.callbacks if cb is not self]


def read_rss_bytes() -> int:
    """Resident memory of this process from ``/proc/self/statm`` (Linux); raises OSError where there is
    no such file."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int | None:
    """:func:`read_rss_bytes`, None where it cannot be read."""
    try:
        return read_rss_bytes()
    except (OSError, ValueError, IndexError):
        return None


def _threads() -> float:
    # Field 20 of /proc/self/stat (num_threads): every OS thread, the resolver's, gRPC's and the
    # to_thread pool's included, which threading.active_count() does not see. The command name
    # (field 2) may hold spaces and parentheses, so fields are counted after its closing one.
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    return float(stat[stat.rindex(b")") + 1 :].split()[17])


class Vitals:
    """The vital signs of one agent, in its :class:`Telemetry`. ``start`` hooks the garbage collector,
    ``stop`` unhooks it (both idempotent); the loop watcher (the agent's) reports through
    :meth:`observe_loop_lag`."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._loop_lag = telemetry.histogram(
            "event_loop_lag_seconds",
            "How late the agent's event loop woke a 20 ms timer (work that held the loop that long).",
            LOOP_LAG_BUCKETS_S,
        )
        self._lag_s = 0.0
        telemetry.gauge(
            "event_loop_lag_latest_seconds",
            "The event loop's lag at its latest 20 ms timer.",
            lambda: self._lag_s,
        )
        self._gc = GcPauses(telemetry)
        # prometheus_client's process collector (Linux /proc; nothing elsewhere): resident and virtual
        # memory, CPU seconds, open and max descriptors, start time, read at scrape time only. Chosen
        # over psutil: it is already a dependency, and its names are the ones every dashboard knows.
        ProcessCollector(namespace=PREFIX.removesuffix("_"), registry=telemetry.registry)
        if os.path.exists("/proc/self/stat"):
            telemetry.gauge("process_threads", "OS threads of the agent's process.", _threads)

    def observe_loop_lag(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)  # a timer may fire within the clock's resolution before its time
        self._lag_s = lag_s
        self._loop_lag.observe(lag_s)

    def loop_lag_s(self) -> float:
        """The event loop's latest lag in seconds (for ``headwater top`` and the status page)."""
        return self._lag_s

    def start(self) -> None:
        self._gc.install()

    def stop(self) -> None:
        self._gc.uninstall()
