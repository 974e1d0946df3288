"""Memory limiter processor: refuses data while the agent's memory is above a limit.

Shaped like the OpenTelemetry Collector's memory_limiter, measuring the process's resident set size
(RSS, what the kernel's OOM killer and the container's memory limit count) instead of a Go heap::

    processors:
      memory_limiter:
        check_interval: 1s
        limit_percentage: 80          # hard limit: 80 % of the container's memory limit (or of RAM)
        spike_limit_percentage: 20    # soft limit = hard - 20 % of it, i.e. 60 %
      memory_limiter/fixed:
        limit: 400MiB                 # fixed sizes win over percentages
        spike_limit: 80MiB            # soft limit 320MiB; default 20 % of limit

"Total memory" is the cgroup limit when one is set (cgroup v2 ``memory.max``, v1
``memory.limit_in_bytes``) and physical RAM otherwise (or when the cgroup allows more than that).
RSS is read every ``check_interval`` (``/proc/self/statm``). At or above the soft limit every batch is
refused with ``Backpressure("memory_limit", retry_after_s=check_interval)`` — receivers answer
429 / UNAVAILABLE or count the points as refused — and each check runs ``gc.collect()`` (the first
one over the limit a full collection of what the agent froze too: ``agent.gcpolicy.collect_all``) and returns
freed heap to the OS (glibc ``malloc_trim``) so that RSS can fall again. At or above the hard limit a
warning is logged as well (once per crossing). Below the soft limit data flows again. The refusal is
answered before any pipeline takes the batch (the limiter is an admission check of the fan-outs
upstream), so a batch it refuses enters no other pipeline of its receiver either. Put it first in
a pipeline: it holds no data itself, so refusing never grows memory. Refused batches are counted as
``processor_refused_points_total{reason="memory_limit"}``; gauges show RSS, both limits and whether
data is being refused.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent import gcpolicy
from agent.component import (
    Backpressure,
    ComponentKind,
    Consumer,
    Factory,
    Settings,
    Signal,
    Tasks,
    admitted,
)
from agent.confmodel import Duration, Size
from agent.counting import PointCounts
from agent.model import Batch
from agent.vitals import read_rss_bytes

TYPE = "memory_limiter"

CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
"""cgroup v2 then v1: the first readable one with a number gives the container's memory limit."""


@dataclass(frozen=True)
class MemoryLimiterConfig:
    check_interval: Duration = Duration(1.0)
    """How often RSS is measured; also the retry delay given to refused senders."""
    limit: Size = Size(0)
    """Hard limit as a size (e.g. 400MiB); 0 uses limit_percentage of total memory."""
    spike_limit: Size = Size(0)
    """Headroom below the hard limit: soft = hard - spike. 0: 20 % of limit, or spike_limit_percentage."""
    limit_percentage: int = 80
    """Hard limit in percent of total memory (cgroup limit, else RAM), used when limit is 0."""
    spike_limit_percentage: int = 20
    """Headroom in percent of total memory, used when limit is 0: soft = limit_percentage - this."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.check_interval < 0.01:
            problems.append(("check_interval", "must be at least 10ms"))
        if self.limit < 0 or self.spike_limit < 0:
            problems.append(("limit" if self.limit < 0 else "spike_limit", "must not be negative"))
        if self.limit and self.spike_limit >= self.limit:
            problems.append(("spike_limit", "must be smaller than limit"))
        if self.spike_limit and not self.limit:
            problems.append(("spike_limit", "set limit too, or use spike_limit_percentage"))
        if not 1 <= self.limit_percentage <= 100:
            problems.append(("limit_percentage", "must be between 1 and 100"))
        if not 0 <= self.spike_limit_percentage < self.limit_percentage:
            problems.append(("spike_limit_percentage", "must be at least 0 and below limit_percentage"))
        return problems


# -- reading memory -----------------------------------------------------------------------------------


def physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 0


def cgroup_limit_bytes(paths: Sequence[str] = CGROUP_LIMIT_FILES) -> int | None:
    """The container's memory limit, or None when there is none ("max", absent, unreadable)."""
    for path in paths:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
        if text == "max":
            return None
    return None


def total_memory_bytes(paths: Sequence[str] = CGROUP_LIMIT_FILES, physical: int | None = None) -> int:
    """The cgroup limit if set and below physical RAM, else physical RAM. cgroup v1 writes a huge
    number (about 2**63) for "no limit", which the comparison with RAM takes care of."""
    ram = physical_memory_bytes() if physical is None else physical
    limit = cgroup_limit_bytes(paths)
    if limit is not None and limit > 0 and (ram <= 0 or limit < ram):
        return limit
    return ram


