"""`--ha-peers` in the discrete-event benchmark (bench/routing_policies.PickerPolicy peer_delay): each
replica counts the others' requests and learns their prefix placements, as epp.peers does live."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_replicas_with_peers_count_and_learn_what_the_others_route() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from routing_policies import PickerPolicy
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from epp.scheduling.config import load_config
    from epp.scheduling.prefix import PrefixCacheScorer
    from epp.sim.des import Cluster
    from epp.sim.workload import shared_prefix

    def run(peer_delay: float | None) -> tuple[PickerPolicy, list[tuple[int, ...]]]:
        pol = PickerPolicy(load_config(None), replicas=2, seed=3, peer_delay=peer_delay)
        views: list[tuple[int, ...]] = []

        class Spy:  # each replica's total in-flight view, against the cluster's, before every choice
            def choose(self, request, servers):  # type: ignore[no-untyped-def]
                if pol._replicas:
                    views.append((*(sum(e.inflight for e in r.endpoints) for r in pol._replicas),
                                  sum(e.inflight for e in servers)))
                return pol.choose(request, servers)

            def on_complete(self, result):  # type: ignore[no-untyped-def]
                pol.on_complete(result)

        cluster = Cluster(3, Spy(), seed=3)
        pol.bind(cluster)
        results = cluster.run(shared_prefix(200, 150.0, groups=4, seed=5))
        assert len(results) == 200 and all(r.ok for r in results)
        return pol, views

    blind, blind_views = run(None)
    told, told_views = run(0.001)
    # without peers a replica sees about half the pool's requests; with them, nearly all of them
    assert sum(v[0] for v in blind_views) < 0.7 * sum(v[2] for v in blind_views)
    assert sum(v[0] for v in told_views) > 0.9 * sum(v[2] for v in told_views)
    # and every replica's approximate index learned the placements the other made
    def entries(pol: PickerPolicy) -> list[int]:
        return [next(ws.scorer for ws in r.scheduler.scorers if isinstance(ws.scorer, PrefixCacheScorer)).index.entries
                for r in pol._replicas]
    assert min(entries(told)) > max(entries(blind))
    assert all(e.inflight == 0 for r in told._replicas for e in r.endpoints)  # finishes reached everyone
