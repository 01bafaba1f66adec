"""--enable-pprof: the debug routes on a running picker's metrics port, over real HTTP."""

from __future__ import annotations

import asyncio
import tracemalloc

from tests.extproc_client import body_chunks, chat, exchange, request_headers
from tests.test_metrics_http import get


async def test_index_and_task_dump(start_picker):
    app, _ = await start_picker(endpoints=["127.0.0.1:9"])
    status, body, _ = await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/")
    assert status == 200 and b"/debug/pprof/profile" in body
    status, body, _ = await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/goroutine")
    text = body.decode()
    assert status == 200 and "asyncio tasks" in text
    assert "task readiness" in text and "task pool-gauges" in text  # the App's named tasks, with stacks
    assert "--- thread metrics-http" in text
    assert (await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/nope"))[0] == 404


async def test_heap_starts_tracemalloc_on_demand_and_stops(start_picker):
    app, ch = await start_picker(endpoints=["127.0.0.1:9"])
    assert not tracemalloc.is_tracing()
    try:
        status, body, _ = await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/heap")
        assert status == 200 and b"tracemalloc started" in body and tracemalloc.is_tracing()
        for _ in range(20):
            await exchange(ch, [request_headers(), *body_chunks(chat())])
        status, body, _ = await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/heap?top=5")
        lines = body.decode().splitlines()
        assert status == 200 and lines[0].startswith("traced:") and len(lines) == 6
        assert all("KiB" in line for line in lines[1:])
    finally:
        status, body, _ = await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/heap?stop=1")
    assert b"tracemalloc stopped" in body and not tracemalloc.is_tracing()


async def test_cpu_profile_of_the_event_loop(start_picker):
    app, ch = await start_picker(endpoints=["127.0.0.1:9"])
    profile = asyncio.create_task(asyncio.to_thread(get, app.metrics_port, "/debug/pprof/profile?seconds=1"))
    await asyncio.sleep(0.2)
    # a second profile while one runs is refused
    status, body, _ = await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/profile?seconds=0.1")
    assert status == 409
    for _ in range(200):  # bounded: keep the loop busy with decisions while it is profiled
        await exchange(ch, [request_headers(), *body_chunks(chat())])
        if profile.done():
            break
    status, body, _ = await profile
    text = body.decode()
    assert status == 200 and "cProfile of the event-loop thread for 1 s" in text
    assert "director.py" in text and "decide" in text  # the picker's own code was on the loop
    assert "Ordered by: cumulative time" in text


async def test_cpu_profile_by_own_time_and_a_bad_sort(start_picker):
    app, ch = await start_picker(endpoints=["127.0.0.1:9"])
    status, body, _ = await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/profile?seconds=0.2&sort=tottime")
    assert status == 200 and "Ordered by: internal time" in body.decode()
    status, body, _ = await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/profile?seconds=0.2&sort=name")
    assert status == 400 and b"sort must be one of cumulative, tottime, calls" in body


async def test_routes_are_off_without_enable_pprof(start_picker):
    app, _ = await start_picker(endpoints=["127.0.0.1:9"], enable_pprof=False)
    assert (await asyncio.to_thread(get, app.metrics_port, "/debug/pprof/"))[0] == 404
    assert (await asyncio.to_thread(get, app.metrics_port, "/metrics"))[0] == 200
