"""Remote-write's cumulative series state, kept durable together with the disk queue.

Prometheus counters must never go down, and StatsD sends deltas: the exporter's running totals are
state that a restart must not lose, kill -9 and power loss included. Beside the exporter's queue
partition live:

- ``<partition>.series``: a snapshot of every series (atomic: temp, fsync, rename, fsync dir) with a
  generation number;
- ``<partition>.journal.<generation>``: framed records (CRC32C, msgpack) appended per batch, holding
  the rows of the series that batch changed.

Ordering: a batch's journal frame is written before its requests are appended to the queue, and one
commit fsyncs both. So whatever a crash leaves, the state restored is at least as new as every request
in the queue: counters continue where they were (never a decrease, never a reset). A batch whose
requests were lost in the crash (appended but not yet synced) still counts in the restored totals, so
its increase shows up with the next sample instead of vanishing.

Load: the snapshot, then every journal of its generation or later, in order; a row replaces what is
known of a series only if it is newer (``ts_ms``). A torn or damaged frame ends its journal (counted).
Compaction, when the journal passes ``compact_bytes``: new frames go to the next generation's journal
at once; a snapshot is built in slices (yielding to the loop) and saved; then older journals are
deleted. A crash anywhere in between loads the old snapshot and both journals.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import threading
from typing import Any

from agent.diskqueue import StateFile, UnsupportedFormat
from agent.diskqueue.format import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    Corrupt,
    FormatError,
    decode_frame,
    encode_frame,
    fsync_dir,
)
from agent.slicing import CHECK_EVERY, Slicer
from exporters.prometheus_series import Series, SeriesStore

log = logging.getLogger("headwater.exporter.prometheus_remote_write")

JOURNAL_MAGIC = b"HQSJ"
JOURNAL_VERSION = 1


class SeriesState:
    """The snapshot and journals of one exporter. ``load``/``compact_files``/``sync`` block (thread);
    ``record`` runs on the loop (one write of one frame). ``sync`` may run in several threads at once
    (the queue partitions call it before each of their syncs: the journal is durable first)."""

    def __init__(self, base_path: str, *, durable: bool = True, compact_bytes: int = 64 << 20) -> None:
        self.base = base_path
        self.snapshot_file = StateFile(base_path + ".series", durable=durable)
        self.durable = durable
        self.compact_bytes = compact_bytes
        self.generation = 0
        self.journal_bytes = 0
        self.torn_frames = 0
        self._fd: int | None = None
        self._compacting = False
        self._sync_lock = threading.Lock()
        self._retired: collections.deque[int] = collections.deque()
        """fds of journals a compaction replaced: fsynced, then closed, by :meth:`sync` only."""
        self._written = 0  # frames written (on the loop)
        self._synced = 0  # frames known durable (under _sync_lock)
        self._dir_unsynced = False

    def _journal(self, generation: int) -> str:
        return f"{self.base}.journal.{generation}"

    def _journals(self) -> list[tuple[int, str]]:
        directory, prefix = os.path.split(self.base + ".journal.")
        found = []
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(directory or "."):
                m = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
                if m:
                    found.append((int(m.group(1)), os.path.join(directory, name)))
        return sorted(found)

    # -- blocking: call from a worker thread ----------------------------------------------------------
    def load(self, store: SeriesStore) -> int:
        """Restore ``store``; returns the series restored. Opens the journal for appending."""
        state = self.snapshot_file.load()
        generation = state.get("generation", 0)
        generation = generation if isinstance(generation, int) else 0
        restored = store.restore(state)
        for gen, path in self._journals():
            if gen < generation:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)  # folded into the snapshot already
                continue
            restored += self._apply(store, path)
            generation = max(generation, gen)
        self.generation = generation
        path = self._journal(generation)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._dir_unsynced = True  # the journal may be new: its directory entry must be durable too
        self.journal_bytes = os.fstat(self._fd).st_size
        return restored

    def _apply(self, store: SeriesStore, path: str) -> int:
        with open(path, "rb") as f:
            data = f.read()
        restored = off = 0
        while off < len(data):
            if off + FRAME_HEADER_SIZE > len(data):
                self._torn(path, off, "a torn frame header")
                break
            body_len = FRAME_HEADER.unpack_from(data, off)[3]
            frame = data[off : off + FRAME_HEADER_SIZE + body_len]
            try:
                obj = decode_frame(frame, JOURNAL_MAGIC, JOURNAL_VERSION, path)
            except FormatError as exc:
                raise UnsupportedFormat(str(exc)) from None
            except Corrupt as exc:
                self._torn(path, off, str(exc))
                break
            for name, kind, rows in obj if isinstance(obj, list) else ():
                restored += store.restore_rows(name, kind, rows)
            off += len(frame)
        return restored

    def _torn(self, path: str, off: int, why: str) -> None:
        self.torn_frames += 1
        log.warning("%s: state journal ends in damage at byte %d (%s); the rest is ignored", path, off, why)
        # Cut it off, so frames appended from now on are not hidden behind the damage.
        with open(path, "r+b") as f:
            f.truncate(off)

    def sync(self) -> None:
        """Make every frame recorded before the call durable, in whichever journal it went to."""
        with self._sync_lock:
            # Read in this order: every frame counted in ``target`` is in ``fd`` or in a journal
            # retired before ``fd`` was read (a compaction retires the old fd before switching).
            target = self._written
            fd = self._fd
            if self.durable:
                if fd is not None and target > self._synced:
                    os.fdatasync(fd)
                if self._dir_unsynced:
                    self._dir_unsynced = False
                    try:
                        fsync_dir(os.path.dirname(os.path.abspath(self.base)))
                    except BaseException:
                        self._dir_unsynced = True
                        raise
            while self._retired:
                old = self._retired[0]
                if self.durable:
                    os.fdatasync(old)
                self._retired.popleft()
                os.close(old)
            self._synced = max(self._synced, target)

    def close(self) -> None:
        with self._sync_lock:
            while self._retired:
                os.close(self._retired.popleft())
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- on the loop ---------------------------------------------------------------------------------
    def record(self, changed: dict[str, tuple[str, list[Series]]]) -> None:
        """Append one frame with the rows of ``changed`` (family name → (kind, series))."""
        if self._fd is None or not changed:
            return
        frame = encode_frame(
            JOURNAL_MAGIC,
            JOURNAL_VERSION,
            [[name, kind, [SeriesStore.row(s) for s in series]] for name, (kind, series) in changed.items()],
        )
        os.write(self._fd, frame)
        self.journal_bytes += len(frame)
        self._written += 1

    async def maybe_compact(self, store: SeriesStore, *, force: bool = False) -> None:
        """Fold the journals into a new snapshot when they have grown past ``compact_bytes``."""
        if self._fd is None or self._compacting or not (force or self.journal_bytes >= self.compact_bytes):
            return
        self._compacting = True
        try:
            old_fd, new_gen = self._fd, self.generation + 1
            path = self._journal(new_gen)
            new_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            # The old journal may hold frames of batches whose sync has not run yet: it is fsynced
            # (then closed) by the next sync, never closed unsynced. Retired before the switch.
            self._retired.append(old_fd)
            self._dir_unsynced = True
            self._fd = new_fd
            self.generation, self.journal_bytes = new_gen, 0
            await asyncio.to_thread(self.sync)
            families: list[Any] = []
            done = 0
            slicer = Slicer()  # the rows are built on the loop, in slices that yield to it
            for name, family in list(store.families.items()):
                rows = []
                for s in list(family.values()):
                    rows.append(SeriesStore.row(s))
                    done += 1
                    if done % CHECK_EVERY == 0:
                        await slicer.tick()
                families.append([name, store.kinds.get(name, ""), rows])
            snapshot = {"version": 1, "generation": new_gen, "families": families}
            await asyncio.to_thread(self._save_and_prune, snapshot, new_gen)
        finally:
            self._compacting = False

    def _save_and_prune(self, snapshot: dict[str, Any], generation: int) -> None:
        self.snapshot_file.save(snapshot)
        for gen, path in self._journals():
            if gen < generation:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
