"""Worker processes for the receivers that do not aggregate (``otlp``, gRPC and HTTP, and ``http``):
``workers: N`` runs N processes sharing the ports with ``SO_REUSEPORT``, each doing the expensive part
of a request, and the main process hands their batches to the pipeline.

A worker is ``python -m agent.workers``: the receiver itself (its module's ``factory``, its handlers,
auth, TLS, body reader and limits, nothing copied), built from the main receiver's worker config and
bound with ``SO_REUSEPORT``, so the kernel spreads client connections over the workers (by address and
port: a kept-alive connection stays with one worker). Its consumers are :class:`ForwardingConsumer`:
``consume(batch)`` sends the decoded batch to the main process over a Unix socket pair and returns (or
raises the main process's ``Backpressure`` / ``QuotaExceeded``, rebuilt with its fields) only once the
main process's pipeline took or refused it. So the worker answers its client exactly as one process
would: 200, partial success, 429/503 with ``Retry-After`` and the ``X-RateLimit`` headers, 500.

What crosses the socket is compact (:func:`encode_batch`): metrics as one row tuple per point (its
fields; a resource or scope shared by the batch's points is pickled once) rebuilt with
:func:`agent.model.new_point`, spans and log records as their serialized ``ResourceSpans`` /
``ResourceLogs``. Measured (``bench/otlp_workers_bench.py --codec``, 500 gauge points with two
attributes, a shared 2-core machine): unpickling the points themselves costs 4.6 µs a point (the
frozen dataclass's ``__setstate__``), rows 0.45-0.7 µs to rebuild and 0.46 µs to make, against
1.55 µs to decode and convert the same points from protobuf. End to end (the same bench, 500-point
requests) the main process spends 0.67 / 0.95 / 1.2 / 1.7 µs a forwarded point where one process
spends 1.9 / 2.7 / 6.6 / 42 µs a decoded one (OTLP protobuf over HTTP / over gRPC / the http
receiver's JSON / OTLP/JSON), and a worker ~0.8 µs a point more than one process (the rows and the
hand-off).

Backpressure across processes: a worker holds a request's bytes (its ``max_request_bytes_in_flight``,
the receiver's divided by N) until the main process answers, so what waits in the main process is
bounded by the workers' budgets, and a main process that falls behind stops reading the socket, which
stops the workers' handlers, which stop reading their clients.

Counts: the main process counts what its pipeline accepted (``receiver_accepted_*_total``: a batch
taken just before its worker died counts too). Each worker's other counters (refused by reason,
requests by status, auth failures, connection refusals) are sent to the main process every
:data:`COUNTS_INTERVAL_S` when they moved and when the worker stops, and added to the receiver's own
cells, so the receiver's metrics read as one process's; its gauges (connections, request bytes in
flight) are summed over the workers. A worker killed outright takes at most its last interval's
refusal and request counts with it.

Capture: while a capture records the receiver (agent.capture), each worker sends the request bodies
it takes to the main process's hook, ahead of their batches on the same socket.

Supervision: a worker that exits is started again after 0, 0.5, 2, 10 s (the n-th failure in a row;
one that ran 10 s starts the count again), counted in ``receiver_worker_restarts_total``. Its clients'
connections die with it: their in-flight requests fail, so they resend them; nothing the worker had
not handed in was accepted. A batch the main process took whose answer could no longer reach the dead
worker (or whose request a stopping worker cut after 5 s) is counted in
``receiver_worker_unanswered_points_total``: its client saw an error and may resend it (a duplicate,
not a loss). Shutdown (and so a reload that changes the receiver) asks each
worker to stop: it stops accepting, lets its requests in flight finish (the main process keeps
answering them) and hands in its last counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import importlib
import itertools
import logging
import math
import operator
import os
import pickle
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent import netguard
from agent.capture.recorder import CaptureHook
from agent.component import Backpressure, ComponentId, ComponentKind, Consumer, Settings, Signal, Tasks
from agent.confmodel import Size
from agent.model import POINT_FIELDS, Batch, LogBatch, MetricBatch, SpanBatch, new_point
from agent.quota import QuotaExceeded
from agent.telemetry import PREFIX, Cell, ComponentTelemetry, Telemetry

MAX_WORKERS = 256
RESTART_DELAY_S = (0.0, 0.5, 2.0, 10.0)
"""Wait before restarting a worker that died 1, 2, 3, 4+ times in a row."""
HEALTHY_RUN_S = 10.0
"""A worker that ran this long before dying starts the restart delays again."""
COUNTS_INTERVAL_S = 0.05
"""How often a worker sends its counters to the main process (when they moved)."""
STOP_TIMEOUT_S = 10.0
"""How long a stopping worker may take to finish its requests before it is killed."""
_FRAME = struct.Struct("<Q")
_THREAD_BYTES = 1 << 18
"""Frames at least this large are pickled or unpickled in a thread, off the event loop."""
_THREAD_ITEMS = 5_000
"""Batches with at least this many points are encoded in a thread."""
ACCEPTED = {
    Signal.METRICS: "receiver_accepted_points_total",
    Signal.TRACES: "receiver_accepted_spans_total",
    Signal.LOGS: "receiver_accepted_log_records_total",
}
"""The receivers' accepted counters: counted by the main process as its pipeline takes each batch (a
worker's own count would miss a batch taken just before the worker died), not handed in."""
_ACCEPTED_NAMES = frozenset(ACCEPTED.values())
UNANSWERED = (
    "receiver_worker_unanswered_points_total",
    "Items the pipeline took whose client got no answer: their worker died or stopped (it may resend them).",
)


