"""Load scorers: exact scores, stale handling."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.registry import BuildContext, ConfigError
from epp.scheduling.saturation import SaturationDetector
from epp.scheduling.scorers import (
    InflightLoadScorer,
    KVCacheUtilizationScorer,
    LoraAffinityScorer,
    QueueScorer,
    RunningRequestsScorer,
    low_is_better,
    pool_serves_adapters,
)
from tests.scheduling.util import cycle, endpoints, ep, req

CTX = BuildContext(rng=random.Random(0), detector=SaturationDetector(), guard=LoadGuard())


def test_queue_scorer_min_max():
    eps = [ep(1, waiting=0), ep(2, waiting=5), ep(3, waiting=10), ep(4, waiting=2)]
    assert QueueScorer("q", None, CTX).score(cycle(), eps) == [1.0, 0.5, 0.0, 0.8]


def test_queue_scorer_all_equal_is_one():
    eps = [ep(1, waiting=3), ep(2, waiting=3)]
    assert QueueScorer("q", None, CTX).score(cycle(), eps) == [1.0, 1.0]


def test_queue_scorer_stale_pod_scores_worst():
    eps = [ep(1, waiting=4), ep(2, waiting=0, age=10), ep(3, waiting=8), ep(4, metrics=False),
           ep(5, waiting=0, scrape_ok=False)]
    assert QueueScorer("q", None, CTX).score(cycle(), eps) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_queue_scorer_single_fresh_pod_among_stale():
    eps = [ep(1, waiting=9), ep(2, age=10)]
    assert QueueScorer("q", None, CTX).score(cycle(), eps) == [1.0, 0.0]


def test_queue_scorer_min_spread_damps_small_queues_only():
    from epp.scheduling.scorers import QueueParams
    q = QueueScorer("q", QueueParams(min_spread=8), CTX)
    # 0 against 2 waiting: a quarter of the weight apart, not all of it
    assert q.score(cycle(), [ep(1, waiting=0), ep(2, waiting=2)]) == [1.0, 0.75]
    # a long queue still swings the full weight (the spread exceeds the floor)
    assert q.score(cycle(), [ep(1, waiting=0), ep(2, waiting=20), ep(3, waiting=10)]) == [1.0, 0.0, 0.5]
    assert q.score(cycle(), [ep(1, waiting=3), ep(2, age=10)]) == [1.0, 0.0]  # stale stays the worst


def test_queue_scorer_count_inflight_spreads_between_scrapes():
    from epp.scheduling.scorers import QueueParams
    a, b = ep(1, waiting=0, running=4), ep(2, waiting=1, running=4)
    a.inflight, b.inflight = 7, 4  # 3 routed to `a` since its page was taken
    live = QueueScorer("q", QueueParams(count_inflight=True), CTX)
    assert live.score(cycle(), [a, b]) == [0.0, 1.0]  # a counts 3 queued against b's 1
    assert QueueScorer("q", None, CTX).score(cycle(), [a, b]) == [1.0, 0.0]  # the page alone
    a.inflight = 2  # fewer in flight than the page shows running (another replica's): the page wins
    assert live.score(cycle(), [a, b]) == [1.0, 0.0]


def test_queue_scorer_params_parse_and_refuse():
    from epp.scheduling.config import load_config
    cfg = load_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
  parameters: {minSpread: 4, countInflight: true}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
""")
    spec = next(s for s in cfg.plugins if s.type == "queue-scorer")
    assert (spec.params.min_spread, spec.params.count_inflight) == (4.0, True)
    with pytest.raises(ConfigError, match="minSpread"):
        load_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
  parameters: {minSpread: -1}
