"""deploy/charts: every values file of tests/deploy/values renders, lints, validates and is wired as the
reference chart wires it; pod security; and the picker starts with exactly the args each render gives."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp import envoyconf, resources
from tests.deploy.charts import (
    CHARTS,
    Rendered,
    container,
    expand_rules,
    expected_calls,
    flag,
    lint,
    load_values,
    local_args,
    local_env,
    render,
    restricted_violations,
    value_cases,
)
from tests.deploy.crdschema import Validator
from tests.deploy.envoy_run import envoy_binary, validate
from tests.procs import free_port, free_ports

CRDS = Validator()
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version() + ".0")
# Custom resources of other projects the charts may emit (no schema here: checked by shape below).
EXTERNAL_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("networking.gke.io/v1", "HealthCheckPolicy"),
    ("networking.gke.io/v1", "GCPBackendPolicy"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
    ("cert-manager.io/v1", "Certificate"),
}
CASES = value_cases()
POOL_CASES = sorted(case for chart, case in CASES if chart == "inferencepool")
STANDALONE_CASES = sorted(case for chart, case in CASES if chart == "standalone")
# The reference chart's fixed head of the picker's args (GIE v1.5.0 epplib _deployment.yaml).
METRIC_FLAGS = {
    "vllm": [],
    "sglang": ["--total-queued-requests-metric=sglang:num_queue_reqs",
               "--total-running-requests-metric=sglang:num_running_reqs",
               "--kv-cache-usage-percentage-metric=sglang:token_usage"],
    "triton-tensorrt-llm": ["--total-queued-requests-metric", "nv_trt_llm_request_metrics{request_type=waiting}",
                            "--total-running-requests-metric", "nv_trt_llm_request_metrics{request_type=scheduled}",
                            "--kv-cache-usage-percentage-metric",
                            "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
                            "--lora-info-metric", ""],
    "trtllm-serve": ["--total-queued-requests-metric=trtllm_num_requests_waiting",
                     "--total-running-requests-metric=trtllm_num_requests_running",
                     "--kv-cache-usage-percentage-metric=trtllm_kv_cache_utilization",
                     "--model-server-metrics-path=/prometheus/metrics",
                     "--lora-info-metric", ""],
}  # fmt: skip


def _get(values: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], Rendered]:
    return {(chart, case): render(chart, load_values(chart, case)) for chart, case in CASES}


@pytest.mark.parametrize(("chart", "case"), CASES)
def test_lint_clean(chart: str, case: str) -> None:
    assert lint(chart, load_values(chart, case)) == []


@pytest.mark.parametrize(("chart", "case"), CASES)
def test_every_object_validates(chart: str, case: str, rendered: dict[tuple[str, str], Rendered]) -> None:
    out = rendered[(chart, case)]
    assert out.objects
    for obj in out.objects:
        key = (obj["apiVersion"], obj["kind"])
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        cluster_scoped = obj["kind"] in ("ClusterRole", "ClusterRoleBinding")
        assert obj["metadata"].get("namespace") == (None if cluster_scoped else "ml"), where
        if CRDS.knows(obj):
            assert CRDS.errors(obj) == [], where
            resources.parse_object(CRDS.defaulted(obj))  # and the picker can read it
        elif key in EXTERNAL_KINDS:
            assert isinstance(obj.get("spec"), dict), where
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize(("chart", "case"), CASES)
def test_pods_meet_the_restricted_pod_security_standard(
    chart: str, case: str, rendered: dict[tuple[str, str], Rendered]
) -> None:
    out = rendered[(chart, case)]
    pod = out.get("Deployment")["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    epp = container(out)
    tmp = next(m for m in epp["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume  # the one writable place besides mounted volumes


def test_restricted_check_finds_violations() -> None:
    pod = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}},
                           "ports": [{"containerPort": 80, "hostPort": 80}]}]}  # fmt: skip
    found = restricted_violations(pod)
    for needle in (
        "hostNetwork",
        "volume h",
        "privileged",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccompProfile",
        "dropping ALL",
        "adds capabilities",
        "hostPort",
        "writable",
    ):
        assert any(needle in f for f in found), needle


def test_bad_values_are_refused() -> None:
    pool = {"inferencePool": {"modelServers": {"matchLabels": {"app": "x"}}}}
    with pytest.raises(Exception, match="modelServers.matchLabels is required"):
        render("inferencepool", {})
    with pytest.raises(Exception, match="modelServerType"):
        render("inferencepool", {"inferencePool": {**pool["inferencePool"], "modelServerType": "ollama"}})
    with pytest.raises(Exception, match="apiVersion"):
        render(
            "inferencepool",
            {"inferencePool": {**pool["inferencePool"], "apiVersion": "inference.networking.k8s.io/v2"}},
        )
    with pytest.raises(Exception, match="targetPorts"):
        render("inferencepool", {"inferencePool": {**pool["inferencePool"], "targetPorts": []}})
    with pytest.raises(Exception, match="unknownKey|additional"):
        render("inferencepool", {**pool, "inferenceExtension": {"unknownKey": 1}})
    with pytest.raises(Exception, match="provider"):
        render("inferencepool", {**pool, "provider": {"name": "aws"}})
    with pytest.raises(Exception, match="gatewayPeers"):
        render("inferencepool", {**pool, "inferenceExtension": {"networkPolicy": {"enabled": True}}})
    with pytest.raises(Exception, match="issuerRef.name"):
        render("inferencepool", {**pool, "inferenceExtension": {"tls": {"certManager": {"enabled": True}}}})
    with pytest.raises(Exception, match="profile"):
        render("standalone", {**pool, "envoy": {"profile": "fast"}})
    with pytest.raises(Exception, match="modelServers.matchLabels is required"):
        render("standalone", {})
    with pytest.raises(Exception, match="endpointSelector"):
        render("standalone", {"inferenceExtension": {"endpointsServer": {"createInferencePool": False}}})
    with pytest.raises(Exception, match="9002"):
        render("standalone", {**pool, "inferenceExtension": {"extProcPort": 9100}})


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_workers_value(chart: str) -> None:
    pool = {"inferencePool": {"modelServers": {"matchLabels": {"app": "x"}}}}

    def workers(ext: dict[str, Any]) -> str | None:
        return flag(container(render(chart, {**pool, "inferenceExtension": ext}))["args"], "--workers")

    assert workers({}) is None  # the picker's default: the container's CPU limit (epp.cpus)
    assert workers({"workers": 1}) == "1"  # given, always passed: 1 is no longer the picker's default
    assert workers({"workers": 3}) == "3"
    assert workers({"workers": "auto"}) == "auto"
    assert workers({"workers": 2, "replicas": 2, "haMode": "active-active"}) == "2"
    assert workers({"workers": 1, "replicas": 2}) == "1"
    assert workers({"replicas": 2}) is None  # leader election: the picker's default is then 1
    with pytest.raises(Exception, match="workers above 1"):
        render(chart, {**pool, "inferenceExtension": {"workers": 2, "replicas": 2}})
    with pytest.raises(Exception, match="workers"):
        render(chart, {**pool, "inferenceExtension": {"workers": "many"}})


# ---- the inferencepool chart ---------------------------------------------------------------------


@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_chart_wiring(case: str, rendered: dict[tuple[str, str], Rendered]) -> None:
    values = load_values("inferencepool", case)
    out = rendered[("inferencepool", case)]
    pool_obj = out.get("InferencePool")
    pool = resources.parse_object(CRDS.defaulted(pool_obj))
    assert isinstance(pool, resources.InferencePool)
    name = _get(values, "inferencePool.name") or "llama"
    assert pool.meta.name == name
    assert dict(pool.selector) == _get(values, "inferencePool.modelServers.matchLabels")
    ports = [p["number"] for p in _get(values, "inferencePool.targetPorts", [{"number": 8000}])]
    assert list(pool.target_ports) == (ports if pool.meta.group == resources.GROUP_V1 else ports[:1])
    failure_mode = _get(values, "inferencePool.failureMode") or _get(
        values, "inferenceExtension.failureMode", "FailOpen"
    )
    assert pool.picker is not None and pool.picker.failure_mode == failure_mode
    if pool.meta.group == resources.GROUP_V1:
        grpc_servers = _get(values, "inferencePool.modelServerProtocol") == "grpc"
        assert pool_obj["spec"]["appProtocol"] == ("kubernetes.io/h2c" if grpc_servers else "http")

    # the pool's picker reference names the chart's Service and its ext_proc port
    svc = out.get("Service")
    assert svc["metadata"]["name"] == pool.picker.name == f"{name}-epp"
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    extra = {p["name"]: p["port"] for p in _get(values, "inferenceExtension.extraServicePorts", [])}
    assert svc_ports == {"grpc-ext-proc": 9002, "http-metrics": 9090, **extra}
    assert pool.picker.port == svc_ports["grpc-ext-proc"]
    deploy = out.get("Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    c = container(out)
    args = c["args"]
    assert c["command"] == ["python", "-m", "epp"]
    # the reference's args, in its order, then this chart's port flags
    server_type = _get(values, "inferencePool.modelServerType", "vllm")
    head = ["--pool-name", name, "--pool-namespace", "ml", "--pool-group", pool.meta.group,
            *METRIC_FLAGS[server_type], "--zap-encoder", "json", "--config-file"]  # fmt: skip
    assert args[: len(head)] == head
    replicas = _get(values, "inferenceExtension.replicas", 1)
    leader = replicas > 1 or _get(values, "inferenceExtension.enableLeaderElection", False)
    assert deploy["spec"]["replicas"] == replicas
    assert ("--ha-enable-leader-election" in args) == leader
    assert (deploy["spec"].get("strategy", {}).get("type") == "Recreate") == leader
    assert flag(args, "--tracing") == ("true" if _get(values, "inferenceExtension.tracing.enabled") else "false")
    auth = _get(values, "inferenceExtension.monitoring.prometheus.auth.enabled", True)
    assert flag(args, "--metrics-endpoint-auth") == (None if auth else "false")
    assert (flag(args, "--grpc-port"), flag(args, "--grpc-health-port"), flag(args, "--metrics-port")) == (
        "9002", "9003", "9090")  # fmt: skip
    assert ("--secure-serving=false" in args) == (_get(values, "inferenceExtension.secureServing") is False)
    flags = _get(values, "inferenceExtension.flags", {"v": 1})
    if isinstance(flags, dict):
        for k, v in {"v": 1, **flags}.items():
            assert f"--{k}={str(v).lower() if isinstance(v, bool) else v}" in args
    else:
        for f in flags:
            assert f"--{f['name']}={f['value']}" in args
    probe = "readiness" if leader else "inference-extension"
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness" if leader else "inference-extension"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": probe}
    extra_ports = {p["name"]: p["containerPort"] for p in _get(values, "inferenceExtension.extraContainerPorts", [])}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "grpc-ext-proc": 9002, "grpc-health": 9003, "http-metrics": 9090, **extra_ports}  # fmt: skip
    for env in _get(values, "inferenceExtension.env", []):
        assert env in c["env"]

    # RBAC: exactly the picker's API calls, bound to the Deployment's service account
    role = out.get("Role", f"{name}-epp")
    assert expand_rules(role["rules"]) == expected_calls(leader)
    binding = out.get("RoleBinding", f"{name}-epp")
    sa = f"{name}-epp"
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == sa
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}  # fmt: skip
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "ml"}]

    # the config file the picker is told to load is in the mounted ConfigMap
    cm = out.get("ConfigMap", f"{name}-epp-config")
    config_file = flag(args, "--config-file")
    assert config_file == "/config/" + _get(values, "inferenceExtension.pluginsConfigFile", "default-plugins.yaml")
    assert config_file.removeprefix("/config/") in cm["data"]
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/config")
    assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]

    # the optional objects all point at this pool
    for kind in ("InferenceObjective", "InferenceModelRewrite", "InferenceModel"):
        for obj in out.all(kind):
            ref = obj["spec"]["poolRef"]
            assert (ref["name"], ref["group"]) == (name, pool.meta.group)
    objectives = {o["metadata"]["name"]: o["spec"].get("priority") for o in out.all("InferenceObjective")}
    assert objectives == {o["name"]: o["priority"] for o in values.get("inferenceObjectives", [])}
    assert len(out.all("InferenceModel")) == len(values.get("inferenceModels", []))
    provider = _get(values, "provider.name", "none")
    monitoring = _get(values, "inferenceExtension.monitoring.prometheus.enabled", False)
    assert len(out.all("ServiceMonitor")) == int(monitoring and provider != "gke")
    assert len(out.all("PodMonitoring")) == int(monitoring and auth and provider == "gke")
    assert len(out.all("DestinationRule")) == int(provider == "istio")
    assert len(out.all("HealthCheckPolicy")) == int(provider == "gke")
    assert len(out.all("HTTPRoute")) == int(_get(values, "experimentalHttpRoute.enabled", False))
    assert name in out.notes


def test_default_config_is_the_references_shape(rendered: dict[tuple[str, str], Rendered]) -> None:
    text = rendered[("inferencepool", "defaults")].get("ConfigMap")["data"]["default-plugins.yaml"]
    cfg = yaml.safe_load(text)
    assert cfg["apiVersion"] == "inference.networking.x-k8s.io/v1alpha1"
    assert [p["type"] for p in cfg["plugins"]] == [
        "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "metrics-data-source",
        "core-metrics-extractor"]  # fmt: skip
    assert cfg["plugins"][3]["parameters"] == {"scheme": "http", "path": "/metrics", "insecureSkipVerify": True}
    assert "parameters" not in cfg["plugins"][4]
    weights = {p["pluginRef"]: p.get("weight") for p in cfg["schedulingProfiles"][0]["plugins"]}
    assert weights == {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3}
    assert "parser" not in cfg

    sglang = yaml.safe_load(rendered[("inferencepool", "sglang")].get("ConfigMap")["data"]["default-plugins.yaml"])
    assert sglang["plugins"][4] == {"type": "core-metrics-extractor", "parameters": {"defaultEngine": "sglang"}}
    grpc_cfg = yaml.safe_load(
        rendered[("inferencepool", "ours-security")].get("ConfigMap")["data"]["default-plugins.yaml"]
    )
    assert grpc_cfg["parser"] == {"pluginRef": "vllmgrpc-parser"}
    assert grpc_cfg["plugins"][-1] == {"type": "vllmgrpc-parser"}


@pytest.mark.parametrize("server_type", sorted(METRIC_FLAGS))
def test_metric_flags_name_the_engine_tables_metrics(server_type: str) -> None:
    """The per-signal metric flags the chart passes name exactly what the picker's own engine table
    reads for that engine (so the flags agree with the built-in names, never replace them with others)."""
    engines = pytest.importorskip("epp.metrics.engines")
    spec = engines.ENGINES[server_type]
    args = METRIC_FLAGS[server_type]
    named = {}
    for i, a in enumerate(args):
        if a.startswith("--") and "=" in a:
            named[a[2:].split("=", 1)[0]] = a.split("=", 1)[1]
        elif a.startswith("--"):
            named[a[2:]] = args[i + 1]
    signals = {"total-queued-requests-metric": spec.waiting, "total-running-requests-metric": spec.running,
               "kv-cache-usage-percentage-metric": spec.kv_usage}  # fmt: skip
    for name, sources in signals.items():
        if name in named:
            assert engines.parse_spec(named[name]) == sources[0], name
    if "lora-info-metric" in named:
        assert named["lora-info-metric"] == "" and not spec.lora


def _token_secret(out: Rendered) -> dict[str, Any]:
    """The release's one service-account token Secret (besides it: the session key's)."""
    found = [s for s in out.all("Secret") if s.get("type") == "kubernetes.io/service-account-token"]
    assert len(found) == 1, found
    return found[0]


def test_monitoring_auth_objects(rendered: dict[tuple[str, str], Rendered]) -> None:
    out = rendered[("inferencepool", "monitoring-auth")]
    sa = "llama-epp"
    role = out.get("ClusterRole")
    assert expand_rules([r for r in role["rules"] if "resources" in r]) == {
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
    }
    assert {"nonResourceURLs": ["/metrics"], "verbs": ["get"]} in role["rules"]
    binding = out.get("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == "llama-epp-ml"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "ml"}]
    secret = _token_secret(out)
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": sa}
    mon = out.get("ServiceMonitor")
    endpoint = mon["spec"]["endpoints"][0]
    assert endpoint["authorization"]["credentials"] == {"name": secret["metadata"]["name"], "key": "token"}
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("http-metrics", "/metrics", "30s")
    assert mon["metadata"]["labels"]["release"] == "kube-prometheus"
    assert mon["spec"]["selector"]["matchLabels"].items() <= out.get("Service")["metadata"]["labels"].items()

    noauth = rendered[("inferencepool", "monitoring-noauth")]
    assert [s["metadata"]["name"] for s in noauth.all("Secret")] == ["llama-epp-session-key"]
    assert "authorization" not in noauth.get("ServiceMonitor")["spec"]["endpoints"][0]
    assert "--metrics-endpoint-auth=false" in container(noauth)["args"]


def test_tracing_environment(rendered: dict[tuple[str, str], Rendered]) -> None:
    env = {e["name"]: e for e in container(rendered[("inferencepool", "tracing")])["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.monitoring.svc.cluster.local:4317"
    assert env["OTEL_TRACES_EXPORTER"]["value"] == "otlp"
    assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.5"
    assert env["OTEL_RESOURCE_ATTRIBUTES_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "k8s.pod.name=$(OTEL_RESOURCE_ATTRIBUTES_POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    plain = {e["name"] for e in container(rendered[("inferencepool", "defaults")])["env"]}
    assert plain == {"NAMESPACE", "POD_NAME"}


def test_provider_objects(rendered: dict[tuple[str, str], Rendered]) -> None:
    rule = rendered[("inferencepool", "istio")].get("DestinationRule")
    assert rule["spec"] == {
        "host": "epp.custom.example",
        "trafficPolicy": {
            "tls": {"mode": "SIMPLE", "insecureSkipVerify": True},
            "connectionPool": {"http": {"maxRequestsPerConnection": 256000}},
        },
    }
    gke = rendered[("inferencepool", "gke")]
    hc = gke.get("HealthCheckPolicy")
    assert hc["spec"]["targetRef"] == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "llama"}
    assert hc["spec"]["default"]["config"]["httpHealthCheck"] == {"requestPath": "/health", "port": 8000}
    assert gke.get("GCPBackendPolicy")["spec"]["default"]["timeoutSec"] == 300
    pm = gke.get("PodMonitoring")
    secret = _token_secret(gke)
    assert pm["spec"]["endpoints"][0]["authorization"]["credentials"]["secret"] == {
        "name": secret["metadata"]["name"], "key": "token"}  # fmt: skip
    assert pm["spec"]["endpoints"][0]["port"] == "http-metrics"
    collector = next(b for b in gke.all("RoleBinding") if b["subjects"][0]["name"] == "collector")
    assert collector["subjects"][0]["namespace"] == "gke-gmp-system"  # autopilot
    route = gke.get("HTTPRoute")
    assert "timeouts" not in route["spec"]["rules"][0]  # the GKE gateway has its own (GCPBackendPolicy)


def test_http_route(rendered: dict[tuple[str, str], Rendered]) -> None:
    route = rendered[("inferencepool", "httproute")].get("HTTPRoute")
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "my-gateway"}
    ]
    rule = route["spec"]["rules"][0]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "llama"}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["timeouts"] == {"request": "120s"}


def test_network_policy_and_serving_certificate(rendered: dict[tuple[str, str], Rendered]) -> None:
    out = rendered[("inferencepool", "ours-security")]
    policy = out.get("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == out.get("Service")["spec"]["selector"]
    rules = {r["ports"][0]["port"]: r.get("from") for r in policy["spec"]["ingress"]}
    values = load_values("inferencepool", "ours-security")["inferenceExtension"]["networkPolicy"]
    assert rules == {9002: values["gatewayPeers"], 9090: values["monitoringPeers"], 9003: None}
    assert policy["spec"]["policyTypes"] == ["Ingress"]

    cert = out.get("Certificate")
    assert cert["spec"]["issuerRef"] == {"name": "epp-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert "llama-epp.ml.svc" in cert["spec"]["dnsNames"]
    c = container(out)
    assert flag(c["args"], "--cert-path") == "/etc/epp/tls" and "--enable-cert-reload" in c["args"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/epp/tls")
    pod = out.get("Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == cert["spec"]["secretName"]


def test_image_and_extra_keys(rendered: dict[tuple[str, str], Rendered]) -> None:
    assert container(rendered[("inferencepool", "defaults")])["image"] == (
        "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"
    )
    assert container(rendered[("inferencepool", "ours-alpha")])["image"] == "registry.example.com/ml/epp:v1.2.3"
    ours = render("inferencepool", {"inferencePool": {"modelServers": {"matchLabels": {"app": "x"}}}})
    assert container(ours)["image"] == "epp:0.1.0"  # this project's image, tagged with the chart's appVersion
    assert container(ours)["resources"] == {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    predictor = render("inferencepool", {"inferencePool": {"modelServers": {"matchLabels": {"app": "x"}}},
                                         "inferenceExtension": {"latencyPredictor": {"enabled": True}}})  # fmt: skip
    assert "no latency predictor" in predictor.notes
    assert [c["name"] for c in predictor.get("Deployment")["spec"]["template"]["spec"]["containers"]] == ["epp"]


def test_pool_chart_sidecar_and_volumes(rendered: dict[tuple[str, str], Rendered]) -> None:
    out = rendered[("inferencepool", "sidecar")]
    pod = out.get("Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["config-watcher", "epp"]
    side = container(out, "config-watcher")
    assert side["command"] == ["sh"] and side["args"] == ["-c", "while true; do sleep 3600; done"]
    assert side["securityContext"] == container(out)["securityContext"]  # the chart's, as none was given
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["side-config"]["configMap"]["name"] == "llama-side"  # templated with the release name
    assert out.get("ConfigMap", "llama-side")["data"] == {"settings.txt": "interval=5s\n"}
    assert "emptyDir" in volumes["models"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container(out)["volumeMounts"]


# ---- the standalone chart ------------------------------------------------------------------------


def _standalone_generator() -> Any:
    spec = importlib.util.spec_from_file_location("standalone_generate", CHARTS / "standalone" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standalone_envoy_files_are_generated_by_envoyconf() -> None:
    gen = _standalone_generator()
    files = gen.configs()
    assert len(files) == 6
    for name, text in files.items():
        assert (CHARTS / "standalone" / "files" / name).read_text() == text, (
            f"{name} is stale: run python deploy/charts/standalone/generate.py"
        )


@pytest.mark.parametrize("case", STANDALONE_CASES)
def test_standalone_wiring(case: str, rendered: dict[tuple[str, str], Rendered]) -> None:
    values = load_values("standalone", case)
    out = rendered[("standalone", case)]
    sidecar_image = _get(values, "inferenceExtension.sidecar.image")
    create = _get(values, "inferencePool.create")
    if create is None:
        create = _get(values, "inferenceExtension.endpointsServer.createInferencePool", True)
    deploy = out.get("Deployment")
    epp = container(out)
    args = epp["args"]
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}

    if sidecar_image:  # the reference's way: the sidecar exactly as given, its ConfigMap from values
        side = container(out, _get(values, "inferenceExtension.sidecar.name"))
        assert side["image"] == sidecar_image
        cm = out.get("ConfigMap", _get(values, "inferenceExtension.sidecar.configMap.name"))
        assert cm["data"] == _get(values, "inferenceExtension.sidecar.configMap.data")
        assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
        assert side["readinessProbe"]["httpGet"]["port"] == 19001
        tls = True
    else:  # the built-in Envoy: its config is the generated file, byte for byte
        envoy_values = values.get("envoy", {})
        profile = envoy_values.get("profile", envoyconf.DEFAULT_PROFILE)
        tls = envoy_values.get("pickerTLS", True)
        cm = out.get("ConfigMap", "llama-epp-envoy")
        verify = envoy_values.get("verifyPicker", {}).get("enabled")
        allow = tuple(envoy_values.get("allowClientHeaders", ()))
        if verify or allow:  # the file with the chart's changes (tests/deploy/test_chart_security.py)
            assert "llama-epp-tls" in {v.get("secret", {}).get("secretName") for v in volumes.values()}
        else:
            expected = (CHARTS / "standalone" / "files" / f"envoy-{profile}-{'tls' if tls else 'plain'}.yaml")
            assert cm["data"]["envoy.yaml"] == expected.read_text()
        config = yaml.safe_load(cm["data"]["envoy.yaml"])
        ext = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        modes = {f["name"]: f["typed_config"] for f in ext["http_filters"]}[envoyconf.EPP_FILTER]["processing_mode"]
        assert modes == envoyconf._MODES[profile]
        picker = next(c for c in config["static_resources"]["clusters"] if c["name"].startswith("epp."))
        assert ("transport_socket" in picker) == tls
        picker_addr = picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert picker_addr == {"socket_address": {"address": "127.0.0.1", "port_value": 9002}}
        envoy = container(out, "envoy")
        listeners = {
            lst["name"]: lst["address"]["socket_address"]["port_value"]
            for lst in config["static_resources"]["listeners"]
        }
        assert {p["name"]: p["containerPort"] for p in envoy["ports"]} == {
            "http": listeners["inference"], "envoy-health": listeners["health"]}  # fmt: skip
        assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "envoy-health"}
        assert envoy["args"][:2] == ["--config-path", "/etc/envoy/envoy.yaml"]
        assert volumes["envoy-config"]["configMap"]["name"] == cm["metadata"]["name"]

    assert flag(args, "--grpc-port") == "9002"  # what the Envoy config calls
    assert ("--secure-serving=false" in args) == (not tls)
    replicas = _get(values, "inferenceExtension.replicas", 1)
    assert ("--ha-enable-leader-election" in args) == (replicas > 1)
    assert flag(args, "--tracing") == ("true" if _get(values, "inferenceExtension.tracing.enabled") else "false")
    mode = deploy["spec"]["template"]["metadata"]["labels"]["inference.networking.k8s.io/igw-mode"]
    assert mode == ("inferencepool" if create else "standalone")
    if create:
        pool = resources.parse_object(CRDS.defaulted(out.get("InferencePool")))
        assert isinstance(pool, resources.InferencePool)
        assert flag(args, "--endpoint-selector") is None and flag(args, "--pool-name") == "llama"
    else:
        assert not out.all("InferencePool")
        assert flag(args, "--pool-name") is None
        selector = _get(values, "inferenceExtension.endpointsServer.endpointSelector")
        if selector:
            assert flag(args, "--endpoint-selector") == selector
            assert flag(args, "--endpoint-target-ports") == str(
                _get(values, "inferenceExtension.endpointsServer.targetPorts")
            )
        else:
            labels = _get(values, "inferencePool.modelServers.matchLabels")
            assert resources.parse_selector(flag(args, "--endpoint-selector") or "") == labels
            ports = [p["number"] for p in _get(values, "inferencePool.targetPorts", [{"number": 8000}])]
            assert flag(args, "--endpoint-target-ports") == ",".join(map(str, ports))
        server_type = _get(values, "inferenceExtension.endpointsServer.modelServerType", "vllm")
        assert args[4 : 4 + len(METRIC_FLAGS[server_type])] == METRIC_FLAGS[server_type]

    svc = out.get("Service")
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert svc_ports["http"] == 8081  # the reference's client port, either way
    assert ("grpc-ext-proc" in svc_ports) == bool(create)
    assert expand_rules(out.get("Role")["rules"]) == expected_calls(leader_election=replicas > 1)

    # ext_proc is closed to the network: the NetworkPolicy admits no one to 9002 (Envoy calls it over
    # loopback, which no policy filters) and the picker listens on 127.0.0.1 for it, unless gatewayPeers
    # name proxies outside the pod; clients reach Envoy's listener
    peers = _get(values, "inferenceExtension.networkPolicy.gatewayPeers")
    policy = out.get("NetworkPolicy")
    ingress_ports = {r["ports"][0]["port"] for r in policy["spec"]["ingress"]}
    assert (9002 in ingress_ports) == bool(peers) and 8081 in ingress_ports
    assert flag(args, "--grpc-bind-address") == (None if peers else "127.0.0.1")


@pytest.mark.envoy
@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")
def test_standalone_envoy_configs_pass_envoy_validate(
    tmp_path: Path, rendered: dict[tuple[str, str], Rendered]
) -> None:
    files = sorted((CHARTS / "standalone" / "files").glob("*.yaml"))
    # and the sidecar config our reference-shaped values file carries
    own = tmp_path / "values-sidecar-envoy.yaml"
    own.write_text(rendered[("standalone", "defaults")].get("ConfigMap", "envoy")["data"]["envoy.yaml"])
    results = validate([*files, own])
    bad = {p.name: out for p, (code, out) in results.items() if code != 0}
    assert bad == {}


def test_rbac_calls_file_is_what_the_roles_grant() -> None:
    calls = expected_calls(leader_election=True)
    assert ("", "pods", "watch") in calls
    assert ("coordination.k8s.io", "leases", "update") in calls
    assert not any(verb in ("delete", "deletecollection", "*") for _, _, verb in calls)
    assert not any(resource == "pods" and verb not in ("get", "list", "watch") for _, resource, verb in calls)
    assert expected_calls(leader_election=False) == {c for c in calls if c[0] != "coordination.k8s.io"}


def test_charts_do_not_package_the_generator() -> None:
    for chart in ("inferencepool", "standalone"):
        ignore = (CHARTS / chart / ".helmignore").read_text()
        assert "generate.py" in ignore
    assert Path(CHARTS / "standalone" / "generate.py").exists()


# ---- the picker starts with the args each render gives ---------------------------------------------
def _manifests(out: Rendered, path: Path) -> None:
    """The release's inference objects as a no-cluster manifests file (the pool, objectives, ...)."""
    kinds = ("InferencePool", "InferenceObjective", "InferenceModelRewrite", "InferenceModel")
    docs = [o for o in out.objects if o["kind"] in kinds]
    path.write_text(yaml.safe_dump_all(docs) if docs else "")


