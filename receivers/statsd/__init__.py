"""StatsD / DogStatsD receiver: UDP, TCP, Unix datagram and Unix stream sockets.

Takes the whole dialect (see ``receivers/statsd/parser.py`` for the rules and the refusal reasons),
aggregates per ``flush_interval`` per series, and hands the pipeline one batch of at most
``FLUSH_CHUNK`` points at a time, yielding to the loop between them, so no flush stalls the event loop
(measured with 100k series: ≤ 6 ms to build a chunk, ≤ 8 ms for the Prometheus exporter to take it).
With no transport set, it listens on UDP 127.0.0.1:8125.

Datagram sockets are drained with ``loop.add_reader`` and non-blocking ``recv`` in a bounded loop:
asyncio's stock DatagramProtocol reads into a 256 KiB buffer per datagram and measured ~6× slower here.

Work per loop turn is bounded by the work, not by the datagram count: every source (a datagram socket,
a stream connection) feeds the parser whole lines at most ``_SLICE_BYTES`` at a time and stops once
``_TURN_BUDGET_S`` has passed; what is left of a datagram or a read waits for the next loop turn while
its source is paused (the datagram reader removed, the stream's reading paused), so memory stays at
one datagram or one read per source. The costliest lines (new series, refusals: ~5 µs for ~12 bytes)
make a 4 KiB slice ~2 ms; one line is never cut, and the longest (30,000 packed values in a 60 KB
datagram) costs ~3 ms.

Nothing is taken damaged: a datagram longer than ``max_datagram_size`` (a Unix datagram the kernel
truncated to fit, or a UDP one over a lowered size) is refused whole as ``datagram_truncated`` — counted
once per datagram, since the lines it held are unknown; a stream line longer than
``tcp_max_line_length`` is refused (``line_too_long``) and its connection closed, whether its newline
came in the same read or never; a partial last line is taken only at the client's clean end of stream
(EOF, as ``printf 'x:1|c' | nc`` sends), and refused when the connection was reset
(``connection_reset``) or closed by the agent (``connection_closed``: idle timeout, shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import platform
import socket
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING

from agent import exphist, netguard
from agent.component import Backpressure, ComponentKind, Consumer, Factory, Settings, Signal, Tasks
from agent.confmodel import Duration, Size, parse_host_port
from agent.limits import SeriesLimits
from agent.model import MetricBatch
from agent.netcheck import bind_problem
from receivers.statsd.aggregator import IntervalPart, StatsdAggregator
from receivers.statsd.parser import TAG_ERROR_REASONS

if TYPE_CHECKING:
    from agent.capture.recorder import CaptureHook
    from receivers.statsd.workers import WorkerPool

TYPE = "statsd"

FLUSH_CHUNK = 500
"""Points per batch handed on during a flush: ~5 ms of work at most, so the socket readers keep up."""

_DRAIN_BATCH = 256
"""Datagrams read per wake-up at most (with small ones, ~1 ms)."""
_TURN_BUDGET_S = 0.005
"""Parsing one source does per loop turn, checked after every datagram or slice of lines."""
_GENERIC_SOCKET_ABI = frozenset({"x86_64", "aarch64", "arm64", "riscv64", "ppc64le", "s390x"})
"""Machines whose socket option numbers are asm-generic's (alpha, mips, parisc, sparc differ)."""
_SLICE_BYTES = 4096
"""Lines fed to the parser at a time from a larger datagram or read: ~2 ms of the costliest lines."""
DATAGRAM_TRUNCATED = "datagram_truncated"
LINE_TOO_LONG = "line_too_long"
CONNECTION_RESET = "connection_reset"
CONNECTION_CLOSED = "connection_closed"
_SO_RCVBUFFORCE = 33 if sys.platform == "linux" and platform.machine() in _GENERIC_SOCKET_ABI else None
"""Linux's SO_RCVBUFFORCE (asm-generic/socket.h; Python's socket module does not name it): SO_RCVBUF
past net.core.rmem_max, for a process with CAP_NET_ADMIN. None where the number differs or is absent."""
_MAX_FORCED_BUFFER = 2**30
"""The kernel doubles the value set and keeps it in an int: larger values are clamped to this."""


