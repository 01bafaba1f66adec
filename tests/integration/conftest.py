"""Fixtures shared by the integration tests: `servers`, model-server /metrics pages on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web


class MetricServers:
    """N aiohttp servers on loopback whose /metrics pages the test sets."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        self.runners: list[web.AppRunner] = []

    async def add(self, page: str, host: str = "127.0.0.1") -> str:
        """Serve `page` (changeable later through `pages[addr]`) on `host`, port from the OS; its address."""
        app = web.Application()
        runner = web.AppRunner(app)
        holder: dict[str, str] = {}

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=self.pages[holder["addr"]], content_type="text/plain")

        app.router.add_get("/metrics", metrics)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        port = runner.addresses[0][1]
        addr = f"{host}:{port}"
        holder["addr"] = addr
        self.pages[addr] = page
        self.runners.append(runner)
        return addr

    async def close(self) -> None:
        for r in self.runners:
            await r.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[MetricServers]:
    s = MetricServers()
    yield s
    await s.close()
