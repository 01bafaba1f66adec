"""`fcfs-ordering-policy`: a flow's requests in arrival order (a FIFO per flow)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from epp.flowcontrol.policy import COMPACT_MIN_DEAD
from epp.flowcontrol.types import Item
from epp.scheduling.registry import FLOW_POLICY, BuildContext, Params, register


class FifoQueue:
    """A deque with lazy removal: O(1) push, pop and discard (amortized)."""

    __slots__ = ("_dead", "_q", "bytes", "live")

    def __init__(self) -> None:
        self._q: deque[Item] = deque()
        self._dead = 0
        self.live = 0
        self.bytes = 0

    def push(self, item: Item) -> None:
        self._q.append(item)
        self.live += 1
        self.bytes += item.byte_size

    def peek(self) -> Item | None:
        q = self._q
        while q and q[0].removed:
            q.popleft()
            self._dead -= 1
        return q[0] if q else None

    def pop(self) -> Item | None:
        item = self.peek()
        if item is None:
            return None
        self._q.popleft()
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
            self._q = deque(i for i in self._q if not i.removed)
            self._dead = 0

    def items(self) -> Iterator[Item]:
        return (i for i in self._q if not i.removed)

    def __len__(self) -> int:
        return self.live


@register("fcfs-ordering-policy", FLOW_POLICY)
class FcfsOrderingPolicy:
    """First come, first served: the earliest arrival at flow control goes first. No parameters."""

    kind = "ordering"

    def __init__(self, name: str = "fcfs-ordering-policy", params: object = None,
                 ctx: BuildContext | None = None) -> None:
        self.name = name

    @classmethod
    def parse(cls, p: Params) -> None:
        p.done()

    def new_queue(self) -> FifoQueue:
        return FifoQueue()

    def order_key(self, item: Item) -> tuple[float, int]:
        return (item.enqueued, item.seq)
