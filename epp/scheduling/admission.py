"""Admission: shed sheddable requests (429) while the pool is saturated; never anything else.

Priority comes from the InferenceObjective (negative = sheddable) or the InferenceModel criticality
(Sheddable = -1, Critical = 100). Only priority < 0 is ever shed, and only when the saturation
detector calls the pool saturated; Critical (and every priority ≥ 0) always goes through.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.saturation import SaturationDetector


class Admission:
    """The director's admission check (its `Admission` protocol)."""

    def __init__(self, detector: SaturationDetector | None = None) -> None:
        self.detector = detector or SaturationDetector()

    def check(self, request: SchedulingRequest, candidates: Sequence[Endpoint], now: float) -> str | None:
        """A reason to answer 429, or None to admit. `now` is time.monotonic()."""
        if request.priority >= 0 or not candidates:
            return None
        d = self.detector
        if not d.pool_saturated(candidates, now):
            return None
        sat = d.pool_saturation(candidates, now)
        return f"pool saturated (saturation {sat:.2f} >= 1), request is sheddable (priority {request.priority})"

    def saturation(self, candidates: Sequence[Endpoint], now: float) -> float:
        """The pool's saturation for gauges: mean over pods of max(waiting/qT, kv/kvT), stale = 1."""
        return self.detector.pool_saturation(candidates, now)
