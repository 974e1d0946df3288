"""Small side state persisted beside the queue (remote-write's per-series cumulative counters).

The file is replaced atomically (temp, fsync, rename, fsync dir) in the same framed format as the
ledger, versioned, msgpack inside. :meth:`StateFile.load` never raises for damage: a torn or garbage
file gives an empty state, counted in ``corrupt_loads`` and logged. Another format version is refused.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from agent.diskqueue.format import Corrupt, FormatError, decode_frame, encode_frame, write_atomic
from agent.diskqueue.partition import UnsupportedFormat

log = logging.getLogger("headwater.diskqueue")

STATE_MAGIC = b"HQST"
STATE_VERSION = 1


class StateFile:
    """One state file. Not thread-safe: use it from one thread (``save`` blocks: call it in a worker)."""

    def __init__(self, path: str, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        self.corrupt_loads = 0
        self.saves = 0

    def load(self) -> dict[str, Any]:
        """The saved state; ``{}`` when there is none or it is damaged (counted, logged)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {}
        try:
            obj = decode_frame(data, STATE_MAGIC, STATE_VERSION, self.path)
        except FormatError as exc:
            raise UnsupportedFormat(str(exc)) from None
        except Corrupt as exc:
            self.corrupt_loads += 1
            log.warning("%s; starting from an empty state", exc)
            return {}
        if not isinstance(obj, dict):
            self.corrupt_loads += 1
            log.warning("%s: state is not a map; starting from an empty state", self.path)
            return {}
        return obj

    def save(self, state: dict[str, Any]) -> None:
        """Replace the file with ``state`` (msgpack types: str/bytes keys, numbers, lists, maps)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        write_atomic(self.path, encode_frame(STATE_MAGIC, STATE_VERSION, state), durable=self.durable)
        self.saves += 1