# -- how many ---------------------------------------------------------------------------------------
def cpu_limit(cgroup: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: the cgroup's CPU limit (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``) rounded down, at least 1, at most the CPUs it may run on."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    return max(1, min(available, math.floor(quota))) if quota is not None else max(1, available)


def _cgroup_quota(cgroup: str) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        with open(f"{cgroup}/cpu.max", encoding="ascii") as f:
            limit, period = f.read().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    for folder in (f"{cgroup}/cpu", f"{cgroup}/cpu,cpuacct"):
        with contextlib.suppress(OSError, ValueError):
            with open(f"{folder}/cpu.cfs_quota_us", encoding="ascii") as f:
                limit_us = int(f.read())
            with open(f"{folder}/cpu.cfs_period_us", encoding="ascii") as f:
                period_us = int(f.read())
            return None if limit_us <= 0 else limit_us / period_us
    return None


def worker_count(setting: str, cpus: Callable[[], int] = cpu_limit) -> int:
    """The number of processes ``workers`` asks for (``auto``: :func:`cpu_limit`)."""
    return cpus() if setting == "auto" else int(setting)


def workers_problem(setting: str) -> str | None:
    """Why ``setting`` is not a ``workers`` value (a number of processes, 1-256, or auto), or None."""
    if setting == "auto" or (setting.isdigit() and 1 <= int(setting) <= MAX_WORKERS):
        return None
    return f"{setting!r} is not a number of processes (1-{MAX_WORKERS}) or auto"


# -- what crosses the socket ------------------------------------------------------------------------
_ROW = operator.attrgetter(*POINT_FIELDS[:-1])
"""A point's fields but its series key (recomputed where needed: str hashes differ between processes)."""


def encode_batch(batch: Batch) -> bytes:
    """``batch`` as the bytes :func:`decode_batch` rebuilds it from (see the module docs)."""
    if isinstance(batch, MetricBatch):
        row = _ROW
        return pickle.dumps(
            ("m", dict(batch.context), [row(p) for p in batch.points]), protocol=pickle.HIGHEST_PROTOCOL
        )
    if isinstance(batch, SpanBatch):
        wire = [rs.SerializeToString() for rs in batch.resource_spans]
        return pickle.dumps(("s", dict(batch.context), batch.span_count, wire), pickle.HIGHEST_PROTOCOL)
    wire = [rl.SerializeToString() for rl in batch.resource_logs]
    return pickle.dumps(("l", dict(batch.context), batch.record_count, wire), pickle.HIGHEST_PROTOCOL)


def decode_batch(data: bytes) -> Batch:
    """The batch :func:`encode_batch` made ``data`` of."""
    what = pickle.loads(data)
    if what[0] == "m":
        return MetricBatch(tuple([new_point(*row) for row in what[2]]), what[1])
    if what[0] == "s":
        spans = tuple(trace_pb2.ResourceSpans.FromString(b) for b in what[3])
        return SpanBatch(spans, what[1], what[2])
    logs = tuple(logs_pb2.ResourceLogs.FromString(b) for b in what[3])
    return LogBatch(logs, what[1], what[2])


def _refusal(exc: Exception) -> tuple[object, ...]:
    """A refusal as it crosses the socket: a tenant's quota and backpressure with their fields
    (``Exception`` pickling keeps only ``args``, which would lose ``retry_after_s``); another error by
    its text."""
    if isinstance(exc, QuotaExceeded):
        return ("quota", exc.tenant, exc.limit, exc.retry_after_s, exc.limit_value, exc.remaining, exc.fits)
    if isinstance(exc, Backpressure):
        return ("refused", exc.reason, exc.retry_after_s)
    return ("failed", f"{type(exc).__name__}: {exc}")


def _rebuild(answer: tuple[Any, ...]) -> Exception:
    if answer[0] == "quota":
        tenant, limit, retry_after_s, limit_value, remaining, fits = answer[1:]
        return QuotaExceeded(
            tenant,
            limit,
            retry_after_s=retry_after_s,
            limit_value=limit_value,
            remaining=remaining,
            fits=fits,
        )
    if answer[0] == "refused":
        return Backpressure(answer[1], answer[2])
    return RuntimeError(f"the main process failed to take the batch: {answer[1]}")


class _Channel:
    """Framed pickled messages over one end of a socket pair; writes from any task, reads from one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> _Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    async def send(self, message: tuple[object, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_FRAME.pack(len(data)) + data)
        await self.writer.drain()

    def send_nowait(self, message: tuple[object, ...]) -> None:
        """Queue ``message`` without waiting for the socket (from synchronous code); dropped when the
        socket is closing."""
        if not self.writer.is_closing():
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            self.writer.write(_FRAME.pack(len(data)) + data)

    async def receive(self) -> tuple[Any, ...]:
        """The next message; IncompleteReadError when the other end closed."""
        (length,) = _FRAME.unpack(await self.reader.readexactly(_FRAME.size))
        data = await self.reader.readexactly(length)
        message: tuple[Any, ...] = (
            pickle.loads(data) if length < _THREAD_BYTES else await asyncio.to_thread(pickle.loads, data)
        )
        return message

    def close(self) -> None:
        self.writer.close()


# -- the worker process -----------------------------------------------------------------------------
class ForwardingConsumer:
    """A worker's consumer of one signal: hands each batch to the main process and waits for its
    pipeline's answer (returns when taken; raises its refusal, or RuntimeError when it failed or the
    main process is gone)."""

    def __init__(self, signal: Signal, channel: _Channel, answers: _Answers) -> None:
        self._signal = signal.value
        self._channel = channel
        self._answers = answers

    async def consume(self, batch: Batch) -> None:
        payload = (
            await asyncio.to_thread(encode_batch, batch)
            if len(batch) >= _THREAD_ITEMS
            else encode_batch(batch)
        )
        answers = self._answers
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ident = next(answers.idents)
        answers.waiting[ident] = answer
        try:
            try:
                await self._channel.send(("consume", ident, self._signal, payload))
            except (ConnectionError, RuntimeError) as exc:
                raise RuntimeError(f"the main process is gone: {exc}") from None
            result = await answer
        except asyncio.CancelledError:
            # The request ended (the receiver stopping) after its batch was sent: if the pipeline
            # takes it, nobody tells the client; count that when the answer comes.
            answers.abandoned[ident] = len(batch)
            raise
        finally:
            answers.waiting.pop(ident, None)
        if result is not None:
            raise _rebuild(result)


class _Answers:
    """A worker's batches waiting for the main process's answer, and those whose request ended first
    (their sizes: taken, they count as unanswered)."""

    def __init__(self, unanswered: Cell) -> None:
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.abandoned: dict[int, int] = {}
        self.idents = itertools.count()
        """Each batch's number, never reused: an abandoned batch's late answer must not reach a newer
        batch's request (``id()`` of a freed future is reused at once)."""
        self.unanswered = unanswered

    def answer(self, ident: int, result: tuple[object, ...] | None) -> None:
        future = self.waiting.pop(ident, None)
        if future is not None and not future.done():
            future.set_result(result)
        n = self.abandoned.pop(ident, 0)
        if n and result is None:
            self.unanswered.value += n

    def fail(self) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(RuntimeError("the main process is gone"))


