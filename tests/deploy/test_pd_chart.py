"""The inferencepool chart's `pd` option: the P/D picker config, prefill and decode model servers
labelled `llm-d.ai/role`, the decode pods' sidecar with flags the sidecar accepts, and the Role its
SSRF allow-list needs."""

from __future__ import annotations

import random
from typing import Any

import kubernetes_validate
import pytest

from epp.scheduling.config import build_scheduler, load_config
from epp.scheduling.disagg import DisaggScheduler
from epp.sidecar.options import parse_options
from tests.deploy.charts import expand_rules, lint, render, restricted_violations

ENGINE = {"image": "vllm/vllm-openai:v0.11.0", "args": ["--model", "meta-llama/Llama-3.1-8B-Instruct"]}
VALUES: dict[str, Any] = {
    "inferencePool": {"modelServers": {"matchLabels": {"app": "llama"}}},
    "pd": {"enabled": True, "nonCachedTokens": 512,
           "prefill": {"replicas": 2, "engine": ENGINE},
           "decode": {"replicas": 3, "engine": {**ENGINE, "args": [*ENGINE["args"], "--port", "8200"]}}},
}
K8S = kubernetes_validate.latest_version() + ".0"


def test_lint_clean_and_every_object_validates():
    assert lint("inferencepool", VALUES) == []
    out = render("inferencepool", VALUES)
    for obj in out.objects:
        if obj["kind"] != "InferencePool":
            kubernetes_validate.validate(obj, K8S, strict=True)


def test_decode_pods_get_the_sidecar_on_the_target_port():
    out = render("inferencepool", VALUES)
    decode = out.get("Deployment", "llama-decode")
    labels = decode["spec"]["template"]["metadata"]["labels"]
    assert labels == {"app": "llama", "llm-d.ai/role": "decode"} and decode["spec"]["replicas"] == 3
    pod = decode["spec"]["template"]["spec"]
    engine, sidecar = pod["containers"]
    assert engine["name"] == "engine" and engine["image"] == ENGINE["image"]
    assert sidecar["command"] == ["python", "-m", "epp", "sidecar"]
    assert sidecar["ports"] == [{"name": "http", "containerPort": 8000}]  # the pool's target port
    opts = parse_options(sidecar["args"], env={})  # the flags the chart writes, as the sidecar reads them
    assert (opts.port, opts.model_server_port, opts.secure_proxy) == (8000, 8200, False)
    assert opts.enable_ssrf_protection and opts.pool_namespace_name == ("ml", "llama")
    assert opts.pool_group == "inference.networking.k8s.io"
    assert restricted_violations({"containers": [sidecar], "volumes": pod["volumes"]}) == []
    prefill = out.get("Deployment", "llama-prefill")
    assert prefill["spec"]["template"]["metadata"]["labels"] == {"app": "llama", "llm-d.ai/role": "prefill"}
    assert [c["name"] for c in prefill["spec"]["template"]["spec"]["containers"]] == ["engine"]


def test_the_sidecars_role_grants_what_the_allow_list_calls():
    out = render("inferencepool", VALUES)
    role = out.get("Role", "llama-pd-decode")
    assert expand_rules(role["rules"]) == {("inference.networking.k8s.io", "inferencepools", "get"),
                                           ("", "pods", "list")}
    binding = out.get("RoleBinding", "llama-pd-decode")
    assert binding["subjects"][0]["name"] == "llama-pd-decode"
    assert out.get("Deployment", "llama-decode")["spec"]["template"]["spec"]["serviceAccountName"] == \
        "llama-pd-decode"


def test_the_picker_config_is_llmds_pd_profile():
    out = render("inferencepool", VALUES)
    text = out.get("ConfigMap", "llama-epp-config")["data"]["default-plugins.yaml"]
    cfg = load_config(text)
    assert cfg.handler == "disagg-profile-handler" and [p.name for p in cfg.profiles] == ["prefill", "decode"]
    assert cfg.plugin("prefix-based-pd-decider").params.non_cached_tokens == 512
    assert isinstance(build_scheduler(cfg, rng=random.Random(0)), DisaggScheduler)


def test_options_off_and_required_engine():
    plain = render("inferencepool", {"inferencePool": VALUES["inferencePool"]})
    assert [d["metadata"]["name"] for d in plain.all("Deployment")] == ["llama-epp"]
    no_sidecar = render("inferencepool", {**VALUES, "pd": {**VALUES["pd"], "sidecar": {"enabled": False},
                                                           "prefill": {"replicas": 0}}})
    assert [d["metadata"]["name"] for d in no_sidecar.all("Deployment")] == ["llama-epp", "llama-decode"]
    assert not no_sidecar.all("Role") or all(r["metadata"]["name"] != "llama-pd-decode" for r in no_sidecar.all("Role"))
    with pytest.raises(Exception, match=r"pd\.prefill\.engine\.image is required"):
        render("inferencepool", {**VALUES, "pd": {**VALUES["pd"], "prefill": {"replicas": 1}}})
