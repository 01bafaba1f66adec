"""`global-strict-fairness-policy`: no fairness between flows; the band behaves as one queue ordered
by its ordering policy (the head that orders first, whichever flow it is in, goes next)."""

from __future__ import annotations

from epp.flowcontrol.bands import Band, Flow
from epp.scheduling.registry import FLOW_POLICY, BuildContext, Params, register


@register("global-strict-fairness-policy", FLOW_POLICY)
class GlobalStrictFairnessPolicy:
    """Stateless: compares the head of every non-empty flow in the band (O(flows) a pick)."""

    kind = "fairness"

    def __init__(self, name: str = "global-strict-fairness-policy", params: object = None,
                 ctx: BuildContext | None = None) -> None:
        self.name = name

    @classmethod
    def parse(cls, p: Params) -> None:
        p.done()

    def pick(self, band: Band) -> Flow | None:
        best: Flow | None = None
        best_key: tuple[float, int] | None = None
        order = band.ordering.order_key
        for f in band.active():
            head = f.queue.peek()
            if head is None:
                continue
            k = order(head)
            if best_key is None or k < best_key:
                best, best_key = f, k
        return best
