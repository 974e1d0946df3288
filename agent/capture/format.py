"""The capture file format, version 1 (described for users in docs/capture-format.md).

A file is a header then records, all integers big-endian::

    magic    8 bytes   b"HWCAPTUR"
    version  u16       FORMAT_VERSION (a reader refuses any other)
    length   u32       of the header JSON that follows
    header   JSON      {"format_version", "agent_version", "start_time_unix_nano", "receivers": {id:
                       {"type", "endpoints": {transport: "host:port" | path}}}, "compression": "none"}
    records  ...       each: u32 length of what follows, u8 kind, u16 length of the meta JSON, the meta
                       JSON, the payload (the rest)

Kinds: DATA (what a receiver took in: meta ``receiver``, ``transport``, ``offset_ns`` since the start
(monotonic), ``time_unix_nano`` (wall), and for requests ``path`` and ``content_type``), GAP (records
dropped because the buffer was full: meta ``dropped_records``, ``dropped_bytes``, ``offset_ns``) and
END (the last record: meta ``reason`` — ``stopped``, ``max_bytes``, ``max_duration`` or ``error``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

MAGIC = b"HWCAPTUR"
FORMAT_VERSION = 1
DATA, GAP, END = 1, 2, 3
KIND_NAMES = {DATA: "data", GAP: "gap", END: "end"}

_PREFIX = struct.Struct(">8sHI")
_RECORD = struct.Struct(">IBH")
MAX_RECORD_BYTES = 256 << 20
"""A record longer than this is taken as a corrupt file (no receiver accepts bodies this large)."""


class CaptureFormatError(ValueError):
    """The file is not a capture, is of a version this agent cannot read, or is cut or corrupt."""


@dataclass(frozen=True)
class Record:
    kind: int
    meta: dict[str, Any]
    payload: bytes = b""

    @property
    def receiver(self) -> str:
        return str(self.meta.get("receiver", ""))

    @property
    def transport(self) -> str:
        return str(self.meta.get("transport", ""))

    @property
    def offset_ns(self) -> int:
        return int(self.meta.get("offset_ns", 0))


@dataclass(frozen=True)
class Header:
    agent_version: str
    start_time_unix_nano: int
    receivers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per receiver id: ``type`` and ``endpoints`` (transport → address) as configured."""
    compression: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "agent_version": self.agent_version,
            "start_time_unix_nano": self.start_time_unix_nano,
            "receivers": self.receivers,
            "compression": self.compression,
        }


def encode_header(header: Header) -> bytes:
    body = json.dumps(header.to_json(), separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body


def encode_record(kind: int, meta: dict[str, Any], payload: bytes = b"") -> bytes:
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    return _RECORD.pack(1 + 2 + len(meta_bytes) + len(payload), kind, len(meta_bytes)) + meta_bytes + payload


def _read_exact(f: BinaryIO, n: int, what: str, path: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CaptureFormatError(f"{path}: cut short in {what} (wanted {n} bytes, found {len(data)})")
    return data


def read_header(f: BinaryIO, path: str = "capture") -> Header:
    """Read and check the header; CaptureFormatError names what is wrong (not a capture, a version
    this reader does not know, a compression it cannot undo)."""
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or not prefix.startswith(MAGIC):
        raise CaptureFormatError(
            f"{path}: not a headwater capture file (no {MAGIC.decode()} magic at the start)"
        )
    _, version, length = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise CaptureFormatError(
            f"{path}: capture format version {version} is not supported by this headwater"
            f" (it reads version {FORMAT_VERSION}); use the headwater that wrote it, or a newer one"
        )
    try:
        doc = json.loads(_read_exact(f, length, "the header", path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptureFormatError(f"{path}: the header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CaptureFormatError(f"{path}: the header is not a JSON object")
    compression = str(doc.get("compression", "none"))
    if compression != "none":
        raise CaptureFormatError(f"{path}: compression {compression!r} is not supported (only 'none')")
    return Header(
        agent_version=str(doc.get("agent_version", "")),
        start_time_unix_nano=int(doc.get("start_time_unix_nano", 0)),
        receivers=dict(doc.get("receivers", {})),
        compression=compression,
    )


def read_records(f: BinaryIO, path: str = "capture") -> Iterator[Record]:
    """The records after the header, in file order. A file cut inside a record (an agent killed while
    writing) ends the iteration with CaptureFormatError after the whole records before it."""
    index = 0
    while True:
        prefix = f.read(_RECORD.size)
        if not prefix:
            return
        if len(prefix) < _RECORD.size:
            raise CaptureFormatError(f"{path}: cut short in record {index}'s prefix")
        length, kind, meta_length = _RECORD.unpack(prefix)
        if length > MAX_RECORD_BYTES or meta_length > length - 3:
            raise CaptureFormatError(f"{path}: record {index} has an impossible length {length}")
        rest = _read_exact(f, length - 3, f"record {index}", path)
        try:
            meta = json.loads(rest[:meta_length])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CaptureFormatError(f"{path}: record {index}'s meta is not valid JSON: {exc}") from None
        yield Record(kind, meta, rest[meta_length:])
        index += 1


def read_file(path: str) -> tuple[Header, list[Record]]:
    with open(path, "rb") as f:
        header = read_header(f, path)
        return header, list(read_records(f, path))
