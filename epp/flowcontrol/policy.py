"""What a flow-control policy is: the queue an ordering policy keeps per flow, and the two policy kinds.

- an ordering policy (`fcfs-ordering-policy`, `edf-ordering-policy`) makes each flow's queue and
  orders the requests in it (`order_key`: smaller goes first);
- a fairness policy (`global-strict-fairness-policy`, `round-robin-fairness-policy`) picks, in one
  priority band, the flow whose head request goes next.

Queues remove lazily (`queues.py`). `PolicyBase` and `KeyedOrderingPolicy` are what the policy
plugins share: built with no arguments under their registered type name, no parameters unless a
policy reads some, and (ordering) one number per request that orders it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from epp.flowcontrol.queues import DeadlineQueue
from epp.flowcontrol.types import Item
from epp.scheduling.registry import BuildContext, NoParams, type_name_of

if TYPE_CHECKING:
    from epp.flowcontrol.bands import Band, Flow


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


class PolicyBase(NoParams):
    """A flow-control policy plugin: `kind` says which of the two it is; the name defaults to the
    type name it is registered under (the controller builds the defaults without arguments)."""

    kind = ""

    def __init__(self, name: str = "", params: object = None, ctx: BuildContext | None = None) -> None:
        self.name = name or type_name_of(self)


class KeyedOrderingPolicy(PolicyBase):
    """An ordering policy whose order is one number per request (`key`, fixed when it is queued):
    smaller first, arrival order on ties; each flow is a heap on it."""

    kind = "ordering"

    def key(self, item: Item) -> float:
        raise NotImplementedError

    def new_queue(self) -> FlowQueue:
        return DeadlineQueue(self.key)

    def order_key(self, item: Item) -> tuple[float, int]:
        return (self.key(item), item.seq)
