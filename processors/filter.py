"""Filter processor: keeps or drops points, spans and log records by name and attributes.

Shaped like the OpenTelemetry Collector's filter processor (its ``include`` / ``exclude`` blocks with
``match_type``), without its expression languages::

    processors:
      filter/prod:
        metrics:
          include:
            match_type: glob                # strict | glob | regexp, for the name lists
            metric_names: ["http.*", "db.*"]
            labels: [{key: env, value: prod}]
          exclude:
            labels: [{key: debug, regex: "true|1"}, {key: tenant_id, absent: true}]
        spans:
          exclude:
            match_type: regexp
            span_names: ["GET /health.*"]
        logs:
          include:
            severity_texts: [WARN, ERROR]
            resource_attributes: [{key: service.name, value: checkout}]

A block matches an item when every criterion it sets holds: the name (metric, span, log body) matches
one of the listed names, and every label / attribute matcher holds. ``include`` keeps only matching
items, ``exclude`` then drops matching ones; a signal with neither passes untouched. Regular
expressions match the whole text (Python ``re`` syntax, not re2). Globs use ``*``, ``?`` and ``[...]``;
``*`` also crosses dots. Attribute values of spans and logs are compared as text: strings as they are,
booleans as ``true``/``false``, integers and doubles in decimal, bytes in hex; arrays and maps never
match ``value``/``regex`` (but are present for ``absent``). Dropped items are counted as
``processor_dropped_points_total{reason="filtered"}``; a batch left empty is not passed on.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from agent.component import ComponentKind, Consumer, Factory, Settings, Signal
from agent.counting import PointCounts
from agent.model import Batch, Labels, LogBatch, MetricBatch, Point, Resource, SpanBatch

TYPE = "filter"

MatchType = Literal["strict", "glob", "regexp"]

_CACHE_MAX = 100_000
"""Entries kept in a per-name decision cache before it is cleared (bounds memory under name churn)."""


@dataclass(frozen=True)
class AttributeMatcherConfig:
    key: str = ""
    """Label name (metrics) or attribute key (spans, logs, resources), matched exactly."""
    value: str | None = None
    """Matches when the label or attribute equals this text."""
    regex: str | None = None
    """Matches when the whole label or attribute text matches this regular expression."""
    absent: bool = False
    """Matches when the label or attribute is missing; set instead of value or regex."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.key:
            problems.append(("key", "give the label or attribute name to match"))
        chosen = (self.value is not None) + (self.regex is not None) + self.absent
        if chosen != 1:
            problems.append(("", "set exactly one of value, regex or absent: true"))
        if self.regex is not None:
            problems.extend(_regex_problem("regex", self.regex))
        return problems


@dataclass(frozen=True)
class MetricMatchConfig:
    match_type: MatchType = "strict"
    """How metric_names are compared: strict (equal), glob (``*``, ``?``, ``[...]``) or regexp."""
    metric_names: tuple[str, ...] = ()
    """Metric names (original, dotted names); an item matches if its name matches any of them."""
    labels: tuple[AttributeMatcherConfig, ...] = ()
    """Label matchers; all must hold."""
    resource_attributes: tuple[AttributeMatcherConfig, ...] = ()
    """Resource attribute matchers (OTLP input; StatsD points have no resource); all must hold."""

    def validate(self) -> list[tuple[str, str]]:
        return _block_problems(self.match_type, {"metric_names": self.metric_names}, self._matchers())

    def _matchers(self) -> dict[str, tuple[AttributeMatcherConfig, ...]]:
        return {"labels": self.labels, "resource_attributes": self.resource_attributes}