async def _health(port: int, service: str) -> int | None:
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
            return int(reply.status)
    except grpc.aio.AioRpcError:
        return None


def _start_picker(
    out: Rendered, workdir: Path, extra: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    """Start `python -m epp` with the render's args made local (ports from the OS) plus `extra`. A port
    another process took between the OS handing it out and the picker binding it means a new try (3)."""
    for attempt in range(3):
        run = workdir / f"run{attempt}"
        run.mkdir()
        ports = dict(zip(("grpc", "health", "metrics"), free_ports(3), strict=True))
        log_path = run / "picker.log"
        with log_path.open("w") as log:
            args = [*local_args(out, run, ports), *extra]
            proc = subprocess.Popen([sys.executable, "-m", "epp", *args],
                                    env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline and "picker started" not in log_path.read_text():
            time.sleep(0.05)
        if proc.poll() is not None and "Address already in use" in log_path.read_text():
            continue
        # with a CPU limit the picker runs a worker per CPU and the first "started" may be any worker's;
        # /metrics is worker 0's: wait for it too (bounded)
        bind = [a for i, a in enumerate(args) if i and args[i - 1] == "--bind-address"]
        host = bind[-1] if bind else "127.0.0.1"
        while proc.poll() is None and time.monotonic() < deadline and not _connects(host, ports["metrics"]):
            time.sleep(0.05)
        return proc, ports, log_path
    raise AssertionError(f"no free ports in 3 tries: {log_path.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()  # not a shutdown test: SIGTERM would drain for --drain-timeout
    proc.wait(timeout=10)


@pytest.mark.parametrize(("chart", "case"), CASES)
async def test_picker_starts_with_the_rendered_args(
    chart: str, case: str, tmp_path: Path, rendered: dict[tuple[str, str], Rendered]
) -> None:
    """`python -m epp` with the Deployment's args (config file = the ConfigMap's text, ports from the OS,
    the release's objects as --manifests) serves; its gRPC health answers SERVING for the services the
    rendered liveness and readiness probes ask for."""
    out = rendered[(chart, case)]
    c = container(out)
    manifests = tmp_path / "objects.yaml"
    _manifests(out, manifests)
    extra = ["--manifests", str(manifests)]
    env = local_env(out, "ml", f"http://127.0.0.1:{free_port()}")
    proc = None
    with contextlib.ExitStack() as stack:
        if "--ha-enable-leader-election" in c["args"]:
            from tests.sources.apiserver import ApiServer

            api = stack.enter_context(ApiServer())  # the Lease lives in an API-server emulator
            extra += ["--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig", namespace="ml"))]
        try:
            proc, ports, log = _start_picker(out, tmp_path, extra, env)
            services = {c["livenessProbe"]["grpc"]["service"], c["readinessProbe"]["grpc"]["service"]}
            status: dict[str, int | None] = {}
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and proc.poll() is None:
                status = {s: await _health(ports["health"], s) for s in services}
                if all(v == health_pb2.HealthCheckResponse.SERVING for v in status.values()):
                    break
                await asyncio.sleep(0.2)
            assert proc.poll() is None, f"picker exited {proc.returncode}: {log.read_text()[-3000:]}"
            assert status == dict.fromkeys(services, health_pb2.HealthCheckResponse.SERVING), log.read_text()[-3000:]
        finally:
            _stop(proc)


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_rendered_sglang_args_read_sglangs_metrics(
    tmp_path: Path, rendered: dict[tuple[str, str], Rendered]
) -> None:
    """The SGLang render's metric flags and config make the picker read SGLang's names: against a real
    simulated SGLang server (no engine-type label on the pod) busy with one long request, the picker's
    pool average of running requests becomes 1 (with vLLM's names it would find nothing to read)."""
    import aiohttp

    from epp.sim.config import DEFAULT_MODEL

    out = rendered[("inferencepool", "sglang")]
    sim_port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "epp.sim", "--engine", "sglang", "--port", str(sim_port), "--time-scale", "20",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    picker = None
    try:
        assert sim.stdout is not None
        assert "SIM READY" in sim.stdout.readline()
        pool = dict(out.get("InferencePool"))
        pool["spec"] = {**pool["spec"], "targetPorts": [{"number": sim_port}]}
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "sglang-0", "namespace": "ml", "labels": pool["spec"]["selector"]["matchLabels"]},
               "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
        manifests = tmp_path / "objects.yaml"
        manifests.write_text(yaml.safe_dump_all([pool, pod]))
        extra = ["--manifests", str(manifests), "--refresh-prometheus-metrics-interval=200ms"]
        picker, ports, log = _start_picker(out, tmp_path, extra, local_env(out, "ml", "http://127.0.0.1:9"))
        body = {"model": DEFAULT_MODEL, "prompt": "hello", "max_tokens": 2000, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{sim_port}/v1/completions", json=body) as reply:
                assert reply.status == 200
                await reply.content.readline()  # the request is running on the server now
                running = None
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline and picker.poll() is None:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"http://127.0.0.1:{ports['metrics']}/metrics") as page:
                            running = _metric(await page.text(), "inference_pool_average_running_requests")
                    if running == 1.0:
                        break
                    await asyncio.sleep(0.2)
        assert running == 1.0, log.read_text()[-3000:]
    finally:
        _stop(picker)
        _stop(sim)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


