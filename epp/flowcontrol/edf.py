"""`edf-ordering-policy`: earliest deadline first (deadline = enqueue time + TTL; none = last),
arrival order between equal deadlines."""

from __future__ import annotations

from epp.flowcontrol.policy import KeyedOrderingPolicy
from epp.flowcontrol.types import Item
from epp.scheduling.registry import FLOW_POLICY, register


@register("edf-ordering-policy", FLOW_POLICY)
class EdfOrderingPolicy(KeyedOrderingPolicy):
    """Earliest deadline first; requests without a TTL after every request with one. No parameters."""

    @staticmethod
    def key(item: Item) -> float:
        return item.deadline
