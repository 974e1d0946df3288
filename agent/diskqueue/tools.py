"""``headwater queue inspect|verify|repair DIR``: look at, check and fix a disk queue offline.

inspect and verify open partitions read-only (no lock, nothing written), so they work beside a
running agent (its unsynced tail may then show as torn). repair takes each partition's lock, so it
refuses to run while an agent holds the directory.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from agent.diskqueue.format import (
    SEGMENT_HEADER_SIZE,
    Damage,
    check_segment_header,
    encode_segment_header,
    fsync_dir,
    parse_segment_name,
    scan_records,
    write_atomic,
)
from agent.diskqueue.partition import Partition, QueueError, acquire_lock
from agent.diskqueue.queue import partition_dirs

EXIT_DAMAGED = 1
EXIT_ERROR = 2


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="milliseconds")


def inspect_partition(directory: str) -> dict[str, Any]:
    with Partition.open(directory, readonly=True) as p:
        oldest, newest = p.time_range_ms()
        segs = p.segment_summaries()
        rep = p.report
        return {
            "partition": os.path.basename(directory.rstrip("/")),
            "path": directory,
            "segments": len(segs),
            "records": sum(s["records"] for s in segs),
            "lag": p.records,
            "bytes": p.disk_bytes,
            "oldest": _iso(oldest),
            "newest": _iso(newest),
            "ledger": rep.ledger,
            "corrupt_records": rep.corrupt_records,
            "missing_records": rep.missing_records,
            "missing_segments": rep.missing_segments,
            "bad_segment_headers": rep.bad_segment_headers,
        }


def verify_partition(directory: str) -> dict[str, Any]:
    """Read everything: every record's checksums (the open scan) and every unacked body's decoding."""
    with Partition.open(directory, readonly=True) as p:
        rep = p.report
        undecodable = p.verify_bodies()
        out = {
            "partition": os.path.basename(directory.rstrip("/")),
            "path": directory,
            "records": p.records + undecodable,
            "corrupt_records": rep.corrupt_records + undecodable,
            "corrupt_items": rep.corrupt_items,
            "damaged_regions": rep.damaged_regions,
            "missing_records": rep.missing_records,
            "missing_segments": rep.missing_segments,
            "bad_segment_headers": rep.bad_segment_headers,
            "ledger": rep.ledger,
            "damaged_segments": [os.path.basename(s) for s in rep.damaged_segments],
        }
        out["ok"] = not (rep.damaged or undecodable)
        return out


def _rewrite_segment(path: str, segment_id: int) -> tuple[int, int] | None:
    """Rewrite a damaged segment keeping only its valid records; (regions dropped, bytes dropped) or None."""
    with open(path, "rb") as f:
        data = f.read()
    header_ok = check_segment_header(data, segment_id, path)
    start = min(len(data), SEGMENT_HEADER_SIZE)
    kept: list[bytes] = []
    regions = 0
    for ev in scan_records(data, start):
        if isinstance(ev, Damage):
            regions += 1
        else:
            kept.append(data[ev.offset : ev.end])
    if header_ok and not regions:
        return None
    new = encode_segment_header(segment_id) + b"".join(kept)
    write_atomic(path, new)
    return regions, len(data) - len(new)


def repair_partition(directory: str) -> dict[str, Any]:
    before = verify_partition(directory)
    lock_fd = acquire_lock(directory)  # QueueLocked while an agent runs on it
    rewritten = 0
    dropped_bytes = 0
    try:
        for name in sorted(os.listdir(directory)):
            sid = parse_segment_name(name)
            if sid is None:
                continue
            done = _rewrite_segment(os.path.join(directory, name), sid)
            if done is not None:
                rewritten += 1
                dropped_bytes += done[1]
        fsync_dir(directory)
    finally:
        os.close(lock_fd)
    # Reopen for real: it recovers from the rewritten segments, and the forced ledger write records
    # the lost records as gone, so they are not counted again.
    with Partition.open(directory) as p:
        p.sync(ledger=True)
        remaining = p.records
    return {
        "partition": before["partition"],
        "path": directory,
        "corrupt_records_dropped": before["corrupt_records"],
        "missing_records": before["missing_records"],
        "missing_segments": before["missing_segments"],
        "segments_rewritten": rewritten,
        "bytes_dropped": dropped_bytes,
        "ledger_was": before["ledger"],
        "records_kept": remaining,
    }


def queue_command(action: str, root: str, as_json: bool) -> int:
    """Run one ``headwater queue`` action; returns the exit code (1: damage found by verify)."""
    if not os.path.isdir(root):
        print(f"headwater queue: {root} is not a directory")
        return EXIT_ERROR
    dirs = partition_dirs(root)
    if not dirs:
        print(f"headwater queue: no disk-queue partitions under {root}")
        return EXIT_ERROR
    fn = {"inspect": inspect_partition, "verify": verify_partition, "repair": repair_partition}[action]
    results: list[dict[str, Any]] = []
    code = 0
    for d in dirs:
        try:
            results.append(fn(d))
        except (QueueError, OSError) as exc:
            results.append({"partition": os.path.basename(d), "path": d, "error": str(exc)})
            code = EXIT_ERROR
    if action == "verify" and code == 0 and not all(r.get("ok") for r in results):
        code = EXIT_DAMAGED
    if as_json:
        print(json.dumps(results, indent=2))
        return code
    for r in results:
        if "error" in r:
            print(f"{r['partition']}: ERROR {r['error']}")
        elif action == "inspect":
            print(
                f"{r['partition']}: {r['segments']} segments, {r['bytes']} bytes, {r['records']} records,"
                f" lag {r['lag']} unacked, oldest {r['oldest']}, newest {r['newest']}, ledger {r['ledger']}"
            )
            if (
                r["corrupt_records"]
                or r["missing_records"]
                or r["missing_segments"]
                or r["bad_segment_headers"]
            ):
                print(
                    f"  damage: {r['corrupt_records']} corrupt records, {r['missing_records']} missing"
                    f" records, {r['missing_segments']} missing segments,"
                    f" {r['bad_segment_headers']} bad segment headers"
                )
        elif action == "verify":
            status = "ok" if r["ok"] else "DAMAGED"
            print(
                f"{r['partition']}: {status}: {r['records']} unacked records, {r['corrupt_records']} corrupt"
                f" ({r['corrupt_items']} items known), {r['missing_records']} missing,"
                f" {r['missing_segments']} missing segments, {r['bad_segment_headers']} bad segment headers,"
                f" ledger {r['ledger']}"
            )
            for s in r["damaged_segments"]:
                print(f"  damaged segment {s}")
        else:
            print(
                f"{r['partition']}: repaired: dropped {r['corrupt_records_dropped']} corrupt records,"
                f" {r['missing_records']} missing records ({r['missing_segments']} missing segments),"
                f" rewrote {r['segments_rewritten']} segments ({r['bytes_dropped']} bytes dropped),"
                f" ledger was {r['ledger_was']} and is rewritten; {r['records_kept']} records kept"
            )
    return code
