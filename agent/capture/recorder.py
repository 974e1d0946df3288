"""The recorder: what the receivers' hooks hand over goes to a bounded buffer on the agent's loop, and a
thread of its own drains it to the file (redacting first). Nothing on the loop waits for the disk.

A receiver has a ``capture`` slot, None while no capture runs: one attribute read at its hook (per
datagram drain, stream read or request). While a capture runs the slot holds a :data:`CaptureHook`
(bound to that receiver's id) that stamps the arrival times and appends to a deque:

- at most ``buffer_records`` records wait for the writer; past that a record is dropped and counted,
  and the writer writes a GAP record (how many records and bytes) before the next one it writes;
- the capture ends itself at ``max_bytes`` (the file would grow beyond it) or ``max_duration_s``, or
  when stopped; its last record is END with the reason, and ``on_end(reason)`` is called (from the
  writer thread) so the receivers' slots are cleared.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from agent.capture.format import DATA, END, GAP, Header, encode_header, encode_record
from agent.capture.redact import Redactor

log = logging.getLogger("headwater.capture")

STOPPED, MAX_BYTES, MAX_DURATION, ERROR = "stopped", "max_bytes", "max_duration", "error"
_END_RESERVE = 128
"""Bytes kept free under max_bytes for the END record."""
_WAKE_S = 0.05
"""How often the writer looks at the clock while nothing arrives (the duration bound)."""


class CaptureHook(Protocol):
    def __call__(self, transport: str, payload: bytes, meta: Mapping[str, str] | None = None) -> None:
        """Record ``payload`` as taken in by this hook's receiver over ``transport`` (``udp``, ``tcp``,
        ``unixgram``, ``unix``, ``http``, ``grpc``); ``meta``: ``path`` and ``content_type`` of a
        request. Called on the agent's loop; never blocks, never raises."""


_Item = tuple[str, str, int, int, bytes, Mapping[str, str] | None]


