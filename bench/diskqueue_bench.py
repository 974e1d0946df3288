"""Disk queue benchmark: append and replay throughput, and the records lost on kill -9 per fsync policy.

    python bench/diskqueue_bench.py [--quick]

MB/s counts record bytes on disk (36-byte header + msgpack body + segment headers): a "1 KB" record is
a 1,000-byte payload and 1,041 bytes on disk, a "64 KB" record 65,536 + 43. Records have no headers
(the Sender's records carry one or two; that costs a small msgpack map per record). Volumes: 256 MB
per append figure (32 MB with --quick) in a fresh directory under the system temp dir.

1. Append, fsync (fdatasync) at most every 1 MiB or 100 ms, whichever comes first:
   - ``append()``, one record per call (the Sender's path), the sync inline in the same thread: the
     worst case, every fdatasync stalls the appender;
   - ``append()`` with the sync in a worker thread (what ``Partition.sync_async`` does for the Sender:
     the appender asks for a sync once 1 MiB was appended since the last request, the worker also
     syncs every 100 ms), so appends go on while the disk flushes;
   - ``append_many()`` of 1 MiB batches, one sync after each batch.
   Every append reaches the page cache before it returns (one writev per record or per batch; no
   buffering in the process), so none of these widens the kill -9 window below.
2. Replay, page cache warm: ``iter_unacked()`` (chunked pread + header and body CRC32C + msgpack
   decode of every record) on an open partition; ``Partition.open`` (the recovery scan: read +
   CRC32C of every record) on its own; and both, which is what ``headwater queue replay`` does
   from cold. ``next()`` (one pread per record, the Sender's path) for comparison.
3. Loss on kill -9: a writer appends 1 KB records under load (batch: sync every 100 appends;
   interval: every 100 ms; never: no sync) and is SIGKILLed; records whose append returned but that
   are absent after reopening are lost. kill -9 does not drop the page cache, so all three should be 0;
   only a power loss (or kernel crash) loses unsynced bytes: at most one batch / one interval / everything
   since the kernel last wrote back. The power-loss window is what the fsync policy chooses.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.diskqueue import Partition, PartitionOptions  # noqa: E402

SYNC_BYTES = 1 << 20
SYNC_SECONDS = 0.1
OPTIONS = PartitionOptions(max_bytes=1 << 33, fsync="interval")

WRITER = """
import sys, time
from agent.diskqueue import Partition, PartitionOptions
policy = sys.argv[2]
p = Partition.open(sys.argv[1], PartitionOptions(max_bytes=1 << 30, fsync=policy))
payload = b"x" * 1000
last = time.monotonic()
i = 0
out = sys.stdout
while True:
    p.append(payload)
    out.write("%d\\n" % i)
    out.flush()
    i += 1
    if policy == "batch" and i % 100 == 0:
        p.sync()
    elif policy == "interval" and time.monotonic() - last >= 0.1:
        p.sync()
        last = time.monotonic()
