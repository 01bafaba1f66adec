"""Flow control in the discrete-event simulator: held requests, late binding, TTL, fairness."""

from __future__ import annotations

from epp.flowcontrol.controller import BandSettings, FlowSettings
from epp.flowcontrol.sim import FlowControlPolicy
from epp.scheduling.saturation import ConcurrencyDetector
from epp.sim.des import Cluster, SimRequest
from epp.sim.policies import LeastRequest, RoundRobin


def _burst(n: int, at: float = 0.0, tenant: str = "", priority: int = 0, tokens: int = 32):
    return [(at, SimRequest(f"{tenant or 'r'}-{priority}-{i}", "x" * 400, tokens, data={"tenant": tenant},
                            priority=priority)) for i in range(n)]


def _cluster(policy, servers: int = 2) -> Cluster:
    return Cluster(servers, policy, seed=3, poll_interval=0.05)


def test_holds_beyond_the_concurrency_limit_and_finishes_everything():
    seen: list[int] = []

    class Watch(LeastRequest):
        def choose(self, request, servers):
            seen.append(sum(e.inflight for e in servers))
            return super().choose(request, servers)

    pol = FlowControlPolicy(Watch(), FlowSettings(), ConcurrencyDetector(max_concurrency=2))
    c = _cluster(pol)
    results = c.run(_burst(20))
    assert len(results) == 20 and all(r.ok for r in results)
    assert max(seen) <= 3  # a dispatch happens only while fewer than 2 × 2 are in flight
    assert pol.outcomes == {"Dispatched": 20}
    waited = sorted(r.queue_time for r in results)
    assert waited[-1] > waited[0]  # later requests waited in the picker (counted from their arrival)


def test_ttl_expiry_refuses_429_and_counts():
    pol = FlowControlPolicy(RoundRobin(), FlowSettings(default_ttl=0.5), ConcurrencyDetector(max_concurrency=1))
    results = _cluster(pol, servers=1).run(_burst(6, tokens=256))
    refused = [r for r in results if not r.ok]
    assert len(results) == 6 and refused
    assert all(r.status == 429 and "rejected-ttl-expired" in r.error and r.server == -1 for r in refused)
    assert pol.outcomes["EvictedTTL"] == len(refused)


def test_capacity_refuses_at_arrival():
    pol = FlowControlPolicy(RoundRobin(), FlowSettings(max_requests=3), ConcurrencyDetector(max_concurrency=1))
    results = _cluster(pol, servers=1).run(_burst(8))
    assert sum(1 for r in results if r.status == 429 and "rejected-saturated" in r.error) == 4
    assert sum(1 for r in results if r.ok) == 4


def test_round_robin_fairness_protects_the_quiet_tenant():
    def run(fairness: str) -> float:
        s = FlowSettings(default_band=BandSettings(fairness=fairness))
        pol = FlowControlPolicy(LeastRequest(), s, ConcurrencyDetector(max_concurrency=2))
        work = sorted(_burst(60, tenant="noisy") + _burst(6, at=0.001, tenant="quiet"), key=lambda x: x[0])
        results = _cluster(pol).run(work)
        quiet = [r.queue_time for r in results if r.request is not None and r.request.data["tenant"] == "quiet"]
        return max(quiet)

    assert run("round-robin-fairness-policy") * 3 < run("global-strict-fairness-policy")


def test_higher_priority_dispatched_first():
    pol = FlowControlPolicy(RoundRobin(), FlowSettings(), ConcurrencyDetector(max_concurrency=1))
    work = sorted(_burst(10, priority=-1) + _burst(5, at=0.001, priority=5), key=lambda x: x[0])
    results = _cluster(pol, servers=1).run(work)
    started = sorted(results, key=lambda r: r.scheduled or 0.0)
    order = [r.request.priority for r in started if r.request is not None]
    assert order[1:6] == [5] * 5  # the first low one was already running; then every high one
