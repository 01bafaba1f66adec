"""precise-prefix-cache-producer / -scorer: llm-d's parameters, scoring from the index, the
approximate fallback for endpoints that publish nothing, speculation, and both event modes over
real ZMQ on loopback."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
import yaml
import zmq

import epp.producers.precise_prefix  # noqa: F401  (registers the types)
from epp.datastore import Endpoint
from epp.kvevents.wire import encode_payload, encode_stored
from epp.producers.precise_prefix import PrecisePrefixCacheProducer, PrecisePrefixCacheScorer, parse_params
from epp.scheduling.config import load_config
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.registry import BuildContext, ConfigError, Params
from epp.sim.kvevents import ZmqPublisher, topic_for
from epp.sim.tokens import token_ids
from epp.tokens import TOKEN_IDS

MODEL = "m"
PROMPT = "".join(f"tok{i:05d}" for i in range(64))  # 512 chars = 128 sim tokens = 8 blocks


def ctx(now: list[float] | None = None) -> BuildContext:
    from epp.scheduling.loadguard import LoadGuard
    from epp.scheduling.saturation import SaturationDetector
    clock = (lambda: now[0]) if now is not None else time.monotonic
    return BuildContext(rng=random.Random(0), detector=SaturationDetector(), guard=LoadGuard(), clock=clock)


def eps(n: int) -> list[Endpoint]:
    return [Endpoint(address=f"10.0.0.{i}:8000", ip=f"10.0.0.{i}", port=8000, pod=f"p{i}") for i in range(1, n + 1)]


def req(prompt: str = PROMPT, rid: str = "r") -> SchedulingRequest:
    return SchedulingRequest(request_id=rid, model=MODEL, prompt=prompt)


def feed_prompt(p: PrecisePrefixCacheProducer, address: str, prompt: str = PROMPT, blocks: int | None = None) -> None:
    ids = token_ids(prompt)
    n = len(ids) // 16 if blocks is None else blocks
    p.feed(address, MODEL, encode_payload([encode_stored(list(range(1, n + 1)), None, ids[:n * 16], 16)], 0.0))


def wait_for(cond: Callable[[], bool], tries: int = 400) -> bool:
    for _ in range(tries):
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_llm_d_parameters() -> None:
    raw = {"tokenProcessorConfig": {"blockSize": 64, "hashSeed": "s"},
           "indexerConfig": {"kvBlockIndexConfig": {"enableMetrics": True, "inMemoryConfig": {"size": 1000}},
                             "backendConfigs": [{"name": "GPU", "weight": 1.0}, {"name": "cpu", "weight": 0.5}]},
           "kvEventsConfig": {"zmqEndpoint": "tcp://*:5557", "topicFilter": "kv@", "concurrency": 4,
                              "engineType": "sglang", "discoverPods": False,
                              "podDiscoveryConfig": {"socketPort": 6000, "replaySocketPort": 6100,
                                                     "podLabelSelector": "a=b"}},
           "speculativeIndexing": True, "speculativeTTL": "3s"}
    got = parse_params(Params(raw, "p"))
    assert got.block_tokens == 64 and got.hash_seed == "s" and got.enable_metrics and got.max_entries == 1000
    assert got.tier_weights == {"gpu": 1.0, "cpu": 0.5}
    assert (got.zmq_endpoint, got.engine_type, got.discover_pods, got.socket_port, got.replay_port) == (
        "tcp://*:5557", "sglang", False, 6000, 6100)
    assert got.speculative and got.speculative_ttl == 3.0
    d = parse_params(Params({}, "p"))
    assert (d.block_tokens, d.discover_pods, d.socket_port, d.speculative, d.speculative_ttl) == (16, True, 5557,
                                                                                                  False, 2.0)


@pytest.mark.parametrize(("raw", "field"), [
    ({"indexerConfig": {"tokenizersPoolConfig": {}}}, "tokenizersPoolConfig"),
    ({"indexerConfig": {"kvBlockIndexConfig": {"redisConfig": {"address": "x"}}}}, "redisConfig"),
    ({"kvEventsConfig": {"zmqEndpoint": "http://x"}}, "zmqEndpoint"),
    ({"kvEventsConfig": {"engineType": "trt"}}, "engineType"),
    ({"kvEventsConfig": {"bogus": 1}}, "bogus"),
    ({"tokenProcessorConfig": {"blockSize": 0}}, "blockSize"),
    ({"tokenizer": {"backend": "local"}}, "path"),
    ({"speculativeTTL": "soon"}, "speculativeTTL"),
])
def test_bad_parameters_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        p = Params(raw, "plugins[0].parameters")
        parse_params(p)
        p.done()
    assert field in str(e.value)


def test_config_file_with_the_composite_scorer_loads() -> None:
    text = yaml.safe_dump({
        "apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig",
        "plugins": [{"type": "precise-prefix-cache-producer", "parameters": {"tokenizer": {"backend": "sim"}}},
                    {"type": "precise-prefix-cache-scorer",
                     "parameters": {"prefixMatchInfoProducerName": "precise-prefix-cache-producer"}},
                    {"type": "queue-scorer"}, {"type": "max-score-picker"}],
        "schedulingProfiles": [{"name": "default", "plugins": [
            {"pluginRef": "precise-prefix-cache-scorer", "weight": 3}, {"pluginRef": "queue-scorer", "weight": 1},
            {"pluginRef": "max-score-picker"}]}]})
    cfg = load_config(text)
    assert any(s.type == "precise-prefix-cache-scorer" for s in cfg.plugins)


def test_scores_are_the_cached_share_and_silent_pods_fall_back_to_approximate() -> None:
    c = ctx()
    prod = PrecisePrefixCacheProducer("pp", parse_params(Params({"tokenizer": {"backend": "sim"}}, "")), c)
    c.plugins["pp"] = prod
    scorer = PrecisePrefixCacheScorer("s", parse_params(Params({"prefixMatchInfoProducerName": "pp"}, ""),
                                                        scorer=True), c)
    assert scorer.producer is prod
    e = eps(4)
    feed_prompt(prod, e[0].address)  # all 8 blocks
    feed_prompt(prod, e[1].address, blocks=2)
    from epp.scheduling.cycle import Cycle
    cyc = Cycle.__new__(Cycle)
    cyc.request = req()
    assert scorer.score(cyc, e[:2]) == [1.0, 0.25]
    # e[2], e[3] publish nothing: the approximate index credits where requests were sent
    scorer.on_routed(cyc.request, e[2])
    cyc.request = req(rid="r2")
    got = scorer.score(cyc, e)
    assert got[0] == 1.0 and got[1] == 0.25 and got[2] > 0.9 and got[3] == 0.0
    # a publishing pod never gets approximate credit, even if requests were routed there
    scorer.on_routed(cyc.request, e[1])
    cyc.request = req(rid="r3")
    assert scorer.score(cyc, e)[1] == 0.25


def test_speculative_entries_until_the_ttl() -> None:
    now = [10.0]
    c = ctx(now)
    prod = PrecisePrefixCacheProducer("pp", parse_params(Params(
        {"tokenizer": {"backend": "sim"}, "speculativeIndexing": True, "speculativeTTL": "2s"}, "")), c)
    e = eps(2)
    feed_prompt(prod, e[1].address, blocks=1)
    r = req()
    prod.on_routed(r, e[0])
    assert prod.ratios(req(rid="b"), e) == [1.0, 1 / 8]
    now[0] += 2.5
    assert prod.ratios(req(rid="c"), e) == [0.0, 1 / 8]


def test_token_ids_from_a_token_producer_win() -> None:
    c = ctx()
    prod = PrecisePrefixCacheProducer("pp", parse_params(Params({}, "")), c)  # no tokenizer of its own
    e = eps(1)
    feed_prompt(prod, e[0].address)
    assert prod.precise_ratios(req(), e) is None and prod.no_tokens == 1
    r = req(rid="t")
    r.scratch[TOKEN_IDS] = token_ids(PROMPT)
    assert prod.ratios(r, e) == [1.0]


def test_centralized_mode_over_zmq() -> None:
    c = ctx()
    prod = PrecisePrefixCacheProducer("pp", parse_params(Params(
        {"tokenizer": {"backend": "sim"}, "kvEventsConfig": {"zmqEndpoint": "tcp://127.0.0.1:0"}}, "")), c)
    prod.start()
    try:
        assert prod.subscriber is not None
        bound = prod.subscriber.bound["tcp://127.0.0.1:0"]
        e = eps(2)
        pub = ZmqPublisher(bound, topic_for(e[1].address, MODEL))
        ids = token_ids(PROMPT)
        try:
            def sent() -> bool:
                pub.publish([encode_stored(list(range(1, 9)), None, ids, 16)])
                return prod.ratios(req(rid=str(time.monotonic())), e) == [0.0, 1.0]
            assert wait_for(sent)
        finally:
            pub.close()
    finally:
        prod.stop()


def _two_publishers() -> list[ZmqPublisher]:
    """Publishers for ranks 0 and 1 on consecutive loopback ports (base, base + 1)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000)
        pubs: list[ZmqPublisher] = []
        try:
            for r in range(2):
                pubs.append(ZmqPublisher(f"tcp://127.0.0.1:{base + r}", topic_for(f"127.0.0.1:{8000 + r}", MODEL),
                                         bind=True))
            return pubs
        except zmq.ZMQError:
            for p in pubs:
                p.close()
    pytest.skip("no two consecutive free ports")


