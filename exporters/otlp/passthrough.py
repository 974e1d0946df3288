"""Traces and logs: ``ResourceSpans`` / ``ResourceLogs`` messages → request bodies, split by size.

Messages are serialized with the opentelemetry-proto classes, part by part, and the enclosing
messages are written by hand, so that

- the exporter's resource attributes are added where the message's resource lacks the key, without
  copying or mutating the message (batches are shared with other exporters);
- a batch is cut into requests of at most ``max_request_size`` bytes at scope boundaries, and a scope
  too big on its own at span (log record) boundaries; one span or record bigger than the limit is
  dropped (``too_large``).

Both signals share one layout: ``Export*ServiceRequest.resource_*(1)``, ``Resource*.resource(1)``,
``Resource*.scope_*(2)``, ``Resource*.schema_url(3)``, ``Scope*.scope(1)``, ``Scope*.spans |
log_records(2)``, ``Scope*.schema_url(3)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from agent.protowire import field
from exporters.otlp import resource as resource_attrs
from exporters.otlp import wire

_TAG_RESOURCE = b"\x0a"
_TAG_SCOPES = b"\x12"
_TAG_SCHEMA_URL = b"\x1a"
_TAG_SCOPE = b"\x0a"
_TAG_ITEMS = b"\x12"
_NEST = wire.MAX_NESTING_OVERHEAD


def _resource_body(message: Any, static: Mapping[str, str]) -> bytes:
    own: Resource = message.resource
    present = {kv.key for kv in own.attributes}
    added = wire.resource((k, v) for k, v in sorted(static.items()) if k not in present)
    named = [kv for kv in own.attributes if kv.key in resource_attrs.ENVIRONMENT_KEYS]
    if named:
        # The data named its environment: mirror its value to the other key, never mix in ours.
        mirrored = [
            field(wire.ATTR_RESOURCE, KeyValue(key=k, value=named[0].value).SerializeToString())
            for k in resource_attrs.ENVIRONMENT_KEYS
            if k not in present
        ]
        added = wire.resource(
            (k, v)
            for k, v in sorted(static.items())
            if k not in present and k not in resource_attrs.ENVIRONMENT_KEYS
        ) + b"".join(mirrored)
    # Attributes appended after the serialized resource make the same message with more attributes:
    # a repeated field is just consecutive entries on the wire.
    serialized: bytes = own.SerializeToString()
    return serialized + added


class _Unit:
    """A piece of one resource's data small enough to share a request: scope bytes + its count."""

    __slots__ = ("body", "count", "resource")

    def __init__(self, resource: int, body: bytes, count: int) -> None:
        self.resource = resource
        self.body = body
        self.count = count


def _units(
    messages: Sequence[Any],
    scopes_attr: str,
    items_attr: str,
    static: Mapping[str, str],
    limit: int,
    resources: list[tuple[bytes, bytes]],
    dropped: list[int],
) -> Iterator[_Unit]:
    for message in messages:
        resource_field = field(_TAG_RESOURCE, _resource_body(message, static))
        schema = field(_TAG_SCHEMA_URL, message.schema_url.encode()) if message.schema_url else b""
        index = len(resources)
        resources.append((resource_field, schema))
        room = limit - len(resource_field) - len(schema) - 2 * _NEST
        for scope_message in getattr(message, scopes_attr):
            items = getattr(scope_message, items_attr)
            body = scope_message.SerializeToString()
            if len(body) + _NEST <= room:
                yield _Unit(index, field(_TAG_SCOPES, body), len(items))
                continue
            head = field(_TAG_SCOPE, scope_message.scope.SerializeToString())
            tail = (
                field(_TAG_SCHEMA_URL, scope_message.schema_url.encode()) if scope_message.schema_url else b""
            )
            chunk: list[bytes] = []
            size = len(head) + len(tail) + _NEST
            for item in items:
                entry = field(_TAG_ITEMS, item.SerializeToString())
                if size + len(entry) > room and chunk:
                    yield _Unit(index, field(_TAG_SCOPES, head + b"".join(chunk) + tail), len(chunk))
                    chunk, size = [], len(head) + len(tail) + _NEST
                if size + len(entry) > room:
                    dropped[0] += 1
                    continue
                chunk.append(entry)
                size += len(entry)
            if chunk:
                yield _Unit(index, field(_TAG_SCOPES, head + b"".join(chunk) + tail), len(chunk))


def encode(
    messages: Sequence[Any],
    scopes_attr: str,
    items_attr: str,
    static: Mapping[str, str],
    limit: int,
) -> tuple[list[tuple[bytes, int]], int]:
    """Request bodies (body, spans or records) for ``messages``, and how many items were too large.

    ``scopes_attr`` / ``items_attr``: ``scope_spans`` / ``spans`` or ``scope_logs`` / ``log_records``.
    Requests without any item are never made.
    """
    resources: list[tuple[bytes, bytes]] = []
    dropped = [0]
    out: list[tuple[bytes, int]] = []
    current: list[tuple[int, list[bytes]]] = []  # (resource index, scope entries), in order
    size = count = 0

    def flush() -> None:
        nonlocal current, size, count
        if count:
            body = b"".join(
                field(b"\x0a", resources[i][0] + b"".join(parts) + resources[i][1]) for i, parts in current
            )
            out.append((body, count))
        current, size, count = [], 0, 0

    for unit in _units(messages, scopes_attr, items_attr, static, limit, resources, dropped):
        if not unit.count:
            continue
        resource_field, schema = resources[unit.resource]
        grow = len(unit.body)
        opens = not current or current[-1][0] != unit.resource
        if opens:
            grow += len(resource_field) + len(schema) + _NEST
        if size + grow > limit:
            flush()
            grow = len(unit.body) + len(resource_field) + len(schema) + _NEST
            opens = True
        if opens:
            current.append((unit.resource, []))
        current[-1][1].append(unit.body)
        size += grow
        count += unit.count
    flush()
    return out, dropped[0]
