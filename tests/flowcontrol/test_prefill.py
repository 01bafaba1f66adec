"""The prefill budget: accounting, the detector's answer, and first-token feedback in the simulator."""

from __future__ import annotations

import pytest

from epp.datastore import Endpoint
from epp.flowcontrol.controller import BandSettings, FlowSettings
from epp.flowcontrol.prefill import PrefillBudgetDetector, tokens_of
from epp.flowcontrol.sim import FlowControlPolicy
from epp.sim.des import Cluster, SimRequest
from epp.sim.policies import LeastRequest


def _eps(n: int) -> list[Endpoint]:
    return [Endpoint(address=f"10.0.0.{i}:8000", ip=f"10.0.0.{i}", port=8000, pod=f"p{i}") for i in range(n)]


def test_accounting_per_endpoint_and_release_is_idempotent():
    a, b = _eps(2)
    det = PrefillBudgetDetector(1000)
    det.dispatched("r1", a, 2000)  # ~500 tokens estimated from the body
    det.dispatched("r2", a, 0, tokens=600)  # the caller knows the work
    assert det.pending == {a.address: 1100}
    assert det.pool_saturation([a], 0.0) == pytest.approx(1.1) and det.pool_saturated([a], 0.0)
    assert not det.pool_saturated([a, b], 0.0)  # b has room
    assert det.released("r1") and not det.released("r1")
    assert det.pending == {a.address: 600} and not det.pool_saturated([a], 0.0)
    assert det.released("r2") and det.pending == {}
    assert det.pool_saturated([], 0.0)  # an empty pool has no room
    assert tokens_of(0) == 1 and tokens_of(9) == 3
    with pytest.raises(ValueError):
        PrefillBudgetDetector(0)


def _req(i: int, chars: int) -> SimRequest:
    return SimRequest(f"r{i}", f"{i} " + "y" * chars, 8)


def test_first_tokens_release_the_budget_and_everything_finishes():
    """Budget of one 1,000-token prompt per server: one prefill at a time per engine, the rest held
    in the picker and dispatched as first tokens come back (not only when requests finish)."""
    det = PrefillBudgetDetector(1000)
    pol = FlowControlPolicy(LeastRequest(), FlowSettings(), det)
    results = Cluster(2, pol, seed=1, poll_interval=0.05).run([(0.0, _req(i, 4000)) for i in range(12)])
    assert len(results) == 12 and all(r.ok for r in results)
    assert det.pending == {} and pol.outcomes == {"Dispatched": 12}
    starts = sorted(r.scheduled for r in results if r.scheduled is not None)
    firsts = sorted(r.first_token for r in results if r.first_token is not None)
    finishes = sorted(r.finished for r in results if r.finished is not None)
    assert starts[1] == 0.0 and starts[2] > 0.0  # one 1,001-token prompt per server at first
    assert starts[2] >= firsts[0]  # the third waited for a first token ...
    assert starts[2] < finishes[0]  # ... not for a request to finish


def test_shortest_prompt_first_behind_the_budget_serves_short_prompts_first():
    order: list[str] = []

    class Watch(LeastRequest):
        def choose(self, request, servers):
            order.append(request.request_id)
            return super().choose(request, servers)

    det = PrefillBudgetDetector(600)
    s = FlowSettings(default_band=BandSettings(ordering="shortest-prompt-first-ordering-policy"))
    pol = FlowControlPolicy(Watch(), s, det)
    work = [(0.0, _req(0, 4000))] + [(0.001, _req(i, 8000 if i % 2 else 400)) for i in range(1, 11)]
    results = Cluster(1, pol, seed=1, poll_interval=0.05).run(work)
    assert len(results) == 11 and all(r.ok for r in results)
    assert order[0] == "r0"
    assert sorted(order[1:6]) == sorted(f"r{i}" for i in range(2, 11, 2))  # every short before any long
    assert order[6:] == [f"r{i}" for i in range(1, 11, 2)]  # the long ones in arrival order