def test_per_pod_mode_dials_socket_port_plus_rank_and_forgets_on_leave() -> None:
    pubs = _two_publishers()
    base = int(pubs[0].endpoint.rsplit(":", 1)[1])
    c = ctx()
    prod = PrecisePrefixCacheProducer("pp", parse_params(Params(
        {"tokenizer": {"backend": "sim"}, "kvEventsConfig": {"podDiscoveryConfig": {"socketPort": base}}}, "")), c)
    prod.notifications = True  # the config wired it to an endpoint-notification-source
    e = [Endpoint(address=f"127.0.0.1:{8000 + r}", ip="127.0.0.1", port=8000 + r, pod="p") for r in range(2)]
    try:
        prod.observe(e)  # ranks from the pod's ports: 8000 -> 0, 8001 -> 1
        ids = token_ids(PROMPT)

        def both() -> bool:
            pubs[0].publish([encode_stored(list(range(1, 9)), None, ids, 16)])
            pubs[1].publish([encode_stored(list(range(1, 3)), None, ids[:32], 16)])
            return prod.ratios(req(rid=str(time.monotonic())), e) == [1.0, 0.25]
        assert wait_for(both)
        prod.endpoint_removed(e[0])
        assert wait_for(lambda: not prod.kv_index.publishes(e[0].address))
    finally:
        prod.stop()
        for p in pubs:
            p.close()


