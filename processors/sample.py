"""``sample``: keeps a consistent fraction of metric series and of traces, with unbiased totals.

Metrics are sampled per series: a series is kept when ``h < rate × 2^64``, where ``h`` is the first 8
bytes (little-endian) of a BLAKE2b digest, keyed with ``seed``, of the series' canonical key — its
name, its sorted labels and its resource attributes, each UTF-8 string preceded by its length (4
bytes, little-endian) so no two different series share a key. The same series is therefore kept or
dropped in every batch, by every agent with the same ``seed``; a lower rate keeps a subset of what a
higher one keeps. ``rules`` give metric-name globs (``fnmatch``, case-sensitive) their own rates; the
first matching rule wins, ``rate`` applies to the rest.

So that totals stay unbiased, kept data is upscaled by ``1/rate``: sums (counters, delta or
cumulative, and up-down sums), histogram counts and sums (exponential: every bucket, the zero count,
count and sum; explicit-bucket: counts rounded to whole numbers, sum exact), summary counts (rounded)
and sums. min, max and summary quantiles are unchanged; gauges are kept or dropped whole, never
scaled. The sum over kept series of the upscaled values is an unbiased estimate of the true total,
with variance ``Σ v² (1/rate − 1)`` over the series' values ``v``.

The rate travels with the data as the label ``rate_label`` (``sample_rate="0.1"``) on every kept
point sampled at a rate below 1: a label is the one carrier that survives both to Prometheus (a series
label) and to OTLP (a data point attribute). Changing a rate therefore starts new series. A point that
already carries the label (an earlier sampler) gets the product of both rates; chain samplers only with
different seeds, or the second one's decisions are not independent of the first's.

Traces are sampled per trace id with the OpenTelemetry ``TraceIdRatioBased`` rule: a span is kept when
the lower 8 bytes of its trace id, as a big-endian integer, are below ``trace_rate × 2^64``. All spans
of a trace are kept or dropped together, across agents and in agreement with SDKs that sampled by the
same rule at a higher rate. Kept spans get a double attribute ``rate_label`` when the rate is below 1
(times an earlier sampler's, which it replaces), so span-derived counts can be upscaled downstream.

Sampled-out points and spans are counted as ``dropped{reason="sampled"}``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from agent import exphist
from agent.component import ComponentKind, Consumer, Factory, Settings, Signal
from agent.counting import PointCounts
from agent.model import (
    Batch,
    ExplicitHistogram,
    Kind,
    Labels,
    MetricBatch,
    Point,
    SeriesKey,
    SpanBatch,
    Summary,
    key_of,
    new_point,
)

TYPE = "sample"

_TWO_64 = 1 << 64
_CACHE_LIMIT = 100_000
"""Series whose verdict is cached (one pointer-keyed lookup a point instead of a ~1 µs digest and a new
label tuple); cleared when full."""


@dataclass(frozen=True)
class SampleRule:
    match: str
    """Metric name glob (fnmatch: * ? [abc]), matched against the original name, e.g. http.*"""
    rate: float
    """Fraction of the matching series kept, from 0 (none) to 1 (all)."""


@dataclass(frozen=True)
class SampleConfig:
    rate: float = 1.0
    """Fraction of metric series kept where no rule matches, from 0 (none) to 1 (all, unchanged)."""
    rules: list[SampleRule] = field(default_factory=list)
    """Rates by metric name glob, tried in order; the first match wins."""
    trace_rate: float | None = None
    """Fraction of traces kept (by trace id); unset = rate."""
    rate_label: str = "sample_rate"
    """Label (span attribute for traces) carrying the rate of sampled data; empty = do not add it (then
    nothing downstream can tell an upscaled value from a measured one)."""
    seed: int = 0
    """Keys the series hash: agents with the same seed keep the same series."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        rates = [("rate", self.rate), *((f"rules::{i}::rate", r.rate) for i, r in enumerate(self.rules))]
        if self.trace_rate is not None:
            rates.append(("trace_rate", self.trace_rate))
        for path, rate in rates:
            if not (math.isfinite(rate) and 0 <= rate <= 1):
                problems.append((path, f"{rate} is not a rate between 0 and 1"))
        for i, rule in enumerate(self.rules):
            if not rule.match:
                problems.append((f"rules::{i}::match", "must not be empty"))
        if not 0 <= self.seed < _TWO_64:
            problems.append(("seed", "must be between 0 and 2^64 - 1"))
        return problems


