"""The poller against real HTTP servers on 127.0.0.1 (aiohttp, raw sockets, prometheus_client's own)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from epp.datastore import Datastore, Endpoint
from epp.metrics import age, is_stale
from epp.metrics.engines import ENGINES
from epp.metrics.scrape import CALM_AFTER, Scraper, only_requested
from tests.metrics import pages
from tests.procs import free_port

FAST = 0.02  # poll interval for tests (seconds)


class Counter:
    """Requests in flight across servers, and the most seen at once."""

    def __init__(self) -> None:
        self.now = 0
        self.max = 0

    def enter(self) -> None:
        self.now += 1
        self.max = max(self.max, self.now)

    def exit(self) -> None:
        self.now -= 1


def filter_page(text: str, names: list[str]) -> str:
    """What a prometheus_client server sends for `?name[]=...`: only those families' lines."""
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            name = parts[2] if len(parts) > 2 else ""
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            keep.append(line)
    return "\n".join(keep) + "\n"


class FakeServer:
    """An aiohttp model server whose /metrics behaviour a test switches at will."""

    def __init__(self, page: str, counter: Counter | None = None, path: str = "/metrics") -> None:
        self.page = page
        self.path = path
        self.mode = "ok"  # ok | status | hang | delay
        self.status = 500
        self.delay = 0.0
        self.filter = "ignore"  # ignore | honour | reject | empty
        self.queries: list[str] = []
        self.peers: set[Any] = set()
        self.arrived = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.counter = counter or Counter()
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        app = web.Application()
        app.router.add_get(self.path, self.handle)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(request.query_string)
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        self.counter.enter()
        try:
            if self.mode == "hang":
                self.arrived.set()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
            if self.mode == "delay":
                await asyncio.sleep(self.delay)
            if self.mode == "status":
                return web.Response(status=self.status, text="server error")
            names = request.query.getall("name[]", [])
            if names and self.filter == "reject":
                return web.Response(status=400, text="unknown parameter")
            if names and self.filter == "empty":
                return web.Response(text="", content_type="text/plain")
            body = filter_page(self.page, names) if names and self.filter == "honour" else self.page
            return web.Response(body=body.encode(), content_type="text/plain")
        finally:
            self.counter.exit()


