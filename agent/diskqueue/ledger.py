"""A partition's ledger (the acked set, replaced atomically by :meth:`Partition.sync`) and its lock file
(flock'ed, holding the owner's pid)."""

from __future__ import annotations

import bisect
import fcntl
import os
import time
from typing import Any

from agent.diskqueue.format import Corrupt, decode_frame, encode_frame
from agent.diskqueue.results import QueueLocked

LEDGER_MAGIC = b"HQLG"
LEDGER_VERSION = 1
LEDGER = "ledger"
LOCK = "LOCK"
MAX_LEDGER_RANGES = 1024
"""Acked ranges above the contiguous floor kept in the ledger; acks in ranges past this many may be
re-delivered after a restart (only with many interleaved out-of-order acks)."""


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
