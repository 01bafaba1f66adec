"""bench/peers.py GreedyOracle: the discrete-event reference that reads every engine's state."""

from __future__ import annotations

import random
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _oracle():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from peers import GreedyOracle
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return GreedyOracle


def _text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters) for _ in range(n))


def test_oracle_avoids_a_prefilling_server_and_follows_a_cached_prompt() -> None:
    from epp.sim.des import Cluster, SimRequest

    oracle = _oracle()()
    cluster = Cluster(2, oracle, seed=1)
    oracle.bind(cluster)
    a, b = _text(24000, 1), _text(24000, 2)
    stream = [(0.0, SimRequest("a", a, 8, "")), (0.001, SimRequest("b", b, 8, "")),
              (5.0, SimRequest("a2", a + " and more", 8, "")), (5.001, SimRequest("b2", b + " again", 8, ""))]
    results = {r.request_id: r for r in cluster.run(iter(stream))}
    assert all(r.ok for r in results.values())
    assert results["a"].server != results["b"].server  # b would wait behind a's 6,000-token prefill
    assert results["a2"].server == results["a"].server  # the cached prompt, once both pods are idle
    assert results["b2"].server == results["b"].server
    assert results["a2"].cached_tokens > 5000


def test_oracle_estimate_counts_the_prefill_ahead() -> None:
    from epp.sim.des import SimRequest
    from epp.sim.engine import Engine

    oracle = _oracle()()
    idle, busy = Engine(), Engine()
    busy.add(busy.new_seq("x", _text(40000, 3), 8, "", 0.0))
    req = SimRequest("r", _text(400, 4), 8, "")
    assert oracle.estimate(busy, req) > oracle.estimate(idle, req) + 0.4  # 10,000 tokens at 20k/s ahead
