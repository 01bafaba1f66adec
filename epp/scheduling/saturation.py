"""Saturation detector: when is a pod, and the pool, too busy to take more (sheddable) work.

A pod is saturated when its waiting queue reaches `queue_threshold`, its KV-cache use reaches
`kv_threshold`, or its metrics are stale or missing. The pool's saturation is the mean over the
candidates of max(waiting / queue_threshold, kv / kv_threshold), a stale pod counting as 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.datastore import Endpoint
from epp.scheduling.cycle import fresh_metrics

DEFAULT_QUEUE_THRESHOLD = 5
DEFAULT_KV_THRESHOLD = 0.8
DEFAULT_STALENESS = 0.2  # seconds; the reference's 200 ms


@dataclass(frozen=True, slots=True)
class SaturationDetector:
    """Thresholds and the pod/pool saturation tests; `now` is time.monotonic()."""

    queue_threshold: float = DEFAULT_QUEUE_THRESHOLD
    kv_threshold: float = DEFAULT_KV_THRESHOLD
    stale_after: float = DEFAULT_STALENESS
    # Our addition: never call the pool saturated while some candidate pod is below both thresholds
    # with fresh metrics (the mean alone sheds when one hot pod drags the average over 1).
    headroom_guard: bool = True

    def pod_load(self, ep: Endpoint, now: float) -> float:
        """max(waiting / queue threshold, kv / kv threshold); 1.0 for stale or missing metrics."""
        m = fresh_metrics(ep, now, self.stale_after)
        if m is None:
            return 1.0
        return max(m.waiting / self.queue_threshold, m.kv_usage / self.kv_threshold)

    def pod_saturated(self, ep: Endpoint, now: float) -> bool:
        m = fresh_metrics(ep, now, self.stale_after)
        return m is None or m.waiting >= self.queue_threshold or m.kv_usage >= self.kv_threshold

    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        """Mean pod load over `endpoints` (0.0 for none)."""
        if not endpoints:
            return 0.0
        return sum(self.pod_load(ep, now) for ep in endpoints) / len(endpoints)

    def pool_saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        """Saturation ≥ 1 (and, with the headroom guard, no pod left below the thresholds)."""
        if not endpoints or self.pool_saturation(endpoints, now) < 1.0:
            return False
        if self.headroom_guard:
            return all(self.pod_saturated(ep, now) for ep in endpoints)
        return True
