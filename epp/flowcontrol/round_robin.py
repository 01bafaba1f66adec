"""`round-robin-fairness-policy`: the band's non-empty flows take turns, one dispatch each, so a
tenant sending ten times as much gets no more turns than any other tenant with requests waiting."""

from __future__ import annotations

from epp.flowcontrol.bands import Band, Flow
from epp.flowcontrol.policy import PolicyBase
from epp.scheduling.registry import FLOW_POLICY, register


@register("round-robin-fairness-policy", FLOW_POLICY)
class RoundRobinFairnessPolicy(PolicyBase):
    """Rotates the band's ring of active flows: the front flow goes, then moves to the back (O(1))."""

    kind = "fairness"

    def pick(self, band: Band) -> Flow | None:
        ring = band.ring
        while ring:
            f = ring.popleft()
            if f.queue.live:
                ring.append(f)  # its turn is taken: to the back
                return f
            band.drop(f)
        return None