def _counts(tel: Telemetry, kind: str) -> tuple[dict[tuple[Any, ...], float], dict[str, float]]:
    """The counter cells (name, help, labels without the component's) and gauge sums of ``tel``."""
    counters: dict[tuple[Any, ...], float] = {}
    gauges: dict[str, float] = {}
    for metric in tel.collect():
        for sample in metric.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != kind))
            if metric.type == "counter" and sample.name.endswith("_total"):
                counters[sample.name.removeprefix(PREFIX), metric.documentation, labels] = sample.value
            elif metric.type == "gauge":
                name = sample.name.removeprefix(PREFIX)
                gauges[name] = gauges.get(name, 0.0) + sample.value
    return counters, gauges


async def _send_counts(channel: _Channel, tel: Telemetry, kind: str, stopping: asyncio.Event) -> None:
    """Send the counters that moved (absolute values) and the gauges, every COUNTS_INTERVAL_S and once
    more when ``stopping`` is set."""
    sent: dict[tuple[Any, ...], float] = {}
    last_gauges: dict[str, float] = {}
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), COUNTS_INTERVAL_S)
        counters, gauges = _counts(tel, kind)
        moved = {k: v for k, v in counters.items() if sent.get(k) != v}
        if moved or gauges != last_gauges:
            await channel.send(("counts", moved, gauges))
            sent.update(moved)
            last_gauges = gauges
        if stopping.is_set():
            return


