"""Process-wide guards for the agent's network servers: file descriptors, connections, request bytes.

One misbehaving client must not take the agent down for everyone else. This module holds what the
receivers share across the whole process:

- **File descriptors.** :func:`raise_nofile` lifts the soft ``RLIMIT_NOFILE`` to the hard limit at
  startup (as Go's runtime does; no sysctl). :class:`FdBudget` lets connections take at most
  ``nofile - reserve`` descriptors, the reserve (``max(256, nofile / 10)``, at most half) staying for
  the agent's own endpoint, exporters, the disk queue and files. :func:`fd_budget` is the process's.
- **Connections.** :class:`ConnectionGate` caps one server's open connections (``max_connections``)
  on top of the process budget. At the cap the oldest connection that is not in a request (still
  sending its headers, or idle between keep-alive requests) is closed to make room; when every
  connection is inside a request the new one is closed at once. Either way one
  ``refused{reason="too_many_connections"}`` is counted per closed connection.
- **HTTP header and idle timeouts.** aiohttp has neither a header-read timeout nor a connection cap:
  :class:`GuardedSite` serves an aiohttp runner through :class:`GuardedRequestHandler`, which closes
  a connection whose request headers are not complete ``header_timeout_s`` after it connected (or
  after the first byte of a later request on a kept-alive connection), counted as
  ``refused{reason="header_timeout"}``, and closes idle kept-alive connections after ``idle_timeout_s``
  (aiohttp's keep-alive timer; not counted, it is normal).
- **Request bytes in flight.** :class:`ByteBudget` bounds the request bytes (raw plus inflated) that
  receivers hold at once. Each receiver has its own (``max_request_bytes_in_flight``) whose parent is
  the process-wide :func:`request_bytes` (default :data:`DEFAULT_REQUEST_BYTES`, 64 MiB, settable with
  :func:`set_request_bytes_limit`). Bytes are taken before they are buffered (Content-Length up
  front, then as the body streams in and inflates); a request that cannot take them is refused with
  ``memory_budget`` and asked to retry.
- **Parse slots.** :func:`parse_slots` bounds the large bodies being decoded at once (in worker
  threads: the decoders hold the GIL, so more at once only adds memory and event-loop stalls).
- **Accept errors.** :func:`install_loop_guards` sets a loop exception handler that turns asyncio's
  per-attempt ``socket.accept() out of system resource`` tracebacks into one log line per interval
  with a count, and hands everything else to the default handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import ssl
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from agent.telemetry import Cell

log = logging.getLogger("agent.netguard")

RESERVE_MIN_FDS = 256
"""File descriptors kept out of every connection budget, at least (the admin endpoint, exporters...)."""
RESERVE_FRACTION = 0.10
"""...or this fraction of the limit when that is more."""
DEFAULT_REQUEST_BYTES = 64 * 2**20
"""Request bytes all receivers together hold at once unless :func:`set_request_bytes_limit` says."""
ACCEPT_LOG_INTERVAL_S = 10.0
"""Accept errors are logged at most once per this interval, with the count since the last line."""
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# -- file descriptors ---------------------------------------------------------------------------------
def raise_nofile(logger: logging.Logger = log) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit where allowed; log and return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
        else:
            logger.info("open-file limit raised from %d to %d", soft, hard)
            soft = hard
    else:
        logger.info("open-file limit is %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)
    fd_budget().refresh()
    return int(soft)


def fd_reserve(nofile: int) -> int:
    """Descriptors kept free of connections for a limit of ``nofile``: max(256, 10 %), at most half."""
    return min(nofile // 2, max(RESERVE_MIN_FDS, int(nofile * RESERVE_FRACTION)))


class FdBudget:
    """Connections the whole process may hold: ``nofile - fd_reserve(nofile)``.

    Servers take one unit per accepted connection and give it back when it closes. Event-loop only.
    """

    __slots__ = ("in_use", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = 0
        self.in_use = 0
        if limit is None:
            self.refresh()
        else:
            self.limit = limit

    def refresh(self) -> None:
        """Recompute the limit from the current soft RLIMIT_NOFILE (after :func:`raise_nofile`)."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        nofile = 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)
        self.limit = nofile - fd_reserve(nofile)

    def acquire(self) -> bool:
        """Take one descriptor for a connection; False when the budget is spent."""
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use -= 1


_FDS = FdBudget()


def fd_budget() -> FdBudget:
    """The process-wide connection budget (every receiver's connections count against it)."""
    return _FDS


# -- connections --------------------------------------------------------------------------------------
class Guarded(Protocol):
    """A connection a :class:`ConnectionGate` may close to make room for a new one."""

    @property
    def evictable(self) -> bool:
        """Not inside a request (sending headers, or idle between requests)."""

    def evict(self) -> None:
        """Close at once; the gate has already forgotten the connection."""


