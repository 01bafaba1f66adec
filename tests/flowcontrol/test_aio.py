"""The asyncio driver: a coroutine awaits while queued; wake-ups, cancel, TTL, shutdown, memory."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest

from epp.datastore import Endpoint
from epp.flowcontrol.aio import AsyncFlowControl
from epp.flowcontrol.controller import FlowController, FlowSettings
from epp.flowcontrol.types import REASON_SHUTTING_DOWN, REASON_TTL_EXPIRED, Drop, FlowKey, Outcome
from epp.scheduling.saturation import ConcurrencyDetector


def _setup(settings: FlowSettings | None = None, slots: int = 1, recheck: float = 0.05):
    pool = [Endpoint(address="10.0.0.1:8000", ip="10.0.0.1", port=8000, pod="p")]
    fc = FlowController(settings or FlowSettings(), ConcurrencyDetector(max_concurrency=slots), lambda: pool)
    return pool, AsyncFlowControl(fc, recheck_interval=recheck)


def _binder(pool: list[Endpoint]):
    def bind() -> Endpoint:
        pool[0].inflight += 1
        return pool[0]
    return bind


async def test_waits_while_full_and_goes_when_a_slot_frees():
    pool, afc = _setup()
    first = await afc.admit(FlowKey(0), _binder(pool))
    assert first is pool[0]
    waiter = asyncio.ensure_future(afc.admit(FlowKey(0), _binder(pool)))
    await asyncio.sleep(0.01)
    assert not waiter.done() and afc.controller.live == 1
    pool[0].inflight -= 1
    afc.notify()
    assert await asyncio.wait_for(waiter, 1) is pool[0]


async def test_recheck_finds_room_without_a_notify():
    pool, afc = _setup(recheck=0.01)
    await afc.admit(FlowKey(0), _binder(pool))
    waiter = asyncio.ensure_future(afc.admit(FlowKey(0), _binder(pool)))
    await asyncio.sleep(0.005)
    pool[0].inflight = 0  # e.g. a scrape showed room: nobody calls notify
    assert await asyncio.wait_for(waiter, 1) is pool[0]


async def test_cancel_removes_at_once():
    pool, afc = _setup()
    await afc.admit(FlowKey(0), _binder(pool))
    waiter = asyncio.ensure_future(afc.admit(FlowKey(0, "t"), _binder(pool)))
    await asyncio.sleep(0)
    assert afc.controller.queued(0, "t") == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert afc.controller.live == 0 and afc.controller.bytes == 0
    assert afc.controller.outcomes[Outcome.EVICTED_CONTEXT_CANCELLED] == 1


async def test_dispatched_then_cancelled_before_resuming_is_unbound():
    pool, afc = _setup()
    await afc.admit(FlowKey(0), _binder(pool))
    released: list[Endpoint] = []
    waiter = asyncio.ensure_future(afc.admit(FlowKey(0), _binder(pool), unbind=released.append))
    await asyncio.sleep(0)
    pool[0].inflight -= 1
    afc.controller.dispatch()  # binds now; the waiter has not resumed yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert released == [pool[0]]


async def test_ttl_expiry_answers_429_with_the_reason():
    pool, afc = _setup(FlowSettings(default_ttl=0.05), recheck=10)
    await afc.admit(FlowKey(0), _binder(pool))
    out = await asyncio.wait_for(afc.admit(FlowKey(0), _binder(pool)), 2)
    assert isinstance(out, Drop) and (out.status, out.reason) == (429, REASON_TTL_EXPIRED)
    assert afc.controller.live == 0


async def test_shutdown_answers_every_waiter_500():
    pool, afc = _setup()
    await afc.admit(FlowKey(0), _binder(pool))
    waiters = [asyncio.ensure_future(afc.admit(FlowKey(i % 3, f"t{i}"), _binder(pool))) for i in range(30)]
    await asyncio.sleep(0)
    assert afc.close() == 30
    outs = await asyncio.gather(*waiters)
    assert all(isinstance(o, Drop) and o.status == 500 and o.reason == REASON_SHUTTING_DOWN for o in outs)


async def test_ten_thousand_waiters_cost_memory_only():
    pool, afc = _setup(recheck=0.05)
    await afc.admit(FlowKey(0), _binder(pool))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    # a band holds 5,000 by default: spread over 3 bands and 10 tenants
    waiters = [asyncio.ensure_future(afc.admit(FlowKey(i % 3, f"t{i % 10}"), _binder(pool))) for i in range(10_000)]
    await asyncio.sleep(0.2)  # a few re-checks pass: nothing is done per waiter per tick
    during = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert afc.controller.live == 10_000
    per = (during - before) / 10_000
    print(f"\n10,000 queued waiters: {per:.0f} bytes each (tasks, futures, items)")
    assert per < 8_000
    pool[0].inflight = -10_000  # room for all
    afc.notify()
    outs = await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert all(o is pool[0] for o in outs)


async def test_a_failing_binding_reaches_the_waiter_and_never_hangs():
    pool, afc = _setup()
    await afc.admit(FlowKey(0), _binder(pool))

    def broken() -> Endpoint:
        raise RuntimeError("scheduler bug")

    waiter = asyncio.ensure_future(afc.admit(FlowKey(0), broken))
    await asyncio.sleep(0)
    pool[0].inflight = 0
    afc.notify()
    with pytest.raises(RuntimeError, match="scheduler bug"):
        await asyncio.wait_for(waiter, 2)
    assert afc.controller.live == 0
