"""DogStatsD events and service checks as OTLP log records (the ``logs`` pipeline).

One ``ResourceLogs`` per flush, scope ``headwater.statsd``. Each record has:

- time: the ``d:`` timestamp when sent, else none (``observed_time_unix_nano`` is the arrival flush);
- body: the event text, or the service check message;
- severity: from an event's ``alert_type`` (info, success → INFO; warning → WARN; error → ERROR) or a
  check's status (0 OK → INFO; 1 WARNING, 3 UNKNOWN → WARN; 2 CRITICAL → ERROR);
- attributes: the tags (as the metric labels are made), ``host.name`` from ``h:``, and
  ``event.name`` = ``dogstatsd.event`` or ``dogstatsd.service_check`` with the rest under that prefix:
  ``dogstatsd.event.title``, ``.aggregation_key``, ``.priority``, ``.alert_type``,
  ``.source_type_name``; ``dogstatsd.service_check.name`` and ``.status`` (an integer).
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.proto.logs.v1 import logs_pb2

from agent.model import LogBatch
from receivers.statsd.parser import StatsdEvent, StatsdServiceCheck

SCOPE = "headwater.statsd"
_EVENT_SEVERITY = {
    "info": (9, "INFO"),
    "success": (9, "INFO"),
    "warning": (13, "WARN"),
    "error": (17, "ERROR"),
}
_CHECK_SEVERITY = {0: (9, "INFO"), 1: (13, "WARN"), 2: (17, "ERROR"), 3: (13, "WARN")}


def _put(record: logs_pb2.LogRecord, key: str, value: str | int) -> None:
    attr = record.attributes.add(key=key)
    if isinstance(value, int):
        attr.value.int_value = value
    else:
        attr.value.string_value = value


def to_log_batch(items: Sequence[StatsdEvent | StatsdServiceCheck], observed_unix_nano: int) -> LogBatch:
    rl = logs_pb2.ResourceLogs()
    scope_logs = rl.scope_logs.add()
    scope_logs.scope.name = SCOPE
    for item in items:
        record = scope_logs.log_records.add(observed_time_unix_nano=observed_unix_nano)
        if item.timestamp_s is not None:
            record.time_unix_nano = item.timestamp_s * 1_000_000_000
        for key, value in item.labels:
            _put(record, key, value)
        if item.hostname:
            _put(record, "host.name", item.hostname)
        if isinstance(item, StatsdEvent):
            record.severity_number, record.severity_text = _EVENT_SEVERITY.get(item.alert_type, (9, "INFO"))
            record.body.string_value = item.text
            _put(record, "event.name", "dogstatsd.event")
            _put(record, "dogstatsd.event.title", item.title)
            for key, value in (
                ("aggregation_key", item.aggregation_key),
                ("priority", item.priority),
                ("alert_type", item.alert_type),
                ("source_type_name", item.source_type_name),
            ):
                if value:
                    _put(record, f"dogstatsd.event.{key}", value)
        else:
            record.severity_number, record.severity_text = _CHECK_SEVERITY.get(item.status, (13, "WARN"))
            record.body.string_value = item.message
            _put(record, "event.name", "dogstatsd.service_check")
            _put(record, "dogstatsd.service_check.name", item.name)
            _put(record, "dogstatsd.service_check.status", item.status)
    return LogBatch((rl,), record_count=len(items))
