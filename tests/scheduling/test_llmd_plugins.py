"""The llm-d plugin types: each behaves as its reference README describes."""

from __future__ import annotations

import random

import pytest

from epp.producers.token import estimate_tokens
from epp.scheduling.admission import Admission, ProbabilisticAdmitter, ProbabilisticParams
from epp.scheduling.attributes import EndpointAttributeFilter, EndpointAttributeScorer
from epp.scheduling.config import ConfigError, build_scheduler, load_config
from epp.scheduling.conformance import HeaderBasedTestingFilter, select
from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.registry import BuildContext, Params
from epp.scheduling.roles import DecodeFilter, EncodeFilter, PrefillFilter
from epp.scheduling.saturation import ConcurrencyDetector, SaturationDetector
from epp.scheduling.scorers import (
    ActiveRequestParams,
    ActiveRequestScorer,
    LoadAwareScorer,
    NoHitLRUScorer,
    NoHitParams,
)
from tests.scheduling.util import cycle, ep, req

LLMD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def ctx(seed: int = 0) -> BuildContext:
    return BuildContext(rng=random.Random(seed), detector=SaturationDetector(), guard=LoadGuard(enabled=False))


def test_load_aware_half_at_empty_queue_zero_at_threshold():
    s = LoadAwareScorer("l", 10, ctx())
    eps = [ep(1, waiting=0), ep(2, waiting=5), ep(3, waiting=10), ep(4, waiting=40), ep(5, metrics=False)]
    assert s.score(cycle(), eps) == [0.5, 0.25, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="threshold: must be at least 1"):
        LoadAwareScorer.parse(Params({"threshold": 0}, "p"))


def test_active_request_idle_and_busy():
    s = ActiveRequestScorer("a", ActiveRequestParams(idle_threshold=1, max_busy_score=0.5), ctx())
    eps = [ep(1, inflight=0), ep(2, inflight=1), ep(3, inflight=2), ep(4, inflight=4)]
    assert s.score(cycle(), eps) == [1.0, 1.0, 0.25, 0.0]


def test_no_hit_lru_spreads_cold_requests_and_is_neutral_when_warm():
    s = NoHitLRUScorer("n", NoHitParams(lru_size=8), ctx())
    eps = [ep(1), ep(2), ep(3)]
    r = req("cold")
    assert s.score(cycle(r), eps) == [1.0, 0.5, 0.0]  # never used: in candidate order
    s.on_routed(r, eps[0])
    r2 = req("cold again")
    # ep2, ep3 never used rank first; ep1 (most recent cold pick) last
    assert s.score(cycle(r2), eps) == [0.0, 1.0, 0.5]
    warm = req("warm")
    warm.scratch["prefix-scores:prefix-cache-scorer"] = (eps, [0.0, 0.7, 0.0])
    assert s.score(cycle(warm), eps) == [0.5, 0.5, 0.5]
    s.on_routed(warm, eps[1])  # a warm request does not touch the LRU
    assert list(s._lru) == [eps[0].address]


def test_no_hit_lru_bounded():
    s = NoHitLRUScorer("n", NoHitParams(lru_size=2), ctx())
    for i in range(1, 6):
        r = req(f"p{i}")
        s.score(cycle(r), [ep(i), ep(99)])
        s.on_routed(r, ep(i))
    assert len(s._lru) == 2


def test_no_hit_lru_names_a_prefix_scorer():
    with pytest.raises(ConfigError, match=r'prefixPluginName: no plugin named "cache"'):
        load_config(LLMD + "plugins: [{type: no-hit-lru-scorer, parameters: {prefixPluginName: cache}}]\n")


def test_running_requests_size_is_the_running_scorer():
    cfg = load_config(LLMD + "plugins: [{type: running-requests-size-scorer}]\n")
    s = build_scheduler(cfg).scorers[0].scorer
    assert s.score(cycle(), [ep(1, running=2), ep(2, running=6), ep(3, running=4)]) == [1.0, 0.0, 0.5]