# Defaults this project sets on purpose (docs/differences.md and deploy/README.md say why).
OWN_DEFAULTS = {
    "inferencepool": {
        "inferenceExtension.image.registry", "inferenceExtension.image.repository", "inferenceExtension.image.tag",
        "inferenceExtension.image.pullPolicy", "inferenceExtension.resources.requests.cpu",
        "inferenceExtension.resources.requests.memory", "inferenceExtension.resources.limits.memory",
        "inferencePool.modelServers.matchLabels.app",  # required, no default (the reference's README example)
    },
    "standalone": {
        "inferenceExtension.image.registry", "inferenceExtension.image.repository", "inferenceExtension.image.tag",
        "inferenceExtension.image.pullPolicy", "inferencePool.modelServers.matchLabels.app",
        # the Service's `http` port is built in (an extraServicePorts entry named http replaces it)
        "inferenceExtension.extraServicePorts",
        # the reference ships its Envoy as a sidecar given in full; this chart's built-in one is the default
        "inferenceExtension.sidecar.configMap.name", "inferenceExtension.sidecar.configMap.data.envoy.yaml",
        "inferenceExtension.sidecar.name", "inferenceExtension.sidecar.image", "inferenceExtension.sidecar.command",
        "inferenceExtension.sidecar.args", "inferenceExtension.sidecar.env", "inferenceExtension.sidecar.ports",
        "inferenceExtension.sidecar.resources.requests.cpu", "inferenceExtension.sidecar.resources.requests.memory",
        "inferenceExtension.sidecar.readinessProbe.failureThreshold",
        "inferenceExtension.sidecar.readinessProbe.httpGet.path",
        "inferenceExtension.sidecar.readinessProbe.httpGet.port",
        "inferenceExtension.sidecar.readinessProbe.httpGet.scheme",
        "inferenceExtension.sidecar.readinessProbe.periodSeconds", "inferenceExtension.sidecar.volumeMounts",
        "inferenceExtension.sidecar.volumes",
    },
}  # fmt: skip


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_chart_defaults_are_the_references(chart: str) -> None:
    """Every key of our copy of the reference's default values exists in the chart's values.yaml with the
    same default, except the ones this project sets on purpose."""
    ours = _leaves(yaml.safe_load((CHARTS / chart / "values.yaml").read_text()))
    reference = _leaves(load_values(chart, "defaults"))
    differ = {k for k, v in reference.items() if ours.get(k, "<missing>") != v}
    assert differ <= OWN_DEFAULTS[chart], sorted(differ - OWN_DEFAULTS[chart])


