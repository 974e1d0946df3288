"""Capture and replay: record what the receivers take in (``headwater capture``, ``/api/capture``) and
send it again (``headwater replay``). The file format: :mod:`agent.capture.format` and
docs/capture-format.md; the recorder and its bounds: :mod:`agent.capture.recorder`; redaction:
:mod:`agent.capture.redact`; the sender: :mod:`agent.capture.replay`.

Receivers that can be captured have a ``capture`` attribute (None while off): statsd (UDP and Unix
datagrams, TCP and Unix stream reads), otlp (HTTP and gRPC request bodies, after decompression, with
their path and content type) and http (POST bodies after decompression, with path and content type).
Headers are never recorded (so no bearer token or Authorization header ever is).

:class:`CaptureControl` is what the telemetry endpoint drives (from its own thread): one capture at a
time, to a file in ``service.telemetry.capture.directory``; the receivers' slots are set and cleared
on the agent's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent.capture.format import Header
from agent.capture.recorder import CaptureHook, Recorder
from agent.config import CaptureConfig
from agent.version import VERSION

if TYPE_CHECKING:
    from agent.service import Agent

__all__ = ["CaptureControl", "CaptureHook", "CaptureRefused", "endpoints_of"]


MIN_BYTES = 1024
"""The smallest max_bytes a capture may be started with (room for the header and the END record)."""


class CaptureRefused(Exception):
    """A start or download the endpoint refuses: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def endpoints_of(type_: str, instance: Any) -> dict[str, str]:
    """Transport → address a receiver listens on (ports chosen by the kernel filled in when known)."""
    config = getattr(instance, "config", None)
    if config is None:
        return {}
    if type_ == "statsd":
        return dict(config.listeners())
    if type_ == "otlp":
        found = {}
        for transport, port_attr in (("http", "http_port"), ("grpc", "grpc_port")):
            address = getattr(config, transport, None)
            if address:
                port = getattr(instance, port_attr, None)
                host = address.rpartition(":")[0]
                found[transport] = f"{host}:{port}" if port else address
        return found
    if type_ == "http":
        port = getattr(instance, "port", None)
        host = config.endpoint.rpartition(":")[0]
        return {"http": f"{host}:{port}" if port else config.endpoint}
    return {}


