"""An agent refuses a disk queue written in a newer format, and leaves it as it found it: the ledger and
the segments stay for the newer agent that wrote them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.diskqueue import Partition, PartitionOptions, UnsupportedFormat
from agent.diskqueue.format import crc32c, encode_frame
from agent.diskqueue.partition import LEDGER_MAGIC

SMALL = PartitionOptions(max_bytes=64 * 1024, segment_bytes=8192)


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
