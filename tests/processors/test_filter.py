"""The filter processor: include / exclude by name and attributes, for points, spans and log records."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent.component import Backpressure, ComponentKind
from agent.confmodel import Decoder
from agent.model import Kind, LogBatch, MetricBatch, Point, Resource, SpanBatch
from agent.telemetry import Telemetry
from processors.filter import (
    AttributeMatcherConfig,
    FilterConfig,
    FilterProcessor,
    LogFilterConfig,
    LogMatchConfig,
    MetricFilterConfig,
    MetricMatchConfig,
    SpanFilterConfig,
    SpanMatchConfig,
    factory,
)
from tests.conftest import Sink, component_settings


def make(config: FilterConfig, sink: Sink | None = None) -> tuple[FilterProcessor, Sink, Telemetry]:
    tel = Telemetry()
    sink = sink or Sink()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "filter")
    return FilterProcessor(settings, config, sink), sink, tel


def decode(data: dict[str, Any]) -> FilterConfig:
    decoder = Decoder(lambda path: None)
    config = decoder.decode(FilterConfig, data, ("processors", "filter"))
    assert decoder.errors == []
    assert isinstance(config, FilterConfig)
    return config


def pt(name: str, **labels: str) -> Point:
    return Point(name, Kind.GAUGE, tuple(sorted(labels.items())), 1, value=1.0)


def names(sink: Sink) -> list[str]:
    return [p.name for b in sink.batches if isinstance(b, MetricBatch) for p in b.points]


BATCH = MetricBatch(
    (
        pt("http.requests", env="prod", route="/a"),
        pt("http.latency", env="dev"),
        pt("db.queries", env="prod", debug="true"),
        pt("cpu", host="a"),
    ),
    context={"x-scope-orgid": "team-a"},
)


async def test_default_config_passes_everything_through_as_is() -> None:
    proc, sink, tel = make(FilterConfig())
    await proc.consume(BATCH)
    assert sink.batches == [BATCH] and sink.batches[0] is BATCH
    assert tel.value("processor_incoming_points_total") == 4
    assert tel.value("processor_outgoing_points_total") == 4


@pytest.mark.parametrize(
    ("match_type", "patterns", "kept"),
    [
        ("strict", ["http.requests", "cpu"], ["http.requests", "cpu"]),
        ("glob", ["http.*"], ["http.requests", "http.latency"]),
        ("regexp", [r"(http|db)\..*s"], ["http.requests", "db.queries"]),
        ("regexp", ["http"], []),  # the whole name must match, not a part of it
    ],
)
async def test_include_by_metric_name(match_type: str, patterns: list[str], kept: list[str]) -> None:
    config = decode({"metrics": {"include": {"match_type": match_type, "metric_names": patterns}}})
    proc, sink, tel = make(config)
    await proc.consume(BATCH)
    assert names(sink) == kept
    assert tel.value("processor_dropped_points_total", reason="filtered") == 4 - len(kept)
    assert tel.value("processor_outgoing_points_total") == len(kept)


async def test_exclude_by_name_and_label_matchers_all_must_hold() -> None:
    config = decode(
        {
            "metrics": {
                "exclude": {
                    "match_type": "glob",
                    "metric_names": ["*.*"],
                    "labels": [{"key": "env", "value": "prod"}, {"key": "debug", "regex": "true|1"}],
                }
            }
        }
    )
    proc, sink, _ = make(config)
    await proc.consume(BATCH)
    # only db.queries has a dotted name, env=prod and debug matching: it alone is dropped
    assert names(sink) == ["http.requests", "http.latency", "cpu"]


async def test_absent_matcher_and_include_then_exclude() -> None:
    config = FilterConfig(
        metrics=MetricFilterConfig(
            include=MetricMatchConfig(labels=(AttributeMatcherConfig(key="host", absent=True),)),
            exclude=MetricMatchConfig(metric_names=("http.latency",)),
        )
    )
    proc, sink, _ = make(config)
    await proc.consume(BATCH)
    assert names(sink) == ["http.requests", "db.queries"]


async def test_resource_attributes_and_context_kept() -> None:
    res = Resource((("service.name", "checkout"),))
    batch = MetricBatch(
        (Point("a", Kind.GAUGE, (), 1, resource=res), Point("b", Kind.GAUGE, (), 1)), context={"k": "v"}
    )
    config = decode(
        {"metrics": {"include": {"resource_attributes": [{"key": "service.name", "value": "checkout"}]}}}
    )
    proc, sink, _ = make(config)
    before = copy.deepcopy(batch)
    await proc.consume(batch)
    assert names(sink) == ["a"]
    assert sink.batches[0].context == {"k": "v"}
    assert batch == before  # the input batch is untouched


async def test_everything_filtered_passes_nothing_on() -> None:
    proc, sink, tel = make(decode({"metrics": {"include": {"metric_names": ["nope"]}}}))
    await proc.consume(BATCH)
    assert sink.batches == []
    assert tel.value("processor_dropped_points_total", reason="filtered") == 4


async def test_backpressure_from_downstream_propagates() -> None:
    proc, _, _ = make(
        decode({"metrics": {"exclude": {"metric_names": ["cpu"]}}}), Sink(refuse=True, retry_after_s=1.5)
    )
    with pytest.raises(Backpressure) as info:
        await proc.consume(BATCH)
    assert info.value.reason == "queue_full" and info.value.retry_after_s == 1.5


def test_validation_names_every_problem() -> None:
    bad = FilterConfig(
        metrics=MetricFilterConfig(
            include=MetricMatchConfig(match_type="regexp", metric_names=("(",)),
            exclude=MetricMatchConfig(),
        ),
        spans=SpanFilterConfig(
            exclude=SpanMatchConfig(attributes=(AttributeMatcherConfig(key="a", value="x", absent=True),))
        ),
    )
    paths = [p for p, _ in bad.validate()]
    assert paths == ["metrics::include::metric_names::0", "metrics::exclude", "spans::exclude::attributes::0"]
    assert FilterConfig().validate() == []
    assert factory.config_class is FilterConfig


def test_decoder_refuses_unknown_keys() -> None:
    decoder = Decoder(lambda path: None)
    decoder.decode(FilterConfig, {"metrics": {"include": {"metric_name": ["x"]}}}, ("f",))
    assert decoder.errors and decoder.errors[0][0] == ("f", "metrics", "include", "metric_name")


# -- spans and logs ----------------------------------------------------------------------------------


def spans() -> SpanBatch:
    keep = trace_pb2.ResourceSpans()
    keep.resource.attributes.add(key="service.name").value.string_value = "checkout"
    ss = keep.scope_spans.add()
    ss.scope.name = "shop"
    s = ss.spans.add(name="GET /cart")
    s.attributes.add(key="http.status_code").value.int_value = 200
    s = ss.spans.add(name="GET /healthz")
    s.attributes.add(key="http.status_code").value.int_value = 200
    other = trace_pb2.ResourceSpans()
    other.resource.attributes.add(key="service.name").value.string_value = "probe"
    other.scope_spans.add().spans.add(name="GET /healthz")
    return SpanBatch((keep, other), {"tenant": "t1"}, span_count=3)


async def test_spans_excluded_by_name_rebuilds_only_changed_messages() -> None:
    batch = spans()
    before = [m.SerializeToString() for m in batch.resource_spans]
    proc, sink, tel = make(
        decode({"spans": {"exclude": {"match_type": "glob", "span_names": ["*/health*"]}}})
    )
    await proc.consume(batch)
    (out,) = sink.batches
    assert isinstance(out, SpanBatch) and out.span_count == 1 and out.context == {"tenant": "t1"}
    assert len(out.resource_spans) == 1  # the probe's message lost its only span and is gone
    assert [s.name for s in out.resource_spans[0].scope_spans[0].spans] == ["GET /cart"]
    assert out.resource_spans[0].scope_spans[0].scope.name == "shop"
    assert [m.SerializeToString() for m in batch.resource_spans] == before
    assert tel.value("processor_dropped_points_total", reason="filtered") == 2


async def test_spans_by_attribute_and_resource() -> None:
    batch = spans()
    config = decode(
        {
            "spans": {
                "include": {
                    "attributes": [{"key": "http.status_code", "regex": "2.."}],
                    "resource_attributes": [{"key": "service.name", "value": "checkout"}],
                }
            }
        }
    )
    proc, sink, _ = make(config)
    await proc.consume(batch)
    (out,) = sink.batches
    assert isinstance(out, SpanBatch)
    assert out.span_count == 2 and out.resource_spans == batch.resource_spans[:1]
    # nothing was dropped from the first message, so it is passed on as is
    assert out.resource_spans[0] is batch.resource_spans[0]


async def test_unchanged_span_batch_is_passed_as_is() -> None:
    batch = spans()
    proc, sink, _ = make(decode({"spans": {"exclude": {"span_names": ["nothing"]}}}))
    await proc.consume(batch)
    assert sink.batches[0] is batch


def logs() -> LogBatch:
    rl = logs_pb2.ResourceLogs()
    rl.resource.attributes.add(key="service.name").value.string_value = "checkout"
    sl = rl.scope_logs.add()
    sl.log_records.add(severity_text="INFO").body.string_value = "started"
    rec = sl.log_records.add(severity_text="ERROR")
    rec.body.string_value = "payment failed"
    rec.attributes.add(key="retry").value.bool_value = True
    sl.log_records.add(severity_text="WARN").body.string_value = "slow payment"
    return LogBatch((rl,), record_count=3)


@pytest.mark.parametrize(
    ("rules", "bodies"),
    [
        ({"include": {"severity_texts": ["WARN", "ERROR"]}}, ["payment failed", "slow payment"]),
        ({"exclude": {"match_type": "regexp", "log_bodies": [".*payment.*"]}}, ["started"]),
        ({"include": {"attributes": [{"key": "retry", "value": "true"}]}}, ["payment failed"]),
        ({"exclude": {"attributes": [{"key": "retry", "absent": True}]}}, ["payment failed"]),
    ],
)
async def test_logs(rules: dict[str, Any], bodies: list[str]) -> None:
    batch = logs()
    before = batch.resource_logs[0].SerializeToString()
    proc, sink, _ = make(decode({"logs": rules}))
    await proc.consume(batch)
    (out,) = sink.batches
    assert isinstance(out, LogBatch) and out.record_count == len(bodies)
    got = [r.body.string_value for rl in out.resource_logs for sl in rl.scope_logs for r in sl.log_records]
    assert got == bodies
    assert batch.resource_logs[0].SerializeToString() == before


async def test_metric_rules_leave_spans_and_logs_alone() -> None:
    config = FilterConfig(metrics=MetricFilterConfig(include=MetricMatchConfig(metric_names=("x",))))
    proc, sink, _ = make(config)
    batch = logs()
    await proc.consume(batch)
    assert sink.batches == [batch]


async def test_lifecycle_is_idempotent() -> None:
    proc, sink, _ = make(
        FilterConfig(logs=LogFilterConfig(exclude=LogMatchConfig(severity_texts=("ERROR",))))
    )
    await proc.shutdown()  # safe before start
    await proc.start()
    await proc.consume(logs())
    await proc.shutdown()
    await proc.shutdown()
    assert [len(b) for b in sink.batches] == [2]
