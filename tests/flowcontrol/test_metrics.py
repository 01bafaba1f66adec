"""The flow-control families: names, labels, values, the llm-d copies, bounded fairness ids."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from epp.datastore import Endpoint, Metrics
from epp.flowcontrol.controller import FlowController, FlowSettings
from epp.flowcontrol.metrics import FlowControlMetrics
from epp.flowcontrol.types import FlowKey
from epp.scheduling.saturation import SaturationDetector


def _value(reg: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float | None:
    return reg.get_sample_value(name, labels or {})


def test_families_and_values_under_both_names():
    reg = CollectorRegistry()
    now = [50.0]
    pool = [Endpoint(address="10.0.0.1:8000", ip="10.0.0.1", port=8000, pod="p",
                     metrics=Metrics(waiting=9, kv_usage=0.1, updated=50.0)),
            Endpoint(address="10.0.0.2:8000", ip="10.0.0.2", port=8000, pod="q")]  # no metrics: stale
    m = FlowControlMetrics(reg, "pool", detector="utilization-detector", max_fairness_ids=2)
    fc = FlowController(FlowSettings(), SaturationDetector(), lambda: pool, clock=lambda: now[0], metrics=m)
    m.watch(fc)
    for i, tenant in enumerate(("a", "b", "c", "a")):
        fc.submit(FlowKey(5, tenant), 100, None, model="m", target_model="t", request_id=str(i))
    base = {"priority": "5", "inference_pool": "pool", "model_name": "m", "target_model_name": "t"}
    assert _value(reg, "inference_extension_flow_control_queue_size", {**base, "fairness_id": "a"}) == 2
    assert _value(reg, "inference_extension_flow_control_queue_size", {**base, "fairness_id": "other"}) == 1
    assert _value(reg, "llm_d_epp_flow_control_queue_bytes", {**base, "fairness_id": "a"}) == 200
    assert _value(reg, "inference_extension_flow_control_pool_saturation", {"inference_pool": "pool"}) == 1.4
    assert _value(reg, "llm_d_epp_flow_control_pool_saturation", {"inference_pool": "pool"}) == 1.4
    assert _value(reg, "llm_d_epp_flow_control_stale_endpoints", {"detector": "utilization-detector"}) == 1
    now[0] += 61
    fc.expire()
    assert _value(reg, "inference_extension_flow_control_queue_size", {**base, "fairness_id": "a"}) == 0
    hist = {**base, "fairness_id": "a", "outcome": "EvictedTTL"}
    assert _value(reg, "inference_extension_flow_control_request_queue_duration_seconds_count", hist) == 2
    assert _value(reg, "llm_d_epp_flow_control_requests_total",
                  {"outcome": "EvictedTTL", "priority": "5", "inference_pool": "pool"}) == 4
    assert (_value(reg, "inference_extension_flow_control_dispatch_cycle_duration_seconds_count") or 0) >= 1