@dataclass(frozen=True)
class StatsdConfig:
    udp: str | None = None
    """UDP host:port to listen on. With no transport set at all, 127.0.0.1:8125."""
    tcp: str | None = None
    """TCP host:port to listen on (newline-delimited lines)."""
    unixgram: str | None = None
    """Unix datagram socket path (DogStatsD's socket), created with socket_mode; a stale file is replaced."""
    unix: str | None = None
    """Unix stream socket path (newline-delimited lines)."""
    flush_interval: Duration = Duration(10.0)
    """Aggregation interval: every series is flushed as one point per interval."""
    receive_buffer: Size = Size(32 * 2**20)
    """SO_RCVBUF for datagram sockets; capped by net.core.rmem_max unless the agent has CAP_NET_ADMIN."""
    max_datagram_size: Size = Size(65535)
    """Largest datagram taken; a longer one is refused whole (datagram_truncated), one count per datagram."""
    max_buckets: int = 2048
    """Buckets per exponential histogram (timers, histograms, distributions): scale 6 over 32 octaves."""
    max_scale: int = 8
    """Finest scale of those histograms (8: 0.14 % wide buckets, Prometheus' finest native schema)."""
    max_series: int = 100_000
    """Distinct series per flush interval; lines for new series beyond it are refused (series_limit)."""
    max_set_members: int = 100_000
    """Distinct members of one set per flush interval; new ones beyond it are refused (set_member_limit)."""
    max_set_members_total: int = 1_000_000
    """Distinct set members over all sets per interval (~70 B each); more are refused (set_member_limit)."""
    limits: SeriesLimits = field(default_factory=SeriesLimits)
    """Size limits on one series (name, tags, bytes): the shared limits: block of every receiver."""
    gauge_expiration: Duration = Duration(3600.0)
    """How long a gauge's last value is kept as the base for +/- deltas after its last update."""
    tcp_max_line_length: Size = Size(65536)
    """Longest line on TCP/Unix stream; a longer one is refused (line_too_long), its connection closed."""
    tcp_idle_timeout: Duration = Duration(300.0)
    """Close a TCP/Unix stream connection that sent nothing for this long."""
    tcp_max_connections: int = 1024
    """Open TCP/Unix stream connections at most; more are closed at once (connection_limit)."""
    socket_mode: str = "0660"
    """Permissions of the Unix socket files (octal)."""
    workers: str = "1"
    """Processes sharing the UDP/TCP ports (SO_REUSEPORT), merged exactly at each flush; auto: cgroup CPUs."""

    def listeners(self) -> dict[str, str]:
        """Transport → address, with the UDP default when nothing is set."""
        chosen = {
            k: v
            for k, v in (
                ("udp", self.udp),
                ("tcp", self.tcp),
                ("unixgram", self.unixgram),
                ("unix", self.unix),
            )
            if v
        }
        return chosen or {"udp": "127.0.0.1:8125"}

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        for transport in ("udp", "tcp"):
            address = getattr(self, transport)
            if address:
                try:
                    parse_host_port(address)
                except ValueError as exc:
                    problems.append((transport, str(exc)))
        if self.flush_interval < 0.05:
            problems.append(("flush_interval", "must be at least 50ms"))
        if self.max_buckets < 2 or self.max_buckets > 16384:
            problems.append(("max_buckets", "must be between 2 and 16384"))
        if not exphist.MIN_SCALE <= self.max_scale <= exphist.MAX_SCALE:
            problems.append(("max_scale", f"must be between {exphist.MIN_SCALE} and {exphist.MAX_SCALE}"))
        for name in ("max_series", "max_set_members", "max_set_members_total"):
            if getattr(self, name) < 1:
                problems.append((name, "must be at least 1"))
        if self.max_datagram_size < 512:
            problems.append(("max_datagram_size", "must be at least 512B"))
        if self.tcp_max_line_length < 64:
            problems.append(("tcp_max_line_length", "must be at least 64B"))
        if self.tcp_max_connections < 1:
            problems.append(("tcp_max_connections", "must be at least 1"))
        try:
            mode = int(self.socket_mode, 8)
            if mode & ~0o777:
                raise ValueError
        except ValueError:
            problems.append(("socket_mode", f"{self.socket_mode!r} is not an octal file mode like 0660"))
        if self.workers != "auto" and not (self.workers.isdigit() and 1 <= int(self.workers) <= 256):
            problems.append(("workers", f"{self.workers!r} is not a number of processes (1-256) or auto"))
        elif self.workers != "1" and (self.unix or self.unixgram):
            problems.append(
                (
                    "workers",
                    "more than one worker shares UDP and TCP ports only: a Unix socket path cannot be "
                    "shared (SO_REUSEPORT is for IP ports); use a receiver of its own for unix/unixgram",
                )
            )
        problems.extend((f"limits::{path}", message) for path, message in self.limits.validate())
        return problems

    def environment_problems(self) -> list[tuple[str, str]]:
        out = []
        for transport, address in self.listeners().items():
            problem = bind_problem(transport, address)
            if problem:
                out.append((transport, problem))
        return out


