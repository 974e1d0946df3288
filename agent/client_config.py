"""The client block every network exporter's config shares (:class:`ClientConfig`): its sending queue,
retries and tenant routing, and the checks of its endpoint, headers, TLS and timeout.

An exporter's config is ``class <Name>Config(ClientConfig, <its own fields>)``. Dataclasses list the
fields of the base written last first, so the exporter's own fields (endpoint first) come before the
client block's in ``headwater components``, as users have always seen them. Each exporter declares
``endpoint``, ``headers``, ``tls`` and ``timeout`` itself, where they belong among its fields: their
defaults and docs are its own (a gRPC endpoint is host:port, an HTTP one a URL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from agent.confmodel import Duration
from agent.sending import QueueConfig, RetryConfig
from agent.tenancy import TenantRoutingConfig
from agent.tls import ClientTLSConfig


class _ClientFields:
    """The client fields each exporter declares among its own (see the module doc): what the shared
    checks read. Not a dataclass, so it adds no field."""

    endpoint: str
    headers: dict[str, str]
    tls: ClientTLSConfig
    timeout: Duration


@dataclass(frozen=True)
class ClientConfig(_ClientFields):
    """The sending queue, retries and tenant routing of a network exporter, and the checks every
    exporter's client fields share (:meth:`client_problems`). A subclass narrows ``tenant`` to its
    protocol's routing block and names the headers its protocol sets (``reserved_headers``)."""

    reserved_headers: ClassVar[frozenset[str]] = frozenset()
    """Lower-cased headers the exporter or its protocol sets: ``headers`` may not set them."""
    reserved_headers_reason: ClassVar[str] = "this header is set by the exporter itself"

    sending_queue: QueueConfig = field(default_factory=QueueConfig)
    """The queue of encoded requests: in memory, or on disk (storage: disk) to outlast outages, restarts."""
    retry_on_failure: RetryConfig = field(default_factory=RetryConfig)
    """Retries of failed requests."""
    tenant: TenantRoutingConfig | None = None
    """Per-tenant routing. Unset = off."""

    def environment_problems(self) -> list[tuple[str, str]]:
        return [(f"sending_queue::{path}", msg) for path, msg in self.sending_queue.environment_problems()]

    def client_problems(self) -> list[tuple[str, str]]:
        """The problems of the client block and of the exporter's headers, timeout and TLS."""
        problems = [
            ("headers::" + name, self.reserved_headers_reason)
            for name in self.headers
            if name.lower() in self.reserved_headers
        ]
        if self.timeout <= 0:
            problems.append(("timeout", "must be greater than 0"))
        for section in ("tls", "sending_queue", "retry_on_failure"):
            for path, message in getattr(self, section).validate():
                problems.append((f"{section}::{path}" if path else section, message))
        if self.tenant is not None:
            problems += [(f"tenant::{p}" if p else "tenant", m) for p, m in self.tenant.validate()]
            problems += self.tenant.header_clash(self.headers)
        return problems


def url_problem(name: str, url: str) -> list[tuple[str, str]]:
    """The problem of an HTTP exporter's ``url`` (at path ``name``) that is not an http(s) URL."""
    if url.startswith(("http://", "https://")):
        return []
    return [(name, f"{url!r} is not an http:// or https:// URL")]
