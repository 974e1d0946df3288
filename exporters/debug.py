"""Debug exporter: writes what reaches it as JSON lines, to stdout or a file.

``normal`` writes one JSON object per point, span or log record; ``detailed`` adds histogram buckets,
span and log attributes; ``basic`` writes one object per batch with its size. Writes go to a thread
so a slow terminal or disk never blocks the loop. A large batch is turned into text and written in
slices of ``_SLICE`` points (~5 ms of work each), so a 1M-point batch neither stalls the loop nor
exists as one string. JSON escapes control characters (``\\u0000``) and everything non-ASCII, so a
line is always one line of valid ASCII.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from agent.component import ComponentKind, Factory, Settings, Signal
from agent.model import Batch, Kind, LogBatch, MetricBatch, Point, SpanBatch
from agent.netcheck import directory_problem

TYPE = "debug"

_SLICE = 1000
"""Points (spans, log records) turned into JSON between yields to the event loop: ~5 ms of work."""


@dataclass(frozen=True)
class DebugConfig:
    verbosity: Literal["basic", "normal", "detailed"] = "normal"
    """basic: one line per batch; normal: one JSON object per point; detailed: also histogram buckets."""
    path: str = ""
    """File to append to; empty writes to standard output."""

    def environment_problems(self) -> list[tuple[str, str]]:
        if not self.path:
            return []
        import os

        problem = directory_problem(os.path.dirname(os.path.abspath(self.path)))
        return [("path", problem)] if problem else []


def point_json(p: Point, detailed: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": p.name,
        "kind": p.kind.name.lower(),
        "labels": dict(p.labels),
        "time_unix_nano": p.time_unix_nano,
    }
    if p.start_time_unix_nano:
        out["start_time_unix_nano"] = p.start_time_unix_nano
    if p.kind is Kind.SUM:
        out["temporality"] = p.temporality.name.lower()
        out["monotonic"] = p.monotonic
    if p.unit:
        out["unit"] = p.unit
    h = p.histogram
    if h is not None:
        hist: dict[str, Any] = {"count": h.count, "sum": h.sum}
        if h.count:
            hist["min"], hist["max"] = h.min, h.max
        if detailed:
            hist.update(
                scale=h.scale,
                zero_count=h.zero_count,
                positive={"offset": h.positive_offset, "counts": h.positive_counts.tolist()},
                negative={"offset": h.negative_offset, "counts": h.negative_counts.tolist()},
            )
        out["histogram"] = hist
    elif p.explicit is not None:
        e = p.explicit
        explicit: dict[str, Any] = {"count": e.count, "sum": _number(e.sum)}
        if e.min is not None and e.max is not None:
            explicit["min"], explicit["max"] = e.min, e.max
        if detailed:
            explicit.update(bounds=list(e.bounds), counts=list(e.counts))
        out["histogram"] = explicit
    elif p.summary is not None:
        out["summary"] = {
            "count": p.summary.count,
            "sum": _number(p.summary.sum),
            "quantiles": {str(q): _number(v) for q, v in p.summary.quantiles},
        }
    else:
        out["value"] = _number(p.value)
    if p.resource is not None and p.resource.attributes:
        out["resource"] = dict(p.resource.attributes)
    if p.scope is not None and p.scope.name:
        out["scope"] = p.scope.name
    return out


def _number(v: float) -> float | str:
    """JSON has no NaN or infinities: those are written as strings."""
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return v


def any_value(v: Any) -> Any:
    """An OTLP ``AnyValue`` as plain JSON (bytes as hex)."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return v.bytes_value.hex()
    if which == "double_value":
        return _number(v.double_value)
    return getattr(v, which)


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def span_lines(batch: SpanBatch, detailed: bool) -> list[dict[str, Any]]:
    out = []
    for rs in batch.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                line: dict[str, Any] = {
                    "span": span.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "start_time_unix_nano": span.start_time_unix_nano,
                    "end_time_unix_nano": span.end_time_unix_nano,
                    "kind": span.kind,
                    "status": span.status.code,
                    "service": resource.get("service.name", ""),
                }
                if span.parent_span_id:
                    line["parent_span_id"] = span.parent_span_id.hex()
                if ss.scope.name:
                    line["scope"] = ss.scope.name
                if detailed:
                    line["attributes"] = _attributes(span.attributes)
                    line["resource"] = resource
                out.append(line)
    return out


def log_lines(batch: LogBatch, detailed: bool) -> list[dict[str, Any]]:
    out = []
    for rl in batch.resource_logs:
        resource = _attributes(rl.resource.attributes)
        for sl in rl.scope_logs:
            for record in sl.log_records:
                line: dict[str, Any] = {
                    "log": any_value(record.body),
                    "time_unix_nano": record.time_unix_nano or record.observed_time_unix_nano,
                    "severity": record.severity_text or record.severity_number,
                    "service": resource.get("service.name", ""),
                }
                if record.trace_id:
                    line["trace_id"] = record.trace_id.hex()
                if sl.scope.name:
                    line["scope"] = sl.scope.name
                if detailed:
                    line["attributes"] = _attributes(record.attributes)
                    line["resource"] = resource
                out.append(line)
    return out


class DebugExporter:
    def __init__(self, settings: Settings, config: DebugConfig) -> None:
        self._settings = settings
        self._config = config
        self._file: TextIO | None = None
        self._sent = settings.telemetry.sent()

    async def start(self) -> None:
        if self._config.path:
            self._file = open(self._config.path, "a", encoding="utf-8")  # noqa: SIM115 - owned until shutdown

    async def consume(self, batch: Batch) -> None:
        detailed = self._config.verbosity == "detailed"
        lines: list[dict[str, Any]]
        if self._config.verbosity == "basic":
            what = "points" if isinstance(batch, MetricBatch) else "spans"
            lines = [{what if not isinstance(batch, LogBatch) else "log_records": len(batch)}]
        elif isinstance(batch, MetricBatch):
            await self._write_points(batch, detailed)
            return
        elif isinstance(batch, SpanBatch):
            lines = span_lines(batch, detailed)
        else:
            lines = log_lines(batch, detailed)
        per_item = len(lines) == len(batch)  # one line per span or record (not basic's one per batch)
        for lo in range(0, len(lines), _SLICE):
            if not await self._write("".join(json.dumps(line) + "\n" for line in lines[lo : lo + _SLICE])):
                done = lo if per_item else 0
                self._settings.telemetry.dropped("write_error").value += len(batch) - done
                self._sent.value += done
                return
        self._sent.value += len(batch)

    async def _write_points(self, batch: MetricBatch, detailed: bool) -> None:
        points = batch.points
        for lo in range(0, len(points), _SLICE):
            part = points[lo : lo + _SLICE]
            if not await self._write("".join(json.dumps(point_json(p, detailed)) + "\n" for p in part)):
                self._settings.telemetry.dropped("write_error").value += len(points) - lo
                self._sent.value += lo
                return
        self._sent.value += len(points)

    async def _write(self, text: str) -> bool:
        """Write ``text`` in a thread (which also lets the loop run); False, logged, when it fails."""
        try:
            await asyncio.to_thread(_write, self._file or sys.stdout, text)
        except OSError as exc:
            self._settings.logger.warning("cannot write: %s", exc)
            return False
        return True

    async def shutdown(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def _create(settings: Settings, config: DebugConfig) -> DebugExporter:
    return DebugExporter(settings, config)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.EXPORTER,
    config_class=DebugConfig,
    create=_create,
    signals=frozenset({Signal.METRICS, Signal.TRACES, Signal.LOGS}),
    description="Writes every point, span and log record as a JSON line to stdout or a file.",
)
