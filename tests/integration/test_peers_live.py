"""Two real picker processes in active-active mode with `--ha-peers`: requests held in flight on one
replica steer the other's choices (it counts them as its own would), over real ZMQ on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from tests.extproc_client import body_chunks, chat, request_headers, set_headers
from tests.integration.test_scheduling_live import vllm_page
from tests.procs import free_ports, wait_serving

DEST = "x-gateway-destination-endpoint"


@pytest.fixture
async def two_pages() -> AsyncIterator[list[str]]:
    """Two idle model servers' /metrics pages on two loopback IPs (the subset hint names hosts); their addresses."""
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=vllm_page(), content_type="text/plain")

    runners = []
    for host in ("127.0.0.1", "127.0.0.2"):
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        r = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await r.setup()
        await web.TCPSite(r, host, 0).start()
        runners.append(r)
    try:
        yield [f"{h}:{r.addresses[0][1]}" for h, r in zip(("127.0.0.1", "127.0.0.2"), runners, strict=True)]
    finally:
        for r in runners:
            await r.cleanup()


def start(eps: list[str], key: str, peer_port: int, peer_of: int,
          peers: bool) -> tuple[subprocess.Popen[bytes], int, int]:
    port, hport = free_ports(2)
    argv = [sys.executable, "-m", "epp", "--pool-name", "p", "--endpoints", ",".join(eps),
            "--grpc-port", str(port), "--grpc-health-port", str(hport), "--metrics-port", "0",
            "--bind-address", "127.0.0.1", "--secure-serving=false", "--ha-mode", "active-active",
            "--session-key-file", key, "--drain-timeout", "0s", "--shutdown-grace", "1s"]
    if peers:
        argv += ["--ha-peers", f"127.0.0.1:{peer_of}", "--ha-peer-port", str(peer_port)]
    return subprocess.Popen(argv, stderr=subprocess.DEVNULL), port, hport


async def open_request(stub: Any, content: str, subset: str | None = None) -> tuple[Any, str]:
    """A routed request whose stream stays open (in flight); the call and where it went."""
    call = stub.Process()
    await call.write(request_headers(subset=subset))
    for m in body_chunks(chat("m", content)):
        await call.write(m)
    reply = await call.read()
    while DEST not in set_headers(reply):
        reply = await call.read()
    return call, set_headers(reply)[DEST]


@pytest.mark.parametrize("peers", [True, False])
async def test_requests_in_flight_on_one_replica_steer_the_other(two_pages: list[str], tmp_path: Any,
                                                                  peers: bool) -> None:
    x, y = two_pages
    key = tmp_path / "key"
    key.write_text("a-shared-session-key-of-32-bytes!\n")
    pa, pb = free_ports(2)
    a, a_port, a_h = start(two_pages, str(key), pa, pb, peers)
    b, b_port, b_h = start(two_pages, str(key), pb, pa, peers)
    try:
        await wait_serving(a_h)
        await wait_serving(b_h)
        await asyncio.sleep(1.0)  # pages scraped, peers subscribed
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a_port}") as ca, \
                grpc.aio.insecure_channel(f"127.0.0.1:{b_port}") as cb:
            sa, sb = ep_grpc.ExternalProcessorStub(ca), ep_grpc.ExternalProcessorStub(cb)
            held = [await open_request(sa, f"held {i}", subset=x) for i in range(8)]  # 8 in flight on x, via a
            assert {d for _, d in held} == {x}
            await asyncio.sleep(0.3)
            went = []
            for i in range(6):  # b's own: each held open too, so b's choices see its earlier ones
                call, d = await open_request(sb, f"question {i}")
                went.append(d)
                held.append((call, d))
            for call, _ in held:
                call.cancel()
        if peers:
            assert went.count(x) <= 1, went  # b counted a's 8 on x: it sends its own to y
        else:
            assert went.count(x) >= 2, went  # blind to a's: b spreads over both
    finally:
        for p in (a, b):
            p.terminate()
        for p in (a, b):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
