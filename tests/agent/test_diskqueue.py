"""The disk queue engine: append/read/ack/restart, policies, corruption, lock, ENOSPC, CLI, state file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from agent.cli import main
from agent.diskqueue import (
    DiskFull,
    DiskQueue,
    DiskQueueConfig,
    Partition,
    PartitionOptions,
    QueueFull,
    QueueLocked,
    RecordTooLarge,
    StateFile,
    UnsupportedFormat,
    partition_name,
)
from agent.diskqueue.format import (
    FRAME_HEADER,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    crc32c,
    decode_record_at,
    encode_body,
    encode_frame,
    encode_record,
    scan_records,
)
from agent.diskqueue.partition import LEDGER_MAGIC, acquire_lock
from agent.telemetry import ComponentTelemetry, Telemetry

ROOT = Path(__file__).resolve().parents[2]
SMALL = PartitionOptions(max_bytes=64 * 1024, segment_bytes=8192)  # 8 KiB segments


def fill(p: Partition, n: int, size: int = 10, start: int = 0) -> list[int]:
    return [
        p.append(f"rec-{i:06d}".encode().ljust(size, b"."), items=i + 1).seq for i in range(start, start + n)
    ]


def drain(p: Partition, oldest: bool = True) -> list[bytes]:
    out = []
    while (r := p.next(oldest)) is not None:
        out.append(r.payload)
        p.ack(r.seq)
    return out


def segs(d: Path) -> list[Path]:
    return sorted(d.glob("*.seg"))


def names(n: int, start: int = 0, size: int = 10) -> list[bytes]:
    return [f"rec-{i:06d}".encode().ljust(size, b".") for i in range(start, start + n)]


# --- basics -------------------------------------------------------------------------------------


def test_append_read_ack_restart(tmp_path: Path) -> None:
    d = str(tmp_path / "p")
    with Partition.open(d) as p:
        fill(p, 5)
        r = p.next()
        assert r is not None and r.payload == names(1)[0] and r.items == 1
        assert p.ack(r.seq) and not p.ack(r.seq)  # a second ack is a no-op
        r2 = p.next()
        assert r2 is not None and r2.seq == 1  # in flight, not acked: comes back after restart
    with Partition.open(d) as p:
        assert p.records == 4
        assert drain(p) == names(4, start=1)
    with Partition.open(d) as p:
        assert p.records == 0 and p.next() is None


def test_headers_and_items_round_trip(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path)) as p:
        p.append(b"\x00\xff" * 100, items=42, headers={"X-Scope-OrgID": "acme"})
        r = p.next()
        assert r is not None and r.headers == {"X-Scope-OrgID": "acme"} and r.items == 42
        assert r.payload == b"\x00\xff" * 100


def test_newest_first_and_fifo_interleave(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path), SMALL) as p:
        fill(p, 40, size=300)  # several segments
        got = []
        for k in range(40):
            r = p.next(oldest=k % 2 == 0)
            assert r is not None
            got.append(r.seq)
            p.ack(r.seq)
        # Alternating oldest/newest meets in the middle: 0, 39, 1, 38, ...
        assert got[:6] == [0, 39, 1, 38, 2, 37]
        assert sorted(got) == list(range(40)) and p.next() is None


def test_out_of_order_acks_persist_exactly(tmp_path: Path) -> None:
    d = str(tmp_path)
    with Partition.open(d, SMALL) as p:
        fill(p, 30, size=300)
        recs = [p.next() for _ in range(30)]
        for r in recs:
            assert r is not None
            if r.seq % 3 == 0 or r.seq > 20:
                p.ack(r.seq)
        p.sync(ledger=True)
    with Partition.open(d, SMALL) as p:
        left = [r.seq for r in p.iter_unacked()]
        assert left == [s for s in range(21) if s % 3]  # acked ones never come back
        assert p.records == len(left)


def test_release_hands_out_again(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path)) as p:
        fill(p, 3)
        a, b = p.next(), p.next()
        assert a is not None and b is not None and p.pending == 1
        assert p.release(a.seq)
        again = p.next()
        assert again is not None and again.seq == a.seq


def test_segment_rollover_and_deletion(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path), SMALL) as p:
        fill(p, 100, size=500)
        p.sync()
        n = len(segs(tmp_path))
        assert n >= 6  # 8 KiB segments of ~15 records
        for _ in range(50):
            r = p.next()
            assert r is not None
            p.ack(r.seq)
        p.sync(ledger=True)
        assert len(segs(tmp_path)) < n  # fully acked segments are gone
        assert p.stats.segments_deleted > 0
        drain(p)
        p.sync(ledger=True)
        # Only the writer's current segment may remain.
        assert len(segs(tmp_path)) <= 1
    with Partition.open(str(tmp_path), SMALL) as p:
        assert p.records == 0 and p.report.missing_records == 0 and not p.report.damaged


def test_iter_unacked_does_not_ack(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path)) as p:
        fill(p, 4)
        r = p.next()
        assert r is not None
        p.ack(r.seq)
        assert [x.payload for x in p.iter_unacked()] == names(3, start=1)
        assert p.records == 3 and p.pending == 3


# --- bounds --------------------------------------------------------------------------------------


def test_block_policy_refuses_then_recovers(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path), SMALL) as p:
        with pytest.raises(QueueFull):
            for _ in range(1000):
                fill(p, 1, size=1000)
        assert p.stats.refused_full == 1
        assert p.used_bytes <= SMALL.max_bytes
        drain(p)
        p.sync()  # writes the ledger, deletes freed segments
        fill(p, 10, size=1000)  # room again


def test_drop_oldest_drops_whole_oldest_records(tmp_path: Path) -> None:
    opts = PartitionOptions(max_bytes=64 * 1024, segment_bytes=8192, full_policy="drop_oldest")
    with Partition.open(str(tmp_path), opts) as p:
        dropped_items = dropped = 0
        for i in range(200):
            res = p.append(b"x" * 1000, items=i + 1)
            dropped += res.dropped_records
            dropped_items += res.dropped_items
            assert p.used_bytes <= opts.max_bytes
        assert dropped > 0 and p.stats.dropped_records == dropped
        kept = [r.seq for r in p.iter_unacked()]
        assert kept == list(range(200 - len(kept), 200))  # the newest survive, in order
        assert dropped == 200 - len(kept)
        assert dropped_items == sum(range(1, dropped + 1))  # each record's own item count


def test_record_too_large(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path), SMALL) as p, pytest.raises(RecordTooLarge):
        p.append(b"x" * SMALL.max_bytes)


# --- versions, lock --------------------------------------------------------------------------------


def test_newer_ledger_version_is_refused(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path)) as p:
        fill(p, 2)
    (tmp_path / "ledger").write_bytes(encode_frame(LEDGER_MAGIC, 2, {"anything": 1}))
    with pytest.raises(UnsupportedFormat, match="version 2"):
        Partition.open(str(tmp_path))


def test_newer_segment_version_is_refused(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path)) as p:
        fill(p, 2)
    seg = segs(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[4:6] = struct.pack("<H", 7)
    data[16:20] = struct.pack("<I", crc32c(bytes(data[:16])))  # a valid header of version 7
    seg.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFormat, match="version 7"):
        Partition.open(str(tmp_path))
    with pytest.raises(UnsupportedFormat):
        Partition.open(str(tmp_path), readonly=True)


def test_second_open_in_another_process_fails_fast(tmp_path: Path) -> None:
    d = str(tmp_path / "q")
    with Partition.open(d):
        code = "import sys\nfrom agent.diskqueue import Partition\nPartition.open(sys.argv[1])\n"
        proc = subprocess.run(
            [sys.executable, "-c", code, d], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0
        assert f"disk queue directory {d} is locked by another process (pid {os.getpid()})" in proc.stderr
        with pytest.raises(QueueLocked):  # a second open in this process fails too
            Partition.open(d)
    Partition.open(d).close()  # released on close


# --- corruption ------------------------------------------------------------------------------------


def _three(tmp_path: Path, size: int = 20, batch: bool = False) -> tuple[Path, list[int]]:
    """A closed partition with three records; returns its directory and the records' offsets."""
    d = tmp_path / "orig"
    with Partition.open(str(d)) as p:
        if batch:  # the same records, written by one append_many
            p.append_many([(n, i + 1, None) for i, n in enumerate(names(3, size=size))])
        else:
            fill(p, 3, size=size)
    seg = segs(d)[0]
    offsets = [ev.offset for ev in scan_records(seg.read_bytes(), SEGMENT_HEADER_SIZE)]  # type: ignore[union-attr]
    return d, offsets


