"""The disk queue of one exporter: its config, one partition per tenant, metrics, and validate checks."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from agent.confmodel import Duration, Size
from agent.diskqueue.format import parse_segment_name
from agent.diskqueue.partition import LEDGER, LOCK, Partition, PartitionOptions, lock_holder
from agent.netcheck import directory_problem
from agent.telemetry import ComponentTelemetry

log = logging.getLogger("headwater.diskqueue")


@dataclass(frozen=True)
class DiskQueueConfig:
    directory: str = "/var/lib/headwater/queue"
    """Root of the disk queue; each exporter (and tenant, where routed) gets its own subdirectory."""
    max_bytes: Size = Size(1 << 30)
    """Disk budget per partition (exporter or exporter+tenant); whole segments are freed once acked."""
    full_policy: Literal["block", "drop_oldest"] = "block"
    """At max_bytes: block (refuse new data: backpressure) or drop the oldest records (counted)."""
    fsync: Literal["batch", "interval", "never"] = "batch"
    """batch: fsync after each appended batch; interval: every fsync_interval; never: page cache only."""
    fsync_interval: Duration = Duration(0.1)
    """Period of the background sync (fsync for interval, and ledger writes for every policy)."""
    segment_bytes: Size = Size(32 << 20)
    """Segment file size; capped at max_bytes/8 so space comes back in small steps."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.directory:
            problems.append(("directory", "is required for storage: disk"))
        if self.max_bytes < 64 * 1024:
            problems.append(("max_bytes", "must be at least 64KiB"))
        if self.fsync_interval <= 0:
            problems.append(("fsync_interval", "must be greater than 0"))
        if self.segment_bytes < 4096:
            problems.append(("segment_bytes", "must be at least 4KiB"))
        return problems

    def options(self) -> PartitionOptions:
        return PartitionOptions(
            max_bytes=int(self.max_bytes),
            full_policy=self.full_policy,
            fsync=self.fsync,
            fsync_interval_s=float(self.fsync_interval),
            segment_bytes=int(self.segment_bytes),
        )

    def environment_problems(self) -> list[tuple[str, str]]:
        """For ``headwater validate``: the directory must be writable and no partition locked by a process."""
        return [("directory", p) for p in queue_directory_problems(self.directory)]


def partition_name(exporter_id: str, tenant: str | None = None) -> str:
    """The subdirectory of one partition: ``otlp/signoz`` + tenant ``acme`` → ``otlp%2Fsignoz@acme``."""
    name = urllib.parse.quote(exporter_id, safe="")
    if tenant is not None:
        name += "@" + urllib.parse.quote(tenant, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]  # never "." or ".."
    return name


