"""Priority bands and the flows in them.

A band holds every flow of one priority; its fairness policy picks the flow, the flow's queue
(made by the band's ordering policy) the request. `ring` holds the band's flows that may have
requests, in the order they became active: round-robin rotates it, global-strict scans it, and a
flow found empty there is dropped from it and forgotten (an idle tenant costs nothing, and a client
sending ever new fairness ids cannot grow memory beyond what is queued).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from epp.flowcontrol.policy import FairnessPolicy, FlowQueue, OrderingPolicy
from epp.flowcontrol.types import FlowKey, Item

DEFAULT_BAND_MAX_REQUESTS = 5000  # the reference's per-band defaults
DEFAULT_BAND_MAX_BYTES = 1_000_000_000


@dataclass(slots=True, eq=False)
class Flow:
    """One (fairness id, priority) and its queue."""

    key: FlowKey
    queue: FlowQueue
    in_ring: bool = False
    last_used: float = 0.0
    marked: Any = None  # the fairness policy's per-flow note (global-strict: the head it has indexed)


@dataclass(slots=True, eq=False)
class Band:
    """All flows of one priority, with the band's limits and policies."""

    priority: int
    ordering: OrderingPolicy
    fairness: FairnessPolicy
    max_requests: int = DEFAULT_BAND_MAX_REQUESTS
    max_bytes: int = DEFAULT_BAND_MAX_BYTES
    flows: dict[str, Flow] = field(default_factory=dict)
    ring: deque[Flow] = field(default_factory=deque)
    live: int = 0
    bytes: int = 0
    state: Any = None  # the fairness policy's per-band state

    def flow(self, fairness_id: str, now: float) -> Flow:
        """The flow for a fairness id, created on first use."""
        f = self.flows.get(fairness_id)
        if f is None:
            f = self.flows[fairness_id] = Flow(FlowKey(self.priority, fairness_id), self.ordering.new_queue())
        f.last_used = now
        return f

    def push(self, flow: Flow, item: Item) -> None:
        flow.queue.push(item)
        self.live += 1
        self.bytes += item.byte_size
        on_push = getattr(self.fairness, "on_push", None)
        if on_push is not None:  # the policy keeps its own index instead of the ring
            on_push(self, flow, item)
        elif not flow.in_ring:
            flow.in_ring = True
            self.ring.append(flow)

    def took(self, item: Item) -> None:
        """An item left one of this band's queues (dispatched or discarded)."""
        self.live -= 1
        self.bytes -= item.byte_size

    def active(self) -> list[Flow]:
        """The flows with requests; the ring is rebuilt without the empty ones (they are forgotten)."""
        ring = self.ring
        live = [f for f in ring if f.queue.live]
        if len(live) != len(ring):
            for f in ring:
                if not f.queue.live:
                    self.drop(f)
            self.ring = deque(live)
        return live

    def drop(self, flow: Flow) -> None:
        """An empty flow leaves the ring and is forgotten (a tenant that sent one request costs
        nothing afterwards); it is made again on its next request."""
        flow.in_ring = False
        if flow.queue.live == 0 and self.flows.get(flow.key.fairness_id) is flow:
            del self.flows[flow.key.fairness_id]

    def fits(self, byte_size: int) -> bool:
        return self.live + 1 <= self.max_requests and self.bytes + byte_size <= self.max_bytes
