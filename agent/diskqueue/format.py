"""The bytes on disk: segment headers, records, and the framed files (ledger, state files).

All integers are little-endian. Checksums are CRC32C (Castagnoli) through ``google-crc32c``'s C
extension (~12 GB/s here; zlib.crc32 is ~1.7 GB/s and has weaker error detection for short bursts).

Segment file ``<id:020d>.seg``::

    0   magic        4   b"HQSG"
    4   version      u16 FORMAT_VERSION
    6   flags        u16 0
    8   segment_id   u64 equal to the number in the file name
    16  header_crc   u32 crc32c(bytes 0..16)
    20  records...

Record (36-byte header, then the body)::

    0   magic        4   b"HQR" + version byte: a resync point, and a record of another version is
                         never taken for one of ours
    4   body_len     u32
    8   seq          u64 sequence number, +1 per record in a partition, never reused
    16  items        u32 points the record carries (loss accounting survives a damaged body)
    20  time_ms      u64 wall-clock append time, Unix ms
    28  body_crc     u32 crc32c(body)
    32  head_crc     u32 crc32c(bytes 0..32)
    36  body         msgpack [headers: map str→str, payload: bin]

Framed file (ledger, state file), replaced atomically as a whole::

    0   magic        4
    4   version      u16
    6   flags        u16 0
    8   body_len     u32
    12  crc          u32 crc32c(bytes 0..12 + body)
    16  body         msgpack
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import google_crc32c
import msgpack  # type: ignore[import-untyped]

FORMAT_VERSION = 1
"""The only on-disk version this code reads and writes; anything else is refused, never guessed at."""

SEGMENT_MAGIC = b"HQSG"
SEGMENT_HEADER = struct.Struct("<4sHHQ")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + 4  # 20

RECORD_MAGIC = b"HQR" + bytes([FORMAT_VERSION])
RECORD_HEADER = struct.Struct("<4sIQIQI")  # magic, body_len, seq, items, time_ms, body_crc
RECORD_HEADER_SIZE = RECORD_HEADER.size + 4  # 36
MAX_BODY = 1 << 31
"""A length above this is damage, not a record (the writer refuses bodies this large)."""

FRAME_HEADER = struct.Struct("<4sHHI")
FRAME_HEADER_SIZE = FRAME_HEADER.size + 4  # 16

_U32 = struct.Struct("<I")


def crc32c(data: bytes, value: int = 0) -> int:
    # google_crc32c takes only bytes (not memoryview): callers slice bytes, a memcpy at ~10 GB/s.
    return int(google_crc32c.extend(value, data)) if value else int(google_crc32c.value(data))


class FormatError(Exception):
    """A file this code must not read: a newer (or unknown) format version."""


class Corrupt(Exception):
    """A framed file whose bytes do not check out (torn, truncated, garbage)."""


def segment_name(segment_id: int) -> str:
    return f"{segment_id:020d}.seg"


def parse_segment_name(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    if ext != "seg" or not dot or len(stem) != 20 or not stem.isdigit():
        return None
    return int(stem)


def encode_segment_header(segment_id: int) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0, segment_id)
    return head + _U32.pack(crc32c(head))


def check_segment_header(data: bytes, segment_id: int, path: str) -> bool:
    """True for a good header of ``segment_id``; False for a damaged one; FormatError for another version."""
    if len(data) < SEGMENT_HEADER_SIZE:
        return False
    magic, version, _flags, sid = SEGMENT_HEADER.unpack_from(data)
    (crc,) = _U32.unpack_from(data, SEGMENT_HEADER.size)
    if magic != SEGMENT_MAGIC or crc != crc32c(data[: SEGMENT_HEADER.size]):
        return False
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path}: segment format version {version}, this agent reads only version {FORMAT_VERSION};"
            " run the agent version that wrote this queue, or move the directory away"
        )
    return bool(sid == segment_id)


def encode_body(payload: bytes, headers: Mapping[str, str] | None) -> bytes:
    body: bytes = msgpack.packb([dict(headers) if headers else {}, payload], use_bin_type=True)
    return body


def decode_body(body: bytes) -> tuple[dict[str, str], bytes]:
    """(headers, payload); ValueError when the body is not what the writer wrote."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ValueError(f"undecodable record body: {exc}") from exc
    if (
        not isinstance(obj, list)
        or len(obj) != 2
        or not isinstance(obj[0], dict)
        or not isinstance(obj[1], bytes)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj[0].items())
    ):
        raise ValueError("record body has an unexpected shape")
    return obj[0], obj[1]


def encode_record(seq: int, items: int, time_ms: int, body: bytes) -> bytes:
    head = RECORD_HEADER.pack(RECORD_MAGIC, len(body), seq, items, time_ms, crc32c(body))
    return head + _U32.pack(crc32c(head)) + body


@dataclass(frozen=True, slots=True)
class RecordHeader:
    offset: int
    body_len: int
    seq: int
    items: int
    time_ms: int
    body_crc: int

    @property
    def end(self) -> int:
        return self.offset + RECORD_HEADER_SIZE + self.body_len


