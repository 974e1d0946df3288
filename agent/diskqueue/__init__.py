"""A crash-safe disk queue: append-only checksummed segments, an atomic ledger, at-least-once delivery.

Layout of ``DiskQueueConfig.directory``: one subdirectory per partition (exporter, or exporter@tenant),
each holding ``LOCK`` (flock'ed, with the owner's pid), ``ledger`` and ``<id>.seg`` segment files. The
byte layout is in :mod:`agent.diskqueue.format`; the engine and its threading rules in
:mod:`agent.diskqueue.partition`.
"""

from agent.diskqueue.format import FORMAT_VERSION
from agent.diskqueue.partition import (
    AppendManyResult,
    AppendResult,
    DiskFull,
    Partition,
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
from agent.diskqueue.queue import (
    DiskQueue,
    DiskQueueConfig,
    partition_name,
    queue_directory_problems,
    register_metrics,
)
from agent.diskqueue.statefile import StateFile

__all__ = [
    "FORMAT_VERSION",
    "AppendManyResult",
    "AppendResult",
    "DiskFull",
    "DiskQueue",
    "DiskQueueConfig",
    "Partition",
    "PartitionOptions",
    "PartitionStats",
    "QueueError",
    "QueueFull",
    "QueueLocked",
    "Record",
    "RecordTooLarge",
    "RecoveryReport",
    "StateFile",
    "UnsupportedFormat",
    "partition_name",
    "queue_directory_problems",
    "register_metrics",
]
