"""A processor's (or connector's) point counters: incoming, outgoing and dropped by reason, in one place.

Every processor reports the same three series (``processor_incoming_points_total``,
``processor_outgoing_points_total``, ``processor_dropped_points_total{reason}``; a connector the same
under ``connector_``); a :class:`PointCounts` made once in the component's constructor holds their
cells, and the component adds to them once per batch with the batch's size (never per point).
"""

from __future__ import annotations

from agent.telemetry import Cell, ComponentTelemetry


class PointCounts:
    """The incoming, outgoing and dropped{reason} point counters of one processor.

    ``dropped_reasons`` are created at once, so those series show 0 before the first drop; any other
    reason is created the first time it is counted. Not thread-safe (one event loop adds to it).
    """

    # Slots and plain cells: each call is one attribute add (~30 ns) on the per-batch path.
    __slots__ = ("_dropped", "_in", "_out", "_telemetry")

    def __init__(self, telemetry: ComponentTelemetry, *dropped_reasons: str) -> None:
        self._telemetry = telemetry
        self._in = telemetry.incoming()
        self._out = telemetry.outgoing()
        self._dropped: dict[str, Cell] = {reason: telemetry.dropped(reason) for reason in dropped_reasons}

    def incoming(self, n: int) -> None:
        """``n`` points taken in (a whole batch)."""
        self._in.value += n

    def outgoing(self, n: int) -> None:
        """``n`` points passed on."""
        self._out.value += n

    def dropped(self, reason: str, n: int) -> None:
        """``n`` points discarded on purpose, for ``reason`` (a label value: a short snake_case word)."""
        cell = self._dropped.get(reason)
        if cell is None:
            cell = self._dropped[reason] = self._telemetry.dropped(reason)
        cell.value += n
