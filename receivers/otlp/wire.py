"""OTLP request and error bodies: OTLP/JSON, ``google.rpc.Status``, depth limits.

Bodies are read, capped and decompressed by ``agent/bodies.py`` (shared with the http receiver).

OTLP/JSON is parsed with ``google.protobuf.json_format`` after one pass that rewrites the hex
``traceId``/``spanId``/``parentSpanId`` strings (spans, links, log records, exemplars) into the base64
that proto3 JSON expects. ``json_format`` already accepts what OTLP/JSON requires of a receiver:
integer enums, 64-bit integers as strings or numbers, lowerCamelCase keys (and the proto names), and
unknown fields are ignored.

Depth: the protobuf parser (upb) refuses messages nested more than :data:`PROTOBUF_MAX_DEPTH` deep; an
OTLP/JSON trace or log request is held to the same depth, a metrics request to twice that, so that an
attribute nested past the protobuf limit is refused for its point only (``attributes_too_deep``, by the
converter) as over protobuf. Deeper bodies are refused whole, with a message that says depth and names
the limit.

Traces and logs make no series, so the series limits (``limits:``) do not apply to them; what bounds
them is the body (``max_request_body_size``, raw and inflated), the request bytes in flight and this
depth limit. They pass through as decoded, to exporters whose queues are bounded.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from google.protobuf import any_pb2, duration_pb2, json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

PROTOBUF_MAX_DEPTH = 100
"""Deepest nesting of messages the protobuf parser (upb) takes: its default, pinned by a test."""
JSON_METRICS_MAX_DEPTH = 2 * PROTOBUF_MAX_DEPTH
"""Deepest nesting of messages in an OTLP/JSON metrics request (each level costs ~2 Python frames)."""
_METRICS_REQUEST = "opentelemetry.proto.collector.metrics.v1.ExportMetricsServiceRequest"
_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


class RequestError(Exception):
    """A request refused as a whole: its HTTP status, gRPC code, a bounded reason and a message."""

    def __init__(
        self,
        http_status: int,
        grpc_code: int,
        reason: str,
        message: str,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc_code
        """A ``google.rpc.Code`` number (the same numbers as ``grpc.StatusCode``)."""
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        """HTTP headers of the answer besides Retry-After (a quota's X-RateLimit-*)."""


def _hex_ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                node[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
            elif isinstance(value, (dict, list)):
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, (dict, list)):
                _hex_ids_to_base64(item)
    return node


def is_too_deep(exc: DecodeError) -> bool:
    """Whether the protobuf parser refused a message for its nesting depth (upb says so in its text)."""
    return "MaxDepth" in str(exc)


def decode_problem(exc: Exception) -> str:
    """What is wrong with a body that failed to parse, saying depth when depth was the problem."""
    if isinstance(exc, DecodeError) and is_too_deep(exc):
        return f"nested more than {PROTOBUF_MAX_DEPTH} messages deep (the protobuf parser's limit)"
    return str(exc)


def _json_too_deep() -> ValueError:
    return ValueError(
        f"the JSON is nested deeper than the decoder allows (about {sys.getrecursionlimit()} levels)"
    )


def parse_json(body: bytes, message: Message) -> None:
    """Fill ``message`` from an OTLP/JSON body; raises ValueError (any kind of bad input)."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise _json_too_deep() from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    try:
        _hex_ids_to_base64(data)
    except ValueError:
        raise ValueError("traceId, spanId and parentSpanId must be hex strings") from None
    except RecursionError:
        raise _json_too_deep() from None
    depth = JSON_METRICS_MAX_DEPTH if message.DESCRIPTOR.full_name == _METRICS_REQUEST else PROTOBUF_MAX_DEPTH
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=True, max_recursion_depth=depth)
    except RecursionError:
        raise _json_too_deep() from None
    except (json_format.ParseError, TypeError) as exc:
        # json_format names every enclosing field before "Message too deep": only the cause is kept.
        if "Message too deep" in str(exc):
            raise ValueError(
                f"nested more than {depth} messages deep (the OTLP/JSON parser's limit for this signal)"
            ) from None
        raise ValueError(str(exc)) from None


def to_json(message: Message) -> bytes:
    """OTLP/JSON of a response message (lowerCamelCase, 64-bit integers as strings)."""
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()


def status(error: RequestError) -> status_pb2.Status:
    """The ``google.rpc.Status`` for a refused request, with RetryInfo or BadRequest details."""
    st = status_pb2.Status(code=error.grpc_code, message=error.message)
    detail = any_pb2.Any()
    if error.retry_after_s is not None:
        seconds = max(error.retry_after_s, 0.0)
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        st.details.append(detail)
    elif error.grpc_code == code_pb2.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(field="body", description=error.message)
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        st.details.append(detail)
    return st
