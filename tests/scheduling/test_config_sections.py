"""The reference's config sections: apiVersions, all problems at once, profile handlers,
saturationDetector forms, dataLayer, parser/requestHandler, flowControl, request-control plugins."""

from __future__ import annotations

import pytest

from epp.datalayer import DataLayerConfig
from epp.scheduling.config import (
    ConfigError,
    ConfigErrors,
    build_admission,
    build_scheduler,
    gate_enabled,
    load_config,
)
from epp.scheduling.registry import REQUEST_CONTROL, lookup, parse_quantity
from epp.scheduling.registry import ConfigError as RegistryConfigError
from epp.scheduling.saturation import ConcurrencyDetector, SaturationDetector

GIE = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
LLMD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def test_both_api_versions_and_missing_one():
    for head in (GIE, LLMD, "kind: EndpointPickerConfig\n"):
        cfg = load_config(head + "plugins: [{type: queue-scorer}]\n")
        assert [e.plugin for e in cfg.profile.entries] == ["queue-scorer", "max-score-picker"]
    assert load_config(LLMD + "saturationDetector: {queueDepthThreshold: 3}\n").api_version == "llm-d.ai/v1alpha1"
    with pytest.raises(ConfigError, match="apiVersion: must be 'inference.networking.x-k8s.io/v1alpha1' or "
                                          "'llm-d.ai/v1alpha1'"):
        load_config("apiVersion: v1\nkind: EndpointPickerConfig\n")


def test_every_problem_is_reported_with_its_path():
    with pytest.raises(ConfigErrors) as e:
        load_config(LLMD + """
plugins:
- type: queue-scorrer
- type: prefill-filter-x
- type: slo-headroom-tier-filter
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 0}
- type: kv-cache-utilization-scorer
  extra: 1
- type: random-picker
schedulingProfiles:
- name: a
  plugins: [{pluginRef: kv-cache-utilization-scorer, weight: -1}, {pluginRef: random-picker, weight: 2},
            {pluginRef: nowhere}]
saturationDetector: {kvCacheUtilThreshold: 2}
flowControl: {maxBytes: lots}
bogus: 1
""")
    lines = str(e.value).splitlines()
    assert lines == [
        "plugins[0].type: unknown plugin type \"queue-scorrer\"; did you mean 'queue-scorer'?",
        "plugins[1].type: unknown plugin type \"prefill-filter-x\"; did you mean 'prefill-filter'?",
        "plugins[2].type: plugin type \"slo-headroom-tier-filter\" is not yet supported (latency prediction and SLO "
        "routing)",
        "plugins[3].parameters.maxNumOfEndpoints: must be at least 1, got 0",
        "plugins[4].extra: unknown field",
        'schedulingProfiles[0].plugins[1].weight: only scorers take a weight; "random-picker" is a picker',
        'schedulingProfiles[0].plugins[2].pluginRef: no plugin named "nowhere"',
        "flowControl.maxBytes: expected a quantity like 100, 1k or 1Gi, got 'lots'",
        "saturationDetector.kvCacheUtilThreshold: must be at most 1, got 2",
        "bogus: unknown field",
    ]
    assert [err.field for err in e.value.errors][:2] == ["plugins[0].type", "plugins[1].type"]


def test_pending_types_are_never_called_unknown():
    from epp.scheduling.pending import PENDING

    for type_name, feature in PENDING.items():
        try:
            lookup(type_name, "p")
        except RegistryConfigError as e:
            assert f"not yet supported ({feature})" in str(e)
    with pytest.raises(RegistryConfigError, match=r"not yet supported \(DCGM GPU metrics\)"):
        lookup("dcgm-new-thing", "p")


def test_profiles_and_handler():
    cfg = load_config(LLMD + """
plugins: [{type: queue-scorer}, {type: single-profile-handler, name: h}]
schedulingProfiles: [{name: only, plugins: [{pluginRef: queue-scorer}]}]
""")
    assert cfg.handler == "h" and [p.name for p in cfg.profiles] == ["only"] and cfg.profile.name == "only"
    assert load_config(LLMD + "plugins: [{type: queue-scorer}]\n").handler == "single-profile-handler"


