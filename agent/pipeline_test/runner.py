"""Runs one pipeline test against a config, on simulated time, with no backend contacted.

The graph. Each metrics pipeline of the config is built as the agent builds it — receivers, then the
processors in order, then a fan-out to the exporters (and connectors) — but nothing listens and nothing
is sent to a real backend:

- StatsD inputs go to the ``statsd`` receiver's parser (``feed``; no socket is bound) and leave when
  the runner flushes its aggregator at every multiple of ``flush_interval`` on the simulated clock,
  stamped with the simulated interval.
- JSON items and OTLP/JSON requests are posted (aiohttp) to the real ``http`` / ``otlp`` receiver,
  started on 127.0.0.1 on a free port (the OTLP gRPC listener is not opened); the receiver stamps a
  point without a timestamp with the wall clock, not the simulated one.
- ``prometheus_remote_write``, ``otlp_http`` and ``otlp`` exporters are real, with their endpoint
  replaced by the runner's capture server (127.0.0.1; plaintext gRPC for ``otlp``) and an in-memory
  queue; what they would send is decoded from the captured requests, so expectations check the wire
  form (``http_requests_total``, labels and OTLP resource attributes as sent).
  Any other exporter is replaced by a recorder of the points that reach it.
- A ``threshold`` processor's webhook is pointed at the capture server (an Alertmanager-webhook body,
  whatever template was configured; one is added when none is) and its Alertmanager too.
- Nothing is read from or left on disk: queues are in memory, no state directory, no drift baseline
  file.
- Only metrics pipelines run. What reaches a connector is recorded (``connector/<id>``); a metrics →
  metrics connector (``forward``) runs and feeds the metrics pipelines that receive from it; the
  outputs of other connectors (``spanmetrics``, ``logmetrics``: traces and logs) are not run.

Simulated time (exact). A :class:`VirtualClock` starts at a UTC day boundary and only moves when the
runner moves it: in steps of the test's ``step`` (1 s by default) and to every input's ``at``. Each
processor whose constructor takes ``clock`` (drift, aggregate, percentiles, threshold) is built
through that constructor with the virtual clock, and with ``run_timer=False`` when it takes that:
instead of its own timer task, the runner calls its ``tick()`` after every step (upstream
processors first; threshold's evaluation task still runs but on the virtual clock it only repeats
what a tick already did). At each instant the runner moves the clock, flushes the StatsD receivers
whose interval ended, ticks, then enters that instant's inputs. Window ends, ``for:`` durations and emit
intervals are multiples of a second, so ticking at every whole second fires each of them at exactly
the instant it is due — the same instants the processors' timers aim for. A test of ten simulated
minutes takes 600 steps and a fraction of a second. At the end, the graph stops as the agent does
(receivers flush, processors send what they hold, exporters drain their queues into the capture
server) and expectations are checked against everything observed.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from agent.component import Admission, ComponentId, Consumer, Settings, Signal
from agent.config import AgentConfig, ComponentSpec
from agent.model import Batch, Kind, MetricBatch
from agent.pipeline_test.capture import (
    CAPTURE_METADATA,
    Alert,
    CaptureServer,
    Observed,
    decode_otlp,
    decode_remote_write,
    decode_webhook,
)
from agent.pipeline_test.model import PipelineTest
from agent.telemetry import ComponentTelemetry, Telemetry
from receivers.statsd import FLUSH_CHUNK

JWT_LIFETIME_S = 300
"""How long a token made from an input's ``jwt`` claims stays valid (real time)."""

log = logging.getLogger("headwater.test")

START_UNIX_S = 1_767_225_600.0
"""2026-01-01T00:00:00Z: every test starts here, on a day boundary, so clock-aligned windows start with it."""

_KIND_NAMES = {Kind.SUM: "sum", Kind.GAUGE: "gauge", Kind.HISTOGRAM: "histogram", Kind.SUMMARY: "summary"}
_WIRE_EXPORTERS = {
    "prometheus_remote_write": decode_remote_write,
    "otlp_http": decode_otlp,
    "otlp": decode_otlp,
}


_RUNS = itertools.count(1)


