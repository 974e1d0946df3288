"""The component model: three small protocols, a factory, and the settings a component is created with.

A component module holds, in order: its type name, a frozen ``<Name>Config`` dataclass whose fields
carry one-line docstrings (the user docs), the implementation, and ``factory``. The agent creates
components from the factory, starts exporters first and receivers last, and shuts them down in the
reverse order. ``start`` binds sockets and starts owned tasks; ``shutdown`` is idempotent, safe before
``start``, and cancels and awaits every task the component owns.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import enum
import logging
import math
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.model import Batch
from agent.telemetry import ComponentTelemetry


class Signal(enum.Enum):
    METRICS = "metrics"
    TRACES = "traces"
    LOGS = "logs"


class ComponentKind(enum.Enum):
    RECEIVER = "receiver"
    PROCESSOR = "processor"
    EXPORTER = "exporter"
    CONNECTOR = "connector"


class Component(Protocol):
    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...


class Consumer(Protocol):
    """Takes batches of one signal (the pipeline's). ``consume`` may raise :class:`Backpressure` when
    the data cannot be taken now — but not inside :func:`admitted` hand-overs (see :class:`Admission`).
    A consumer never mutates a batch it was given."""

    async def consume(self, batch: Batch) -> None: ...


class Connector(Protocol):
    """An exporter of one or more pipelines and a receiver of others, possibly of another signal (the
    Collector's connectors: traces → metrics, same-signal forwarding). ``consume`` takes batches of the
    input signal from the pipelines that list it as an exporter, and hands what it produces (batches of
    the output signal) to the ``next_consumer`` it was created with — the fan-out to every pipeline
    that lists it as a receiver. It may raise :class:`Backpressure` (from ``next_consumer``) like any
    consumer; the service asks the downstream pipelines' admission checks before the upstream batch is
    handed to anyone, so within an admitted hand-over ``next_consumer`` takes what it is given."""

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def consume(self, batch: Batch) -> None: ...


class Backpressure(Exception):
    """Raised by ``consume`` when a consumer refuses a batch for now (queue full, memory limit).

    Receivers answer it with 429/503 (HTTP/gRPC) or count the points as refused (UDP).
    """

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


_ADMITTED: contextvars.ContextVar[bool] = contextvars.ContextVar("headwater_admitted", default=False)


def admitted() -> bool:
    """True while the current task hands on a batch that every admission check downstream accepted
    (:class:`Admission`): a bounded queue (``full_policy: block``) then takes the whole batch, past its
    limit if need be, instead of refusing part of it. The overshoot is at most the batches admitted
    while the queue still had room — the high-watermark of aiohttp's and aiokafka's flow control."""
    return _ADMITTED.get()


def admit() -> contextvars.Token[bool]:
    """Mark the current task's hand-over as admitted; pass the token to :func:`end_admission`."""
    return _ADMITTED.set(True)


def end_admission(token: contextvars.Token[bool]) -> None:
    _ADMITTED.reset(token)


AdmissionCheck = Callable[[Batch], Backpressure | None]
"""Answers, synchronously and without taking anything, whether a batch would be refused now."""
AdmissionRelease = Callable[[Batch], None]
"""Gives back what a check reserved for a batch it admitted that a later check refused."""


class Admission:
    """The admission checks of one component: what the service's fan-outs ask before handing a batch
    to any consumer, so that a batch refused with :class:`Backpressure` was taken by none of them and
    one accepted is taken by all (refuse before you take).

    Whatever can refuse a batch part-way registers a check here (a :class:`agent.sending.Sender` with
    ``full_policy: block`` registers itself through its exporter's ``Settings.admission``): it returns
    the refusal it would raise now, or None. A check never blocks, never awaits and takes nothing; it
    is asked with no await between it and the hand-over, so on the one event loop the answer still
    holds when the batch arrives. A component that admitted a batch then takes it whole
    (:func:`admitted` is true while it arrives). The service keeps one Admission per exporter id for
    the agent's lifetime, so a reloaded exporter's new instance answers through the same one.

    A check that must reserve what it admits (a tenant's quota: the points must not be charged again
    when they arrive) registers a ``release`` too: when a later check — of this Admission, or of
    another the same fan-out asks after it — refuses the batch, the release gives the reservation
    back, so a client's resend is not charged twice."""

    __slots__ = ("_checks", "_releases")

    def __init__(self) -> None:
        self._checks: list[AdmissionCheck] = []
        self._releases: dict[AdmissionCheck, AdmissionRelease] = {}

    def add(self, check: AdmissionCheck, release: AdmissionRelease | None = None) -> None:
        self._checks.append(check)
        if release is not None:
            self._releases[check] = release

    def remove(self, check: AdmissionCheck) -> None:
        """Drop ``check`` (a stopped sender's); nothing when it is not there. Idempotent."""
        if check in self._checks:
            self._checks.remove(check)
        self._releases.pop(check, None)

    def refusal(self, batch: Batch) -> Backpressure | None:
        """The first refusal among the checks, or None when every one admits ``batch`` (the checks
        before a refusing one release what they reserved)."""
        for i, check in enumerate(self._checks):
            refused = check(batch)
            if refused is not None:
                self._release(self._checks[:i], batch)
                return refused
        return None

    def release(self, batch: Batch) -> None:
        """``batch``, admitted by every check here, was refused by a check asked later."""
        self._release(self._checks, batch)

    def _release(self, checks: Sequence[AdmissionCheck], batch: Batch) -> None:
        if self._releases:
            for check in checks:
                release = self._releases.get(check)
                if release is not None:
                    release(batch)


class PermanentError(Exception):
    """An exporter's send failed in a way retrying cannot fix (4xx other than 429): drop and count."""

    def __init__(self, message: str, *, reason: str = "permanent_error") -> None:
        super().__init__(message)
        self.reason = reason
        """A short, bounded label for the dropped counter, e.g. ``http_400``."""


class RetryableError(Exception):
    """An exporter's send failed but may succeed later; ``retry_after_s`` is the server's requested delay."""

    def __init__(
        self, message: str, *, reason: str = "retryable", retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        """A short, bounded label for self-metrics, e.g. ``http_503``."""
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ComponentId:
    type: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> ComponentId:
        type_, _, name = text.partition("/")
        return cls(type_, name)

    def __str__(self) -> str:
        return f"{self.type}/{self.name}" if self.name else self.type


async def run_periodically(
    wait_s: Callable[[], float],
    step: Callable[[], Coroutine[Any, Any, None]],
    logger: logging.Logger,
    what: str,
) -> None:
    """Forever: sleep ``wait_s()`` seconds, then run ``step`` (a window end, an emit, a flush). A
    Backpressure refusal is logged as a warning (the step keeps what it could not send), any other
    exception with its traceback: one bad step must not stop every later one. Run it as an owned task."""
    while True:
        await asyncio.sleep(wait_s())
        try:
            await step()
        except Backpressure as exc:
            logger.warning("%s refused downstream: %s", what, exc.reason)
        except Exception:
            logger.exception("%s failed", what)


class Tasks:
    """Owns background tasks: each is kept, logged if it dies, and cancelled and awaited on close."""

    def __init__(self, owner: str, logger: logging.Logger) -> None:
        self._owner = owner
        self._logger = logger
        self._tasks: set[asyncio.Task[Any]] = set()
        self.died = 0

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        context = None
        if _ADMITTED.get():
            # A task started while a batch is being handed on (a sender opened for a new tenant) would
            # otherwise inherit the admission and take every later batch past its queue's limit.
            context = contextvars.copy_context()
            context.run(_ADMITTED.set, False)
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}:{name}", context=context)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.died += 1
            self._logger.error("task %s died: %r", task.get_name(), exc, exc_info=exc)

    async def wait(self, timeout_s: float | None = None) -> None:
        """Wait (without cancelling) until every task has ended, or ``timeout_s`` has passed."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def close(self, timeout_s: float | None = None) -> list[str]:
        """Cancel every task and wait for them to end. With ``timeout_s``, wait at most that long: a task
        still running then (it swallowed its cancellation, or its cleanup hangs) is logged with where it
        is, abandoned, and its name returned — so that it cannot hold its owner's shutdown forever."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        stuck: list[str] = []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                where = "".join(f"{f.f_code.co_filename}:{f.f_lineno} " for f in task.get_stack(limit=1))
                self._logger.error(
                    "task %s did not stop within %.1fs of being cancelled (at %s): abandoned",
                    task.get_name(),
                    timeout_s,
                    where.strip() or "?",
                )
                stuck.append(task.get_name())
        self._tasks.clear()
        return stuck


@dataclass(frozen=True)
class Settings:
    """What the agent passes to a factory besides the user's Config."""

    id: ComponentId
    kind: ComponentKind
    telemetry: ComponentTelemetry
    logger: logging.Logger
    ready: Callable[[], None] = lambda: None
    """Receivers call this once every listener is bound (drives /readyz)."""
    shutdown_timeout_s: float = 30.0
    """How long an exporter may drain its queue on shutdown before giving up (and counting the rest)."""
    stop_remaining_s: Callable[[], float] = lambda: math.inf
    """Seconds left until the agent's stop deadline (infinite until the agent stops): a drain that
    starts late (upstream components took a while to stop) still ends by then."""
    admission: Admission = field(default_factory=Admission)
    """Where the component (its senders) registers the checks the fan-outs ask before handing it a
    batch (:class:`Admission`)."""


ConfigError = tuple[str, str]
"""(path relative to the component, message): what a Config's ``validate`` returns for each problem."""


@dataclass(frozen=True)
class Factory:
    """How the agent knows a component type."""

    type: str
    kind: ComponentKind
    config_class: builtins.type[Any]
    create: Callable[..., Any]
    """(settings, config, next_consumer) for receivers, processors and connectors; (settings, config)
    for exporters. A connector's ``next_consumer`` takes batches of its output signal."""
    signals: frozenset[Signal] = frozenset({Signal.METRICS})
    """The signals a receiver, processor or exporter handles (a connector's are its ``signal_pairs``)."""
    signal_pairs: frozenset[tuple[Signal, Signal]] = frozenset()
    """A connector's supported (input signal, output signal) pairs, e.g. ``{(TRACES, METRICS)}``."""
    description: str = ""
    stability: str = "alpha"


def validate_config(config: Any) -> Iterable[ConfigError]:
    """Call a Config's optional ``validate`` method; returns its (path, message) problems."""
    validate = getattr(config, "validate", None)
    return list(validate()) if validate is not None else []