async def _serve(fd: int) -> int:
    channel = await _Channel.open(socket.socket(fileno=fd))
    hello = await channel.receive()
    module_name, config, signals, name, slot, port_attrs, bytes_limit, gc_threshold = hello[1:]
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s {name} worker {slot}: %(message)s"
    )
    netguard.set_request_bytes_limit(bytes_limit)
    telemetry = Telemetry()
    kind = ComponentKind.RECEIVER.value
    settings = Settings(
        id=ComponentId.parse(name),
        kind=ComponentKind.RECEIVER,
        telemetry=ComponentTelemetry(telemetry, kind, name),
        logger=logging.getLogger(f"{name}.worker{slot}"),
    )
    answers = _Answers(settings.telemetry.counter(*UNANSWERED))
    consumers: dict[Signal, Consumer] = {
        Signal(s): ForwardingConsumer(Signal(s), channel, answers) for s in signals
    }
    receiver = importlib.import_module(module_name).factory.create(settings, config, consumers)
    receiver.reuse_port = True
    # The main process's collector thresholds (agent/gcpolicy.py: young collections rare, the points a
    # request makes are short-lived) and its startup state frozen, so a worker converts as fast. No
    # GcKeeper: a worker keeps no series state for a full collection to walk.
    gc.freeze()
    gc.set_threshold(*gc_threshold)
    try:
        await receiver.start()
    except OSError as exc:
        await channel.send(("error", str(exc)))
        return 1
    await channel.send(("ready", os.getpid(), {attr: getattr(receiver, attr) for attr in port_attrs}))
    stopping = asyncio.Event()
    stopper: asyncio.Task[None] | None = None
    tasks = Tasks(f"{name} worker {slot}", settings.logger)
    counting = tasks.spawn(_send_counts(channel, telemetry, kind, stopping), "counts")
    try:
        while True:
            try:
                message = await channel.receive()
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the main process went away: stop
            if message[0] == "answer":
                answers.answer(message[1], message[2])
            elif message[0] == "capture":
                receiver.capture = functools.partial(_forward_capture, channel) if message[1] else None
            elif message[0] == "stop" and stopper is None:
                # Requests in flight still need their answers: keep reading while the receiver stops.
                # Once only: a second stop would find the receiver stopping and close the socket early.
                stopper = tasks.spawn(_stop(receiver, stopping, counting, channel), "stop")
    finally:
        answers.fail()
        if not stopping.is_set():
            await receiver.shutdown()
        await tasks.close()
    return 0


def _forward_capture(
    channel: _Channel, transport: str, payload: bytes, meta: Mapping[str, str] | None = None
) -> None:
    """A worker's capture hook: the body goes to the main process's hook (never blocks or raises)."""
    with contextlib.suppress(Exception):
        channel.send_nowait(("capture", transport, payload, dict(meta) if meta else None))


