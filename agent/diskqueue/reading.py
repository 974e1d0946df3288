"""Reading a partition: handing records out one at a time (:meth:`next`) and bulk re-reads."""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterator

from agent.diskqueue.format import RECORD_HEADER_SIZE, decode_record_at
from agent.diskqueue.results import Record
from agent.diskqueue.segments import _DONE, _IN_FLIGHT, _LIVE_RUN, _Segment
from agent.diskqueue.state import PartitionState

log = logging.getLogger("headwater.diskqueue")

_READ_FDS = 4  # sealed segments kept open for reading; the writer's segment uses its own fd
READ_CHUNK = 4 << 20
"""Bytes :meth:`Partition.iter_unacked` reads per ``pread`` (at least one whole record)."""


class PartitionReading(PartitionState):
    """The read path of :class:`agent.diskqueue.Partition`; see there."""

    # --- reading ---------------------------------------------------------------------------------

    def next(self, oldest: bool = True) -> Record | None:
        """Hand out the oldest (FIFO) or the newest not-yet-handed-out record, or None when none waits.

        The record is in flight until :meth:`ack` or :meth:`release`. Newest-first lets live data go
        out before a backlog; oldest-first is strict append order.
        """
        with self._lock:
            while self._pending:
                found = self._find_pending(oldest)
                if found is None:
                    return None
                seg, i = found
                seg.state[i] = _IN_FLIGHT
                seg.pending -= 1
                seg.in_flight += 1
                self._pending -= 1
                rec = self._read(seg, i)
                if rec is not None:
                    return rec
            return None

    def _find_pending(self, oldest: bool) -> tuple[_Segment, int] | None:
        segs = self._segments if oldest else reversed(self._segments)
        for seg in segs:
            if seg.pending:
                i = seg.state.find(b"\x00") if oldest else seg.state.rfind(b"\x00")
                return seg, i
        return None

    def _read(self, seg: _Segment, i: int) -> Record | None:
        """Read and check record ``i``; a record damaged since open is counted and dropped (None)."""
        off, n = seg.offsets[i], seg.lengths[i]
        try:
            fd = self._read_fd(seg)
            raw = os.pread(fd, RECORD_HEADER_SIZE + n, off)  # one syscall for header and body
            headers, payload = decode_record_at(raw, 0, n, seg.seqs[i])
        except (OSError, ValueError) as exc:
            self._count_unreadable(seg, i, exc)
            return None
        return Record(seg.seqs[i], payload, seg.items[i], headers, seg.times[i])

    def _count_unreadable(self, seg: _Segment, i: int, why: object) -> None:
        """Record ``i`` no longer reads back (damaged since open): count it as corrupt, never hand it out."""
        log.warning("%s: record %d unreadable (%s); counted as corrupt", seg.path, seg.seqs[i], why)
        self.stats.corrupt_records += 1
        self.stats.corrupt_items += seg.items[i]
        self._mark_done(seg, i)
        self._ledger_dirty = True

    def _read_fd(self, seg: _Segment) -> int:
        if seg.fd is not None:
            return seg.fd
        if len(self._read_fds) >= _READ_FDS:
            for sid, other in list(self._read_fds.items()):
                if other.fd is not None and other.sealed and other.size == other.synced_size:
                    os.close(other.fd)
                    other.fd = None
                    del self._read_fds[sid]
                    break
        seg.fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        self._read_fds[seg.id] = seg
        return seg.fd

    def iter_unacked(self, *, chunk_bytes: int = READ_CHUNK) -> Iterator[Record]:
        """Every record not yet acked, in append order, without handing out or acking anything.

        For replay tools (``headwater queue verify``) and bulk re-reads. Each segment is read
        sequentially, ``chunk_bytes`` at a time (rounded up to whole records) with one ``pread`` per
        chunk, and its records are checked (header and body CRC32C, seq) and decoded in memory. The
        partition's lock is held only to snapshot the index, never during I/O, so appends, acks and
        :meth:`next` go on meanwhile (another thread may even delete a fully acked segment: it is
        skipped). Records appended after the call are not included; a record acked during the
        iteration is skipped if the ack lands before the iterator reaches it. Records damaged since
        open are skipped and counted as corrupt, exactly as by :meth:`next`.
        """
        return self._iter_live(chunk_bytes, None)

    def _iter_live(
        self, chunk_bytes: int, on_bad: Callable[[_Segment, int], None] | None
    ) -> Iterator[Record]:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        with self._lock:
            todo = [(seg, seg.count) for seg in self._segments if not seg.all_done]
        for seg, count in todo:
            yield from self._iter_segment(seg, count, chunk_bytes, on_bad)

    def _iter_segment(
        self,
        seg: _Segment,
        count: int,
        chunk_bytes: int,
        on_bad: Callable[[_Segment, int], None] | None,
    ) -> Iterator[Record]:
        # seg.state, seqs, offsets, ... are only ever appended to (under the lock) and the first
        # ``count`` entries are fixed: offsets/lengths/seqs/items/times never change, and a state byte
        # only moves towards done. So they are read here without the lock: at worst a record acked
        # this very moment is still yielded, which an unlocked snapshot would do anyway.
        state, offsets, lengths, seqs = seg.state, seg.offsets, seg.lengths, seg.seqs
        items, times = seg.items, seg.times
        try:
            fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)  # our own fd: pread needs no lock
        except FileNotFoundError:
            fd = -1
        try:
            i = 0
            while True:
                found = _LIVE_RUN.search(state, i, count)  # next record not done, at C speed
                if found is None:
                    return
                i = found.start()
                start = offsets[i]
                # Records i..j-1 start inside this chunk; the last one is read whole.
                j = max(i + 1, bisect.bisect_left(offsets, start + chunk_bytes, i + 1, count))
                size = offsets[j - 1] + RECORD_HEADER_SIZE + lengths[j - 1] - start
                data = b""
                if fd >= 0:
                    try:
                        data = os.pread(fd, size, start)
                    except OSError as exc:
                        log.warning("%s: read of %d bytes at %d failed: %s", seg.path, size, start, exc)
                elif seg.all_done:
                    return  # deleted by a sync after every record in it was acked: nothing to yield
                for k in range(i, j):
                    if state[k] == _DONE:
                        continue
                    try:
                        headers, payload = decode_record_at(data, offsets[k] - start, lengths[k], seqs[k])
                    except ValueError as exc:
                        with self._lock:
                            if state[k] != _DONE:
                                self._count_unreadable(seg, k, exc)
                                if on_bad is not None:
                                    on_bad(seg, k)
                        continue
                    yield Record(seqs[k], payload, items[k], headers, times[k])
                i = j
        finally:
            if fd >= 0:
                os.close(fd)
