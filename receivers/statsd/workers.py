"""StatsD worker processes: ``workers: N`` parses and aggregates on N cores, and what leaves equals what
one process would have produced from the same input.

Each worker is ``python -m receivers.statsd.workers``: a :class:`WorkerReceiver` (the receiver itself,
its readers, parser and aggregator, nothing copied) binding the same UDP and TCP ports with
``SO_REUSEPORT``, so the kernel spreads clients over the workers (by source address and port: one
client's datagrams stay with one worker). At each flush the main process asks every worker for its
interval (:meth:`StatsdAggregator.take_part`: counters, sets as their member hashes, timer and
distribution values with their weights and folded histograms, every gauge write with its arrival time,
events, and the counts since the last part), pickled over the worker's stdout, and merges them
(:meth:`StatsdAggregator.absorb`) before building one interval's points for the pipeline.

Exactness: counters sum, sets unite (all workers hash members with one ``PYTHONHASHSEED``, chosen per
receiver), histogram buckets, counts, min and max are those of one process, and gauge writes are
replayed in arrival order over the gauge bases the main process keeps, so a ``+/-`` delta applies to
the latest value whichever worker took it and the last write wins. Arrival is the kernel's receive
time of each datagram (``SO_TIMESTAMPNS``: ~1.1 µs more a datagram than ``recv``, measured) and the
time a worker reads a TCP chunk (so TCP writes to one gauge from connections on different workers,
closer together than a read, are ordered by when they were read). Float sums (counter totals,
histogram sums) add the workers' partial sums, so they can differ from one process's in the last bit
unless the values are exact in binary (integers, halves, 0.125 s). Limits (``max_series``, set caps)
apply per worker; the ``receiver_series`` gauge shows the main process's (merged at flush) count.

Supervision: a worker that exits is started again (``receiver_worker_restarts_total``); the values it
had accepted since its last part (it writes that count into a shared file after every read) are
counted as ``receiver_dropped_points_total{reason="worker_died"}`` (and as accepted); datagrams still
in its socket buffer when it died are not known to anyone. The kernel's drop count
(``receiver_udp_kernel_drops_total``) keeps a dead worker's socket's last figure, so it never goes
back; connections a worker closed as idle are handed in with its part. Shutdown (and so a reload that
changes the receiver) asks each worker to stop: it parses what its sockets still hold and hands in its
last part.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mmap
import os
import pickle
import secrets
import socket
import struct
import sys
import tempfile
import time
from dataclasses import replace
from time import perf_counter

from agent import gcpolicy
from agent.component import ComponentId, ComponentKind, Settings, Tasks
from agent.confmodel import parse_host_port
from agent.telemetry import ComponentTelemetry, Telemetry
from agent.workers import cpu_limit as cpu_limit  # the statsd receiver and its tests import them from here
from agent.workers import ignore_stop_signals, respawn, start_all
from agent.workers import worker_count as worker_count
from receivers.statsd import (
    _DRAIN_BATCH,
    _SLICE_BYTES,
    _TURN_BUDGET_S,
    StatsdConfig,
    StatsdReceiver,
    _DatagramReader,
)
from receivers.statsd.aggregator import IntervalPart

_FRAME = struct.Struct("<Q")
_SLOT = struct.Struct("<qq")
"""A worker's progress since its last part: values accepted, datagrams read."""
_FLUSH = b"F"
_STOP = b"S"
_TIMESPEC = struct.Struct("@qq")
CONNECTION_LIMIT = "connection_limit"
IDLE_CLOSED = ("receiver_closed_connections_total", "Stream connections closed by the receiver.")
"""Name and help of the counter the stream protocol bumps (reason="idle"), forwarded from the workers."""
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def socket_drops(port: int, ipv6: bool) -> dict[str, int]:
    """The kernel's receive-buffer drops of each UDP socket bound to ``port`` (the workers' sockets),
    by socket inode."""
    suffix = f":{port:04X}"
    drops = {}
    with open("/proc/net/udp6" if ipv6 else "/proc/net/udp", encoding="ascii") as f:
        next(f)
        for line in f:
            cols = line.split()
            if len(cols) >= 13 and cols[1].endswith(suffix) and cols[2].endswith(":0000"):
                drops[cols[9]] = int(cols[12])
    return drops


