"""Quota refusals, and how every push receiver answers a refusal: one mapping, not one per receiver.

A quota (the ``tenant`` processor's ``points_per_second`` / ``requests_per_minute``) refuses a batch at
admission (:class:`agent.component.Admission`) with :class:`QuotaExceeded`, a :class:`Backpressure`
carrying the figures a client needs: how long to wait, the limit, what remains and how many of the
batch's points would fit now (so a receiver that can refuse item by item takes those and refuses the
rest). :func:`answer` turns any Backpressure into the receiver's answer:

- a quota refusal: HTTP 429 with ``Retry-After`` and ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``,
  ``X-RateLimit-Reset``; gRPC ``RESOURCE_EXHAUSTED`` (the tenant spent its budget: the code the
  Collector and Google APIs use for quota) with a ``RetryInfo`` detail;
- any other (a full queue, the memory limit): HTTP 429 with ``Retry-After``; gRPC ``UNAVAILABLE``
  (the agent is overloaded, retrying later helps), as before.

``X-RateLimit-Reset`` has the IETF draft's meaning (draft-ietf-httpapi-ratelimit-headers,
``RateLimit-Reset``): seconds from now, like ``Retry-After`` — not GitHub's epoch timestamp, which needs
a client clock in step with ours. It is the time until the bucket has room for what was refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from google.rpc import code_pb2

from agent.component import Backpressure

QUOTA_REASON = "tenant_quota"
"""The refusal code of a request (or item) over its tenant's quota, in answers and in self-metrics."""


class QuotaExceeded(Backpressure):
    """A batch over its tenant's quota, refused before any consumer took it.

    ``limit`` names the quota that refused (``points_per_second``, ``requests_per_minute``,
    ``max_tenants``); ``limit_value`` and ``remaining`` are its X-RateLimit figures (the bucket's size
    and what is left in it, in points or requests), None when the quota has none; ``fits`` is how many
    of the batch's points its tenant may pass now (0 when none may, e.g. no request left)."""

    def __init__(
        self,
        tenant: str,
        limit: str,
        *,
        retry_after_s: float,
        limit_value: int | None = None,
        remaining: int | None = None,
        fits: int = 0,
    ) -> None:
        super().__init__(QUOTA_REASON, retry_after_s)
        self.tenant = tenant
        self.limit = limit
        self.limit_value = limit_value
        self.remaining = remaining
        self.fits = fits

    def __str__(self) -> str:
        return f"tenant {self.tenant!r} is over its {self.limit} quota"


@dataclass(frozen=True)
class Answer:
    """How a receiver answers a refused request (or, with ``http_status`` 200, a partly taken one)."""

    http_status: int
    grpc_code: int
    """A ``google.rpc.Code`` number (the same numbers as ``grpc.StatusCode``)."""
    reason: str
    """The refusal code: ``tenant_quota`` or ``backpressure`` (also the self-metrics reason)."""
    message: str
    retry_after_s: int
    """Whole seconds, at least 1: what ``Retry-After`` and RetryInfo say."""
    headers: dict[str, str] = field(default_factory=dict)
    """``Retry-After``, and for a quota the ``X-RateLimit-*`` headers."""


def answer(refusal: Backpressure) -> Answer:
    """The answer to ``refusal`` (module docs)."""
    retry_after = max(1, math.ceil(refusal.retry_after_s or 1))
    headers = {"Retry-After": str(retry_after)}
    if isinstance(refusal, QuotaExceeded):
        headers.update(rate_limit_headers(refusal))
        return Answer(
            429,
            code_pb2.RESOURCE_EXHAUSTED,
            QUOTA_REASON,
            f"{refusal}; retry in {retry_after}s",
            retry_after,
            headers,
        )
    return Answer(
        429,
        code_pb2.UNAVAILABLE,
        "backpressure",
        f"the agent is overloaded ({refusal.reason}); retry later",
        retry_after,
        headers,
    )


def rate_limit_headers(refusal: QuotaExceeded) -> dict[str, str]:
    """``X-RateLimit-Limit`` / ``-Remaining`` (when the quota has such figures) and ``-Reset`` (seconds)."""
    headers = {"X-RateLimit-Reset": str(max(1, math.ceil(refusal.retry_after_s or 1)))}
    if refusal.limit_value is not None:
        headers["X-RateLimit-Limit"] = str(refusal.limit_value)
    if refusal.remaining is not None:
        headers["X-RateLimit-Remaining"] = str(max(0, refusal.remaining))
    return headers
