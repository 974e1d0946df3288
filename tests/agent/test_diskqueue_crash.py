"""Crash safety of the disk queue: real kill -9 of a writer, and a model-based power-loss property test."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.diskqueue import Partition, PartitionOptions

ROOT = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent(
    """
    import sys
    from agent.diskqueue import Partition, PartitionOptions
    d, start = sys.argv[1], int(sys.argv[2])
    p = Partition.open(d, PartitionOptions(max_bytes=1 << 26, segment_bytes=64 * 1024))
    i = start
    while True:
        p.append(b"id-%d" % i)
        if i % 3 == 0:
            r = p.next()
            if r is not None:
                print("T", r.payload.decode(), flush=True)  # about to ack: may vanish without an "A"
                p.ack(r.seq)
                p.sync(ledger=True)  # the ack is durable once this returns
                print("A", r.payload.decode(), flush=True)
        p.sync()
        print("S", "id-%d" % i, flush=True)
        i += 1
    """
)


def test_kill_9_keeps_every_synced_record_and_drops_every_durable_ack(tmp_path: Path) -> None:
    rng = random.Random(7)
    d = str(tmp_path / "q")
    synced: set[str] = set()
    acked: set[str] = set()
    taken: set[str] = set()
    start = 0
    for _round in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, d, str(start)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        # Let the writer work for a random number of lines (it runs ahead of this reader), then kill it.
        lines = [proc.stdout.readline() for _ in range(rng.randint(1, 400))]
        assert lines[0], "writer died before writing"
        proc.send_signal(signal.SIGKILL)
        # The rest of the transcript comes through the same buffered stream: communicate(timeout=...)
        # reads the raw pipe and misses what readline() had already buffered, and a lost "T"/"A" line
        # made a durably acked record look lost.
        lines.append(proc.stdout.read())
        proc.stdout.close()
        proc.wait(timeout=30)
        transcript = "".join(lines).splitlines(keepends=True)
        if transcript and not transcript[-1].endswith("\n"):
            transcript.pop()  # killed in the middle of printing it: the writer never finished that step
        s_ids = [int(line.split("-")[1]) for line in transcript if line.startswith("S ")]
        assert s_ids == list(range(start, start + len(s_ids))), "the writer's transcript has gaps"
        for line in transcript:
            kind, _, rid = line.strip().partition(" ")
            if not rid:
                continue
            if kind == "S":
                synced.add(rid)
            elif kind == "A":
                acked.add(rid)
            elif kind == "T":
                taken.add(rid)
        with Partition.open(d) as p:
            present = [r.payload.decode() for r in p.iter_unacked()]
            assert len(present) == len(set(present))
            # Everything synced and not durably acked is there; nothing durably acked came back
            # (acks are printed only after the ledger that records them is durable: bound 0).
            assert synced - acked - taken <= set(present)
            assert not set(present) & acked
            ids = [int(x.split("-")[1]) for x in present]
            assert ids == sorted(ids)  # FIFO survives crashes
            start = max([start, *ids]) + 1 if ids else start + 1000
        start = max(start, *(int(x.split("-")[1]) + 1 for x in synced | acked)) if synced else start
    assert len(synced) > 20 and acked


class PowerLoss(RuleBasedStateMachine):
    """Random append/sync/next/ack/release/crash sequences against a reference model.

    A crash drops what was never fsynced: every segment is cut to the size covered by its last
    fdatasync (the engine tracks it: ``durable_sizes``). Then: every record appended before the last
    sync and not durably acked must be back, in order, intact; a record acked before a forced ledger
    write must not come back; acks after it may (that is the stated duplicate bound).
    """

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    @initialize(tmp=st.just(None))
    def setup(self, tmp: None) -> None:
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="dq-model-")
        self.opts = PartitionOptions(max_bytes=1 << 20, segment_bytes=4096, fsync_interval_s=3600)
        self.p = Partition.open(self.dir, self.opts)
        self.unacked: dict[int, bytes] = {}  # seq → payload, the reference queue
        self.synced: set[int] = set()
        self.in_flight: set[int] = set()
        self.acked_volatile: dict[int, bytes] = {}
        self.acked_durable: set[bytes] = set()
        self.counter = 0

    def teardown(self) -> None:
        if hasattr(self, "p"):
            self.p.close(sync=False)
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(size=st.integers(0, 1500))
    def append(self, size: int) -> None:
        self.counter += 1
        payload = b"%08d" % self.counter + b"x" * size
        res = self.p.append(payload)
        self.unacked[res.seq] = payload

    @rule(sizes=st.lists(st.integers(0, 1500), max_size=6))
    def append_many(self, sizes: list[int]) -> None:
        # Up to ~9 KB in one call: batches that roll over the 4 KiB segments are common.
        payloads = []
        for size in sizes:
            self.counter += 1
            payloads.append(b"%08d" % self.counter + b"x" * size)
        res = self.p.append_many([(payload, 1, None) for payload in payloads])
        assert res.count == len(payloads)
        self.unacked.update(zip(res.seqs, payloads, strict=True))

    @rule(force=st.booleans())
    def sync(self, force: bool) -> None:
        self.p.sync(ledger=force)
        self.synced |= set(self.unacked)
        if force:
            self.acked_durable |= set(self.acked_volatile.values())
            self.acked_volatile.clear()

    @rule(oldest=st.booleans())
    def next(self, oldest: bool) -> None:
        waiting = sorted(set(self.unacked) - self.in_flight)
        r = self.p.next(oldest)
        if not waiting:
            assert r is None
            return
        assert r is not None
        want = waiting[0] if oldest else waiting[-1]
        assert (r.seq, r.payload) == (want, self.unacked[want])
        self.in_flight.add(r.seq)

    @precondition(lambda self: bool(getattr(self, "in_flight", None)))
    @rule(data=st.data(), ack=st.booleans())
    def finish(self, data: st.DataObject, ack: bool) -> None:
        seq = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.in_flight.discard(seq)
        if ack:
            assert self.p.ack(seq)
            self.acked_volatile[seq] = self.unacked.pop(seq)
        else:
            assert self.p.release(seq)

    @rule()
    def crash_and_reopen(self) -> None:
        sizes = self.p.durable_sizes()
        self.p.close(sync=False)
        for path, size in sizes.items():
            if os.path.exists(path):
                os.truncate(path, size)
        self.p = Partition.open(self.dir, self.opts)
        present = {r.seq: r.payload for r in self.p.iter_unacked()}
        assert list(present) == sorted(present)
        must = {self.unacked[s] for s in self.synced if s in self.unacked}
        assert must <= set(present.values())
        assert not set(present.values()) & self.acked_durable
        allowed = set(self.unacked.values()) | set(self.acked_volatile.values())
        assert set(present.values()) <= allowed
        self.unacked = present
        self.synced = set(present)
        self.in_flight.clear()
        self.acked_volatile.clear()

    @invariant()
    def counts_match(self) -> None:
        if hasattr(self, "p"):
            assert self.p.records == len(self.unacked)
            assert self.p.pending == len(self.unacked) - len(self.in_flight)


TestPowerLoss = PowerLoss.TestCase
TestPowerLoss.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
