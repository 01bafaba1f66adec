"""`fcfs-ordering-policy`: a flow's requests in arrival order (a FIFO per flow)."""

from __future__ import annotations

from epp.flowcontrol.policy import KeyedOrderingPolicy
from epp.flowcontrol.queues import FifoQueue
from epp.flowcontrol.types import Item
from epp.scheduling.registry import FLOW_POLICY, register


@register("fcfs-ordering-policy", FLOW_POLICY)
class FcfsOrderingPolicy(KeyedOrderingPolicy):
    """First come, first served: the earliest arrival at flow control goes first. No parameters."""

    @staticmethod
    def key(item: Item) -> float:
        return item.enqueued

    def new_queue(self) -> FifoQueue:
        return FifoQueue()  # arrival order is the key's order: a deque, O(1) instead of a heap
