"""Connectors: components that are the exporter of some pipelines and the receiver of others (the
OpenTelemetry Collector's connectors). A connector factory has ``kind=ComponentKind.CONNECTOR``, the
(input signal, output signal) pairs it supports in ``signal_pairs``, and ``create(settings, config,
next_consumer)``: the component's ``consume`` takes batches of the input signal and hands what it
makes to ``next_consumer`` (the fan-out over the pipelines that receive from it). See
:class:`agent.component.Connector`.

Every connector reports the same counters, per batch with the batch's size, through
:class:`ConnectorCounts`.
"""

from __future__ import annotations

from agent.telemetry import Cell, ComponentTelemetry


class ConnectorCounts:
    """The incoming, outgoing and dropped{reason} counters of one connector:
    ``connector_incoming_points_total`` (points, spans or log records taken from the pipelines that
    export to it), ``connector_outgoing_points_total`` (what it handed to the pipelines that receive
    from it) and ``connector_dropped_points_total{reason}``. Added to once per batch, never per point."""

    __slots__ = ("_dropped", "_in", "_out", "_telemetry")

    def __init__(self, telemetry: ComponentTelemetry) -> None:
        self._telemetry = telemetry
        self._in = telemetry.counter(
            "connector_incoming_points_total",
            "Points (spans, log records) a connector took from the pipelines exporting to it.",
        )
        self._out = telemetry.counter(
            "connector_outgoing_points_total",
            "Points (spans, log records) a connector handed to the pipelines receiving from it.",
        )
        self._dropped: dict[str, Cell] = {}

    def incoming(self, n: int) -> None:
        self._in.value += n

    def outgoing(self, n: int) -> None:
        self._out.value += n

    def dropped(self, reason: str, n: int) -> None:
        """``n`` points discarded for ``reason`` (a short snake_case label value)."""
        cell = self._dropped.get(reason)
        if cell is None:
            cell = self._dropped[reason] = self._telemetry.dropped(reason)
        cell.value += n