class RawServer:
    """A TCP server that answers every connection with fixed bytes, then closes."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> RawServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(self.reply)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[FakeServer]]]:
    made: list[FakeServer] = []

    async def make(page: str | None = None, **kw: Any) -> FakeServer:
        s = await FakeServer(page if page is not None else pages.vllm(), **kw).start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


@pytest.fixture
async def raw_servers() -> AsyncIterator[Callable[[bytes], Awaitable[RawServer]]]:
    made: list[RawServer] = []

    async def make(reply: bytes) -> RawServer:
        s = await RawServer(reply).start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


@pytest.fixture
async def scrapers() -> AsyncIterator[Callable[..., Scraper]]:
    made: list[Scraper] = []

    def make(ds: Datastore, **kw: Any) -> Scraper:
        kw.setdefault("interval", FAST)
        kw.setdefault("timeout", 0.5)
        s = Scraper(ds, **kw)
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        await s.stop()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def datastore(*addresses: str) -> Datastore:
    ds = Datastore("pool")
    ds.set_static_endpoints(addresses)
    return ds


def messages(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.name == "epp.metrics.scrape" and r.getMessage() == text)


# ---- engines over HTTP ----------------------------------------------------------------------


async def test_scrapes_every_engine(servers: Any, scrapers: Any) -> None:
    # each engine's page where that engine serves it: trtllm-serve on /prometheus/metrics, Triton
    # on its own metrics port (8002 in real life; the test's port stands in for it)
    srv = {name: await servers(make(), path=ENGINES[name].path) for name, make in pages.PAGES.items()}
    triton = srv["triton-tensorrt-llm"]
    ds = datastore(*(s.address if n != "triton-tensorrt-llm" else "127.0.0.1:1" for n, s in srv.items()))
    for name, s in srv.items():
        if name != "triton-tensorrt-llm":
            ds.endpoints[s.address].engine = name
    ds.endpoints["127.0.0.1:1"].engine = "triton"
    ds.endpoints[srv["trtllm-serve"].address].engine = "trtllm"  # an alias
    engines = dict(ENGINES, **{"triton-tensorrt-llm": replace(ENGINES["triton-tensorrt-llm"], port=triton.port)})
    srv["triton-tensorrt-llm"] = triton
    scrapers(ds, engines=engines)
    addr = {n: s.address if n != "triton-tensorrt-llm" else "127.0.0.1:1" for n, s in srv.items()}
    eps = [ds.endpoints[a] for a in addr.values()]
    await until(lambda: all(e.metrics is not None for e in eps))
    got = {name: ds.endpoints[a].metrics for name, a in addr.items()}
    assert got["vllm"] is not None and (got["vllm"].waiting, got["vllm"].kv_usage) == (2, 0.25)
    assert got["vllm"].lora_running == frozenset({"sql-lora", "food-review"})
    assert got["sglang"] is not None and (got["sglang"].waiting, got["sglang"].block_size) == (3, 64)
    assert got["trtllm-serve"] is not None and got["trtllm-serve"].kv_usage == 0.75
    assert got["triton-tensorrt-llm"] is not None and got["triton-tensorrt-llm"].running == 8
    assert all(e.scrape_ok for e in eps)
    assert all(age(e, time.monotonic()) < 5 for e in eps)


async def test_old_vllm_kv_name_over_http(servers: Any, scrapers: Any) -> None:
    s = await servers(pages.vllm(kv=0.9, old_kv_name=True))
    ds = datastore(s.address)
    scrapers(ds)
    ep = ds.endpoints[s.address]
    await until(lambda: ep.metrics is not None)
    assert ep.metrics is not None and ep.metrics.kv_usage == 0.9


async def test_values_follow_the_server(servers: Any, scrapers: Any) -> None:
    s = await servers(pages.vllm(waiting=1))
    ds = datastore(s.address)
    scrapers(ds)
    ep = ds.endpoints[s.address]
    await until(lambda: ep.metrics is not None and ep.metrics.waiting == 1)
    s.page = pages.vllm(waiting=9)
    await until(lambda: ep.metrics is not None and ep.metrics.waiting == 9)


async def test_an_unchanged_page_is_read_once_and_stamped_every_poll(
        servers: Any, scrapers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from epp.metrics import scrape

    reads: list[str] = []
    real = scrape.read_metrics

    def counting(spec: Any, page: Any, now: float) -> Any:
        reads.append(page)
        return real(spec, page, now)

    monkeypatch.setattr(scrape, "read_metrics", counting)
    s = await servers(pages.vllm(waiting=1))
    ds = datastore(s.address)
    scraper = scrapers(ds)
    ep = ds.endpoints[s.address]
    await until(lambda: scraper.polls_ok >= 5)
    assert ep.metrics is not None and ep.metrics.waiting == 1
    assert len(reads) == 1  # five polls of the same bytes, one parse
    stamp = ep.metrics.updated
    await until(lambda: ep.metrics is not None and ep.metrics.updated > stamp)  # a reused reading is fresh
    s.page = pages.vllm(waiting=7)
    await until(lambda: ep.metrics is not None and ep.metrics.waiting == 7)
    assert len(reads) == 2
    s.page = pages.vllm(waiting=1)  # back to the first page: not the last one, so read again
    await until(lambda: ep.metrics is not None and ep.metrics.waiting == 1)
    assert len(reads) == 3


# ---- failures ---------------------------------------------------------------------------------


async def test_http_500_fails_logs_once_and_recovers(
    servers: Any, scrapers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="epp.metrics.scrape")
    s = await servers()
    s.mode = "status"
    ds = datastore(s.address)
    scraper = scrapers(ds)
    ep = ds.endpoints[s.address]
    await until(lambda: scraper.polls_failed >= 5)
    assert ep.scrape_ok is False and ep.metrics is None
    assert messages(caplog, "metrics scrape failing") == 1
    s.mode = "ok"
    await until(lambda: ep.scrape_ok and ep.metrics is not None)
    ok_before = scraper.polls_ok
    await until(lambda: scraper.polls_ok >= ok_before + 3)
    assert messages(caplog, "metrics scrape recovered") == 1
    assert messages(caplog, "metrics scrape failing") == 1
    s.mode = "status"
    await until(lambda: not ep.scrape_ok)
    assert messages(caplog, "metrics scrape failing") == 2


async def test_timeout_keeps_old_metrics_which_go_stale(servers: Any, scrapers: Any) -> None:
    s = await servers()
    ds = datastore(s.address)
    scraper = scrapers(ds, timeout=0.1)
    ep = ds.endpoints[s.address]
    await until(lambda: ep.metrics is not None)
    s.mode = "hang"  # the server stops answering
    await until(lambda: not ep.scrape_ok)
    kept = ep.metrics
    assert kept is not None
    failed = scraper.polls_failed
    await until(lambda: scraper.polls_failed >= failed + 2)
    assert ep.metrics is kept  # never replaced by a failed poll
    now = time.monotonic()
    assert age(ep, now) > 0.2
    assert is_stale(ep, now, threshold=0.2)
    assert not is_stale(ep, now, threshold=1000)
    s.mode = "ok"
    await until(lambda: ep.scrape_ok and ep.metrics is not kept)
    assert not is_stale(ep, time.monotonic(), threshold=10)


async def test_connection_refused(scrapers: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="epp.metrics.scrape")
    ds = datastore(f"127.0.0.1:{free_port()}")
    scraper = scrapers(ds)
    await until(lambda: scraper.polls_failed >= 3)
    ep = next(iter(ds.endpoints.values()))
    assert not ep.scrape_ok and ep.metrics is None
    assert messages(caplog, "metrics scrape failing") == 1


async def test_garbage_body_is_a_failure(servers: Any, scrapers: Any) -> None:
    s = await servers("<html><body>Welcome to nginx!</body></html>\n")
    ds = datastore(s.address)
    scraper = scrapers(ds)
    await until(lambda: scraper.polls_failed >= 2)
    assert ds.endpoints[s.address].metrics is None


@pytest.mark.parametrize(
    "reply",
    [
        b"this is not HTTP at all\r\n\r\n",
        b"\x00\x01\x02\xff" * 50,
        b"",  # closes without a byte
    ],
)
async def test_garbage_protocol_is_a_failure(reply: bytes, raw_servers: Any, scrapers: Any) -> None:
    s = await raw_servers(reply)
    ds = datastore(s.address)
    scraper = scrapers(ds)
    await until(lambda: scraper.polls_failed >= 2)
    assert ds.endpoints[s.address].metrics is None and not ds.endpoints[s.address].scrape_ok


async def test_body_cut_short_by_the_connection_is_a_failure(raw_servers: Any, scrapers: Any) -> None:
    body = pages.vllm().encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    s = await raw_servers(head + body[: len(body) // 2])  # promised the whole page, sent half
    ds = datastore(s.address)
    scraper = scrapers(ds)
    await until(lambda: scraper.polls_failed >= 2)
    assert ds.endpoints[s.address].metrics is None


async def test_page_that_stops_mid_line(servers: Any, scrapers: Any) -> None:
    full = pages.vllm(kv=0.25)
    cut_in_kv = full[: full.index("vllm:kv_cache_usage_perc{") + 30]  # stops inside the KV line
    s = await servers(cut_in_kv)
    ds = datastore(s.address)
    scraper = scrapers(ds)
    ep = ds.endpoints[s.address]
    await until(lambda: scraper.polls_failed >= 2)
    assert ep.metrics is None  # the half KV line was not read as a value
    # cut inside the LoRA line: the complete lines before it are enough
    s.page = full[: full.index("vllm:lora_requests_info{") + 20]
    await until(lambda: ep.metrics is not None)
    assert ep.metrics is not None and ep.metrics.kv_usage == 0.25 and ep.metrics.lora_running == frozenset()


# ---- endpoints joining and leaving -----------------------------------------------------------


async def test_endpoint_removed_while_poll_in_flight(servers: Any, scrapers: Any) -> None:
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        s = await servers()
        s.mode = "hang"
        keep = await servers(pages.vllm(waiting=4))
        ds = datastore(s.address, keep.address)
        scraper = scrapers(ds, timeout=5.0)
        ep = ds.endpoints[s.address]
        await asyncio.wait_for(s.arrived.wait(), 5)  # a poll is in flight
        ds.set_static_endpoints([keep.address])  # the endpoint leaves
        assert s.address not in scraper.polling
        await asyncio.wait_for(s.cancelled.wait(), 5)  # the request was abandoned
        assert ep.metrics is None and ep.scrape_ok  # nothing was written to it
        kept = ds.endpoints[keep.address]
        await until(lambda: kept.metrics is not None)  # the other endpoint is unaffected
        await asyncio.sleep(0.05)
        gc.collect()  # a task destroyed while pending, or an unretrieved error, would report now
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_endpoints_join_and_leave(servers: Any, scrapers: Any) -> None:
    a, b = await servers(pages.vllm(waiting=1)), await servers(pages.vllm(waiting=2))
    ds = datastore(a.address)
    scraper = scrapers(ds)
    await until(lambda: ds.endpoints[a.address].metrics is not None)
    ds.set_static_endpoints([a.address, b.address])
    await until(lambda: b.address in ds.endpoints and ds.endpoints[b.address].metrics is not None)
    ds.set_static_endpoints([b.address])
    assert scraper.polling == {b.address}
    polled = len(a.queries)
    await asyncio.sleep(FAST * 5)
    assert len(a.queries) <= polled + 1  # at most one poll was already past the cancel point
    # the same address coming back is a new endpoint with a new poll task
    ds.set_static_endpoints([a.address, b.address])
    await until(lambda: ds.endpoints[a.address].metrics is not None)


async def test_stop_ends_every_task(servers: Any) -> None:
    s = await servers()
    ds = datastore(s.address)
    scraper = Scraper(ds, interval=FAST)
    scraper.start()
    await until(lambda: ds.endpoints[s.address].metrics is not None)
    before = {t for t in asyncio.all_tasks() if t.get_name().startswith("scrape ")}
    assert before
    await scraper.stop()
    assert all(t.done() for t in before)
    assert scraper.polling == frozenset()
    ds.set_static_endpoints([s.address, f"127.0.0.1:{free_port()}"])  # after stop: nothing starts
    assert scraper.polling == frozenset()
    count = len(s.queries)
    await asyncio.sleep(FAST * 3)
    assert len(s.queries) == count


# ---- the ?name[]= filter ---------------------------------------------------------------------


async def test_name_filter_used_when_honoured(servers: Any, scrapers: Any) -> None:
    s = await servers()
    s.filter = "honour"
    ds = datastore(s.address)
    scraper = scrapers(ds)
    ep = ds.endpoints[s.address]
    await until(lambda: scraper.polls_ok >= 5)
    assert all("name[]=vllm:num_requests_waiting" in q for q in s.queries)
    assert ep.metrics is not None and ep.metrics.waiting == 2 and ep.metrics.block_size == 16
    assert ep.metrics.lora_max == 4


async def test_name_filter_fallback_when_ignored(servers: Any, scrapers: Any) -> None:
    s = await servers()
    s.filter = "ignore"
    ds = datastore(s.address)
    scraper = scrapers(ds)
    await until(lambda: scraper.polls_ok >= 5)
    filtered = [q for q in s.queries if "name" in q]
    assert len(filtered) == 1  # probed once, then the plain URL
    assert s.queries[-1] == ""
    assert ds.endpoints[s.address].metrics is not None


async def test_name_filter_fallback_when_rejected(servers: Any, scrapers: Any) -> None:
    s = await servers()
    s.filter = "reject"
    ds = datastore(s.address)
    scraper = scrapers(ds)
    await until(lambda: scraper.polls_ok >= 3)
    assert len([q for q in s.queries if "name" in q]) == 1
    assert scraper.polls_failed == 0


async def test_name_filter_fallback_when_filtered_page_lacks_the_families(servers: Any, scrapers: Any) -> None:
    s = await servers()
    s.filter = "honour"
    ds = datastore(s.address)
    ds.endpoints[s.address].engine = "sglang"  # requests sglang names; the vLLM page has none
    scraper = scrapers(ds)
    await until(lambda: scraper.polls_failed >= 3)
    assert any(q == "" for q in s.queries)  # the plain URL was tried too


async def test_filter_honoured_then_replies_lack_the_families(servers: Any, scrapers: Any) -> None:
    s = await servers(pages.vllm(waiting=1))
    s.filter = "honour"
    ds = datastore(s.address)
    scraper = scrapers(ds)
    ep = ds.endpoints[s.address]
    await until(lambda: scraper.polls_ok >= 3)
    s.filter = "empty"  # e.g. a new server version filtering differently
    s.page = pages.vllm(waiting=7)
    await until(lambda: ep.metrics is not None and ep.metrics.waiting == 7)
    ok = scraper.polls_ok
    await until(lambda: scraper.polls_ok >= ok + 3)
    assert scraper.polls_failed == 0  # every poll still produced a snapshot
    assert scraper._targets[s.address].use_filter is False  # settled on the plain URL
    assert s.queries[-1] == ""


async def test_name_filter_disabled(servers: Any, scrapers: Any) -> None:
    s = await servers()
    s.filter = "honour"
    ds = datastore(s.address)
    scraper = scrapers(ds, name_filter=False)
    await until(lambda: scraper.polls_ok >= 3)
    assert set(s.queries) == {""}


async def test_real_prometheus_client_server_honours_the_filter(scrapers: Any) -> None:
    registry = CollectorRegistry()
    labels = ["engine", "model_name"]
    Gauge("vllm:num_requests_waiting", "w", labels, registry=registry).labels("0", "m").set(3)
    Gauge("vllm:num_requests_running", "r", labels, registry=registry).labels("0", "m").set(4)
    Gauge("vllm:kv_cache_usage_perc", "kv", labels, registry=registry).labels("0", "m").set(0.5)
    Gauge("vllm:other", "x", labels, registry=registry).labels("0", "m").set(1)
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        ds = datastore(f"127.0.0.1:{httpd.server_port}")
        scraper = scrapers(ds)
        await until(lambda: scraper.polls_ok >= 3)
        ep = next(iter(ds.endpoints.values()))
        assert ep.metrics is not None and (ep.metrics.waiting, ep.metrics.running, ep.metrics.kv_usage) == (3, 4, 0.5)
        target = scraper._targets[ep.address]
        assert target.use_filter is True
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_only_requested() -> None:
    names = frozenset({"a", "b"})
    assert only_requested("# HELP a x\n# TYPE a gauge\na 1\nb{x=\"1\"} 2\n\n", names)
    assert not only_requested("a 1\nc 2\n", names)
    assert only_requested("", names)


# ---- connection reuse, concurrency, addressing -----------------------------------------------


async def test_connections_are_reused(servers: Any, scrapers: Any) -> None:
    s = await servers()
    ds = datastore(s.address)
    scraper = scrapers(ds)
    await until(lambda: scraper.polls_ok >= 10)
    assert len(s.peers) == 1  # one keep-alive connection carried every poll


async def test_concurrency_bound_respected(servers: Any, scrapers: Any) -> None:
    counter = Counter()
    srvs = [await servers(counter=counter) for _ in range(8)]
    for s in srvs:
        s.mode, s.delay = "delay", 0.05
    ds = datastore(*(s.address for s in srvs))
    scraper = scrapers(ds, max_concurrency=3, interval=0.01)
    await until(lambda: scraper.polls_ok >= 40, timeout=10)
    assert counter.max <= 3
    assert counter.max >= 2  # the bound, not the load, was the limit
    assert all(ep.metrics is not None for ep in ds.endpoints.values())


async def test_port_path_scheme_override(servers: Any, scrapers: Any) -> None:
    s = await servers(path="/custom/metrics")
    ds = datastore("127.0.0.1:1")  # the serving port; metrics live on another one
    scrapers(ds, port=s.port, path="/custom/metrics", scheme="http")
    ep = ds.endpoints["127.0.0.1:1"]
    await until(lambda: ep.metrics is not None)


async def test_engine_change_in_place_is_followed(servers: Any, scrapers: Any) -> None:
    s = await servers(pages.vllm(waiting=2))
    ds = datastore(s.address)
    scrapers(ds)
    ep = ds.endpoints[s.address]
    await until(lambda: ep.metrics is not None and ep.metrics.waiting == 2)
    s.page = pages.sglang(waiting=5)
    ep.engine = "sglang"  # what upsert_pod does when the engine label changes
    await until(lambda: ep.metrics is not None and ep.metrics.waiting == 5)


async def test_config_overrides_reach_the_scraper(servers: Any, scrapers: Any) -> None:
    from epp.metrics.engines import apply_overrides

    s = await servers(pages.vllm(waiting=6).replace("vllm:num_requests_waiting", "my:queue"))
    ds = datastore(s.address)
    scrapers(ds, engines=apply_overrides({"vllm": {"waiting": "my:queue"}}))
    ep = ds.endpoints[s.address]
    await until(lambda: ep.metrics is not None)
    assert ep.metrics is not None and ep.metrics.waiting == 6
    assert ENGINES["vllm"].waiting[0].name == "vllm:num_requests_waiting"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Scraper(Datastore("p"), interval=0)
    with pytest.raises(ValueError):
        Scraper(Datastore("p"), max_concurrency=0)


def test_staleness_helpers() -> None:
    from epp.datastore import Metrics

    ep = Endpoint(address="10.0.0.1:8000", ip="10.0.0.1", port=8000, pod="p")
    assert age(ep, 100.0) == float("inf") and is_stale(ep, 100.0)
    ep.metrics = Metrics(updated=99.9)
    assert age(ep, 100.0) == pytest.approx(0.1)
    assert not is_stale(ep, 100.0) and is_stale(ep, 100.0, threshold=0.05)
    assert is_stale(ep, 100.3)


# ---- where the page lives: https, per-engine defaults, the reference's flags --------------------


@pytest.fixture
async def https_server(tmp_path: Any) -> AsyncIterator[Any]:
    """A vLLM page over TLS with a self-signed certificate, as model servers often have."""
    import ssl

    from epp import tls

    pair = tls.self_signed(["localhost"])
    (tmp_path / "c.pem").write_bytes(pair.cert)
    (tmp_path / "k.pem").write_bytes(pair.key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    app = web.Application()

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=pages.vllm(waiting=7).encode(), content_type="text/plain")

    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def test_https_insecure_by_default_as_the_reference(https_server: int, scrapers: Any) -> None:
    from epp.metrics.engines import apply_flag_overrides

    ds = datastore(f"127.0.0.1:{https_server}")
    scrapers(ds, engines=apply_flag_overrides(ENGINES, scheme="https"))
    ep = next(iter(ds.endpoints.values()))
    await until(lambda: ep.metrics is not None)
    assert ep.metrics is not None and ep.metrics.waiting == 7


async def test_https_verification_on_rejects_a_self_signed_server(https_server: int, scrapers: Any) -> None:
    from epp.metrics.engines import apply_flag_overrides

    ds = datastore(f"127.0.0.1:{https_server}")
    scraper = scrapers(ds, engines=apply_flag_overrides(ENGINES, scheme="https", insecure_skip_verify=False))
    await until(lambda: scraper.polls_failed >= 2)
    assert next(iter(ds.endpoints.values())).metrics is None


async def test_flag_path_and_port_reach_every_engine(servers: Any, scrapers: Any) -> None:
    from epp.metrics.engines import apply_flag_overrides

    s = await servers(pages.triton(waiting=3), path="/custom")
    ds = datastore("127.0.0.1:1")
    ds.endpoints["127.0.0.1:1"].engine = "triton-tensorrt-llm"  # its default port 8002 is overridden
    scrapers(ds, engines=apply_flag_overrides(ENGINES, path="/custom", port=s.port))
    ep = ds.endpoints["127.0.0.1:1"]
    await until(lambda: ep.metrics is not None)
    assert ep.metrics is not None and ep.metrics.waiting == 3


# ---- light on the engines: the poll rate follows traffic and change (idle_interval) ----------
IDLE = 0.2


async def test_a_steady_idle_page_is_polled_ever_slower(servers: Any, scrapers: Any) -> None:
    calm_srv, plain_srv = await servers(), await servers()
    ds_calm, ds_plain = datastore(calm_srv.address), datastore(plain_srv.address)
    calm = scrapers(ds_calm, idle_interval=IDLE)
    plain = scrapers(ds_plain)
    target = calm._targets[calm_srv.address]
    await until(lambda: target.gap == IDLE)  # doubled up to the cap while nothing changes
    p0, q0 = calm.polls()[calm_srv.address], plain.polls()[plain_srv.address]
    await until(lambda: plain.polls()[plain_srv.address] - q0 >= 40)  # ~0.8 s at the base rate
    assert calm.polls()[calm_srv.address] - p0 <= 10  # the same window: at most ~1 in 4 of the polls
    assert ds_calm.endpoints[calm_srv.address].metrics is not None


async def test_traffic_or_a_change_brings_the_base_rate_back(servers: Any, scrapers: Any) -> None:
    srv = await servers()
    ds = datastore(srv.address)
    s = scrapers(ds, idle_interval=IDLE)
    ep = ds.endpoints[srv.address]
    target = s._targets[srv.address]
    await until(lambda: target.gap == IDLE)
    ep.inflight = 1  # a request routed there: polled again at once, and at the base rate while it lasts
    n = s.polls()[srv.address]
    await until(lambda: s.polls()[srv.address] >= n + 2 * CALM_AFTER)
    assert target.gap <= FAST * 1.1
    ep.inflight = 0
    await until(lambda: target.gap == IDLE)
    srv.page = pages.vllm(waiting=42)  # the page changed: seen within one idle gap, then the base rate
    await until(lambda: ep.metrics is not None and ep.metrics.waiting == 42)
    assert target.calm < CALM_AFTER
    n = s.polls()[srv.address]
    await until(lambda: s.polls()[srv.address] >= n + 1)
    assert target.gap <= FAST * 1.1


async def test_a_steady_idle_page_is_vouched_for_past_the_staleness_threshold(servers: Any, scrapers: Any) -> None:
    # staleness 80 ms, idle polls every 300 ms: the page is older than the threshold most of the
    # time, yet never read as stale, because the scraper vouches for it until its next poll is due
    from epp.scheduling.cycle import fresh_metrics

    # (a 50 ms base interval: the vouch's margin for a poll's own time is two of them)
    stale_after = 0.08
    srv = await servers()
    ds = datastore(srv.address)
    s = scrapers(ds, interval=0.05, idle_interval=0.3, quiet_interval=0.3, max_age=stale_after)
    assert s.idle_interval == 0.3  # not capped by the staleness threshold
    assert s.quiet_interval is None  # a busy pod's slower rate still is: half of 80 ms is under the interval
    ep = ds.endpoints[srv.address]
    target = s._targets[srv.address]
    await until(lambda: target.gap == 0.3)
    n0 = s.polls()[srv.address]
    old_pages = 0
    t_end = time.monotonic() + 0.9
    while time.monotonic() < t_end:
        now = time.monotonic()
        m = ep.metrics
        assert m is not None and fresh_metrics(ep, now, stale_after) is m, "a steady idle page read as stale"
        assert not is_stale(ep, now, stale_after)
        old_pages += now - m.updated > stale_after
        await asyncio.sleep(0.01)
    assert old_pages > 20  # the vouch, not a fresh poll, kept it in
    assert s.polls()[srv.address] - n0 <= 6  # ~3 polls in 0.9 s, not 18 at the base rate
    # a request routed there: polled within an interval, and that page is no longer vouched for
    before = ep.metrics
    ep.inflight = 1
    await until(lambda: ep.metrics is not before, timeout=1.0)
    assert ep.metrics is not None and ep.metrics.steady_until == 0.0
    # a failing poll is never vouched for: stale at once
    ep.inflight = 0
    await until(lambda: ep.metrics is not None and ep.metrics.steady_until > 0.0)
    srv.mode = "status"
    await until(lambda: not ep.scrape_ok, timeout=2.0)
    assert fresh_metrics(ep, time.monotonic(), stale_after) is None


def test_the_vouch_ends_at_steady_until() -> None:
    from epp.datastore import Metrics
    from epp.scheduling.cycle import Cycle, fresh_metrics
    from epp.scheduling.framework import SchedulingRequest

    ep = Endpoint(address="10.0.0.1:8000", ip="10.0.0.1", port=8000, pod="p")
    ep.metrics = Metrics(updated=100.0, steady_until=100.6)
    assert fresh_metrics(ep, 100.5, 0.2) is ep.metrics and not is_stale(ep, 100.5, 0.2)
    assert fresh_metrics(ep, 100.7, 0.2) is None and is_stale(ep, 100.7, 0.2)
    req = SchedulingRequest(request_id="r", model="m", client_model="m", prompt="p")
    assert Cycle(req, 100.5, 0.2).fresh([ep]) == [ep.metrics]
    assert Cycle(req, 100.7, 0.2).fresh([ep]) == [None]


async def test_a_busy_endpoint_is_polled_per_change_of_its_traffic(servers: Any, scrapers: Any) -> None:
    # quiet_interval: requests in flight, but none routed there or ended there since the last poll:
    # the rate falls to one poll per quiet_interval; a dispatch or a completion brings it back at once
    quiet_srv, plain_srv = await servers(), await servers()
    ds_quiet, ds_plain = datastore(quiet_srv.address), datastore(plain_srv.address)
    ep = ds_quiet.endpoints[quiet_srv.address]
    ep.inflight, ep.inflight_tokens = 2, 300
    ds_plain.endpoints[plain_srv.address].inflight = 2
    quiet = scrapers(ds_quiet, quiet_interval=IDLE)
    plain = scrapers(ds_plain, quiet_interval=None)
    target = quiet._targets[quiet_srv.address]
    await until(lambda: target.gap == IDLE)
    p0, q0 = quiet.polls()[quiet_srv.address], plain.polls()[plain_srv.address]
    await until(lambda: plain.polls()[plain_srv.address] - q0 >= 40)  # ~0.8 s at the base rate
    assert quiet.polls()[quiet_srv.address] - p0 <= 10
    # a request routed there (count and tokens move): the next poll comes within a base interval
    srv_page_before = ep.metrics
    quiet_srv.page = pages.vllm(waiting=7)
    ep.inflight, ep.inflight_tokens = 3, 450
    await until(lambda: ep.metrics is not srv_page_before and ep.metrics is not None and ep.metrics.waiting == 7)
    assert target.gap <= IDLE / 2  # woken, not waited out: the gap starts over from the base rate
    # the endpoint idle (nothing in flight): the idle rule, not this one, decides
    ep.inflight, ep.inflight_tokens = 0, 0
    n = quiet.polls()[quiet_srv.address]
    await until(lambda: quiet.polls()[quiet_srv.address] >= n + 3)
    assert target.gap <= FAST * 1.1  # idle_interval is off here: the base rate


async def test_off_by_default(servers: Any, scrapers: Any) -> None:
    srv = await servers()
    s = scrapers(datastore(srv.address))
    await until(lambda: s.polls()[srv.address] >= 4 * CALM_AFTER)
    assert s._targets[srv.address].gap <= FAST * 1.1


# ---- fewer loop wake-ups: polls share a wake grid ----------------------------------------------
def test_wake_grid() -> None:
    s = Scraper(datastore(), interval=0.05)
    assert s.align == 0.05  # the interval by default
    assert s._wake_at(1.012, 1.0) == pytest.approx(1.0 + 0.05)  # never a point already past: the next
    assert s._wake_at(1.07, 1.0) == pytest.approx(1.05)  # the nearest point
    assert s._wake_at(1.08, 1.0) == pytest.approx(1.1)
    assert s._wake_at(0.9, 1.0) == 1.0  # overdue: now
    off = Scraper(datastore(), interval=0.05, align=0)
    assert off._wake_at(1.013, 1.0) == 1.013
    assert Scraper(datastore(), interval=0.05, align=1.0).align == 0.05  # never coarser than the interval


async def test_polls_of_several_endpoints_share_wakes(servers: Any, scrapers: Any) -> None:
    """Jittered schedules, but the polls due about together start in one loop pass: the starts of
    the endpoints' polls in each grid slot lie together; the rate per endpoint is unchanged."""
    srvs = [await servers() for _ in range(4)]
    starts: list[float] = []
    s = scrapers(datastore(*(x.address for x in srvs)), interval=0.04)
    inner = s.poll_once
    loop = asyncio.get_running_loop()

    async def timed(target: Any) -> None:
        starts.append(loop.time())
        await inner(target)

    s.poll_once = timed  # type: ignore[method-assign]
    await until(lambda: len(starts) >= 60)
    slots: dict[int, list[float]] = {}
    for t in starts[8:]:  # past the first polls (spread over one interval, before the grid)
        slots.setdefault(round(t / 0.04), []).append(t)
    spreads = sorted(max(v) - min(v) for v in slots.values())
    assert spreads[len(spreads) // 2] < 0.01  # together, not spread over the 40 ms slot
    assert len(starts[8:]) / len(slots) > 2  # several endpoints per wake


# ---- a quiet serving loop: ScrapeThread -------------------------------------------------------
async def test_scrape_thread_polls_off_the_serving_loop(servers: Any) -> None:
    from epp.metrics.scrape import ScrapeThread

    a, b = await servers(pages.vllm(waiting=3)), await servers(pages.vllm(waiting=5))
    ds = datastore(a.address)
    st = ScrapeThread(ds, interval=FAST, timeout=0.5)
    st.start()
    try:
        assert st.thread is not None and st.thread.is_alive() and st.thread is not threading.current_thread()
        ep = ds.endpoints[a.address]
        await until(lambda: ep.metrics is not None and ep.metrics.waiting == 3)
        # the serving loop blocked: polls go on in the thread (the servers answer from their own
        # loop in this test, so count attempts, not answers)
        n = st.polls()[a.address]
        time.sleep(0.3)
        assert st.polls()[a.address] > n
        ds.set_static_endpoints([a.address, b.address])  # changes reach the thread's scraper
        await until(lambda: b.address in st.polling)
        await until(lambda: ds.endpoints[b.address].metrics is not None)
        ds.set_static_endpoints([b.address])
        await until(lambda: st.polling == frozenset({b.address}))
    finally:
        await st.stop()
    assert st.thread is None and not [t for t in threading.enumerate() if t.name == "scraper"]