@pytest.mark.parametrize("batch", [False, True])
def test_torn_tail_at_every_byte_offset(tmp_path: Path, batch: bool) -> None:
    orig, offsets = _three(tmp_path, batch=batch)
    size = segs(orig)[0].stat().st_size
    for cut in range(offsets[2], size):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(orig, d)
        os.truncate(segs(d)[0], cut)
        with Partition.open(str(d)) as p:
            assert [r.payload for r in p.iter_unacked()] == names(2, size=20), cut
            if cut == offsets[2]:  # the whole record gone: the ledger knew of it
                assert p.report.missing_records == 1 and p.report.corrupt_records == 0
            else:
                assert p.report.corrupt_records == 1 and p.report.truncated_bytes == cut - offsets[2], cut
            assert p.stats.corrupt_records + p.stats.missing_records == 1
            p.append(b"after")
        with Partition.open(str(d)) as p:
            assert [r.payload for r in p.iter_unacked()] == [*names(2, size=20), b"after"]
            assert not p.report.damaged  # counted once, not again at the next open


@pytest.mark.parametrize(
    ("field", "at", "items_known"),
    [
        ("length", 4, False),
        ("header crc", 32, False),
        ("body crc", 28, False),
        ("payload", RECORD_HEADER_SIZE + 5, True),
    ],
)
@pytest.mark.parametrize("batch", [False, True])
def test_bit_flip_in_middle_record(
    tmp_path: Path, field: str, at: int, items_known: bool, batch: bool
) -> None:
    d, offsets = _three(tmp_path, batch=batch)
    seg = segs(d)[0]
    data = bytearray(seg.read_bytes())
    data[offsets[1] + at] ^= 0x10
    seg.write_bytes(bytes(data))
    with Partition.open(str(d)) as p:
        assert [r.payload for r in p.iter_unacked()] == [names(3, size=20)[0], names(3, size=20)[2]], field
        assert p.report.corrupt_records == 1
        assert p.report.corrupt_items == (2 if items_known else 0)  # record 1 carries 2 items
        p.append(b"more")
        assert drain(p) == [names(3, size=20)[0], names(3, size=20)[2], b"more"]