@dataclass(frozen=True)
class SpanMatchConfig:
    match_type: MatchType = "strict"
    """How span_names are compared: strict, glob or regexp."""
    span_names: tuple[str, ...] = ()
    """Span names; a span matches if its name matches any of them."""
    attributes: tuple[AttributeMatcherConfig, ...] = ()
    """Span attribute matchers; all must hold."""
    resource_attributes: tuple[AttributeMatcherConfig, ...] = ()
    """Resource attribute matchers (e.g. service.name); all must hold."""

    def validate(self) -> list[tuple[str, str]]:
        return _block_problems(self.match_type, {"span_names": self.span_names}, self._matchers())

    def _matchers(self) -> dict[str, tuple[AttributeMatcherConfig, ...]]:
        return {"attributes": self.attributes, "resource_attributes": self.resource_attributes}


@dataclass(frozen=True)
class LogMatchConfig:
    match_type: MatchType = "strict"
    """How log_bodies are compared: strict, glob or regexp."""
    log_bodies: tuple[str, ...] = ()
    """Log record bodies (as text); a record matches if its body matches any of them."""
    severity_texts: tuple[str, ...] = ()
    """Severity texts (e.g. WARN, ERROR), compared exactly; a record matches if it has one of them."""
    attributes: tuple[AttributeMatcherConfig, ...] = ()
    """Log record attribute matchers; all must hold."""
    resource_attributes: tuple[AttributeMatcherConfig, ...] = ()
    """Resource attribute matchers; all must hold."""

    def validate(self) -> list[tuple[str, str]]:
        return _block_problems(
            self.match_type, {"log_bodies": self.log_bodies}, self._matchers(), self.severity_texts
        )

    def _matchers(self) -> dict[str, tuple[AttributeMatcherConfig, ...]]:
        return {"attributes": self.attributes, "resource_attributes": self.resource_attributes}


@dataclass(frozen=True)
class MetricFilterConfig:
    include: MetricMatchConfig | None = None
    """Keep only points that match; unset keeps all."""
    exclude: MetricMatchConfig | None = None
    """Then drop points that match; unset drops none."""


@dataclass(frozen=True)
class SpanFilterConfig:
    include: SpanMatchConfig | None = None
    """Keep only spans that match; unset keeps all."""
    exclude: SpanMatchConfig | None = None
    """Then drop spans that match; unset drops none."""


@dataclass(frozen=True)
class LogFilterConfig:
    include: LogMatchConfig | None = None
    """Keep only log records that match; unset keeps all."""
    exclude: LogMatchConfig | None = None
    """Then drop log records that match; unset drops none."""


@dataclass(frozen=True)
class FilterConfig:
    metrics: MetricFilterConfig | None = None
    """Rules for metric points (metrics pipelines)."""
    spans: SpanFilterConfig | None = None
    """Rules for spans (traces pipelines)."""
    logs: LogFilterConfig | None = None
    """Rules for log records (logs pipelines)."""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for signal in ("metrics", "spans", "logs"):
            rules = getattr(self, signal)
            if rules is None:
                continue
            for which in ("include", "exclude"):
                block = getattr(rules, which)
                if block is not None:
                    prefix = f"{signal}::{which}"
                    problems.extend((_join(prefix, p), m) for p, m in block.validate())
        return problems


def _join(prefix: str, path: str) -> str:
    return f"{prefix}::{path}" if path else prefix


def _regex_problem(path: str, pattern: str) -> list[tuple[str, str]]:
    try:
        re.compile(pattern)
    except re.error as exc:
        return [(path, f"{pattern!r} is not a valid regular expression: {exc}")]
    return []