class ConnectionGate:
    """One server's connection cap (``max_connections``) on top of the process :class:`FdBudget`.

    ``admit`` on connect, ``release`` on close (idempotent). Connections are kept in admission order
    so that eviction finds the oldest first. Event-loop only.
    """

    def __init__(self, max_connections: int, refused: Cell, fds: FdBudget | None = None) -> None:
        self.max_connections = max_connections
        self._refused = refused
        self._fds = fds if fds is not None else fd_budget()
        self._open: dict[Guarded, None] = {}

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: Guarded) -> bool:
        """Whether ``conn`` may stay open; at the cap an idle older connection is evicted for it."""
        fds = self._fds
        if len(self._open) >= self.max_connections or fds.in_use >= fds.limit:
            # The victim or the newcomer: one connection is closed either way, and counted once.
            self._refused.value += 1
            victim = next((c for c in self._open if c.evictable), None)
            if victim is None:
                return False
            self.release(victim)
            victim.evict()
        if not fds.acquire():  # other servers hold the whole process budget and we had no victim
            return False
        self._open[conn] = None
        return True

    def release(self, conn: Guarded) -> None:
        if self._open.pop(conn, False) is None:
            self._fds.release()


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with a connection gate and a header-read timeout.

    The header timer runs from ``connection_made`` (and from the first byte of each later request on
    a kept-alive connection) until aiohttp has parsed a complete request head.
    """

    __slots__ = ("_admitted", "_busy", "_gate", "_header_timeout_s", "_header_timer", "_on_header_timeout")

    def __init__(
        self,
        manager: web.Server,
        gate: ConnectionGate,
        header_timeout_s: float,
        on_header_timeout: Cell,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), **kwargs)
        self._gate = gate
        self._header_timeout_s = header_timeout_s
        self._on_header_timeout = on_header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._admitted = False
        self._busy = False

    @property
    def evictable(self) -> bool:
        return not self._busy

    def evict(self) -> None:
        self._cancel_header_timer()
        self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._gate.admit(self):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._admitted = True
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        waiter = self._waiter
        if self._header_timer is None and waiter is not None and not waiter.done():
            self._arm_header_timer()  # the first bytes of a new request on a kept-alive connection
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a request head is complete
            self._busy = True
            self._cancel_header_timer()

    async def finish_response(self, request: Any, resp: Any, start_time: float | None) -> Any:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._busy = False

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._cancel_header_timer()
        self._gate.release(self)
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._busy:
            return
        self._on_header_timeout.value += 1
        self.force_close()


class GuardedSite(web.BaseSite):
    """A TCP site for an aiohttp runner whose connections go through :class:`GuardedRequestHandler`.

    ``handler_kwargs`` are RequestHandler's keyword arguments (those given to the runner: aiohttp
    does not expose them); ``idle_timeout_s`` becomes aiohttp's keep-alive timeout.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        gate: ConnectionGate,
        header_timeout_s: float,
        idle_timeout_s: float,
        header_timeouts: Cell,
        ssl_context: ssl.SSLContext | None = None,
        handler_kwargs: dict[str, Any] | None = None,
        backlog: int = 128,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._reuse_port = reuse_port
        """Bind with SO_REUSEPORT (worker processes share the port: agent/workers.py)."""
        self._host = host
        self._port = port
        self._gate = gate
        self._header_timeout_s = header_timeout_s
        self._header_timeouts = header_timeouts
        self._kwargs = {**(handler_kwargs or {}), "keepalive_timeout": idle_timeout_s}
        self._listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    def _protocol(self) -> GuardedRequestHandler:
        server = self._runner.server
        assert server is not None
        return GuardedRequestHandler(
            server, self._gate, self._header_timeout_s, self._header_timeouts, **self._kwargs
        )

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port,
            # The TLS handshake happens before the handler sees the connection: bound it the same.
            ssl_handshake_timeout=self._header_timeout_s if self._ssl_context else None,
        )
        self._server = self._listener  # BaseSite.stop closes it

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])


class ServerSettings(Protocol):
    """The connection and body settings every HTTP-serving receiver has (http, otlp)."""

    @property
    def max_request_body_size(self) -> int: ...
    @property
    def max_request_bytes_in_flight(self) -> int: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def read_timeout(self) -> float: ...
    @property
    def header_timeout(self) -> float: ...
    @property
    def idle_timeout(self) -> float: ...


def server_problems(config: ServerSettings) -> list[tuple[str, str]]:
    """The checks of :class:`ServerSettings` shared by the receivers' ``validate``."""
    problems: list[tuple[str, str]] = []
    if config.max_request_body_size < 1024:
        problems.append(("max_request_body_size", "must be at least 1KiB"))
    for name in ("read_timeout", "header_timeout", "idle_timeout"):
        if getattr(config, name) <= 0:
            problems.append((name, "must be greater than 0"))
    if config.max_connections < 1:
        problems.append(("max_connections", "must be at least 1"))
    if config.max_request_bytes_in_flight < config.max_request_body_size:
        problems.append(
            (
                "max_request_bytes_in_flight",
                "must be at least max_request_body_size, or a largest request could never be taken",
            )
        )
    return problems


