"""What a partition takes and gives back: its options, records, append results, the recovery report, the
counters, and its errors (all re-exported by :mod:`agent.diskqueue`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class QueueError(Exception):
    """Base of the disk queue's errors."""


class QueueFull(QueueError):
    """``append`` refused: the partition is at ``max_bytes`` (policy ``block``, the record not part of
    an admitted batch) or the disk is full.

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
