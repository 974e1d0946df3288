"""A file the agent reads again when it changes: bearer tokens (``tokens_file``), JWT keys
(``key_file``, ``jwks_file``).

One ``os.stat`` per check (inode, mtime, size), so it is cheap enough to check on every request and
never needs a task. A change is read once: a broken or missing file keeps what was read before and is
warned about once; the first read (at start) raises instead, so a bad file stops the start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """``read(path)``'s value, read again when the file changes (see the module docs)."""

    __slots__ = ("_log", "_path", "_read", "_state", "_what", "value")

    def __init__(self, path: str, read: Callable[[str], T], what: str, logger: logging.Logger) -> None:
        self._path = path
        self._read = read
        self._what = what
        """What the file holds, for the log lines ("bearer tokens", "JWT keys")."""
        self._log = logger
        self._state: tuple[int, int, int] | None = None
        self.value: T | None = None
        """What was read last; None before the first read."""

    def load(self) -> T:
        """Read the file now; raises OSError or ValueError when it is missing or unusable."""
        self._state = _state_of(self._path)
        value = self.value = self._read(self._path)
        return value

    def refresh(self) -> None:
        """Read the file again when it changed since the last look; keep the previous value (and warn)
        when it is now missing or unusable."""
        try:
            state: tuple[int, int, int] | None = _state_of(self._path)
        except OSError:
            state = None
        if state == self._state:
            return
        self._state = state  # each change is read (and warned about) once
        try:
            if state is None:
                raise OSError(f"{self._path} is missing")
            value = self._read(self._path)
        except (OSError, ValueError) as exc:
            self._log.warning("%s; keeping the previous %s", exc, self._what)
            return
        self.value = value
        self._log.info("reloaded the %s of %s", self._what, self._path)


def _state_of(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)
