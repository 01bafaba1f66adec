"""Flow-control vocabulary: flow keys, queued items, outcomes and the reasons reported to clients.

Names follow llm-d router v0.10.0 (`QueueOutcome` strings are its metric label values; the reason
strings are the values of its `x-llm-d-request-dropped-reason` header).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
DEFAULT_FAIRNESS_ID = "default-flow"


class Outcome(enum.Enum):
    """The final state of a request in flow control; `.value` is the reference's label value."""

    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_NO_ENDPOINTS = "RejectedNoEndpoints"
    REJECTED_OTHER = "RejectedOther"
    EVICTED_TTL = "EvictedTTL"
    EVICTED_CONTEXT_CANCELLED = "EvictedContextCancelled"
    EVICTED_OTHER = "EvictedOther"


# Reasons (header values), as llm-d names them
REASON_SATURATED = "rejected-saturated"
REASON_NO_ENDPOINTS = "rejected-no-endpoints"
REASON_TTL_EXPIRED = "rejected-ttl-expired"
REASON_CONTEXT_CANCELLED = "rejected-context-cancelled"
REASON_SHUTTING_DOWN = "rejected-shutting-down"


@dataclass(frozen=True, slots=True)
class Drop:
    """How a request that was not dispatched is answered: HTTP status, the reference's error code,
    the client message, and the `x-llm-d-request-dropped-reason` value."""

    status: int
    code: str
    message: str
    reason: str


def drop_for(outcome: Outcome, pool_empty: bool = False, detail: str = "") -> Drop | None:
    """The answer for an outcome (None for Dispatched). A TTL expiry is backpressure (429) while the
    pool has endpoints and unavailability (503) when it has none, as in llm-d."""
    msg = detail or "request rejected by flow control"
    if outcome is Outcome.DISPATCHED:
        return None
    if outcome is Outcome.REJECTED_CAPACITY:
        return Drop(429, "ResourceExhausted", f"flow control queue at capacity: {msg}", REASON_SATURATED)
    if outcome is Outcome.REJECTED_NO_ENDPOINTS:
        return Drop(503, "ServiceUnavailable", f"no endpoints available: {msg}", REASON_NO_ENDPOINTS)
    if outcome is Outcome.EVICTED_TTL:
        if pool_empty:
            return Drop(503, "ServiceUnavailable",
                        f"request timed out in queue and no endpoints are available: {msg}", REASON_NO_ENDPOINTS)
        return Drop(429, "ResourceExhausted", f"request timed out in queue: {msg}", REASON_TTL_EXPIRED)
    if outcome is Outcome.EVICTED_CONTEXT_CANCELLED:
        return Drop(503, "ServiceUnavailable", f"client disconnected: {msg}", REASON_CONTEXT_CANCELLED)
    # shutdown (and anything else internal): 500, as GIE v1.5.0 answers it (llm-d v0.10.0: 503)
    return Drop(500, "Internal", f"flow controller shutting down: {msg}", REASON_SHUTTING_DOWN)


@dataclass(frozen=True, slots=True, order=True)
class FlowKey:
    """A flow: the fairness id (tenant) and the priority (its band)."""

    priority: int
    fairness_id: str = DEFAULT_FAIRNESS_ID


@dataclass(slots=True, eq=False)
class Item:
    """One queued request. `on_done(item)` is called exactly once, when the outcome is final; a
    dispatched item's `on_done` is where the caller binds it to an endpoint (late binding)."""

    key: FlowKey
    byte_size: int
    enqueued: float  # the controller's clock
    ttl: float  # seconds; math.inf = no TTL
    on_done: Callable[[Item], Any] | None = None
    payload: Any = None  # the caller's (the request); never read by flow control
    request_id: str = ""
    model: str = ""  # metric labels (model_name, target_model_name)
    target_model: str = ""
    seq: int = 0  # arrival order (ties)
    outcome: Outcome | None = None
    finished_at: float = 0.0
    removed: bool = False  # left its queue (the queue skips it lazily)
    band: Any = None  # the band it waits in, while queued
    pool_empty: bool = False  # the pool had no endpoints when the outcome was decided
    result: Any = None  # what on_done returned (for dispatched items: the binding)
    slo_ttft: float = math.inf  # the request's TTFT objective in seconds (x-llm-d-slo-ttft-ms); inf = none

    @property
    def deadline(self) -> float:
        """Absolute expiry time on the controller's clock (inf without a TTL)."""
        return self.enqueued + self.ttl if math.isfinite(self.ttl) else math.inf

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def drop(self) -> Drop | None:
        """How to answer the client when the item was not dispatched (None: dispatched or waiting)."""
        return drop_for(self.outcome, self.pool_empty) if self.outcome is not None else None
