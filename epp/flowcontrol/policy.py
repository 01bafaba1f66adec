"""What a flow-control policy is: the queue an ordering policy keeps per flow, and the two policy kinds.

- an ordering policy (`fcfs-ordering-policy`, `edf-ordering-policy`) makes each flow's queue and
  orders the requests in it (`order_key`: smaller goes first);
- a fairness policy (`global-strict-fairness-policy`, `round-robin-fairness-policy`) picks, in one
  priority band, the flow whose head request goes next.

Queues remove lazily: `discard` takes an item out of the counts at once (a cancelled or expired
request no longer holds capacity) and the slot is skipped when it reaches the head; a queue with
more dead slots than live ones is compacted, so memory stays proportional to what is queued.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from epp.flowcontrol.types import Item

if TYPE_CHECKING:
    from epp.flowcontrol.bands import Band, Flow

COMPACT_MIN_DEAD = 64  # compact a queue once it holds this many dead slots and more dead than live


class FlowQueue(Protocol):
    """One flow's requests in the ordering policy's order."""

    live: int  # items queued (not discarded)
    bytes: int  # their byte sizes summed

    def push(self, item: Item) -> None: ...

    def peek(self) -> Item | None:
        """The next live item, or None."""

    def pop(self) -> Item | None:
        """Remove and return the next live item, or None."""

    def discard(self, item: Item) -> None:
        """Take a queued item out (it must be in this queue and live)."""

    def items(self) -> Iterator[Item]:
        """The live items (any order)."""


class OrderingPolicy(Protocol):
    name: str

    def new_queue(self) -> FlowQueue: ...

    def order_key(self, item: Item) -> tuple[float, int]:
        """Comparable across flows (a global-strict band compares the flows' heads); smaller first."""


class FairnessPolicy(Protocol):
    name: str

    def pick(self, band: Band) -> Flow | None:
        """The flow whose head goes next among the band's non-empty flows (None: all empty)."""
