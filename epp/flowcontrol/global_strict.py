"""`global-strict-fairness-policy`: no fairness between flows; the band behaves as one queue ordered
by its ordering policy (the head that orders first, whichever flow it is in, goes next)."""

from __future__ import annotations

import heapq
from typing import Any

from epp.flowcontrol.bands import Band, Flow
from epp.flowcontrol.policy import PolicyBase
from epp.flowcontrol.queues import COMPACT_MIN_DEAD
from epp.flowcontrol.types import Item
from epp.scheduling.registry import FLOW_POLICY, register

Entry = tuple[tuple[float, int], int, Flow, Item]


@register("global-strict-fairness-policy", FLOW_POLICY)
class GlobalStrictFairnessPolicy(PolicyBase):
    """A heap of the flows' heads per band (`band.state`), O(log flows) a pick. An entry goes stale
    when its item leaves the head (dispatched, cancelled, expired); a stale entry met at the top is
    replaced by its flow's current head, or the flow is forgotten when it is empty."""

    kind = "fairness"

    @staticmethod
    def _heap(band: Band) -> list[Entry]:
        if band.state is None:
            band.state = []
        heap: list[Entry] = band.state
        return heap

    def _index(self, band: Band, flow: Flow, item: Item) -> None:
        flow.marked = item
        heapq.heappush(self._heap(band), (band.ordering.order_key(item), item.seq, flow, item))

    def on_push(self, band: Band, flow: Flow, item: Item) -> None:
        """A request joined `flow`: index it when it is now the flow's head."""
        if flow.queue.peek() is item:
            self._index(band, flow, item)

    def pick(self, band: Band) -> Flow | None:
        heap = self._heap(band)
        if len(heap) > 2 * band.live + COMPACT_MIN_DEAD:
            self._rebuild(band)
        while heap:
            _, _, flow, item = heap[0]
            head = flow.queue.peek()
            if head is item:
                return flow
            heapq.heappop(heap)
            if head is None:
                if flow.marked is item:
                    flow.marked = None
                    band.drop(flow)
            elif flow.marked is not head:
                self._index(band, flow, head)
        return None

    def _rebuild(self, band: Band) -> None:
        heap: list[Any] = []
        for flow in list(band.flows.values()):
            head = flow.queue.peek()
            if head is None:
                flow.marked = None
                band.drop(flow)
                continue
            flow.marked = head
            heap.append((band.ordering.order_key(head), head.seq, flow, head))
        heapq.heapify(heap)
        band.state = heap
