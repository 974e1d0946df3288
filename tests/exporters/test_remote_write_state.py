"""Remote-write's cumulative state beside the disk queue: snapshot + journal, torn tails, compaction."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from agent import exphist
from agent.model import Kind, Point
from exporters.prometheus_remote_write.state import SeriesState
from exporters.prometheus_series import SeriesStore


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