@pytest.mark.parametrize("case", ["monitoring-auth", "monitoring-noauth"])
async def test_metrics_auth_as_the_chart_wires_it(
    case: str, tmp_path: Path, rendered: dict[tuple[str, str], Rendered]
) -> None:
    """The picker started with a monitoring render's args, against an API-server emulator whose RBAC is the
    rendered ClusterRole/Binding: with auth on, /metrics answers 401 without a token, 403 for a token of
    another account, 200 for the ServiceAccount the ServiceMonitor's Secret belongs to; with auth off,
    200 to anyone."""
    import aiohttp

    from tests.sources.apiserver import ApiServer

    out = rendered[("inferencepool", case)]
    binding = out.get("ClusterRoleBinding")
    subject = binding["subjects"][0]
    user = f"system:serviceaccount:{subject['namespace']}:{subject['name']}"
    role = out.get("ClusterRole", binding["roleRef"]["name"])
    manifests = tmp_path / "objects.yaml"
    _manifests(out, manifests)
    picker = None
    with ApiServer() as api:
        api.review_tokens = {"sa-token": {"username": user}, "other-token": {"username": "system:anonymous"}}
        api.review_allowed = {
            (user, url, verb)
            for rule in role["rules"]
            for url in rule.get("nonResourceURLs", [])
            for verb in rule["verbs"]
        }
        extra = ["--manifests", str(manifests), "--kubeconfig", str(api.write_kubeconfig(tmp_path / "kc", "ml"))]
        try:
            picker, ports, log = _start_picker(out, tmp_path, extra, local_env(out, "ml", "http://127.0.0.1:9"))
            url = f"http://127.0.0.1:{ports['metrics']}/metrics"
            codes: dict[str, int] = {}
            async with aiohttp.ClientSession() as session:
                for who, headers in (("none", {}), ("other", {"Authorization": "Bearer other-token"}),
                                     ("sa", {"Authorization": "Bearer sa-token"})):  # fmt: skip
                    async with session.get(url, headers=headers) as reply:
                        codes[who] = reply.status
            expected = (
                {"none": 401, "other": 403, "sa": 200} if case == "monitoring-auth" else dict.fromkeys(codes, 200)
            )
            assert codes == expected, log.read_text()[-3000:]
        finally:
            _stop(picker)


