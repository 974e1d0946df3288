"""The in-memory index of a segment file, and writing whole buffers to one.

A record's state in the index is one byte: pending (waiting to be handed out), in flight, or done (acked,
dropped or lost); runs of not-done records are found at C speed with a regex over the state bytes.
"""

from __future__ import annotations

import array
import bisect
import os
import re
from collections.abc import Sequence

from agent.diskqueue.format import RecordHeader
from agent.diskqueue.ledger import _Ledger

_PENDING, _IN_FLIGHT, _DONE = 0, 1, 2
_LIVE_RUN = re.compile(b"[\x00\x01]+")
_U32_MAX = (1 << 32) - 1
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