def _block_problems(
    match_type: str,
    names: dict[str, tuple[str, ...]],
    matchers: dict[str, tuple[AttributeMatcherConfig, ...]],
    extra: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for field_name, items in names.items():
        if match_type == "regexp":
            for i, pattern in enumerate(items):
                problems.extend(_regex_problem(f"{field_name}::{i}", pattern))
    for field_name, group in matchers.items():
        for i, matcher in enumerate(group):
            problems.extend((_join(f"{field_name}::{i}", p), m) for p, m in matcher.validate())
    if not any(names.values()) and not any(matchers.values()) and not extra:
        # An empty block matches everything: as exclude it would drop all data, which is never meant.
        problems.append(("", f"set at least one of: {', '.join([*names, *matchers])}"))
    return problems


# -- compiled matching --------------------------------------------------------------------------------


def _name_matcher(match_type: str, names: Iterable[str]) -> Callable[[str], bool] | None:
    """None when no names are given (the criterion is not set)."""
    names = tuple(names)
    if not names:
        return None
    if match_type == "strict":
        wanted = frozenset(names)
        return wanted.__contains__
    patterns = [fnmatch.translate(n) for n in names] if match_type == "glob" else list(names)
    compiled = re.compile("|".join(f"(?:{p})" for p in patterns))
    return lambda text: compiled.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class _Attr:
    key: str
    value: str | None
    regex: re.Pattern[str] | None
    absent: bool

    def holds(self, text: str | None, present: bool) -> bool:
        """``present`` with ``text`` None: the attribute exists but is not a scalar (array, map)."""
        if self.absent:
            return not present
        if text is None:
            return False
        if self.value is not None:
            return text == self.value
        assert self.regex is not None
        return self.regex.fullmatch(text) is not None


def _attrs(group: tuple[AttributeMatcherConfig, ...]) -> tuple[_Attr, ...]:
    return tuple(
        _Attr(m.key, m.value, re.compile(m.regex) if m.regex is not None else None, m.absent) for m in group
    )


def _labels_hold(matchers: tuple[_Attr, ...], labels: Labels) -> bool:
    for m in matchers:
        # Label tuples are short (a handful of pairs): a scan beats building a dict per point.
        for name, value in labels:
            if name == m.key:
                if not m.holds(value, True):
                    return False
                break
        else:
            if not m.holds(None, False):
                return False
    return True


def any_value_text(v: Any) -> str | None:
    """An OTLP ``AnyValue`` as the text matchers compare; None for arrays, maps and unset values."""
    which = v.WhichOneof("value")
    if which == "string_value":
        return str(v.string_value)
    if which == "bool_value":
        return "true" if v.bool_value else "false"
    if which == "int_value":
        return str(v.int_value)
    if which == "double_value":
        return repr(v.double_value)
    if which == "bytes_value":
        return bytes(v.bytes_value).hex()
    return None


def _kv_hold(matchers: tuple[_Attr, ...], kvs: Any) -> bool:
    if not matchers:
        return True
    found: dict[str, Any] = {}
    for kv in kvs:
        found.setdefault(kv.key, kv.value)
    for m in matchers:
        v = found.get(m.key)
        if not m.holds(None if v is None else any_value_text(v), v is not None):
            return False
    return True


class _MetricRule:
    def __init__(self, block: MetricMatchConfig) -> None:
        self.name = _name_matcher(block.match_type, block.metric_names)
        self.labels = _attrs(block.labels)
        self.resource = _attrs(block.resource_attributes)


class _ItemRule:
    """One span or log block, compiled."""

    def __init__(
        self,
        match_type: str,
        names: tuple[str, ...],
        attributes: tuple[AttributeMatcherConfig, ...],
        resource: tuple[AttributeMatcherConfig, ...],
        severities: tuple[str, ...] = (),
    ) -> None:
        self.name = _name_matcher(match_type, names)
        self.attributes = _attrs(attributes)
        self.resource = _attrs(resource)
        self.severities = frozenset(severities) if severities else None


# -- the processor ------------------------------------------------------------------------------------


class FilterProcessor:
    def __init__(self, settings: Settings, config: FilterConfig, next_consumer: Consumer) -> None:
        self._next = next_consumer
        self.tel = settings.telemetry
        self._counts = PointCounts(self.tel, "filtered")
        m = config.metrics or MetricFilterConfig()
        self._m_include = _MetricRule(m.include) if m.include else None
        self._m_exclude = _MetricRule(m.exclude) if m.exclude else None
        # When no block has label or resource matchers, the metric name alone decides: one cached
        # lookup per point.
        self._m_by_name = all(
            r is None or (not r.labels and not r.resource) for r in (self._m_include, self._m_exclude)
        )
        self._name_cache: dict[str, tuple[bool, bool]] = {}
        self._label_cache: dict[Labels, tuple[bool, bool]] = {}
        self._resource_cache: dict[Resource | None, tuple[bool, bool]] = {}
        s = config.spans or SpanFilterConfig()
        self._s_include = (
            _ItemRule(i.match_type, i.span_names, i.attributes, i.resource_attributes)
            if (i := s.include)
            else None
        )
        self._s_exclude = (
            _ItemRule(e.match_type, e.span_names, e.attributes, e.resource_attributes)
            if (e := s.exclude)
            else None
        )
        lg = config.logs or LogFilterConfig()
        self._l_include = (
            _ItemRule(li.match_type, li.log_bodies, li.attributes, li.resource_attributes, li.severity_texts)
            if (li := lg.include)
            else None
        )
        self._l_exclude = (
            _ItemRule(le.match_type, le.log_bodies, le.attributes, le.resource_attributes, le.severity_texts)
            if (le := lg.exclude)
            else None
        )

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        """Holds nothing, so there is nothing to flush."""

    async def consume(self, batch: Batch) -> None:
        n = len(batch)
        self._counts.incoming(n)
        if isinstance(batch, MetricBatch):
            out: Batch | None = self._metrics(batch)
        elif isinstance(batch, SpanBatch):
            out = self._spans(batch)
        elif isinstance(batch, LogBatch):
            out = self._logs(batch)
        else:
            out = batch
        kept = 0 if out is None else len(out)
        if kept < n:
            self._counts.dropped("filtered", n - kept)
        if out is None or kept == 0:
            return
        self._counts.outgoing(kept)
        await self._next.consume(out)

    # -- metrics --

    def _name_decision(self, name: str) -> tuple[bool, bool]:
        """(passes include's name criterion, hits exclude's name criterion), cached per metric name."""
        d = self._name_cache.get(name)
        if d is None:
            inc, exc = self._m_include, self._m_exclude
            d = (
                inc is None or inc.name is None or inc.name(name),
                exc is not None and (exc.name is None or exc.name(name)),
            )
            if len(self._name_cache) >= _CACHE_MAX:
                self._name_cache.clear()
            self._name_cache[name] = d
        return d

    def _metrics(self, batch: MetricBatch) -> MetricBatch | None:
        inc, exc = self._m_include, self._m_exclude
        if inc is None and exc is None:
            return batch
        decide = self._name_decision
        if self._m_by_name:
            kept = [p for p in batch.points if (d := decide(p.name))[0] and not d[1]]
        else:
            kept = [p for p in batch.points if self._keep_point(p, decide(p.name))]
        if len(kept) == len(batch.points):
            return batch
        return MetricBatch(tuple(kept), batch.context)

    def _keep_point(self, p: Point, d: tuple[bool, bool]) -> bool:
        if not d[0]:
            return False
        inc, exc = self._m_include, self._m_exclude
        # Label and resource verdicts are cached per label set / resource: StatsD repeats the same
        # series every flush, so matchers (regexes) run once per series, not once per point.
        lab = self._label_cache.get(p.labels)
        if lab is None:
            lab = (
                inc is None or _labels_hold(inc.labels, p.labels),
                exc is not None and _labels_hold(exc.labels, p.labels),
            )
            if len(self._label_cache) >= _CACHE_MAX:
                self._label_cache.clear()
            self._label_cache[p.labels] = lab
        res = self._resource_cache.get(p.resource)
        if res is None:
            attrs = _resource_labels(p.resource)
            res = (
                inc is None or _labels_hold(inc.resource, attrs),
                exc is not None and _labels_hold(exc.resource, attrs),
            )
            if len(self._resource_cache) >= _CACHE_MAX:
                self._resource_cache.clear()
            self._resource_cache[p.resource] = res
        return lab[0] and res[0] and not (d[1] and lab[1] and res[1])

    # -- spans and logs --

    def _spans(self, batch: SpanBatch) -> SpanBatch | None:
        inc, exc = self._s_include, self._s_exclude
        if inc is None and exc is None:
            return batch
        messages, count = _filter_otlp(
            batch.resource_spans, "scope_spans", "spans", inc, exc, lambda span: span.name, None
        )
        if messages is None:
            return batch
        return SpanBatch(messages, batch.context, span_count=count)

    def _logs(self, batch: LogBatch) -> LogBatch | None:
        inc, exc = self._l_include, self._l_exclude
        if inc is None and exc is None:
            return batch
        messages, count = _filter_otlp(
            batch.resource_logs,
            "scope_logs",
            "log_records",
            inc,
            exc,
            lambda record: any_value_text(record.body) or "",
            lambda record: str(record.severity_text),
        )
        if messages is None:
            return batch
        return LogBatch(messages, batch.context, record_count=count)


def _resource_labels(resource: Resource | None) -> Labels:
    return () if resource is None else resource.attributes


def _item_matches(
    rule: _ItemRule,
    resource_ok: bool,
    item: Any,
    name_of: Callable[[Any], str],
    severity_of: Callable[[Any], str] | None,
) -> bool:
    if not resource_ok:
        return False
    if rule.name is not None and not rule.name(name_of(item)):
        return False
    if rule.severities is not None and (severity_of is None or severity_of(item) not in rule.severities):
        return False
    return _kv_hold(rule.attributes, item.attributes)


def _filter_otlp(
    messages: tuple[Any, ...],
    scope_field: str,
    item_field: str,
    inc: _ItemRule | None,
    exc: _ItemRule | None,
    name_of: Callable[[Any], str],
    severity_of: Callable[[Any], str] | None,
) -> tuple[tuple[Any, ...] | None, int]:
    """Filter ResourceSpans / ResourceLogs. Returns (None, 0) when everything was kept (the batch is
    reused as is); otherwise new messages holding copies of the kept items, and how many were kept.
    Messages that were not touched are shared, not copied."""
    out: list[Any] = []
    kept_total = 0
    changed = False
    for rm in messages:
        inc_res = inc is None or _kv_hold(inc.resource, rm.resource.attributes)
        exc_res = exc is not None and _kv_hold(exc.resource, rm.resource.attributes)
        kept_scopes: list[tuple[Any, list[Any]]] = []
        rm_changed = False
        rm_kept = 0
        for scope in getattr(rm, scope_field):
            items = getattr(scope, item_field)
            kept = [
                item
                for item in items
                if (inc is None or _item_matches(inc, inc_res, item, name_of, severity_of))
                and not (exc is not None and _item_matches(exc, exc_res, item, name_of, severity_of))
            ]
            if len(kept) != len(items):
                rm_changed = True
            kept_scopes.append((scope, kept))
            rm_kept += len(kept)
        kept_total += rm_kept
        if not rm_changed:
            out.append(rm)
            continue
        changed = True
        if rm_kept == 0:
            continue
        new = rm.__class__()
        new.resource.CopyFrom(rm.resource)
        new.schema_url = rm.schema_url
        for scope, kept in kept_scopes:
            if not kept:
                continue
            new_scope = getattr(new, scope_field).add()
            new_scope.scope.CopyFrom(scope.scope)
            new_scope.schema_url = scope.schema_url
            getattr(new_scope, item_field).extend(kept)  # extend copies each message
        out.append(new)
    if not changed:
        return None, 0
    return tuple(out), kept_total


def create(settings: Settings, config: FilterConfig, next_consumer: Consumer) -> FilterProcessor:
    return FilterProcessor(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=FilterConfig,
    create=create,
    signals=frozenset({Signal.METRICS, Signal.TRACES, Signal.LOGS}),
    description="Keeps or drops points, spans and log records by name, labels and attributes.",
)
