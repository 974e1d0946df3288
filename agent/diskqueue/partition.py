"""One partition of the disk queue: a directory of segment files, a ledger and a lock.

Threading: every public method is safe to call from any thread. One ``threading.Lock`` guards the
in-memory state and is held only for page-cache work (a ``write``/``pread`` and bookkeeping).
:meth:`Partition.sync` runs its ``fdatasync``/``fsync`` calls *outside* that lock, so the event loop
keeps appending, reading and acking while a worker thread (``asyncio.to_thread(p.sync)`` or
:meth:`Partition.sync_async`) makes earlier appends durable. Concurrent ``sync`` calls serialise and
coalesce (a caller that waited finds its bytes already synced: group commit). Nothing here fsyncs
inside ``append``.

Cost (see ``bench/diskqueue_bench.py``): the per-record work is Python, not the disk. ``append`` is
one ``writev`` (header, msgpack prefix, the payload uncopied) plus a few µs of bookkeeping; it never
buffers in the process, because an appended record must survive kill -9 (the page cache does) even
before ``sync``. :meth:`Partition.append_many` writes a batch with one ``writev`` per segment and
indexes it column-wise. :meth:`Partition.iter_unacked` reads segments in multi-MiB ``pread`` chunks
and checks records in memory; :meth:`Partition.next` reads one record per ``pread`` (it hands out
one record at a time). The on-disk format is unchanged by all of this (version 1).

Rooms: :class:`Partition` (here: opening, durability and the ledger write, tooling) is composed of
parts that share one :class:`agent.diskqueue.state.PartitionState` (the fields, gauges, acking):
:mod:`~agent.diskqueue.writing` (append), :mod:`~agent.diskqueue.reading` (next, bulk re-reads) and
:mod:`~agent.diskqueue.recovery` (rebuilding the index at open). The ledger and the lock file are in
:mod:`~agent.diskqueue.ledger`, a segment's in-memory index in :mod:`~agent.diskqueue.segments`, the
options, results, errors and counters in :mod:`~agent.diskqueue.results`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable

from agent.diskqueue.format import FormatError, fsync_dir, write_atomic
from agent.diskqueue.ledger import (
    LEDGER,
    LEDGER_MAGIC,
    LEDGER_VERSION,
    LOCK,
    MAX_LEDGER_RANGES,
    _Ledger,
    acquire_lock,
    lock_holder,
)
from agent.diskqueue.reading import READ_CHUNK, PartitionReading
from agent.diskqueue.recovery import PartitionRecovery
from agent.diskqueue.results import (
    AppendManyResult,
    AppendResult,
    DiskFull,
    PartitionOptions,
    PartitionStats,
    QueueError,
    QueueFull,
    QueueLocked,
    Record,
    RecordTooLarge,
    RecoveryReport,
    UnsupportedFormat,
)
from agent.diskqueue.segments import _LIVE_RUN, _Segment
from agent.diskqueue.writing import PartitionWriting

__all__ = [
    "LEDGER",
    "LEDGER_MAGIC",
    "LEDGER_VERSION",
    "LOCK",
    "READ_CHUNK",
    "AppendManyResult",
    "AppendResult",
    "DiskFull",
    "Partition",
    "PartitionOptions",
    "PartitionStats",
    "QueueError",
    "QueueFull",
    "QueueLocked",
    "Record",
    "RecordTooLarge",
    "RecoveryReport",
    "UnsupportedFormat",
    "acquire_lock",
    "lock_holder",
]

log = logging.getLogger("headwater.diskqueue")


class Partition(PartitionRecovery, PartitionWriting, PartitionReading):
    """A FIFO of records on disk with at-least-once delivery. Create with :meth:`open`.

    Life of a record: :meth:`append` (page cache) → :meth:`sync` (durable) → :meth:`next` hands it
    out (in flight) → :meth:`ack` when the backend accepted it, or :meth:`release` to hand it out
    again later. Acks may come in any order; the ledger, written by :meth:`sync`, records the acked
    set so an acked record is not re-delivered after a restart.
    """

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, directory: str, options: PartitionOptions | None = None, *, readonly: bool = False
    ) -> Partition:
        """Open (creating unless ``readonly``) the partition in ``directory`` and recover its state.

        Damage is counted in :attr:`report` and :attr:`stats`, never raised. Raises QueueLocked when
        another process holds the directory, UnsupportedFormat for another format version. ``readonly``
        (the CLI's inspect/verify) takes no lock and changes nothing on disk.
        """
        p = cls(directory, options or PartitionOptions(), readonly)
        if not readonly:
            os.makedirs(directory, exist_ok=True)
            p._lock_fd = acquire_lock(directory)
        try:
            p._recover()
        except FormatError as exc:
            # Never sync on the way out: a ledger built from a partial recovery would overwrite the
            # good one (or a newer version's) and delete segments it does not know are needed.
            p.close(sync=False)
            raise UnsupportedFormat(str(exc)) from None
        except BaseException:
            p.close(sync=False)
            raise
        return p

    # --- durability ------------------------------------------------------------------------------

    def needs_sync(self) -> bool:
        """True when appended bytes are not yet durable, or acks/deletions wait for a ledger write."""
        with self._lock:
            return (
                self._dir_dirty
                or self._ledger_dirty
                or self._reclaimable > 0
                or any(s.size > s.synced_size for s in self._segments if s.fd is not None)
            )

    def sync(self, *, ledger: bool = False) -> None:
        """Make every append made before this call durable; write the ledger when due; delete freed segments.

        Blocking (fdatasync, fsync): call it from a worker thread. The ledger is written when acks
        changed and ``fsync_interval`` passed since the last ledger write, when segments wait to be
        deleted, or when ``ledger=True``. A segment file is deleted only after the ledger that no
        longer needs it is durable. With ``fsync: never`` nothing is fsynced (the ledger is still
        replaced atomically, which survives kill -9 but not power loss).
        """
        durable = self.options.fsync != "never"
        with self._sync_lock:
            hook = self.before_sync
            if hook is not None and not self._closed and not self.readonly:
                hook()  # before the snapshot below: it covers every record appended until now
            with self._lock:
                if self._closed or self.readonly:
                    return
                targets = [
                    (s, s.fd, s.size) for s in self._segments if s.fd is not None and s.size > s.synced_size
                ]
                dir_dirty, self._dir_dirty = self._dir_dirty, False
            if durable:
                try:
                    for _seg, fd, _size in targets:
                        assert fd is not None
                        os.fdatasync(fd)
                        self.stats.fsyncs += 1
                    if dir_dirty:
                        fsync_dir(self.directory)
                        self.stats.fsyncs += 1
                except BaseException:
                    if dir_dirty:
                        with self._lock:
                            self._dir_dirty = True  # a new segment's entry is not durable yet
                    raise
            with self._lock:
                for seg, _fd, size in targets:
                    seg.synced_size = max(seg.synced_size, size)
                # A sealed segment's writer fd is closed once everything written through it is
                # synced, whether that sync came before or after the seal.
                for seg in self._segments:
                    if (
                        seg.fd is not None
                        and seg.sealed
                        and seg.id not in self._read_fds
                        and seg.size == seg.synced_size
                    ):
                        os.close(seg.fd)
                        seg.fd = None
                due = (
                    ledger
                    or self._reclaimable > 0
                    or (
                        self._ledger_dirty
                        and time.monotonic() - self._ledger_written >= self.options.fsync_interval_s
                    )
                )
                if not due:
                    return
                snapshot, deletable = self._snapshot_ledger()
                self._ledger_dirty = False
            try:
                write_atomic(os.path.join(self.directory, LEDGER), snapshot.encode(), durable=durable)
            except BaseException:
                with self._lock:
                    self._ledger_dirty = True  # the acks still wait for a ledger write
                raise
            self._ledger = snapshot
            self._ledger_written = time.monotonic()
            self.stats.ledger_writes += 1
            if durable:
                self.stats.fsyncs += 2
            with self._lock:
                for seg in deletable:
                    self._delete(seg)

    async def sync_async(self, *, ledger: bool = False) -> None:
        """:meth:`sync` in a worker thread, so the event loop never waits on the disk."""
        await asyncio.to_thread(self.sync, ledger=ledger)

    def _snapshot_ledger(self) -> tuple[_Ledger, list[_Segment]]:
        """The acked set as floor + ranges (the complement of live seqs), and the segments it frees."""
        live: list[tuple[int, int]] = []  # [lo, hi) runs of not-done seqs
        for seg in self._segments:
            if seg.all_done:
                continue
            for m in _LIVE_RUN.finditer(seg.state):
                a, b = m.span()
                seqs = seg.seqs
                if seqs[b - 1] - seqs[a] == b - 1 - a:
                    live.append((seqs[a], seqs[b - 1] + 1))
                else:  # gaps inside the run: records lost to damage; they are gone, so acked
                    for k in range(a, b):
                        live.append((seqs[k], seqs[k] + 1))
        floor = live[0][0] if live else self._next_seq
        ranges: list[tuple[int, int]] = []
        for (_, hi), (lo, _) in itertools.pairwise(live):
            if lo > hi:
                ranges.append((hi, lo))
        if live and live[-1][1] < self._next_seq:
            ranges.append((live[-1][1], self._next_seq))
        if len(ranges) > MAX_LEDGER_RANGES:
            # Keep the newest ranges: with newest-first reading they are the live data's acks.
            ranges = ranges[-MAX_LEDGER_RANGES:]
        ledger = _Ledger(floor, ranges, self._next_seq, [], self._next_segment)
        deletable = [
            s
            for s in self._segments
            if s.sealed and s.all_done and all(ledger.acked(q) for q in (s.seqs[:1] + s.seqs[-1:]))
        ]
        # A fully acked segment spans one acked run, so checking its first and last seq suffices.
        ledger.segments = [s.id for s in self._segments if s not in deletable]
        return ledger, deletable

    def _delete(self, seg: _Segment) -> None:
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None
        self._read_fds.pop(seg.id, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(seg.path)
        self._segments.remove(seg)
        self._firsts_dirty = True
        self._disk_bytes -= seg.size
        self._reclaimable -= seg.size
        self.stats.segments_deleted += 1

    def close(self, *, sync: bool = True) -> None:
        """Sync (writing the ledger) and release the lock. Idempotent. Blocking: call from a thread.

        ``sync=False`` releases everything without writing: what a crash leaves (tests use it).
        """
        if self._closed:
            return
        if sync and not self.readonly and self._lock_fd is not None:
            try:
                self.sync(ledger=True)
            except OSError:
                log.exception("%s: final sync failed; unsynced appends may be lost", self.directory)
        with self._sync_lock, self._lock:
            self._closed = True
            for seg in self._segments:
                if seg.fd is not None:
                    os.close(seg.fd)
                    seg.fd = None
            self._read_fds.clear()
            self._active = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tooling ---------------------------------------------------------------------------------

    def segment_summaries(self) -> list[dict[str, int]]:
        """Per segment: id, bytes, records, unacked records (for ``headwater queue inspect``)."""
        with self._lock:
            return [
                {"id": s.id, "bytes": s.size, "records": s.count, "unacked": s.count - s.done}
                for s in self._segments
            ]

    def time_range_ms(self) -> tuple[int | None, int | None]:
        """Append times of the oldest and newest unacked records."""
        with self._lock:
            live = [(s, s.state) for s in self._segments if not s.all_done]
            if not live:
                return None, None
            first_seg, st = live[0]
            last_seg, st2 = live[-1]
            i = min(x for x in (st.find(b"\x00"), st.find(b"\x01")) if x >= 0)
            j = max(st2.rfind(b"\x00"), st2.rfind(b"\x01"))
            return int(first_seg.times[i]), int(last_seg.times[j])

    def verify_bodies(self, progress: Callable[[str], None] | None = None) -> int:
        """Re-read every unacked body and decode it; count (and log) the unreadable ones. Read-only use."""
        bad: list[str] = []

        def note(seg: _Segment, i: int) -> None:
            bad.append(f"{seg.path}: record {seg.seqs[i]} does not decode")
            if progress:
                progress(bad[-1])

        for _ in self._iter_live(READ_CHUNK, note):
            pass
        return len(bad)
