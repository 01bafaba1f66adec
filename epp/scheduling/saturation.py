"""Saturation detectors: when is a pod, and the pool, too busy to take more (sheddable) work.

Two kinds, as in the reference (each also usable in a profile as a filter):

- utilization (`SaturationDetector`, plugin `utilization-detector`, and the thresholds form of the
  config's `saturationDetector`): a pod is saturated when its waiting queue reaches
  `queue_threshold`, its KV-cache use reaches `kv_threshold`, or its metrics are stale or missing.
  The pool's saturation is the mean over the candidates of max(waiting / queue_threshold,
  kv / kv_threshold), a stale pod counting as 1.0.
- concurrency (`ConcurrencyDetector`, plugin `concurrency-detector`): from the requests (or
  estimated tokens) this picker has in flight on each endpoint, blind to engine metrics. Pool
  saturation = in flight / capacity summed over the pool (hybrid: mean over pods of the larger of
  the two ratios).

As filters both drop pods over capacity × (1 + headroom) and keep every pod when that would drop all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle, fresh_metrics
from epp.scheduling.registry import SATURATION, BuildContext, Params, register

DEFAULT_QUEUE_THRESHOLD = 5
DEFAULT_KV_THRESHOLD = 0.8
DEFAULT_STALENESS = 0.2  # seconds; the reference's 200 ms
STALENESS_POLICIES = ("saturated", "ignore")


@dataclass(frozen=True, slots=True)
class SaturationDetector:
    """Thresholds and the pod/pool saturation tests; `now` is time.monotonic()."""

    queue_threshold: float = DEFAULT_QUEUE_THRESHOLD
    kv_threshold: float = DEFAULT_KV_THRESHOLD
    stale_after: float = DEFAULT_STALENESS
    # Our addition: never call the pool saturated while some candidate pod is below both thresholds
    # with fresh metrics (the mean alone sheds when one hot pod drags the average over 1).
    headroom_guard: bool = True
    headroom: float = 0.0  # filter role: burst allowance over the thresholds, as a fraction
    # flow control: "saturated" (the reference: a stale pod is full) or "ignore" (gate on fresh pods only)
    staleness_policy: str = "saturated"

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

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Drop stale pods and pods over threshold × (1 + headroom); all of them when none is left."""
        queue_limit = self.queue_threshold * (1.0 + self.headroom)
        kv_limit = min(1.0, self.kv_threshold * (1.0 + self.headroom))
        kept = [ep for ep, m in zip(endpoints, cycle.fresh(endpoints), strict=True)
                if m is not None and m.waiting <= queue_limit and m.kv_usage <= kv_limit]
        return kept or endpoints


class PoolDetector(Protocol):
    """What admission asks of a saturation detector."""

    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float: ...

    def pool_saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool: ...


def _utilization(p: Params) -> SaturationDetector:
    d = SaturationDetector(
        queue_threshold=p.number("queueDepthThreshold", DEFAULT_QUEUE_THRESHOLD, lo=0, lo_open=True),
        kv_threshold=p.number("kvCacheUtilThreshold", DEFAULT_KV_THRESHOLD, lo=0, hi=1, lo_open=True),
        stale_after=p.duration("metricsStalenessThreshold", DEFAULT_STALENESS),
        headroom=p.number("headroom", 0.0, lo=0),
        headroom_guard=p.boolean("headroomGuard", True),
        staleness_policy=p.string("stalenessPolicy", "saturated", choices=STALENESS_POLICIES),
    )
    p.done()
    return d


@register("utilization-detector", SATURATION)
class UtilizationDetectorPlugin:
    """The metrics-based detector as a named plugin (parameters as the reference's, plus our
    `headroomGuard`); `detector` is what admission uses, `filter` its scheduling role."""

    def __init__(self, name: str, params: SaturationDetector, ctx: BuildContext) -> None:
        self.name = name
        self.detector = params

    @classmethod
    def parse(cls, p: Params) -> SaturationDetector:
        return _utilization(p)

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        return self.detector.filter(cycle, endpoints)


CONCURRENCY_MODES = ("requests", "tokens", "hybrid")


@dataclass(frozen=True, slots=True)
class ConcurrencyDetector:
    """Saturation from this picker's own in-flight requests and estimated tokens per endpoint."""

    mode: str = "requests"
    max_concurrency: int = 100
    max_token_concurrency: int = 1_000_000
    headroom: float = 0.0

    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        """In flight / capacity over the pool (hybrid: mean of per-pod max ratio); 1.0 for no pods."""
        n = len(endpoints)
        if n == 0:
            return 1.0
        if self.mode == "tokens":
            return sum(max(0, ep.inflight_tokens) for ep in endpoints) / (n * self.max_token_concurrency)
        if self.mode == "hybrid":
            return sum(max(max(0, ep.inflight) / self.max_concurrency,
                           max(0, ep.inflight_tokens) / self.max_token_concurrency) for ep in endpoints) / n
        return sum(max(0, ep.inflight) for ep in endpoints) / (n * self.max_concurrency)

    def pool_saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        return bool(endpoints) and self.pool_saturation(endpoints, now) >= 1.0

    def admits(self, ep: Endpoint) -> bool:
        """Below capacity × (1 + headroom) in the mode's dimension(s)."""
        req_limit = int(self.max_concurrency * (1.0 + self.headroom))
        tok_limit = int(self.max_token_concurrency * (1.0 + self.headroom))
        if self.mode == "tokens":
            return ep.inflight_tokens < tok_limit
        if self.mode == "hybrid":
            return ep.inflight < req_limit and ep.inflight_tokens < tok_limit
        return ep.inflight < req_limit

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Pods below their limit; every pod when none is (a pick is better than none)."""
        return [ep for ep in endpoints if self.admits(ep)] or endpoints


@register("concurrency-detector", SATURATION)
class ConcurrencyDetectorPlugin:
    """`concurrency-detector`: parameters concurrencyMode, maxConcurrency, maxTokenConcurrency,
    headroom (and inFlightLoadProducerName, accepted: the in-flight counts here are the director's)."""

    def __init__(self, name: str, params: ConcurrencyDetector, ctx: BuildContext) -> None:
        self.name = name
        self.detector = params

    @classmethod
    def parse(cls, p: Params) -> ConcurrencyDetector:
        d = ConcurrencyDetector(
            mode=p.string("concurrencyMode", "requests", choices=CONCURRENCY_MODES),
            max_concurrency=p.integer("maxConcurrency", 100, lo=1),
            max_token_concurrency=p.integer("maxTokenConcurrency", 1_000_000, lo=1),
            headroom=p.number("headroom", 0.0, lo=0),
        )
        p.string("inFlightLoadProducerName", "")
        p.done()
        return d

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        return self.detector.filter(cycle, endpoints)
