"""Load guard on affinity: a pod much busier than the least-loaded candidate loses its affinity bonus.

Affinity (prefix, session) pulls related requests onto one pod; unchecked, a popular prefix turns
that pod into a hot spot while others idle. The guard compares each pod with the least-loaded
candidate on two signals: the engine's waiting queue (fresh metrics only) and this picker's own
in-flight count (which sees a burst before the next scrape does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle

_MEMO_KEY = "loadguard"


@dataclass(frozen=True, slots=True)
class LoadGuard:
    """Thresholds; a gap of 0 disables that test."""

    enabled: bool = True
    queue_gap: float = 5.0  # waiting − min waiting ≥ this → overloaded
    inflight_gap: int = 16  # inflight − min inflight ≥ this ...
    inflight_ratio: float = 1.5  # ... and inflight ≥ this × min inflight → overloaded

    def baseline(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> tuple[float | None, int]:
        """(min fresh waiting or None, min inflight) over the candidates, computed once per decision."""
        got = cycle.memo.get(_MEMO_KEY)
        if got is not None:
            return got  # type: ignore[no-any-return]
        waits = [m.waiting for m in cycle.fresh(endpoints) if m is not None]
        base = (min(waits) if waits else None, min([ep.inflight for ep in endpoints]))
        cycle.memo[_MEMO_KEY] = base
        return base

    def overloaded(self, cycle: Cycle, endpoints: Sequence[Endpoint], i: int) -> bool:
        """Whether endpoints[i] is much busier than the least-loaded candidate."""
        if not self.enabled or len(endpoints) < 2:
            return False
        min_wait, min_inflight = self.baseline(cycle, endpoints)
        if self.queue_gap > 0 and min_wait is not None:
            m = cycle.fresh(endpoints)[i]
            if m is not None and m.waiting - min_wait >= self.queue_gap:
                return True
        if self.inflight_gap > 0:
            n = endpoints[i].inflight
            if n - min_inflight >= self.inflight_gap and n >= self.inflight_ratio * min_inflight:
                return True
        return False


    def apply(self, cycle: Cycle, endpoints: Sequence[Endpoint], scores: list[float]) -> list[float]:
        """The affinity scores with those of overloaded endpoints set to 0."""
        if not self.enabled or len(endpoints) < 2 or not any(scores):
            return scores
        min_wait, min_inflight = self.baseline(cycle, endpoints)
        big = float("inf")
        # Both in-flight conditions folded into one threshold; a disabled test gets an infinite one.
        ilim = big
        if self.inflight_gap > 0:
            ilim = max(min_inflight + self.inflight_gap, self.inflight_ratio * min_inflight)
        wlim = min_wait + self.queue_gap if self.queue_gap > 0 and min_wait is not None else big
        if wlim == big:
            return [0.0 if s > 0.0 and ep.inflight >= ilim else s for s, ep in zip(scores, endpoints, strict=True)]
        return [0.0 if s > 0.0 and (ep.inflight >= ilim or (m is not None and m.waiting >= wlim)) else s
                for s, ep, m in zip(scores, endpoints, cycle.fresh(endpoints), strict=True)]


DISABLED = LoadGuard(enabled=False)