def test_index_metrics_render() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from epp.kvevents.metrics import register as register_metrics
    prod = PrecisePrefixCacheProducer("pp", parse_params(Params({"tokenizer": {"backend": "sim"}}, "")), ctx())
    reg = CollectorRegistry()
    register_metrics(reg, prod)
    feed_prompt(prod, "10.0.0.1:8000")
    prod.ratios(req(), eps(1))
    text = generate_latest(reg).decode()
    assert 'llm_d_router_epp_kv_cache_index_admissions_total{producer="pp"} 8.0' in text
    assert 'llm_d_router_epp_kv_cache_index_size{producer="pp"} 8.0' in text
    assert 'llm_d_router_epp_kv_cache_index_lookup_hits_total{producer="pp"} 8.0' in text


def test_speculative_hold_in_flight_until_on_finished() -> None:
    """`speculativeHoldInFlight: true`: the routed request's entries outlive the TTL while it is in
    flight; the composite scorer's on_finished (what the profile calls) starts the TTL."""
    now = [10.0]
    c = ctx(now)
    params = parse_params(Params({"tokenizer": {"backend": "sim"}, "speculativeIndexing": True,
                                  "speculativeTTL": "2s", "speculativeHoldInFlight": True}, ""))
    assert params.speculative_hold and not parse_params(Params({}, "")).speculative_hold
    scorer = PrecisePrefixCacheScorer("s", params, c)
    prod = scorer.producer
    e = eps(2)
    feed_prompt(prod, e[1].address, blocks=1)
    r = req()
    scorer.on_routed(r, e[0])
    now[0] += 20.0  # queued far longer than the TTL
    assert prod.ratios(req(rid="b"), e) == [1.0, 1 / 8]
    scorer.on_finished(r, e[0])
    scorer.on_finished(r, e[0])  # a second report is harmless
    now[0] += 1.5
    assert prod.ratios(req(rid="c"), e) == [1.0, 1 / 8]
    now[0] += 1.0
    assert prod.ratios(req(rid="d"), e) == [0.0, 1 / 8]
    st = prod.stats()
    assert st["precise_speculative_expired"] == 8 and st["precise_speculative_expired_unconfirmed"] == 8