""")


def test_running_requests_scorer():
    eps = [ep(1, running=10), ep(2, running=30), ep(3, running=20)]
    assert RunningRequestsScorer("r", None, CTX).score(cycle(), eps) == [1.0, 0.0, 0.5]


def test_kv_scorer():
    eps = [ep(1, kv=0.25), ep(2, kv=1.0), ep(3, kv=0.0), ep(4, kv=0.5, age=10)]
    assert KVCacheUtilizationScorer("kv", None, CTX).score(cycle(), eps) == [0.75, 0.0, 1.0, 0.0]


def test_lora_scorer_is_neutral_for_base_model_requests():
    # the base model is served everywhere: free adapter slots must not attract it
    eps = [ep(1, lora_max=4, lora_running={"a"}, models={"llama"}),
           ep(2, lora_max=0, models={"llama"}),
           ep(3, lora_max=4, models={"qwen"})]  # serves another base model
    assert LoraAffinityScorer("l", None, CTX).score(cycle(req(model="llama")), eps) == [1.0, 1.0, 0.0]
    # an adapter request still prefers the free slot
    assert LoraAffinityScorer("l", None, CTX).score(cycle(req(model="new-lora")), eps) == [0.8, 0.0, 0.8]


def test_lora_scorer_levels():
    eps = [
        ep(1, lora_max=2, lora_running={"a"}),  # running → 1.0
        ep(2, lora_max=2, lora_running={"b"}),  # free slot → 0.8
        ep(3, lora_max=2, lora_running={"b"}, lora_waiting={"a"}),  # slots full, waiting → 0.6
        ep(4, lora_max=1, lora_running={"b"}),  # full, absent → 0
        ep(5, lora_max=2, lora_running={"a"}, age=10),  # stale → 0
        ep(6),  # no LoRA support → 0
    ]
    assert LoraAffinityScorer("l", None, CTX).score(cycle(req(model="a")), eps) == [1.0, 0.8, 0.6, 0.0, 0.0, 0.0]


def test_pool_serves_adapters():
    assert not pool_serves_adapters([ep(1), ep(2, metrics=False)])
    assert pool_serves_adapters([ep(1), ep(2, lora_max=4)])


def test_inflight_scorer_ratio():
    s = InflightLoadScorer("i", 1000.0, CTX)
    eps = [ep(1, inflight=0), ep(2, inflight=1), ep(3, inflight=3), ep(4, inflight=1, inflight_tokens=1000)]
    assert s.score(cycle(), eps) == [1.0, 0.5, 0.25, 1 / 3]


def test_inflight_scorer_ignores_tokens_when_zero():
    s = InflightLoadScorer("i", 0.0, CTX)
    eps = [ep(1, inflight=1, inflight_tokens=10**6), ep(2, inflight=1)]
    assert s.score(cycle(), eps) == [1.0, 1.0]


def test_inflight_scorer_never_divides_by_zero_on_negative_counts():
    s = InflightLoadScorer("i", 1000.0, CTX)
    out = s.score(cycle(), [ep(1, inflight=-1), ep(2, inflight=2)])
    assert out == [1.0, 1 / 3]


def test_inflight_scorer_scaled_by_active_active_replicas():
    from epp.scheduling.registry import Params
    from epp.scheduling.scorers import InflightParams

    assert InflightLoadScorer.parse(Params({}, "p")) == InflightParams(1024.0, 1)
    got = InflightLoadScorer.parse(Params({"replicas": 4, "tokensPerRequest": 0}, "p"))
    assert got == InflightParams(0.0, 4)
    with pytest.raises(ConfigError):
        InflightLoadScorer.parse(Params({"replicas": 0}, "p"))
    # each of 4 replicas sees about a quarter of the pool's requests: 0 vs 1 of its own stands for 0 vs 4
    s = InflightLoadScorer("i", got, CTX)
    assert s.score(cycle(), [ep(1, inflight=0), ep(2, inflight=1)]) == [1.0, 0.2]
    assert InflightLoadScorer("i", 0.0, CTX).score(cycle(), [ep(1, inflight=0), ep(2, inflight=1)]) == [1.0, 0.5]


@given(st.lists(st.one_of(st.none(), st.floats(0, 1e6)), min_size=1, max_size=40))
def test_low_is_better_stays_in_range(values):
    out = low_is_better(values)
    assert len(out) == len(values)
    assert all(0.0 <= x <= 1.0 for x in out)
    known = [v for v in values if v is not None]
    if known:  # the best known value always gets 1
        best = values.index(min(known))
        assert out[best] == 1.0


@settings(max_examples=60)
@given(eps=endpoints(), model=st.sampled_from("abz"))
def test_metric_scorers_in_range(eps, model):
    c = cycle(req(model=model))
    for cls in (QueueScorer, RunningRequestsScorer, KVCacheUtilizationScorer, LoraAffinityScorer):
        out = cls("s", None, CTX).score(c, eps)
        assert len(out) == len(eps) and all(0.0 <= x <= 1.0 and not math.isnan(x) for x in out), cls
    out = InflightLoadScorer("i", 1024.0, CTX).score(c, eps)
    assert all(0.0 < x <= 1.0 for x in out) and max(out) == 1.0


def test_garbage_metric_values_score_worst():
    nan, inf = float("nan"), float("inf")
    assert low_is_better([nan, 2.0, 4.0, -1.0, inf, None]) == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert low_is_better([nan, 3.0]) == [0.0, 1.0]
    eps = [ep(1, kv=1.5), ep(2, kv=-0.2), ep(3, kv=nan)]
    assert KVCacheUtilizationScorer("kv", None, CTX).score(cycle(), eps) == [0.0, 1.0, 0.0]


def test_no_hit_lru_prefix_type_must_match_the_named_plugin():
    from epp.scheduling.config import load_config
    text = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
  parameters: {prefixPluginType: TYPE}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: no-hit-lru-scorer
  - pluginRef: max-score-picker
"""
    load_config(text.replace("TYPE", "prefix-cache-scorer"))
    with pytest.raises(ConfigError, match="expected prefix-cache-scorrer"):
        load_config(text.replace("TYPE", "prefix-cache-scorrer"))
