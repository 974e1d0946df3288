"""Remote-write's cumulative state beside the disk queue: snapshot + journal, torn tails, compaction."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from agent import exphist
from agent.model import Kind, Point
from exporters.prometheus_remote_write.state import SeriesState
from exporters.prometheus_series import SeriesStore
from tests.conftest import component_settings, wait_until


def counter(store: SeriesStore, value: float, t: int, **labels: str) -> None:
    series = store.update(Point("hits", Kind.SUM, tuple(sorted(labels.items())), t * 10**9, value=value))
    assert series is not None
    series.ts_ms = t * 1000  # as the exporter's next_timestamp_ms does when it sends


def changed(store: SeriesStore) -> dict[str, tuple[str, list[object]]]:
    return {name: (store.kinds[name], list(family.values())) for name, family in store.families.items()}


def values(store: SeriesStore) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: s.value for family in store.families.values() for labels, s in family.items()}


async def test_journal_restores_after_a_crash_and_compaction_folds_it(tmp_path: Path) -> None:
    base = str(tmp_path / "rw")
    state = SeriesState(base, compact_bytes=1 << 30)
    store = SeriesStore()
    assert state.load(store) == 0
    counter(store, 5, 1, env="a")
    counter(store, 1, 1, env="b")
    state.record(changed(store))  # type: ignore[arg-type]
    counter(store, 2, 2, env="a")
    state.record({"hits_total": ("counter", [store.families["hits_total"][(("env", "a"),)]])})
    state.sync()
    # kill -9 here: no snapshot was ever written; the journal alone restores the totals.
    again = SeriesStore()
    assert SeriesState(base).load(again) == 2
    assert values(again) == {(("env", "a"),): 7.0, (("env", "b"),): 1.0}
    state.close()

    third = SeriesState(base, compact_bytes=1)
    restored = SeriesStore()
    third.load(restored)
    await third.maybe_compact(restored, force=True)
    journals = sorted(p.name for p in tmp_path.iterdir() if ".journal." in p.name)
    assert journals == [f"rw.journal.{third.generation}"]  # older generations pruned
    assert os.path.getsize(tmp_path / journals[0]) == 0
    third.close()
    fourth = SeriesStore()
    SeriesState(base).load(fourth)
    assert values(fourth) == {(("env", "a"),): 7.0, (("env", "b"),): 1.0}


def test_torn_journal_tail_keeps_every_whole_frame(tmp_path: Path) -> None:
    base = str(tmp_path / "rw")
    state = SeriesState(base)
    store = SeriesStore()
    state.load(store)
    sizes = []
    for t in range(1, 4):
        counter(store, 1, t, env="a")
        state.record(changed(store))  # type: ignore[arg-type]
        sizes.append(os.path.getsize(base + ".journal.0"))
    state.close()
    whole = Path(base + ".journal.0").read_bytes()
    for cut in range(sizes[1] + 1, sizes[2]):  # every byte offset inside the third frame
        Path(base + ".journal.0").write_bytes(whole[:cut])
        loaded = SeriesState(base)
        again = SeriesStore()
        loaded.load(again)
        assert values(again) == {(("env", "a"),): 2.0}
        assert loaded.torn_frames == 1
        assert os.path.getsize(base + ".journal.0") == sizes[1]  # cut back: appends continue cleanly
        loaded.close()


def test_an_older_row_never_replaces_a_newer_one(tmp_path: Path) -> None:
    store = SeriesStore()
    counter(store, 9, 5, env="a")
    newer = store.snapshot()
    older = SeriesStore()
    counter(older, 4, 2, env="a")
    target = SeriesStore()
    target.restore(newer)
    target.restore(older.snapshot())
    assert values(target) == {(("env", "a"),): 9.0}


def test_histograms_survive_in_the_snapshot(tmp_path: Path) -> None:
    store = SeriesStore()
    h = exphist.from_values(np.array([0.1, 0.2, 3.0]))
    store.update(Point("lat", Kind.HISTOGRAM, (), 10**9, histogram=h, unit="s"))
    again = SeriesStore()
    assert again.restore(store.snapshot()) == 1
    (series,) = again.families["lat_seconds"].values()
    assert series.count == 3 and series.sum == pytest.approx(3.3)
    assert series.bucket_counts is not None and series.bucket_counts[-1] == 3


# --- ordering: the journal is durable before the queue -----------------------------------------------


def _track_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record, in order, the path of every fdatasync/fsync the process makes."""
    seen: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def where(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def fdatasync(fd: int) -> None:
        seen.append(where(fd))
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        seen.append(where(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    return seen


async def test_a_compaction_does_not_skip_the_fsync_of_the_previous_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = str(tmp_path / "rw")
    state = SeriesState(base, compact_bytes=1 << 30)
    store = SeriesStore()
    state.load(store)
    state.sync()
    counter(store, 5, 1, env="a")
    state.record(changed(store))  # type: ignore[arg-type]  # a batch's frame, in journal 0
    seen = _track_syncs(monkeypatch)
    # Another batch's commit starts a compaction before this batch's own state.sync runs: new frames
    # go to journal 1 at once.
    task = asyncio.create_task(state.maybe_compact(store, force=True))
    await asyncio.sleep(0)  # one turn of the loop, not a timed wait: the compaction runs to its first await
    assert state.generation == 1
    state.sync()  # this batch's sync: its frame (journal 0) must be durable when it returns
    assert base + ".journal.0" in seen
    assert str(tmp_path) in seen  # and journal 1's directory entry, before frames there count
    await task
    state.close()


async def test_the_background_queue_sync_makes_the_journal_durable_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.component import ComponentKind
    from agent.model import Kind as K
    from agent.model import MetricBatch
    from agent.sending import QueueConfig
    from agent.telemetry import Telemetry
    from exporters.prometheus_remote_write import PrometheusRemoteWriteConfig, PrometheusRemoteWriteExporter

    settings = component_settings(
        Telemetry(),
        ComponentKind.EXPORTER,
        "prometheus_remote_write",
        logger="test.rw.order",
        shutdown_timeout_s=0.01,
    )
    config = PrometheusRemoteWriteConfig(
        endpoint="http://127.0.0.1:9/api/v1/write",  # nothing listens: requests stay queued
        sending_queue=QueueConfig(storage="disk", directory=str(tmp_path), fsync="batch"),
    )
    exporter = PrometheusRemoteWriteExporter(settings, config)
    await exporter.start()
    try:
        state = exporter._state
        part = exporter._sender._part
        assert state is not None and part is not None
        seen = _track_syncs(monkeypatch)
        # The background syncer may run between a batch's offer and its state.sync: model that by
        # making the exporter's own state.sync a no-op and syncing the queue as the syncer does.
        monkeypatch.setattr(asyncio, "to_thread", _skip_state_sync(asyncio.to_thread))
        batch = MetricBatch((Point("hits", K.SUM, (), 10**18, value=1.0),))
        await exporter.consume(batch)
        journal = [i for i, p in enumerate(seen) if ".journal." in p]
        segments = [i for i, p in enumerate(seen) if p.endswith(".seg")]
        assert segments, seen
        assert journal and journal[0] < segments[0], seen  # the frame before the request it covers
    finally:
        monkeypatch.undo()
        await exporter.shutdown()


def _skip_state_sync(real):  # type: ignore[no-untyped-def]
    async def to_thread(fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(fn, "__name__", "") == "sync" and isinstance(getattr(fn, "__self__", None), SeriesState):
            return None
        return await real(fn, *args, **kwargs)

    return to_thread


# --- series expiry -----------------------------------------------------------------------------------


async def test_a_failed_commit_does_not_end_series_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from agent.component import ComponentKind
    from agent.model import Kind as K
    from agent.model import MetricBatch
    from agent.sending import QueueConfig, Sender
    from agent.telemetry import Telemetry
    from exporters.prometheus_remote_write import PrometheusRemoteWriteConfig, PrometheusRemoteWriteExporter

    tel = Telemetry()
    settings = component_settings(
        tel,
        ComponentKind.EXPORTER,
        "prometheus_remote_write",
        logger="test.rw.expire",
        shutdown_timeout_s=0.01,
    )
    config = PrometheusRemoteWriteConfig(
        endpoint="http://127.0.0.1:9/api/v1/write",
        series_expiration=0.05,  # type: ignore[arg-type]
        sending_queue=QueueConfig(storage="disk", directory=str(tmp_path)),
    )
    exporter = PrometheusRemoteWriteExporter(settings, config)
    await exporter.start()
    real_commit = Sender.commit
    failures = {"n": 1}

    async def flaky_commit(self: Sender) -> None:
        if (
            failures["n"]
            and asyncio.current_task() is not None
            and "expire" in asyncio.current_task().get_name()
        ):  # type: ignore[union-attr]
            failures["n"] -= 1
            raise OSError(errno.EIO, "I/O error")
        await real_commit(self)

    monkeypatch.setattr(Sender, "commit", flaky_commit)

    def expired(n: int) -> bool:
        return tel.value("exporter_stale_markers_total") >= n

    try:
        await exporter.consume(MetricBatch((Point("a", K.GAUGE, (), 10**18, value=1.0),)))
        await wait_until(lambda: expired(1), "the first stale marker", timeout_s=5)  # its commit failed
        await exporter.consume(MetricBatch((Point("b", K.GAUGE, (), 10**18, value=1.0),)))
        await wait_until(lambda: expired(2), "the second stale marker", timeout_s=5)  # expiry goes on
    finally:
        await exporter.shutdown()