class Recorder:
    """One capture, to ``path``. ``start`` opens the file (raising OSError) and starts the writer;
    ``stop`` is idempotent and returns once the file is complete."""

    def __init__(
        self,
        path: str,
        header: Header,
        *,
        max_bytes: int,
        max_duration_s: float,
        redact: tuple[str, ...] = (),
        buffer_records: int = 10_000,
        on_end: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.path = path
        self.header = header
        self.max_bytes = max_bytes
        self.max_duration_s = max_duration_s
        self._redactor = Redactor(redact)
        self._buffer_records = buffer_records
        self._on_end = on_end
        self._queue: collections.deque[_Item] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ended = False
        """Set once the capture stops taking records (hooks then return at once)."""
        self.reason: str | None = None
        """Why it ended: stopped, max_bytes, max_duration or error."""
        self.error: str | None = None
        self.started_monotonic_ns = 0
        self.records = 0
        """Records written (DATA only)."""
        self.bytes_written = 0
        self.dropped_records = 0
        """Records the buffer had no room for (written as GAP records); counted on the agent's loop."""
        self.dropped_bytes = 0
        self._gap_reported = (0, 0)
        self.by_receiver: dict[str, int] = {}
        """Records written per receiver id (written by the writer thread, read under ``_counts_lock``)."""
        self._counts_lock = threading.Lock()

    # -- the agent's loop ----------------------------------------------------------------------------
    def hook(self, receiver_id: str) -> CaptureHook:
        queue = self._queue
        wake = self._wake
        limit = self._buffer_records
        monotonic_ns = time.monotonic_ns
        time_ns = time.time_ns

        def hook(transport: str, payload: bytes, meta: Mapping[str, str] | None = None) -> None:
            if self.ended:
                return
            if len(queue) >= limit:
                self.dropped_records += 1
                self.dropped_bytes += len(payload)
                return
            queue.append((receiver_id, transport, monotonic_ns(), time_ns(), payload, meta))
            if not wake.is_set():
                wake.set()

        return hook

    # -- lifecycle (any thread) ----------------------------------------------------------------------
    def start(self) -> None:
        f = open(self.path, "wb")  # noqa: SIM115 - owned by the writer thread, closed there
        try:
            head = encode_header(self.header)
            f.write(head)
        except BaseException:
            f.close()
            raise
        self.bytes_written = len(head)
        self.started_monotonic_ns = time.monotonic_ns()
        self._thread = threading.Thread(target=self._run, args=(f,), name="headwater-capture", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def status(self) -> dict[str, Any]:
        elapsed_ns = time.monotonic_ns() - self.started_monotonic_ns if self.started_monotonic_ns else 0
        return {
            "state": "ended" if self.ended else "running",
            "reason": self.reason,
            "error": self.error,
            "path": self.path,
            "receivers": sorted(self.header.receivers),
            "records": self.records,
            "bytes": self.bytes_written,
            "dropped_records": self.dropped_records,
            "dropped_bytes": self.dropped_bytes,
            "elapsed_s": round(elapsed_ns / 1e9, 3),
            "max_bytes": self.max_bytes,
            "max_duration_s": self.max_duration_s,
            "by_receiver": self._by_receiver(),
        }

    def _by_receiver(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self.by_receiver)

    # -- the writer thread ---------------------------------------------------------------------------
    def _run(self, f: Any) -> None:
        deadline = self.started_monotonic_ns + int(self.max_duration_s * 1e9)
        reason = STOPPED
        try:
            while True:
                self._wake.wait(_WAKE_S)
                self._wake.clear()
                stop = self._stop.is_set()
                reason_now = self._drain(f)
                if reason_now is not None:
                    reason = reason_now
                    break
                if stop:
                    break
                if time.monotonic_ns() >= deadline:
                    reason = MAX_DURATION
                    break
        except Exception as exc:  # a full disk: the capture ends, the agent goes on
            log.exception("capture to %s failed", self.path)
            self.error = str(exc)
            reason = ERROR
        self.ended = True
        self.reason = reason
        try:
            self._write_gap(f)
            f.write(encode_record(END, {"reason": reason, "offset_ns": self._offset_ns()}))
        except Exception as exc:
            self.error = self.error or str(exc)
        finally:
            f.close()
        self._queue.clear()
        log.info(
            "capture to %s ended (%s): %d records, %d bytes",
            self.path,
            reason,
            self.records,
            self.bytes_written,
        )
        self._on_end(reason)

    def _offset_ns(self) -> int:
        return time.monotonic_ns() - self.started_monotonic_ns

    def _write_gap(self, f: Any) -> None:
        dropped = (self.dropped_records, self.dropped_bytes)
        if dropped[0] == self._gap_reported[0]:
            return
        meta = {
            "dropped_records": dropped[0] - self._gap_reported[0],
            "dropped_bytes": dropped[1] - self._gap_reported[1],
            "offset_ns": self._offset_ns(),
        }
        record = encode_record(GAP, meta)
        f.write(record)
        self.bytes_written += len(record)
        self._gap_reported = dropped

    def _drain(self, f: Any) -> str | None:
        queue = self._queue
        start = self.started_monotonic_ns
        while queue:
            if self.dropped_records != self._gap_reported[0]:
                self._write_gap(f)
            receiver_id, transport, mono_ns, wall_ns, payload, extra = queue.popleft()
            meta: dict[str, Any] = {
                "receiver": receiver_id,
                "transport": transport,
                "offset_ns": mono_ns - start,
                "time_unix_nano": wall_ns,
            }
            if extra:
                meta.update(extra)
            payload = self._redact(transport, payload, meta)
            record = encode_record(DATA, meta, payload)
            if self.bytes_written + len(record) + _END_RESERVE > self.max_bytes:
                return MAX_BYTES
            f.write(record)
            self.bytes_written += len(record)
            self.records += 1
            with self._counts_lock:  # status() copies it from another thread
                self.by_receiver[receiver_id] = self.by_receiver.get(receiver_id, 0) + 1
        self._write_gap(f)
        f.flush()
        return None

    def _redact(self, transport: str, payload: bytes, meta: dict[str, Any]) -> bytes:
        redactor = self._redactor
        if not redactor.names:
            return payload
        if transport in ("http", "grpc"):
            content_type = str(meta.get("content_type", ""))
            if "json" in content_type:
                rewritten = redactor.json(payload)
            else:
                rewritten = redactor.otlp_protobuf(str(meta.get("path", "")), payload)
            if rewritten is None:
                meta["redaction_failed"] = True
                return b""
            return rewritten
        return redactor.statsd(payload)