def test_profile_without_picker_takes_the_declared_picker():
    cfg = load_config(GIE + """
plugins: [{type: queue-scorer}, {type: random-picker, parameters: {maxNumOfEndpoints: 2}}]
schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer}]}]
""")
    assert cfg.profile.entries[-1].plugin == "random-picker"
    assert build_scheduler(cfg).max_endpoints == 2


def test_saturation_detector_forms():
    ref = load_config(GIE + "plugins: [{type: queue-scorer}, {type: utilization-detector, parameters: "
                      "{queueDepthThreshold: 7, headroom: 0.5}}]\n"
                      "saturationDetector: {pluginRef: utilization-detector}\n")
    assert ref.saturation.queue_threshold == 7 and ref.saturation.headroom == 0.5
    assert isinstance(build_admission(ref).detector, SaturationDetector)
    conc = load_config(GIE + "plugins: [{type: queue-scorer}, {type: concurrency-detector, parameters: "
                       "{concurrencyMode: tokens, maxTokenConcurrency: 500}}]\n"
                       "saturationDetector: {pluginRef: concurrency-detector}\n")
    det = build_admission(conc).detector
    assert isinstance(det, ConcurrencyDetector) and det.mode == "tokens" and det.max_token_concurrency == 500
    implicit = load_config(GIE + "saturationDetector: {pluginRef: concurrency-detector}\n")
    assert implicit.detector_plugin == "concurrency-detector"  # the reference's default-created plugin
    with pytest.raises(ConfigError, match="saturationDetector.queueDepthThreshold: give either pluginRef or"):
        load_config(GIE + "saturationDetector: {pluginRef: utilization-detector, queueDepthThreshold: 3}\n")
    with pytest.raises(ConfigError, match="flowControl.saturationDetector.pluginRef: names"):
        load_config(GIE + "saturationDetector: {pluginRef: utilization-detector}\n"
                    "flowControl: {saturationDetector: {pluginRef: concurrency-detector}}\n")


def test_saturation_detector_in_a_profile_is_a_filter():
    cfg = load_config(LLMD + """
plugins: [{type: concurrency-detector, parameters: {maxConcurrency: 2}}, {type: queue-scorer}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: concurrency-detector}, {pluginRef: queue-scorer}]}]
""")
    sched = build_scheduler(cfg)
    assert [f.name for f in sched.filters] == ["concurrency-detector"]


def test_data_layer_section():
    cfg = load_config(LLMD + """
plugins:
- type: queue-scorer
- name: m
  type: metrics-data-source
  parameters: {scheme: https, path: /stats, port: 9090, insecureSkipVerify: false, interval: 2s}
- name: x
  type: core-metrics-extractor
  parameters:
    engineLabelKey: my/engine
    defaultEngine: sglang
    engineConfigs:
    - name: my-engine
      queuedRequestsSpec: 'q_size{status="waiting"}'
      runningRequestsSpec: run
      kvUsageSpec: kv
      cacheInfoSpec: 'info'
      cacheBlockSizeLabelName: page
      customMetrics: [{attributeKey: custom.depth, metricSpec: depth}]
- type: endpoint-notification-source
dataLayer:
  sources:
  - pluginRef: m
    extractors: [{pluginRef: x}]
  - pluginRef: endpoint-notification-source
""")
    dl = cfg.data_layer
    assert (dl.scheme, dl.path, dl.port, dl.insecure_skip_verify, dl.interval) == ("https", "/stats", 9090, False, 2.0)
    assert (dl.engine_label_key, dl.default_engine, dl.endpoint_notifications) == ("my/engine", "sglang", True)
    assert dl.sources == (("m", ("x",)), ("endpoint-notification-source", ()))
    assert cfg.engine_metrics == {"my-engine": {
        "waiting": {"name": "q_size", "labels": {"status": "waiting"}}, "running": "run", "kvUsage": "kv",
        "blockSize": {"name": "info", "label": "page"}, "numBlocks": {"name": "info", "label": "num_gpu_blocks"}}}
    assert dl.custom_metrics == {"my-engine": (("custom.depth", "depth"),)}
    from epp.metrics.engines import apply_overrides

    specs = apply_overrides(cfg.engine_metrics)
    assert specs["my-engine"].waiting[0].name == "q_size"
    assert load_config(LLMD + "plugins: [{type: queue-scorer}]\n").data_layer == DataLayerConfig()


