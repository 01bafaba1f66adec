"""Shared pieces of the Kubernetes-source tests: bounded polling and fast timings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from epp.sources.kube_watch import WatchTiming
from epp.sources.leader import LeaseTiming

# Short enough that retries happen within a test, long enough for a loaded 2-core machine.
FAST_WATCH = WatchTiming(
    watch_timeout=5,
    connect_timeout=2.0,
    list_timeout=5.0,
    backoff_base=0.05,
    backoff_cap=0.4,
    absent_retry=0.3,
)
FAST_LEASE = LeaseTiming(lease_duration=1, renew_deadline=0.6, retry_period=0.1)


async def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` on the loop until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def stays(predicate: Callable[[], object], duration: float = 0.3) -> bool:
    """True when `predicate` holds throughout `duration` (for "nothing else happens" checks)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        await asyncio.sleep(0.01)
    return bool(predicate())