class PortDrops:
    """``receiver_udp_kernel_drops_total`` over the workers' sockets, never going back: a restarted
    worker's new socket starts from 0, so a socket that is gone leaves the figure last read from it as
    a base. Read at every scrape and every flush; drops between that last reading and a worker's
    death are not known to anyone."""

    def __init__(self, port: int, ipv6: bool) -> None:
        self._port = port
        self._ipv6 = ipv6
        self._last: dict[str, int] = {}
        """Socket inode -> its drops when last read."""
        self._gone = 0
        """Drops of the sockets that are gone."""

    def __call__(self) -> int:
        now = socket_drops(self._port, self._ipv6)
        self._gone += sum(drops for inode, drops in self._last.items() if inode not in now)
        self._last = now
        return self._gone + sum(now.values())


# -- the worker process ------------------------------------------------------------------------------
class _StampedReader(_DatagramReader):
    """A datagram reader that gives the aggregator each datagram's kernel receive time before parsing
    it (``recvmsg`` with ``SO_TIMESTAMPNS``: ~0.15 µs more a datagram than ``recv``), so gauge writes
    from several workers are ordered as they arrived."""

    def start(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        super().start()

    def drain(self) -> None:
        r = self._r
        recvmsg = self.sock.recvmsg
        size = r.config.max_datagram_size
        room = size + 1
        ancillary = socket.CMSG_SPACE(_TIMESPEC.size)
        agg = r.agg
        feed = agg.feed
        feed_until = functools.partial(StatsdReceiver.feed_until, r)  # keeps the kernel's stamp
        n = truncated = 0
        rest = b""
        deadline = perf_counter() + _TURN_BUDGET_S
        try:
            while n < _DRAIN_BATCH:
                data, anc, _, _ = recvmsg(room, ancillary)
                n += 1
                if len(data) > size:
                    truncated += 1
                    continue
                if anc:
                    seconds, nanos = _TIMESPEC.unpack_from(anc[0][2])
                    agg.stamp_ns = seconds * 1_000_000_000 + nanos
                else:
                    agg.stamp_ns = time.time_ns()
                if len(data) > _SLICE_BYTES:
                    rest = feed_until(data, deadline)
                    if rest:
                        break
                else:
                    feed(data)
                if perf_counter() > deadline:
                    break
        except BlockingIOError:
            pass
        except OSError as exc:
            r.log.warning("read error on %s: %s", self._address, exc)
        self._end_turn(n, truncated, rest)


class WorkerReceiver(StatsdReceiver):
    """The receiver inside a worker process: binds with ``SO_REUSEPORT``, stamps what it reads, never
    flushes (the main process takes its parts), and keeps the values accepted since the last part in
    ``progress`` (8 bytes of a file the main process reads if this process dies)."""

    reuse_port = True
    reader_class = _StampedReader

    def __init__(self, settings: Settings, config: StatsdConfig, progress: mmap.mmap, slot: int) -> None:
        super().__init__(settings, config, {})
        self.agg.gauge_log = []
        self._progress = progress
        self._offset = slot * _SLOT.size
        self._packets_handed = 0
        self._connection_limit = self.tel.refused(CONNECTION_LIMIT)
        self._limited_handed = 0
        self._idle_closed = self.tel.counter(*IDLE_CLOSED, reason="idle")
        self._idle_handed = 0

    def sync_counts(self) -> None:
        super().sync_counts()
        _SLOT.pack_into(
            self._progress, self._offset, self.agg.accepted, int(self.packets.value) - self._packets_handed
        )

    def refuse(self, reason: str, n: int = 1) -> None:
        """Transport refusals go with the part, into the main process's counts."""
        refused = self.agg.refused
        refused[reason] = refused.get(reason, 0) + n

    def feed_until(self, packet: bytes, deadline: float) -> bytes:
        """Stream reads (and a datagram's rest) are stamped when parsed; datagrams by the kernel."""
        self.agg.stamp_ns = time.time_ns()
        return super().feed_until(packet, deadline)

    def feed(self, data: bytes) -> None:
        self.agg.stamp_ns = time.time_ns()
        super().feed(data)

    def start_flushing(self) -> None:
        """The main process flushes: it takes this worker's parts."""

    async def _flush(self, parts: list[IntervalPart]) -> None:
        """Not here (shutdown calls it): the last part goes to the main process after shutdown."""

    def take_part(self) -> tuple[IntervalPart, int, int]:
        """This interval and the counts since the last call; datagrams read and connections closed as
        idle since then (both counted by the transports themselves)."""
        limited = int(self._connection_limit.value)  # counted by the stream protocol itself
        if limited > self._limited_handed:
            refused = self.agg.refused
            refused[CONNECTION_LIMIT] = refused.get(CONNECTION_LIMIT, 0) + limited - self._limited_handed
            self._limited_handed = limited
        part = self.agg.take_part()
        packets = int(self.packets.value) - self._packets_handed
        self._packets_handed = int(self.packets.value)
        idle = int(self._idle_closed.value) - self._idle_handed
        self._idle_handed += idle
        _SLOT.pack_into(self._progress, self._offset, 0, 0)
        return part, packets, idle


def _write_frame(obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out = sys.stdout.buffer
    out.write(_FRAME.pack(len(data)) + data)
    out.flush()


async def _serve() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    (length,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    config, slot, progress_path, name = pickle.loads(await reader.readexactly(length))
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s {name} worker {slot}: %(message)s"
    )
    with open(progress_path, "r+b") as f:
        progress = mmap.mmap(f.fileno(), 0)
    settings = Settings(
        id=ComponentId.parse(name),
        kind=ComponentKind.RECEIVER,
        telemetry=ComponentTelemetry(Telemetry(), ComponentKind.RECEIVER.value, name),
        logger=logging.getLogger(f"{name}.worker{slot}"),
    )
    receiver = WorkerReceiver(settings, config, progress, slot)
    try:
        await receiver.start()
    except OSError as exc:
        _write_frame(("error", str(exc)))
        return 1
    _write_frame(("ready", os.getpid()))
    # The agent's collector policy (agent/gcpolicy.py) here too: at 100,000 series a worker with
    # CPython's defaults ran 1-2 full collections of 35-80 ms every 1M lines.
    gcpolicy.freeze_startup_state()
    keeper = gcpolicy.GcKeeper()
    keeper.start()
    while True:
        try:
            command = await reader.readexactly(1)
        except asyncio.IncompleteReadError:
            command = _STOP  # the main process went away: stop
        if command == _FLUSH:
            _write_frame(("part", *receiver.take_part()))
        elif command == _STOP:
            keeper.stop()
            await receiver.shutdown()
            with contextlib.suppress(BrokenPipeError):
                _write_frame(("part", *receiver.take_part()))
            return 0


def main() -> None:
    """Entry point of a worker process (started by :class:`WorkerPool`, never by hand)."""
    ignore_stop_signals()
    sys.exit(asyncio.run(_serve()))


# -- the main process --------------------------------------------------------------------------------
_Answer = tuple[IntervalPart, int, int]
"""A worker's part, the datagrams it read and the connections it closed as idle since its last part."""


class _Worker:
    """One worker slot: its current process, the lock its request/answer pairs take, its failures."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.process: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()
        self.failures = 0


class WorkerPool:
    """N worker processes of one receiver: started, asked for their parts at each flush, restarted when
    one dies, stopped with their last parts. Owned by :class:`StatsdReceiver` when ``workers`` > 1."""

    def __init__(self, receiver: StatsdReceiver, count: int) -> None:
        self._r = receiver
        self._config = replace(receiver.config, workers="1")
        self._name = str(receiver.settings.id)
        self._workers = [_Worker(slot) for slot in range(count)]
        self._tasks = Tasks(f"{self._name} workers", receiver.log)
        self._seed = str(secrets.randbelow(2**32))
        """One PYTHONHASHSEED for every worker of this receiver: set members are kept as hashes and
        united across workers, so they must hash alike (a restarted worker too)."""
        self._progress_file = tempfile.NamedTemporaryFile(prefix="headwater-statsd-", suffix=".progress")  # noqa: SIM115
        self._progress_file.write(b"\0" * (_SLOT.size * count))
        self._progress_file.flush()
        self._progress = mmap.mmap(self._progress_file.fileno(), 0)
        self._stopping = False
        self._stopped = asyncio.Event()
        """Set by stop: a restart waiting out its delay gives up at once."""
        self._orphans: list[asyncio.Future[_Answer | None]] = []
        """Exchanges whose caller was cancelled: their parts go with the next collect or stop."""
        self.datagrams = [0] * count
        """Datagrams each worker slot handed in, since the pool started (how the kernel spread them)."""
        tel = receiver.tel
        self._restarts = tel.counter(
            "receiver_worker_restarts_total", "Worker processes that died and were started again."
        )
        self._died = tel.counter(
            "receiver_dropped_points_total",
            "Accepted items the receiver could not pass on, by reason.",
            reason="worker_died",
        )
        self._idle_closed = tel.counter(*IDLE_CLOSED, reason="idle")
        self._drops: PortDrops | None = None
        """The UDP port's kernel drops, kept monotonic over worker restarts (read at each collect too)."""

    @property
    def pids(self) -> list[int]:
        """The running workers' process ids (tests, status)."""
        running = [w.process for w in self._workers if w.process is not None]
        return [p.pid for p in running if p.returncode is None]

    def pending(self) -> list[tuple[int, int]]:
        """Per worker slot: (values accepted, datagrams read) since its last part, as it last wrote them."""
        return [_SLOT.unpack_from(self._progress, w.slot * _SLOT.size) for w in self._workers]

    async def start(self) -> None:
        """Start every worker and wait until each has bound its sockets; a bind failure raises OSError."""
        await start_all(self._workers, self._spawn, self._watch, self.stop, self._tasks)
        udp = self._config.udp or (None if self._config.listeners().keys() - {"udp"} else "127.0.0.1:8125")
        if udp:
            host, port = parse_host_port(udp)
            self._drops = PortDrops(port, ":" in host)
            self._r.tel.counter_reader(
                "receiver_udp_kernel_drops_total",
                "Datagrams the kernel dropped because our receive buffer was full (/proc/net/udp).",
                self._drops,
            )

    async def _spawn(self, worker: _Worker) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "receivers.statsd.workers",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONHASHSEED": self._seed},
        )
        assert process.stdin is not None
        hello = pickle.dumps((self._config, worker.slot, self._progress_file.name, self._name))
        process.stdin.write(_FRAME.pack(len(hello)) + hello)
        _SLOT.pack_into(self._progress, worker.slot * _SLOT.size, 0, 0)
        try:
            await process.stdin.drain()
            answer = await self._read(process)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            await process.wait()
            raise OSError(f"{self._name} worker {worker.slot} exited while starting ({exc})") from exc
        if answer[0] != "ready":
            await process.wait()
            raise OSError(f"{self._name} worker {worker.slot}: {answer[1]}")
        worker.process = process

    async def _read(self, process: asyncio.subprocess.Process) -> tuple[object, ...]:
        assert process.stdout is not None
        (length,) = _FRAME.unpack(await process.stdout.readexactly(_FRAME.size))
        data = await process.stdout.readexactly(length)
        # A large interval unpickles in a thread, off the event loop.
        answer: tuple[object, ...] = (
            pickle.loads(data) if length < 1 << 16 else await asyncio.to_thread(pickle.loads, data)
        )
        return answer

    async def _watch(self, worker: _Worker) -> None:
        """Restart the worker whenever it exits (until the pool stops), counting what it took with it."""
        while True:
            process = worker.process
            assert process is not None
            code = await process.wait()
            if self._stopping:
                return
            async with worker.lock:
                if self._stopping:
                    return
                lost, _ = _SLOT.unpack_from(self._progress, worker.slot * _SLOT.size)
                self._r.log.error(
                    "worker %d (pid %d) exited with %s; %d values it had accepted are lost; restarting it",
                    worker.slot,
                    process.pid,
                    code,
                    lost,
                )
                self._restarts.value += 1
                self._died.value += lost
                self._r.agg.accepted += lost  # accepted by the dead worker: counted, then dropped
                self._r.sync_counts()
                worker.failures += 1
                await respawn(worker, self._spawn, self._stopped, self._r.log)

    async def _ask(self, worker: _Worker, command: bytes) -> _Answer | None:
        """Send ``command``, return the part the worker answers with. The exchange runs to its end even
        if the caller is cancelled (a flush cut short by shutdown): its part, already taken from the
        worker, is kept and handed in with the next collect or stop, and the pipe stays in step."""
        exchange = asyncio.ensure_future(self._exchange(worker, command))
        try:
            return await asyncio.shield(exchange)
        except asyncio.CancelledError:
            self._orphans.append(exchange)
            raise

    async def _orphaned(self) -> list[_Answer | None]:
        orphans, self._orphans = self._orphans, []
        return list(await asyncio.gather(*orphans, return_exceptions=False)) if orphans else []

    async def _exchange(self, worker: _Worker, command: bytes) -> _Answer | None:
        async with worker.lock:
            process = worker.process
            if process is None or process.returncode is not None or process.stdin is None:
                return None
            try:
                process.stdin.write(command)
                await process.stdin.drain()
                answer = await self._read(process)
            except (ConnectionError, asyncio.IncompleteReadError):
                return None  # it died: _watch counts and restarts it
            worker.failures = 0
            part, packets, idle = answer[1], answer[2], answer[3]
            assert isinstance(part, IntervalPart) and isinstance(packets, int) and isinstance(idle, int)
            self.datagrams[worker.slot] += packets
            return part, packets, idle

    async def collect(self) -> list[IntervalPart]:
        """Every live worker's interval and counts since the last collect (the datagram count added to
        the receiver's)."""
        if self._drops is not None:
            self._drops()  # a worker's socket is read at least once an interval before it can die
        earlier = await self._orphaned()
        answers = await asyncio.gather(*(self._ask(w, _FLUSH) for w in self._workers))
        return self._count(earlier) + self._count(answers)

    def _count(self, answers: list[_Answer | None]) -> list[IntervalPart]:
        parts = []
        for answer in answers:
            if answer is not None:
                parts.append(answer[0])
                self._r.packets.value += answer[1]
                self._idle_closed.value += answer[2]
        return parts

    async def stop(self) -> list[IntervalPart]:
        """Stop every worker, each handing in its last part (what its sockets still held parsed).
        Idempotent; a worker that does not answer within 10 s is killed."""
        if self._stopping:
            return []
        self._stopping = True
        self._stopped.set()
        earlier = await self._orphaned()
        answers = earlier + await asyncio.gather(*(self._ask(w, _STOP) for w in self._workers))
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
            try:
                await asyncio.wait_for(process.wait(), 10.0)
            except TimeoutError:
                process.kill()
                await process.wait()
        await self._tasks.close()
        self._progress.close()
        self._progress_file.close()
        return self._count(answers)


if __name__ == "__main__":
    main()
