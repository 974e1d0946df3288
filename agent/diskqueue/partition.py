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
"""

from __future__ import annotations

import array
import asyncio
import bisect
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import google_crc32c

from agent.diskqueue.format import (
    MAX_BODY,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    SEGMENT_HEADER_SIZE,
    Corrupt,
    Damage,
    FormatError,
    RecordHeader,
    body_prefix,
    check_segment_header,
    decode_frame,
    decode_record_at,
    encode_frame,
    encode_segment_header,
    fsync_dir,
    parse_segment_name,
    scan_records,
    segment_name,
    write_atomic,
)

log = logging.getLogger("headwater.diskqueue")

_U32 = struct.Struct("<I")
_crc_value = google_crc32c.value
_crc_extend = google_crc32c.extend

LEDGER_MAGIC = b"HQLG"
LEDGER_VERSION = 1
LEDGER = "ledger"
LOCK = "LOCK"
MAX_LEDGER_RANGES = 1024
"""Acked ranges above the contiguous floor kept in the ledger; acks in ranges past this many may be
re-delivered after a restart (only with many interleaved out-of-order acks)."""

_PENDING, _IN_FLIGHT, _DONE = 0, 1, 2
_LIVE_RUN = re.compile(b"[\x00\x01]+")
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_READ_FDS = 4  # sealed segments kept open for reading; the writer's segment uses its own fd
_U32_MAX = (1 << 32) - 1
READ_CHUNK = 4 << 20
"""Bytes :meth:`Partition.iter_unacked` reads per ``pread`` (at least one whole record)."""
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):  # pragma: no cover - every Linux has it (1024)
    _IOV_MAX = 16


def _write_all(fd: int, bufs: Sequence[bytes], total: int, done: int = 0) -> None:
    """Write ``bufs`` (``total`` bytes, of which a previous ``writev`` wrote ``done``) at the file position.

    One ``writev`` per IOV_MAX buffers. A regular file takes a whole ``writev`` unless a limit
    intervenes (a full disk, RLIMIT_FSIZE); then the rest is written plainly, so the call either
    finishes or raises the limit's OSError.
    """
    if len(bufs) > _IOV_MAX:
        for i in range(0, len(bufs), _IOV_MAX):
            group = bufs[i : i + _IOV_MAX]
            _write_all(fd, group, sum(map(len, group)))
        return
    if not done:
        done = os.writev(fd, bufs)
    if done < total:
        rest = memoryview(b"".join(bufs))[done:]
        while rest:
            rest = rest[os.write(fd, rest) :]


class QueueError(Exception):
    """Base of the disk queue's errors."""


class QueueFull(QueueError):
    """``append`` refused: the partition is at ``max_bytes`` (policy ``block``) or the disk is full.

    Nothing was written. The caller applies backpressure or drops the data and counts it.
    """


class DiskFull(QueueFull):
    """The filesystem refused the write (ENOSPC, EFBIG, EDQUOT); the segment was truncated back."""


class RecordTooLarge(QueueError, ValueError):
    """A record that could never fit in ``max_bytes``."""


class QueueLocked(QueueError):
    """Another process (or another open in this one) holds the partition's lock."""


class UnsupportedFormat(QueueError):
    """A segment or ledger written in a format version this code does not read."""


