"""From config text to a controller: the gate, bounds and TTL, bands and declared policies, detectors."""

from __future__ import annotations

import math

from epp.flowcontrol import build
from epp.flowcontrol.controller import FlowController
from epp.scheduling.config import load_config
from epp.scheduling.saturation import ConcurrencyDetector, SaturationDetector

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def test_gate_off_builds_nothing_and_warns_when_the_section_is_given():
    cfg = load_config(HEAD + "flowControl: {maxRequests: 10}\n")
    assert build.build(cfg, list) is None
    assert any("featureGates does not name flowControl" in w for w in cfg.warnings)
    assert build.build(load_config(HEAD + "featureGates: [flowControl=false]\n"), list) is None


def test_gate_on_defaults_utilization_detector_60s_ttl():
    cfg = load_config(HEAD + "featureGates: [flowControl]\n")
    fc = build.build(cfg, list)
    assert isinstance(fc, FlowController) and isinstance(fc.detector, SaturationDetector)
    assert (fc.detector.queue_threshold, fc.detector.kv_threshold) == (5, 0.8)
    s = fc.settings
    assert s.default_ttl == 60 and s.max_requests is None and s.max_bytes is None
    assert s.default_band.max_requests == 5000 and s.default_band.max_bytes == 1_000_000_000
    assert s.detector_name == "utilization-detector" and not cfg.warnings


def test_section_values_and_declared_policies():
    cfg = load_config(HEAD + """
plugins:
- {name: rr, type: round-robin-fairness-policy}
- {name: deadline, type: edf-ordering-policy}
featureGates: [flowControl]
flowControl:
  maxRequests: 1k
  maxBytes: 1Gi
  defaultRequestTTL: 4s
  defaultPriorityBand: {maxRequests: 10, fairnessPolicyRef: rr}
  defaultNegativePriorityBand: {maxRequests: 3}
  priorityBands:
  - {priority: 100, maxBytes: 500Mi, orderingPolicyRef: deadline}
""")
    fc = build.build(cfg, list)
    assert fc is not None
    s = fc.settings
    assert (s.max_requests, s.max_bytes, s.default_ttl) == (1000, 2**30, 4.0)
    b100 = s.band_for(100)
    assert (b100.max_bytes, b100.max_requests, b100.ordering, b100.fairness) == (
        500 * 2**20, 5000, "deadline", "global-strict-fairness-policy")
    assert s.band_for(0).max_requests == 10 and s.band_for(7).fairness == "rr"
    assert s.band_for(-5).max_requests == 3
    assert fc._band(7).fairness.name == "rr" and fc._band(100).ordering.name == "deadline"
    assert math.isfinite(fc._ttl(None))


def test_concurrency_detector_and_staleness_policy():
    cfg = load_config(HEAD + """
plugins:
- {name: cd, type: concurrency-detector, parameters: {maxConcurrency: 7}}
featureGates: [flowControl]
flowControl:
  saturationDetector: {pluginRef: cd}
""")
    fc = build.build(cfg, list)
    assert fc is not None and isinstance(fc.detector, ConcurrencyDetector) and fc.detector.max_concurrency == 7
    assert fc.settings.detector_name == "cd"
    ign = load_config(HEAD + "featureGates: [flowControl]\nsaturationDetector: {stalenessPolicy: ignore}\n")
    fc2 = build.build(ign, list)
    assert fc2 is not None and fc2.settings.staleness_policy == "ignore"
