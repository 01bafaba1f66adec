"""`slo-deadline-ordering-policy`: the request whose TTFT objective runs out first goes first.

Deadline = when flow control received the request + its `x-llm-d-slo-ttft-ms` header (the
deprecated `x-slo-ttft-ms` is read too; the caller parses it into `Item.slo_ttft`). A request
without a valid header gets a far-future deadline, behind every request that has one; equal
deadlines go in arrival order. As in llm-d router v0.10.0, where this policy has the same name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from epp.flowcontrol.policy import KeyedOrderingPolicy
from epp.flowcontrol.types import Item
from epp.scheduling.registry import FLOW_POLICY, register

SLO_TTFT_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")  # the second is the deprecated alias
MAX_SLO_MS = 2**53  # larger values (or negative, or not an integer) count as no objective


def slo_ttft_seconds(headers: Mapping[str, str]) -> float | None:
    """The request's TTFT objective in seconds from its headers (None: missing or invalid)."""
    for name in SLO_TTFT_HEADERS:
        raw = headers.get(name)
        if raw is None or not raw.strip():
            continue
        try:
            ms = int(raw.strip(), 10)
        except ValueError:
            return None
        return ms / 1000.0 if 0 <= ms <= MAX_SLO_MS else None
    return None


def slo_deadline(item: Item) -> float:
    """Enqueue time + the request's TTFT objective (inf without one)."""
    return item.enqueued + item.slo_ttft if math.isfinite(item.slo_ttft) else math.inf


@register("slo-deadline-ordering-policy", FLOW_POLICY)
class SloDeadlineOrderingPolicy(KeyedOrderingPolicy):
    """Earliest SLO deadline first; requests without an objective last, in arrival order. No parameters."""

    key = staticmethod(slo_deadline)
