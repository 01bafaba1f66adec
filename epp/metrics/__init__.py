"""Model-server metrics: the scanner (parse), engine maps (engines), the poller (scrape).

The helpers here are what scheduling reads: how old an endpoint's snapshot is, and whether it is
too old to trust. A stale or missing snapshot means "unknown": scorers treat it as saturated.
"""

from __future__ import annotations

import math

from epp.datastore import Endpoint

DEFAULT_STALENESS = 0.2  # seconds; the reference treats older metrics as a saturated pod


def age(endpoint: Endpoint, now: float) -> float:
    """Seconds since the endpoint's last good scrape (`now` from time.monotonic()); inf if never."""
    metrics = endpoint.metrics
    return math.inf if metrics is None else now - metrics.updated


def is_stale(endpoint: Endpoint, now: float, threshold: float = DEFAULT_STALENESS) -> bool:
    """The snapshot is missing, or older than `threshold` seconds and no longer vouched for by the
    scraper as a steady idle page (`Metrics.steady_until`)."""
    metrics = endpoint.metrics
    return metrics is None or (now - metrics.updated > threshold and metrics.steady_until < now)


__all__ = ["DEFAULT_STALENESS", "age", "is_stale"]
