"""EndpointPickerConfig loading: presets, overrides, strict validation naming the field."""

from __future__ import annotations

import pytest

from epp.scheduling.config import (
    DEFAULT_CONFIG_TEXT,
    REFERENCE_CONFIG_TEXT,
    ConfigError,
    build_admission,
    build_scheduler,
    describe,
    load_config,
    preset_config,
)
from epp.scheduling.pickers import MaxScorePicker
from tests.scheduling.util import ep, req

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def entries(cfg):
    return [(cfg.plugin(e.plugin).type, e.weight, e.only_with_lora) for e in cfg.profile.entries]


def test_no_config_is_the_default_preset():
    for cfg in (load_config(None), load_config("  \n"), preset_config("default")):
        assert cfg.preset == "default"
        assert entries(cfg) == [
            ("queue-scorer", 2, False), ("kv-cache-utilization-scorer", 1, False), ("prefix-cache-scorer", 3, False),
            ("lora-affinity-scorer", 3, True), ("inflight-load-scorer", 1, False), ("no-hit-lru-scorer", 0.5, False),
            ("prefill-backlog-scorer", 1.5, False), ("max-score-picker", 1, False)]
        b = cfg.plugin("prefill-backlog-scorer").params
        assert (b.tokens_per_second, b.min_hit, b.move_every, b.move_to_idle) == (20000.0, 0.5, 4.0, True)
        assert not cfg.warnings  # it runs after the prefix scorer it reads
        q = cfg.plugin("queue-scorer").params
        assert (q.min_spread, q.count_inflight) == (4.0, True)
        assert cfg.plugin("prefix-cache-scorer").params.max_blocks == 1024
        assert not cfg.load_guard.enabled and cfg.saturation.headroom_guard  # guard: see docs/benchmarks.md
        s = cfg.saturation
        assert (s.queue_threshold, s.kv_threshold, s.stale_after) == (5, 0.8, 0.2)
    assert load_config(DEFAULT_CONFIG_TEXT).plugins == load_config(None).plugins


def test_reference_preset_is_the_reference_default():
    cfg = preset_config("reference")
    assert entries(cfg) == [("queue-scorer", 2, False), ("kv-cache-utilization-scorer", 2, False),
                            ("prefix-cache-scorer", 3, False), ("max-score-picker", 1, False)]
    assert not cfg.load_guard.enabled and not cfg.saturation.headroom_guard
    assert entries(load_config(REFERENCE_CONFIG_TEXT)) == entries(cfg)
    assert "prefix-cache-scorer x3" in describe(cfg)


def test_preset_with_overrides():
    cfg = load_config(HEAD + """
preset: reference
saturationDetector:
  queueDepthThreshold: 8
  kvCacheUtilThreshold: 0.9
  metricsStalenessThreshold: 500ms
engineMetrics:
  vllm: {waiting: "vllm:num_requests_waiting"}
featureGates: [dataLayer]
""")
    assert cfg.preset == "reference"
    assert entries(cfg)[0] == ("queue-scorer", 2, False)
    s = cfg.saturation
    assert (s.queue_threshold, s.kv_threshold, s.stale_after, s.headroom_guard) == (8, 0.9, 0.5, False)
    assert not cfg.load_guard.enabled
    assert cfg.engine_metrics == {"vllm": {"waiting": "vllm:num_requests_waiting"}}
    assert cfg.feature_gates == ("dataLayer",)


def test_only_tunables_keeps_default_profile():
    cfg = load_config(HEAD + "saturationDetector: {metricsStalenessThreshold: 2}\n"
                      "loadGuard: {enabled: true, queueGap: 3}\n")
    assert cfg.preset == "default" and cfg.saturation.stale_after == 2.0
    assert cfg.load_guard.queue_gap == 3 and cfg.load_guard.enabled
    assert not load_config(HEAD + "loadGuard: {queueGap: 3}\n").load_guard.enabled  # the preset's value


def test_full_reference_style_config():
    cfg = load_config(HEAD + """
featureGates: []
plugins:
- type: single-profile-handler
- type: label-selector-filter
  name: decode-only
  parameters: {matchLabels: {role: decode}}
- type: saturation-filter
- type: queue-scorer
- type: prefix-cache-scorer
  parameters:
    autoTune: false
    blockSizeTokens: 32
    maxPrefixBlocksToMatch: 128
    lruCapacityPerServer: 1000
    mode: rendezvous
- type: session-affinity-scorer
- type: weighted-random-picker
  parameters: {maxNumOfEndpoints: 3}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-only
  - pluginRef: saturation-filter
  - pluginRef: queue-scorer
    weight: 1.5
  - pluginRef: prefix-cache-scorer
  - pluginRef: session-affinity-scorer
    weight: 0
  - pluginRef: weighted-random-picker
""")
    assert cfg.preset == "custom"
    assert entries(cfg)[2:5] == [("queue-scorer", 1.5, False), ("prefix-cache-scorer", 1.0, False),
                                 ("session-affinity-scorer", 0.0, False)]
    p = cfg.plugin("prefix-cache-scorer").params
    assert (p.auto_tune, p.block_tokens, p.max_blocks, p.lru_capacity, p.mode) == (False, 32, 128, 1000, "rendezvous")
    sched = build_scheduler(cfg)
    assert [f.name for f in sched.filters] == ["decode-only", "saturation-filter"]
    assert sched.max_endpoints == 3


