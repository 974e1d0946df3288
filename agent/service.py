"""The running agent: builds the pipeline graph from config, owns the components' lifecycle, and applies
a changed config to the running graph.

Graph: each receiver is one instance, feeding a fan-out over the pipelines that list it; each pipeline
has its own processor instances, chained in order; each exporter is one instance shared by every
pipeline that lists it. Every edge goes through a service-owned :class:`Link`: a receiver feeds one
Link per signal, a processor feeds one Link, and an exporter is reached through its entry Link (one per
exporter id, for the agent's lifetime). A Link's target is swapped between batches — one assignment on
the loop: a batch already inside the old target finishes there, the next one goes to the new — so the
graph can change under running components without stopping them.

Connectors (``connectors:``) join pipelines: one instance per connector id and (input, output) signal
pair used (:func:`agent.config.connector_uses`; one per id in the common case) is an exporter of the
pipelines that list it under ``exporters`` — reached through its entry Link, as an exporter is — and
feeds, through a Link to a fan-out, the pipelines that list it under ``receivers``, as a receiver
feeding several pipelines does. Pipelines are built downstream first (the config refuses cycles).

Refusal is all or nothing: a receiver's fan-out asks the :class:`Admission` of every processor and
exporter of the pipelines it feeds — and, through connectors, of every pipeline downstream of them —
before the batch enters any of them, and a pipeline's fan-out asks its exporters' (and those beyond its
connectors) when a batch reaches it otherwise (a batch processor's timer): a batch refused with
Backpressure was taken by none, one accepted is taken whole by all (:class:`Fanout`). Across a
connector that changes the signal the checks are asked with the input batch (its size stands for the
output's, which is not known before the connector has run).

Start: exporters, then processors and connectors from the last pipeline downstream to the first (a
connector after the pipelines it feeds, before those that feed it), then receivers (nothing is received
before it can be sent), then the loop watchdog. Stop: receivers first (they flush what they aggregated),
then processors and connectors upstream first, then exporters, which drain their queues until the
shutdown deadline; a component still stopping is named by :meth:`Agent.stopping_components` (the caller
enforces the overall deadline).

Reload (:meth:`Agent.reload`), the contract:

- Unchanged components keep running, with their sockets, state and queues: an exporter or a receiver
  with the same id and an equal Config (a receiver also feeding the same signals), a processor with the
  same id and Config at the same position of the same pipeline. Only the Links downstream of them are
  re-pointed. Intake on an unchanged receiver never pauses.
- Before anything changes, the machine is checked for what the new config adds (a port or a directory
  problem the running config does not already have): any problem refuses the reload, nothing changed.
- Components with new ids are created and started next; if one cannot start, they are stopped again and
  the reload is refused: the running graph was never touched.
- A changed exporter is replaced in place. Its entry Link pauses (consume calls wait; none is refused),
  the calls already inside it finish, the old instance hands its queue over (``hand_over``: memory —
  the queued requests, one being sent included, so at least once; disk — the partition is synced,
  closed and unlocked with its records), the successor is created, started, takes the queue
  (``adopt``) and the Link resumes onto it. The pause lasts as long as closing the one and starting the
  other: milliseconds, plus a disk queue's recovery scan. An exporter without ``hand_over`` (the pull
  endpoint, debug) is shut down first — the pull endpoint's port is closed for that time.
- A changed receiver is restarted on the same Links: the old one is stopped — sockets closed, its
  aggregate flushed — and the successor started, so intake on that receiver pauses for that time
  (measured ~1-5 ms on loopback; TCP clients of the old socket are disconnected and reconnect). Not
  beside it first: the successor would take over a Unix socket path (the stale-socket cleanup unlinks
  the running one's file) and the old one's shutdown would then unlink the successor's.
- A connector is kept like a processor (same id, signal pair and Config: only the Link to the
  pipelines it feeds is re-pointed); a new or changed one is created and started beside the running
  graph, after the new pipelines it feeds, and the upstream fan-outs are re-pointed onto it.
- Removed components retire in the background, without holding up the new pipelines: removed receivers
  stop first (before new receivers bind: one may take over the address), then the processors and
  connectors no longer used (upstream first: they flush into what follows), then removed exporters
  drain within shutdown_timeout as at shutdown. They show in ``status()`` as ``retiring`` until done.
- If a replacement cannot start although the checks passed, every step is undone — replaced components
  get back a fresh instance of their previous Config (queues handed back), new ones stop, Links point
  back — and the reload reports failure. That undo is the only case with a gap.

Components of every generation share the agent's :class:`Telemetry` (counters continue across reloads);
each instance sees it through a scope whose ``unregister_gauges`` drops only its own gauges, so a
predecessor stopping never drops its successor's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.component import (
    Admission,
    Backpressure,
    ComponentId,
    ComponentKind,
    Consumer,
    Settings,
    Signal,
    Tasks,
    admit,
    admitted,
    end_admission,
)
from agent.config import AgentConfig, ComponentSpec, ConnectorUse, connector_uses
from agent.model import Batch
from agent.tap import Direction, TapEdge, TapHub, TapPoint
from agent.telemetry import ComponentTelemetry, HistogramCell, Telemetry
from agent.vitals import Vitals, close_receipt, open_receipt

log = logging.getLogger("headwater.service")

PAUSE_LIMIT_S = 10.0
"""How long a replacement waits for the consume calls already inside the old exporter to finish."""


class Fanout:
    """Hands one batch to every consumer, or to none: a batch refused with :class:`Backpressure` was
    taken by no consumer, one accepted is taken by all — so a client retrying after a 429 never
    duplicates data in the consumers that had taken it.

    Before any consumer gets the batch, every gate (the :class:`Admission` of each exporter — and
    processor — downstream, through any processors and pipelines in between) is asked, synchronously:
    the first refusal is raised and nothing was taken. The batch is then handed on :func:`admitted`, so
    a bounded queue downstream takes all of it even if another batch filled it meanwhile, and the
    fan-outs further down (a pipeline's over its exporters) do not ask again. Outside an admitted
    hand-over (a batch processor's timer flush) a fan-out asks its own gates.

    What no check foresees (a filesystem that fills up, a per-tenant queue, a consumer that registers
    no check) can still refuse inside: the others still get the batch (one consumer's backpressure does
    not starve them) and the first refusal is raised afterwards, as before."""

    __slots__ = ("_consumers", "_gates")

    def __init__(self, consumers: Sequence[Consumer], gates: Sequence[Admission] = ()) -> None:
        self._consumers = tuple(consumers)
        self._gates = tuple(gates)

    async def consume(self, batch: Batch) -> None:
        token = None
        if not admitted():
            for i, gate in enumerate(self._gates):
                refused = gate.refusal(batch)
                if refused is not None:
                    for earlier in self._gates[:i]:  # they admitted it: give back what they reserved
                        earlier.release(batch)
                    raise refused
            # No await between the checks above and the hand-over below: on the one loop the
            # answers still hold.
            token = admit()
        try:
            if len(self._consumers) == 1:
                await self._consumers[0].consume(batch)
                return
            refused = None
            for consumer in self._consumers:
                try:
                    await consumer.consume(batch)
                except Backpressure as exc:
                    refused = refused or exc
            if refused is not None:
                raise refused
        finally:
            if token is not None:
                end_admission(token)


class Link:
    """A service-owned edge of the graph: passes each batch to ``target``, which a reload swaps between
    batches. ``pause`` makes new calls wait (not refused) until ``resume``; ``quiesce`` waits until no
    call is inside the target. The first Link a batch passes stamps its receipt time for the exporters'
    latency (:func:`agent.vitals.open_receipt`). One attribute read, a ContextVar lookup and a counter
    per batch: never per point.

    ``tap`` is set by the agent's :class:`agent.tap.TapHub` while someone watches this edge, and is
    given each batch the target took; None (nobody watches) costs one attribute read a batch."""

    __slots__ = ("_active", "_gate", "_quiet", "tap", "target")

    def __init__(self, target: Consumer) -> None:
        self.target = target
        self.tap: Callable[[Batch], None] | None = None
        self._gate: asyncio.Event | None = None
        self._active = 0
        self._quiet: asyncio.Event | None = None

    async def consume(self, batch: Batch) -> None:
        while self._gate is not None:
            await self._gate.wait()
        self._active += 1
        receipt = open_receipt()
        try:
            await self.target.consume(batch)
        finally:
            close_receipt(receipt)
            self._active -= 1
            if self._active == 0 and self._quiet is not None:
                self._quiet.set()
        tap = self.tap
        if tap is not None:
            tap(batch)

    def pause(self) -> None:
        if self._gate is None:
            self._gate = asyncio.Event()

    def resume(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    async def quiesce(self, timeout_s: float) -> bool:
        """Wait until no call is inside the target; False if some still are after ``timeout_s``."""
        if self._active == 0:
            return True
        self._quiet = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await self._quiet.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._quiet = None


_ReaderKey = tuple[str, tuple[tuple[str, str], ...]]


class _Readers:
    """Every gauge and counter reader the component instances of one agent registered, per metric and
    label set, oldest first. Instances of two generations share labels (a changed processor is created
    beside the running one before a reload is applied; a re-added exporter beside the one retiring):
    the agent's registry reads the newest one still registered, and when that one goes, the one before
    it is read again — a refused reload must not take a running component's gauge with it."""

    def __init__(self, root: Telemetry) -> None:
        self.root = root
        self._stacks: dict[_ReaderKey, list[tuple[_ComponentScope, Callable[[], float], bool, str]]] = {}

    def add(
        self,
        scope: _ComponentScope,
        name: str,
        help: str,
        read: Callable[[], float],
        counter: bool,
        labels: dict[str, str],
    ) -> None:
        (self.root.counter_reader if counter else self.root.gauge)(name, help, read, **labels)
        self._stacks.setdefault((name, tuple(sorted(labels.items()))), []).append(
            (scope, read, counter, help)
        )

    def remove(
        self, scope: _ComponentScope, name: str, read: Callable[[], float], labels: dict[str, str]
    ) -> None:
        key = (name, tuple(sorted(labels.items())))
        stack = self._stacks.get(key, [])
        for i in reversed(range(len(stack))):
            if stack[i][0] is scope and stack[i][1] is read:
                del stack[i]
                break
        if stack:
            _, top, counter, help = stack[-1]
            (self.root.counter_reader if counter else self.root.gauge)(name, help, top, **labels)
        else:
            self._stacks.pop(key, None)
            self.root.unregister_reader(name, read, **labels)


class _ComponentScope(Telemetry):
    """The agent's :class:`Telemetry` as one component instance sees it: the same cells and families,
    but ``unregister_gauges`` drops only the gauges this instance registered (see :class:`_Readers`)."""

    def __init__(self, readers: _Readers) -> None:
        # No super().__init__(): a scope has no registry of its own, everything goes to the root.
        self._all = readers
        self._root = root = readers.root
        self.registry = root.registry
        self.started_monotonic = root.started_monotonic
        self._readers: list[tuple[str, Callable[[], float], dict[str, str]]] = []

    def counter(self, name: str, help: str, **labels: str) -> Any:
        return self._root.counter(name, help, **labels)

    def histogram(self, name: str, help: str, buckets: tuple[float, ...], **labels: str) -> HistogramCell:
        return self._root.histogram(name, help, buckets, **labels)

    def gauge(self, name: str, help: str, read: Callable[[], float], **labels: str) -> None:
        self._all.add(self, name, help, read, False, labels)
        self._readers.append((name, read, labels))

    def counter_reader(self, name: str, help: str, read: Callable[[], float], **labels: str) -> None:
        self._all.add(self, name, help, read, True, labels)
        self._readers.append((name, read, labels))

    def unregister_gauges(self, **labels: str) -> None:
        """Drop this instance's readers whose labels include ``labels`` (all of them without any)."""
        kept = []
        for name, read, own in self._readers:
            if all(own.get(k) == v for k, v in labels.items()):
                self._all.remove(self, name, read, own)
            else:
                kept.append((name, read, own))
        self._readers = kept

    def unregister_reader(self, name: str, read: Callable[[], float], **labels: str) -> None:
        if (name, read, labels) in self._readers:
            self._readers.remove((name, read, labels))
            self._all.remove(self, name, read, labels)

    def value(self, name: str, **labels: str) -> float:
        return self._root.value(name, **labels)

    def collect(self) -> Any:
        return self._root.collect()


class _Running:
    """One component instance in the graph and where it sits."""

    def __init__(
        self,
        spec: ComponentSpec,
        instance: Any,
        pipeline: str = "",
        position: int = 0,
        *,
        link: Link | None = None,
        links: dict[Signal, Link] | None = None,
        scope: _ComponentScope | None = None,
        admission: Admission | None = None,
        entry: Link | None = None,
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.kind = spec.kind
        self.instance = instance
        self.pipeline = pipeline
        self.position = position
        self.link = link
        """A processor's or connector's downstream Link."""
        self.entry = entry
        """A connector's entry Link: what the fan-outs of the pipelines feeding it hand batches to."""
        self.links: dict[Signal, Link] = links or {}
        """A receiver's Link per signal."""
        self.scope = scope
        """What the instance registered in the agent's telemetry."""
        self.admission = admission or Admission()
        """The checks the fan-outs upstream ask before handing it a batch."""
        self.state = "created"

    def release_gauges(self) -> None:
        """Drop the gauges and readers of an instance that has stopped (whether it dropped them or not):
        /metrics must not read a retired component, nor keep it alive."""
        if self.scope is not None:
            self.scope.unregister_gauges()

    @property
    def label(self) -> str:
        return str(self.id) + (f"@{self.pipeline}" if self.pipeline else "")


def _same(a: ComponentSpec, b: ComponentSpec) -> bool:
    return a.factory is b.factory and a.config == b.config


@dataclass
class _Plan:
    """What applying a config to the running graph takes (everything new is created, nothing started)."""

    config: AgentConfig
    exporters: dict[ComponentId, _Running] = field(default_factory=dict)
    """The new graph's exporters, changed ones still as their running predecessor."""
    exporters_new: list[_Running] = field(default_factory=list)
    exporters_changed: list[tuple[_Running, ComponentSpec]] = field(default_factory=list)
    exporters_removed: list[_Running] = field(default_factory=list)
    entries_new: dict[ComponentId, Link] = field(default_factory=dict)
    processors: list[_Running] = field(default_factory=list)
    processors_new: list[_Running] = field(default_factory=list)
    processors_retired: list[_Running] = field(default_factory=list)
    receivers: dict[ComponentId, _Running] = field(default_factory=dict)
    """The new graph's receivers, changed ones still as their running predecessor."""
    receivers_new: list[_Running] = field(default_factory=list)
    receivers_changed: list[tuple[_Running, ComponentSpec, dict[Signal, Link]]] = field(default_factory=list)
    receivers_removed: list[_Running] = field(default_factory=list)
    connectors: dict[_NodeKey, _Running] = field(default_factory=dict)
    connectors_new: list[_Running] = field(default_factory=list)
    connectors_retired: list[_Running] = field(default_factory=list)
    ranks: dict[int, int] = field(default_factory=dict)
    """Start rank of each processor and connector (by ``id()``): downstream ones lower (see _Ranks)."""
    swaps: list[tuple[Link, Consumer]] = field(default_factory=list)

    def middle(self, running: Sequence[_Running]) -> list[_Running]:
        """``running`` (processors and connectors) in start order: downstream first."""
        return sorted(running, key=lambda r: self.ranks.get(id(r), 0))


_NodeKey = tuple[ComponentId, Signal, Signal]
"""A connector instance: (connector id, input signal, output signal)."""


class _Undo:
    """Steps that undo a reload in progress, run newest first."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], Awaitable[object]]] = []

    def add(self, step: Callable[[], Awaitable[object]]) -> None:
        self._steps.append(step)

    async def run(self) -> None:
        for step in reversed(self._steps):
            try:
                await step()
            except Exception as exc:  # keep undoing: each step restores a separate component
                log.error("undoing the reload: %r", exc, exc_info=exc)
        self._steps.clear()


def added_environment_problems(old: AgentConfig | None, new: AgentConfig) -> list[str]:
    """What ``new`` needs of the machine that is not there (ports free, directories writable), leaving
    out what the running config ``old`` already holds: the same problem text (which names the address
    or directory) among old's is the running agent's own socket or queue. Blocking (tries binds)."""
    problems: list[str] = []
    for section in ("receivers", "exporters"):
        new_specs: dict[ComponentId, ComponentSpec] = getattr(new, section)
        old_specs: dict[ComponentId, ComponentSpec] = getattr(old, section) if old is not None else {}
        held: set[str] | None = None
        for cid, spec in new_specs.items():
            check = getattr(spec.config, "environment_problems", None)
            if check is None or (cid in old_specs and _same(old_specs[cid], spec)):
                continue
            found = check()
            if found and held is None:
                held = {
                    msg
                    for o in old_specs.values()
                    for _, msg in (getattr(o.config, "environment_problems", lambda: [])())
                }
            problems += [f"{section}::{cid}::{path}: {msg}" for path, msg in found if msg not in (held or ())]
    return problems


def _scope(settings: Settings) -> _ComponentScope:
    scope = settings.telemetry.telemetry
    assert isinstance(scope, _ComponentScope)
    return scope


async def _point(link: Link, target: Consumer) -> None:
    link.target = target


def _levels(config: AgentConfig, uses: Sequence[ConnectorUse]) -> dict[str, int]:
    """Each pipeline's distance from the end of the graph: 0 for one that feeds no connector, else one
    more than the farthest pipeline its connectors feed (the config refuses cycles)."""
    feeds: dict[str, set[str]] = {}
    for use in uses:
        for up in use.upstream:
            feeds.setdefault(up, set()).update(use.downstream)
    levels: dict[str, int] = {}

    def level(pid: str) -> int:
        found = levels.get(pid)
        if found is None:
            found = levels[pid] = 1 + max((level(q) for q in feeds.get(pid, ())), default=-1)
        return found

    for pipeline in config.pipelines:
        level(pipeline.id)
    return levels


class Agent:
    """One agent for the life of the process: ``start``, any number of ``reload``, then ``stop``.
    ``stop`` is idempotent and safe before ``start``."""

    def __init__(self, config: AgentConfig, telemetry: Telemetry | None = None) -> None:
        self.config = config
        self.telemetry = telemetry or Telemetry()
        self.started_at = time.time()
        self._entries: dict[ComponentId, Link] = {}
        self._admissions: dict[ComponentId, Admission] = {}
        """Per exporter id, for the agent's lifetime (as its entry Link): every instance of a reloaded
        exporter answers through the same one, so the fan-outs built earlier keep asking the right one."""
        self._exporters: dict[ComponentId, _Running] = {}
        self._processors: list[_Running] = []
        """In creation order — each pipeline from its end — so reversed() is upstream first."""
        self._receivers: dict[ComponentId, _Running] = {}
        self._connectors: dict[_NodeKey, _Running] = {}
        self._ranks: dict[int, int] = {}
        self._retiring: list[_Running] = []
        self._not_ready: set[str] = set()
        self.stopping = False
        self._stopped = False
        self._stop_deadline: float | None = None
        self._tasks = Tasks("agent", log)
        self._retirements = Tasks("agent-retire", log)
        self._readers = _Readers(self.telemetry)
        self._reloading = asyncio.Lock()
        self.tap = TapHub(self.telemetry, config.service.telemetry.tap)
        """The live stream and the top-metrics tracker over this agent's edges, across reloads."""
        self._graph_watchers: list[Callable[[], None]] = []
        self.loop_lag_max_s = 0.0
        self.vitals = Vitals(self.telemetry)
        self.telemetry.gauge(
            "event_loop_lag_max_seconds",
            "Longest the event loop was late to wake a 20ms timer since start (a stall blocks every socket).",
            lambda: self.loop_lag_max_s,
        )
        plan = self._plan(config)
        self._entries.update(plan.entries_new)
        self._exporters = plan.exporters
        self._processors = plan.processors
        self._receivers = plan.receivers
        self._connectors = plan.connectors
        self._ranks = plan.ranks

    # -- graph -------------------------------------------------------------------------------------
    def _settings(self, config: AgentConfig, spec: ComponentSpec, suffix: str = "") -> Settings:
        kind = spec.kind.value
        label = str(spec.id) + suffix
        ready_key = f"{kind}:{label}"

        def ready() -> None:
            self._not_ready.discard(ready_key)

        if spec.kind is ComponentKind.RECEIVER:
            self._not_ready.add(ready_key)
        return Settings(
            id=spec.id,
            kind=spec.kind,
            telemetry=ComponentTelemetry(_ComponentScope(self._readers), kind, label),
            logger=logging.getLogger(f"headwater.{kind}.{label}"),
            ready=ready,
            shutdown_timeout_s=config.service.shutdown_timeout,
            stop_remaining_s=self._stop_remaining,
            admission=(
                self._admissions.setdefault(spec.id, Admission())
                if spec.kind is ComponentKind.EXPORTER
                else Admission()
            ),
        )

    def _exporter(self, config: AgentConfig, spec: ComponentSpec) -> _Running:
        settings = self._settings(config, spec)
        instance = spec.factory.create(settings, spec.config)
        return _Running(spec, instance, scope=_scope(settings), admission=settings.admission)

    def _connector(
        self, config: AgentConfig, plan: _Plan, key: _NodeKey, target: Consumer, suffix: str
    ) -> _Running:
        """The connector instance ``key`` of the new graph, feeding ``target``: the running one when its
        Config is unchanged (its Link re-pointed at ``target`` when the plan is applied), else a new one."""
        spec = config.connectors[key[0]]
        old = self._connectors.get(key)
        if old is not None and _same(old.spec, spec):
            assert old.link is not None
            plan.swaps.append((old.link, target))
            plan.connectors[key] = old
            return old
        link = Link(target)
        settings = self._settings(config, spec, suffix)
        instance = spec.factory.create(settings, spec.config, link)
        running = _Running(spec, instance, link=link, scope=_scope(settings), entry=Link(instance))
        plan.connectors[key] = running
        plan.connectors_new.append(running)
        return running

    def _receiver(self, config: AgentConfig, spec: ComponentSpec, links: dict[Signal, Link]) -> _Running:
        consumers: dict[Signal, Consumer] = dict(links)
        settings = self._settings(config, spec)
        instance = spec.factory.create(settings, spec.config, consumers)
        return _Running(spec, instance, links=links, scope=_scope(settings))

    def _plan(self, config: AgentConfig) -> _Plan:
        """Match ``config`` against the running graph (empty before start) and create what is new."""
        plan = _Plan(config)
        for cid, spec in config.exporters.items():
            old = self._exporters.get(cid)
            if old is None:
                running = self._exporter(config, spec)
                plan.exporters_new.append(running)
                plan.entries_new[cid] = Link(running.instance)
                plan.exporters[cid] = running
                continue
            if not _same(old.spec, spec):
                plan.exporters_changed.append((old, spec))
            plan.exporters[cid] = old
        plan.exporters_removed = [r for cid, r in self._exporters.items() if cid not in config.exporters]
        entries = {**self._entries, **plan.entries_new}

        by_place = {(p.pipeline, p.position): p for p in self._processors}
        heads: dict[ComponentId, dict[Signal, list[Consumer]]] = {}
        # What a receiver's fan-out asks before a batch enters any of its pipelines: every processor
        # and exporter in each of them, and in every pipeline downstream of their connectors.
        gates: dict[ComponentId, dict[Signal, dict[int, Admission]]] = {}
        uses = connector_uses(config)
        levels = _levels(config, uses)
        pipeline_heads: dict[str, Consumer] = {}
        pipeline_gates: dict[str, dict[int, Admission]] = {}
        node_entries: dict[_NodeKey, Link] = {}
        labels = {u.id: sum(1 for v in uses if v.id == u.id) for u in uses}
        # Downstream pipelines first: what a connector feeds exists before the connector is created.
        for pipeline in sorted(config.pipelines, key=lambda p: levels[p.id]):
            exporter_gates = [plan.exporters[e].admission for e in pipeline.exporters]
            consumers: list[Consumer] = [entries[e] for e in pipeline.exporters]
            beyond: dict[int, Admission] = {}
            for use in uses:
                if pipeline.id not in use.upstream:
                    continue
                key = (use.id, use.input, use.output)
                if key not in node_entries:
                    down = {i: g for q in use.downstream for i, g in pipeline_gates[q].items()}
                    target = Fanout([pipeline_heads[q] for q in use.downstream], list(down.values()))
                    suffix = f"@{use.input.value}-to-{use.output.value}" if labels[use.id] > 1 else ""
                    running = self._connector(config, plan, key, target, suffix)
                    plan.ranks[id(running)] = 2 * max(levels[q] for q in use.downstream) + 1
                    assert running.entry is not None
                    node_entries[key] = running.entry
                consumers.append(node_entries[key])
                for q in use.downstream:
                    beyond.update(pipeline_gates[q])
            own = {id(g) for g in exporter_gates}
            exporter_gates += [g for i, g in beyond.items() if i not in own]
            nxt: Consumer = Fanout(consumers, exporter_gates)
            first = len(plan.processors)
            for position in reversed(range(len(pipeline.processors))):
                spec = config.processors[pipeline.processors[position]]
                old = by_place.get((pipeline.id, position))
                if old is not None and _same(old.spec, spec):
                    assert old.link is not None
                    plan.swaps.append((old.link, nxt))
                    plan.processors.append(old)
                else:
                    link = Link(nxt)
                    settings = self._settings(config, spec, f"@{pipeline.id}")
                    instance = spec.factory.create(settings, spec.config, link)
                    running = _Running(
                        spec,
                        instance,
                        pipeline.id,
                        position,
                        link=link,
                        scope=_scope(settings),
                        admission=settings.admission,
                    )
                    plan.processors.append(running)
                    plan.processors_new.append(running)
                plan.ranks[id(plan.processors[-1])] = 2 * levels[pipeline.id]
                nxt = plan.processors[-1].instance
            own_gates = [p.admission for p in reversed(plan.processors[first:])] + exporter_gates
            pipeline_gates[pipeline.id] = {id(g): g for g in own_gates}
            pipeline_heads[pipeline.id] = nxt
            for rid in pipeline.receivers:
                heads.setdefault(rid, {}).setdefault(pipeline.signal, []).append(nxt)
                known = gates.setdefault(rid, {}).setdefault(pipeline.signal, {})
                known.update((id(g), g) for g in own_gates)
        kept = {id(p) for p in plan.processors}
        plan.processors_retired = [p for p in self._processors if id(p) not in kept]
        plan.connectors_retired = [
            r for key, r in self._connectors.items() if plan.connectors.get(key) is not r
        ]

        for rid, by_signal in heads.items():
            spec = config.receivers[rid]
            targets: dict[Signal, Consumer] = {
                signal: Fanout(cs, list(gates[rid][signal].values())) for signal, cs in by_signal.items()
            }
            old = self._receivers.get(rid)
            if old is None:
                running = self._receiver(config, spec, {s: Link(t) for s, t in targets.items()})
                plan.receivers_new.append(running)
                plan.receivers[rid] = running
                continue
            plan.swaps += [(old.links[s], t) for s, t in targets.items() if s in old.links]
            if not (set(old.links) == set(targets) and _same(old.spec, spec)):
                links = {s: old.links[s] if s in old.links else Link(t) for s, t in targets.items()}
                plan.receivers_changed.append((old, spec, links))
            plan.receivers[rid] = old
        plan.receivers_removed = [r for rid, r in self._receivers.items() if rid not in heads]
        return plan

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start exporters, processors, then receivers. On failure, shut down the component that failed
        (whatever it opened before failing), stop what started, and re-raise."""
        try:
            for group in self._groups(start=True):
                for running in group:
                    log.debug("starting %s %s", running.kind.value, running.label)
                    await running.instance.start()
                    running.state = "running"
        except BaseException as exc:
            log.error("cannot start %s %s: %s", running.kind.value, running.label, exc)
            if running.state == "created":
                await self._shut_down_failed(running)
            await self.stop()
            raise
        self.vitals.start()
        self._tasks.spawn(self._watch_loop(), "loop-lag")
        self.tap.set_edges(self._tap_edges())
        log.info(
            "started: %d receivers, %d processors, %d connectors, %d exporters, pipelines %s",
            len(self._receivers),
            len(self._processors),
            len(self._connectors),
            len(self._exporters),
            ", ".join(p.id for p in self.config.pipelines),
        )

    def _groups(self, *, start: bool) -> list[list[_Running]]:
        exporters, receivers = list(self._exporters.values()), list(self._receivers.values())
        middle = sorted(
            [*self._processors, *self._connectors.values()], key=lambda r: self._ranks.get(id(r), 0)
        )
        if start:
            return [exporters, middle, receivers]
        return [receivers, list(reversed(middle)), exporters]

    async def stop(self) -> None:
        """Stop receivers (they flush), processors, then exporters (they drain), and wait for components
        retiring after a reload. ``service.shutdown_timeout`` from now is one deadline for all of it:
        exporters drain until then at most, and are stopped then (memory queues counted as dropped,
        disk queues closed) even if a receiver or processor is still stopping. The caller bounds the
        whole (see :meth:`stopping_components`)."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping = True
        self._stop_deadline = time.monotonic() + self.config.service.shutdown_timeout
        await self._tasks.close()
        self.vitals.stop()
        async with self._reloading:  # a reload in progress finishes first (it is bounded)
            retiring = asyncio.ensure_future(self._retirements.wait())
            receivers, processors, exporters = self._groups(start=False)
            upstream = asyncio.ensure_future(self._stop_upstream(receivers, processors))
            await asyncio.wait({upstream}, timeout=max(0.0, self._stop_remaining()))
            if not upstream.done():
                log.error(
                    "shutdown_timeout reached while %s still stopping: stopping the exporters now",
                    ", ".join(self.stopping_components()) or "receivers and processors",
                )
            await self._stop_group(exporters)
            await upstream
            await retiring

    async def _stop_upstream(self, receivers: Sequence[_Running], processors: Sequence[_Running]) -> None:
        await self._stop_group(receivers)
        for running in processors:  # one at a time, upstream first: each flushes into the next
            await self._stop_group([running])

    def _stop_remaining(self) -> float:
        """Seconds until the stop deadline; infinite until :meth:`stop` (a retiring exporter drains for
        its own shutdown_timeout), and what ``Settings.stop_remaining_s`` reads."""
        deadline = self._stop_deadline
        return math.inf if deadline is None else deadline - time.monotonic()

    async def _stop_group(self, group: Sequence[_Running]) -> None:
        results = await asyncio.gather(
            *(self._stop_one(r) for r in group if r.state == "running"), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                log.error("error during shutdown: %r", r)

    async def _stop_one(self, running: _Running) -> None:
        running.state = "stopping"
        try:
            await running.instance.shutdown()
        finally:
            running.state = "stopped"
            running.release_gauges()

    async def _start_one(self, running: _Running) -> bool:
        """Start one component; on failure log it, stop what it started, and return False."""
        try:
            await running.instance.start()
        except Exception as exc:
            log.error("cannot start %s %s: %s", running.kind.value, running.label, exc)
            await self._shut_down_failed(running)
            return False
        running.state = "running"
        return True

    async def _shut_down_failed(self, running: _Running) -> None:
        """Shut down a component whose ``start`` raised, releasing what it opened before failing (a
        port, a task, a file). Logs its error rather than raising it (but for cancellation)."""
        try:
            await running.instance.shutdown()
        except Exception as stop_exc:
            log.error("stopping %s %s after a failed start: %r", running.kind.value, running.label, stop_exc)
        running.state = "stopped"
        running.release_gauges()
        if running.kind is ComponentKind.RECEIVER:
            self._not_ready.discard(f"receiver:{running.label}")

    def stopping_components(self) -> list[str]:
        """The components still stopping (or retiring after a reload), as ``kind id``."""
        everything = [
            *self._receivers.values(),
            *self._processors,
            *self._connectors.values(),
            *self._exporters.values(),
            *self._retiring,
        ]
        return [f"{r.kind.value} {r.label}" for r in everything if r.state == "stopping"]

    async def _watch_loop(self, period_s: float = 0.02) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(period_s)
            lag = loop.time() - before - period_s
            self.vitals.observe_loop_lag(lag)
            if lag > self.loop_lag_max_s:
                self.loop_lag_max_s = lag
                if lag > 0.1:
                    log.warning("event loop stalled for %.0f ms", lag * 1000)

    def loop_lag_s(self) -> float:
        """The event loop's lag at the watcher's latest 20 ms timer, in seconds (0 before start)."""
        return self.vitals.loop_lag_s()

    # -- reload ------------------------------------------------------------------------------------
    async def reload(self, config: AgentConfig) -> bool:
        """Apply ``config`` to the running graph (see the module doc). True when it runs now; False when
        it was refused (logged) and the previous config keeps running."""
        async with self._reloading:
            if self.stopping:
                return False
            problems = await asyncio.to_thread(added_environment_problems, self.config, config)
            if problems:
                log.error(
                    "reload refused, the running config stays: the machine is not ready (%d):", len(problems)
                )
                for problem in problems:
                    log.error("  %s", problem)
                return False
            plan = self._plan(config)
            undo = _Undo()
            try:
                applied = await self._apply(plan, undo)
            except BaseException:
                await undo.run()
                await self._discard(plan)
                self._graph_changed()
                raise
            if not applied:
                await undo.run()
                await self._discard(plan)
                self._graph_changed()  # an undone receiver restarted on new Links
                return False
            self._install(plan)
            self.tap.configure(config.service.telemetry.tap)
            self._graph_changed()
            return True

    def watch_graph(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` on the agent's loop after every reload (applied or undone): running
        components may have been replaced (agent.capture re-hooks its receivers)."""
        self._graph_watchers.append(changed)

    def _graph_changed(self) -> None:
        self.tap.set_edges(self._tap_edges())
        for changed in list(self._graph_watchers):
            try:
                changed()
            except Exception:  # one watcher's bug must not fail a reload that is done
                log.exception("a graph watcher failed after a reload")

    def _tap_edges(self) -> list[TapEdge]:
        """Every Link of the running graph with the component ends it joins (see :mod:`agent.tap`): a
        receiver's and a connector's output also enter the first processor of the pipelines they feed,
        a processor's output the next processor."""
        first: dict[str, str] = {}
        by_place = {(r.pipeline, r.position): r for r in self._processors}
        for r in self._processors:
            if r.position == 0:
                first[r.pipeline] = r.label

        def entering(source: ComponentId, signal: Signal, connector: bool) -> list[TapPoint]:
            return [
                TapPoint(first[p.id], "processor", Direction.IN, p.id)
                for p in self.config.pipelines
                if p.signal is signal
                and p.id in first
                and source in (p.connectors_in if connector else p.receivers)
            ]

        edges = []
        for r in self._receivers.values():
            for signal, link in r.links.items():
                out = TapPoint(r.label, "receiver", Direction.OUT)
                edges.append(TapEdge(link, (out, *entering(r.id, signal, False))))
        for r in self._processors:
            assert r.link is not None
            points = [TapPoint(r.label, "processor", Direction.OUT, r.pipeline)]
            nxt = by_place.get((r.pipeline, r.position + 1))
            if nxt is not None:
                points.append(TapPoint(nxt.label, "processor", Direction.IN, nxt.pipeline))
            edges.append(TapEdge(r.link, tuple(points)))
        for (cid, _, output), r in self._connectors.items():
            assert r.link is not None and r.entry is not None
            edges.append(TapEdge(r.entry, (TapPoint(str(cid), "connector", Direction.IN),)))
            out = TapPoint(str(cid), "connector", Direction.OUT)
            edges.append(TapEdge(r.link, (out, *entering(cid, output, True))))
        for cid, link in self._entries.items():
            if cid in self._exporters:
                edges.append(TapEdge(link, (TapPoint(str(cid), "exporter", Direction.IN),)))
        return edges

    async def _apply(self, plan: _Plan, undo: _Undo) -> bool:
        config = plan.config
        # 1. What is new starts beside the running graph: a failure here leaves it untouched.
        for running in [*plan.exporters_new, *plan.middle([*plan.processors_new, *plan.connectors_new])]:
            if not await self._start_one(running):
                return False
            undo.add(functools.partial(self._stop_one, running))
        # 2. The new graph takes over the Links of what is kept.
        for link, target in plan.swaps:
            undo.add(functools.partial(_point, link, link.target))
            link.target = target
        # 3. Changed exporters hand their queues to their successors.
        for old, spec in plan.exporters_changed:
            new = await self._replace_exporter(config, old, spec)
            if new is None:
                return False
            plan.exporters[old.id] = new
            undo.add(functools.partial(self._replace_exporter, self.config, new, old.spec))
        # 4. Receivers: removed ones stop (a new one may take over their address), changed ones restart.
        for old in plan.receivers_removed:
            await self._stop_one(old)
            self._not_ready.discard(f"receiver:{old.label}")
            undo.add(functools.partial(self._restore_receiver, old))
        for old, spec, links in plan.receivers_changed:
            new = await self._replace_receiver(config, old, spec, links)
            if new is None:
                return False
            plan.receivers[old.id] = new
            undo.add(functools.partial(self._replace_receiver, self.config, new, old.spec, old.links))
        for running in plan.receivers_new:
            if not await self._start_one(running):
                return False
            undo.add(functools.partial(self._stop_receiver, running))
        return True

    def _install(self, plan: _Plan) -> None:
        self.config = plan.config
        self._entries.update(plan.entries_new)
        removed = plan.exporters_removed
        removed_entries = [self._entries.pop(r.id) for r in removed]
        self._exporters = plan.exporters
        self._processors = plan.processors
        self._receivers = plan.receivers
        self._connectors = plan.connectors
        # Retired processors and connectors in the old graph's start order (downstream first).
        retired = sorted(
            [*plan.processors_retired, *plan.connectors_retired], key=lambda r: self._ranks.get(id(r), 0)
        )
        self._ranks = plan.ranks
        if retired or removed:
            self._retiring += [*retired, *removed]
            self._retirements.spawn(self._retire(retired, removed, removed_entries), "retire")

    async def _discard(self, plan: _Plan) -> None:
        """Release what a refused plan created and never started (gauges, readiness keys)."""
        created = [*plan.exporters_new, *plan.processors_new, *plan.connectors_new, *plan.receivers_new]
        for running in created:
            if running.state == "created":
                running.state = "stopped"
                try:
                    await running.instance.shutdown()
                except Exception as exc:
                    log.error("releasing %s %s: %r", running.kind.value, running.label, exc)
                running.release_gauges()
        for running in plan.receivers_new:
            self._not_ready.discard(f"receiver:{running.label}")

    async def _retire(
        self, processors: Sequence[_Running], exporters: Sequence[_Running], entries: Sequence[Link]
    ) -> None:
        """Stop what a reload left out, in the background: processors and connectors (``processors``,
        in start order) upstream first (each flushes into what follows), then removed exporters once
        nothing is inside them, draining as at shutdown."""
        try:
            for running in reversed(processors):
                if running.state == "running":
                    try:
                        await self._stop_one(running)
                    except Exception as exc:
                        log.error("stopping %s %s: %r", running.kind.value, running.label, exc)
            for link in entries:
                await link.quiesce(PAUSE_LIMIT_S)
            await self._stop_group(exporters)
            if exporters or processors:
                log.info(
                    "retired after the reload: %s",
                    ", ".join(f"{r.kind.value} {r.label}" for r in [*processors, *exporters]),
                )
        finally:
            done = {id(r) for r in [*processors, *exporters]}
            self._retiring = [r for r in self._retiring if id(r) not in done]

    async def _replace_exporter(
        self, config: AgentConfig, old: _Running, spec: ComponentSpec
    ) -> _Running | None:
        """Replace ``old`` by a new instance of ``spec`` behind its entry Link, handing its queue over;
        None when the new one cannot start (``old``'s config is then restored, its queue handed back)."""
        entry = self._entries[old.id]
        entry.pause()
        try:
            if not await entry.quiesce(PAUSE_LIMIT_S):
                log.warning(
                    "exporter %s: batches still inside after %.0fs; replacing it anyway",
                    old.label,
                    PAUSE_LIMIT_S,
                )
            old.state = "stopping"
            handed = await self._hand_over(old)
            new = await self._start_exporter(config, spec, handed)
            if new is None:
                log.error("exporter %s: the new config cannot start; restoring the previous one", old.label)
                restored = await self._start_exporter(self.config, old.spec, handed)
                if restored is not None:
                    entry.target = restored.instance
                    self._exporters[old.id] = restored
                else:
                    log.error(
                        "exporter %s: the previous config cannot start again either: the exporter is down"
                        " (what reaches it is counted as dropped{shutdown}) and the queue it held is lost",
                        old.label,
                    )
                return None
            entry.target = new.instance
            self._exporters[old.id] = new
            return new
        finally:
            entry.resume()

    async def _hand_over(self, old: _Running) -> Any:
        """Stop ``old`` for a successor: what its ``hand_over`` returns (None without one). Never raises
        (but for cancellation): a hand-over that fails is logged and ``old`` shut down, so that whatever
        happens the Link moves on to a running successor."""
        hand_over = getattr(old.instance, "hand_over", None)
        try:
            if hand_over is not None:
                return await hand_over()
            await old.instance.shutdown()
        except Exception as exc:
            log.error(
                "exporter %s: handing its queue over failed, what it held may be lost: %r",
                old.label,
                exc,
                exc_info=exc,
            )
            if hand_over is not None:
                try:
                    await old.instance.shutdown()  # whatever it still holds (a socket, a queue's lock)
                except Exception as stop_exc:
                    log.error("exporter %s: stopping it: %r", old.label, stop_exc)
        finally:
            old.state = "stopped"
            old.release_gauges()
        return None

    async def _start_exporter(self, config: AgentConfig, spec: ComponentSpec, handed: Any) -> _Running | None:
        """Create and start an exporter and give it ``handed``; None when it cannot be created or
        started (logged). A successor that started but could not take the whole queue keeps running."""
        try:
            running = self._exporter(config, spec)
        except Exception as exc:
            log.error("cannot create exporter %s: %r", spec.id, exc, exc_info=exc)
            return None
        if not await self._start_one(running):
            return None
        if handed is not None:
            try:
                await running.instance.adopt(handed)
            except Exception as exc:
                log.error(
                    "exporter %s: taking over its predecessor's queue failed, part of it may be lost: %r",
                    running.label,
                    exc,
                    exc_info=exc,
                )
        return running

    async def _replace_receiver(
        self, config: AgentConfig, old: _Running, spec: ComponentSpec, links: dict[Signal, Link]
    ) -> _Running | None:
        """Restart a receiver with ``spec`` on ``links``: stop ``old`` (it flushes), start the new one;
        None when it cannot start (``old``'s config is then started again)."""
        if old.state == "running":
            await self._stop_one(old)
        new = self._receiver(config, spec, links)
        if await self._start_one(new):
            self._receivers[old.id] = new
            return new
        log.error("receiver %s: the new config cannot start; restoring the previous one", old.label)
        await self._restore_receiver(old)
        return None

    async def _restore_receiver(self, old: _Running) -> None:
        restored = self._receiver(self.config, old.spec, old.links)
        if await self._start_one(restored):
            self._receivers[old.id] = restored

    async def _stop_receiver(self, running: _Running) -> None:
        await self._stop_one(running)
        self._not_ready.discard(f"receiver:{running.label}")

    # -- status ------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return (
            not self._not_ready
            and not self.stopping
            and all(r.state == "running" for r in [*self._receivers.values(), *self._exporters.values()])
        )

    def receiver_instances(self) -> dict[str, tuple[str, Any]]:
        """Receiver id → (type, running instance): what a capture hooks into (agent.capture)."""
        return {str(rid): (rid.type, r.instance) for rid, r in self._receivers.items()}

    def _components(self) -> Iterator[_Running]:
        yield from self._receivers.values()
        yield from self._processors
        yield from self._connectors.values()
        yield from self._exporters.values()
        yield from self._retiring

    def status(self) -> dict[str, Any]:
        t = self.telemetry

        def counts(kind: ComponentKind, label: str) -> dict[str, float]:
            if kind is ComponentKind.RECEIVER:
                return {
                    "accepted": t.value("receiver_accepted_points_total", receiver=label),
                    "refused": t.value("receiver_refused_points_total", receiver=label),
                }
            if kind is ComponentKind.EXPORTER:
                return {
                    "sent": t.value("exporter_sent_points_total", exporter=label),
                    "failed": t.value("exporter_failed_points_total", exporter=label),
                    "dropped": t.value("exporter_dropped_points_total", exporter=label),
                    "queue_size": t.value("exporter_queue_size", exporter=label),
                }
            if kind is ComponentKind.CONNECTOR:
                return {
                    "incoming": t.value("connector_incoming_points_total", connector=label),
                    "outgoing": t.value("connector_outgoing_points_total", connector=label),
                }
            return {}

        components = []
        retiring = {id(r) for r in self._retiring}
        for r in self._components():
            entry: dict[str, Any] = {
                "id": str(r.id),
                "kind": r.kind.value,
                "pipeline": r.pipeline or None,
                "state": "retiring" if id(r) in retiring and r.state != "stopped" else r.state,
                **counts(r.kind, r.label),
            }
            # A component may offer `status() -> dict` (threshold: its active alerts); a failing one
            # must not break the endpoint.
            extra = getattr(r.instance, "status", None)
            if callable(extra):
                try:
                    entry["status"] = extra()
                except Exception as exc:
                    entry["status"] = {"error": repr(exc)}
            components.append(entry)
        return {
            "ready": self.ready,
            "uptime_s": round(time.time() - self.started_at, 3),
            "pipelines": {
                p.id: {
                    "receivers": [str(c) for c in (*p.receivers, *p.connectors_in)],
                    "processors": [str(c) for c in p.processors],
                    "exporters": [str(c) for c in (*p.exporters, *p.connectors_out)],
                }
                for p in self.config.pipelines
            },
            "components": components,
        }