def test_header_based_testing_filter_reference_cases():
    a, b, c = (ep(1), ep(2), ep(3))
    b.port, b.address = 3002, "10.0.0.2:3002"
    f = HeaderBasedTestingFilter("h", None, ctx())
    assert f.filter(cycle(req()), [a]) == []  # header unset
    assert f.filter(cycle(req(headers={"test-epp-endpoint-selection": " "})), [a]) == []
    assert select("10.0.0.99", [a]) == []
    assert select("10.0.0.2", [a, b]) == [b]  # IP only: any port
    assert select("10.0.0.2:9999", [b]) == []
    assert select("10.0.0.3:8000, 10.0.0.2, 10.0.0.3", [a, b, c]) == [c, b]  # header order, one per IP
    v6 = ep(4)
    v6.ip, v6.port, v6.address = "fd00::1", 3000, "[fd00::1]:3000"
    assert select("[fd00::1]:3000", [v6]) == [v6] and select("fd00::1", [v6]) == [v6]
    assert f.filter(cycle(req(headers={"Test-EPP-Endpoint-Selection": "10.0.0.1"})), [a, c]) == [a]


def test_role_filters():
    eps = [ep(1, labels={}), ep(2), ep(3), ep(4), ep(5)]
    for e, role in zip(eps, ["", "decode", "prefill", "prefill-decode", "encode"], strict=True):
        e.role = role
    c = cycle()
    assert DecodeFilter("d", None, ctx()).filter(c, eps) == [eps[0], eps[1], eps[3]]
    assert PrefillFilter("p", None, ctx()).filter(c, eps) == [eps[2], eps[3]]
    assert EncodeFilter("e", None, ctx()).filter(c, eps) == [eps[4]]


def test_endpoint_attribute_filter_threshold_and_missing():
    p = EndpointAttributeFilter.parse(Params({"attribute": "RunningRequestsSize", "onMissing": "Fail",
                                              "algorithm": {"type": "threshold",
                                                            "threshold": {"operator": "LessThan", "value": 10}}},
                                             "p"))
    f = EndpointAttributeFilter("f", p, ctx())
    eps = [ep(1, running=3), ep(2, running=12), ep(3, metrics=False)]
    assert f.filter(cycle(), eps) == [eps[0]]
    keep = EndpointAttributeFilter("f", EndpointAttributeFilter.parse(Params(
        {"attribute": "custom.x", "fallbackOnEmpty": True,
         "algorithm": {"type": "threshold", "threshold": {"operator": "GreaterThan", "value": 1}}}, "p")), ctx())
    eps[0].metrics.custom = {"custom.x": 0.5}
    eps[1].metrics.custom = {"custom.x": 0.2}
    assert keep.filter(cycle(), eps[:2]) == eps[:2]  # all dropped: fallback keeps the candidates
    with pytest.raises(ConfigError, match=r"algorithm.type: only \"threshold\""):
        EndpointAttributeFilter.parse(Params({"attribute": "a", "algorithm": {"type": "topK"}}, "p"))


def test_endpoint_attribute_scorer_adaptive_and_fixed():
    eps = [ep(1, kv=0.2), ep(2, kv=0.6), ep(3, kv=1.0), ep(4, metrics=False)]
    adaptive = EndpointAttributeScorer("s", EndpointAttributeScorer.parse(Params(
        {"attributeKey": "KVCacheUsagePercent", "algorithm": {"type": "linear_lower_is_better"}}, "p")), ctx())
    assert adaptive.score(cycle(), eps) == pytest.approx([1.0, 0.5, 0.0, 0.0])
    fixed = EndpointAttributeScorer("s", EndpointAttributeScorer.parse(Params(
        {"attributeKey": "KVCacheUsagePercent", "algorithm": {
            "type": "linear_higher_is_better", "normalization": {"fixedRange": {"min": 0.0, "max": 0.5}}}}, "p")),
        ctx())
    assert fixed.score(cycle(), eps) == pytest.approx([0.4, 1.0, 1.0, 0.0])
    with pytest.raises(ConfigError, match="min must be less than max"):
        EndpointAttributeScorer.parse(Params({"attributeKey": "a", "algorithm": {
            "type": "linear_lower_is_better", "normalization": {"fixedRange": {"min": 1, "max": 1}}}}, "p"))


def test_concurrency_detector_modes_and_filter():
    eps = [ep(1, inflight=50, inflight_tokens=100), ep(2, inflight=150, inflight_tokens=900)]
    assert ConcurrencyDetector(max_concurrency=100).pool_saturation(eps, 0) == 1.0
    assert ConcurrencyDetector(mode="tokens", max_token_concurrency=1000).pool_saturation(eps, 0) == 0.5
    hybrid = ConcurrencyDetector(mode="hybrid", max_concurrency=100, max_token_concurrency=1000)
    assert hybrid.pool_saturation(eps, 0) == pytest.approx((0.5 + 1.5) / 2)
    assert ConcurrencyDetector().pool_saturation([], 0) == 1.0
    d = ConcurrencyDetector(max_concurrency=100, headroom=0.2)
    assert d.filter(cycle(), eps) == [eps[0]]  # 150 ≥ 120
    assert d.filter(cycle(), [eps[1]]) == [eps[1]]  # nobody below the limit: keep all
    adm = Admission(ConcurrencyDetector(max_concurrency=100))
    assert adm.check(req(priority=-1), eps, 0) is not None and adm.check(req(priority=0), eps, 0) is None