def series_key(name: str, labels: Labels, resource: Labels = ()) -> bytes:
    """The canonical bytes of a series: every string length-prefixed, so the key is unambiguous."""
    parts: list[bytes] = []
    for text in (
        name,
        *(s for kv in labels for s in kv),
        "\x00resource",
        *(s for kv in resource for s in kv),
    ):
        raw = text.encode("utf-8", "surrogatepass")
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)


def series_hash(key: bytes, seed: int = 0) -> int:
    """A 64-bit hash of ``key``, keyed with ``seed`` (BLAKE2b, first 8 digest bytes little-endian)."""
    digest = hashlib.blake2b(key, digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


def trace_id_keeps(trace_id: bytes, bound: int) -> bool:
    """OpenTelemetry TraceIdRatioBased: the trace id's lower 8 bytes (big-endian) below ``bound``."""
    return int.from_bytes(trace_id[-8:], "big") < bound


def _bound(rate: float) -> int:
    return min(_TWO_64, int(rate * _TWO_64))


def _format_rate(rate: float) -> str:
    return repr(float(rate))


class SampleProcessor:
    def __init__(self, settings: Settings, config: SampleConfig, next_consumer: Consumer) -> None:
        self._settings = settings
        self._config = config
        self._next = next_consumer
        tel = settings.telemetry
        self._counts = PointCounts(tel, "sampled")
        self._rates: dict[str, float] = {}
        self._verdicts: dict[SeriesKey, SeriesKey | None] = {}
        """Per series key: None to drop it, else the key its kept points leave with (the rate label)."""
        self._trace_rate = config.rate if config.trace_rate is None else config.trace_rate

    async def start(self) -> None:
        """Nothing to start: the processor owns no task and no socket."""

    async def shutdown(self) -> None:
        """Nothing to release; idempotent and safe before start."""

    def rate_for(self, name: str) -> float:
        """The rate of the metric ``name``: the first matching rule's, else the default."""
        rate = self._rates.get(name)
        if rate is None:
            rate = self._config.rate
            for rule in self._config.rules:
                if fnmatch.fnmatchcase(name, rule.match):
                    rate = rule.rate
                    break
            if len(self._rates) >= _CACHE_LIMIT:
                self._rates.clear()
            self._rates[name] = rate
        return rate

    def _verdict(self, p: Point, key: SeriesKey, rate: float) -> SeriesKey | None:
        """Whether series `key` is kept at `rate` (by its hash, stable across restarts and agents), and
        if so the key its points leave with; computed once a series."""
        resource = p.resource.attributes if p.resource is not None else ()
        h = series_hash(series_key(p.name, p.labels, resource), self._config.seed)
        verdict = None
        if h < _bound(rate):
            label = self._config.rate_label
            verdict = key.derive((label, rate), _with_rate, label, rate) if label else key
        if len(self._verdicts) >= _CACHE_LIMIT:
            self._verdicts.clear()
        self._verdicts[key] = verdict
        return verdict

    async def consume(self, batch: Batch) -> None:
        self._counts.incoming(len(batch))
        if isinstance(batch, MetricBatch):
            new: Batch = self._metrics(batch)
        elif isinstance(batch, SpanBatch):
            new = self._spans(batch)
        else:
            new = batch  # logs are not sampled (the factory does not offer the signal)
        self._counts.dropped("sampled", len(batch) - len(new))
        self._counts.outgoing(len(new))
        await self._next.consume(new)

    # -- metrics ------------------------------------------------------------------------------------------
    def _metrics(self, batch: MetricBatch) -> MetricBatch:
        out: list[Point] = []
        changed = False
        verdicts = self._verdicts
        for p in batch.points:
            rate = self.rate_for(p.name)
            if rate >= 1.0:
                out.append(p)
                continue
            changed = True
            if rate <= 0.0:
                continue
            key = key_of(p)
            verdict = verdicts.get(key, key_of)  # key_of: a sentinel that is never a verdict
            if verdict is key_of:
                verdict = self._verdict(p, key, rate)
            if verdict is not None:
                out.append(_upscale(p, rate, verdict))  # type: ignore[arg-type]  # not the sentinel
        if not changed:
            return batch
        return MetricBatch(tuple(out), context=batch.context)

    # -- traces -------------------------------------------------------------------------------------------
    def _spans(self, batch: SpanBatch) -> SpanBatch:
        rate = self._trace_rate
        if rate >= 1.0:
            return batch
        bound = _bound(rate)
        label = self._config.rate_label
        out: list[Any] = []
        kept_spans = 0
        for rs in batch.resource_spans:
            new = None
            for ss in rs.scope_spans:
                kept = [s for s in ss.spans if trace_id_keeps(s.trace_id, bound)]
                if not kept:
                    continue
                if new is None:
                    new = type(rs)(schema_url=rs.schema_url)
                    new.resource.CopyFrom(rs.resource)
                scope = new.scope_spans.add(schema_url=ss.schema_url)
                scope.scope.CopyFrom(ss.scope)
                scope.spans.extend(kept)  # copies: the batch's own spans are never touched
                if label:
                    for span in scope.spans:
                        _set_rate_attribute(span.attributes, label, rate)
                kept_spans += len(kept)
            if new is not None:
                out.append(new)
        return SpanBatch(tuple(out), context=batch.context, span_count=kept_spans)


def _set_rate_attribute(attributes: Any, label: str, rate: float) -> None:
    """Set the double attribute ``label`` to ``rate`` on our copy of a span; an earlier sampler's
    rate (a number in (0, 1]) is multiplied in, as for points, so the key never appears twice."""
    carried = rate
    if any(kv.key == label for kv in attributes):
        for kv in attributes:
            if kv.key == label:
                which = kv.value.WhichOneof("value")
                prior = float(getattr(kv.value, which)) if which in ("double_value", "int_value") else 1.0
                if 0 < prior <= 1:
                    carried = rate * prior
                break
        kept = [kv for kv in attributes if kv.key != label]
        del attributes[:]
        attributes.extend(kept)
    attributes.add(key=label).value.double_value = carried


def _with_rate(labels: Labels, label: str, rate: float) -> Labels:
    """``labels`` with the sampling rate in ``label``: an earlier sampler's rate (a number in (0, 1])
    is multiplied in, so the label says the rate of the whole path."""
    earlier = next((v for k, v in labels if k == label), None)
    carried = rate
    if earlier is not None:
        try:
            prior = float(earlier)
        except ValueError:
            prior = 1.0
        if 0 < prior <= 1:
            carried = rate * prior
    return tuple(sorted([*((k, v) for k, v in labels if k != label), (label, _format_rate(carried))]))


def _upscale(p: Point, rate: float, key: SeriesKey) -> Point:
    """``p`` as a point of series ``key`` (the rate label) with its counts scaled by 1/rate (gauges
    unchanged)."""
    factor = 1.0 / rate
    value, histogram, explicit, summary = p.value, p.histogram, p.explicit, p.summary
    if p.kind == Kind.SUM:
        value *= factor
    elif p.kind == Kind.HISTOGRAM and histogram is not None:
        histogram = exphist.scale_counts(histogram, factor)
    elif p.kind == Kind.HISTOGRAM and explicit is not None:
        counts = tuple(round(c * factor) for c in explicit.counts)
        e = explicit
        explicit = ExplicitHistogram(e.bounds, counts, e.sum * factor, e.min, e.max)
    elif p.kind == Kind.SUMMARY and summary is not None:
        summary = Summary(round(summary.count * factor), summary.sum * factor, summary.quantiles)
    elif key is p.key:
        return p
    return new_point(
        p.name, p.kind, key.labels, p.time_unix_nano, value, p.start_time_unix_nano, p.temporality,
        p.monotonic, histogram, p.unit, p.description, p.resource, p.scope, explicit, summary, key,
    )  # fmt: skip


def _create(settings: Settings, config: SampleConfig, next_consumer: Consumer) -> SampleProcessor:
    return SampleProcessor(settings, config, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.PROCESSOR,
    config_class=SampleConfig,
    create=_create,
    signals=frozenset({Signal.METRICS, Signal.TRACES}),
    description="Keeps a consistent fraction of series (by hash) and traces (by trace id), upscaling "
    "counts by the inverse rate so totals stay unbiased.",
)
