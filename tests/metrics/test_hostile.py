"""Hostile model servers (issue 13.7) against the real poller: a 10 MB page, an endless chunked
stream, a page of a million series. The picker reads at most the cap, keeps polling the others,
marks the bad pod (its metrics go stale) and backs off from it; memory stays bounded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web

from epp.metrics import is_stale
from epp.metrics.engines import ENGINES
from epp.metrics.scrape import Scraper
from tests.metrics import pages
from tests.metrics.test_scrape import datastore, messages, until

FAST = 0.02
CAP = 1 << 20  # a 1 MiB cap for the tests (default 4 MiB)
FILLER = "# HELP filler_metric padding\n# TYPE filler_metric gauge\n" + "".join(
    f'filler_metric{{i="{i:08d}",pad="{"x" * 64}"}} 1\n' for i in range(1000))  # ~100 KB


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Hostile:
    """An aiohttp server with a good page on /good and hostile ones elsewhere; counts what it sends."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.ports: list[int] = []
        self.sent: dict[str, list[int]] = {}  # route -> bytes written per request
        self.huge = (pages.vllm() + FILLER * 100).encode()  # a valid page of ~10 MB
        self.stream_chunk = FILLER.encode()
        self.mode: dict[str, str] = {}  # route -> "hostile" | "good"

    async def start(self) -> Hostile:
        app = web.Application()
        app.router.add_get("/good", self.good)
        app.router.add_get("/huge", self.huge_page)
        app.router.add_get("/huge-chunked", self.huge_chunked)
        app.router.add_get("/endless", self.endless)
        app.router.add_get("/many-series", self.many_series)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
        await self.runner.setup()
        for _ in range(5):  # one listening port per pod of the pool
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.ports = [a[1] for a in self.runner.addresses]
        self.port = self.ports[0]
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _good(self, route: str) -> bool:
        return self.mode.get(route) == "good"

    async def good(self, request: web.Request) -> web.Response:
        return web.Response(body=pages.vllm().encode(), content_type="text/plain")

    async def huge_page(self, request: web.Request) -> web.Response:
        if self._good("/huge"):
            return await self.good(request)
        self.sent.setdefault("/huge", []).append(len(self.huge))
        return web.Response(body=self.huge, content_type="text/plain")  # with Content-Length

    async def huge_chunked(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, "/huge-chunked", limit=len(self.huge) // len(self.stream_chunk))

    async def endless(self, request: web.Request) -> web.StreamResponse:
        # bounded only so that a broken client cannot keep the test alive: 100,000 chunks ~ 10 GB
        return await self._stream(request, "/endless", limit=100_000)

    async def _stream(self, request: web.Request, route: str, limit: int) -> web.StreamResponse:
        if self._good(route):
            return await self.good(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = self.sent.setdefault(route, [])
        sent.append(0)
        try:
            await resp.write(pages.vllm().encode())
            for _ in range(limit):
                await resp.write(self.stream_chunk)
                sent[-1] += len(self.stream_chunk)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the poller hung up: what it should do
        return resp

    async def many_series(self, request: web.Request) -> web.Response:
        # 20,000 series of one wanted name in its group (~0.9 MB, under the size cap)
        lines = "".join(f'vllm:num_requests_waiting{{engine="{i}"}} 1\n' for i in range(20_000))
        page = pages.vllm().replace("# TYPE vllm:num_requests_waiting gauge\n",
                                    "# TYPE vllm:num_requests_waiting gauge\n" + lines)
        return web.Response(body=page.encode(), content_type="text/plain")


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    h = await Hostile().start()
    yield h
    await h.close()


@pytest.fixture
async def scraper_for() -> AsyncIterator[Any]:
    made: list[Scraper] = []

    def make(ds: Any, **kw: Any) -> Scraper:
        kw.setdefault("interval", FAST)
        kw.setdefault("timeout", 2.0)
        s = Scraper(ds, max_page_bytes=CAP, **kw)
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        await s.stop()


def _pool(ports: list[int], routes: list[str]) -> tuple[Any, dict[str, str]]:
    """One endpoint per route, each on its own port of the server."""
    addrs = {route: f"127.0.0.1:{port}" for route, port in zip(routes, ports, strict=True)}
    return datastore(*addrs.values()), addrs


async def test_huge_and_endless_pages_are_cut_and_backed_off(hostile: Hostile, scraper_for: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="epp.metrics.scrape")
    routes = ["/good", "/huge", "/huge-chunked", "/endless", "/many-series"]
    ds, addrs = _pool(hostile.ports, routes)
    # one scraper for the pool, as in the picker; each pod's "engine" says which route it serves
    engines = {route: replace(ENGINES["vllm"], name=route, path=route) for route in routes}
    for route, addr in addrs.items():
        ds.endpoints[addr].engine = route
    rss_before = _rss()
    peak = [rss_before]
    s = scraper_for(ds, engines=engines, max_backoff=0.4)

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], _rss())
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    good_ep = ds.endpoints[addrs["/good"]]
    try:
        await until(lambda: s.polls_ok >= 60, timeout=20)
    finally:
        sampler.cancel()
    polls = {route: s.polls()[addrs[route]] for route in routes}
    ok = s.polls_ok  # read with the attempts: one good poll may be in flight (attempted, not yet ok)
    print(f"\npolls in the window: {polls}; RSS before {rss_before >> 20} MiB, peak {peak[0] >> 20} MiB")
    assert good_ep.scrape_ok and good_ep.metrics is not None
    for route in routes[1:]:
        ep = ds.endpoints[addrs[route]]
        assert not ep.scrape_ok and ep.metrics is None and is_stale(ep, 0.0), route
        # backed off: the good pod was polled every 20 ms, the bad ones at 40, 80, 160, 400, 400... ms
        assert polls[route] * 4 < polls["/good"], (route, polls)
    assert polls["/good"] - 1 <= ok <= polls["/good"]  # every good poll was the good pod's
    # the poller stopped reading at the cap: a stream's writer saw the connection go well before its end
    assert all(n < 64 * CAP for n in hostile.sent["/endless"]), hostile.sent["/endless"]
    assert "/huge" in hostile.sent
    assert peak[0] - rss_before < 200 << 20  # before the cap: +1.2 GB for the endless stream
    for route in routes[1:]:
        assert sum(1 for r in caplog.records if r.getMessage() == "metrics scrape failing"
                   and r.__dict__.get("endpoint") == addrs[route]) == 1, route
    assert messages(caplog, "metrics scrape failing") == 4