def test_utilization_detector_filter_headroom():
    d = SaturationDetector(queue_threshold=4, kv_threshold=0.8, headroom=0.5)
    eps = [ep(1, waiting=6), ep(2, waiting=7), ep(3, kv=0.95), ep(4, age=10)]
    assert d.filter(cycle(), eps) == [eps[0], eps[2]]  # 6 ≤ 4×1.5; kv limit min(1, 1.2); stale dropped


def test_probabilistic_admitter_curve():
    adm = ProbabilisticAdmitter("p", ProbabilisticParams(), ctx(1))
    idle = [ep(1), ep(2)]
    busy = [ep(1, waiting=5), ep(2, kv=0.8)]  # saturation 1
    assert adm.shed_probability(idle, 0) == 0.0
    assert adm.shed_probability(busy, 0) == 1.0
    mid = [ep(1, waiting=0.75), ep(2, waiting=0.75)]  # saturation 0.15: p = 0.15^5 × 300 ≈ 0.023
    assert adm.shed_probability(mid, 0) == pytest.approx(0.15 ** 5 * 300)
    assert adm.admit(req(priority=0), busy, 0) is None  # never sheds priority ≥ 0
    assert adm.admit(req(priority=-1), busy, 0) is not None
    assert adm.admit(req(priority=-1), [], 0) is None
    shed = sum(adm.admit(req(priority=-1), mid, 0) is not None for _ in range(4000))
    assert 40 < shed < 160  # ≈ 2.3% of 4000


def test_probabilistic_admitter_through_config():
    cfg = load_config(LLMD + "plugins: [{type: probabilistic-admitter, parameters: {power: 1, k: 1}}, "
                      "{type: random-picker}]\n"
                      "schedulingProfiles: [{name: d, plugins: [{pluginRef: random-picker}]}]\n")
    from epp.scheduling.config import build_admission

    adm = build_admission(cfg, rng=random.Random(3))
    assert [a.name for a in adm.admitters] == ["probabilistic-admitter"]
    full = [ep(1, waiting=5)]
    assert adm.check(req(priority=-1), full, 0) is not None


def test_approx_producer_shared_by_scorers():
    cfg = load_config(LLMD + """
plugins:
- {type: approx-prefix-cache-producer, name: prod, parameters: {blockSizeTokens: 4, autoTune: false,
   maxPrefixTokensToMatch: 64, lruCapacityPerServer: 100}}
- {type: prefix-cache-scorer, name: a, parameters: {prefixMatchInfoProducerName: prod}}
- {type: prefix-cache-scorer, name: b, parameters: {prefixMatchInfoProducerName: prod, matchLengthWeight: 1,
   matchLengthScaleTokens: 8}}
schedulingProfiles: [{name: d, plugins: [{pluginRef: a}, {pluginRef: b}]}]
""")
    sched = build_scheduler(cfg, rng=random.Random(0))
    a, b = (ws.scorer for ws in sched.scorers)
    assert a.index is b.index and a.p.block_tokens == 4 and a.p.max_blocks == 16 and not a.p.auto_tune
    eps = [ep(1), ep(2)]
    r = req("x" * 64)  # 4 blocks of 16 bytes
    sched.on_routed(r, eps[0])
    r2 = req("x" * 64)
    assert a.score(cycle(r2), eps) == [1.0, 0.0]
    assert b.score(cycle(r2), eps) == [1.0, 0.0]  # 16 tokens matched ≥ scale 8: (1)² × 1
    r3 = req("x" * 32 + "y" * 32)  # 2 of 4 blocks match: 8 tokens → length score (8/8)² = 1
    assert a.score(cycle(r3), eps)[0] == 0.5


