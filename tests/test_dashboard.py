"""The Grafana dashboard only queries metrics the picker really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from epp.flowcontrol.metrics import FlowControlMetrics
from epp.telemetry import Telemetry

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "epp-dashboard.json"


def test_dashboard_queries_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exported = set()
    telemetry = Telemetry()
    FlowControlMetrics(telemetry.registry)  # registered on the same registry when flow control is on
    for metric in telemetry.registry.collect():
        exported.update(s.name for s in metric.samples)
        exported.add(metric.name)
    names = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            expr = re.sub(r"\bby \([^)]*\)", "", t["expr"])  # label names (inference_pool) are not metrics
            names.update(n for n in re.findall(r"\b((?:inference|llm_d_epp)_[a-z_]+)\b", expr))
    assert names, "no queries found"
    # histogram series exist only after an observation: accept _bucket/_sum/_count of a known family
    missing = {n for n in names if n not in exported and re.sub(r"_(bucket|sum|count|total)$", "", n) not in exported}
    assert not missing, missing


def test_dashboard_charts_the_reference_latency_families():
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"])
    for name in ("inference_objective_request_ttft_seconds_bucket", "inference_objective_request_tpot_seconds_bucket",
                 "inference_objective_prompt_cached_tokens_sum", "inference_objective_request_slo_violation_total",
                 "sum by (priority)", "sum by (pod_name)"):
        assert name in exprs, name


def test_dashboard_charts_flow_control():
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"])
    for name in ("flow_control_queue_size", "flow_control_queue_bytes", "flow_control_request_queue_duration_seconds",
                 "flow_control_dispatch_cycle_duration_seconds", "flow_control_pool_saturation",
                 "flow_control_stale_endpoints"):
        assert name in exprs, name