def test_data_layer_refusals():
    with pytest.raises(ConfigError, match=r"dataLayer.discovery: not yet supported \(endpoint discovery plugins\)"):
        load_config(LLMD + "dataLayer: {discovery: {pluginRef: file-discovery}}\n")
    with pytest.raises(ConfigError, match=r'dataLayer.sources\[0\].pluginRef: "queue-scorer" is a scorer plugin'):
        load_config(LLMD + "plugins: [{type: queue-scorer}]\ndataLayer: {sources: [{pluginRef: queue-scorer}]}\n")
    with pytest.raises(ConfigError, match="clientCertPath and clientKeyPath go together"):
        load_config(LLMD + "plugins: [{type: metrics-data-source, parameters: {clientCertPath: /c}}]\n")
    cfg = load_config(LLMD + "plugins: [{type: queue-scorer}, {type: endpoint-notification-source}]\n"
                      "dataLayer: {injectDefaults: false, sources: [{pluginRef: endpoint-notification-source}]}\n")
    assert not cfg.data_layer.metrics_enabled and any("no metrics-data-source" in w for w in cfg.warnings)


def test_engine_metrics_section_wins_over_extractor():
    cfg = load_config(LLMD + """
plugins:
- type: core-metrics-extractor
  parameters: {engineConfigs: [{name: vllm, queuedRequestsSpec: a, runningRequestsSpec: b}]}
engineMetrics: {vllm: {waiting: ours}}
""")
    assert cfg.engine_metrics == {"vllm": {"waiting": "ours", "running": "b"}}


def test_parser_sections():
    gie = load_config(GIE + "plugins: [{type: queue-scorer}, {type: passthrough-parser, name: pt}]\n"
                      "parser: {pluginRef: pt}\n")
    assert gie.parser is not None and (gie.parser.name, gie.parser.type) == ("pt", "passthrough-parser")
    llmd = load_config(LLMD + "plugins: [{type: queue-scorer}]\n"
                       "requestHandler: {parsers: [{pluginRef: openai-parser}]}\n")
    assert [p.type for p in llmd.parsers] == ["openai-parser"]  # undeclared: the type with defaults
    assert load_config(LLMD + "plugins: [{type: queue-scorer}]\n").parser is None
    with pytest.raises(ConfigError, match="requestHandler: give parser or requestHandler.parsers, not both"):
        load_config(LLMD + "parser: {pluginRef: openai-parser}\n"
                    "requestHandler: {parsers: [{pluginRef: openai-parser}]}\n")


def test_request_control_plugins_are_exposed():
    cfg = load_config(GIE + "plugins: [{type: header-based-testing-filter}, "
                      "{type: destination-endpoint-served-verifier}]\n"
                      "schedulingProfiles: [{name: c, plugins: [{pluginRef: header-based-testing-filter}]}]\n")
    assert [(p.name, p.kind) for p in cfg.request_control] == [("destination-endpoint-served-verifier",
                                                                REQUEST_CONTROL)]


