"""The poller's slower rates never make the scheduler read a healthy endpoint's page as stale.

A page older than the threshold (200 ms by default) makes an endpoint score as the worst pod on
every metric scorer. When the poller waited longer than that on purpose (an idle or quiet endpoint),
the scheduler sent traffic away from healthy pods that held the request's prefix, onto cold ones:
live shared-prefix p90 TTFT 330 ms instead of 58 ms (issue 18). So the quiet (busy) rate stays
inside half the threshold, and an idle endpoint's steady page is vouched for until its next poll
(`Metrics.steady_until`). These run a real loopback metrics server and the picker's own poller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from epp.datastore import Datastore
from epp.metrics.scrape import Scraper
from epp.scheduling.cycle import fresh_metrics
from tests.metrics import pages

BASE = 0.02  # a fast base rate keeps the tests short


@pytest.fixture
async def page_server() -> AsyncIterator[str]:
    """A model server whose /metrics page never changes (so the poller calms down); its address."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=pages.vllm(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def widest_gap(gap: Callable[[], float], polls: Callable[[], int], n: int, timeout: float = 10.0) -> float:
    """The largest delay between polls the poller chose while it made `n` more polls."""
    start, widest = polls(), 0.0
    deadline = time.monotonic() + timeout
    while polls() - start < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {n} polls in {timeout} s")
        widest = max(widest, gap())
        await asyncio.sleep(0.005)
    return max(widest, gap())


async def test_the_pickers_poller_keeps_an_idle_page_fresh_for_its_scheduler(start_picker: Any,
                                                                             page_server: str) -> None:
    # the default options: idle endpoints polled ever slower (--refresh-metrics-idle-interval 500ms)
    app, _ = await start_picker(endpoints=[page_server])
    stale_after = app.config.saturation.stale_after
    assert app.scraper is not None
    scraper: Scraper = app.scraper.scraper
    target = scraper._targets[page_server]
    ep = app.datastore.endpoints[page_server]
    old = 0

    def gap() -> float:  # sampled every 5 ms: the scheduler's view of the page must stay fresh
        nonlocal old
        now = time.monotonic()
        assert ep.metrics is None or fresh_metrics(ep, now, stale_after) is not None, "an idle page read as stale"
        old += ep.metrics is not None and now - ep.metrics.updated > stale_after
        return target.gap

    widest = await widest_gap(gap, lambda: scraper.polls()[page_server], 10)
    assert target.calm >= 3  # the idle rule applied: nothing changed, nothing in flight
    assert widest > stale_after  # polled slower than the threshold (500 ms by default)
    assert old > 0  # and older than it at times: the vouch kept it in


async def test_the_quiet_rate_is_capped_at_half_the_staleness_threshold(page_server: str) -> None:
    ds = Datastore("pool")
    ds.set_static_endpoints([page_server])
    ep = ds.endpoints[page_server]
    ep.inflight, ep.inflight_tokens = 2, 300  # busy, and nothing routed or ended there since
    s = Scraper(ds, interval=BASE, timeout=0.5, max_age=0.2, quiet_interval=1.0)
    s.start()
    try:
        target = s._targets[page_server]
        widest = await widest_gap(lambda: target.gap, lambda: s.polls()[page_server], 20)
        assert BASE * 1.5 < widest <= 0.1
        assert ep.metrics is not None and ep.metrics.waiting == 2 and ep.metrics.steady_until == 0.0
    finally:
        await s.stop()


async def test_the_idle_rate_is_not_capped_its_page_is_vouched_for(page_server: str) -> None:
    ds = Datastore("pool")
    ds.set_static_endpoints([page_server])
    ep = ds.endpoints[page_server]
    s = Scraper(ds, interval=BASE, timeout=0.5, max_age=0.2, idle_interval=0.4)
    s.start()
    try:
        target = s._targets[page_server]

        def gap() -> float:
            assert ep.metrics is None or fresh_metrics(ep, time.monotonic(), 0.2) is not None, "read as stale"
            return target.gap

        widest = await widest_gap(gap, lambda: s.polls()[page_server], 10)
        assert widest > 0.2  # past the old cap (half the threshold) and the threshold itself
    finally:
        await s.stop()


def test_a_threshold_under_the_base_rate_turns_the_quiet_rate_off() -> None:
    ds = Datastore("pool")
    s = Scraper(ds, interval=0.05, idle_interval=0.5, quiet_interval=0.2, max_age=0.08)
    assert s.idle_interval == 0.5 and s.quiet_interval is None
    s = Scraper(ds, interval=0.05, idle_interval=0.5, quiet_interval=0.2)  # no bound given: as configured
    assert (s.idle_interval, s.quiet_interval) == (0.5, 0.2)


async def test_early_wakes_do_not_push_the_next_poll_later(page_server: str) -> None:
    # A busy endpoint whose traffic moves at every base interval is woken early again and again;
    # when its traffic then stops moving (requests still in flight), it must still be polled at
    # the capped quiet rate, not after the rest of every earlier wait added up.
    ds = Datastore("pool")
    ds.set_static_endpoints([page_server])
    ep = ds.endpoints[page_server]
    ep.inflight, ep.inflight_tokens = 2, 300
    s = Scraper(ds, interval=BASE, timeout=0.5, quiet_interval=1.0, max_age=0.2)
    s.start()
    try:
        target = s._targets[page_server]
        widest = await widest_gap(lambda: target.gap, lambda: s.polls()[page_server], 5)
        assert widest > BASE * 1.5  # the quiet rule applies
        for _ in range(60):  # ~1.2 s of traffic: a dispatch or a completion every base interval
            ep.inflight_tokens += 1 if ep.inflight_tokens % 2 else -1
            await asyncio.sleep(BASE)
        # the traffic stops moving: count polls while a clock tick of 0.6 s passes in 5 ms steps
        # (an early-wake drift of ~1 s polled nothing in that window; the 0.1 s cap polls ~6 times)
        n = s.polls()[page_server]
        for _ in range(120):
            await asyncio.sleep(0.005)
        assert s.polls()[page_server] - n >= 2
    finally:
        await s.stop()
