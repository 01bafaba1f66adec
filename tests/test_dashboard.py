"""The Grafana dashboard only queries metrics the picker really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from epp.telemetry import Telemetry

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "epp-dashboard.json"


def test_dashboard_queries_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exported = set()
    for metric in Telemetry().registry.collect():
        exported.update(s.name for s in metric.samples)
        exported.add(metric.name)
    names = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            names.update(n for n in re.findall(r"\b(inference_[a-z_]+)\b", t["expr"]))
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