def test_prefix_cache_scorer_forwards_on_finished_to_its_match_source() -> None:
    """llm-d's wiring (prefix-cache-scorer with prefixMatchInfoProducerName) passes the request's end on, so
    `speculativeHoldInFlight` entries start their TTL when the request finishes, not only by max_hold."""
    from epp.scheduling.prefix import PrefixCacheScorer

    now = [10.0]
    c = ctx(now)
    params = parse_params(Params({"tokenizer": {"backend": "sim"}, "speculativeIndexing": True,
                                  "speculativeTTL": "2s", "speculativeHoldInFlight": True}, ""))
    prod = PrecisePrefixCacheProducer("precise", params, c)
    c.plugins["precise"] = prod
    scorer = PrefixCacheScorer("prefix", PrefixCacheScorer.parse(Params(
        {"prefixMatchInfoProducerName": "precise"}, "")), c)
    assert scorer.match_source is prod
    e = eps(2)
    r = req()
    scorer.on_routed(r, e[0])
    now[0] += 20.0  # in flight far past the TTL: still held
    assert prod.ratios(req(rid="b"), e)[0] == 1.0
    scorer.on_finished(r, e[0])
    now[0] += 2.5  # the TTL from the finish has run out
    assert prod.ratios(req(rid="c"), e)[0] == 0.0


def test_no_hit_lru_tells_warm_from_cold_through_the_precise_scorer() -> None:
    # the default profile with the prefix scorer swapped for the precise one, as llm-d deploys it
    from epp.scheduling.config import build_scheduler
    from tests.scheduling.util import ep
    text = yaml.safe_dump({
        "apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig",
        "plugins": [{"type": "precise-prefix-cache-scorer", "parameters": {"tokenizer": {"backend": "sim"}}},
                    {"type": "no-hit-lru-scorer", "parameters": {"prefixPluginName": "precise-prefix-cache-scorer",
                                                                 "prefixPluginType": "precise-prefix-cache-scorer"}},
                    {"type": "max-score-picker"}],
        "schedulingProfiles": [{"name": "default", "plugins": [
            {"pluginRef": "precise-prefix-cache-scorer", "weight": 3}, {"pluginRef": "no-hit-lru-scorer", "weight": 1},
            {"pluginRef": "max-score-picker"}]}]})
    sched = build_scheduler(load_config(text), rng=random.Random(0))
    pods = [ep(i) for i in range(1, 5)]
    prod = next(ws.scorer.producer for ws in sched.scorers if isinstance(ws.scorer, PrecisePrefixCacheScorer))
    feed_prompt(prod, pods[2].address)  # only the third pod holds the prompt
    r = req()
    res = sched.schedule(r, pods)
    assert res.endpoints == [pods[2]]
    assert r.scratch["no-hit-cold:no-hit-lru-scorer"] is False  # warm: the LRU spread stayed out of it
    cold = req("".join(f"new{i:05d}" for i in range(64)), rid="c")
    sched.schedule(cold, pods)
    assert cold.scratch["no-hit-cold:no-hit-lru-scorer"] is True
