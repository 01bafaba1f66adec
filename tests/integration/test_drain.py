"""SIGTERM drain of a real `python -m epp` process under load (issue 13.11): readiness goes
NOT_SERVING at once while ext_proc keeps answering new streams, on open and on new connections,
for --drain-timeout; then open streams finish and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.extproc_client import body_chunks, chat, exchange, request_headers, set_headers
from tests.integration.test_process import picker_proc  # noqa: F401 (fixture)
from tests.procs import wait_serving

DEST = "x-gateway-destination-endpoint"
WORKERS = 6
AFTER_SIGNAL = 60  # requests each worker sends after SIGTERM (bounded loop)


async def one_request(ch: grpc.aio.Channel) -> bool:
    """A full request phase; True when it was routed."""
    try:
        replies = await exchange(ch, [request_headers(), *body_chunks(chat())])
    except grpc.aio.AioRpcError:
        return False
    return any(set_headers(r).get(DEST) == "127.0.0.1:9" for r in replies)


async def readiness(hport: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hport}") as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="inference-extension"),
                                                       timeout=5)
        return int(r.status)


async def test_no_request_fails_during_the_drain_window(picker_proc):  # noqa: F811
    # a long drain window: the bounded load below ends well inside it, then a second signal ends it
    p, port, hport = picker_proc("--pool-name", "p", "--endpoints", "127.0.0.1:9", "--secure-serving=false",
                                 "--drain-timeout", "60s", "--shutdown-grace", "5s")
    await wait_serving(hport)
    signalled = asyncio.Event()
    results: list[tuple[bool, bool]] = []  # (sent after SIGTERM, routed)

    async def worker(i: int) -> None:
        fresh_connections = i % 2 == 1  # half the workers open a new connection for every request
        shared = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            after = 0
            for _ in range(5000):  # bounded
                if signalled.is_set():
                    after += 1
                    if after > AFTER_SIGNAL:
                        return
                if fresh_connections:
                    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                        ok = await one_request(ch)
                else:
                    ok = await one_request(shared)
                results.append((signalled.is_set(), ok))
        finally:
            await shared.close()

    tasks = [asyncio.create_task(worker(i)) for i in range(WORKERS)]
    for _ in range(500):  # let some load build up before the signal
        if len(results) >= 50:
            break
        await asyncio.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    signalled.set()
    states = []
    for _ in range(100):
        states.append(await readiness(hport))
        if states[-1] == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)

    assert states[-1] == health_pb2.HealthCheckResponse.NOT_SERVING  # readiness dropped during the window
    after = [ok for sent_after, ok in results if sent_after]
    assert len(after) >= WORKERS * AFTER_SIGNAL - WORKERS  # the load really ran inside the window
    failed = [r for r in results if not r[1]]
    assert not failed, f"{len(failed)} of {len(results)} requests failed ({len(after)} sent while draining)"
    assert p.poll() is None  # still draining

    p.send_signal(signal.SIGTERM)  # a second signal ends the drain window early
    assert p.wait(timeout=30) == 0
    err = p.stderr.read() if p.stderr else ""
    assert "shutting down: draining" in err and "no new streams" in err and "picker stopped" in err


async def test_after_the_drain_window_new_streams_are_refused_and_the_process_exits(picker_proc):  # noqa: F811
    p, port, hport = picker_proc("--pool-name", "p", "--endpoints", "127.0.0.1:9", "--secure-serving=false",
                                 "--drain-timeout", "1s", "--shutdown-grace", "2s")
    await wait_serving(hport)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert await one_request(ch)
        p.send_signal(signal.SIGTERM)
        assert await one_request(ch)  # inside the window
        # bounded: once the window is over the server refuses new streams, then the process ends
        refused = False
        for _ in range(400):
            if not await one_request(ch):
                refused = True
                break
            await asyncio.sleep(0.05)
        assert refused
    assert p.wait(timeout=30) == 0


def test_drain_flag_in_help():
    out = subprocess.run([sys.executable, "-m", "epp", "--help"], capture_output=True, text=True, timeout=60)
    assert "--drain-timeout" in out.stdout and "NOT_SERVING" in out.stdout