class VirtualClock:
    """Unix seconds that move only when the runner says so."""

    def __init__(self, start_s: float = START_UNIX_S) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s


def observed_points(batch: MetricBatch) -> list[Observed]:
    out = []
    for p in batch.points:
        if p.kind is Kind.SUM or p.kind is Kind.GAUGE:
            value: float | None = p.value
        elif p.histogram is not None:
            value = float(p.histogram.count)
        elif p.explicit is not None:
            value = float(p.explicit.count)
        elif p.summary is not None:
            value = float(p.summary.count)
        else:
            value = None
        labels = tuple(sorted((str(k), str(v)) for k, v in p.labels))
        out.append(Observed(p.name, labels, _KIND_NAMES.get(p.kind, p.kind.name.lower()), value))
    return out


class Recorder:
    """A consumer that keeps what passes it (as :class:`Observed`) and hands it on, if it has a next."""

    def __init__(
        self, place: str, seen: Observations, clock: VirtualClock, nxt: Consumer | None = None
    ) -> None:
        self._place = place
        self._seen = seen
        self._clock = clock
        self._next = nxt

    async def consume(self, batch: Batch) -> None:
        if self._next is not None:
            await self._next.consume(batch)
        if isinstance(batch, MetricBatch):
            points = observed_points(batch)
            self._seen.points.setdefault(self._place, []).extend(points)
            at_s = self._clock.now_s - START_UNIX_S
            self._seen.times.setdefault(self._place, []).extend(at_s for _ in points)


class _Fanout:
    def __init__(self, consumers: Sequence[Consumer]) -> None:
        self._consumers = list(consumers)

    async def consume(self, batch: Batch) -> None:
        for c in self._consumers:
            await c.consume(batch)