async def _stop(
    receiver: Any, stopping: asyncio.Event, counting: asyncio.Task[Any], channel: _Channel
) -> None:
    """Stop the receiver (its requests in flight finish, answered through ``channel``), send the last
    counts, then close the socket: that ends the worker's read loop, and the main process sees it."""
    await receiver.shutdown()
    stopping.set()
    with contextlib.suppress(Exception):
        await counting
    channel.close()


def ignore_stop_signals() -> None:
    """In a worker process (statsd's and these): Ctrl-C in a terminal reaches the whole process group,
    and systemd's stop (KillMode=control-group, its default) sends SIGTERM to every process of the
    unit. The main process stops the workers in order (their requests finish, their last intervals
    are handed in), instead of each dying at once and being restarted meanwhile. A worker still exits
    when the main process is gone (its pipe or socket pair closes), and is killed after a timeout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main() -> None:
    """Entry point of a worker process (started by :class:`WorkerPool`, never by hand)."""
    ignore_stop_signals()
    sys.exit(asyncio.run(_serve(int(sys.argv[1]))))


# -- the main process --------------------------------------------------------------------------------
class Restartable(Protocol):
    """A pool's slot for one worker process, as :func:`respawn` sees it."""

    slot: int
    failures: int
    """Exits (and failed starts) in a row without a healthy run."""


R = TypeVar("R", bound=Restartable)


async def respawn(
    worker: R, spawn: Callable[[R], Awaitable[None]], stopped: asyncio.Event, log: logging.Logger
) -> bool:
    """Start ``worker`` again (``spawn``) after the wait its run of failures calls for
    (:data:`RESTART_DELAY_S`); a start that fails is one more failure, logged, and waits again. False
    when the pool stopped (``stopped`` set) before a start succeeded."""
    while not stopped.is_set():
        delay_s = RESTART_DELAY_S[min(worker.failures, len(RESTART_DELAY_S)) - 1]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), delay_s)
        if stopped.is_set():
            return False
        try:
            await spawn(worker)
        except OSError as exc:
            worker.failures += 1
            log.error("restarting worker %d failed: %s", worker.slot, exc)
            continue
        return True
    return False


async def start_all(
    workers: Sequence[R],
    spawn: Callable[[R], Awaitable[None]],
    watch: Callable[[R], Coroutine[Any, Any, None]],
    stop: Callable[[], Awaitable[object]],
    tasks: Tasks,
) -> None:
    """Start every worker (``spawn``, at once) and then watch each (``watch``, a task of ``tasks``); when
    one fails to start, stop them all (``stop``) and raise its error."""
    spawned = await asyncio.gather(*(spawn(w) for w in workers), return_exceptions=True)
    failed = [exc for exc in spawned if isinstance(exc, BaseException)]
    if failed:
        await stop()
        raise failed[0]
    for worker in workers:
        tasks.spawn(watch(worker), f"watch worker {worker.slot}")


