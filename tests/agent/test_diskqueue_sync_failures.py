"""A failed sync loses no durability: a ledger write or an fdatasync that fails leaves what it was to make
durable marked dirty, so the next sync does it, and the background syncer survives the failure."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from agent.diskqueue import DiskQueue, DiskQueueConfig, Partition, PartitionOptions
from agent.diskqueue import partition as partition_mod
from tests.conftest import wait_until

SMALL = PartitionOptions(max_bytes=64 * 1024, segment_bytes=8192)


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