class CaptureControl:
    """One capture at a time over ``agent``'s receivers (see the module docs). Thread-safe."""

    def __init__(self, agent: Agent, loop: asyncio.AbstractEventLoop) -> None:
        self._agent = agent
        self._loop = loop
        """The agent's loop: receivers' slots are set there."""
        self._lock = threading.Lock()
        self.recorder: Recorder | None = None
        self._chosen: list[str] = []
        self._hooked: list[Any] = []
        """The receiver instances the running capture's hooks are on (a reload may replace them)."""
        agent.watch_graph(self.rehook)

    @property
    def config(self) -> CaptureConfig:
        return self._agent.config.service.telemetry.capture

    def attach(self, agent: Agent) -> None:
        """Another agent: later captures hook its receivers."""
        self._agent = agent
        agent.watch_graph(self.rehook)

    def rehook(self) -> None:
        """After a reload, on the agent's loop: a running capture's receivers that the reload replaced
        get its hook on their new instances (the old ones are stopped)."""
        with self._lock:
            recorder = self.recorder
            if recorder is None or recorder.ended:
                return
            capturable = self._capturable()
            hooked = {id(instance) for instance in self._hooked}
            current: list[Any] = []
            for rid in self._chosen:
                entry = capturable.get(rid)
                if entry is None:  # removed by the reload: nothing more to record from it
                    continue
                instance = entry[1]
                if id(instance) not in hooked:
                    instance.capture = recorder.hook(rid)
                current.append(instance)
            self._hooked = current

    def _capturable(self) -> dict[str, tuple[str, Any]]:
        return {
            rid: (type_, instance)
            for rid, (type_, instance) in self._agent.receiver_instances().items()
            if hasattr(instance, "capture")
        }

    def start(
        self, receivers: Sequence[str] = (), max_bytes: int | None = None, max_duration_s: float | None = None
    ) -> dict[str, Any]:
        """Start a capture of ``receivers`` (every capturable one when empty); CaptureRefused (409 one
        runs, 400 bad arguments) or OSError (the file)."""
        cfg = self.config
        max_bytes = cfg.max_bytes if max_bytes is None else max_bytes
        max_duration_s = cfg.max_duration if max_duration_s is None else max_duration_s
        if not MIN_BYTES <= max_bytes <= cfg.max_bytes:
            raise CaptureRefused(
                400,
                f"max_bytes {max_bytes} is out of range: {MIN_BYTES} to {cfg.max_bytes}"
                " (service.telemetry.capture.max_bytes)",
            )
        if not 0 < max_duration_s <= cfg.max_duration:
            raise CaptureRefused(
                400,
                f"max_duration_s {max_duration_s:g} is out of range: above 0 up to {cfg.max_duration:g}"
                " (service.telemetry.capture.max_duration)",
            )
        with self._lock:
            if self.recorder is not None and not self.recorder.ended:
                raise CaptureRefused(
                    409, "a capture is already running: stop it first (POST /api/capture/stop)"
                )
            capturable = self._capturable()
            chosen = list(receivers) or sorted(capturable)
            unknown = [r for r in chosen if r not in capturable]
            if unknown:
                raise CaptureRefused(
                    400,
                    f"receivers {', '.join(unknown)} cannot be captured: capturable are"
                    f" {', '.join(sorted(capturable)) or 'none'}",
                )
            pooled = [r for r in chosen if getattr(capturable[r][1], "pool", None) is not None]
            if pooled:
                raise CaptureRefused(
                    400,
                    f"receivers {', '.join(pooled)} run worker processes (workers > 1) that read the sockets"
                    " themselves: capture a receiver with workers: 1",
                )
            if not chosen:
                raise CaptureRefused(
                    400, "this agent has no receiver that can be captured (statsd, otlp, http)"
                )
            directory = cfg.directory or tempfile.gettempdir()
            path = os.path.join(directory, f"headwater-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.hwcap")
            header = Header(
                agent_version=VERSION,
                start_time_unix_nano=time.time_ns(),
                receivers={
                    rid: {"type": capturable[rid][0], "endpoints": endpoints_of(*capturable[rid])}
                    for rid in chosen
                },
            )
            old = self.recorder
            if old is not None:
                _remove(old.path)
            instances = [capturable[rid][1] for rid in chosen]
            recorder = Recorder(
                path,
                header,
                max_bytes=max_bytes,
                max_duration_s=max_duration_s,
                redact=cfg.redact,
                buffer_records=cfg.buffer_records,
                on_end=lambda reason: self._unhook(self._hooked),
            )
            recorder.start()
            self.recorder = recorder
            self._chosen = chosen
            self._hooked = instances
            hooks = {
                id(instance): recorder.hook(rid) for rid, instance in zip(chosen, instances, strict=True)
            }
            self._set_slots([(instance, hooks[id(instance)]) for instance in instances])
            return recorder.status()

    def _set_slots(self, pairs: list[tuple[Any, CaptureHook | None]]) -> None:
        def apply() -> None:
            for instance, hook in pairs:
                instance.capture = hook

        with contextlib.suppress(RuntimeError):  # the agent's loop is closed: nothing receives any more
            self._loop.call_soon_threadsafe(apply)

    def _unhook(self, instances: list[Any]) -> None:
        self._set_slots([(instance, None) for instance in instances])

    def stop(self) -> dict[str, Any]:
        """Stop the running capture (no-op when none runs) and return its final status."""
        recorder = self.recorder
        if recorder is None:
            raise CaptureRefused(404, "no capture was started")
        recorder.stop()
        return recorder.status()

    def status(self) -> dict[str, Any]:
        recorder = self.recorder
        if recorder is None:
            return {"state": "idle"}
        return recorder.status()

    def download_path(self) -> str:
        recorder = self.recorder
        if recorder is None:
            raise CaptureRefused(404, "no capture was started")
        if not recorder.ended:
            raise CaptureRefused(409, "the capture is still running: stop it first (POST /api/capture/stop)")
        return recorder.path

    def close(self) -> None:
        """Agent shutdown: end a running capture (its file stays complete)."""
        recorder = self.recorder
        if recorder is not None:
            recorder.stop()


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