class Pooled:
    """What a receiver with ``workers`` shares (the ``otlp`` and ``http`` receivers): its
    :class:`WorkerPool` (None in one process), the pool's gauges added to its own, and a capture hook
    handed on to the workers."""

    pool: WorkerPool | None = None
    """The worker processes, when ``workers`` asks for more than one (:meth:`_make_pool`)."""
    _capture: CaptureHook | None = None

    def _make_pool(
        self,
        settings: Settings,
        module: str,
        config: Any,
        consumers: Mapping[Signal, Consumer],
        port_attrs: tuple[str, ...],
    ) -> None:
        """Make :attr:`pool` when ``config.workers`` asks for more than one process. Each worker runs
        ``config`` as one process with the request bytes budget (``max_request_bytes_in_flight``, and
        the agent-wide one) shared out; connections stay per process (each holds its own descriptors)."""
        count = worker_count(config.workers)
        if count > 1:
            share = Size(max(1, config.max_request_bytes_in_flight // count))
            self.pool = WorkerPool(
                settings,
                module,
                dataclasses.replace(config, workers="1", max_request_bytes_in_flight=share),
                consumers,
                count,
                port_attrs=port_attrs,
                bytes_limit=max(1, netguard.request_bytes().limit // count),
            )

    def _pooled(self, gauge: str) -> float:
        """The workers' sum of ``gauge`` (0 without workers)."""
        return self.pool.gauge(gauge) if self.pool is not None else 0.0

    @property
    def capture(self) -> CaptureHook | None:
        """Set while a capture records this receiver (agent.capture): the request bodies, inflated
        (with workers, theirs: each worker sends them here)."""
        return self._capture

    @capture.setter
    def capture(self, hook: CaptureHook | None) -> None:
        self._capture = hook
        if self.pool is not None:
            self.pool.capture(hook)


class _Worker:
    """One worker slot: its current process, its socket, its counters as last sent, its failures."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.process: asyncio.subprocess.Process | None = None
        self.channel: _Channel | None = None
        self.counters: dict[tuple[Any, ...], float] = {}
        self.gauges: dict[str, float] = {}
        self.failures = 0
        self.started_at = 0.0
        self.stopped = asyncio.Event()
        """Set once this process's socket closed (it exited, or is about to)."""


class WorkerPool:
    """N worker processes of one receiver (see the module docs): started, their batches handed to
    ``consumers``, restarted when one dies, stopped. Owned by the receiver when ``workers`` > 1.

    ``module`` names the receiver's module (its ``factory`` builds the worker's receiver from
    ``config``, the receiver's worker config); ``port_attrs`` name the receiver's attributes holding
    its bound ports; ``bytes_limit`` the process-wide request bytes of each worker."""

    def __init__(
        self,
        settings: Settings,
        module: str,
        config: object,
        consumers: Mapping[Signal, Consumer],
        count: int,
        *,
        port_attrs: tuple[str, ...],
        bytes_limit: int,
    ) -> None:
        self._settings = settings
        self._module = module
        self._config = config
        self._consumers = dict(consumers)
        self._name = str(settings.id)
        self._log = settings.logger
        self._port_attrs = port_attrs
        self._bytes_limit = bytes_limit
        self._workers = [_Worker(slot) for slot in range(count)]
        self._tasks = Tasks(f"{self._name} workers", self._log)
        self._stopping = False
        self._stopped = asyncio.Event()
        self.ports: dict[str, int | None] = {}
        """The ports the workers bound, by the receiver's attribute names (the first one's answer)."""
        self._capture: CaptureHook | None = None
        self.batches = [0] * count
        """Batches each worker slot handed in since the pool started (how the kernel spread them)."""
        tel = settings.telemetry
        self._tel = tel
        self._restarts = tel.counter(
            "receiver_worker_restarts_total", "Worker processes that died and were started again."
        )
        self._accepted = {
            signal: tel.counter(ACCEPTED[signal], "Items a receiver took in and passed on.")
            for signal in self._consumers
        }
        self._unanswered = tel.counter(*UNANSWERED)

    def capture(self, hook: CaptureHook | None) -> None:
        """Have every worker (a restarted one too) send the request bodies it takes to ``hook``, or
        stop (None). The recorder stamps them when they reach this process."""
        self._capture = hook
        for worker in self._workers:
            if worker.channel is not None:
                worker.channel.send_nowait(("capture", hook is not None))

    @property
    def pids(self) -> list[int]:
        """The running workers' process ids (tests, status)."""
        running = [w.process for w in self._workers if w.process is not None]
        return [p.pid for p in running if p.returncode is None]

    def gauge(self, name: str) -> float:
        """The sum of gauge ``name`` over the workers, as they last sent it."""
        return sum(w.gauges.get(name, 0.0) for w in self._workers)

    async def start(self) -> None:
        """Start every worker and wait until each has bound its port; a bind failure raises OSError."""
        await start_all(self._workers, self._spawn, self._watch, self.stop, self._tasks)

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.workers", str(theirs.fileno()), pass_fds=(theirs.fileno(),)
            )
        finally:
            theirs.close()
        channel = await _Channel.open(ours)
        signals = [s.value for s in self._consumers]
        await channel.send(
            (
                "hello",
                self._module,
                self._config,
                signals,
                self._name,
                worker.slot,
                self._port_attrs,
                self._bytes_limit,
                gc.get_threshold(),
            )
        )
        try:
            answer = await channel.receive()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            channel.close()
            await process.wait()
            raise OSError(f"{self._name} worker {worker.slot} exited while starting ({exc})") from exc
        if answer[0] != "ready":
            channel.close()
            await process.wait()
            raise OSError(f"{self._name} worker {worker.slot}: {answer[1]}")
        if not self.ports:
            self.ports = dict(answer[2])
        worker.process = process
        worker.channel = channel
        if self._capture is not None:
            channel.send_nowait(("capture", True))
        worker.counters = {}
        worker.gauges = {}
        worker.stopped = asyncio.Event()
        worker.started_at = asyncio.get_running_loop().time()
        self._tasks.spawn(self._serve(worker, channel), f"serve worker {worker.slot}")

    async def _serve(self, worker: _Worker, channel: _Channel) -> None:
        """Read the worker's messages until its socket closes: hand each batch to the pipeline (in a
        task of its own, so a slow consumer does not hold the others), add its counts."""
        requests = Tasks(f"{self._name} worker {worker.slot} batches", self._log)
        try:
            while True:
                try:
                    message = await channel.receive()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if message[0] == "consume":
                    self.batches[worker.slot] += 1
                    requests.spawn(
                        self._consume(worker, channel, message[1], Signal(message[2]), message[3]), "consume"
                    )
                elif message[0] == "counts":
                    self._count(worker, message[1], message[2])
                elif message[0] == "capture":
                    hook = self._capture
                    if hook is not None:
                        hook(message[1], message[2], message[3])
        finally:
            worker.stopped.set()
            await requests.wait()  # answers to a dead worker are counted, not lost track of
            await requests.close()
            channel.close()

    async def _consume(
        self, worker: _Worker, channel: _Channel, ident: int, signal: Signal, payload: bytes
    ) -> None:
        batch = (
            decode_batch(payload)
            if len(payload) < _THREAD_BYTES
            else await asyncio.to_thread(decode_batch, payload)
        )
        answer: tuple[object, ...] | None = None
        try:
            await self._consumers[signal].consume(batch)
            self._accepted[signal].value += len(batch)
        except Exception as exc:
            if not isinstance(exc, Backpressure):
                self._log.exception("the pipeline failed on a batch of %d from a worker", len(batch))
            answer = _refusal(exc)
        try:
            if worker.stopped.is_set() or channel.writer.is_closing():
                raise ConnectionResetError("the worker's socket closed")
            await channel.send(("answer", ident, answer))
        except (ConnectionError, RuntimeError):
            if answer is None:
                self._unanswered.value += len(batch)

    def _count(
        self, worker: _Worker, counters: dict[tuple[Any, ...], float], gauges: dict[str, float]
    ) -> None:
        tel = self._tel
        for key, value in counters.items():
            name, help_, labels = key
            if name in _ACCEPTED_NAMES:
                continue
            delta = value - worker.counters.get(key, 0.0)
            if delta:
                tel.counter(name, help_, **dict(labels)).value += delta
            worker.counters[key] = value
        worker.gauges = gauges

    async def _watch(self, worker: _Worker) -> None:
        """Restart the worker whenever it exits (until the pool stops)."""
        loop = asyncio.get_running_loop()
        while True:
            process = worker.process
            assert process is not None
            code = await process.wait()
            if self._stopping:
                return
            worker.gauges = {}
            if loop.time() - worker.started_at >= HEALTHY_RUN_S:
                worker.failures = 0
            self._log.error(
                "worker %d (pid %d) exited with %s; restarting it", worker.slot, process.pid, code
            )
            self._restarts.value += 1
            worker.failures += 1
            if not await respawn(worker, self._spawn, self._stopped, self._log):
                return
            if self._stopping:
                # stop() came while this one was starting and saw only the dead process.
                await self._stop_late(worker)
                return

    async def _stop_late(self, worker: _Worker) -> None:
        """Stop ``worker``'s process as :meth:`stop` does (it finishes its requests, or is killed)."""
        process, channel = worker.process, worker.channel
        assert process is not None and channel is not None
        with contextlib.suppress(ConnectionError, RuntimeError):
            await channel.send(("stop",))
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def stop(self) -> None:
        """Stop every worker: each stops taking requests, finishes those in flight (answered by the
        pipeline as usual) and sends its last counts. Idempotent; one that has not exited within
        :data:`STOP_TIMEOUT_S` is killed."""
        if self._stopping:
            return
        self._stopping = True
        self._stopped.set()
        for worker in self._workers:
            if (
                worker.channel is not None
                and worker.process is not None
                and worker.process.returncode is None
            ):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await worker.channel.send(("stop",))
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()
        await self._tasks.wait(STOP_TIMEOUT_S)  # the last counts and answers are read
        await self._tasks.close()


if __name__ == "__main__":
    main()
