"""What ``/api/overview`` serves, and what ``headwater top`` and the status page at ``/`` show.

One JSON document about the running agent: the pipeline graph as configured (each pipeline's
receivers → processors → exporters, connectors between pipelines, and its edges), per component the
points in, out, refused, dropped and failed — totals and per second — with their reasons, each
exporter's sending queue (requests, points, the disk queue's records and oldest age), the process
(resident memory, CPU, the event loop's latest and worst lag), the threshold processors' pending and firing
alerts, and the top metrics by series and by points per second (``Agent.tap.top_metrics``).

It is computed in the admin thread (``agent.admin``) from read-only snapshots: the agent's counters
through its registry's Collector protocol (the same pass ``/metrics`` makes) and ``Agent.status()``.
Rates are the difference of the last two snapshots, taken at most once per :data:`MIN_INTERVAL_S` when
someone asks: polling costs one snapshot a second whoever and however many are looking, and nothing at
all while nobody is. A first request after :data:`STALE_AFTER_S` of silence has no rates (``null``, and
``window_s`` is ``null``): an average over the silence would not be "now".

What each component's ``in`` and ``out`` count: a receiver's ``in`` is what arrived (accepted and
refused), its ``out`` what it accepted and passed on; a processor's or connector's, what it took and
handed on; an exporter's ``out`` is what it delivered and it has no ``in`` (``null``). An edge's rate
is the ``out`` rate of its upstream component (a receiver feeding several pipelines counts all of
them on each of its edges).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric

from agent import vitals
from agent.component import ComponentId
from agent.service import Agent
from agent.telemetry import PREFIX
from agent.version import VERSION

MIN_INTERVAL_S = 1.0
"""Snapshots are taken at most this often; requests in between are answered from the last two."""
STALE_AFTER_S = 5.0
"""A last snapshot older than this starts afresh: no rates in the answer that takes the new one."""
TOP_METRICS_LIMIT = 20
"""Metrics asked of the tracker by series, and again by points per second (the answer holds both)."""

_COUNTERS: dict[str, tuple[str, str]] = {
    PREFIX + "receiver_accepted_points": ("receiver", "accepted"),
    PREFIX + "receiver_refused_points": ("receiver", "refused"),
    PREFIX + "receiver_dropped_points": ("receiver", "dropped"),
    PREFIX + "processor_incoming_points": ("processor", "in"),
    PREFIX + "processor_outgoing_points": ("processor", "out"),
    PREFIX + "processor_dropped_points": ("processor", "dropped"),
    PREFIX + "connector_incoming_points": ("connector", "in"),
    PREFIX + "connector_outgoing_points": ("connector", "out"),
    PREFIX + "connector_dropped_points": ("connector", "dropped"),
    PREFIX + "exporter_sent_points": ("exporter", "out"),
    PREFIX + "exporter_failed_points": ("exporter", "failed"),
    PREFIX + "exporter_dropped_points": ("exporter", "dropped"),
}
"""Counter families (as the Collector protocol names them, without ``_total``) → (kind, measure)."""

_QUEUE_GAUGES: dict[str, tuple[str, bool]] = {
    PREFIX + "exporter_queue_size": ("requests", False),
    PREFIX + "exporter_tenant_queue_size": ("requests", False),
    PREFIX + "exporter_queue_capacity": ("capacity", False),
    PREFIX + "exporter_queue_points": ("points", False),
    PREFIX + "exporter_disk_queue_records": ("disk_records", False),
    PREFIX + "exporter_disk_queue_bytes": ("disk_bytes", False),
    PREFIX + "exporter_disk_queue_oldest_age_seconds": ("oldest_age_s", True),
}
"""Sending-queue gauges → (field, whether tenants' partitions take the largest rather than the sum)."""

MEASURES = ("in", "out", "refused", "dropped", "failed")
"""The per-component figures, in the order the views show them."""

_Key = tuple[str, str]
"""(kind, telemetry label): a processor's label is ``id@pipeline``, a connector's ``id`` or
``id@<in>-to-<out>`` when it joins more than one pair of signals."""


@dataclass
class _Snapshot:
    t: float
    cpu_s: float
    counts: dict[tuple[str, str, str, str], float] = field(default_factory=dict)
    """(kind, label, measure, reason) → total."""
    queues: dict[_Key, dict[str, float]] = field(default_factory=dict)


def _take(metrics: Iterable[Metric], t: float, cpu_s: float) -> _Snapshot:
    snap = _Snapshot(t, cpu_s)
    counts, queues = snap.counts, snap.queues
    for metric in metrics:
        counter = _COUNTERS.get(metric.name)
        if counter is not None:
            kind, measure = counter
            for s in metric.samples:
                label = s.labels.get(kind)
                if label is None or not s.name.endswith("_total"):
                    continue
                key = (kind, label, measure, s.labels.get("reason", ""))
                counts[key] = counts.get(key, 0.0) + s.value
            continue
        gauge = _QUEUE_GAUGES.get(metric.name)
        if gauge is not None:
            name, largest = gauge
            for s in metric.samples:
                label = s.labels.get("exporter")
                if label is None:
                    continue
                queue = queues.setdefault(("exporter", label), {})
                old = queue.get(name)
                queue[name] = s.value if old is None else max(old, s.value) if largest else old + s.value
    return snap


def _round(x: float) -> float:
    return round(x, 3)


class Overview:
    """Keeps the last two snapshots and builds the document. Used from one thread (the admin thread's
    loop): not thread-safe, and needs not be."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._prev: _Snapshot | None = None
        self._last: _Snapshot | None = None

    def _advance(self, agent: Agent) -> None:
        now = self._clock()
        last = self._last
        if last is not None and now - last.t < MIN_INTERVAL_S:
            return
        snap = _take(agent.telemetry.collect(), now, time.process_time())
        self._prev = last if last is not None and now - last.t <= STALE_AFTER_S else None
        self._last = snap

    def document(self, agent: Agent) -> dict[str, Any]:
        """The overview of ``agent`` now. ``Agent.status()`` may raise RuntimeError when the agent's
        thread changed a dict while it was read (a reload): the caller asks again."""
        status = agent.status()
        self._advance(agent)
        last, prev = self._last, self._prev
        assert last is not None
        window_s = last.t - prev.t if prev is not None else None

        components = self._components(agent, status, last, prev, window_s)
        out_rates = {c["key"]: (c["per_s"] or {}).get("out") for c in components}
        pipelines, edges = [], []
        for p in agent.config.pipelines:
            sources = [f"receiver:{r}" for r in p.receivers] + [f"connector:{c}" for c in p.connectors_in]
            middle = [f"processor:{c}@{p.id}" for c in p.processors]
            sinks = [f"exporter:{e}" for e in p.exporters] + [f"connector:{c}" for c in p.connectors_out]
            pipelines.append(
                {
                    "id": p.id,
                    "signal": p.signal.value,
                    "receivers": sources,
                    "processors": middle,
                    "exporters": sinks,
                }
            )
            steps: list[list[str]] = [sources, *([m] for m in middle), sinks]
            for ups, downs in itertools.pairwise(steps):
                for up in ups:
                    for down in downs:
                        edges.append(
                            {"pipeline": p.id, "from": up, "to": down, "points_per_s": out_rates.get(up)}
                        )

        alerts = []
        for entry in status["components"]:
            extra = entry.get("status")
            if not isinstance(extra, dict):
                continue
            for alert in extra.get("alerts", ()):
                alerts.append({"component": entry["id"], "pipeline": entry["pipeline"], **alert})
        alerts.sort(key=lambda a: (a.get("state") != "firing", str(a.get("rule")), str(a.get("labels"))))

        refusals = [{"component": c["key"], **r} for c in components for r in c["reasons"]]
        refusals.sort(key=lambda r: (-(r["per_s"] or 0.0), -r["total"]))

        cpu = (last.cpu_s - prev.cpu_s) / window_s * 100 if prev is not None and window_s else None
        # The tracker (agent.tap) counts on this thread, and only while someone asks (it stops after
        # a while without a call): the top by series and the top by rate, each metric once.
        top: dict[str, dict[str, Any]] = {}
        for by in ("series", "points_per_s"):
            for m in agent.tap.top_metrics(TOP_METRICS_LIMIT, by):
                top.setdefault(m["name"], m)
        return {
            "version": VERSION,
            "ready": status["ready"],
            "uptime_s": status["uptime_s"],
            "window_s": _round(window_s) if window_s is not None else None,
            "process": {
                "rss_bytes": vitals.rss_bytes(),
                "cpu_percent": _round(cpu) if cpu is not None else None,
                "cpu_seconds": _round(last.cpu_s),
                "loop_lag_s": _round(agent.loop_lag_s()),
                "loop_lag_max_s": _round(agent.loop_lag_max_s),
            },
            "pipelines": pipelines,
            "connectors": [str(c) for c in agent.config.connectors],
            "components": components,
            "edges": edges,
            "refusals": refusals,
            "alerts": alerts,
            "top_metrics": list(top.values()),
        }

    def _components(
        self,
        agent: Agent,
        status: Mapping[str, Any],
        last: _Snapshot,
        prev: _Snapshot | None,
        window_s: float | None,
    ) -> list[dict[str, Any]]:
        # The telemetry labels of each component key: one per component, but a connector joining several
        # signal pairs counts under id@<in>-to-<out> for each (summed here, as one box in the graph).
        labels: dict[_Key, set[str]] = {}
        for kind, label, _, _ in last.counts:
            if kind == "connector":
                labels.setdefault((kind, label.partition("@")[0]), set()).add(label)
            else:
                labels.setdefault((kind, label), set()).add(label)

        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for entry in sorted(status["components"], key=lambda e: e["state"] == "retiring"):
            kind, cid, pipeline = entry["kind"], entry["id"], entry["pipeline"]
            label = f"{cid}@{pipeline}" if kind == "processor" else cid
            key = f"{kind}:{label}"
            if key in seen:  # a retiring instance beside its successor, a connector's second pair
                continue
            seen.add(key)
            own = labels.get((kind, label), {label})
            totals = _measures(kind, last, own)
            rates = None
            if prev is not None and window_s:
                before = _measures(kind, prev, own)
                rates = {
                    m: _round(max(0.0, v - (before[m] or 0.0)) / window_s) if v is not None else None
                    for m, v in totals.items()
                }
            reasons = []
            for (k, lab, measure, reason), total in sorted(last.counts.items()):
                if k != kind or lab not in own or not reason or not total:
                    continue
                per_s = None
                if prev is not None and window_s:
                    per_s = _round(
                        max(0.0, total - prev.counts.get((k, lab, measure, reason), 0.0)) / window_s
                    )
                reasons.append({"measure": measure, "reason": reason, "total": total, "per_s": per_s})
            item: dict[str, Any] = {
                "key": key,
                "kind": kind,
                "id": cid,
                "type": ComponentId.parse(cid).type,
                "pipeline": pipeline,
                "state": entry["state"],
                "total": totals,
                "per_s": rates,
                "reasons": reasons,
            }
            if kind == "exporter":
                item["queue"] = {k: _round(v) for k, v in last.queues.get((kind, label), {}).items()}
            out.append(item)
        return out


def _measures(kind: str, snap: _Snapshot, labels: set[str]) -> dict[str, float | None]:
    by: dict[str, float] = {}
    for (k, label, measure, _), value in snap.counts.items():
        if k == kind and label in labels:
            by[measure] = by.get(measure, 0.0) + value
    if kind == "receiver":
        accepted = by.get("accepted", 0.0)
        return {
            "in": accepted + by.get("refused", 0.0),
            "out": accepted,
            "refused": by.get("refused", 0.0),
            "dropped": by.get("dropped", 0.0),
            "failed": None,
        }
    if kind == "exporter":
        return {
            "in": None,
            "out": by.get("out", 0.0),
            "refused": None,
            "dropped": by.get("dropped", 0.0),
            "failed": by.get("failed", 0.0),
        }
    return {
        "in": by.get("in", 0.0),
        "out": by.get("out", 0.0),
        "refused": None,
        "dropped": by.get("dropped", 0.0),
        "failed": None,
    }
