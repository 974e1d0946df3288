"""The state of a partition that its writing, reading, recovery and durability parts share: the fields
(set in one place), the gauges, and the transitions to done (ack, release, drop, damage)."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

from agent.diskqueue.ledger import _Ledger
from agent.diskqueue.results import PartitionOptions, PartitionStats, RecoveryReport
from agent.diskqueue.segments import _DONE, _IN_FLIGHT, _PENDING, _Segment


class PartitionState:
    """The fields of a :class:`agent.diskqueue.Partition` and what every part of it uses; see there."""

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
