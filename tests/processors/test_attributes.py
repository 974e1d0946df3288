"""The attributes processor: ordered actions on labels, span/log attributes and resources."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any

import numpy as np
import pytest
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent import exphist
from agent.component import Backpressure, ComponentKind
from agent.confmodel import Decoder
from agent.model import (
    ExplicitHistogram,
    Kind,
    LogBatch,
    MetricBatch,
    Point,
    Resource,
    Scope,
    SpanBatch,
    Summary,
    Temporality,
)
from agent.telemetry import Telemetry
from processors.attributes import ActionConfig, AttributesConfig, AttributesProcessor, with_labels
from tests.conftest import Sink, component_settings


def make(config: AttributesConfig, sink: Sink | None = None) -> tuple[AttributesProcessor, Sink, Telemetry]:
    tel = Telemetry()
    sink = sink or Sink()
    settings = component_settings(tel, ComponentKind.PROCESSOR, "attributes")
    return AttributesProcessor(settings, config, sink), sink, tel


def decode(data: dict[str, Any]) -> AttributesConfig:
    decoder = Decoder(lambda path: None)
    config = decoder.decode(AttributesConfig, data, ("processors", "attributes"))
    assert decoder.errors == []
    assert isinstance(config, AttributesConfig)
    assert config.validate() == []
    return config


def sha(text: str, salt: str = "") -> str:
    return hashlib.sha256((salt + text).encode()).hexdigest()


async def run(actions: list[dict[str, Any]], labels: dict[str, str], **kw: Any) -> dict[str, str]:
    """Labels of one point after the actions; also checks they come out sorted and unique."""
    proc, sink, _ = make(decode({"actions": actions, **kw}))
    batch = MetricBatch((Point("m", Kind.GAUGE, tuple(sorted(labels.items())), 1),))
    await proc.consume(batch)
    out = sink.batches[0]
    assert isinstance(out, MetricBatch)
    got = out.points[0].labels
    assert list(got) == sorted(got) and len({k for k, _ in got}) == len(got)
    return dict(got)


UP = {"action": "upsert", "key": "team", "from_attribute": "owner"}
RENAME = {"action": "rename", "key": "host", "new_key": "instance"}


@pytest.mark.parametrize(
    ("action", "labels", "expected"),
    [
        ({"action": "insert", "key": "env", "value": "prod"}, {}, {"env": "prod"}),
        ({"action": "insert", "key": "env", "value": "prod"}, {"env": "dev"}, {"env": "dev"}),
        ({"action": "update", "key": "env", "value": "prod"}, {}, {}),
        ({"action": "update", "key": "env", "value": "prod"}, {"env": "dev"}, {"env": "prod"}),
        ({"action": "upsert", "key": "env", "value": "prod"}, {}, {"env": "prod"}),
        ({"action": "upsert", "key": "env", "value": "prod"}, {"env": "dev"}, {"env": "prod"}),
        (UP, {"owner": "x"}, {"owner": "x", "team": "x"}),
        (UP, {"a": "b"}, {"a": "b"}),
        ({"action": "delete", "key": "a"}, {"a": "1", "b": "2"}, {"b": "2"}),
        ({"action": "delete", "pattern": "debug_.*"}, {"debug_x": "1", "x_debug_z": "3"}, {"x_debug_z": "3"}),
        (RENAME, {"host": "h1"}, {"instance": "h1"}),
        (RENAME, {"zone": "z"}, {"zone": "z"}),
        # the renamed value wins over an existing target: no duplicate name
        (RENAME, {"host": "h1", "instance": "i"}, {"instance": "h1"}),
        ({"action": "hash", "key": "user"}, {"user": "alice"}, {"user": sha("alice")}),
        ({"action": "hash", "pattern": "u.*"}, {"user": "a", "uid": "b", "x": "c"},
         {"user": sha("a"), "uid": sha("b"), "x": "c"}),
        ({"action": "hash", "key": "user"}, {}, {}),
    ],
)  # fmt: skip
async def test_each_action_on_labels(
    action: dict[str, Any], labels: dict[str, str], expected: dict[str, str]
) -> None:
    assert await run([action], labels) == expected


async def test_actions_apply_in_order_and_hash_can_be_salted() -> None:
    actions = [
        {"action": "rename", "key": "email", "new_key": "user"},
        {"action": "hash", "key": "user"},
        {"action": "insert", "key": "copy", "from_attribute": "user"},
    ]
    got = await run(actions, {"email": "a@b.c"}, hash_salt="pepper")
    assert got == {"user": sha("a@b.c", "pepper"), "copy": sha("a@b.c", "pepper")}


async def test_from_context_uses_each_batch_context() -> None:
    proc, sink, _ = make(
        decode({"actions": [{"action": "upsert", "key": "tenant", "from_context": "x-org"}]})
    )
    labels = (("a", "1"),)
    for org in ("t1", "t2", None):
        ctx = {"x-org": org} if org else {}
        await proc.consume(MetricBatch((Point("m", Kind.SUM, labels, 1),), ctx))
    got = [dict(b.points[0].labels).get("tenant") for b in sink.batches if isinstance(b, MetricBatch)]
    # the memo of label results must not leak one tenant's value into another's batch
    assert got == ["t1", "t2", None]
    assert [b.context for b in sink.batches] == [{"x-org": "t1"}, {"x-org": "t2"}, {}]


async def test_resource_scope_on_metrics() -> None:
    res = Resource((("host.name", "a"), ("secret", "s")))
    batch = MetricBatch(
        (Point("m", Kind.GAUGE, (("x", "1"),), 1, resource=res), Point("n", Kind.GAUGE, (), 1))
    )
    config = decode(
        {
            "actions": [
                {"action": "upsert", "key": "cluster", "value": "eu1", "scope": "resource"},
                {"action": "delete", "key": "secret", "scope": "resource"},
            ]
        }
    )
    proc, sink, _ = make(config)
    await proc.consume(batch)
    out = sink.batches[0]
    assert isinstance(out, MetricBatch)
    first, second = out.points
    assert first.resource == Resource((("cluster", "eu1"), ("host.name", "a")))
    assert first.labels == (("x", "1"),)  # point labels untouched by resource actions
    assert second.resource == Resource((("cluster", "eu1"),))  # a StatsD point gains a resource


async def test_input_unchanged_every_field_kept_and_untouched_points_shared() -> None:
    h = exphist.from_values(np.array([0.1, 0.2]))
    full = Point(
        "t", Kind.HISTOGRAM, (("env", "dev"),), 5, 0.0, 4, Temporality.CUMULATIVE, False, h, "s", "desc",
        Resource((("r", "1"),)), Scope("lib", "1.0"), ExplicitHistogram((1.0,), (1, 2), 3.0, 0.5, 2.0),
        Summary(3, 3.0, ((0.5, 1.0),)),
    )  # fmt: skip
    untouched = Point("u", Kind.GAUGE, (("env", "prod"),), 1)
    batch = MetricBatch((full, untouched), {"k": "v"})
    before = copy.deepcopy(batch)
    proc, sink, tel = make(decode({"actions": [{"action": "update", "key": "env", "value": "x"}]}))
    await proc.consume(batch)
    assert batch == before
    out = sink.batches[0]
    assert isinstance(out, MetricBatch) and out.context == {"k": "v"}
    assert out.points[0] == dataclasses.replace(full, labels=(("env", "x"),))
    assert out.points[1] == dataclasses.replace(untouched, labels=(("env", "x"),))
    assert tel.value("processor_incoming_points_total") == tel.value("processor_outgoing_points_total") == 2


def test_with_labels_keeps_every_field() -> None:
    # with_labels lists Point's fields by position for speed: a field added to Point must be added there.
    p = Point("n", Kind.SUM, (), 1, 2.0, 3, Temporality.CUMULATIVE, False, None, "u", "d", None, Scope("s"))
    new = with_labels(p, (("a", "b"),), Resource((("r", "1"),)))
    assert new == dataclasses.replace(p, labels=(("a", "b"),), resource=Resource((("r", "1"),)))
    assert len([f for f in dataclasses.fields(Point) if f.init]) == 15
    assert new.key is None  # a new identity: computed when a later stage asks (agent.model.key_of)


async def test_no_change_passes_the_same_batch() -> None:
    proc, sink, _ = make(decode({"actions": [{"action": "delete", "key": "absent"}]}))
    batch = MetricBatch((Point("m", Kind.GAUGE, (("a", "1"),), 1),))
    await proc.consume(batch)
    await proc.consume(batch)  # second time through the memo
    assert sink.batches[0] is batch and sink.batches[1] is batch


async def test_backpressure_propagates() -> None:
    proc, _, _ = make(
        decode({"actions": [{"action": "insert", "key": "a", "value": "b"}]}), Sink(refuse=True)
    )
    with pytest.raises(Backpressure):
        await proc.consume(MetricBatch((Point("m", Kind.GAUGE, (), 1),)))


@pytest.mark.parametrize(
    ("action", "path"),
    [
        (ActionConfig("insert", key="a"), "actions::0"),
        (ActionConfig("insert", key="a", value="1", from_attribute="b"), "actions::0"),
        (ActionConfig("upsert", key="__name__", value="x"), "actions::0::key"),
        (ActionConfig("upsert", key="", value="x"), "actions::0::key"),
        (ActionConfig("delete"), "actions::0"),
        (ActionConfig("delete", key="a", pattern="b"), "actions::0"),
        (ActionConfig("hash", pattern="("), "actions::0::pattern"),
        (ActionConfig("rename", key="a"), "actions::0::new_key"),
        (ActionConfig("rename", key="a", new_key="a"), "actions::0::new_key"),
        (ActionConfig("delete", key="a", value="x"), "actions::0::value"),
    ],
)
def test_validation(action: ActionConfig, path: str) -> None:
    problems = AttributesConfig(actions=(action,)).validate()
    assert path in [p for p, _ in problems], problems


def test_action_is_required_when_decoding() -> None:
    decoder = Decoder(lambda path: None)
    decoder.decode(AttributesConfig, {"actions": [{"key": "a"}, {"action": "explode", "key": "b"}]}, ("a",))
    paths = [e[0] for e in decoder.errors]
    assert ("a", "actions", "0", "action") in paths and ("a", "actions", "1", "action") in paths


# -- spans and logs ----------------------------------------------------------------------------------


def spans() -> SpanBatch:
    rs = trace_pb2.ResourceSpans()
    rs.resource.attributes.add(key="service.name").value.string_value = "checkout"
    ss = rs.scope_spans.add()
    ss.scope.name = "shop"
    s = ss.spans.add(name="GET /cart")
    s.attributes.add(key="http.status_code").value.int_value = 200
    s.attributes.add(key="user.email").value.string_value = "a@b.c"
    s.attributes.add(key="db.statement").value.string_value = "SELECT 1"
    ss.spans.add(name="other")
    return SpanBatch((rs,), {"x-org": "t1"}, span_count=2)


def attrs(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


async def test_span_attributes_and_resource() -> None:
    batch = spans()
    before = batch.resource_spans[0].SerializeToString()
    config = decode(
        {
            "actions": [
                {"action": "hash", "key": "user.email"},
                {"action": "delete", "pattern": "db\\..*"},
                {"action": "upsert", "key": "code", "from_attribute": "http.status_code"},
                {"action": "insert", "key": "tenant", "from_context": "x-org"},
                {"action": "upsert", "key": "deployment.environment", "value": "prod", "scope": "resource"},
            ]
        }
    )
    proc, sink, tel = make(config)
    await proc.consume(batch)
    assert batch.resource_spans[0].SerializeToString() == before  # the input message is untouched
    (out,) = sink.batches
    assert isinstance(out, SpanBatch) and out.span_count == 2 and out.context == {"x-org": "t1"}
    rs = out.resource_spans[0]
    assert attrs(rs.resource.attributes) == {"service.name": "checkout", "deployment.environment": "prod"}
    first, second = rs.scope_spans[0].spans
    assert attrs(first.attributes) == {
        "http.status_code": 200,
        "user.email": sha("a@b.c"),
        "code": 200,  # from_attribute copies the typed value
        "tenant": "t1",
    }
    assert attrs(second.attributes) == {"tenant": "t1"}  # no http.status_code to copy: upsert skipped
    assert first.name == "GET /cart" and rs.scope_spans[0].scope.name == "shop"
    assert tel.value("processor_outgoing_points_total") == 2


async def test_hash_of_typed_values_uses_their_text() -> None:
    batch = spans()
    proc, sink, _ = make(decode({"actions": [{"action": "hash", "key": "http.status_code"}]}))
    await proc.consume(batch)
    out = sink.batches[0]
    assert isinstance(out, SpanBatch)
    assert attrs(out.resource_spans[0].scope_spans[0].spans[0].attributes)["http.status_code"] == sha("200")


async def test_log_attributes() -> None:
    rl = logs_pb2.ResourceLogs()
    rec = rl.scope_logs.add().log_records.add(severity_text="WARN")
    rec.attributes.add(key="host").value.string_value = "h1"
    batch = LogBatch((rl,), record_count=1)
    before = rl.SerializeToString()
    proc, sink, _ = make(decode({"actions": [{"action": "rename", "key": "host", "new_key": "host.name"}]}))
    await proc.consume(batch)
    out = sink.batches[0]
    assert isinstance(out, LogBatch) and out.record_count == 1
    assert attrs(out.resource_logs[0].scope_logs[0].log_records[0].attributes) == {"host.name": "h1"}
    assert rl.SerializeToString() == before


async def test_unchanged_messages_are_shared() -> None:
    batch = spans()
    proc, sink, _ = make(decode({"actions": [{"action": "delete", "key": "absent"}]}))
    await proc.consume(batch)
    out = sink.batches[0]
    assert isinstance(out, SpanBatch) and out.resource_spans[0] is batch.resource_spans[0]