# ---- shutdown: the pod's grace covers the picker's drain + grace -----------------------------------


@pytest.mark.parametrize(("chart", "case"), CASES)
def test_termination_grace_covers_drain_and_grace(
    chart: str, case: str, rendered: dict[tuple[str, str], Rendered]
) -> None:
    """The picker's own parser reads --drain-timeout / --shutdown-grace from the rendered args; the pod's
    terminationGracePeriodSeconds is at least their sum + 5 s (exactly that when the values leave it unset)."""
    from epp.cli import build_parser

    parsed = build_parser().parse_args(container(rendered[(chart, case)])["args"])
    needed = math.ceil(parsed.drain_timeout + parsed.shutdown_grace) + 5
    grace = rendered[(chart, case)].get("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    values = load_values(chart, case)
    pod = rendered[(chart, case)].get("Deployment")["spec"]["template"]["spec"]
    envoy = next((c for c in pod["containers"] if c["name"] == "envoy"), None)
    hook = 0
    if envoy is not None:  # the built-in Envoy waits out the picker before its SIGTERM, inside the grace
        hook = envoy["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert hook >= parsed.drain_timeout + parsed.shutdown_grace
    if _get(values, "inferenceExtension.terminationGracePeriodSeconds") is None:
        assert grace == max(needed, hook + 5)
    assert grace >= needed and grace >= hook + 5


POOL = {"inferencePool": {"modelServers": {"matchLabels": {"app": "x"}}}}


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({}, 65),  # 30 s + 30 s + 5
        ({"drain-timeout": "1m30s", "shutdown-grace": "250ms"}, 96),  # 90.25 s, rounded up
        ({"drain-timeout": 0, "shutdown-grace": 0.5}, 6),  # plain seconds, as the CLI takes them
        ([{"name": "drain-timeout", "value": "10s"}, {"name": "drain-timeout", "value": "2"}], 37),  # last wins
        ({"shutdown-grace": "1h"}, 3635),
    ],
)
def test_termination_grace_from_flags(chart: str, flags: Any, expected: int) -> None:
    from epp.cli import build_parser

    out = render(chart, POOL | {"inferenceExtension": {"flags": flags}})
    assert out.get("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == expected
    parsed = build_parser().parse_args(container(out)["args"])  # the picker reads the same durations
    assert math.ceil(parsed.drain_timeout + parsed.shutdown_grace) + 5 == expected
    assert "Warning: terminationGracePeriodSeconds" not in out.notes


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_termination_grace_set_explicitly(chart: str) -> None:
    """A value wins (also one below drain + grace: the NOTES then warn); a malformed duration is refused."""
    out = render(chart, POOL | {"inferenceExtension": {"terminationGracePeriodSeconds": 200}})
    assert out.get("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 200
    assert "Warning" not in out.notes
    short = render(chart, POOL | {"inferenceExtension": {"terminationGracePeriodSeconds": 20}})
    assert short.get("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 20
    assert "Warning: terminationGracePeriodSeconds 20 is below" in short.notes
    for bad in ("30 s", "-5s", "5x", "abc"):
        with pytest.raises(Exception, match="invalid duration"):
            render(chart, POOL | {"inferenceExtension": {"flags": {"drain-timeout": bad}}})
    with pytest.raises(Exception, match="terminationGracePeriodSeconds"):
        render(chart, POOL | {"inferenceExtension": {"terminationGracePeriodSeconds": -1}})


# ---- standalone: ext_proc on loopback when Envoy is in the pod --------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, "127.0.0.1"),  # the built-in Envoy
        # the proxy is elsewhere (the NetworkPolicy must then name it)
        ({"inferenceExtension": {"sidecar": {"enabled": False}, "networkPolicy": {"enabled": False}}}, None),
        ({"inferenceExtension": {"extProcBindAddress": "0.0.0.0"}}, "0.0.0.0"),  # opened on purpose
        ({"inferenceExtension": {"extProcBindAddress": "::"}}, "::"),
        ({"inferenceExtension": {"networkPolicy": {"gatewayPeers": [{"podSelector": {}}]}}}, None),
    ],
)
def test_standalone_ext_proc_bind_address(values: dict[str, Any], expected: str | None) -> None:
    out = render("standalone", POOL | values)
    assert flag(container(out)["args"], "--grpc-bind-address") == expected
    assert ("ext_proc listens on 127.0.0.1 only" in out.notes) == (expected == "127.0.0.1")
    with pytest.raises(Exception, match="extProcBindAddress"):
        render("standalone", POOL | {"inferenceExtension": {"extProcBindAddress": "10.0.0.1; rm"}})


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


async def _grpc_health(host: str, port: int, tls: bool) -> int | None:
    """The gRPC health answer (service "") on host:port, over TLS with the server's own certificate as
    the trust root when the listener speaks TLS."""
    target = f"{host}:{port}"
    if tls:
        pem = ssl.get_server_certificate((host, port)).encode()
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=pem),
                                          options=[("grpc.ssl_target_name_override", "localhost")])  # fmt: skip
    else:
        channel = grpc.aio.insecure_channel(target)
    try:
        async with channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return int(reply.status)
    except grpc.aio.AioRpcError:
        return None