# -- request bytes ------------------------------------------------------------------------------------
class ByteBudget:
    """Request bytes held at once, optionally inside a ``parent`` budget (the process-wide one).

    ``take`` is all-or-nothing across the chain. A budget with nothing taken admits any amount, so a
    request larger than the limit is never refused forever, only serialised. Event-loop only.
    """

    __slots__ = ("in_use", "limit", "parent")

    def __init__(self, limit: int, parent: ByteBudget | None = None) -> None:
        self.limit = limit
        self.in_use = 0
        self.parent = parent

    def take(self, n: int) -> bool:
        if self.in_use and self.in_use + n > self.limit:
            return False
        if self.parent is not None and not self.parent.take(n):
            return False
        self.in_use += n
        return True

    def give(self, n: int) -> None:
        self.in_use -= n
        if self.parent is not None:
            self.parent.give(n)

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """The bytes one request holds; ``cover(total)`` tops it up, ``close()`` gives all of it back."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0

    def cover(self, total: int) -> bool:
        """Hold at least ``total`` bytes; False (holding what it held) when the budget is spent."""
        more = total - self.held
        if more <= 0:
            return True
        if not self._budget.take(more):
            return False
        self.held = total
        return True

    def close(self) -> None:
        if self.held:
            self._budget.give(self.held)
            self.held = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_REQUEST_BYTES = ByteBudget(DEFAULT_REQUEST_BYTES)


def request_bytes() -> ByteBudget:
    """The process-wide budget of request bytes every receiver's budget draws from."""
    return _REQUEST_BYTES


def set_request_bytes_limit(limit: int) -> None:
    """Set the process-wide request-bytes budget (e.g. from a service setting); takes effect at once."""
    _REQUEST_BYTES.limit = limit


# -- parse slots --------------------------------------------------------------------------------------
PARSE_SLOTS = 1
"""Large bodies decoded at once, process-wide. One: json/protobuf decoders hold the GIL for a whole
call, so a second decode in parallel gains no throughput and doubles the longest event-loop stall and
the parse memory (measured: see the receivers' docs)."""
_PARSE_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def parse_slots() -> asyncio.Semaphore:
    """The running loop's semaphore for large decodes (one per loop: tests run many loops)."""
    loop = asyncio.get_running_loop()
    slots = _PARSE_SLOTS.get(loop)
    if slots is None:
        slots = _PARSE_SLOTS[loop] = asyncio.Semaphore(PARSE_SLOTS)
    return slots


# -- accept errors ------------------------------------------------------------------------------------
class AcceptErrorThrottle:
    """A loop exception handler: accept errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) become one line per
    ``interval_s`` with a count; everything else goes to ``fallback`` (the default handler)."""

    def __init__(
        self,
        fallback: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None,
        interval_s: float = ACCEPT_LOG_INTERVAL_S,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fallback = fallback
        self._interval_s = interval_s
        self._log = logger
        self._clock = clock
        self.count = 0
        """Accept errors seen since start (for self-metrics)."""
        self._unlogged = 0
        self._next_log = 0.0

    @staticmethod
    def is_accept_error(context: dict[str, Any]) -> bool:
        exc = context.get("exception")
        if not isinstance(exc, OSError) or exc.errno not in _ACCEPT_ERRNOS:
            return False
        return "accept" in str(context.get("message", ""))

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not self.is_accept_error(context):
            if self._fallback is not None:
                self._fallback(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.count += 1
        self._unlogged += 1
        now = self._clock()
        if now >= self._next_log:
            exc = context["exception"]
            sock = context.get("socket")
            where = ""
            if sock is not None:
                with contextlib.suppress(OSError, TypeError, ValueError):
                    where = " on {}:{}".format(*sock.getsockname()[:2])
            self._log.error(
                "cannot accept connections%s: %s (%d times in the last %.0fs; the open-file limit is %d)",
                where,
                os.strerror(exc.errno),
                self._unlogged,
                self._interval_s,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
            self._unlogged = 0
            self._next_log = now + self._interval_s


def install_loop_guards(
    loop: asyncio.AbstractEventLoop, logger: logging.Logger = log, *, raise_limit: bool = True
) -> AcceptErrorThrottle:
    """Startup: raise the open-file limit (unless ``raise_limit`` is False) and install the accept-
    error throttle on ``loop`` in front of its current exception handler. Returns the throttle."""
    if raise_limit:
        raise_nofile(logger)
    previous = loop.get_exception_handler()
    throttle = AcceptErrorThrottle(previous, logger=logger)
    loop.set_exception_handler(throttle)
    return throttle