def parse_record_header(data: bytes, offset: int) -> RecordHeader | None:
    """The header at ``offset`` if its magic and checksum hold, else None."""
    if len(data) - offset < RECORD_HEADER_SIZE or data[offset : offset + 4] != RECORD_MAGIC:
        return None
    (crc,) = _U32.unpack_from(data, offset + RECORD_HEADER.size)
    if crc != crc32c(data[offset : offset + RECORD_HEADER.size]):
        return None
    _magic, body_len, seq, items, time_ms, body_crc = RECORD_HEADER.unpack_from(data, offset)
    if body_len > MAX_BODY:
        return None
    return RecordHeader(offset, body_len, seq, items, time_ms, body_crc)


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes ``[start, end)`` of a segment that hold no valid record.

    ``items``/``seq`` come from a surviving header (a record whose body failed its checksum) and are
    -1 when unknown. ``to_eof``: the damage runs to the end of the file (a torn or garbage tail).
    """

    start: int
    end: int
    items: int
    seq: int
    to_eof: bool


def scan_records(data: bytes, start: int) -> Iterator[RecordHeader | Damage]:
    """Every valid record and every damaged region of ``data`` from ``start``, in file order.

    Policy: a record is valid when its header checksum and its body checksum hold. A bad record is
    skipped by resyncing: when its header holds (so its length is trustworthy) the scan resumes right
    after its body; otherwise it searches forward for the next record magic whose header and body both
    check out. So a bit flip costs one record, not the rest of the segment; garbage or a torn write
    costs only its own bytes. ``bytes.find`` keeps the search at C speed.
    """
    pos = start
    n = len(data)
    view = data
    last_seq = -1
    while pos < n:
        head = parse_record_header(view, pos)
        if (
            head is not None
            and head.end <= n
            and crc32c(view[pos + RECORD_HEADER_SIZE : head.end]) == (head.body_crc)
        ):
            if head.seq > last_seq:
                last_seq = head.seq
                yield head
                pos = head.end
                continue
            head = None  # a seq that goes backwards is stale bytes, not a record of this stream
        bad_start = pos
        items, seq = -1, -1
        if head is not None and head.end <= n:
            # Header intact, body damaged: the length is known, so exactly this record is lost.
            items, seq = head.items, head.seq
            resume = head.end
        else:
            if head is not None:
                items, seq = head.items, head.seq  # body runs past the end: a torn write
            resume = -1
            probe = pos + 1
            while True:
                probe = data.find(RECORD_MAGIC, probe)
                if probe < 0:
                    break
                cand = parse_record_header(view, probe)
                if (
                    cand is not None
                    and cand.end <= n
                    and cand.seq > last_seq
                    and crc32c(view[probe + RECORD_HEADER_SIZE : cand.end]) == cand.body_crc
                ):
                    resume = probe
                    break
                probe += 1
        if resume < 0:
            yield Damage(bad_start, n, items, seq, True)
            return
        yield Damage(bad_start, resume, items, seq, False)
        pos = resume


# --- framed files: the ledger and state files -------------------------------------------------------


def encode_frame(magic: bytes, version: int, obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    head = FRAME_HEADER.pack(magic, version, 0, len(body))
    return head + _U32.pack(crc32c(head + body)) + body


def decode_frame(data: bytes, magic: bytes, version: int, path: str) -> Any:
    """The msgpack object in a framed file; Corrupt for damage, FormatError for another version."""
    if len(data) < FRAME_HEADER_SIZE:
        raise Corrupt(f"{path}: {len(data)} bytes, shorter than the {FRAME_HEADER_SIZE}-byte header")
    got_magic, got_version, _flags, body_len = FRAME_HEADER.unpack_from(data)
    if got_magic != magic:
        raise Corrupt(f"{path}: bad magic {got_magic!r}")
    if len(data) != FRAME_HEADER_SIZE + body_len:
        raise Corrupt(f"{path}: {len(data)} bytes, the header announces {FRAME_HEADER_SIZE + body_len}")
    (crc,) = _U32.unpack_from(data, FRAME_HEADER.size)
    if crc != crc32c(data[: FRAME_HEADER.size] + data[FRAME_HEADER_SIZE:]):
        raise Corrupt(f"{path}: checksum mismatch")
    if got_version != version:
        # The checksum held, so the version is what a writer meant: refuse rather than misparse.
        raise FormatError(
            f"{path}: format version {got_version}, this agent reads only version {version};"
            " run the agent version that wrote it, or move it away"
        )
    try:
        return msgpack.unpackb(data[FRAME_HEADER_SIZE:], raw=False, strict_map_key=False)
    except Exception as exc:
        raise Corrupt(f"{path}: undecodable body: {exc}") from exc


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: write a temp file, fsync it, rename it over, fsync the directory.

    A crash at any point leaves either the old file or the new one, never a mix. ``durable=False``
    skips both fsyncs (atomic against a process crash, not against power loss).
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:  # pragma: no cover - os.write raises rather than returning 0 on a full disk
                raise OSError(errno.EIO, "short write")
            view = view[n:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
