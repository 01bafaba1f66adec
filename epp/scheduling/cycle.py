"""One scheduling decision's shared, computed-once view: the request, the clock, fresh metrics.

Plugins read metrics through `Cycle.fresh(endpoints)` so that staleness is judged once per request
and every scorer treats a stale pod the same way (as the worst).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from epp.datastore import Endpoint, Metrics
from epp.scheduling.framework import SchedulingRequest


def fresh_metrics(ep: Endpoint, now: float, stale_after: float) -> Metrics | None:
    """The endpoint's metrics if the last scrape succeeded and is at most `stale_after` s old (or
    the scraper still vouches for a steady idle page: `Metrics.steady_until`), else None."""
    m = ep.metrics
    if m is None or not ep.scrape_ok or (now - m.updated > stale_after and m.steady_until < now):
        return None
    return m


class Cycle:
    """Per-request scheduling state; `memo` holds values plugins share within the decision."""

    __slots__ = ("_fresh", "_fresh_for", "memo", "now", "request", "stale_after")

    def __init__(self, request: SchedulingRequest, now: float, stale_after: float) -> None:
        self.request = request
        self.now = now
        self.stale_after = stale_after
        self.memo: dict[str, Any] = {}
        self._fresh_for: Sequence[Endpoint] | None = None
        self._fresh: list[Metrics | None] = []

    def fresh(self, endpoints: Sequence[Endpoint]) -> list[Metrics | None]:
        """Fresh metrics aligned with `endpoints` (None = stale or missing); cached per list."""
        if self._fresh_for is endpoints:
            return self._fresh
        now = self.now
        limit = now - self.stale_after
        out: list[Metrics | None] = []
        append = out.append
        for ep in endpoints:
            m = ep.metrics
            append(m if m is not None and (m.updated >= limit or m.steady_until >= now) and ep.scrape_ok else None)
        self._fresh_for = endpoints
        self._fresh = out
        return out
