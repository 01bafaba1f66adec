"""Admission: shed sheddable requests (429) while the pool is saturated; never anything else.

Priority comes from the InferenceObjective (negative = sheddable) or the InferenceModel criticality
(Sheddable = -1, Critical = 100). Only priority < 0 is ever shed: when the saturation detector calls
the pool saturated, or when a declared admitter plugin (`probabilistic-admitter`) rejects it.
Critical (and every priority ≥ 0) always goes through.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from epp.datastore import Endpoint
from epp.scheduling.cycle import fresh_metrics
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.registry import ADMITTER, BuildContext, Params, register
from epp.scheduling.saturation import (
    DEFAULT_KV_THRESHOLD,
    DEFAULT_QUEUE_THRESHOLD,
    PoolDetector,
    SaturationDetector,
)


class Admitter(Protocol):
    """A plugin of kind ADMITTER: a reason to reject a sheddable request, or None."""

    name: str

    def admit(self, request: SchedulingRequest, candidates: Sequence[Endpoint], now: float) -> str | None: ...


class Admission:
    """The director's admission check (its `Admission` protocol)."""

    def __init__(self, detector: PoolDetector | None = None, admitters: Sequence[Admitter] = ()) -> None:
        self.detector: PoolDetector = detector or SaturationDetector()
        self.admitters = tuple(admitters)

    def check(self, request: SchedulingRequest, candidates: Sequence[Endpoint], now: float) -> str | None:
        """A reason to answer 429, or None to admit. `now` is time.monotonic()."""
        if request.priority >= 0 or not candidates:
            return None
        for admitter in self.admitters:
            reason = admitter.admit(request, candidates, now)
            if reason is not None:
                return reason
        d = self.detector
        if not d.pool_saturated(candidates, now):
            return None
        sat = d.pool_saturation(candidates, now)
        return f"pool saturated (saturation {sat:.2f} >= 1), request is sheddable (priority {request.priority})"

    def saturation(self, candidates: Sequence[Endpoint], now: float) -> float:
        """The pool's saturation for gauges (utilization: mean over pods of max(waiting/qT, kv/kvT),
        stale = 1; concurrency: in flight / capacity)."""
        return self.detector.pool_saturation(candidates, now)


@dataclass(frozen=True, slots=True)
class ProbabilisticParams:
    queue_threshold: float = DEFAULT_QUEUE_THRESHOLD
    kv_threshold: float = DEFAULT_KV_THRESHOLD
    power: float = 5.0
    k: float = 300.0


@register("probabilistic-admitter", ADMITTER)
class ProbabilisticAdmitter:
    """Rejects a sheddable request with probability min(saturation^power × k, 1), saturation being
    the mean over pods of max(waiting / queueDepthThreshold, kv / kvCacheUtilThreshold) (a pod with
    stale or missing metrics counts 1). Priority ≥ 0 and an empty pool are always admitted."""

    def __init__(self, name: str, params: ProbabilisticParams, ctx: BuildContext) -> None:
        self.name = name
        self.p = params
        self.rng: random.Random = ctx.rng
        self.stale_after = ctx.detector.stale_after

    @classmethod
    def parse(cls, p: Params) -> ProbabilisticParams:
        out = ProbabilisticParams(
            queue_threshold=p.number("queueDepthThreshold", DEFAULT_QUEUE_THRESHOLD, lo=0, lo_open=True),
            kv_threshold=p.number("kvCacheUtilThreshold", DEFAULT_KV_THRESHOLD, lo=0, hi=1, lo_open=True),
            power=p.number("power", 5.0, lo=0, lo_open=True),
            k=p.number("k", 300.0, lo=0, lo_open=True),
        )
        p.done()
        return out

    def saturation(self, candidates: Sequence[Endpoint], now: float) -> float:
        if not candidates:
            return 0.0
        total = 0.0
        for ep in candidates:
            m = fresh_metrics(ep, now, self.stale_after)
            total += 1.0 if m is None else max(m.waiting / self.p.queue_threshold, m.kv_usage / self.p.kv_threshold)
        return total / len(candidates)

    def shed_probability(self, candidates: Sequence[Endpoint], now: float) -> float:
        sat = self.saturation(candidates, now)
        try:
            return min(1.0, sat ** self.p.power * self.p.k)
        except OverflowError:
            return 1.0

    def admit(self, request: SchedulingRequest, candidates: Sequence[Endpoint], now: float) -> str | None:
        if request.priority >= 0 or not candidates:
            return None
        prob = self.shed_probability(candidates, now)
        if prob > 0.0 and self.rng.random() < prob:
            return (f"{self.name}: shed sheddable request (priority {request.priority}) with probability "
                    f"{prob:.2f}")
        return None