"""


def append_inline(p: Partition, payload: bytes, n: int) -> None:
    unsynced = 0
    last = time.perf_counter()
    for _ in range(n):
        p.append(payload)
        unsynced += len(payload)
        if unsynced >= SYNC_BYTES or time.perf_counter() - last >= SYNC_SECONDS:
            p.sync()
            unsynced = 0
            last = time.perf_counter()
    p.sync()


def append_worker(p: Partition, payload: bytes, n: int) -> None:
    wanted = threading.Event()
    stop = threading.Event()

    def syncer() -> None:
        while not stop.is_set():
            wanted.wait(SYNC_SECONDS)
            wanted.clear()
            p.sync()

    worker = threading.Thread(target=syncer, name="sync")
    worker.start()
    try:
        unsynced = 0
        for _ in range(n):
            p.append(payload)
            unsynced += len(payload)
            if unsynced >= SYNC_BYTES:
                wanted.set()
                unsynced = 0
    finally:
        stop.set()
        wanted.set()
        worker.join()
    p.sync()  # the run ends when everything appended is durable


def append_batches(p: Partition, payload: bytes, n: int) -> None:
    per = max(1, SYNC_BYTES // len(payload))
    batch = [(payload, 1, None)] * per
    for done in range(0, n, per):
        p.append_many(batch[: min(per, n - done)])
        p.sync()


def append_throughput(d: str, record: int, total: int, how: str) -> tuple[float, float, int]:
    """(MB/s on disk, records/s, bytes on disk); the partition in ``d`` is left closed and synced."""
    p = Partition.open(d, OPTIONS)
    payload = os.urandom(record)
    n = max(1, total // record)
    run_ = {"inline": append_inline, "worker": append_worker, "batch": append_batches}[how]
    t0 = time.perf_counter()
    run_(p, payload, n)
    dt = time.perf_counter() - t0
    size = p.disk_bytes
    assert p.records == n
    p.close()
    return size / dt / 1e6, n / dt, size


def replay_throughput(d: str, size: int) -> tuple[float, float, float, float]:
    """MB/s of open (recovery scan), iter_unacked, both, and next()+ack, over the partition in ``d``."""
    t0 = time.perf_counter()
    p = Partition.open(d, OPTIONS)
    t1 = time.perf_counter()
    n = got = 0
    for r in p.iter_unacked():
        n += 1
        got += len(r.payload)
    t2 = time.perf_counter()
    assert n == p.records and got > 0
    # next()+ack: a bounded share of the records, since it is the slow per-record path.
    k = 0
    limit = max(1, n // 4)
    t3 = time.perf_counter()
    while k < limit and (r2 := p.next()) is not None:
        p.ack(r2.seq)
        k += 1
    t4 = time.perf_counter()
    p.close(sync=False)
    per_record = size / n
    return (
        size / (t1 - t0) / 1e6,
        size / (t2 - t1) / 1e6,
        size / (t2 - t0) / 1e6,
        k * per_record / (t4 - t3) / 1e6,
    )


def loss_on_kill(policy: str, seconds: float) -> tuple[int, int]:
    d = tempfile.mkdtemp(prefix="dq-kill-")
    try:
        log = os.path.join(d, "appended.log")  # a file, not a pipe: a full pipe would stall the writer
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", WRITER, d, policy], cwd=ROOT, stdout=f)
            time.sleep(seconds)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        with open(log) as f:
            lines = f.read().split()
        appended = int(lines[-1]) + 1 if lines else 0
        with Partition.open(d) as p:
            present = p.records
        return appended, max(0, appended - present)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _fresh(fn: object, *args: object) -> tuple[float, ...]:
    d = tempfile.mkdtemp(prefix="dq-bench-")
    try:
        return fn(d, *args)  # type: ignore[operator, no-any-return]
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _append_then_replay(d: str, record: int, total: int) -> tuple[float, ...]:
    mbps, rps, size = append_throughput(d, record, total, "inline")
    return (mbps, rps, *replay_throughput(d, size))


def run(quick: bool) -> list[tuple[str, str, str]]:
    """(figure, value, budget) rows."""
    total = (32 if quick else 256) << 20
    sync = "fsync ≤ 1 MiB / 100 ms"
    k1_mbps, k1_rps, k1_open, k1_iter, k1_both, k1_next = _fresh(_append_then_replay, 1000, total)
    w_mbps, w_rps, _ = _fresh(append_throughput, 1000, total, "worker")
    b_mbps, b_rps, _ = _fresh(append_throughput, 1000, total, "batch")
    k64_mbps, k64_rps, k64_open, k64_iter, k64_both, k64_next = _fresh(_append_then_replay, 65536, total)
    w64_mbps, _, _ = _fresh(append_throughput, 65536, total, "worker")
    rows = [
        (f"append 1 KB records, append(), {sync} inline (MB/s)", f"{k1_mbps:.0f}", ">= 150"),
        ("append 1 KB records, append(), sync inline (records/s)", f"{k1_rps:,.0f}", ""),
        (f"append 1 KB records, append(), {sync} in a worker thread (MB/s)", f"{w_mbps:.0f}", ">= 150"),
        ("append 1 KB records, append(), sync in a worker thread (records/s)", f"{w_rps:,.0f}", ""),
        ("append 1 KB records, append_many() of 1 MiB + sync each (MB/s)", f"{b_mbps:.0f}", ">= 150"),
        ("append 1 KB records, append_many() (records/s)", f"{b_rps:,.0f}", ""),
        (f"append 64 KB records, append(), {sync} inline (MB/s)", f"{k64_mbps:.0f}", ">= 150"),
        ("append 64 KB records, append(), sync inline (records/s)", f"{k64_rps:,.0f}", ""),
        (f"append 64 KB records, append(), {sync} in a worker thread (MB/s)", f"{w64_mbps:.0f}", ">= 150"),
        (
            "replay 1 KB records: iter_unacked, read + CRC32C + msgpack decode (MB/s)",
            f"{k1_iter:.0f}",
            ">= 300",
        ),
        ("replay 64 KB records: iter_unacked (MB/s)", f"{k64_iter:.0f}", ">= 300"),
        ("open 1 KB records: recovery scan, read + CRC32C (MB/s)", f"{k1_open:.0f}", ""),
        ("open 64 KB records: recovery scan (MB/s)", f"{k64_open:.0f}", ""),
        ("open + iter_unacked from cold, 1 KB records (MB/s)", f"{k1_both:.0f}", ""),
        ("open + iter_unacked from cold, 64 KB records (MB/s)", f"{k64_both:.0f}", ""),
        ("next() + ack per record, 1 KB records (MB/s)", f"{k1_next:.0f}", ""),
        ("next() + ack per record, 64 KB records (MB/s)", f"{k64_next:.0f}", ""),
    ]
    for policy in ("batch", "interval", "never"):
        appended, lost = loss_on_kill(policy, 1.0 if quick else 3.0)
        rows.append(
            (
                f"records lost on kill -9, fsync={policy} (of {appended:,} appended)",
                str(lost),
                "0 (page cache survives)",
            )
        )
    rows.append(("note", "kill -9 keeps the page cache; only power loss drops unsynced appends", ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller volumes")
    args = parser.parse_args()
    rows = run(args.quick)
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>12}  budget")
    for figure, value, budget in rows:
        print(f"{figure:<{width}}  {value:>12}  {budget}")


if __name__ == "__main__":
    main()