def test_flow_control_values():
    cfg = load_config(LLMD + """
plugins: [{type: queue-scorer}, {type: concurrency-detector}]
flowControl:
  maxBytes: 1Gi
  maxRequests: 2k
  defaultRequestTTL: 4s
  defaultPriorityBand: {maxRequests: 10, fairnessPolicyRef: round-robin-fairness-policy}
  defaultNegativePriorityBand: {maxBytes: 1M}
  priorityBands:
  - {priority: -5}
  - {priority: 10, maxBytes: 500Mi, orderingPolicyRef: edf-ordering-policy}
  usageLimitPolicyPluginRef: ""
  saturationDetector: {pluginRef: concurrency-detector}
  enableEviction: true
""")
    fc = cfg.flow_control
    assert fc is not None
    assert (fc.max_bytes, fc.max_requests, fc.default_request_ttl) == (2**30, 2000, 4.0)
    assert fc.default_band is not None and fc.default_band.fairness_policy == "round-robin-fairness-policy"
    assert fc.default_negative_band is not None and fc.default_negative_band.max_bytes == 10**6
    assert [(b.priority, b.max_bytes) for b in fc.bands] == [(10, 500 * 2**20), (-5, None)]
    assert fc.enable_eviction and fc.saturation_detector == "concurrency-detector"
    assert cfg.detector_plugin == "concurrency-detector"
    assert any("featureGates does not name flowControl" in w for w in cfg.warnings)
    assert any("enableEviction" in w for w in cfg.warnings)
    for bad, msg in (("priorityBands: [{maxBytes: 1}]", r"priorityBands\[0\].priority: required"),
                     ("priorityBands: [{priority: 1}, {priority: 1}]", "priority 1 is given twice"),
                     ("defaultRequestTTL: soon", "defaultRequestTTL: expected a duration"),
                     ("priorityBands: [{priority: 1, orderingPolicyRef: lifo}]", 'no plugin named "lifo"'),
                     ("enableEviction: maybe", "enableEviction: expected true or false"),
                     ("queueing: on", "flowControl.queueing: unknown field")):
        with pytest.raises(ConfigError, match=msg):
            load_config(LLMD + "flowControl: {" + bad + "}\n")


def test_quantities_and_gates():
    assert [parse_quantity(v, "q") for v in (100, "1k", "1Ki", "1.5M", "2Gi", "0", "500m")] == \
        [100, 1000, 1024, 1_500_000, 2 * 2**30, 0, 1]
    for bad in ("-1", "1 GB", True, "lots"):
        with pytest.raises(RegistryConfigError):
            parse_quantity(bad, "q")
    assert gate_enabled(["flowControl"], "flowControl") and not gate_enabled(["flowControl=false"], "flowControl")
    assert gate_enabled(["a=false", "a=true"], "a") and not gate_enabled([], "a")


def test_non_scheduling_plugin_in_profile_is_ignored_with_a_warning():
    cfg = load_config(GIE + "plugins: [{type: queue-scorer}, {type: destination-endpoint-served-verifier}]\n"
                      "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer}, "
                      "{pluginRef: destination-endpoint-served-verifier}]}]\n")
    assert [e.plugin for e in cfg.profile.entries] == ["queue-scorer", "max-score-picker"]
    assert any("request-control plugin" in w for w in cfg.warnings)


def test_warnings_for_plugins_that_would_read_nothing():
    cfg = load_config(LLMD + "plugins: [{type: no-hit-lru-scorer}, {type: prefix-cache-scorer}]\n"
                      "schedulingProfiles: [{name: d, plugins: [{pluginRef: no-hit-lru-scorer}, "
                      "{pluginRef: prefix-cache-scorer}]}]\n")
    assert any("every request will look cold" in w for w in cfg.warnings)
    ok = load_config(LLMD + "plugins: [{type: prefix-cache-scorer}, {type: no-hit-lru-scorer}]\n")
    assert not ok.warnings
    lone = load_config(LLMD + "plugins: [{type: prefix-cache-affinity-filter}, {type: queue-scorer}]\n")
    assert any("no index to read" in w for w in lone.warnings)
