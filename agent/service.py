"""The running agent: builds the pipeline graph from config and owns the components' lifecycle.

Graph: each receiver is one instance, feeding a fan-out over the pipelines that list it; each pipeline
has its own processor instances, chained in order; each exporter is one instance shared by every
pipeline that lists it. Start: exporters, then processors, then receivers (so nothing is received
before it can be sent), then the admin endpoint. Stop: receivers first (they flush what they
aggregated), then processors, then exporters, which drain their queues until the shutdown deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from agent.component import (
    Backpressure,
    ComponentId,
    ComponentKind,
    Consumer,
    Settings,
    Signal,
    Tasks,
)
from agent.config import AgentConfig, ComponentSpec
from agent.model import Batch
from agent.telemetry import ComponentTelemetry, Telemetry

log = logging.getLogger("headwater.service")


class Fanout:
    """Hands one batch to several consumers; one consumer's backpressure does not starve the others."""

    def __init__(self, consumers: Sequence[Consumer]) -> None:
        self._consumers = tuple(consumers)

    async def consume(self, batch: Batch) -> None:
        if len(self._consumers) == 1:
            await self._consumers[0].consume(batch)
            return
        refused: Backpressure | None = None
        for consumer in self._consumers:
            try:
                await consumer.consume(batch)
            except Backpressure as exc:
                refused = refused or exc
        if refused is not None:
            raise refused


class _Running:
    def __init__(self, id: ComponentId, kind: ComponentKind, instance: Any, pipeline: str = "") -> None:
        self.id = id
        self.kind = kind
        self.instance = instance
        self.pipeline = pipeline
        self.state = "created"


class Agent:
    """One configured agent. ``start`` then ``stop``; ``stop`` is idempotent and safe before ``start``."""

    def __init__(self, config: AgentConfig, telemetry: Telemetry | None = None) -> None:
        self.config = config
        self.telemetry = telemetry or Telemetry()
        self.started_at = time.time()
        self._exporters: list[_Running] = []
        self._processors: list[_Running] = []
        self._receivers: list[_Running] = []
        self._not_ready: set[str] = set()
        self.stopping = False
        self._stopped = False
        self._tasks = Tasks("agent", log)
        self.loop_lag_max_s = 0.0
        self.telemetry.gauge(
            "event_loop_lag_max_seconds",
            "Longest the event loop was late to wake a 20ms timer since start (a stall blocks every socket).",
            lambda: self.loop_lag_max_s,
        )
        self._build()

    # -- graph -------------------------------------------------------------------------------------
    def _settings(self, spec: ComponentSpec, suffix: str = "") -> Settings:
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
            telemetry=ComponentTelemetry(self.telemetry, kind, label),
            logger=logging.getLogger(f"headwater.{kind}.{label}"),
            ready=ready,
            shutdown_timeout_s=self.config.service.shutdown_timeout,
        )

    def _build(self) -> None:
        cfg = self.config
        exporters: dict[ComponentId, Any] = {}
        for cid, spec in cfg.exporters.items():
            inst = spec.factory.create(self._settings(spec), spec.config)
            exporters[cid] = inst
            self._exporters.append(_Running(cid, spec.kind, inst))
        heads: dict[ComponentId, dict[Signal, list[Consumer]]] = {}
        for pipeline in cfg.pipelines:
            nxt: Consumer = Fanout([exporters[e] for e in pipeline.exporters])
            for pid in reversed(pipeline.processors):
                spec = cfg.processors[pid]
                inst = spec.factory.create(self._settings(spec, f"@{pipeline.id}"), spec.config, nxt)
                self._processors.append(_Running(pid, spec.kind, inst, pipeline.id))
                nxt = inst
            for rid in pipeline.receivers:
                heads.setdefault(rid, {}).setdefault(pipeline.signal, []).append(nxt)
        for rid, by_signal in heads.items():
            spec = cfg.receivers[rid]
            consumers = {signal: Fanout(cs) for signal, cs in by_signal.items()}
            inst = spec.factory.create(self._settings(spec), spec.config, consumers)
            self._receivers.append(_Running(rid, spec.kind, inst))
        # Processors were appended from the end of each pipeline; start order is exporter-side first.

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start exporters, processors, then receivers. On failure, stop what started and re-raise."""
        try:
            for group in (self._exporters, self._processors, self._receivers):
                for running in group:
                    log.debug("starting %s %s", running.kind.value, running.id)
                    await running.instance.start()
                    running.state = "running"
        except BaseException:
            await self.stop()
            raise
        self._tasks.spawn(self._watch_loop(), "loop-lag")
        log.info(
            "started: %d receivers, %d processors, %d exporters, pipelines %s",
            len(self._receivers),
            len(self._processors),
            len(self._exporters),
            ", ".join(p.id for p in self.config.pipelines),
        )

    async def stop(self) -> None:
        """Stop receivers (they flush), processors, then exporters (they drain until the deadline)."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping = True
        await self._tasks.close()
        for group in (self._receivers, list(reversed(self._processors)), self._exporters):
            results = await asyncio.gather(
                *(self._stop_one(r) for r in group if r.state == "running"), return_exceptions=True
            )
            for r in results:
                if isinstance(r, BaseException):
                    log.error("error during shutdown: %r", r)

    async def _watch_loop(self, period_s: float = 0.02) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(period_s)
            lag = loop.time() - before - period_s
            if lag > self.loop_lag_max_s:
                self.loop_lag_max_s = lag
                if lag > 0.1:
                    log.warning("event loop stalled for %.0f ms", lag * 1000)

    async def _stop_one(self, running: _Running) -> None:
        try:
            await running.instance.shutdown()
        finally:
            running.state = "stopped"

    # -- status ------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return (
            not self._not_ready
            and not self.stopping
            and all(r.state == "running" for r in self._receivers + self._exporters)
        )

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
            return {}

        components = []
        for r in self._receivers + self._processors + self._exporters:
            label = str(r.id) + (f"@{r.pipeline}" if r.pipeline else "")
            entry: dict[str, Any] = {
                "id": str(r.id),
                "kind": r.kind.value,
                "pipeline": r.pipeline or None,
                "state": r.state,
                **counts(r.kind, label),
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
                    "receivers": [str(c) for c in p.receivers],
                    "processors": [str(c) for c in p.processors],
                    "exporters": [str(c) for c in p.exporters],
                }
                for p in self.config.pipelines
            },
            "components": components,
        }