def test_garbage_appended(tmp_path: Path) -> None:
    d, _ = _three(tmp_path)
    with open(segs(d)[0], "ab") as f:
        f.write(b"\x5a\xa5" * 50)
    with Partition.open(str(d)) as p:
        assert [r.payload for r in p.iter_unacked()] == names(3, size=20)
        assert p.report.corrupt_records == 1 and p.report.truncated_bytes == 100
        p.append(b"x")
    with Partition.open(str(d)) as p:
        assert p.records == 4 and not p.report.damaged


def test_missing_segment_is_counted_not_fatal(tmp_path: Path) -> None:
    d = tmp_path / "q"
    with Partition.open(str(d), SMALL) as p:
        fill(p, 60, size=500)
    files = segs(d)
    assert len(files) >= 3
    lost = sum(1 for ev in scan_records(files[1].read_bytes(), SEGMENT_HEADER_SIZE))
    files[1].unlink()  # as if deleted before the ledger that frees it was written (Vector #25570)
    with Partition.open(str(d), SMALL) as p:
        assert p.report.missing_segments == 1 and p.report.missing_records == lost
        got = [r.seq for r in p.iter_unacked()]
        assert len(got) == 60 - lost and got == sorted(got)
        assert len(drain(p)) == 60 - lost


@pytest.mark.parametrize("damage", ["torn", "garbage", "missing"])
def test_bad_ledger_redelivers_rather_than_loses(tmp_path: Path, damage: str) -> None:
    d = tmp_path / "q"
    with Partition.open(str(d)) as p:
        fill(p, 5)
        r = p.next()
        assert r is not None
        p.ack(r.seq)
    ledger = d / "ledger"
    if damage == "torn":
        os.truncate(ledger, ledger.stat().st_size // 2)
    elif damage == "garbage":
        ledger.write_bytes(os.urandom(64))
    else:
        ledger.unlink()
    with Partition.open(str(d)) as p:
        assert p.report.ledger == ("missing" if damage == "missing" else "corrupt")
        assert p.records == 5  # the acked one comes back: a duplicate, never a loss
        p.append(b"new")
    with Partition.open(str(d)) as p:
        assert p.report.ledger == "ok" and p.records == 6


def test_leftover_temp_ledger_is_ignored(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path)) as p:
        fill(p, 2)
    (tmp_path / "ledger.tmp").write_bytes(b"half-written")
    with Partition.open(str(tmp_path)) as p:
        assert p.records == 2 and p.report.ledger == "ok"
    assert not (tmp_path / "ledger.tmp").exists()