def test_prefix_scorer_index_params_belong_on_the_producer():
    with pytest.raises(ConfigError, match="give its parameters on that producer"):
        load_config(LLMD + "plugins: [{type: approx-prefix-cache-producer}, {type: prefix-cache-scorer, "
                    "parameters: {prefixMatchInfoProducerName: approx-prefix-cache-producer, blockSizeTokens: 8}}]\n")
    with pytest.raises(ConfigError, match=r'prefixMatchInfoProducerName: "queue-scorer" is a queue-scorer'):
        load_config(LLMD + "plugins: [{type: queue-scorer}, {type: prefix-cache-scorer, "
                    "parameters: {prefixMatchInfoProducerName: queue-scorer}}]\n")


def test_prefix_affinity_filter_sticky_and_ttft_gate():
    cfg = load_config(LLMD + """
plugins:
- {type: prefix-cache-scorer, parameters: {autoTune: false, blockSizeTokens: 4}}
- {type: prefix-cache-affinity-filter, parameters: {affinityThreshold: 0.9, maxTTFTPenaltyMs: 1000,
   peakPrefillThroughput: 1000}}
schedulingProfiles: [{name: d, plugins: [{pluginRef: prefix-cache-affinity-filter}, {pluginRef: prefix-cache-scorer}]}]
""")
    sched = build_scheduler(cfg, rng=random.Random(0))
    f = sched.filters[0]
    eps = [ep(1), ep(2), ep(3)]
    sched.on_routed(req("z" * 64), eps[1])
    assert f.filter(cycle(req("z" * 64)), list(eps)) == [eps[1]]
    assert f.filter(cycle(req("q" * 64)), list(eps)) == eps  # nothing sticky: all kept
    eps[1].inflight_tokens = 5000  # 5 s of prefill queued on the sticky pod, others idle: break stickiness
    assert f.filter(cycle(req("z" * 64)), list(eps)) == eps
    with pytest.raises(ConfigError, match="latencyPredictor is not yet supported"):
        load_config(LLMD + "plugins: [{type: prefix-cache-affinity-filter, "
                    "parameters: {ttftSource: latencyPredictor}}]\n")


def test_prefix_affinity_filter_declared_before_its_prefix_scorer():
    """Plugins are built in order: a filter declared first still finds the scorer on first use."""
    cfg = load_config(LLMD + """
plugins:
- {type: prefix-cache-affinity-filter, parameters: {affinityThreshold: 0.9}}
- {type: prefix-cache-scorer, parameters: {autoTune: false, blockSizeTokens: 4}}
schedulingProfiles: [{name: d, plugins: [{pluginRef: prefix-cache-affinity-filter}, {pluginRef: prefix-cache-scorer}]}]
""")
    sched = build_scheduler(cfg, rng=random.Random(0))
    eps = [ep(1), ep(2), ep(3)]
    sched.on_routed(req("z" * 64), eps[2])
    assert sched.filters[0].filter(cycle(req("z" * 64)), list(eps)) == [eps[2]]


def test_token_producer_estimate_and_refused_backends():
    assert estimate_tokens("") == 0 and estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2
    assert estimate_tokens("é" * 4) == 2  # 8 UTF-8 bytes
    # the vllm backend (precise prefix-cache routing, epp/producers/token.py) needs a model; the
    # deprecated sidecar is refused
    for backend, message in (("vllm: {url: 'http://x'}", "needs modelName"),
                             ("udsTokenizerConfig: {}", "sidecar is not supported")):
        with pytest.raises(ConfigError, match=message):
            load_config(LLMD + f"plugins: [{{type: token-producer, parameters: {{{backend}}}}}]\n")
    load_config(LLMD + "plugins: [{type: token-producer, parameters: {modelName: m, vllm: {url: 'http://x'}}}]\n")


def test_prefix_scorer_reads_a_match_info_producer():
    from epp.scheduling.prefix import PrefixCacheScorer, PrefixParams

    class Producer:  # the shape of precise/burst producers: ratios() and on_routed()
        name = "precise"

        def __init__(self):
            self.routed = []

        def ratios(self, request, endpoints):
            return None if request.prompt == "unknown" else [0.25, 2.0][: len(endpoints)]

        def on_routed(self, request, endpoint):
            self.routed.append(endpoint.address)

    c = ctx()
    c.plugins["precise"] = prod = Producer()
    s = PrefixCacheScorer("p", PrefixParams(producer="precise", load_guard=False), c)
    eps = [ep(1), ep(2)]
    r = req("known")
    assert s.score(cycle(r), eps) == [0.25, 1.0]  # clamped to 0..1
    assert s.score(cycle(req("unknown")), eps) == [0.0, 0.0]
    s.on_routed(r, eps[1])
    assert prod.routed == [eps[1].address] and s.index.entries == 0
