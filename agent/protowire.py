"""Protobuf wire primitives for the exporters' hand encoders (OTLP, remote-write): varints, ZigZag,
length-delimited fields and packed varints.

The hand encoders exist because building messages through the generated classes costs several
microseconds per point (STYLE.md, 12); their tests decode what they write with the generated classes.
These helpers sit on their hot paths: lengths and counts are nearly always below 2**14, so their
varints come from a table (a tuple index beats the loop), and callers may index :data:`SMALL_VARINTS`
directly where the value is known to be small.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt


def encode_uvarint(n: int) -> bytes:
    """Base-128 varint of a non-negative int below 2**64 (the reference: no table)."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


SMALL_VARINTS: tuple[bytes, ...] = tuple(encode_uvarint(n) for n in range(1 << 14))
"""The varint of each int below 2**14, by index."""
_SMALL_VARINT_LIMIT = len(SMALL_VARINTS)


def uvarint(n: int) -> bytes:
    """Varint of a non-negative int below 2**64 (a length, a count)."""
    return SMALL_VARINTS[n] if n < _SMALL_VARINT_LIMIT else encode_uvarint(n)


def int64_varint(n: int) -> bytes:
    """Varint of an int64 field: negatives are written as their 64-bit two's complement (10 bytes)."""
    return uvarint(n) if n >= 0 else encode_uvarint(n + (1 << 64))


cached_int64_varint = functools.lru_cache(maxsize=1024)(int64_varint)
""":func:`int64_varint` for values that repeat, such as the few timestamps of one flush."""


def zigzag(n: int) -> int:
    """ZigZag mapping of a sint32/sint64 value (0, -1, 1, -2 … → 0, 1, 2, 3 …)."""
    return (n << 1) ^ (n >> 63)


def field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: its tag, the body's length, the body."""
    return tag + uvarint(len(body)) + body


_VARINT_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)
_VARINT_COLUMNS = np.arange(10)


def packed_uvarints(values: npt.NDArray[np.uint64]) -> bytes:
    """The varints of ``values`` back to back (a packed repeated uint64), built with numpy."""
    if not values.size:
        return b""
    if int(values.max()) < 0x80:  # the common case: every count fits one byte, the byte is the value
        return values.astype(np.uint8).tobytes()
    groups = (values[:, None] >> _VARINT_SHIFTS[None, :]) & np.uint64(0x7F)
    lengths = 1 + (values[:, None] >= (np.uint64(1) << _VARINT_SHIFTS[None, 1:])).sum(axis=1)
    used = _VARINT_COLUMNS[None, :] < lengths[:, None]
    more = _VARINT_COLUMNS[None, :] < (lengths - 1)[:, None]
    encoded = (groups | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8)
    out: bytes = encoded[used].tobytes()  # row-major: each value's bytes in order, values in order
    return out
