"""The per-flow queues the ordering policies hand out: a FIFO and a heap on a per-request key.

Both remove lazily: `discard` takes an item out of the counts at once (a cancelled or expired
request no longer holds capacity) and its slot is skipped when it reaches the head; a queue with
more dead slots than live ones is compacted, so memory stays proportional to what is queued.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator

from epp.flowcontrol.types import Item

COMPACT_MIN_DEAD = 64  # compact a queue once it holds this many dead slots and more dead than live


class _LazyQueue:
    """The counts and lazy discard both queues share; subclasses keep the slots and `_compact`."""

    __slots__ = ("_dead", "bytes", "live")

    def __init__(self) -> None:
        self._dead = 0
        self.live = 0
        self.bytes = 0

    def discard(self, item: Item) -> None:
        item.removed = True
        self.live -= 1
        self.bytes -= item.byte_size
        self._dead += 1
        if self._dead >= COMPACT_MIN_DEAD and self._dead > self.live:
            self._compact()
            self._dead = 0

    def _compact(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.live


class FifoQueue(_LazyQueue):
    """A deque in arrival order: O(1) push, pop and discard (amortized)."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        super().__init__()
        self._q: deque[Item] = deque()

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

    def _compact(self) -> None:
        self._q = deque(i for i in self._q if not i.removed)

    def items(self) -> Iterator[Item]:
        return (i for i in self._q if not i.removed)


class DeadlineQueue(_LazyQueue):
    """A heap on (key(item), arrival): O(log n) push and pop, O(1) discard. The key is fixed at push."""

    __slots__ = ("_h", "_key")

    def __init__(self, key: Callable[[Item], float]) -> None:
        super().__init__()
        self._key = key
        self._h: list[tuple[float, int, Item]] = []

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

    def _compact(self) -> None:
        self._h = [e for e in self._h if not e[2].removed]
        heapq.heapify(self._h)

    def items(self) -> Iterator[Item]:
        return (e[2] for e in self._h if not e[2].removed)
