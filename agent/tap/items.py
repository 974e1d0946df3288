"""The tap's items: which ends of an edge a filter takes, which points, spans and log records in a
batch it takes, and each as its JSON message (the format is in :mod:`agent.tap`)."""

from __future__ import annotations

import enum
import fnmatch
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.trace.v1 import trace_pb2

from agent.anyvalue import json_value
from agent.globs import NameFilter
from agent.model import Batch, Kind, MetricBatch, Point, SpanBatch

REDACTED = "<redacted>"


class Direction(enum.Enum):
    IN = "in"
    OUT = "out"


@dataclass(frozen=True, slots=True)
class TapPoint:
    """One end of an edge: the batches leaving (``out``) or entering (``in``) one component."""

    component: str
    """The component's label: its id (``statsd``, ``otlp/grpc``), ``@pipeline`` for a processor."""
    kind: str
    """receiver, processor, connector or exporter."""
    direction: Direction
    pipeline: str | None = None

    @property
    def id(self) -> str:
        return self.component.partition("@")[0]

    def __str__(self) -> str:
        return f"{self.component} {self.direction.value}"


@dataclass(frozen=True, slots=True)
class TapEdge:
    """A Link and the component ends it joins (one out, and the ``in`` of what it feeds)."""

    link: Any
    """An :class:`agent.service.Link` (anything with a writable ``tap`` attribute)."""
    points: tuple[TapPoint, ...]


# -- filters -------------------------------------------------------------------------------------------
_MATCHER_RE = re.compile(r"^\s*([^=!~\s]+)\s*(=~|!~|!=|=)(.*)$")


@dataclass(frozen=True)
class LabelMatcher:
    """``name=value``, ``name!=value``, ``name=~regex``, ``name!~regex`` (regexes match the whole
    value, as in PromQL). A missing label is the empty value."""

    name: str
    op: str
    value: str
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> LabelMatcher:
        """Raises ValueError naming what is wrong."""
        m = _MATCHER_RE.match(text)
        if m is None:
            raise ValueError(f"{text!r} is not a label matcher: write name=value, name!=value, name=~regex")
        name, op, value = m.groups()
        regex = None
        if op in ("=~", "!~"):
            try:
                regex = re.compile(f"(?:{value})\\Z")
            except re.error as exc:
                raise ValueError(f"{text!r}: the regex is not valid: {exc}") from None
        return cls(name, op, value, regex)

    def matches(self, value: str) -> bool:
        if self._regex is not None:
            return bool(self._regex.match(value)) is (self.op == "=~")
        return (value == self.value) is (self.op == "=")


@dataclass(frozen=True)
class TapFilter:
    """What one subscription watches. Empty globs mean everything."""

    component: str = "*"
    """Glob over component ids and labels (``batch`` and ``batch@metrics``)."""
    name: str = "*"
    """Glob over metric names, span names, log event names."""
    match: tuple[LabelMatcher, ...] = ()
    signals: frozenset[str] = frozenset({"metrics", "traces", "logs"})
    directions: frozenset[Direction] = frozenset({Direction.OUT})
    """Ends watched: by default what leaves components (``in`` adds what enters them)."""

    @classmethod
    def parse(
        cls,
        component: str = "",
        name: str = "",
        match: Sequence[str] = (),
        signal: str = "",
        direction: str = "",
    ) -> TapFilter:
        """From query parameters (``signal`` and ``direction`` comma-separated; ``direction`` out, in
        or both). Raises ValueError naming the parameter that is wrong."""
        signals = {s.strip() for s in signal.split(",") if s.strip()} or {"metrics", "traces", "logs"}
        unknown = signals - {"metrics", "traces", "logs"}
        if unknown:
            raise ValueError(f"signal: {', '.join(sorted(unknown))} is not metrics, traces or logs")
        ends = {d.strip() for d in direction.split(",") if d.strip()} or {"out"}
        if "both" in ends:
            ends = {"in", "out"}
        if ends - {"in", "out"}:
            raise ValueError(f"direction: {direction!r} is not in, out or both")
        return cls(
            component=component or "*",
            name=name or "*",
            match=tuple(LabelMatcher.parse(m) for m in match),
            signals=frozenset(signals),
            directions=frozenset(Direction(d) for d in ends),
        )

    def takes(self, point: TapPoint) -> bool:
        if point.direction not in self.directions:
            return False
        return fnmatch.fnmatchcase(point.component, self.component) or fnmatch.fnmatchcase(
            point.id, self.component
        )


# -- items and their messages ------------------------------------------------------------------------
_KIND_NAMES = {Kind.SUM: "sum", Kind.GAUGE: "gauge", Kind.HISTOGRAM: "histogram", Kind.SUMMARY: "summary"}


def matching(batch: Batch, flt: TapFilter, names: NameFilter) -> Iterator[Any]:
    """What in ``batch`` the filter takes: points, (span, resource attrs), (log record, resource
    attrs); rendered only when kept (:func:`_render`)."""
    take = names
    matchers = flt.match
    if isinstance(batch, MetricBatch):
        for p in batch.points:
            if take(p.name) and (not matchers or _labels_match(matchers, dict(p.labels))):
                yield p
    elif isinstance(batch, SpanBatch):
        for rs in batch.resource_spans:
            resource: dict[str, Any] | None = None
            for ss in rs.scope_spans:
                for span in ss.spans:
                    if not take(span.name):
                        continue
                    if resource is None:
                        resource = _attrs(rs.resource.attributes)
                    if matchers and not _attrs_match(matchers, _attrs(span.attributes), resource):
                        continue
                    yield span, resource
    else:
        for rl in batch.resource_logs:
            resource = None
            for sl in rl.scope_logs:
                for record in sl.log_records:
                    if not take(_log_name(record)):
                        continue
                    if resource is None:
                        resource = _attrs(rl.resource.attributes)
                    if matchers and not _attrs_match(matchers, _attrs(record.attributes), resource):
                        continue
                    yield record, resource


