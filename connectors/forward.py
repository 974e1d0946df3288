"""``forward``: passes batches on unchanged from the pipelines that export to it to the pipelines that
receive from it, of the same signal (the Collector's forward connector).

It joins pipelines: one receiver's data enters a pipeline with the processors every copy needs, then
forks through ``forward`` into pipelines that each add their own processors and exporters; or several
pipelines merge into one that holds the shared processors. The batch is handed on as it is (batches
are never mutated once handed on, so nothing is copied). A refusal downstream reaches the caller
unchanged, and the service asks the downstream pipelines' admission before the batch enters any
pipeline upstream, so a refused batch was taken by none.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.component import ComponentKind, Consumer, Factory, Settings, Signal
from agent.model import Batch
from connectors import ConnectorCounts

TYPE = "forward"


@dataclass(frozen=True)
class ForwardConfig:
    """The forward connector has no settings."""


class Forward:
    __slots__ = ("_counts", "_next")

    def __init__(self, settings: Settings, next_consumer: Consumer) -> None:
        self._next = next_consumer
        self._counts = ConnectorCounts(settings.telemetry)

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def consume(self, batch: Batch) -> None:
        n = len(batch)
        # Counted once handed on: a batch refused downstream (Backpressure, raised on to the caller)
        # was not taken, and its resend is counted once.
        await self._next.consume(batch)
        self._counts.incoming(n)
        self._counts.outgoing(n)


def create(settings: Settings, config: ForwardConfig, next_consumer: Consumer) -> Forward:
    return Forward(settings, next_consumer)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.CONNECTOR,
    config_class=ForwardConfig,
    create=create,
    signal_pairs=frozenset((s, s) for s in Signal),
    description="Passes batches unchanged to the pipelines that receive from it (same signal).",
)
