"""Debug exporter: writes what reaches it as JSON lines, to stdout or a file.

``normal`` writes one JSON object per point; ``detailed`` adds histogram buckets; ``basic`` writes one
object per batch with its size. Writes go to a thread so a slow terminal or disk never blocks the loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from agent.component import ComponentKind, Factory, Settings, Signal
from agent.model import Kind, MetricBatch, Point
from agent.netcheck import directory_problem

TYPE = "debug"


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
    else:
        out["value"] = p.value if p.value == p.value else "NaN"
    if p.resource is not None and p.resource.attributes:
        out["resource"] = dict(p.resource.attributes)
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

    async def consume(self, batch: MetricBatch) -> None:
        if self._config.verbosity == "basic":
            text = json.dumps({"points": len(batch)}) + "\n"
        else:
            detailed = self._config.verbosity == "detailed"
            text = "".join(json.dumps(point_json(p, detailed)) + "\n" for p in batch.points)
        out = self._file or sys.stdout
        try:
            await asyncio.to_thread(_write, out, text)
        except OSError as exc:
            self._settings.telemetry.dropped("write_error").value += len(batch)
            self._settings.logger.warning("cannot write: %s", exc)
            return
        self._sent.value += len(batch)

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
    signals=frozenset({Signal.METRICS}),
    description="Writes every point as a JSON line to stdout or a file, for looking at what flows.",
)