def test_profile_without_picker_gets_max_score():
    cfg = load_config(HEAD + """
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer}]}]
""")
    sched = build_scheduler(cfg)
    assert isinstance(sched.picker, MaxScorePicker) and sched.max_endpoints == 1


def test_engine_metrics_pass_through_with_default_profile():
    cfg = load_config(HEAD + "engineMetrics:\n  sglang: {kv: 'sglang:token_usage'}\n")
    assert cfg.engine_metrics == {"sglang": {"kv": "sglang:token_usage"}}
    assert cfg.preset == "default"


def test_lora_gate_evaluated_per_request():
    calls = []

    def has_lora() -> bool:
        calls.append(1)
        return True

    sched = build_scheduler(load_config(None), has_lora=has_lora)
    eps = [ep(1, lora_max=2), ep(2, lora_max=2, lora_running={"a"})]
    assert sched.schedule(req(model="a"), eps).endpoints == [eps[1]]
    assert calls == [1]
    off = build_scheduler(load_config(None), has_lora=False)
    assert off.schedule(req(model="a"), eps).endpoints  # no LoRA scorer: still schedules


def test_build_admission_uses_thresholds():
    adm = build_admission(load_config(HEAD + "saturationDetector: {queueDepthThreshold: 100}\n"))
    assert adm.detector.queue_threshold == 100