async def test_hostile_pod_recovers_when_it_behaves(hostile: Hostile, scraper_for: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="epp.metrics.scrape")
    ds = datastore(f"127.0.0.1:{hostile.port}")
    s = scraper_for(ds, path="/endless", max_backoff=0.2)
    await until(lambda: s.polls_failed >= 4)
    hostile.mode["/endless"] = "good"
    ep = next(iter(ds.endpoints.values()))
    await until(lambda: ep.scrape_ok and ep.metrics is not None)
    assert messages(caplog, "metrics scrape recovered") == 1
    failed = s.polls_failed
    before = s.polls()[ep.address]
    await until(lambda: s.polls()[ep.address] >= before + 10)
    assert s.polls_failed == failed  # back to the interval, no more failures


async def test_page_over_the_cap_by_content_length_is_not_read(hostile: Hostile, scraper_for: Any) -> None:
    ds = datastore(f"127.0.0.1:{hostile.port}")
    s = scraper_for(ds, path="/huge", max_backoff=0.1, name_filter=False)
    await until(lambda: s.polls_failed >= 3)
    assert next(iter(ds.endpoints.values())).metrics is None


async def test_default_cap_takes_a_real_page() -> None:
    s = Scraper(datastore("127.0.0.1:1"))
    assert s.max_page_bytes == 4 << 20 and s.max_backoff == 2.0
