"""The synchronous flow controller: bands, fairness, ordering, bounds, TTL, cancel, shutdown."""

from __future__ import annotations

import math

import pytest

from epp.datastore import Endpoint, Metrics
from epp.flowcontrol.controller import BandSettings, FlowController, FlowSettings
from epp.flowcontrol.types import (
    REASON_NO_ENDPOINTS,
    REASON_SATURATED,
    REASON_SHUTTING_DOWN,
    REASON_TTL_EXPIRED,
    FlowKey,
    Item,
    Outcome,
)
from epp.scheduling.saturation import ConcurrencyDetector, SaturationDetector


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _pool(n: int = 1) -> list[Endpoint]:
    return [Endpoint(address=f"10.0.0.{i}:8000", ip=f"10.0.0.{i}", port=8000, pod=f"p{i}") for i in range(n)]


class Harness:
    """A controller over endpoints with max_concurrency slots each; dispatch takes a slot."""

    def __init__(self, settings: FlowSettings | None = None, *, pods: int = 1, slots: int = 1) -> None:
        self.clock = Clock()
        self.pool = _pool(pods)
        self.order: list[str] = []
        self.fc = FlowController(settings or FlowSettings(), ConcurrencyDetector(max_concurrency=slots),
                                 lambda: self.pool, clock=self.clock)

    def bind(self, item: Item) -> Endpoint | None:
        if item.outcome is not Outcome.DISPATCHED:
            return None
        ep = min(self.pool, key=lambda e: e.inflight)
        ep.inflight += 1
        self.order.append(item.request_id)
        return ep

    def submit(self, rid: str, priority: int = 0, tenant: str = "default-flow", size: int = 10,
               ttl: float | None = None) -> Item:
        return self.fc.submit(FlowKey(priority, tenant), size, self.bind, request_id=rid, ttl=ttl)

    def free(self, n: int = 1) -> None:
        for _ in range(n):
            ep = max(self.pool, key=lambda e: e.inflight)
            ep.inflight -= 1
            self.fc.dispatch()


def test_dispatches_while_room_and_waits_when_full():
    h = Harness(slots=2)
    a, b, c = h.submit("a"), h.submit("b"), h.submit("c")
    assert a.outcome is b.outcome is Outcome.DISPATCHED
    assert c.outcome is None and h.fc.queued() == 1
    assert h.pool[0].inflight == 2
    h.free()
    assert c.outcome is Outcome.DISPATCHED and c.result is h.pool[0]
    assert h.fc.queued() == 0


def test_higher_band_first_whatever_the_arrival_order():
    h = Harness()
    h.submit("busy")
    low = [h.submit(f"low{i}", priority=-1) for i in range(3)]
    high = [h.submit(f"high{i}", priority=10) for i in range(3)]
    mid = h.submit("mid", priority=0)
    h.free(7)
    assert h.order == ["busy", "high0", "high1", "high2", "mid", "low0", "low1", "low2"]
    assert all(i.outcome is Outcome.DISPATCHED for i in (*low, *high, mid))


def test_round_robin_alternates_tenants_global_strict_keeps_arrival_order():
    rr = FlowSettings(default_band=BandSettings(fairness="round-robin-fairness-policy"))
    for settings, want in ((rr, ["n0", "q0", "n1", "q1", "n2", "n3"]),
                           (FlowSettings(), ["n0", "n1", "n2", "n3", "q0", "q1"])):
        h = Harness(settings)
        h.submit("busy")
        for i in range(4):
            h.clock.t += 0.001
            h.submit(f"n{i}", tenant="noisy")
        for i in range(2):
            h.clock.t += 0.001
            h.submit(f"q{i}", tenant="quiet")
        h.free(6)
        assert h.order[1:] == want


def test_edf_orders_by_deadline_fcfs_by_arrival():
    s = FlowSettings(default_band=BandSettings(ordering="edf-ordering-policy"))
    h = Harness(s)
    h.submit("busy")
    h.submit("late", ttl=30)
    h.clock.t += 1
    h.submit("soon", ttl=2)
    h.submit("none", ttl=math.inf)
    h.submit("mid", ttl=10)
    h.free(4)
    assert h.order[1:] == ["soon", "mid", "late", "none"]


def test_capacity_global_and_per_band():
    h = Harness(FlowSettings(max_requests=3, bands=(BandSettings(priority=5, max_requests=1),)))
    h.submit("busy")
    assert h.submit("p5a", priority=5).outcome is None
    over_band = h.submit("p5b", priority=5)
    assert over_band.outcome is Outcome.REJECTED_CAPACITY
    assert over_band.drop is not None and over_band.drop.status == 429 and over_band.drop.reason == REASON_SATURATED
    h.submit("x")
    h.submit("y")
    over_global = h.submit("z")
    assert over_global.outcome is Outcome.REJECTED_CAPACITY and h.fc.queued() == 3
    bytes_cap = Harness(FlowSettings(max_bytes=100))
    bytes_cap.submit("busy")
    assert bytes_cap.submit("a", size=60).outcome is None
    assert bytes_cap.submit("b", size=60).outcome is Outcome.REJECTED_CAPACITY
    assert bytes_cap.fc.bytes == 60