def limits_bytes(config: MemoryLimiterConfig, total: int) -> tuple[int, int]:
    """(soft, hard) in bytes; 0, 0 when nothing can be derived (no limit set and RAM unknown)."""
    if config.limit:
        hard = int(config.limit)
        spike = int(config.spike_limit) or hard // 5
    else:
        if total <= 0:
            return 0, 0
        hard = total * config.limit_percentage // 100
        spike = total * config.spike_limit_percentage // 100
    return max(hard - spike, 0), hard


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), which hands freed heap pages back to the OS; None elsewhere (musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


# -- the processor ------------------------------------------------------------------------------------


class MemoryLimiter:
    def __init__(
        self,
        settings: Settings,
        config: MemoryLimiterConfig,
        next_consumer: Consumer,
        *,
        read_rss: Callable[[], int] = read_rss_bytes,
        cgroup_paths: Sequence[str] = CGROUP_LIMIT_FILES,
        physical_memory: int | None = None,
        collect: Callable[[], object] | None = None,
    ) -> None:
        """``read_rss``, ``cgroup_paths``, ``physical_memory`` and ``collect`` (what runs above the soft
        limit; default gc.collect then malloc_trim) are injectable for tests."""
        self._next = next_consumer
        self._config = config
        self._logger = settings.logger
        self.tel = settings.telemetry
        self._read_rss = read_rss
        self._collect = collect if collect is not None else self._default_collect
        self._trim = _malloc_trim() if collect is None else None
        self._counts = PointCounts(self.tel)
        self._refused = self.tel.counter(
            "processor_refused_points_total",
            "Points (spans, log records) a processor refused with backpressure, by reason.",
            reason="memory_limit",
        )
        self.total_bytes = total_memory_bytes(cgroup_paths, physical_memory)
        self.soft_bytes, self.hard_bytes = limits_bytes(config, self.total_bytes)
        self.rss_bytes = 0
        self.refusing = False
        self._above_hard = False
        self._reader_failed = False
        self._tasks = Tasks(f"processor/{settings.id}", settings.logger)
        self._admission = settings.admission
        self._admission.add(self.refusal)
        self._started = False
        self._stopped = False
        for name, help, read in (
            ("memory_limiter_rss_bytes", "Resident set size at the last check.", lambda: self.rss_bytes),
            ("memory_limiter_soft_limit_bytes", "RSS at which data is refused.", lambda: self.soft_bytes),
            ("memory_limiter_hard_limit_bytes", "RSS at which a warning is logged.", lambda: self.hard_bytes),
            ("memory_limiter_refusing", "1 while data is refused, else 0.", lambda: float(self.refusing)),
        ):
            self.tel.gauge(name, help, read)

    def _default_collect(self) -> None:
        if gc.get_freeze_count() and not self.refusing:
            # The first check over the soft limit: also the cyclic garbage the agent's GC policy froze
            # (agent/gcpolicy.py), which gc.collect never walks; later checks while refusing do not
            # pay for walking every series again.
            gcpolicy.collect_all()
        else:
            gc.collect()
        if self._trim is not None:
            self._trim()

    async def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        if self.hard_bytes <= 0:
            self._logger.warning(
                "memory_limiter: no limit set and total memory unknown; data is never refused"
            )
            return
        self._logger.info(
            "memory_limiter: soft limit %d MiB, hard limit %d MiB (total memory %d MiB)",
            self.soft_bytes >> 20,
            self.hard_bytes >> 20,
            self.total_bytes >> 20,
        )
        self.check()  # decide before the first batch, not one interval later
        self._tasks.spawn(self._run(), "check")

    async def shutdown(self) -> None:
        """Holds no data: stops the checks and removes the gauges."""
        if self._stopped:
            return
        self._stopped = True
        self._admission.remove(self.refusal)
        await self._tasks.close()
        self.tel.telemetry.unregister_gauges(**{self.tel.kind: self.tel.id})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._config.check_interval)
            self.check()

    def check(self) -> None:
        """Measure RSS once and update the refusing state (the background task calls this)."""
        if self.hard_bytes <= 0 or self._reader_failed:
            return
        rss = self._read()
        if rss is not None and rss >= self.soft_bytes:
            self._collect()
            rss = self._read()
        if rss is None:
            return
        self.rss_bytes = rss
        was = self.refusing
        self.refusing = rss >= self.soft_bytes
        if self.refusing and not was:
            self._logger.info("memory_limiter: RSS %d MiB above the soft limit, refusing data", rss >> 20)
        elif was and not self.refusing:
            self._logger.info("memory_limiter: RSS %d MiB below the soft limit, accepting data", rss >> 20)
        above_hard = rss >= self.hard_bytes
        if above_hard and not self._above_hard:
            self._logger.warning(
                "memory_limiter: RSS %d MiB above the hard limit of %d MiB",
                rss >> 20,
                self.hard_bytes >> 20,
            )
        self._above_hard = above_hard

    def _read(self) -> int | None:
        try:
            return int(self._read_rss())
        except (OSError, ValueError, IndexError) as exc:
            # Without a reading nothing can be decided: stop refusing rather than refuse forever.
            self._reader_failed = True
            self.refusing = False
            self._logger.error("memory_limiter: cannot read RSS (%r); limits are off", exc)
            return None

    def refusal(self, batch: Batch) -> Backpressure | None:
        """The refusal ``batch`` meets now (above the soft limit), counted as refused; else None. The
        admission check the fan-outs upstream ask before any pipeline takes the batch
        (:class:`agent.component.Admission`), so a refused batch enters no other pipeline either."""
        if not self.refusing:
            return None
        self._refused.value += len(batch)
        return Backpressure("memory_limit", retry_after_s=self._config.check_interval)

    async def consume(self, batch: Batch) -> None:
        n = len(batch)
        if not admitted():
            # A batch the fan-outs admitted was asked already (``refusal``) and may have been taken by
            # another pipeline: it is taken whole. Others (a batch processor's flush) are asked here.
            refused = self.refusal(batch)
            if refused is not None:
                raise refused
        self._counts.incoming(n)
        self._counts.outgoing(n)
        await self._next.consume(batch)


def create(settings: Settings, config: MemoryLimiterConfig, next_consumer: Consumer) -> MemoryLimiter:
    return MemoryLimiter(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=MemoryLimiterConfig,
    create=create,
    signals=frozenset({Signal.METRICS, Signal.TRACES, Signal.LOGS}),
    description="Refuses data (backpressure) while the agent's resident memory is above a limit.",
)
