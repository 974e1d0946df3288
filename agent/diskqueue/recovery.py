"""Opening a partition: rebuild the index from the segment files and the ledger, count what was lost.

Damage is counted, never raised: a torn tail is cut off, a corrupt record or a missing segment is
counted from the gaps in sequence numbers, and a missing or corrupt ledger means every record on disk
is delivered again (duplicates, never loss).
"""

from __future__ import annotations

import contextlib
import logging
import os

from agent.diskqueue.format import (
    SEGMENT_HEADER_SIZE,
    Corrupt,
    Damage,
    RecordHeader,
    check_segment_header,
    parse_segment_name,
    scan_records,
    segment_name,
)
from agent.diskqueue.ledger import LEDGER, _Ledger
from agent.diskqueue.segments import _Segment
from agent.diskqueue.state import PartitionState

log = logging.getLogger("headwater.diskqueue")


class PartitionRecovery(PartitionState):
    """:meth:`_recover`, called once by :meth:`agent.diskqueue.Partition.open`."""

    def _recover(self) -> None:
        d = self.directory
        rep = self.report
        if not self.readonly:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, LEDGER + ".tmp"))
        ids = sorted(i for i in (parse_segment_name(n) for n in os.listdir(d)) if i is not None)
        ledger_path = os.path.join(d, LEDGER)
        try:
            with open(ledger_path, "rb") as f:
                self._ledger = _Ledger.decode(f.read(), ledger_path)
            rep.ledger = "ok"
        except FileNotFoundError:
            rep.ledger = "missing" if ids else "new"
        except Corrupt as exc:
            rep.ledger = "corrupt"
            log.warning("%s; re-delivering every record on disk (duplicates, never loss)", exc)
        if rep.ledger in ("missing", "corrupt"):
            if rep.ledger == "missing":
                log.warning(
                    "%s: no ledger beside %d segments; re-delivering every record on disk", d, len(ids)
                )
            self._ledger = _Ledger()
            self._ledger_dirty = True
        ledger = self._ledger
        present = set(ids)
        rep.missing_segments = sum(1 for s in ledger.segments if s not in present)
        prev = ledger.floor - 1  # highest seq seen so far (or acked by the floor)
        damaged = False
        for n, sid in enumerate(ids):
            path = os.path.join(d, segment_name(sid))
            with open(path, "rb") as f:
                data = f.read()
            seg = _Segment(sid, path, len(data))
            last = n == len(ids) - 1
            header_ok = check_segment_header(data, sid, path)  # FormatError for another version
            good_end = min(len(data), SEGMENT_HEADER_SIZE)
            if not header_ok:
                rep.bad_segment_headers += 1
                rep.damaged_segments.append(path)
            tail_damage: Damage | None = None
            heads: list[RecordHeader] = []
            for ev in scan_records(data, good_end):
                if type(ev) is Damage:
                    damaged = True
                    rep.damaged_regions += 1
                    if path not in rep.damaged_segments:
                        rep.damaged_segments.append(path)
                    if ev.items >= 0 and ev.seq > prev and not ledger.acked(ev.seq):
                        rep.corrupt_items += ev.items
                    if ev.to_eof:
                        tail_damage = ev
                    continue
                assert type(ev) is RecordHeader
                seq = ev.seq
                if seq > prev:
                    if seq > prev + 1:
                        gap = ledger.unacked_between(prev + 1, seq)
                        if damaged:
                            rep.corrupt_records += gap
                        else:
                            rep.missing_records += gap
                    prev = seq
                damaged = False
                heads.append(ev)
            if heads:
                seg.fill(heads, ledger)
                good_end = heads[-1].end
            if last and tail_damage is not None and not self.readonly and header_ok:
                # A torn or garbage tail: cut it off so the file ends on a record boundary.
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                rep.truncated_bytes += len(data) - good_end
                seg.size = seg.synced_size = good_end
            if last and not header_ok and seg.count == 0 and not self.readonly:
                # Created but never written (a crash right after open()): nothing to keep.
                os.unlink(path)
                rep.bad_segment_headers -= 1
                rep.truncated_bytes += len(data)
                rep.damaged_segments.remove(path)
                damaged = bool(len(data)) and damaged
                continue
            self._segments.append(seg)
        end = max(ledger.next_seq, prev + 1)
        gap = ledger.unacked_between(prev + 1, end)
        if damaged:
            rep.corrupt_records += max(gap, 1)
        else:
            rep.missing_records += gap
        self._next_seq = end
        self._next_segment = max([ledger.next_segment, *(i + 1 for i in ids)])
        for seg in self._segments:
            self._disk_bytes += seg.size
            self._records += seg.pending
            self._pending += seg.pending
            if seg.all_done:
                self._reclaimable += seg.size
        rep.segments = len(self._segments)
        rep.records = self._records
        st = self.stats
        st.corrupt_records = rep.corrupt_records
        st.corrupt_items = rep.corrupt_items
        st.missing_records = rep.missing_records
        st.missing_segments = rep.missing_segments
        if rep.damaged:
            self._ledger_dirty = True  # persist the lost seqs as gone, so the next open does not recount
            log.warning(
                "%s: recovered %d records; lost %d corrupt (%d items known), %d missing, %d missing segments,"
                " cut %d bytes of torn tail, ledger %s",
                d,
                rep.records,
                rep.corrupt_records,
                rep.corrupt_items,
                rep.missing_records,
                rep.missing_segments,
                rep.truncated_bytes,
                rep.ledger,
            )