def is_partition_dir(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(n in (LEDGER, LOCK) or parse_segment_name(n) is not None for n in names)


def partition_dirs(root: str) -> list[str]:
    """The partitions under ``root`` (or ``root`` itself when it is one)."""
    if is_partition_dir(root) and not any(os.path.isdir(os.path.join(root, n)) for n in os.listdir(root)):
        return [root]
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [os.path.join(root, n) for n in names if is_partition_dir(os.path.join(root, n))]


def locked_by_other(directory: str) -> str | None:
    """A message when another process holds ``directory``'s lock; None when it is free (or absent)."""
    path = os.path.join(directory, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"{directory} is locked by another process{lock_holder(directory)}"
    finally:
        os.close(fd)  # closing releases our probe lock
    return None


def queue_directory_problems(root: str) -> list[str]:
    problem = directory_problem(root)
    if problem:
        return [problem]
    problems = []
    for d in partition_dirs(root) if os.path.isdir(root) else []:
        if not os.access(d, os.W_OK | os.X_OK):
            problems.append(f"{d} is not writable")
        held = locked_by_other(d)
        if held:
            problems.append(held + "; two agents must not share a queue directory")
    return problems


class DiskQueue:
    """The partitions of one exporter under ``config.directory``, opened on first use.

    ``partition(tenant)`` is cheap after the first call. Metrics (when ``telemetry`` is given) are
    labelled with the partition's tenant (``""`` for the exporter's default partition).
    """

    def __init__(
        self, config: DiskQueueConfig, exporter_id: str, telemetry: ComponentTelemetry | None = None
    ):
        self.config = config
        self.exporter_id = exporter_id
        self._options = config.options()
        self._telemetry = telemetry
        self._parts: dict[str | None, Partition] = {}
        self._open_lock = threading.Lock()

    def partition(self, tenant: str | None = None) -> Partition:
        """Open (recovering) or return the partition of ``tenant``. Blocking the first time (it scans)."""
        part = self._parts.get(tenant)
        if part is not None:
            return part
        with self._open_lock:
            part = self._parts.get(tenant)
            if part is None:
                path = os.path.join(self.config.directory, partition_name(self.exporter_id, tenant))
                part = Partition.open(path, self._options)
                self._parts[tenant] = part
                if self._telemetry is not None:
                    register_metrics(self._telemetry, part, tenant or "")
        return part

    def existing_tenants(self) -> list[str | None]:
        """Tenants with a partition on disk (to reopen their backlogs at start)."""
        prefix = partition_name(self.exporter_id)
        out: list[str | None] = []
        for d in partition_dirs(self.config.directory):
            name = os.path.basename(d)
            if name == prefix:
                out.append(None)
            elif name.startswith(prefix + "@"):
                out.append(urllib.parse.unquote(name[len(prefix) + 1 :]))
        return out

    def __iter__(self) -> Iterator[tuple[str | None, Partition]]:
        return iter(list(self._parts.items()))

    def sync(self, *, ledger: bool = False) -> None:
        """Sync every open partition (blocking; see :meth:`Partition.sync`)."""
        for _, part in self:
            part.sync(ledger=ledger)

    async def sync_async(self, *, ledger: bool = False) -> None:
        await asyncio.to_thread(self.sync, ledger=ledger)

    async def run_syncer(self, stop: asyncio.Event) -> None:
        """Sync every ``fsync_interval`` until ``stop`` is set (run it as an owned task, any policy).

        Under ``interval`` this is the fsync; under ``batch`` it persists acks and frees segments
        between batches; under ``never`` it replaces the ledger without fsync.
        """
        interval = float(self.config.fsync_interval)
        while not stop.is_set():
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that comes
            # as the wait ends (the owner sets ``stop`` and cancels at once), and one more sync ran.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            if any(p.needs_sync() for _, p in self):
                try:
                    await self.sync_async()
                except OSError as exc:
                    # A full disk or an I/O error must not end the syncer: it would stop every later
                    # fsync (interval), ack persistence and segment deletion for good. Try again.
                    log.warning("disk queue %s: sync failed, retrying: %s", self.config.directory, exc)

    def close(self) -> None:
        """Final sync and unlock of every partition (blocking). Idempotent."""
        for _, part in self:
            part.close()
        self._parts.clear()


def register_metrics(tel: ComponentTelemetry, part: Partition, tenant: str) -> None:
    """The disk queue's self-metrics for one partition, read at scrape time (no cost on the hot path)."""
    st = part.stats
    g, c = tel.gauge, tel.counter_reader
    g(
        "exporter_disk_queue_bytes",
        "Bytes of disk-queue segments on disk.",
        lambda: part.disk_bytes,
        tenant=tenant,
    )
    g(
        "exporter_disk_queue_records",
        "Records in the disk queue not yet acked.",
        lambda: part.records,
        tenant=tenant,
    )
    g(
        "exporter_disk_queue_oldest_age_seconds",
        "Age of the oldest unacked record in the disk queue.",
        part.oldest_age_s,
        tenant=tenant,
    )
    c(
        "exporter_disk_queue_fsyncs_total",
        "fsync calls made by the disk queue.",
        lambda: st.fsyncs,
        tenant=tenant,
    )
    c(
        "exporter_disk_queue_appended_records_total",
        "Records written to the disk queue.",
        lambda: st.appended_records,
        tenant=tenant,
    )
    for reason, read in (
        ("queue_full", lambda: st.dropped_records),
        ("corrupt", lambda: st.corrupt_records),
        ("missing", lambda: st.missing_records),
    ):
        c(
            "exporter_disk_queue_lost_records_total",
            "Records removed from the disk queue without being sent, by reason.",
            read,
            tenant=tenant,
            reason=reason,
        )
    for reason, read in (("queue_full", lambda: st.dropped_items), ("corrupt", lambda: st.corrupt_items)):
        c(
            "exporter_disk_queue_lost_points_total",
            "Points in records removed without being sent, by reason (corrupt: where the header survived).",
            read,
            tenant=tenant,
            reason=reason,
        )
    for reason, read in (("full", lambda: st.refused_full), ("disk_full", lambda: st.refused_disk_full)):
        c(
            "exporter_disk_queue_refused_appends_total",
            "Appends the disk queue refused, by reason.",
            read,
            tenant=tenant,
            reason=reason,
        )
    c(
        "exporter_disk_queue_missing_segments_total",
        "Segment files the ledger expected that were missing at open.",
        lambda: st.missing_segments,
        tenant=tenant,
    )
