"""`rendezvousOnMiss` (ours): a prefix no endpoint holds goes to the same home from every replica
(no shared state), and a prefix someone holds is scored by the index alone."""

from __future__ import annotations

from epp.datastore import Endpoint, Metrics
from epp.producers.precise_prefix import PrecisePrefixCacheProducer, parse_params
from epp.scheduling.registry import Params
from tests.producers.test_precise_producer import PROMPT, ctx, eps, feed_prompt, req

ON = {"tokenizer": {"backend": "sim"}, "rendezvousOnMiss": True}


def replica(params: dict[str, object]) -> PrecisePrefixCacheProducer:
    return PrecisePrefixCacheProducer("pp", parse_params(Params(params, "")), ctx())


def test_replicas_agree_on_a_cold_prefix_home() -> None:
    e = eps(8)
    a, b = replica(ON), replica(ON)
    homes = set()
    for i in range(20):
        prompt = f"tenant {i:03d} " + PROMPT
        got_a, got_b = a.ratios(req(prompt, f"a{i}"), e), b.ratios(req(prompt, f"b{i}"), e)
        assert got_a == got_b and sorted(got_a) == [0.0] * 7 + [1.0]
        homes.add(got_a.index(1.0))
    assert len(homes) > 2  # different prefixes, different homes
    # off (llm-d's behaviour): a cold prefix scores nothing anywhere
    assert replica({"tokenizer": {"backend": "sim"}}).ratios(req(), e) == [0.0] * 8


def test_a_held_prefix_gets_no_home_credit_and_a_loaded_home_is_skipped() -> None:
    e = eps(4)
    p = replica(ON)
    feed_prompt(p, e[2].address, blocks=2)
    assert p.ratios(req(), e) == [0.0, 0.0, 0.25, 0.0]
    cold = "another tenant " + PROMPT
    home = replica(ON).ratios(req(cold), e).index(1.0)
    loaded = [Endpoint(address=x.address, ip=x.ip, port=x.port, pod=x.pod) for x in e]
    for x in loaded:
        x.metrics = Metrics(waiting=50.0 if x.address == e[home].address else 0.0)
    got = replica(ON).ratios(req(cold, "l"), loaded)
    assert got[home] == 0.0 and sorted(got) == [0.0, 0.0, 0.0, 1.0]
