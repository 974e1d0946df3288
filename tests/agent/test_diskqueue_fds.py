"""A disk queue holds a file descriptor for the segment it writes, not for every segment it sealed."""

from __future__ import annotations

import os
from pathlib import Path

from agent.diskqueue import Partition, PartitionOptions


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_sealed_segments_do_not_keep_their_writer_fd(tmp_path: Path) -> None:
    # fsync: batch syncs after every batch, so a segment is usually fully synced when it is sealed.
    with Partition.open(str(tmp_path), PartitionOptions(max_bytes=64 << 20, segment_bytes=4096)) as p:
        p.append(b"x" * 100)
        p.sync()
        base = open_fds()
        for _ in range(200):
            p.append(b"x" * 3000)  # every append rolls to a new segment
            p.sync()
        assert len(list(tmp_path.glob("*.seg"))) > 150
        assert open_fds() - base < 10