def _labels_match(matchers: Sequence[LabelMatcher], labels: dict[str, str]) -> bool:
    return all(m.matches(labels.get(m.name, "")) for m in matchers)


def _attrs_match(matchers: Sequence[LabelMatcher], attrs: dict[str, Any], resource: dict[str, Any]) -> bool:
    for m in matchers:
        value = attrs.get(m.name, resource.get(m.name))
        if not m.matches("" if value is None else value if isinstance(value, str) else str(value)):
            return False
    return True


def _attrs(kvs: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: json_value(kv.value) for kv in kvs}


def _log_name(record: Any) -> str:
    name: str = getattr(record, "event_name", "")
    if name:
        return name
    body = record.body
    return body.string_value[:80] if body.WhichOneof("value") == "string_value" else ""


def _redacted(attrs: dict[str, Any], redact: frozenset[str]) -> dict[str, Any]:
    if redact and not redact.isdisjoint(attrs):
        return {k: REDACTED if k in redact else v for k, v in attrs.items()}
    return attrs


def _number(v: float) -> float | str:
    return v if math.isfinite(v) else ("NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf"))


def render(raw: Any, at: TapPoint, redact: frozenset[str]) -> dict[str, Any]:
    """One item as its JSON message (see the module docs)."""
    head = {
        "component": at.component,
        "component_kind": at.kind,
        "direction": at.direction.value,
        "pipeline": at.pipeline,
    }
    if isinstance(raw, Point):
        return {"type": "point", **head, "signal": "metrics", **_point_fields(raw, redact)}
    obj, resource = raw
    resource = _redacted(resource, redact)
    if hasattr(obj, "span_id") and hasattr(obj, "parent_span_id"):
        return {
            "type": "span",
            **head,
            "signal": "traces",
            "name": obj.name,
            "trace_id": obj.trace_id.hex(),
            "span_id": obj.span_id.hex(),
            "parent_span_id": obj.parent_span_id.hex(),
            "span_kind": _enum_name(_SPAN_KIND, obj.kind, "SPAN_KIND_"),
            "start_time_unix_nano": obj.start_time_unix_nano,
            "end_time_unix_nano": obj.end_time_unix_nano,
            "duration_ms": (obj.end_time_unix_nano - obj.start_time_unix_nano) / 1e6,
            "status": {
                "code": _enum_name(_STATUS_CODE, obj.status.code, "STATUS_CODE_"),
                "message": obj.status.message,
            },
            "attributes": _redacted(_attrs(obj.attributes), redact),
            "resource": resource,
        }
    return {
        "type": "log",
        **head,
        "signal": "logs",
        "name": _log_name(obj),
        "time_unix_nano": obj.time_unix_nano or obj.observed_time_unix_nano,
        "severity_text": obj.severity_text,
        "severity_number": obj.severity_number,
        "body": json_value(obj.body),
        "attributes": _redacted(_attrs(obj.attributes), redact),
        "resource": resource,
        "trace_id": obj.trace_id.hex(),
        "span_id": obj.span_id.hex(),
    }


_SPAN_KIND = trace_pb2.Span.DESCRIPTOR.fields_by_name["kind"].enum_type
_STATUS_CODE = trace_pb2.Status.DESCRIPTOR.fields_by_name["code"].enum_type


def _enum_name(enum_type: Any, number: int, prefix: str) -> str:
    value = enum_type.values_by_number.get(number)
    return value.name.removeprefix(prefix).lower() if value is not None else str(number)


def _point_fields(p: Point, redact: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": p.name,
        "kind": _KIND_NAMES.get(p.kind, str(p.kind)),
        "labels": {k: REDACTED if k in redact else str(v) for k, v in p.labels},
        "time_unix_nano": p.time_unix_nano,
        "unit": p.unit,
    }
    if p.kind is Kind.SUM or p.kind is Kind.GAUGE:
        out["value"] = _number(p.value)
        if p.kind is Kind.SUM:
            out["temporality"] = "delta" if p.temporality == 1 else "cumulative"
            out["monotonic"] = p.monotonic
    elif p.histogram is not None:
        h = p.histogram
        out["histogram"] = {
            "count": _number(h.count),
            "sum": _number(h.sum),
            "min": _number(h.min) if h.count else None,
            "max": _number(h.max) if h.count else None,
        }
    elif p.explicit is not None:
        e = p.explicit
        out["histogram"] = {
            "count": e.count,
            "sum": _number(e.sum),
            "min": None if e.min is None else _number(e.min),
            "max": None if e.max is None else _number(e.max),
        }
    elif p.summary is not None:
        sm = p.summary
        out["summary"] = {
            "count": sm.count,
            "sum": _number(sm.sum),
            "quantiles": [[q, _number(v)] for q, v in sm.quantiles],
        }
    if p.resource is not None and p.resource.attributes:
        out["resource"] = {k: REDACTED if k in redact else str(v) for k, v in p.resource.attributes}
    return out