def test_ttl_expiry_429_and_503_when_the_pool_is_empty():
    h = Harness(FlowSettings(default_ttl=5))
    h.submit("busy")
    item = h.submit("waits")
    assert h.fc.next_deadline() == pytest.approx(105)
    h.clock.t += 4.9
    assert h.fc.expire() == 0
    h.clock.t += 0.2
    assert h.fc.expire() == 1
    assert item.outcome is Outcome.EVICTED_TTL and h.fc.queued() == 0 and h.fc.bytes == 0
    assert item.drop is not None and (item.drop.status, item.drop.reason) == (429, REASON_TTL_EXPIRED)
    h.pool.clear()
    empty = h.submit("nobody")
    assert empty.outcome is None  # no endpoints: it waits for some
    h.clock.t += 6
    h.fc.expire()
    assert empty.drop is not None and (empty.drop.status, empty.drop.reason) == (503, REASON_NO_ENDPOINTS)


def test_empty_pool_ttl_and_capacity_with_no_endpoints():
    h = Harness(FlowSettings(default_ttl=60, empty_pool_ttl=2, max_requests=1))
    h.pool.clear()
    first = h.submit("a")
    assert first.ttl == 2
    second = h.submit("b")
    assert second.outcome is Outcome.REJECTED_NO_ENDPOINTS and second.drop is not None
    assert second.drop.status == 503
    h.pool.extend(_pool(1))
    h.fc.dispatch()
    assert first.outcome is Outcome.DISPATCHED


def test_cancel_removes_at_once_and_frees_capacity():
    h = Harness(FlowSettings(max_requests=1))
    h.submit("busy")
    item = h.submit("a")
    assert h.submit("b").outcome is Outcome.REJECTED_CAPACITY
    assert h.fc.cancel(item)
    assert item.outcome is Outcome.EVICTED_CONTEXT_CANCELLED and h.fc.queued() == 0
    assert not h.fc.cancel(item)
    c = h.submit("c")
    assert c.outcome is None
    h.free()
    assert h.order == ["busy", "c"]


def test_shutdown_evicts_everything_500_and_refuses_new():
    h = Harness()
    h.submit("busy")
    items = [h.submit(f"r{i}", priority=i % 3, tenant=f"t{i % 2}") for i in range(6)]
    assert h.fc.shutdown() == 6
    assert all(i.outcome is Outcome.EVICTED_OTHER for i in items)
    assert items[0].drop is not None and (items[0].drop.status, items[0].drop.reason) == (500, REASON_SHUTTING_DOWN)
    late = h.submit("late")
    assert late.outcome is Outcome.REJECTED_OTHER and h.fc.queued() == 0


def test_utilization_detector_stale_metrics_block_unless_ignored():
    pool = _pool(2)
    clock = Clock()
    pool[0].metrics = Metrics(waiting=0, kv_usage=0.1, updated=clock.t)
    pool[1].metrics = Metrics(waiting=0, kv_usage=0.1, updated=clock.t - 10)  # stale
    det = SaturationDetector(queue_threshold=5, kv_threshold=0.8, stale_after=0.2)
    fc = FlowController(FlowSettings(), det, lambda: pool, clock=clock)
    ignore = FlowController(FlowSettings(staleness_policy="ignore"), det, lambda: pool, clock=clock)
    assert fc.has_room()  # one stale pod of two: mean (0.125 + 1) / 2 < 1
    assert fc.stale_count(clock.t) == 1
    pool[0].metrics = Metrics(waiting=6, kv_usage=0.1, updated=clock.t)
    assert not fc.has_room() and fc.last_saturation == pytest.approx(1.1)
    assert not ignore.has_room()  # the fresh pod alone is over its queue threshold
    pool[0].metrics = Metrics(waiting=0, kv_usage=0.1, updated=clock.t - 10)
    assert not fc.has_room()  # every pod stale: fail closed
    assert ignore.has_room()  # stalenessPolicy ignore: no fresh pod says "full"


def test_many_flows_cancel_storm_keeps_memory_bounded():
    h = Harness(FlowSettings(default_band=BandSettings(fairness="round-robin-fairness-policy")))
    h.submit("busy")
    items = [h.submit(f"r{i}", tenant=f"t{i % 50}") for i in range(5000)]
    for it in items[:4900]:
        h.fc.cancel(it)
    band = h.fc.bands[0]
    slots = sum(len(f.queue._q) for f in band.flows.values())  # type: ignore[attr-defined]
    assert h.fc.queued() == 100 and slots < 100 + 64 * 50 + 1
    h.free(100)
    assert sorted(h.order[1:]) == sorted(i.request_id for i in items[4900:])


@pytest.mark.parametrize("fairness", ["global-strict-fairness-policy", "round-robin-fairness-policy"])
def test_one_shot_tenants_are_forgotten(fairness):
    h = Harness(FlowSettings(default_band=BandSettings(fairness=fairness)), slots=1)
    h.submit("busy")
    for i in range(50):
        h.submit(f"a{i}", tenant="steady")  # a tenant with a backlog all along
    for i in range(20_000):
        h.submit(f"x{i}", tenant=f"one-shot-{i}")
        h.free()  # one dispatch per arrival: the backlog stays
    band = h.fc.bands[0]
    assert h.fc.queued() == 50
    # flows with requests, plus (round-robin) those emptied since their last turn: bounded by the queue
    bound = 2 * h.fc.queued() + 2
    assert len(band.flows) <= bound and len(band.ring) <= bound, (len(band.flows), len(band.ring))