# 127.0.0.2 plays the pod IP (on Linux all of 127/8 is local): --bind-address puts health and metrics
# there as the kubelet and Prometheus reach them; ext_proc must stay on the rendered address alone.
POD_IP = "127.0.0.2"


@pytest.mark.parametrize(
    ("case", "override", "ext_proc_on"),
    [
        ("defaults", {}, "127.0.0.1"),  # the reference's sidecar, TLS to the picker
        ("ours-lean", {}, "127.0.0.1"),  # the built-in Envoy, plaintext
        ("ours-lean", {"inferenceExtension": {"extProcBindAddress": "127.0.0.3"}}, "127.0.0.3"),  # the value wins
    ],
)
async def test_standalone_picker_serves_ext_proc_on_loopback_only(
    case: str, override: dict[str, Any], ext_proc_on: str, tmp_path: Path
) -> None:
    """The picker started with the standalone render's args and the pod IP as --bind-address: ext_proc
    answers on the rendered --grpc-bind-address and refuses connections on the pod IP, while health and
    /metrics answer on the pod IP."""
    values = load_values("standalone", case)
    for key, sub in override.items():
        values[key] = {**values.get(key, {}), **sub}
    out = render("standalone", values)
    args = container(out)["args"]
    assert flag(args, "--grpc-bind-address") == ext_proc_on
    tls = "--secure-serving=false" not in args
    manifests = tmp_path / "objects.yaml"
    _manifests(out, manifests)
    extra = ["--manifests", str(manifests), "--bind-address", POD_IP]  # after local_args' 127.0.0.1: wins
    proc = None
    try:
        proc, ports, log = _start_picker(out, tmp_path, extra, local_env(out, "ml", "http://127.0.0.1:9"))
        assert proc.poll() is None, log.read_text()[-3000:]
        assert "picker started" in log.read_text()
        status = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and status != health_pb2.HealthCheckResponse.SERVING:
            status = await _grpc_health(ext_proc_on, ports["grpc"], tls)  # a real gRPC call on ext_proc's listener
            await asyncio.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.SERVING, log.read_text()[-3000:]
        assert not _connects(POD_IP, ports["grpc"])  # nothing off the pod reaches ext_proc
        if ext_proc_on != "127.0.0.1":
            assert not _connects("127.0.0.1", ports["grpc"])
        assert await _grpc_health(POD_IP, ports["health"], tls=False) == health_pb2.HealthCheckResponse.SERVING
        assert not _connects("127.0.0.1", ports["health"])  # health really moved to the "pod IP"
        assert _connects(POD_IP, ports["metrics"])
    finally:
        _stop(proc)
