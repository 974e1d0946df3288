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
from typing import Any, NamedTuple

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
RECORD_HEADER_FULL = struct.Struct("<4sIQIQII")
"""The whole 36-byte record header, head_crc included: one unpack per record on the read paths."""
MAX_BODY = 1 << 31
"""A length above this is damage, not a record (the writer refuses bodies this large)."""

FRAME_HEADER = struct.Struct("<4sHHI")
FRAME_HEADER_SIZE = FRAME_HEADER.size + 4  # 16

_U32 = struct.Struct("<I")


def crc32c(data: bytes, value: int = 0) -> int:
    # google_crc32c takes only bytes (not memoryview): callers slice bytes, a memcpy at ~10 GB/s.
    return int(google_crc32c.extend(value, data)) if value else int(google_crc32c.value(data))


# The C functions themselves, for the per-record paths: the wrapper above costs a Python call per
# checksum, which is a measurable share of a 1 KB record's budget. Both return int.
_crc_value = google_crc32c.value
_crc_extend = google_crc32c.extend


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


_EMPTY_MAP = b"\x92\x80"  # msgpack: a 2-element array, then an empty map


def body_prefix(payload_len: int, headers: Mapping[str, str] | None) -> bytes:
    """The bytes of a record body that precede the payload.

    A body is ``msgpack.packb([headers, payload], use_bin_type=True)``; msgpack's encoding is
    compositional, so it is exactly: the array marker, the packed headers map, the ``bin`` marker
    with its big-endian length, then the payload bytes. Building the prefix by hand lets the writer
    hand the payload to ``writev`` as is (no copy into a msgpack buffer) and skips msgpack entirely
    for the common empty-headers case. The bytes are identical to what msgpack writes (tested), so
    the on-disk format (version 1) does not change.
    """
    if headers:
        packed: bytes = msgpack.packb(dict(headers), use_bin_type=True)
        head = b"\x92" + packed
    else:
        head = _EMPTY_MAP
    if payload_len < 0x100:
        return head + bytes((0xC4, payload_len))
    if payload_len < 0x10000:
        return head + b"\xc5" + payload_len.to_bytes(2, "big")
    return head + b"\xc6" + payload_len.to_bytes(4, "big")


def encode_body(payload: bytes, headers: Mapping[str, str] | None) -> bytes:
    return body_prefix(len(payload), headers) + payload


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


def decode_record_at(data: bytes, at: int, body_len: int, seq: int) -> tuple[dict[str, str], bytes]:
    """(headers, payload) of the record at ``data[at:]``, checked: ValueError saying what is wrong.

    The record must be whole in ``data`` and be the one an index expects (``body_len``, ``seq``); its
    header and body checksums must hold and its body must decode. One call per record on the read
    paths, so the common empty-headers body (``[{}, bin]``) is recognised inline: the payload is
    sliced straight out of ``data`` (one copy) and the checksum runs over the few prefix bytes and
    that slice, instead of copying the body and having msgpack copy the payload again. Any other
    body goes through :func:`decode_body`.
    """
    body_at = at + RECORD_HEADER_SIZE
    end = body_at + body_len
    if len(data) < end:
        raise ValueError("short read")
    magic, got_len, got_seq, _items, _time, b_crc, h_crc = RECORD_HEADER_FULL.unpack_from(data, at)
    if magic != RECORD_MAGIC or h_crc != _crc_value(data[at : at + RECORD_HEADER.size]):
        raise ValueError("header checksum mismatch")
    if got_len != body_len or got_seq != seq:
        raise ValueError(f"header says seq {got_seq} of {got_len} bytes, the index seq {seq} of {body_len}")
    if body_len >= 4 and data[body_at] == 0x92 and data[body_at + 1] == 0x80:
        marker = data[body_at + 2]
        if marker == 0xC4:
            pay_at, n = body_at + 4, data[body_at + 3]
        elif marker == 0xC5:
            pay_at, n = body_at + 5, int.from_bytes(data[body_at + 3 : body_at + 5], "big")
        elif marker == 0xC6:
            pay_at, n = body_at + 7, int.from_bytes(data[body_at + 3 : body_at + 7], "big")
        else:
            pay_at, n = -1, -1
        if pay_at + n == end:
            payload = data[pay_at:end]
            if _crc_extend(_crc_value(data[body_at:pay_at]), payload) != b_crc:
                raise ValueError("body checksum mismatch")
            return {}, payload
    body = data[body_at:end]
    if _crc_value(body) != b_crc:
        raise ValueError("body checksum mismatch")
    return decode_body(body)


def encode_record(seq: int, items: int, time_ms: int, body: bytes) -> bytes:
    head = RECORD_HEADER.pack(RECORD_MAGIC, len(body), seq, items, time_ms, crc32c(body))
    return head + _U32.pack(crc32c(head)) + body


def record_head(seq: int, items: int, time_ms: int, body_len: int, body_crc: int) -> bytes:
    """The 36-byte header of a record whose body checksum is already known (the body is written apart)."""
    head = RECORD_HEADER.pack(RECORD_MAGIC, body_len, seq, items, time_ms, body_crc)
    return head + _U32.pack(_crc_value(head))


class RecordHeader(NamedTuple):
    # A NamedTuple, not a frozen dataclass: the open scan builds one per record, and a frozen
    # dataclass's __init__ (object.__setattr__ per field) costs several times a tuple's.
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
    if len(data) - offset < RECORD_HEADER_SIZE:
        return None
    magic, body_len, seq, items, time_ms, body_crc, crc = RECORD_HEADER_FULL.unpack_from(data, offset)
    if magic != RECORD_MAGIC or crc != _crc_value(data[offset : offset + RECORD_HEADER.size]):
        return None
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
    unpack = RECORD_HEADER_FULL.unpack_from
    while pos < n:
        if n - pos >= RECORD_HEADER_SIZE:
            # Fast path, the same checks as parse_record_header + the body checksum, inlined: a
            # segment of good records costs one unpack and two checksums per record.
            magic, body_len, seq, items, time_ms, b_crc, h_crc = unpack(view, pos)
            end = pos + RECORD_HEADER_SIZE + body_len
            if (
                magic == RECORD_MAGIC
                and end <= n
                and seq > last_seq
                and body_len <= MAX_BODY
                and h_crc == _crc_value(view[pos : pos + RECORD_HEADER.size])
                and b_crc == _crc_value(view[pos + RECORD_HEADER_SIZE : end])
            ):
                last_seq = seq
                yield RecordHeader(pos, body_len, seq, items, time_ms, b_crc)
                pos = end
                continue
        # Something does not check out here: the careful path below classifies it and resyncs.
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