@dataclass(frozen=True)
class PartitionOptions:
    """What a partition needs from the config (see :class:`agent.diskqueue.DiskQueueConfig`)."""

    max_bytes: int = 1 << 30
    full_policy: Literal["block", "drop_oldest"] = "block"
    fsync: Literal["batch", "interval", "never"] = "batch"
    fsync_interval_s: float = 0.1
    segment_bytes: int = 32 << 20

    @property
    def segment_target(self) -> int:
        # Space comes back a whole segment at a time, so keep segments ≤ 1/8 of the budget.
        return max(4096, min(self.segment_bytes, self.max_bytes // 8))


@dataclass(frozen=True, slots=True)
class Record:
    """One stored record. ``seq`` is what you pass to :meth:`Partition.ack`."""

    seq: int
    payload: bytes
    items: int
    headers: dict[str, str]
    time_ms: int


@dataclass(frozen=True, slots=True)
class AppendResult:
    seq: int
    dropped_records: int = 0
    """Records removed by ``drop_oldest`` to make room (their items are in ``dropped_items``)."""
    dropped_items: int = 0


@dataclass(frozen=True, slots=True)
class AppendManyResult:
    """What :meth:`Partition.append_many` appended: ``count`` records with seqs ``first_seq`` onwards."""

    first_seq: int
    count: int
    dropped_records: int = 0
    """Records removed by ``drop_oldest`` to make room for the batch."""
    dropped_items: int = 0

    @property
    def seqs(self) -> range:
        return range(self.first_seq, self.first_seq + self.count)


@dataclass
class RecoveryReport:
    """What opening the partition found. Lost records are counted from gaps in sequence numbers."""

    segments: int = 0
    records: int = 0
    corrupt_records: int = 0
    """Records lost to damaged bytes (bad checksum, bad length, garbage, torn tail)."""
    corrupt_items: int = 0
    """Items of corrupt records whose header survived (a lower bound of the items lost)."""
    damaged_regions: int = 0
    missing_records: int = 0
    """Unacked records the ledger knew of that are in no segment (missing file, unsynced tail lost)."""
    missing_segments: int = 0
    bad_segment_headers: int = 0
    truncated_bytes: int = 0
    """Bytes of a torn or garbage tail cut off the last segment."""
    ledger: Literal["ok", "missing", "corrupt", "new"] = "new"
    damaged_segments: list[str] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        return bool(
            self.corrupt_records
            or self.missing_records
            or self.missing_segments
            or self.bad_segment_headers
            or self.ledger in ("missing", "corrupt")
        )


class PartitionStats:
    """Counters since open; gauges are properties of :class:`Partition`. Plain attributes, read at scrape."""

    __slots__ = (
        "appended_bytes",
        "appended_records",
        "corrupt_items",
        "corrupt_records",
        "dropped_items",
        "dropped_records",
        "fsyncs",
        "ledger_writes",
        "missing_records",
        "missing_segments",
        "refused_disk_full",
        "refused_full",
        "segments_deleted",
    )

    def __init__(self) -> None:
        self.appended_records = 0
        self.appended_bytes = 0
        self.fsyncs = 0
        self.ledger_writes = 0
        self.dropped_records = 0
        """Records removed by drop_oldest (reason queue_full)."""
        self.dropped_items = 0
        self.corrupt_records = 0
        """Records lost to damage, at open and when a read finds a bad checksum."""
        self.corrupt_items = 0
        self.missing_records = 0
        self.missing_segments = 0
        self.refused_full = 0
        self.refused_disk_full = 0
        self.segments_deleted = 0


class _Segment:
    """The in-memory index of one segment file: per record its seq, offset, length, items, time, state."""

    __slots__ = (
        "done",
        "fd",
        "id",
        "in_flight",
        "items",
        "lengths",
        "offsets",
        "path",
        "pending",
        "sealed",
        "seqs",
        "size",
        "state",
        "synced_size",
        "times",
    )

    def __init__(self, segment_id: int, path: str, size: int) -> None:
        self.id = segment_id
        self.path = path
        self.seqs = array.array("Q")
        self.offsets = array.array("Q")
        self.lengths = array.array("I")
        self.items = array.array("I")
        self.times = array.array("Q")
        self.state = bytearray()
        self.pending = 0
        self.in_flight = 0
        self.done = 0
        self.size = size
        self.synced_size = size
        self.fd: int | None = None
        self.sealed = True

    def add(self, seq: int, offset: int, body_len: int, items: int, time_ms: int, state: int) -> None:
        self.seqs.append(seq)
        self.offsets.append(offset)
        self.lengths.append(body_len)
        self.items.append(items)
        self.times.append(time_ms)
        self.state.append(state)
        if state == _DONE:
            self.done += 1
        else:
            self.pending += 1

    def fill(self, heads: list[RecordHeader], ledger: _Ledger) -> None:
        """Index the records an open scan found (ascending seqs); the ledger says which are acked.

        Column by column and range by range rather than record by record: opening a partition
        costs per record only the scan itself.
        """
        self.seqs = array.array("Q", [h.seq for h in heads])
        self.offsets = array.array("Q", [h.offset for h in heads])
        self.lengths = array.array("I", [h.body_len for h in heads])
        self.items = array.array("I", [h.items for h in heads])
        self.times = array.array("Q", [h.time_ms for h in heads])
        seqs = self.seqs
        n = len(seqs)
        state = bytearray(n)  # all _PENDING
        floor_at = bisect.bisect_left(seqs, ledger.floor)
        state[:floor_at] = bytes([_DONE]) * floor_at
        for lo, hi in ledger.ranges:
            if hi <= seqs[0] or lo > seqs[-1]:
                continue
            a, b = bisect.bisect_left(seqs, lo), bisect.bisect_left(seqs, hi)
            state[a:b] = bytes([_DONE]) * (b - a)
        self.state = state
        self.done = state.count(_DONE)
        self.pending = n - self.done

    @property
    def count(self) -> int:
        return len(self.seqs)

    @property
    def all_done(self) -> bool:
        return self.done == len(self.seqs)


class _Ledger:
    """The acked set: every seq below ``floor`` plus the sorted disjoint ``ranges`` [lo, hi)."""

    def __init__(
        self,
        floor: int = 0,
        ranges: list[tuple[int, int]] | None = None,
        next_seq: int = 0,
        segments: list[int] | None = None,
        next_segment: int = 1,
    ) -> None:
        self.floor = floor
        self.ranges = ranges or []
        self.next_seq = next_seq
        self.segments = segments or []
        self.next_segment = next_segment
        self._los = [lo for lo, _ in self.ranges]

    def acked(self, seq: int) -> bool:
        if seq < self.floor:
            return True
        i = bisect.bisect_right(self._los, seq) - 1
        return i >= 0 and seq < self.ranges[i][1]

    def unacked_between(self, lo: int, hi: int) -> int:
        """How many seqs in [lo, hi) are not acked."""
        lo = max(lo, self.floor)
        if hi <= lo:
            return 0
        n = hi - lo
        for a, b in self.ranges:
            n -= max(0, min(b, hi) - max(a, lo))
        return n

    def encode(self) -> bytes:
        return encode_frame(
            LEDGER_MAGIC,
            LEDGER_VERSION,
            {
                "floor": self.floor,
                "acked": [list(r) for r in self.ranges],
                "next_seq": self.next_seq,
                "segments": self.segments,
                "next_segment": self.next_segment,
                "written_ms": int(time.time() * 1000),
            },
        )

    @classmethod
    def decode(cls, data: bytes, path: str) -> _Ledger:
        obj: Any = decode_frame(data, LEDGER_MAGIC, LEDGER_VERSION, path)
        try:
            ranges = [(int(a), int(b)) for a, b in obj["acked"]]
            ledger = cls(
                int(obj["floor"]),
                ranges,
                int(obj["next_seq"]),
                [int(s) for s in obj["segments"]],
                int(obj["next_segment"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Corrupt(f"{path}: unexpected ledger content: {exc}") from exc
        if any(a >= b for a, b in ranges) or ranges != sorted(ranges) or ledger.floor < 0:
            raise Corrupt(f"{path}: ledger ranges are not sorted and disjoint")
        return ledger


def lock_holder(directory: str) -> str:
    try:
        with open(os.path.join(directory, LOCK)) as f:
            pid = f.read().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def acquire_lock(directory: str) -> int:
    """flock the partition's LOCK file and write our pid into it; QueueLocked when someone holds it."""
    fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise QueueLocked(
            f"disk queue directory {directory} is locked by another process{lock_holder(directory)};"
            " two agents must not share a queue directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Partition:
    """A FIFO of records on disk with at-least-once delivery. Create with :meth:`open`.

    Life of a record: :meth:`append` (page cache) → :meth:`sync` (durable) → :meth:`next` hands it
    out (in flight) → :meth:`ack` when the backend accepted it, or :meth:`release` to hand it out
    again later. Acks may come in any order; the ledger, written by :meth:`sync`, records the acked
    set so an acked record is not re-delivered after a restart.
    """

    def __init__(self, directory: str, options: PartitionOptions, readonly: bool) -> None:
        self.directory = directory
        self.options = options
        self.readonly = readonly
        self.stats = PartitionStats()
        self.report = RecoveryReport()
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []  # first seq per segment with records, for bisect (rebuilt lazily)
        self._firsts_segs: list[_Segment] = []
        self._firsts_dirty = True
        self._active: _Segment | None = None
        self._read_fds: dict[int, _Segment] = {}
        self._lock_fd: int | None = None
        self._next_seq = 0
        self._next_segment = 1
        self._ledger = _Ledger()
        self._ledger_dirty = False
        self._ledger_written = time.monotonic()
        self._dir_dirty = False
        self._records = 0  # not done
        self._pending = 0
        self._disk_bytes = 0
        self._reclaimable = 0
        self._closed = False
        self.before_sync: Callable[[], None] | None = None
        """Called (in the syncing thread) at the start of every :meth:`sync`, before the segments are
        fsynced: side state that must be durable before the records it describes (remote-write's
        journal) syncs here, so no sync of this partition, whoever calls it, gets ahead of it."""
        # Read on every append: plain attributes, not the options' property.
        self._max_bytes = options.max_bytes
        self._segment_target = options.segment_target

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

    def _recover(self) -> None:
        d = self.directory
        rep = self.report
        if not self.readonly:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, LEDGER + ".tmp"))
        ids = sorted(i for i in (parse_segment_name(n) for n in os.listdir(d)) if i is not None)
        ledger_path = os.path.join(d, LEDGER)
        try:
            with open(ledger_path, "rb") as f:
                self._ledger = _Ledger.decode(f.read(), ledger_path)
            rep.ledger = "ok"
        except FileNotFoundError:
            rep.ledger = "missing" if ids else "new"
        except Corrupt as exc:
            rep.ledger = "corrupt"
            log.warning("%s; re-delivering every record on disk (duplicates, never loss)", exc)
        if rep.ledger in ("missing", "corrupt"):
            if rep.ledger == "missing":
                log.warning(
                    "%s: no ledger beside %d segments; re-delivering every record on disk", d, len(ids)
                )
            self._ledger = _Ledger()
            self._ledger_dirty = True
        ledger = self._ledger
        present = set(ids)
        rep.missing_segments = sum(1 for s in ledger.segments if s not in present)
        prev = ledger.floor - 1  # highest seq seen so far (or acked by the floor)
        damaged = False
        for n, sid in enumerate(ids):
            path = os.path.join(d, segment_name(sid))
            with open(path, "rb") as f:
                data = f.read()
            seg = _Segment(sid, path, len(data))
            last = n == len(ids) - 1
            header_ok = check_segment_header(data, sid, path)  # FormatError for another version
            good_end = min(len(data), SEGMENT_HEADER_SIZE)
            if not header_ok:
                rep.bad_segment_headers += 1
                rep.damaged_segments.append(path)
            tail_damage: Damage | None = None
            heads: list[RecordHeader] = []
            for ev in scan_records(data, good_end):
                if type(ev) is Damage:
                    damaged = True
                    rep.damaged_regions += 1
                    if path not in rep.damaged_segments:
                        rep.damaged_segments.append(path)
                    if ev.items >= 0 and ev.seq > prev and not ledger.acked(ev.seq):
                        rep.corrupt_items += ev.items
                    if ev.to_eof:
                        tail_damage = ev
                    continue
                assert type(ev) is RecordHeader
                seq = ev.seq
                if seq > prev:
                    if seq > prev + 1:
                        gap = ledger.unacked_between(prev + 1, seq)
                        if damaged:
                            rep.corrupt_records += gap
                        else:
                            rep.missing_records += gap
                    prev = seq
                damaged = False
                heads.append(ev)
            if heads:
                seg.fill(heads, ledger)
                good_end = heads[-1].end
            if last and tail_damage is not None and not self.readonly and header_ok:
                # A torn or garbage tail: cut it off so the file ends on a record boundary.
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                rep.truncated_bytes += len(data) - good_end
                seg.size = seg.synced_size = good_end
            if last and not header_ok and seg.count == 0 and not self.readonly:
                # Created but never written (a crash right after open()): nothing to keep.
                os.unlink(path)
                rep.bad_segment_headers -= 1
                rep.truncated_bytes += len(data)
                rep.damaged_segments.remove(path)
                damaged = bool(len(data)) and damaged
                continue
            self._segments.append(seg)
        end = max(ledger.next_seq, prev + 1)
        gap = ledger.unacked_between(prev + 1, end)
        if damaged:
            rep.corrupt_records += max(gap, 1)
        else:
            rep.missing_records += gap
        self._next_seq = end
        self._next_segment = max([ledger.next_segment, *(i + 1 for i in ids)])
        for seg in self._segments:
            self._disk_bytes += seg.size
            self._records += seg.pending
            self._pending += seg.pending
            if seg.all_done:
                self._reclaimable += seg.size
        rep.segments = len(self._segments)
        rep.records = self._records
        st = self.stats
        st.corrupt_records = rep.corrupt_records
        st.corrupt_items = rep.corrupt_items
        st.missing_records = rep.missing_records
        st.missing_segments = rep.missing_segments
        if rep.damaged:
            self._ledger_dirty = True  # persist the lost seqs as gone, so the next open does not recount
            log.warning(
                "%s: recovered %d records; lost %d corrupt (%d items known), %d missing, %d missing segments,"
                " cut %d bytes of torn tail, ledger %s",
                d,
                rep.records,
                rep.corrupt_records,
                rep.corrupt_items,
                rep.missing_records,
                rep.missing_segments,
                rep.truncated_bytes,
                rep.ledger,
            )

    # --- gauges ----------------------------------------------------------------------------------

    @property
    def records(self) -> int:
        """Records not yet acked (pending and in flight): the lag."""
        return self._records

    @property
    def pending(self) -> int:
        """Records waiting to be handed out by :meth:`next`."""
        return self._pending

    @property
    def disk_bytes(self) -> int:
        """Bytes of segment files on disk, including segments freed but not yet deleted."""
        return self._disk_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes counted against ``max_bytes``: segments still needed."""
        return self._disk_bytes - self._reclaimable

    def oldest_time_ms(self) -> int | None:
        with self._lock:
            for seg in self._segments:
                if seg.done < seg.count:
                    i = seg.state.find(b"\x00") if seg.pending else -1
                    j = seg.state.find(b"\x01") if seg.in_flight else -1
                    k = min(x for x in (i, j) if x >= 0)
                    return int(seg.times[k])
        return None

    def oldest_age_s(self, now_s: float | None = None) -> float:
        t = self.oldest_time_ms()
        if t is None:
            return 0.0
        return max(0.0, (time.time() if now_s is None else now_s) - t / 1000)

    def durable_sizes(self) -> dict[str, int]:
        """Segment path → bytes covered by the last fsync. A test hook to simulate power loss."""
        with self._lock:
            return {s.path: s.synced_size for s in self._segments}

    # --- writing ---------------------------------------------------------------------------------

    def append(
        self, payload: bytes, items: int = 1, headers: Mapping[str, str] | None = None
    ) -> AppendResult:
        """Write one record to the page cache (no fsync: call :meth:`sync` off the event loop).

        Raises QueueFull (policy ``block``), DiskFull (filesystem full: nothing was left behind) or
        RecordTooLarge. With ``drop_oldest`` the oldest records are removed to make room and
        reported in the result.

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
                seg, dropped_records, dropped_items = self._make_room(size)
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

    def _make_room(self, size: int) -> tuple[_Segment, int, int]:
        """The slow part of :meth:`append`: refuse, drop the oldest, and/or roll to a new segment."""
        self._check_writable()
        opts = self.options
        active = self._active
        roll = active is None or (active.count > 0 and active.size + size > self._segment_target)
        need = size + (SEGMENT_HEADER_SIZE if roll else 0)
        dropped_records = dropped_items = 0
        if self.used_bytes + need > opts.max_bytes:
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

    def _write(self, seg: _Segment, bufs: tuple[bytes, ...], total: int) -> None:
        """Append ``bufs`` (``total`` bytes) to ``seg``; on failure cut the file back and raise."""
        fd = seg.fd
        assert fd is not None
        start = seg.size
        try:
            # The common case inline (one writev that takes everything); _write_all for the rest.
            done = os.writev(fd, bufs) if len(bufs) <= _IOV_MAX else 0
            if done != total:
                _write_all(fd, bufs, total, done)
        except OSError as exc:
            self._undo_write(seg, start)
            raise self._write_error(exc) from exc
        seg.size = start + total
        self._disk_bytes += total

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

    # --- acking ----------------------------------------------------------------------------------

    def _locate(self, seq: int) -> tuple[_Segment, int] | None:
        if self._firsts_dirty:
            self._firsts_segs = [s for s in self._segments if s.count]
            self._firsts = [s.seqs[0] for s in self._firsts_segs]
            self._firsts_dirty = False
        k = bisect.bisect_right(self._firsts, seq) - 1
        if k < 0:
            return None
        seg = self._firsts_segs[k]
        i = bisect.bisect_left(seg.seqs, seq)
        if i < seg.count and seg.seqs[i] == seq:
            return seg, i
        return None

    def _mark_done(self, seg: _Segment, i: int) -> None:
        st = seg.state[i]
        if st == _DONE:
            return
        if st == _PENDING:
            seg.pending -= 1
            self._pending -= 1
        else:
            seg.in_flight -= 1
        seg.state[i] = _DONE
        seg.done += 1
        self._records -= 1
        if seg.all_done and seg.sealed:
            self._reclaimable += seg.size

    def ack(self, seq: int) -> bool:
        """The backend accepted record ``seq``: it is never handed out again. False if unknown or gone."""
        with self._lock:
            found = self._locate(seq)
            if found is None or found[0].state[found[1]] == _DONE:
                return False
            self._mark_done(*found)
            self._ledger_dirty = True
            return True

    def release(self, seq: int) -> bool:
        """Put an in-flight record back, to be handed out again (a send that will be retried later)."""
        with self._lock:
            found = self._locate(seq)
            if found is None or found[0].state[found[1]] != _IN_FLIGHT:
                return False
            seg, i = found
            seg.state[i] = _PENDING
            seg.in_flight -= 1
            seg.pending += 1
            self._pending += 1
            return True

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
