"""The discrete-event cluster: determinism, conservation, prefix hits, what policies see."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from epp.datastore import Endpoint
from epp.scheduling.framework import LeastInflightScheduler
from epp.sim import (
    Cluster,
    EngineConfig,
    LeastRequest,
    RandomChoice,
    RequestResult,
    RoundRobin,
    SchedulerPolicy,
    SimRequest,
    summarize,
)
from epp.sim.workload import poisson, shared_prefix


def fingerprint(results: Sequence[RequestResult]) -> list[tuple[object, ...]]:
    return [(r.request_id, r.server, r.arrival, r.scheduled, r.first_token, r.finished, r.cached_tokens,
             r.preemptions) for r in results]


def test_deterministic_with_seed() -> None:
    def run(seed: int) -> list[tuple[object, ...]]:
        cluster = Cluster(3, RandomChoice(seed), seed=seed)
        return fingerprint(cluster.run(shared_prefix(300, 80.0, groups=4, seed=seed)))

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_every_request_completes_exactly_once() -> None:
    cfg = EngineConfig(num_gpu_blocks=400, max_num_seqs=16, max_model_len=2048)  # tight: forces preemption
    cluster = Cluster(2, LeastRequest(1), engine=cfg, seed=3)
    cluster.submit(SimRequest("too-long", "x" * 20000, 8), at=0.5)  # refused by the server (400)
    cluster.submit(SimRequest("late", "y" * 100, 8), at=30.0)
    results = cluster.run(poisson(400, 200.0, prompt_chars=2000, max_tokens=100, seed=5), until=1.0)
    assert cluster.now == 1.0 and len(results) < 402
    results = cluster.run()  # continue to the end
    ids = [r.request_id for r in results]
    assert len(ids) == len(set(ids)) == cluster.submitted == 402
    bad = [r for r in results if not r.ok]
    assert [(r.request_id, r.status) for r in bad] == [("too-long", 400)]
    good = [r for r in results if r.ok]
    assert all(r.output_tokens == (8 if r.request_id == "late" else 100) for r in good)
    assert all(r.arrival <= r.scheduled <= r.first_token <= r.finished for r in good)  # type: ignore[operator]
    assert sum(r.preemptions for r in good) > 0
    assert all(s.endpoint.inflight == 0 and not s.engine.has_work for s in cluster.servers)
    assert all(s.engine.kv.usage == 0.0 for s in cluster.servers)


def test_prefix_hits_follow_the_workload() -> None:
    shared = summarize(Cluster(2, RoundRobin()).run(shared_prefix(200, 50.0, groups=2, seed=1)))
    unrelated = summarize(Cluster(2, RoundRobin()).run(poisson(200, 50.0, seed=1)))
    assert shared["prefix_hit_ratio"] > 0.8
    assert unrelated["prefix_hit_ratio"] < 0.05
    assert shared["ttft_mean"] < unrelated["ttft_mean"] * 1.5  # cached prefixes skip most prefill
    assert shared["requests"] == 200 and sum(shared["per_server"].values()) == 200


def test_policy_sees_polled_metrics() -> None:
    seen: list[tuple[float, float, float]] = []
    clock: list[Cluster] = []

    def choose(request: SimRequest, servers: Sequence[Endpoint]) -> int:
        m = servers[0].metrics
        assert m is not None
        seen.append((clock[0].now, m.updated, m.waiting + m.running))
        return 0

    cluster = Cluster(1, choose, poll_interval=0.05, poll_delay=0.01,
                      engine=EngineConfig(max_num_seqs=4), seed=2)
    clock.append(cluster)
    cluster.run(poisson(300, 400.0, prompt_chars=400, max_tokens=50, seed=2))
    assert all(0 <= now - updated <= 0.05 + 0.01 + 1e-9 for now, updated, _ in seen[10:])
    assert any(load > 0 for *_, load in seen)  # the load was visible, if late
    assert cluster.endpoints[0].metrics is not None and cluster.endpoints[0].metrics.block_size == 16

    fresh: list[float] = []

    def choose_fresh(request: SimRequest, servers: Sequence[Endpoint]) -> int:
        assert servers[0].metrics is not None
        fresh.append(servers[0].metrics.updated)
        return 0

    c2 = Cluster(1, choose_fresh, poll_interval=None)
    res = c2.run(poisson(20, 100.0, seed=1))
    assert fresh == sorted(r.arrival for r in res)  # a fresh snapshot at every decision


def test_lora_view_and_scheduler_policy() -> None:
    cfg = EngineConfig(loras=("a", "b", "c"), max_loras=2)
    inner = SchedulerPolicy(LeastInflightScheduler(rng=random.Random(1)))
    lora_seen: set[str] = set()

    class Spy:
        def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int:
            for e in servers:
                assert e.metrics is not None and e.metrics.lora_max == 2
                lora_seen.update(e.metrics.lora_running)
            return inner.choose(request, servers)

        def on_complete(self, result: RequestResult) -> None:
            inner.on_complete(result)

    cluster = Cluster(3, Spy(), engine=cfg, poll_interval=None, seed=4)
    results = cluster.run(shared_prefix(300, 300.0, models=("a", "b", "c", ""), seed=9))
    assert len(results) == 300 and all(r.ok for r in results)
    assert lora_seen == {"a", "b", "c"}
    assert not inner._routed  # on_complete released every routed request
    counts = summarize(results)["per_server"]
    assert max(counts.values()) - min(counts.values()) < 60  # least-inflight spreads the load


def test_bad_policy_and_arguments() -> None:
    with pytest.raises(ValueError):
        Cluster(1, lambda r, s: 5).run([(0.0, SimRequest("r", "x"))])
    with pytest.raises(ValueError):
        Cluster(0)
    c = Cluster(1)
    c.run([(1.0, SimRequest("r", "x"))])
    with pytest.raises(ValueError):
        c.submit(SimRequest("old", "x"), at=0.5)
