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

from agent.counting import PointCounts

ConnectorCounts = PointCounts
"""A connector's ``connector_incoming_points_total`` (points, spans or log records taken from the
pipelines that export to it), ``connector_outgoing_points_total`` (what it handed to the pipelines that
receive from it) and ``connector_dropped_points_total{reason}``: a processor's counters
(:class:`agent.counting.PointCounts`) under the connector's kind. Added to once per batch, never per
point."""
