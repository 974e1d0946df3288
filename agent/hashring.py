"""A consistent-hash ring: which member owns a key, so a membership change moves only ~1/N of the keys.

Each member is placed at :data:`VIRTUAL_NODES` points of a 64-bit circle (the blake2b hash of
``"<member>#<i>"``); a key belongs to the member of the first point at or after the key's own hash,
wrapping around. Adding a member takes over the arcs in front of its points (about 1/N of the keys,
all from the others); removing one hands its arcs to the members after them, nothing else moves.

Why a ring: the owner of a key is a bisect over the sorted points (O(log(N·V))), cheap enough per
span when routing by trace ID, where rendezvous hashing costs N hashes a key. Jump hashing only
allows removing the last bucket, not any member. With 256 virtual nodes the members' shares stay within
a few percent of 1/N (measured in tests/exporters/test_loadbalancing_ring.py).

Hashes are blake2b, not Python's ``hash()`` (salted per process): every agent computes the same owner
for a key, which is the point of the ring.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

VIRTUAL_NODES = 256
"""Points each member takes on the circle."""


def stable_hash(data: bytes) -> int:
    """A 64-bit hash of ``data`` that is the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class HashRing:
    """An immutable ring over ``members`` (strings, e.g. host:port); build a new one on a change."""

    __slots__ = ("_owners", "_points", "members")

    def __init__(self, members: Iterable[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.members: tuple[str, ...] = tuple(sorted(set(members)))
        placed = sorted(
            (stable_hash(f"{member}#{i}".encode()), member)
            for member in self.members
            for i in range(virtual_nodes)
        )
        self._points = [h for h, _ in placed]
        self._owners = [m for _, m in placed]

    def __len__(self) -> int:
        return len(self.members)

    def owner(self, key_hash: int) -> str:
        """The member owning a key whose :func:`stable_hash` is ``key_hash``; raises LookupError on an
        empty ring."""
        if not self._points:
            raise LookupError("the ring has no members")
        i = bisect.bisect_left(self._points, key_hash)
        return self._owners[i if i < len(self._owners) else 0]
