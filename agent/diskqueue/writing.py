"""Appending to a partition: one record or a batch, rolling segments, refusing or dropping when full."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import struct
import time
from collections.abc import Iterable, Mapping

import google_crc32c

from agent.diskqueue.format import (
    MAX_BODY,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    SEGMENT_HEADER_SIZE,
    body_prefix,
    encode_segment_header,
    segment_name,
)
from agent.diskqueue.results import (
    AppendManyResult,
    AppendResult,
    DiskFull,
    QueueError,
    QueueFull,
    RecordTooLarge,
)
from agent.diskqueue.segments import _PENDING, _U32_MAX, _Segment, _write_all
from agent.diskqueue.state import PartitionState

log = logging.getLogger("headwater.diskqueue")

_U32 = struct.Struct("<I")
_crc_value = google_crc32c.value
_crc_extend = google_crc32c.extend
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class PartitionWriting(PartitionState):
    """The append path of :class:`agent.diskqueue.Partition`; see there."""

    # --- writing ---------------------------------------------------------------------------------

    def append(
        self,
        payload: bytes,
        items: int = 1,
        headers: Mapping[str, str] | None = None,
        *,
        admitted: bool = False,
    ) -> AppendResult:
        """Write one record to the page cache (no fsync: call :meth:`sync` off the event loop).

        Raises QueueFull (policy ``block``), DiskFull (filesystem full: nothing was left behind) or
        RecordTooLarge. With ``drop_oldest`` the oldest records are removed to make room and
        reported in the result. ``admitted``: the record is part of a batch the caller already
        admitted (:func:`agent.component.admitted`), so policy ``block`` takes it past ``max_bytes``
        rather than refuse the batch part-way; DiskFull and RecordTooLarge are raised all the same.

        The record is in the page cache when this returns (one ``writev``: header, body prefix and the
        payload as given, no copy), so it survives a crash of the process, not of the machine, until
        :meth:`sync`. Appends are never buffered in this process: that would widen the kill -9 loss
        window, which ``fsync: never`` and ``interval`` promise is zero. Use :meth:`append_many` to
        write several records with one syscall.
        """
        if type(payload) is not bytes:
            payload = bytes(payload)  # the checksum takes bytes only
        prefix = body_prefix(len(payload), headers)
        body_len = len(prefix) + len(payload)
        size = RECORD_HEADER_SIZE + body_len
        if body_len > MAX_BODY or size + SEGMENT_HEADER_SIZE > self._max_bytes:
            raise RecordTooLarge(f"a {size}-byte record can never fit in max_bytes={self._max_bytes}")
        # Checksums and packing call the C functions directly: a Python-level helper call costs
        # ~0.1 µs, a measurable share of a 1 KB record (~5 µs in all, ~2 µs of it the writev).
        b_crc = _crc_extend(_crc_value(prefix), payload)  # outside the lock: it needs no shared state
        dropped_records = dropped_items = 0
        with self._lock:
            seg = self._active
            if (
                seg is None  # also when closed or read-only: _make_room raises then
                or (seg.seqs and seg.size + size > self._segment_target)
                or self._disk_bytes - self._reclaimable + size > self._max_bytes
            ):
                seg, dropped_records, dropped_items = self._make_room(size, admitted)
            seq = self._next_seq
            offset = seg.size
            now_ms = time.time_ns() // 1_000_000
            head = RECORD_HEADER.pack(RECORD_MAGIC, body_len, seq, items, now_ms, b_crc)
            bufs = (head, _U32.pack(_crc_value(head)), prefix, payload)
            fd = seg.fd
            assert fd is not None
            try:
                done = os.writev(fd, bufs)
                if done != size:
                    _write_all(fd, bufs, size, done)
            except OSError as exc:
                self._undo_write(seg, offset)
                raise self._write_error(exc) from exc
            seg.size = offset + size
            self._disk_bytes += size
            self._next_seq = seq + 1
            # _Segment.add, inlined: this is the per-record cost the 1 KB budget is made of.
            seg.seqs.append(seq)
            seg.offsets.append(offset)
            seg.lengths.append(body_len)
            seg.items.append(items)
            seg.times.append(now_ms)
            seg.state.append(_PENDING)
            seg.pending += 1
            if len(seg.seqs) == 1:
                self._firsts_dirty = True
            self._records += 1
            self._pending += 1
            stats = self.stats
            stats.appended_records += 1
            stats.appended_bytes += size
        return AppendResult(seq, dropped_records, dropped_items)

    def append_many(self, records: Iterable[tuple[bytes, int, Mapping[str, str] | None]]) -> AppendManyResult:
        """Append ``(payload, items, headers)`` records in order: one lock round trip, and one ``writev``
        per segment the batch lands in (usually one) instead of one syscall per record.

        All or nothing: on QueueFull (policy ``block``: the whole batch does not fit), DiskFull or
        RecordTooLarge (one record, or the batch, could never fit in ``max_bytes``) no record of the
        batch is appended. With ``drop_oldest``, the oldest records are removed to make room for the
        whole batch. The records get consecutive seqs (``result.seqs``) and one append time. Like
        :meth:`append`, they are in the page cache on return and durable after :meth:`sync`.
        """
        opts = self.options
        batch: list[tuple[bytes, bytes, int, int, int]] = []  # prefix, payload, items, body_len, crc
        sizes: list[int] = []
        for payload, items, headers in records:
            if type(payload) is not bytes:
                payload = bytes(payload)
            prefix = body_prefix(len(payload), headers)
            body_len = len(prefix) + len(payload)
            size = RECORD_HEADER_SIZE + body_len
            if body_len > MAX_BODY or size + SEGMENT_HEADER_SIZE > opts.max_bytes:
                raise RecordTooLarge(f"a {size}-byte record can never fit in max_bytes={opts.max_bytes}")
            if not 0 <= items <= _U32_MAX:
                raise ValueError(f"items must be in [0, 2**32), not {items}")
            batch.append((prefix, payload, items, body_len, _crc_extend(_crc_value(prefix), payload)))
            sizes.append(size)
        # Checked against an empty partition: even after dropping everything the batch would not fit.
        _, fresh_need = self._plan(sizes, None)
        if fresh_need > opts.max_bytes:
            raise RecordTooLarge(
                f"a batch of {len(sizes)} records ({fresh_need} bytes) can never fit in"
                f" max_bytes={opts.max_bytes}; append it in smaller batches"
            )
        with self._lock:
            self._check_writable()
            first = self._next_seq
            if not batch:
                return AppendManyResult(first, 0)
            rolls, need = self._plan(sizes, self._active)
            dropped_records = dropped_items = 0
            while self.used_bytes + need > opts.max_bytes:
                if opts.full_policy == "block":
                    self.stats.refused_full += 1
                    raise QueueFull(
                        f"disk queue {self.directory} is full ({self.used_bytes} of {opts.max_bytes} bytes,"
                        f" a batch of {len(sizes)} records needs {need})"
                    )
                # A drop can seal the writer's segment, which costs one more segment header: re-plan
                # and drop again if that tipped it (the second round always fits: fresh_need did).
                records_gone, items_gone = self._drop_oldest(need)
                dropped_records += records_gone
                dropped_items += items_gone
                rolls, need = self._plan(sizes, self._active)
                if not records_gone and self.used_bytes + need > opts.max_bytes:
                    # Nothing left to drop (only in-flight or freed-but-undeleted bytes remain).
                    self.stats.refused_full += 1
                    raise QueueFull(
                        f"disk queue {self.directory} is full ({self.used_bytes} of {opts.max_bytes} bytes)"
                    )
            now_ms = time.time_ns() // 1_000_000
            # Write phase: every byte of the batch reaches the files before any in-memory state
            # changes, so a failure is undone by cutting the files back alone.
            n = len(batch)
            spans: list[tuple[_Segment, int, int, int, bool]] = []  # seg, size before, lo, hi, created
            head_hi = rolls[0] if rolls else n
            if head_hi:  # the first records go to the writer's current segment
                assert self._active is not None
                spans.append((self._active, self._active.size, 0, head_hi, False))
            sid = self._next_segment
            try:
                for j, lo in enumerate(rolls):
                    seg = self._open_segment(sid)
                    sid += 1
                    spans.append((seg, seg.size, lo, rolls[j + 1] if j + 1 < len(rolls) else n, True))
                pack, magic = RECORD_HEADER.pack, RECORD_MAGIC
                for seg, _start, a, b, _created in spans:
                    bufs: list[bytes] = []
                    for k in range(a, b):
                        prefix, payload, items, body_len, b_crc = batch[k]
                        head = pack(magic, body_len, first + k, items, now_ms, b_crc)
                        bufs += (head + _U32.pack(_crc_value(head)), prefix, payload)
                    assert seg.fd is not None
                    _write_all(seg.fd, bufs, sum(sizes[a:b]))
            except BaseException as exc:  # an OSError, or an interrupt between two writes
                for seg, start, _a, _b, created in spans:
                    if created:
                        assert seg.fd is not None
                        os.close(seg.fd)
                        with contextlib.suppress(OSError):
                            os.unlink(seg.path)
                    else:
                        self._undo_write(seg, start)
                if isinstance(exc, OSError):
                    raise self._write_error(exc) from exc
                raise
            # Commit phase: index the records, register the new segments.
            for seg, start, a, b, created in spans:
                if created:
                    self._register(seg)
                if not seg.seqs:
                    self._firsts_dirty = True
                # Column by column (C loops) rather than _Segment.add per record.
                m = b - a
                seg.seqs.extend(range(first + a, first + b))
                seg.offsets.extend(itertools.accumulate(sizes[a : b - 1], initial=start))
                seg.lengths.extend([batch[k][3] for k in range(a, b)])
                seg.items.extend([batch[k][2] for k in range(a, b)])
                seg.times.extend(itertools.repeat(now_ms, m))
                seg.state.extend(bytes(m))  # _PENDING is 0
                seg.pending += m
                end = start + sum(sizes[a:b])
                self._disk_bytes += end - seg.size
                seg.size = end
            self._next_seq = first + n
            self._records += n
            self._pending += n
            self.stats.appended_records += n
            self.stats.appended_bytes += sum(sizes)
            return AppendManyResult(first, n, dropped_records, dropped_items)

    def _plan(self, sizes: list[int], active: _Segment | None) -> tuple[list[int], int]:
        """Where a batch rolls to a new segment (indices of the records that start one), and the bytes
        it adds counting the new segments' headers. The same rule as :meth:`append`, record by record."""
        target = self._segment_target
        if active is not None and active.size + sum(sizes) <= target:
            return [], sum(sizes)  # the usual case: the whole batch fits in the writer's segment
        rolls: list[int] = []
        if active is None:
            size, count = -1, 0
        else:
            size, count = active.size, active.count
        need = 0
        for k, sz in enumerate(sizes):
            if size < 0 or (count and size + sz > target):
                rolls.append(k)
                size, count = SEGMENT_HEADER_SIZE, 0
                need += SEGMENT_HEADER_SIZE
            size += sz
            count += 1
            need += sz
        return rolls, need

    def _make_room(self, size: int, admitted: bool = False) -> tuple[_Segment, int, int]:
        """The slow part of :meth:`append`: refuse, drop the oldest, and/or roll to a new segment.
        ``admitted`` (policy ``block``): neither refuse nor drop, go past ``max_bytes``."""
        self._check_writable()
        opts = self.options
        active = self._active
        roll = active is None or (active.count > 0 and active.size + size > self._segment_target)
        need = size + (SEGMENT_HEADER_SIZE if roll else 0)
        dropped_records = dropped_items = 0
        if self.used_bytes + need > opts.max_bytes and not (admitted and opts.full_policy == "block"):
            if opts.full_policy == "block":
                self.stats.refused_full += 1
                raise QueueFull(
                    f"disk queue {self.directory} is full ({self.used_bytes} of {opts.max_bytes} bytes)"
                )
            dropped_records, dropped_items = self._drop_oldest(need)
            active = self._active
            roll = active is None or (active.count > 0 and active.size + size > self._segment_target)
        if roll:
            self._roll()
        assert self._active is not None
        return self._active, dropped_records, dropped_items

    def _check_writable(self) -> None:
        if self._closed:
            raise QueueError(f"disk queue {self.directory} is closed")
        if self.readonly:
            raise QueueError(f"disk queue {self.directory} was opened read-only")

    def _write_error(self, exc: OSError) -> OSError | DiskFull:
        """What a failed write raises: DiskFull (counted) for a full filesystem, else the OSError."""
        if exc.errno in _DISK_FULL:
            self.stats.refused_disk_full += 1
            return DiskFull(f"disk queue {self.directory}: {exc.strerror}; the append was refused")
        return exc

    def _undo_write(self, seg: _Segment, start: int) -> None:
        """Cut a partial write off, so no torn record is left behind."""
        assert seg.fd is not None
        try:
            os.ftruncate(seg.fd, start)
            os.lseek(seg.fd, start, os.SEEK_SET)
        except OSError:
            # Cannot cut it: stop writing to this segment. The next open sees a torn tail, counted.
            log.exception("%s: cannot truncate a failed write; starting a new segment", seg.path)
            self._seal(seg)

    def _roll(self) -> None:
        try:
            seg = self._open_segment(self._next_segment)
        except OSError as exc:
            raise self._write_error(exc) from exc
        self._register(seg)

    def _open_segment(self, sid: int) -> _Segment:
        """Create segment file ``sid`` with its header written; not yet part of the partition."""
        path = os.path.join(self.directory, segment_name(sid))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        header = encode_segment_header(sid)
        try:
            _write_all(fd, (header,), len(header))
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        seg = _Segment(sid, path, len(header))
        seg.synced_size = 0
        seg.fd = fd
        seg.sealed = False
        return seg

    def _register(self, seg: _Segment) -> None:
        """Make a segment from :meth:`_open_segment` the writer's, sealing the previous one."""
        if self._active is not None:
            self._seal(self._active)
        self._next_segment = max(self._next_segment, seg.id + 1)
        self._segments.append(seg)
        self._disk_bytes += seg.size
        self._active = seg
        self._dir_dirty = True
        self._ledger_dirty = True  # the ledger lists live segments, so a lost file is noticed

    def _seal(self, seg: _Segment) -> None:
        seg.sealed = True
        if self._active is seg:
            self._active = None
        if seg.all_done:
            self._reclaimable += seg.size

        # The fd stays open until sync() has fdatasync'ed what was written through it.

    def _drop_oldest(self, need: int) -> tuple[int, int]:
        """Remove whole oldest records until ``need`` bytes fit; whole segments are what frees space.

        Records in flight are left alone: a worker is sending them and will ack or release them (a
        dropped one could be counted dropped and then delivered); their segment is freed by the ack.
        """
        records = items = 0
        for seg in list(self._segments):
            if self.used_bytes + need <= self.options.max_bytes:
                break
            if seg.all_done and seg.sealed:
                continue
            for i in range(seg.count):
                if seg.state[i] == _PENDING:
                    records += 1
                    items += seg.items[i]
                    self._mark_done(seg, i)
            if not seg.sealed:
                self._seal(seg)
        self.stats.dropped_records += records
        self.stats.dropped_items += items
        if records:
            self._ledger_dirty = True
        return records, items
