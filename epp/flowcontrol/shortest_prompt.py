"""`shortest-prompt-first-ordering-policy` (ours): small requests first, with aging so none starves.

Each request gets a virtual deadline = enqueue time + `agingSecondsPerKiB` × its body size in KiB,
and the earliest goes first. A request of size s is therefore passed only by requests that arrive
less than `agingSecondsPerKiB` × (s − their size) after it: once the queue has drained what came
before enqueue + k × s, it goes next, however many small requests keep arriving. With the default
(0.05 s a KiB) a 4 KiB chat prompt yields to smaller ones for at most 0.2 s, a 128 KiB document for
at most 6.4 s. Body size is the proxy for prefill work the picker has before any scheduling.
"""

from __future__ import annotations

from epp.flowcontrol.policy import KeyedOrderingPolicy
from epp.flowcontrol.types import Item
from epp.scheduling.registry import FLOW_POLICY, BuildContext, Params, register

DEFAULT_AGING_PER_KIB = 0.05  # seconds of head start a request gives up per KiB of body


@register("shortest-prompt-first-ordering-policy", FLOW_POLICY)
class ShortestPromptFirstOrderingPolicy(KeyedOrderingPolicy):
    """Virtual deadline = enqueue + agingSecondsPerKiB × KiB; earliest first, arrival order on ties."""

    def __init__(self, name: str = "", params: object = None, ctx: BuildContext | None = None) -> None:
        super().__init__(name)
        self.aging = float(params) if isinstance(params, int | float) else DEFAULT_AGING_PER_KIB

    @classmethod
    def parse(cls, p: Params) -> float:  # type: ignore[override]
        aging = p.number("agingSecondsPerKiB", DEFAULT_AGING_PER_KIB, lo=0, lo_open=True)
        p.done()
        return aging

    def virtual_deadline(self, item: Item) -> float:
        """When the request stops yielding to smaller ones (the clock's time)."""
        return item.enqueued + self.aging * item.byte_size / 1024.0

    key = virtual_deadline
