"""Regression tests for durability bugs found in review: failed opens, fd leaks, sync failures."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from pathlib import Path

import pytest

from agent.diskqueue import DiskQueue, DiskQueueConfig, Partition, PartitionOptions, UnsupportedFormat
from agent.diskqueue import partition as partition_mod
from agent.diskqueue.format import crc32c, encode_frame
from agent.diskqueue.partition import LEDGER_MAGIC
from tests.conftest import wait_until

SMALL = PartitionOptions(max_bytes=64 * 1024, segment_bytes=8192)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_refusing_a_newer_ledger_leaves_it_untouched(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path)) as p:
        p.append(b"a")
    newer = encode_frame(LEDGER_MAGIC, 2, {"anything": 1})
    (tmp_path / "ledger").write_bytes(newer)
    with pytest.raises(UnsupportedFormat):
        Partition.open(str(tmp_path))
    # The newer agent's ledger must survive an older agent's refusal to read it.
    assert (tmp_path / "ledger").read_bytes() == newer


def test_refusing_a_newer_segment_keeps_the_ledger(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path), SMALL) as p:
        for _ in range(40):
            p.append(b"x" * 500)
        for _ in range(20):
            r = p.next()
            assert r is not None
            p.ack(r.seq)
        p.sync(ledger=True)
    before = (tmp_path / "ledger").read_bytes()
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    data = bytearray(seg.read_bytes())
    data[4:6] = struct.pack("<H", 7)
    data[16:20] = struct.pack("<I", crc32c(bytes(data[:16])))
    seg.write_bytes(bytes(data))
    segments = sorted(p.name for p in tmp_path.glob("*.seg"))
    with pytest.raises(UnsupportedFormat):
        Partition.open(str(tmp_path), SMALL)
    assert (tmp_path / "ledger").read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("*.seg")) == segments


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


def test_a_failed_ledger_write_keeps_the_acks_dirty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Partition.open(str(tmp_path), SMALL) as p:
        p.append(b"a")
        p.append(b"b")
        p.sync(ledger=True)
        r = p.next()
        assert r is not None
        p.ack(r.seq)

        def no_space(*a: object, **kw: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(partition_mod, "write_atomic", no_space)
        with pytest.raises(OSError):
            p.sync(ledger=True)
        monkeypatch.undo()
        assert p.needs_sync()  # the ack still waits for a ledger write: the syncer must retry it
        p.sync(ledger=True)
        assert not p.needs_sync()
    with Partition.open(str(tmp_path), SMALL) as again:
        assert [r.payload for r in again.iter_unacked()] == [b"b"]


def test_a_failed_fdatasync_keeps_the_directory_dirty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Partition.open(str(tmp_path), SMALL) as p:
        p.append(b"a")  # a new segment: its directory entry needs an fsync
        calls = {"dir": 0}
        real_fsync_dir = partition_mod.fsync_dir

        def counting_fsync_dir(path: str) -> None:
            calls["dir"] += 1
            real_fsync_dir(path)

        def eio(fd: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(partition_mod, "fsync_dir", counting_fsync_dir)
        monkeypatch.setattr(partition_mod.os, "fdatasync", eio)
        with pytest.raises(OSError):
            p.sync()
        monkeypatch.undo()
        monkeypatch.setattr(partition_mod, "fsync_dir", counting_fsync_dir)
        p.sync()
        assert calls["dir"] == 1  # the new segment's directory entry was made durable after all


async def test_the_syncer_survives_a_failed_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q = DiskQueue(DiskQueueConfig(directory=str(tmp_path), fsync="interval", fsync_interval=0.01), "x")
    part = q.partition()
    fails = {"n": 2}
    real_sync = Partition.sync

    def flaky_sync(self: Partition, *, ledger: bool = False) -> None:
        if fails["n"]:
            fails["n"] -= 1
            raise OSError(errno.EIO, "I/O error")
        real_sync(self, ledger=ledger)

    monkeypatch.setattr(Partition, "sync", flaky_sync)
    stop = asyncio.Event()
    task = asyncio.create_task(q.run_syncer(stop))
    part.append(b"a")
    await wait_until(lambda: not part.needs_sync() or task.done(), "the syncer to sync (or die)")
    assert not task.done(), task.exception()
    assert not part.needs_sync()  # synced once the disk came back
    stop.set()
    await task
    q.close()