def test_corruption_after_open_is_counted_on_read(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path)) as p:
        fill(p, 3, size=20)
        p.sync()
        seg = segs(tmp_path)[0]
        data = bytearray(seg.read_bytes())
        data[-5] ^= 1  # the last record's body
        seg.write_bytes(bytes(data))
        assert [r.payload for r in iter(lambda: p.next(), None)] == names(2, size=20)
        assert p.stats.corrupt_records == 1 and p.records == 2


# --- disk full -----------------------------------------------------------------------------------

ENOSPC_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from agent.diskqueue import DiskFull, Partition, PartitionOptions
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
    d = sys.argv[1]
    opts = PartitionOptions(max_bytes=1 << 20, segment_bytes=1 << 20)
    p = Partition.open(d, opts)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))
    ok, refused, sizes = [], 0, []
    for i in range(40):
        try:
            ok.append(p.append(f"r{i}".encode().ljust(1000, b"."), items=1).seq)
        except DiskFull:
            refused += 1
            sizes.append(os.path.getsize(p._active.path))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space comes back
    for i in range(40, 45):
        ok.append(p.append(f"r{i}".encode().ljust(1000, b"."), items=1).seq)
    p.close()
    print(json.dumps({"ok": ok, "refused": refused, "stat": p.stats.refused_disk_full, "sizes": sizes}))
    """
)


def test_disk_full_leaves_no_torn_record_and_resumes(tmp_path: Path) -> None:
    d = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-c", ENOSPC_SCRIPT, str(d)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["refused"] > 0 and out["stat"] == out["refused"]
    # Every refused append left the file at a record boundary, below the limit.
    assert all(s < 10_000 for s in out["sizes"])
    with Partition.open(str(d)) as p:
        assert not p.report.damaged
        assert [r.seq for r in p.iter_unacked()] == out["ok"]
        assert len(out["ok"]) == 45 - out["refused"]


# --- queue, metrics, validate ---------------------------------------------------------------------


def test_disk_queue_partitions_and_metrics(tmp_path: Path) -> None:
    tel = Telemetry()
    cfg = DiskQueueConfig(directory=str(tmp_path), max_bytes=1 << 20)
    q = DiskQueue(cfg, "otlp/signoz", ComponentTelemetry(tel, "exporter", "otlp/signoz"))
    q.partition().append(b"a", items=3)
    q.partition("acme").append(b"b")
    q.sync()
    assert sorted(os.listdir(tmp_path)) == ["otlp%2Fsignoz", "otlp%2Fsignoz@acme"]
    assert tel.value("exporter_disk_queue_records") == 2
    assert tel.value("exporter_disk_queue_records", tenant="acme") == 1
    assert tel.value("exporter_disk_queue_fsyncs_total") > 0
    assert tel.value("exporter_disk_queue_bytes") > 0
    q.close()
    q2 = DiskQueue(cfg, "otlp/signoz")
    assert sorted(q2.existing_tenants(), key=str) == sorted([None, "acme"], key=str)
    assert partition_name("..") == "%2E."


def test_environment_problems_report_lock_and_permissions(tmp_path: Path) -> None:
    cfg = DiskQueueConfig(directory=str(tmp_path / "q"))
    assert cfg.environment_problems() == []  # does not exist yet, but can be created
    with DiskQueue(cfg, "prometheus_remote_write").partition():
        problems = cfg.environment_problems()
        assert len(problems) == 1 and "locked by another process" in problems[0][1]
    assert cfg.environment_problems() == []
    (tmp_path / "file").write_text("x")
    assert DiskQueueConfig(directory=str(tmp_path / "file")).environment_problems()
    assert DiskQueueConfig(directory="", fsync_interval=0).validate()  # type: ignore[arg-type]


# --- state file ----------------------------------------------------------------------------------


def test_state_file_round_trip_and_damage(tmp_path: Path) -> None:
    sf = StateFile(str(tmp_path / "rw-state"))
    assert sf.load() == {}
    state = {"series": {"up{job=a}": [1.5, 1700000000000]}, "v": 1}
    sf.save(state)
    assert StateFile(sf.path).load() == state
    raw = (tmp_path / "rw-state").read_bytes()
    for bad in (raw[: len(raw) // 2], b"garbage" * 3, raw[:-1] + bytes([raw[-1] ^ 1])):
        (tmp_path / "rw-state").write_bytes(bad)
        f = StateFile(sf.path)
        assert f.load() == {} and f.corrupt_loads == 1
    (tmp_path / "rw-state").write_bytes(encode_frame(b"HQST", 9, {}))
    with pytest.raises(UnsupportedFormat):
        StateFile(sf.path).load()
    assert FRAME_HEADER.size == 12


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_inspect_verify_repair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "queue"
    q = DiskQueue(DiskQueueConfig(directory=str(root), max_bytes=64 * 1024, segment_bytes=8192), "rw")
    p = q.partition()
    fill(p, 40, size=500)
    r = p.next()
    assert r is not None
    p.ack(r.seq)
    q.close()
    assert main(["queue", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "rw: " in out and "40 records, lag 39 unacked" in out
    assert main(["queue", "verify", str(root)]) == 0
    assert "rw: ok: 39 unacked records" in capsys.readouterr().out
    # Damage: a bit flip in a middle segment and a torn tail in the last one.
    files = segs(root / "rw")
    data = bytearray(files[1].read_bytes())
    data[SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 3] ^= 0x40
    files[1].write_bytes(bytes(data))
    os.truncate(files[-1], files[-1].stat().st_size - 7)
    assert main(["queue", "verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "rw: DAMAGED" in out and "2 corrupt" in out and files[1].name in out
    assert main(["queue", "inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["corrupt_records"] == 2
    held = acquire_lock(str(root / "rw"))  # repair refuses while an agent holds the directory
    try:
        assert main(["queue", "repair", str(root)]) == 2
        assert "locked by another process" in capsys.readouterr().out
    finally:
        os.close(held)
    assert main(["queue", "repair", str(root)]) == 0
    out = capsys.readouterr().out
    assert "dropped 2 corrupt records" in out and "37 records kept" in out
    assert main(["queue", "verify", str(root)]) == 0
    capsys.readouterr()
    assert main(["queue", "verify", str(tmp_path / "nothing")]) == 2


# --- batch append, chunked replay, the hand-built body encoding ------------------------------------


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 70000])
@pytest.mark.parametrize(
    "headers", [None, {}, {"X-Scope-OrgID": "acme"}, {f"k{i}": "v" * i for i in range(20)}]
)
def test_body_encoding_is_msgpack_format_version_1(size: int, headers: dict[str, str] | None) -> None:
    # The writer builds bodies by hand (no msgpack for empty headers, no copy of the payload); the
    # bytes must stay exactly what msgpack.packb wrote before, so old queues and old agents agree.
    payload = os.urandom(size)
    body = encode_body(payload, headers)
    assert body == msgpack.packb([dict(headers or {}), payload], use_bin_type=True)
    record = encode_record(7, 3, 1234, body)
    assert decode_record_at(record, 0, len(body), 7) == (dict(headers or {}), payload)
    with pytest.raises(ValueError, match="index seq 8"):
        decode_record_at(record, 0, len(body), 8)
    damaged = bytearray(record)
    damaged[-1 if size else RECORD_HEADER_SIZE] ^= 1
    with pytest.raises(ValueError, match="body checksum"):
        decode_record_at(bytes(damaged), 0, len(body), 7)


def test_append_many_round_trip_and_restart(tmp_path: Path) -> None:
    d = str(tmp_path)
    with Partition.open(d, SMALL) as p:
        p.append(b"single", items=5)
        batch = [(n, i + 1, {"t": str(i)} if i % 3 == 0 else None) for i, n in enumerate(names(40, size=300))]
        res = p.append_many(batch)
        assert res.seqs == range(1, 41) and res.count == 40 and res.dropped_records == 0
        assert len(segs(tmp_path)) > 1  # 40 × ~340 bytes: the batch rolled over 8 KiB segments
        assert p.append(b"after").seq == 41
        assert p.append_many([]).count == 0
        got = list(p.iter_unacked())
        assert [r.payload for r in got] == [b"single", *names(40, size=300), b"after"]
        assert [r.items for r in got[1:41]] == list(range(1, 41))
        assert got[1].headers == {"t": "0"} and got[2].headers == {}
        r = p.next()
        assert r is not None and r.seq == 0
        p.ack(r.seq)
    with Partition.open(d, SMALL) as p:
        assert not p.report.damaged
        assert [r.payload for r in iter(lambda: p.next(), None)] == [*names(40, size=300), b"after"]


def test_append_many_is_all_or_nothing_when_full(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path), SMALL) as p:
        fill(p, 50, size=1000)
        before = (p.records, p.disk_bytes, [f.stat().st_size for f in segs(tmp_path)])
        with pytest.raises(QueueFull):
            p.append_many([(b"x" * 1000, 1, None)] * 30)  # 30 KB more does not fit in 64 KiB
        assert (p.records, p.disk_bytes, [f.stat().st_size for f in segs(tmp_path)]) == before
        assert p.stats.refused_full == 1
        with pytest.raises(RecordTooLarge):
            p.append_many([(b"x" * 1000, 1, None)] * 70)  # more than max_bytes even when empty
        with pytest.raises(ValueError, match="items"):
            p.append_many([(b"x", -1, None)])
        assert p.records == 50
        p.append_many([(b"y" * 1000, 1, None)] * 5)
        assert p.records == 55


def test_append_many_drop_oldest_makes_room_for_the_batch(tmp_path: Path) -> None:
    opts = PartitionOptions(max_bytes=64 * 1024, segment_bytes=8192, full_policy="drop_oldest")
    with Partition.open(str(tmp_path), opts) as p:
        fill(p, 50, size=1000)
        res = p.append_many([(b"n" * 1000, 2, None)] * 20)
        assert res.dropped_records > 0 and res.dropped_items == sum(range(1, res.dropped_records + 1))
        assert p.used_bytes <= opts.max_bytes
        kept = [r.seq for r in p.iter_unacked()]
        assert kept == list(range(res.dropped_records, 70))  # oldest gone, the whole batch kept


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_append_many_disk_full_undoes_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    # A batch spanning two segments: writev 1 writes the new segment's header, 2 the records into the
    # current segment, 3 those into the new one. The disk fills during one of them, after a partial
    # write. Nothing of the batch may remain: no bytes, no new segment file, no record.
    d = str(tmp_path)
    p = Partition.open(d, SMALL)
    fill(p, 3, size=1000)
    sizes_before = {f.name: f.stat().st_size for f in segs(tmp_path)}
    real_writev = os.writev
    calls = {"n": 0}

    def writev(fd: int, bufs: list[bytes]) -> int:
        calls["n"] += 1
        if calls["n"] == fail_at:
            os.write(fd, b"".join(bufs)[:100])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, bufs)

    monkeypatch.setattr(os, "writev", writev)
    with pytest.raises(DiskFull):
        p.append_many([(b"z" * 1000, 1, None)] * 8)  # 3 + 8 records of ~1 KB: rolls past 8 KiB
    monkeypatch.undo()
    assert {f.name: f.stat().st_size for f in segs(tmp_path)} == sizes_before
    assert p.records == 3 and p.stats.refused_disk_full == 1
    p.append_many([(b"ok", 1, None)] * 2)
    p.close()
    with Partition.open(d, SMALL) as p:
        assert not p.report.damaged
        assert [r.payload for r in p.iter_unacked()] == [*names(3, size=1000), b"ok", b"ok"]


@pytest.mark.parametrize("chunk", [1, 700, 5000, 1 << 22])
def test_iter_unacked_chunks_skip_acked_and_match_next(tmp_path: Path, chunk: int) -> None:
    with Partition.open(str(tmp_path), SMALL) as p:
        fill(p, 60, size=300)
        recs = [p.next() for _ in range(60)]
        for r in recs:
            assert r is not None
            if r.seq % 4 == 1 or 20 <= r.seq < 35:  # scattered acks and a run that spans a segment
                p.ack(r.seq)
            else:
                p.release(r.seq)
        want = [s for s in range(60) if not (s % 4 == 1 or 20 <= s < 35)]
        got = list(p.iter_unacked(chunk_bytes=chunk))
        assert [r.seq for r in got] == want
        assert [r.payload for r in got] == [names(60, size=300)[s] for s in want]
        assert [r.items for r in got] == [s + 1 for s in want]
        assert [r.seq for r in iter(lambda: p.next(), None)] == want  # the same records as next()


def test_iter_unacked_counts_damage_found_after_open(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path), SMALL) as p:
        fill(p, 12, size=300)
        p.sync()
        files = segs(tmp_path)
        first = files[0]
        offsets = [ev.offset for ev in scan_records(first.read_bytes(), SEGMENT_HEADER_SIZE)]  # type: ignore[union-attr]
        data = bytearray(first.read_bytes())
        data[offsets[1] + RECORD_HEADER_SIZE + 10] ^= 1  # record 1: body
        data[offsets[3] + 8] ^= 1  # record 3: header (its seq)
        first.write_bytes(bytes(data))
        last = files[-1]
        os.truncate(last, last.stat().st_size - 5)  # the newest record: torn after open
        lost = {1, 3, 11}
        got = [r.seq for r in p.iter_unacked(chunk_bytes=1000)]
        assert got == [s for s in range(12) if s not in lost]
        assert p.stats.corrupt_records == 3 and p.stats.corrupt_items == 2 + 4 + 12
        assert p.records == 9 and p.pending == 9
        assert [r.seq for r in p.iter_unacked()] == got  # counted once, then gone
        assert p.verify_bodies() == 0


def test_verify_bodies_reports_each_bad_record(tmp_path: Path) -> None:
    with Partition.open(str(tmp_path)) as p:
        fill(p, 5, size=50)
        p.sync()
        seg = segs(tmp_path)[0]
        data = bytearray(seg.read_bytes())
        data[-3] ^= 0x20  # the last record's payload
        seg.write_bytes(bytes(data))
        seen: list[str] = []
        assert p.verify_bodies(seen.append) == 1
        assert len(seen) == 1 and "record 4 does not decode" in seen[0]


def test_iter_unacked_alongside_acks_and_segment_deletion(tmp_path: Path) -> None:
    # The replay tool acks and syncs while it iterates: a sync then deletes fully acked segments
    # under the iterator's feet. Every record is seen once, in order, and nothing fails.
    with Partition.open(str(tmp_path), SMALL) as p:
        fill(p, 80, size=400)
        p.sync()
        seen = []
        for r in p.iter_unacked(chunk_bytes=2000):
            seen.append(r.seq)
            p.ack(r.seq)
            if r.seq % 10 == 9:
                p.sync(ledger=True)
        assert seen == list(range(80)) and p.stats.segments_deleted > 0 and p.records == 0
        fill(p, 2)
        r0 = p.next()
        assert r0 is not None
        it = p.iter_unacked()
        p.ack(r0.seq)  # acked before the iterator reaches it: skipped
        assert [r.seq for r in it] == [81]