@dataclass
class Observations:
    """Everything one test saw, by place (``processor/tenant``, ``exporter/prometheus_remote_write``)."""

    points: dict[str, list[Observed]] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    """Per place, the simulated time (seconds after the start) each of its points left, in order."""
    alerts: list[Alert] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Inputs the graph refused (a receiver's answer), named."""


def _settings(telemetry: Telemetry, spec: ComponentSpec, suffix: str = "") -> Settings:
    kind = spec.kind.value
    label = str(spec.id) + suffix
    return Settings(
        id=spec.id,
        kind=spec.kind,
        telemetry=ComponentTelemetry(telemetry, kind, label),
        logger=logging.getLogger(f"headwater.test.{kind}.{label}"),
        shutdown_timeout_s=10.0,
        admission=Admission(),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Run:
    """One test's graph; ``run`` drives it and returns what it observed."""

    def __init__(self, config: AgentConfig, test: PipelineTest, capture: CaptureServer) -> None:
        self.config = config
        self.test = test
        self.capture = capture
        self.clock = VirtualClock()
        self.telemetry = Telemetry()
        self.seen = Observations()
        self.prefix = f"/t{next(_RUNS)}"
        """Where this run's requests arrive on the shared capture server (unique per run)."""
        self.receivers: dict[ComponentId, Any] = {}
        self.receiver_urls: dict[ComponentId, str] = {}
        self.receiver_configs: dict[ComponentId, Any] = {}
        self.flush_s: dict[ComponentId, float] = {}
        self.flushed_ns: dict[ComponentId, int] = {}
        self.heads: dict[ComponentId, Consumer] = {}
        self.processors: list[Any] = []
        """Processors and metrics → metrics connectors, upstream first (within each pipeline, and a
        pipeline before its connectors, a connector before the pipelines it feeds)."""
        self.exporters: list[Any] = []
        self.tickers: list[Callable[[], Any]] = []

    # -- building ------------------------------------------------------------------------------------
    def _exporter(self, spec: ComponentSpec) -> Consumer:
        place = f"exporter/{spec.id}"
        decode = _WIRE_EXPORTERS.get(spec.id.type)
        if decode is None:
            return Recorder(place, self.seen, self.clock)
        config = spec.config
        base = f"{self.capture.url}{self.prefix}/{spec.id}"
        changes: dict[str, Any] = {"endpoint": f"{base}/api/v1/write"}
        if spec.id.type == "otlp_http":
            changes = {"endpoint": base, "metrics_endpoint": ""}
        elif spec.id.type == "otlp":  # plaintext gRPC; the metadata says where the calls are kept
            changes = {
                "endpoint": self.capture.grpc_target,
                "tls": type(config.tls)(insecure=True),
                "headers": {**config.headers, CAPTURE_METADATA: f"{self.prefix}/{spec.id}"},
            }
        config = dataclasses.replace(_without_disk(config), **changes)
        instance = spec.factory.create(_settings(self.telemetry, spec), config)
        self.exporters.append(instance)
        return instance  # type: ignore[no-any-return]

    def _processor(self, spec: ComponentSpec, nxt: Consumer, pipeline: str) -> Any:
        config = _without_disk(spec.config)
        if spec.id.type == "threshold":
            config = self._threshold_config(spec)
        settings = _settings(self.telemetry, spec, f"@{pipeline}")
        instance = spec.factory.create(settings, config, nxt)
        params = inspect.signature(type(instance).__init__).parameters
        if "clock" in params:
            # Rebuilt through its own constructor with the simulated clock (and no timer task).
            extra: dict[str, Any] = {"clock": self.clock}
            if "run_timer" in params:
                extra["run_timer"] = False
            instance = type(instance)(settings, config, nxt, **extra)
        if callable(getattr(instance, "tick", None)):
            self.tickers.append(instance.tick)
        return instance

    def _threshold_config(self, spec: ComponentSpec) -> Any:
        config = _without_disk(spec.config)
        base = f"{self.capture.url}{self.prefix}/{spec.id}"
        webhook_class = type(config.webhook) if config.webhook is not None else _webhook_class()
        changes: dict[str, Any] = {
            "webhook": webhook_class(url=f"{base}/webhook", send_resolved=True),
        }
        if config.alertmanager is not None:
            changes["alertmanager"] = dataclasses.replace(config.alertmanager, url=f"{base}/alertmanager")
        return dataclasses.replace(config, **changes)

    def build(self) -> None:
        config = self.config
        exporters = {cid: self._exporter(spec) for cid, spec in config.exporters.items()}
        heads: dict[ComponentId, list[Consumer]] = {}
        metrics = {p.id: p for p in config.pipelines if p.signal is Signal.METRICS}
        entries: dict[str, Consumer] = {}
        """Each metrics pipeline's entry (its first processor, or its exporters' fan-out)."""
        connectors: dict[ComponentId, Consumer] = {}
        order: list[list[Any]] = []
        """Each pipeline's processors (upstream first) and each connector, downstream first as built."""

        def connector(cid: ComponentId) -> Consumer:
            """A metrics → metrics connector feeding the metrics pipelines that receive from it; only a
            recorder when it feeds none (its other outputs are not run)."""
            if cid not in connectors:
                place = f"connector/{cid}"
                downstream = [p for p in metrics.values() if cid in p.connectors_in]
                spec = config.connectors.get(cid)
                pairs = spec.factory.signal_pairs if spec is not None else frozenset()
                if spec is None or not downstream or (Signal.METRICS, Signal.METRICS) not in pairs:
                    connectors[cid] = Recorder(place, self.seen, self.clock)
                else:
                    target = _Fanout([entry(p.id) for p in downstream])
                    instance = spec.factory.create(_settings(self.telemetry, spec), spec.config, target)
                    order.append([instance])
                    connectors[cid] = Recorder(place, self.seen, self.clock, instance)
            return connectors[cid]

        def entry(pid: str) -> Consumer:
            if pid in entries:
                return entries[pid]
            pipeline = metrics[pid]
            ends = [exporters[e] for e in pipeline.exporters if e in exporters]
            ends += [connector(c) for c in pipeline.connectors_out]
            nxt: Consumer = _Fanout(ends)
            made: list[Any] = []
            for proc in reversed(pipeline.processors):
                recorder = Recorder(f"processor/{proc}", self.seen, self.clock, nxt)
                instance = self._processor(config.processors[proc], recorder, pipeline.id)
                made.append(instance)
                nxt = instance
            order.append(list(reversed(made)))
            entries[pid] = nxt
            return nxt

        for pipeline in metrics.values():
            head = entry(pipeline.id)
            for rid in pipeline.receivers:
                heads.setdefault(rid, []).append(head)
        # Upstream first: what one sends when it stops reaches what is downstream of it, still running.
        self.processors = [proc for made in reversed(order) for proc in made]
        for rid, consumers in heads.items():
            spec = config.receivers.get(rid)
            if spec is None:
                continue  # not a receiver of this config (defensive: pipelines name only receivers here)
            rconfig = spec.config
            if rid.type == "http":
                port = _free_port()
                rconfig = dataclasses.replace(rconfig, endpoint=f"127.0.0.1:{port}")
                self.receiver_urls[rid] = f"http://127.0.0.1:{port}"
            elif rid.type == "otlp":
                port = _free_port()  # OTLP/JSON over HTTP only: the gRPC listener is not opened
                rconfig = dataclasses.replace(rconfig, grpc=None, http=f"127.0.0.1:{port}")
                self.receiver_urls[rid] = f"http://127.0.0.1:{port}"
            self.receiver_configs[rid] = rconfig
            instance = spec.factory.create(
                _settings(self.telemetry, spec), rconfig, {Signal.METRICS: _Fanout(consumers)}
            )
            self.receivers[rid] = instance
            self.heads[rid] = _Fanout(consumers)
            if rid.type == "statsd":
                self.flush_s[rid] = float(rconfig.flush_interval)

    # -- running -------------------------------------------------------------------------------------
    async def _enter(self, index: int) -> None:
        item = self.test.inputs[index]
        rid = ComponentId.parse(item.receiver)
        receiver = self.receivers.get(rid)
        where = f"{self.test.where}.inputs[{index}]"
        if receiver is None:
            known = ", ".join(str(r) for r in self.receivers) or "none"
            self.seen.problems.append(f"{where}: no metrics pipeline takes receiver {rid} (known: {known})")
            return
        if item.statsd:
            if rid.type != "statsd":
                self.seen.problems.append(f"{where}: statsd lines need a statsd receiver, {rid} is not one")
                return
            receiver.feed("\n".join(item.statsd).encode())
            return
        url = self.receiver_urls.get(rid)
        if url is None:
            self.seen.problems.append(f"{where}: {rid} does not take JSON/OTLP requests (use statsd lines)")
            return
        path = item.path or "/v1/metrics"
        if item.json:
            payload = item.json[0] if item.json_object else list(item.json)
            body, ctype = json.dumps(payload).encode(), "application/json"
        else:
            body, ctype = json.dumps(item.otlp).encode(), "application/json"
        headers = {**dict(item.headers), "Content-Type": ctype}
        if item.jwt:
            token = self._signed(rid, dict(item.jwt), where)
            if token is None:
                return
            headers["Authorization"] = f"Bearer {token}"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + path, data=body, headers=headers) as resp,
        ):
            text = await resp.text()
            if resp.status >= 300:
                self.seen.problems.append(f"{where}: {rid} answered {resp.status}: {text[:300]}")

    def _signed(self, rid: ComponentId, claims: dict[str, Any], where: str) -> str | None:
        """A token the receiver accepts: its HS256 secret signs ``claims`` (None: a problem recorded).

        ``exp`` is on the real clock (the receiver checks tokens against it), five minutes ahead unless
        the claims give one; the receiver's required ``aud`` and ``iss`` are added unless given."""
        auth = getattr(self.receiver_configs.get(rid), "auth", None)
        cfg = getattr(auth, "jwt", None)
        if cfg is None or not cfg.enabled:
            self.seen.problems.append(f"{where}.jwt: {rid} does not verify JWTs (no auth.jwt)")
            return None
        if "HS256" not in cfg.algorithms or not cfg.secret:
            self.seen.problems.append(
                f"{where}.jwt: {rid} verifies {', '.join(cfg.algorithms)} with a public key the runner"
                " cannot sign with; send a token you signed as headers: {Authorization: Bearer ...}"
            )
            return None
        claims.setdefault("exp", int(time.time()) + JWT_LIFETIME_S)
        if cfg.audience:
            claims.setdefault("aud", cfg.audience)
        if cfg.issuer:
            claims.setdefault("iss", cfg.issuer)
        return jwt.encode(claims, cfg.secret, algorithm="HS256")

    async def _flush_statsd(self, rid: ComponentId) -> None:
        """The receiver's flush, stamped with the simulated interval (its own uses the wall clock)."""
        receiver = self.receivers[rid]
        end_ns = round(self.clock.now_s * 1e9)
        start_ns = self.flushed_ns.get(rid, round(START_UNIX_S * 1e9))
        self.flushed_ns[rid] = end_ns
        interval = receiver.agg.swap()
        for chunk in receiver.agg.build(interval, start_ns, end_ns, chunk_size=FLUSH_CHUNK):
            if chunk:
                await self.heads[rid].consume(MetricBatch(tuple(chunk)))
        receiver.sync_counts()

    async def _advance(self, to_s: float) -> None:
        before = self.clock.now_s
        self.clock.now_s = to_s
        for rid, flush_s in self.flush_s.items():
            if math.floor((to_s - START_UNIX_S) / flush_s) > math.floor((before - START_UNIX_S) / flush_s):
                await self._flush_statsd(rid)
        for tick in self.tickers:
            await tick()

    async def run(self) -> Observations:
        self.build()
        started: list[Any] = []
        try:
            for component in [*self.exporters, *reversed(self.processors)]:
                await component.start()
                started.append(component)
            for rid, receiver in self.receivers.items():
                if rid in self.receiver_urls:
                    await receiver.start()
                    started.append(receiver)
            await self._drive()
        finally:
            for rid in self.flush_s:
                await self._flush_statsd(rid)
            # As the agent stops: receivers, then processors and connectors upstream first (each sends
            # what it holds on), then exporters, which drain their queues.
            running = set(map(id, started))
            for component in [*self.receivers.values(), *self.processors, *self.exporters]:
                if id(component) in running:
                    await component.shutdown()
        for request in self.capture.under(self.prefix):
            rest = request.path[len(self.prefix) + 1 :]
            place, _, tail = rest.partition("/")  # place: the component's type
            if place == "threshold" and (tail == "webhook" or tail.endswith("/webhook")):
                self.seen.alerts += decode_webhook(request)
                continue
            decode = _WIRE_EXPORTERS.get(place)
            if decode is not None and rest.endswith(("/api/v1/write", "/v1/metrics")):
                self.seen.points.setdefault(f"exporter/{_exporter_id(rest)}", []).extend(decode(request))
        return self.seen

    async def _drive(self) -> None:
        test = self.test
        step = test.step_s
        last_input = test.inputs[-1].at_s if test.inputs else 0.0
        end = test.run_for_s if test.run_for_s is not None else last_input + step
        times = sorted({*(i.at_s for i in test.inputs), *(k * step for k in range(int(end / step) + 1))})
        times = [t for t in times if t <= end + 1e-9]
        pending = 0
        for t in times:
            await self._advance(START_UNIX_S + t)
            while pending < len(test.inputs) and test.inputs[pending].at_s <= t + 1e-9:
                await self._enter(pending)
                pending += 1


def _without_disk(config: Any) -> Any:
    """``config`` with no state kept on disk: a test neither reads nor leaves files (queues in memory,
    no state directory, no drift baseline file)."""
    names = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    if "sending_queue" in names:
        changes["sending_queue"] = dataclasses.replace(config.sending_queue, storage="memory", directory="")
    if "state_directory" in names:
        changes["state_directory"] = ""
    if "baseline_file" in names and config.baseline_file is not None:
        changes["baseline_file"] = None  # unset (drift: "" would be refused)
    return dataclasses.replace(config, **changes) if changes else config


def _exporter_id(rest: str) -> str:
    """``prometheus_remote_write/name/api/v1/write`` → ``prometheus_remote_write/name``."""
    for tail in ("/api/v1/write", "/v1/metrics"):
        if rest.endswith(tail):
            return rest[: -len(tail)]
    return rest


def _webhook_class() -> Any:
    from processors.threshold import WebhookConfig

    return WebhookConfig


async def run_test(config: AgentConfig, test: PipelineTest, capture: CaptureServer) -> Observations:
    return await Run(config, test, capture).run()