def _read_kernel_drops(inode: int, family: int) -> int:
    """The kernel's receive-buffer drop count for one UDP socket (last column of /proc/net/udp[6])."""
    path = "/proc/net/udp6" if family == socket.AF_INET6 else "/proc/net/udp"
    with open(path, encoding="ascii") as f:
        next(f)
        for line in f:
            cols = line.split()
            if len(cols) >= 13 and cols[9] == str(inode):
                return int(cols[12])
    return 0


def _long_line_at(lines: bytes, limit: int) -> int:
    """Where the first line of ``lines`` (whole lines, the last ending in a newline) longer than
    ``limit`` bytes starts, or -1. One ``rfind`` per window of ``limit`` + 1 bytes, not one per line."""
    start = 0
    last = len(lines) - 1
    while last - start > limit:
        newline = lines.rfind(b"\n", start, start + limit + 1)
        if newline < 0:
            return start
        start = newline + 1
    return -1


class _StreamProtocol(asyncio.Protocol):
    """One TCP / Unix stream connection: whole lines go to the aggregator in bounded slices, not per
    line; a read whose lines outlast the turn budget pauses reading until they are parsed."""

    def __init__(self, receiver: StatsdReceiver, transport: str = "tcp") -> None:
        self._r = receiver
        self._kind = transport
        """``tcp`` or ``unix``: how a capture (agent.capture) records what this connection reads."""
        self._buf = b""
        """The last line, not yet terminated."""
        self._lines = b""
        """Whole lines received and not yet parsed (reading is paused meanwhile)."""
        self._resume: asyncio.Handle | None = None
        self._transport: asyncio.Transport | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._last = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        r = self._r
        # The process-wide descriptor budget (agent/netguard.py) as well as our own cap.
        if len(r.connections) >= r.config.tcp_max_connections or not netguard.fd_budget().acquire():
            r.tel.refused("connection_limit").value += 1
            transport.abort()
            return
        self._transport = transport
        r.connections.add(self)
        self._schedule_idle()

    def _schedule_idle(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle = loop.call_at(self._last + self._r.config.tcp_idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        if self._transport is None:
            return
        if time.monotonic() - self._last >= self._r.config.tcp_idle_timeout:
            self._r.tel.counter(
                "receiver_closed_connections_total",
                "Stream connections closed by the receiver.",
                reason="idle",
            ).value += 1
            self.close()
        else:
            self._schedule_idle()

    def data_received(self, data: bytes) -> None:
        self._last = time.monotonic()
        capture = self._r.capture
        if capture is not None:
            capture(self._kind, data)
        limit = self._r.config.tcp_max_line_length
        buf = self._buf + data if self._buf else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            self._buf = buf
            if len(buf) > limit:
                self._line_too_long(b"")
            return
        lines = buf[: cut + 1]
        self._buf = buf[cut + 1 :]
        if cut > limit:  # only then can one of the lines be over the limit
            at = _long_line_at(lines, limit)
            if at >= 0:
                self._line_too_long(lines[:at])
                return
        self._feed(lines)
        if len(self._buf) > limit:
            self._line_too_long(b"")

    def _line_too_long(self, before: bytes) -> None:
        """Take the lines before the long one, refuse it, close: what follows it is not read."""
        if before:
            self._feed(before)
        self._buf = b""
        self._r.refuse(LINE_TOO_LONG)
        self.close()

    def _feed(self, lines: bytes) -> None:
        if self._lines:  # a backlog already (not expected: reading is paused while there is one)
            self._lines += lines
            return
        rest = self._r.feed_until(lines, perf_counter() + _TURN_BUDGET_S)
        self._r.sync_counts()
        if rest:
            self._lines = rest
            if self._transport is not None:
                self._transport.pause_reading()
            self._resume = asyncio.get_running_loop().call_soon(self._continue)
            self._r.backlogs.add(self)

    def _continue(self) -> None:
        self._resume = None
        self._lines = self._r.feed_until(self._lines, perf_counter() + _TURN_BUDGET_S)
        self._r.sync_counts()
        if self._lines:
            self._resume = asyncio.get_running_loop().call_soon(self._continue)
            return
        self._r.backlogs.discard(self)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def finish(self) -> None:
        """Parse what was received whole and is still waiting, at once (shutdown)."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._lines:
            self._r.feed(self._lines)
            self._lines = b""
        self._r.backlogs.discard(self)

    def eof_received(self) -> bool | None:
        if self._buf:
            self._r.feed(self._buf)  # the client ended its stream cleanly: its last line counts
            self._buf = b""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._buf:
            # Not ended by the client's EOF: the line may be cut anywhere, so it is refused, counted.
            self._r.refuse(CONNECTION_RESET if exc is not None else CONNECTION_CLOSED)
            self._buf = b""
        if self in self._r.connections:
            netguard.fd_budget().release()
        self._r.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _DatagramReader:
    """One datagram socket (UDP, Unix): drained with non-blocking ``recv`` from ``loop.add_reader``.

    A datagram is read with one byte more room than ``max_datagram_size``, so a longer one (which
    the kernel truncates to the room given) comes back one byte too long and is refused whole: as
    cheap as the plain ``recv`` (~0.5 µs; ``recvmsg`` with its MSG_TRUNC flag ~0.64 µs, ``recv_into``
    a preallocated buffer plus the copy ~0.66 µs, measured here on Unix datagrams of 1.3 KB).
    """

    def __init__(self, receiver: StatsdReceiver, sock: socket.socket, address: str) -> None:
        self._r = receiver
        self.sock = sock
        self._address = address
        self._kind = "unixgram" if sock.family == socket.AF_UNIX else "udp"
        """How a capture (agent.capture) records this socket's datagrams."""
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._rest = b""
        """What is left of a datagram cut at the turn budget; the reader is off until it is parsed."""
        self._resume: asyncio.Handle | None = None

    def start(self) -> None:
        self._loop.add_reader(self._fd, self.drain)

    def drain(self) -> None:
        # Hoisted: the loop below runs once per datagram (~3 µs of work with a 20-line packet).
        r = self._r
        recv = self.sock.recv
        size = r.config.max_datagram_size
        room = size + 1
        feed = r.agg.feed
        feed_until = r.feed_until
        capture = r.capture  # None while no capture runs (agent.capture): one read per drain
        kind = self._kind
        n = truncated = 0
        rest = b""
        deadline = perf_counter() + _TURN_BUDGET_S
        try:
            while n < _DRAIN_BATCH:
                data = recv(room)
                n += 1
                length = len(data)
                if length > size:
                    truncated += 1
                    continue
                if capture is not None:
                    capture(kind, data)
                if length > _SLICE_BYTES:
                    rest = feed_until(data, deadline)
                    if rest:
                        break
                else:
                    feed(data)
                # Checked after every datagram: a datagram of new series costs ~2 ms, not ~20 µs.
                if perf_counter() > deadline:
                    break
        except BlockingIOError:
            pass
        except OSError as exc:
            r.log.warning("read error on %s: %s", self._address, exc)
        self._end_turn(n, truncated, rest)

    def _end_turn(self, n: int, truncated: int, rest: bytes) -> None:
        """Counts a drain's ``n`` datagrams (``truncated`` of them refused) once, and parks the reader
        while ``rest`` (a datagram cut at the turn budget) is parsed in later turns."""
        r = self._r
        r.packets.value += n
        if truncated:
            r.refuse(DATAGRAM_TRUNCATED, truncated)
        r.sync_counts()
        if rest:
            self._rest = rest
            self._loop.remove_reader(self._fd)
            self._resume = self._loop.call_soon(self._continue)

    def _continue(self) -> None:
        self._resume = None
        self._rest = self._r.feed_until(self._rest, perf_counter() + _TURN_BUDGET_S)
        self._r.sync_counts()
        if self._rest:
            self._resume = self._loop.call_soon(self._continue)
        else:
            self._loop.add_reader(self._fd, self.drain)

    def stop(self) -> None:
        """Stop reading; parse what is left of a datagram and what the kernel still holds; close."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        else:
            self._loop.remove_reader(self._fd)
        r = self._r
        if self._rest:
            r.feed(self._rest)
            self._rest = b""
        size = r.config.max_datagram_size
        with contextlib.suppress(OSError):
            while True:
                data = self.sock.recv(size + 1)
                if len(data) > size:
                    r.refuse(DATAGRAM_TRUNCATED)
                else:
                    r.feed(data)
        self.sock.close()


class StatsdReceiver:
    reuse_port = False
    """Bind UDP and TCP ports with SO_REUSEPORT (worker processes share them)."""
    reader_class = _DatagramReader

    def __init__(
        self, settings: Settings, config: StatsdConfig, consumers: Mapping[Signal, Consumer]
    ) -> None:
        self.settings = settings
        self.config = config
        self.tel = settings.telemetry
        self.log = settings.logger
        self._consumer = consumers.get(Signal.METRICS)
        self._logs = consumers.get(Signal.LOGS)
        """Events and service checks go here as log records when the receiver is in a logs pipeline."""
        self.agg = StatsdAggregator(
            max_buckets=config.max_buckets,
            max_scale=config.max_scale,
            max_series=config.max_series,
            gauge_idle_flushes=max(1, round(config.gauge_expiration / config.flush_interval)),
            max_set_members=config.max_set_members,
            max_set_members_total=config.max_set_members_total,
            limits=config.limits,
        )
        self._readers: list[_DatagramReader] = []
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self.connections: set[_StreamProtocol] = set()
        self.backlogs: set[_StreamProtocol] = set()
        """Connections with whole lines still to parse (reading paused), finished at shutdown."""
        self._tasks = Tasks(str(settings.id), settings.logger)
        self.capture: CaptureHook | None = None
        """Set while a capture records this receiver (agent.capture); read once per drain or read."""
        self._interval_start_ns = time.time_ns()
        self._started = False
        self._stopped = False
        self._accepted = self.tel.accepted()
        self._refused_cells: dict[str, object] = {}
        self._transport_refusals = {
            reason: self.tel.refused(reason)
            for reason in (DATAGRAM_TRUNCATED, LINE_TOO_LONG, CONNECTION_RESET, CONNECTION_CLOSED)
        }
        """Refusals counted by the transports (the parser's are synced from ``agg.refused``)."""
        self._tag_errors = {
            reason: self.tel.counter(
                "receiver_tag_errors_total",
                "Tags dropped from StatsD lines that were kept (malformed_tag, unbalanced_brackets).",
                reason=reason,
            )
            for reason in TAG_ERROR_REASONS
        }
        self.packets = self.tel.counter("receiver_datagrams_total", "Datagrams read from the socket.")
        self._gauges_forgotten = self.tel.counter(
            "receiver_forgotten_gauges_total",
            "Gauge bases (last values kept for +/- deltas) forgotten early: more than max_series were kept.",
        )
        self._events = self.tel.counter(
            "receiver_dropped_points_total",
            "Accepted items the receiver could not pass on, by reason.",
            reason="no_logs_pipeline",
        )
        self._no_metrics = self.tel.counter(
            "receiver_dropped_points_total",
            "Accepted items the receiver could not pass on, by reason.",
            reason="no_metrics_pipeline",
        )
        self.tel.gauge(
            "receiver_series",
            "Series aggregated in the current flush interval.",
            lambda: self.agg.series_count,
        )
        self.pool: WorkerPool | None = None
        """The worker processes, when ``workers`` asks for more than one (receivers/statsd/workers.py)."""
        if config.workers != "1" and not self.reuse_port:
            from receivers.statsd.workers import WorkerPool, worker_count  # subclasses this module's

            count = worker_count(config.workers)
            if count > 1:
                self.pool = WorkerPool(self, count)

    # -- counting: once per drain or chunk, never per line ---------------------------------------------
    def sync_counts(self) -> None:
        agg = self.agg
        self._accepted.value = agg.accepted
        self._gauges_forgotten.value = agg.gauges_forgotten
        if agg.tag_errors:
            for reason, n in agg.tag_errors.items():
                self._tag_errors[reason].value = n
        if agg.refused:
            for reason, n in agg.refused.items():
                cell = self._refused_cells.get(reason)
                if cell is None:
                    cell = self._refused_cells[reason] = self.tel.refused(reason)
                cell.value = n  # type: ignore[attr-defined]

    def refuse(self, reason: str, n: int = 1) -> None:
        """Count ``n`` refusals a transport decided (truncated datagram, long line, cut connection)."""
        self._transport_refusals[reason].value += n

    def feed(self, data: bytes) -> None:
        """Parse all of ``data`` now, whatever it costs (tests, a client's last line, shutdown)."""
        self.agg.feed(data)
        self.sync_counts()

    def feed_until(self, packet: bytes, deadline: float) -> bytes:
        """Parse the whole lines of ``packet``, at most ``_SLICE_BYTES`` at a time, until all are parsed
        (returns b"") or ``perf_counter()`` passes ``deadline`` (returns the lines left). A line
        longer than a slice is parsed whole. The caller syncs the counts."""
        feed = self.agg.feed
        end = len(packet)
        pos = 0
        while end - pos > _SLICE_BYTES:
            cut = packet.rfind(b"\n", pos, pos + _SLICE_BYTES)
            if cut < 0:
                cut = packet.find(b"\n", pos + _SLICE_BYTES)
                if cut < 0:
                    cut = end
            feed(packet[pos:cut])
            pos = cut + 1
            if perf_counter() > deadline:
                return packet[pos:]
        if pos < end:
            feed(packet[pos:] if pos else packet)
        return b""

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._started = True
        if self.pool is not None:
            await self.pool.start()
            self.log.info("%d workers listening on %s", len(self.pool.pids), self.config.listeners())
        for transport, address in self.config.listeners().items() if self.pool is None else ():
            if transport == "udp":
                host, port = parse_host_port(address)
                family, _, _, _, sockaddr = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
                sock = socket.socket(family, socket.SOCK_DGRAM)
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(sockaddr)
                self._add_datagram(sock, address)
                self.tel.counter_reader(
                    "receiver_udp_kernel_drops_total",
                    "Datagrams the kernel dropped because our receive buffer was full (/proc/net/udp).",
                    functools.partial(_read_kernel_drops, os.fstat(sock.fileno()).st_ino, family),
                )
            elif transport == "unixgram":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._bind_unix(sock, address)
                self._add_datagram(sock, address)
            elif transport == "tcp":
                host, port = parse_host_port(address)
                server = await loop.create_server(
                    lambda: _StreamProtocol(self), host, port, reuse_address=True, reuse_port=self.reuse_port
                )
                self._servers.append(server)
            elif transport == "unix":
                self._remove_stale(address)
                server = await loop.create_unix_server(lambda: _StreamProtocol(self, "unix"), address)
                os.chmod(address, int(self.config.socket_mode, 8))
                self._unix_paths.append(address)
                self._servers.append(server)
            self.log.info("listening on %s %s", transport, address)
        self._interval_start_ns = time.time_ns()
        self.start_flushing()
        self.settings.ready()

    def start_flushing(self) -> None:
        """Start the flush loop (a worker process leaves flushing to the main process)."""
        self._tasks.spawn(self._flush_loop(), "flush")

    def _remove_stale(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
            else:
                raise OSError(f"{path} exists and is not a socket; refusing to replace it")

    def _bind_unix(self, sock: socket.socket, path: str) -> None:
        self._remove_stale(path)
        sock.bind(path)
        os.chmod(path, int(self.config.socket_mode, 8))
        self._unix_paths.append(path)

    def _add_datagram(self, sock: socket.socket, address: str) -> None:
        sock.setblocking(False)
        wanted = self.config.receive_buffer
        with contextlib.suppress(OSError, OverflowError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux reports twice the size set
        if got < wanted and _SO_RCVBUFFORCE is not None:
            # Capped by net.core.rmem_max. With CAP_NET_ADMIN, SO_RCVBUFFORCE passes the cap, as rsyslog's
            # imudp does: the buffer is what absorbs a burst or a descheduled moment (208 KiB, Linux's
            # stock cap, is ~2 ms of 20-line datagrams at 800k lines/s). Without the capability: EPERM.
            with contextlib.suppress(OSError, OverflowError):
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, min(wanted, _MAX_FORCED_BUFFER))
            forced = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
            if forced > got:
                self.log.info(
                    "receive buffer for %s is %d bytes, above net.core.rmem_max (%d): set with "
                    "SO_RCVBUFFORCE (CAP_NET_ADMIN)",
                    address,
                    forced,
                    got,
                )
                got = forced
        if got < wanted:
            self.log.warning(
                "receive buffer for %s is %d bytes, not the %d asked for: the kernel caps it at "
                "net.core.rmem_max; raise it (sysctl -w net.core.rmem_max=%d) or run with CAP_NET_ADMIN "
                "to absorb bursts without loss",
                address,
                got,
                wanted,
                wanted,
            )
        reader = self.reader_class(self, sock, address)
        self._readers.append(reader)
        reader.start()

    async def _flush_loop(self) -> None:
        interval = self.config.flush_interval
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            if next_at < time.monotonic():  # a flush overran a whole interval: skip ahead, never burst
                next_at = time.monotonic() + interval
            await self.flush()

    async def flush(self) -> None:
        """Hand the current interval to the pipeline, one bounded chunk at a time (with workers: their
        intervals merged into one first)."""
        parts = await self.pool.collect() if self.pool is not None and not self._stopped else []
        await self._flush(parts)

    async def _flush(self, parts: list[IntervalPart]) -> None:
        start_ns, end_ns = self._interval_start_ns, time.time_ns()
        self._interval_start_ns = end_ns
        interval = self.agg.swap()
        if parts:
            self.agg.absorb(interval, parts)
        for chunk in self.agg.build(interval, start_ns, end_ns, chunk_size=FLUSH_CHUNK):
            if chunk:
                if self._consumer is None:
                    self._no_metrics.value += len(chunk)
                    continue
                try:
                    await self._consumer.consume(MetricBatch(tuple(chunk)))
                except Backpressure as exc:
                    self.tel.refused(f"backpressure_{exc.reason}").value += len(chunk)
            await asyncio.sleep(0)  # let the socket readers run between chunks
        events = self.agg.take_events()
        logs = self._logs
        if events and logs is None:
            self._events.value += len(events)  # accepted, but no logs pipeline takes them: counted
        elif events and logs is not None:
            from receivers.statsd.events import to_log_batch  # the OTLP classes only when logs are wired

            try:
                await logs.consume(to_log_batch(events, end_ns))
            except Backpressure as exc:
                self.tel.refused(f"backpressure_{exc.reason}").value += len(events)
        self.sync_counts()

    async def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        # Parse what was received whole and what the kernel already holds, then flush the last interval.
        for conn in list(self.backlogs):
            conn.finish()
        for reader in self._readers:
            reader.stop()
        await self._tasks.close()
        parts = await self.pool.stop() if self.pool is not None else []
        if self._started:
            await self._flush(parts)
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.tel.telemetry.unregister_gauges(receiver=self.tel.id)


def _create(settings: Settings, config: StatsdConfig, consumers: Mapping[Signal, Consumer]) -> StatsdReceiver:
    return StatsdReceiver(settings, config, consumers)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.RECEIVER,
    config_class=StatsdConfig,
    create=_create,
    signals=frozenset({Signal.METRICS, Signal.LOGS}),
    description="StatsD and DogStatsD over UDP, TCP and Unix sockets, aggregated per flush interval.",
)
