"""Simulator roles for P/D: the engine skips the prefill whose KV arrived by transfer, and the
discrete-event P/D cluster routes two legs per disaggregated request."""

from __future__ import annotations

from epp.sim.config import EngineConfig
from epp.sim.des import SimRequest
from epp.sim.engine import Engine
from epp.sim.pd import TransferCost, pd_cluster, prefill_response_params, remote_tokens, run_pd, summarize_pd

PROMPT = "x" * 4000  # 1000 tokens at 4 characters a token


def first_step(remote: int) -> tuple[float, int]:
    """(duration of the first step, tokens computed in it) for a fresh engine."""
    e = Engine(EngineConfig())
    seq = e.new_seq("r", PROMPT, 4, "", 0.0)
    seq.remote_tokens = remote
    e.add(seq)
    d = e.begin_step(0.0)
    assert d is not None
    e.end_step(d)
    return d, seq.num_computed


def test_transferred_blocks_skip_the_prefill():
    local, computed = first_step(0)
    remote, computed_r = first_step(992)  # 62 full blocks arrive by transfer
    assert computed == computed_r == 1000  # both sequences have their whole prompt's KV
    assert remote < local / 5  # only the last partial block (8 tokens) was computed
    # bounded by the prompt, and the blocks land in the prefix cache like computed ones
    assert remote_tokens(prefill_response_params("p", 1000, 16, "h", 1), 16, 1000) == 992
    assert remote_tokens({"do_remote_prefill": True, "remote_block_ids": list(range(10_000))}, 16, 1000) == 1000
    assert remote_tokens({"do_remote_prefill": "yes"}, 16, 1000) == 0


def test_des_pd_legs_and_transfer_cost():
    def choose(req, eps):
        return (1, 0) if len(req.prompt) > 100 else (1, None)

    results = {}
    for cost in (TransferCost(0.0, 0.0), TransferCost(base_ms=50.0, ms_per_token=0.0)):
        cluster, policy = pd_cluster(["prefill", "decode"], choose, transfer=cost, poll_interval=None)
        wl = [(0.0, SimRequest("long", PROMPT, max_tokens=10)), (0.0, SimRequest("short", "hi", max_tokens=10))]
        out = {r.request_id: r for r in run_pd(cluster, policy, wl)}
        assert out["long"].disaggregated and (out["long"].prefill_server, out["long"].decode_server) == (0, 1)
        assert not out["short"].disaggregated and out["short"].prefill_server == -1
        assert out["long"].transfer_tokens == 992 and out["long"].output_tokens == 10
        assert cluster.servers[0].engine.stats.generation_tokens == 1  # the prefill leg's one token
        results[cost.base_ms] = out["long"].ttft
    assert abs(results[50.0] - results[0.0] - 0.05) < 0.02  # the transfer is on the TTFT path
    s = summarize_pd(list(out.values()))
    assert s["requests"] == 2 and s["errors"] == 0 and s["disaggregated"] == 0.5 and s["tpot_p50"] > 0


def test_des_prefill_pod_holds_the_blocks_until_the_transfer_ends():
    def choose(req, eps):
        return 1, 0

    cluster, policy = pd_cluster(["prefill", "decode"], choose, transfer=TransferCost(base_ms=500.0, ms_per_token=0),
                                 poll_interval=None)
    seen: list[tuple[float, int]] = []
    for t in (0.3, 0.45, 0.9):  # prefill ends ~0.06 s in; the 500 ms transfer runs until ~0.56 s
        cluster.call_at(t, lambda t=t: seen.append((t, cluster.servers[0].engine.kv.used_count)))
    run_pd(cluster, policy, [(0.0, SimRequest("long", PROMPT, max_tokens=4))])
    assert [used for _, used in seen] == [62, 62, 0]  # 62 full prompt blocks pinned, then freed
