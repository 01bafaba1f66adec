"""llm-d's precise-prefix deployment config runs as written: token-producer -> precise producer ->
prefix-cache-scorer(prefixMatchInfoProducerName), per-pod mode through endpoint-notification-source."""

from __future__ import annotations

import random

from epp.producers.precise_prefix import PrecisePrefixCacheProducer, find_producers, wire
from epp.producers.token import TokenProducer
from epp.scheduling.config import build_scheduler, load_config

LLMD_PRECISE = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: token-producer
    parameters:
      modelName: acme/model-not-in-any-cache
      vllm:
        url: http://localhost:8000
  - type: endpoint-notification-source
  - type: metrics-data-source
  - type: core-metrics-extractor
  - type: single-profile-handler
  - type: decode-filter
  - type: precise-prefix-cache-producer
    parameters:
      tokenProcessorConfig:
        blockSize: 64
      indexerConfig:
        kvBlockIndexConfig:
          enableMetrics: true
  - type: prefix-cache-scorer
    parameters:
      prefixMatchInfoProducerName: precise-prefix-cache-producer
  - type: kv-cache-utilization-scorer
  - type: queue-scorer
  - type: max-score-picker
dataLayer:
  sources:
    - pluginRef: metrics-data-source
      extractors:
        - pluginRef: core-metrics-extractor
    - pluginRef: endpoint-notification-source
      extractors:
        - pluginRef: precise-prefix-cache-producer
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: decode-filter
      - pluginRef: prefix-cache-scorer
        weight: 2.0
      - pluginRef: kv-cache-utilization-scorer
        weight: 1.0
      - pluginRef: queue-scorer
        weight: 1.0
      - pluginRef: max-score-picker
"""


def test_llm_d_precise_config_builds_and_wires() -> None:
    cfg = load_config(LLMD_PRECISE)
    sched = build_scheduler(cfg, rng=random.Random(0))
    prods = find_producers(sched)
    assert len(prods) == 1 and isinstance(prods[0], PrecisePrefixCacheProducer)
    prod = prods[0]
    assert prod.params.block_tokens == 64 and prod.params.discover_pods
    assert not prod.notifications
    wire(prods, cfg.data_layer, cfg.plugins)
    assert prod.notifications  # per-pod mode: the producer is the notification source's extractor
    # the prefix-cache-scorer reads its match info from the precise producer
    scorer = next(ws.scorer for ws in sched.scorers if type(ws.scorer).__name__ == "PrefixCacheScorer")
    assert scorer.match_source is prod
    # no tokenizer files for the model: the token producer falls back to estimates, counted
    from epp.scheduling.framework import SchedulingRequest
    r = SchedulingRequest(request_id="a", model="m", prompt="hello " * 100)
    assert prod.precise_ratios(r, []) is None
    assert isinstance(prod.tokenizer, TokenProducer) and prod.tokenizer.fallbacks == 1

def test_without_the_notification_source_there_is_no_per_pod_dialing() -> None:
    text = LLMD_PRECISE.replace("""    - pluginRef: endpoint-notification-source
      extractors:
        - pluginRef: precise-prefix-cache-producer
""", "")
    cfg = load_config(text)
    prods = find_producers(build_scheduler(cfg, rng=random.Random(0)))
    wire(prods, cfg.data_layer, cfg.plugins)
    assert prods and not prods[0].notifications
