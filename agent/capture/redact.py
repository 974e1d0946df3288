"""Redaction of captured payloads: the values of configured tag / label / attribute names are replaced
with ``<redacted>`` before a record is written. Runs on the capture's writer thread, never on the
agent's loop.

- StatsD: each ``|#name:value`` tag (DogStatsD) and each ``;name=value`` tag (Graphite) of each line.
- JSON (the http receiver, OTLP/JSON): any object member whose key is a redacted name (labels, tags,
  attribute maps), and each OTLP ``{"key": name, "value": {...}}`` attribute.
- OTLP protobuf: decoded with the opentelemetry-proto classes, every ``attributes`` list (resource,
  scope, point, span, event, link, log record) rewritten, encoded again.

A payload that cannot be decoded is kept whole only when nothing is to be redacted; otherwise it is
replaced by an empty payload with ``redaction_failed`` in its meta (a secret is never written because
its carrier was malformed).
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

REDACTED = "<redacted>"

OTLP_MESSAGES: dict[str, type[Message]] = {
    "/v1/metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "/v1/traces": trace_service_pb2.ExportTraceServiceRequest,
    "/v1/logs": logs_service_pb2.ExportLogsServiceRequest,
}
"""The request message of each OTLP path (gRPC records carry the same path in their meta)."""


class Redactor:
    """Replaces the values of ``names`` in captured payloads (module docs)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = frozenset(names)
        alternatives = "|".join(re.escape(n) for n in sorted(self.names, key=len, reverse=True))
        # DogStatsD tags sit after |# separated by commas; Graphite tags after the name, by ;.
        self._dog = re.compile(rb"(?<=[#,])(" + alternatives.encode() + rb"):[^,|\n]*") if names else None
        self._graphite = re.compile(rb"(?<=;)(" + alternatives.encode() + rb")=[^;:\n]*") if names else None

    def statsd(self, payload: bytes) -> bytes:
        if self._dog is None or self._graphite is None:
            return payload
        payload = self._dog.sub(rb"\1:" + REDACTED.encode(), payload)
        return self._graphite.sub(rb"\1=" + REDACTED.encode(), payload)

    def json(self, payload: bytes) -> bytes | None:
        """The rewritten body, or None when it is not JSON."""
        if not self.names:
            return payload
        try:
            doc = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return json.dumps(self._walk(doc), separators=(",", ":")).encode()

    def _walk(self, node: Any) -> Any:
        if isinstance(node, dict):
            key = node.get("key")
            if isinstance(key, str) and key in self.names and "value" in node:
                return {**node, "value": {"stringValue": REDACTED}}
            return {k: (REDACTED if k in self.names else self._walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [self._walk(v) for v in node]
        return node

    def otlp_protobuf(self, path: str, payload: bytes) -> bytes | None:
        """The rewritten request, or None when it does not decode as the path's request message."""
        if not self.names:
            return payload
        cls = OTLP_MESSAGES.get(path)
        if cls is None:
            return None
        message = cls()
        try:
            message.ParseFromString(payload)
        except DecodeError:
            return None
        self._rewrite(message)
        rewritten: bytes = message.SerializeToString()
        return rewritten

    def _rewrite(self, message: Message) -> None:
        for fd, value in message.ListFields():
            if fd.message_type is None:
                continue
            if fd.name == "attributes" and fd.message_type.name == "KeyValue":
                for kv in value:
                    if kv.key in self.names:
                        kv.value.Clear()
                        kv.value.string_value = REDACTED
                continue
            if isinstance(value, Message):
                self._rewrite(value)
            elif not fd.message_type.GetOptions().map_entry:  # a repeated field (OTLP has no maps)
                for item in value:
                    self._rewrite(item)
