"""`edf-ordering-policy`: earliest deadline first (deadline = enqueue time + TTL; none = last),
arrival order between equal deadlines."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from epp.flowcontrol.policy import COMPACT_MIN_DEAD
from epp.flowcontrol.types import Item
from epp.scheduling.registry import FLOW_POLICY, BuildContext, Params, register


def _deadline(item: Item) -> float:
    return item.deadline


class DeadlineQueue:
    """A heap on (key(item), arrival) with lazy removal: O(log n) push and pop, O(1) discard. The key
    is the item's TTL deadline unless the ordering policy gives its own (fixed at push)."""

    __slots__ = ("_dead", "_h", "_key", "bytes", "live")

    def __init__(self, key: Callable[[Item], float] = _deadline) -> None:
        self._key = key
        self._h: list[tuple[float, int, Item]] = []
        self._dead = 0
        self.live = 0
        self.bytes = 0

    def push(self, item: Item) -> None:
        heapq.heappush(self._h, (self._key(item), item.seq, item))
        self.live += 1
        self.bytes += item.byte_size

    def peek(self) -> Item | None:
        h = self._h
        while h and h[0][2].removed:
            heapq.heappop(h)
            self._dead -= 1
        return h[0][2] if h else None

    def pop(self) -> Item | None:
        item = self.peek()
        if item is None:
            return None
        heapq.heappop(self._h)
        item.removed = True
        self.live -= 1
        self.bytes -= item.byte_size
        return item

    def discard(self, item: Item) -> None:
        item.removed = True
        self.live -= 1
        self.bytes -= item.byte_size
        self._dead += 1
        if self._dead >= COMPACT_MIN_DEAD and self._dead > self.live:
            self._h = [e for e in self._h if not e[2].removed]
            heapq.heapify(self._h)
            self._dead = 0

    def items(self) -> Iterator[Item]:
        return (e[2] for e in self._h if not e[2].removed)

    def __len__(self) -> int:
        return self.live


@register("edf-ordering-policy", FLOW_POLICY)
class EdfOrderingPolicy:
    """Earliest deadline first; requests without a TTL after every request with one. No parameters."""

    kind = "ordering"

    def __init__(self, name: str = "edf-ordering-policy", params: object = None,
                 ctx: BuildContext | None = None) -> None:
        self.name = name

    @classmethod
    def parse(cls, p: Params) -> None:
        p.done()

    def new_queue(self) -> DeadlineQueue:
        return DeadlineQueue()

    def order_key(self, item: Item) -> tuple[float, int]:
        return (item.deadline, item.seq)