BAD = [
    ("plugins: [", "not valid YAML at line"),
    ("- a\n- b\n", "the config must be a YAML mapping"),
    ("apiVersion: v1\nkind: EndpointPickerConfig\n", "apiVersion: must be"),
    ("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: Other\n", "kind: must be"),
    (HEAD + "bogus: 1\n", "bogus: unknown field"),
    (HEAD + "flowControl: []\n", "flowControl: expected a mapping"),
    (HEAD + "schedulingProfiles: [{name: a, plugins: [{pluginRef: x}]}]\n", "plugins: required"),
    (HEAD + "preset: reference\nplugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: "
     "[{pluginRef: queue-scorer}]}]\n", "preset: give either"),
    (HEAD + "preset: fast\n", "preset: must be one of"),
    (HEAD + "plugins: []\nschedulingProfiles: []\n", "plugins: expected a non-empty list"),
    (HEAD + "plugins: [{type: queue-scorer}, {type: nope-scorer}]\nschedulingProfiles: [{name: a, plugins: []}]\n",
     'plugins[1].type: unknown plugin type "nope-scorer"'),
    (HEAD + "plugins: [{type: queue-scorer, typo: 1}]\nschedulingProfiles: [{name: a, plugins: []}]\n",
     "plugins[0].typo: unknown field"),
    (HEAD + "plugins: [{name: x}]\nschedulingProfiles: [{name: a, plugins: []}]\n", "plugins[0].type: required"),
    (HEAD + "plugins: [{type: max-score-picker, parameters: {maxNumOfEndpoints: two}}]\n"
     "schedulingProfiles: [{name: a, plugins: []}]\n",
     "plugins[0].parameters.maxNumOfEndpoints: expected an integer"),
    (HEAD + "plugins: [{type: max-score-picker, parameters: {maxNumOfEndpoints: 0}}]\n"
     "schedulingProfiles: [{name: a, plugins: []}]\n", "plugins[0].parameters.maxNumOfEndpoints: must be at least 1"),
    (HEAD + "plugins: [{type: queue-scorer, parameters: {x: 1}}]\nschedulingProfiles: [{name: a, plugins: []}]\n",
     "plugins[0].parameters.x: unknown field"),
    (HEAD + "plugins: [{type: queue-scorer, parameters: 3}]\nschedulingProfiles: [{name: a, plugins: []}]\n",
     "plugins[0].parameters: expected a mapping"),
    (HEAD + "plugins: [{type: queue-scorer}, {type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: []}]\n",
     'plugins[1].name: duplicate plugin name "queue-scorer"'),
    (HEAD + "plugins: [{type: prefix-cache-scorer, parameters: {mode: magic}}]\n"
     "schedulingProfiles: [{name: a, plugins: []}]\n", "plugins[0].parameters.mode: must be one of"),
    (HEAD + "plugins: [{type: prefix-cache-scorer, parameters: {blockSize: 64, blockSizeTokens: 16}}]\n"
     "schedulingProfiles: [{name: a, plugins: []}]\n", "plugins[0].parameters.blockSize: give either"),
    (HEAD + "plugins: [{type: prefix-cache-scorer, parameters: {autoTune: 'yes'}}]\n"
     "schedulingProfiles: [{name: a, plugins: []}]\n", "plugins[0].parameters.autoTune: expected true or false"),
    (HEAD + "plugins: [{type: label-selector-filter}]\nschedulingProfiles: [{name: a, plugins: []}]\n",
     "plugins[0].parameters.matchLabels: required"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: []}]\n",
     "schedulingProfiles[0].plugins: expected a non-empty list"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{plugins: [{pluginRef: queue-scorer}]}]\n",
     "schedulingProfiles[0].name: required"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}, "
     "{pluginRef: foo}]}]\n", 'schedulingProfiles[0].plugins[1].pluginRef: no plugin named "foo"'),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}, "
     "{pluginRef: queue-scorer}]}]\n", "schedulingProfiles[0].plugins[1].pluginRef: plugin \"queue-scorer\" is listed"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, "
     "weight: -1}]}]\n", "schedulingProfiles[0].plugins[0].weight: must be a finite number"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, "
     "weight: heavy}]}]\n", "schedulingProfiles[0].plugins[0].weight: expected a number"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, "
     "weight: true}]}]\n", "schedulingProfiles[0].plugins[0].weight: expected a number"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, "
     "weight: .inf}]}]\n", "schedulingProfiles[0].plugins[0].weight: must be a finite number"),
    (HEAD + "plugins: [{type: random-picker}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: random-picker, "
     "weight: 2}]}]\n", "schedulingProfiles[0].plugins[0].weight: only scorers take a weight"),
    (HEAD + "plugins: [{type: random-picker}, {type: max-score-picker}]\nschedulingProfiles: [{name: a, plugins: "
     "[{pluginRef: random-picker}, {pluginRef: max-score-picker}]}]\n",
     "schedulingProfiles[0].plugins[1].pluginRef: profile already has a picker"),
    (HEAD + "plugins: [{type: single-profile-handler}]\nschedulingProfiles: [{name: a, plugins: "
     "[{pluginRef: single-profile-handler}]}]\n", "schedulingProfiles[0].plugins[0].pluginRef: single-profile-handler"),
    (HEAD + "plugins: [{type: random-picker}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: random-picker, "
     "enabledWhen: poolServesAdapters}]}]\n", "schedulingProfiles[0].plugins[0].enabledWhen: only applies to scorers"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, "
     "enabledWhen: always}]}]\n", "schedulingProfiles[0].plugins[0].enabledWhen: must be one of"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, "
     "extra: 1}]}]\n", "schedulingProfiles[0].plugins[0].extra: unknown field"),
    (HEAD + "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}, "
     "{name: b, plugins: [{pluginRef: queue-scorer}]}]\n",
     "schedulingProfiles: single-profile-handler runs exactly one profile"),
    (HEAD + "saturationDetector: {kvCacheUtilThreshold: 1.5}\n",
     "saturationDetector.kvCacheUtilThreshold: must be at most 1"),
    (HEAD + "saturationDetector: {queueDepthThreshold: 0}\n",
     "saturationDetector.queueDepthThreshold: must be greater"),
    (HEAD + "saturationDetector: {metricsStalenessThreshold: fast}\n",
     "saturationDetector.metricsStalenessThreshold: expected a duration"),
    (HEAD + "saturationDetector: {metricsStalenessThreshold: -1}\n",
     "saturationDetector.metricsStalenessThreshold: must be a positive duration"),
    (HEAD + "saturationDetector: {other: 1}\n", "saturationDetector.other: unknown field"),
    (HEAD + "saturationDetector: 5\n", "saturationDetector: expected a mapping"),
    (HEAD + "loadGuard: {inflightRatio: 0.5}\n", "loadGuard.inflightRatio: must be at least 1"),
    (HEAD + "loadGuard: {inflightGap: 2.5}\n", "loadGuard.inflightGap: expected an integer"),
    (HEAD + "featureGates: flowControl\n", "featureGates: expected a list"),
    (HEAD + "featureGates: [1]\n", "featureGates[0]: expected a non-empty string"),
    (HEAD + "engineMetrics: [1]\n", "engineMetrics: expected a mapping"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_configs_name_the_field(text, message):
    with pytest.raises(ConfigError) as e:
        load_config(text)
    assert str(e.value).startswith(message) or message in str(e.value), str(e.value)


def test_durations():
    for text, secs in (("200ms", 0.2), ("1.5s", 1.5), ("1m30s", 90.0), (3, 3.0), (0.25, 0.25)):
        cfg = load_config(HEAD + f"saturationDetector: {{metricsStalenessThreshold: {text}}}\n")
        assert cfg.saturation.stale_after == pytest.approx(secs)
