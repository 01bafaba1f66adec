"""deploy/charts: render with several value sets, lint, validate every object, check RBAC and wiring."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from epp import envoyconf, resources
from tests.deploy.charts import CHARTS, Rendered, expand_rules, expected_calls, lint, render
from tests.deploy.crdschema import Validator
from tests.deploy.envoy_run import envoy_binary, validate

CRDS = Validator()
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version() + ".0")
# Custom resources of other projects the charts may emit (no schema here: checked by shape below).
EXTERNAL_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("networking.istio.io/v1", "DestinationRule")}

POOL_VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "alpha-sglang-ha": {
        "inferenceExtension": {
            "replicas": 3,
            "flags": {"log-level": "debug", "enable-cert-reload": True, "refresh-metrics-interval": "100ms"},
            "monitoring": {"prometheus": {"enabled": True, "labels": {"release": "prom"}}},
            "env": [{"name": "EXTRA", "value": "1"}],
        },
        "inferencePool": {
            "name": "qwen-pool",
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "modelServerType": "sglang",
            "modelServers": {"matchLabels": {"app": "qwen", "tier": "gpu"}},
            "failureMode": "FailOpen",
        },
        "inferenceObjectives": [{"name": "premium", "priority": 10}, {"name": "batch", "priority": -1}],
        "inferenceModelRewrites": [
            {"name": "alias", "rules": [{"matches": [{"model": {"type": "Exact", "value": "chat"}}],
                                         "targets": [{"modelRewrite": "qwen-7b", "weight": 90},
                                                     {"modelRewrite": "qwen-7b-v2", "weight": 10}]}]},
            {"name": "fallback", "rules": [{"matches": [], "targets": [{"modelRewrite": "qwen-7b"}]}]},
        ],
        "inferenceModels": [
            {"name": "qwen", "modelName": "qwen-7b", "criticality": "Critical",
             "targetModels": [{"name": "qwen-7b", "weight": 100}]},
            {"name": "old", "modelName": "legacy", "criticality": "Default",
             "apiVersion": "inference.networking.x-k8s.io/v1alpha1"},
        ],
        "provider": {"name": "istio"},
    },
    "triton-custom-config": {
        "inferenceExtension": {
            "secureServing": False,
            "flags": [{"name": "log-format", "value": "text"}],
            "pluginsConfigFile": "custom.yaml",
            "pluginsCustomConfig": {"custom.yaml": "apiVersion: inference.networking.x-k8s.io/v1alpha1\n"
                                                   "kind: EndpointPickerConfig\n"
                                                   "plugins:\n- type: queue-scorer\n- type: max-score-picker\n"
                                                   "schedulingProfiles:\n- name: default\n  plugins:\n"
                                                   "  - pluginRef: queue-scorer\n  - pluginRef: max-score-picker\n"},
            "image": {"hub": "registry.example.com/ml", "tag": "v1.2.3", "pullPolicy": "Always"},
        },
        "inferencePool": {
            "modelServerType": "triton-tensorrt-llm",
            "targetPorts": [{"number": 8000}, {"number": 8001}],
            "appProtocol": "kubernetes.io/h2c",
        },
    },
    "trtllm-one-leader": {
        "inferenceExtension": {"enableLeaderElection": True},
        "inferencePool": {"modelServerType": "trtllm-serve"},
    },
}  # fmt: skip

STANDALONE_VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "lean-plain-flags-pool": {
        "envoy": {"profile": "lean", "pickerTLS": False},
        "inferencePool": {
            "modelServers": {"matchLabels": {"app": "x", "tier": "gpu"}},
            "targetPorts": [{"number": 8000}, {"number": 8001}],
        },
        "inferenceExtension": {"replicas": 2},
    },
    "buffered-object-pool": {
        "envoy": {"profile": "buffered"},
        "inferencePool": {"create": True, "apiVersion": "inference.networking.x-k8s.io/v1alpha2"},
        "inferenceModels": [{"name": "m", "modelName": "llama-3"}],
        "inferenceExtension": {"monitoring": {"prometheus": {"enabled": True}}},
    },
}

CASES = [("inferencepool", name) for name in POOL_VALUES] + [("standalone", name) for name in STANDALONE_VALUES]


def _values(chart: str, case: str) -> dict[str, Any]:
    return (POOL_VALUES if chart == "inferencepool" else STANDALONE_VALUES)[case]


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], Rendered]:
    return {(chart, case): render(chart, _values(chart, case)) for chart, case in CASES}


@pytest.mark.parametrize(("chart", "case"), CASES)
def test_lint_clean(chart: str, case: str) -> None:
    assert lint(chart, _values(chart, case)) == []


@pytest.mark.parametrize(("chart", "case"), CASES)
def test_every_object_validates(chart: str, case: str, rendered: dict[tuple[str, str], Rendered]) -> None:
    out = rendered[(chart, case)]
    assert out.objects
    for obj in out.objects:
        key = (obj["apiVersion"], obj["kind"])
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("namespace") == "ml", where
        if CRDS.knows(obj):
            assert CRDS.errors(obj) == [], where
            resources.parse_object(CRDS.defaulted(obj))  # and the picker can read it
        elif key in EXTERNAL_KINDS:
            assert isinstance(obj.get("spec"), dict), where
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)


def test_bad_values_are_refused() -> None:
    with pytest.raises(Exception, match="modelServerType"):
        render("inferencepool", {"inferencePool": {"modelServerType": "ollama"}})
    with pytest.raises(Exception, match="apiVersion"):
        render("inferencepool", {"inferencePool": {"apiVersion": "inference.networking.k8s.io/v2"}})
    with pytest.raises(Exception, match="profile"):
        render("standalone", {"envoy": {"profile": "fast"}})
    with pytest.raises(Exception, match="targetPorts"):
        render("inferencepool", {"inferencePool": {"targetPorts": []}})


# ---- the inferencepool chart ---------------------------------------------------------------------


def _container(out: Rendered, name: str = "epp") -> dict[str, Any]:
    pod = out.get("Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


@pytest.mark.parametrize("case", sorted(POOL_VALUES))
def test_pool_chart_wiring(case: str, rendered: dict[tuple[str, str], Rendered]) -> None:
    values = POOL_VALUES[case]
    out = rendered[("inferencepool", case)]
    pool_values = values.get("inferencePool", {})
    ext_values = values.get("inferenceExtension", {})
    pool_obj = out.get("InferencePool")
    pool = resources.parse_object(CRDS.defaulted(pool_obj))
    assert isinstance(pool, resources.InferencePool)
    name = pool_values.get("name", "llama")
    assert pool.meta.name == name
    assert dict(pool.selector) == pool_values.get("modelServers", {}).get(
        "matchLabels", {"app": "vllm-llama3-8b-instruct"}
    )
    ports = [p["number"] for p in pool_values.get("targetPorts", [{"number": 8000}])]
    assert list(pool.target_ports) == (ports if pool.meta.group == resources.GROUP_V1 else ports[:1])
    assert pool.picker is not None and pool.picker.failure_mode == pool_values.get("failureMode", "FailClose")

    # the pool's picker reference names the chart's Service and its ext_proc port
    svc = out.get("Service")
    assert svc["metadata"]["name"] == pool.picker.name == f"{name}-epp"
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert svc_ports == {"grpc-ext-proc": 9002, "http-metrics": 9090}
    assert pool.picker.port == svc_ports["grpc-ext-proc"]
    deploy = out.get("Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    c = _container(out)
    args = c["args"]
    assert c["command"] == ["python", "-m", "epp"]
    assert _flag(args, "--pool-name") == name
    assert _flag(args, "--pool-namespace") == "ml"
    assert (_flag(args, "--grpc-port"), _flag(args, "--grpc-health-port"), _flag(args, "--metrics-port")) == (
        "9002", "9003", "9090")  # fmt: skip
    assert _flag(args, "--pool-group") == (None if pool.meta.group == resources.GROUP_V1 else pool.meta.group)
    replicas = ext_values.get("replicas", 1)
    leader = replicas > 1 or ext_values.get("enableLeaderElection", False)
    assert deploy["spec"]["replicas"] == replicas
    assert ("--ha-enable-leader-election" in args) == leader
    assert ("--secure-serving=false" in args) == (ext_values.get("secureServing") is False)
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "grpc-ext-proc": 9002, "grpc-health": 9003, "http-metrics": 9090}  # fmt: skip

    # RBAC: exactly the picker's API calls, bound to the Deployment's service account
    role = out.get("Role")
    assert expand_rules(role["rules"]) == expected_calls(leader)
    binding = out.get("RoleBinding")
    sa = out.get("ServiceAccount")["metadata"]["name"]
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == sa
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}  # fmt: skip
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "ml"}]

    # the config file the picker is told to load is in the mounted ConfigMap
    cm = out.get("ConfigMap")
    config_file = _flag(args, "--config-file")
    assert config_file is not None and config_file.startswith("/config/")
    assert config_file.removeprefix("/config/") in cm["data"]
    volume = deploy["spec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert c["volumeMounts"][0] == {"name": volume["name"], "mountPath": "/config", "readOnly": True}

    # the optional objects all point at this pool
    for kind in ("InferenceObjective", "InferenceModelRewrite", "InferenceModel"):
        for obj in out.all(kind):
            ref = obj["spec"]["poolRef"]
            assert (ref["name"], ref["group"]) == (name, pool.meta.group)
    assert len(out.all("InferenceObjective")) == len(values.get("inferenceObjectives", []))
    assert len(out.all("InferenceModel")) == len(values.get("inferenceModels", []))
    assert len(out.all("ServiceMonitor")) == int(
        ext_values.get("monitoring", {}).get("prometheus", {}).get("enabled", False)
    )
    assert len(out.all("DestinationRule")) == int(values.get("provider", {}).get("name") == "istio")
    assert name in out.notes


def test_extra_flags_map_and_list(rendered: dict[tuple[str, str], Rendered]) -> None:
    args = _container(rendered[("inferencepool", "alpha-sglang-ha")])["args"]
    assert "--log-level=debug" in args
    assert "--enable-cert-reload" in args
    assert "--refresh-metrics-interval=100ms" in args
    args = _container(rendered[("inferencepool", "triton-custom-config")])["args"]
    assert "--log-format=text" in args
    image = _container(rendered[("inferencepool", "triton-custom-config")])["image"]
    assert image == "registry.example.com/ml/epp:v1.2.3"
    assert _container(rendered[("inferencepool", "defaults")])["image"] == "epp:0.1.0"


def test_service_monitor_and_destination_rule(rendered: dict[tuple[str, str], Rendered]) -> None:
    out = rendered[("inferencepool", "alpha-sglang-ha")]
    mon = out.get("ServiceMonitor")
    svc = out.get("Service")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert mon["metadata"]["labels"]["release"] == "prom"
    rule = out.get("DestinationRule")
    assert rule["spec"]["host"] == "qwen-pool-epp.ml.svc.cluster.local"
    assert rule["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}


def _import_or_skip(module: str) -> Any:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not available")
    return importlib.import_module(module)


@pytest.mark.parametrize("case", sorted(POOL_VALUES))
def test_plugins_config_loads_and_engine_names_match(case: str, rendered: dict[tuple[str, str], Rendered]) -> None:
    """The ConfigMap's EndpointPickerConfig is accepted by the picker's loader, and the engine
    metric names the chart writes for modelServerType are exactly the picker's built-in ones."""
    config = _import_or_skip("epp.scheduling.config")
    engines = _import_or_skip("epp.metrics.engines")
    out = rendered[("inferencepool", case)]
    args = _container(out)["args"]
    text = out.get("ConfigMap")["data"][_flag(args, "--config-file").removeprefix("/config/")]  # type: ignore[union-attr]
    cfg = config.load_config(text)
    if case == "triton-custom-config":
        return  # a user-supplied config: the chart adds nothing to it
    server_type = POOL_VALUES[case].get("inferencePool", {}).get("modelServerType", "vllm")
    default_spec = engines.apply_overrides(cfg.engine_metrics)["vllm"]
    assert dataclasses.replace(default_spec, name=server_type) == engines.ENGINES[server_type]


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


@pytest.mark.parametrize("case", sorted(STANDALONE_VALUES))
def test_standalone_wiring(case: str, rendered: dict[tuple[str, str], Rendered]) -> None:
    values = STANDALONE_VALUES[case]
    out = rendered[("standalone", case)]
    envoy_values = values.get("envoy", {})
    profile = envoy_values.get("profile", "duplex")
    tls = envoy_values.get("pickerTLS", True)

    # the Envoy config in the ConfigMap is the generated file, byte for byte
    cm = out.get("ConfigMap", "llama-epp-envoy")
    expected = (CHARTS / "standalone" / "files" / f"envoy-{profile}-{'tls' if tls else 'plain'}.yaml").read_text()
    assert cm["data"]["envoy.yaml"] == expected
    config = yaml.safe_load(cm["data"]["envoy.yaml"])
    ext = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    modes = {f["name"]: f["typed_config"] for f in ext["http_filters"]}[envoyconf.EPP_FILTER]["processing_mode"]
    assert modes == envoyconf._MODES[profile]
    picker = next(c for c in config["static_resources"]["clusters"] if c["name"].startswith("epp."))
    assert ("transport_socket" in picker) == tls
    picker_addr = picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert picker_addr == {"socket_address": {"address": "127.0.0.1", "port_value": 9002}}

    deploy = out.get("Deployment")
    epp, envoy = _container(out, "epp"), _container(out, "envoy")
    args = epp["args"]
    assert _flag(args, "--grpc-port") == "9002"  # what the Envoy config calls
    assert ("--secure-serving=false" in args) == (not tls)
    assert "--ha-enable-leader-election" not in args
    pool_values = values.get("inferencePool", {})
    if pool_values.get("create"):
        pool = resources.parse_object(CRDS.defaulted(out.get("InferencePool")))
        assert _flag(args, "--endpoint-selector") is None
        assert isinstance(pool, resources.InferencePool)
    else:
        assert not out.all("InferencePool")
        selector = pool_values.get("modelServers", {}).get("matchLabels", {"app": "vllm-llama3-8b-instruct"})
        assert resources.parse_selector(_flag(args, "--endpoint-selector") or "") == selector
        ports = [p["number"] for p in pool_values.get("targetPorts", [{"number": 8000}])]
        assert _flag(args, "--endpoint-target-ports") == ",".join(map(str, ports))

    listeners = {
        lst["name"]: lst["address"]["socket_address"]["port_value"] for lst in config["static_resources"]["listeners"]
    }
    envoy_ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert envoy_ports == {"http": listeners["inference"], "envoy-health": listeners["health"]}
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "envoy-health"}
    assert envoy["args"][:2] == ["--config-path", "/etc/envoy/envoy.yaml"]
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["envoy-config"]["configMap"]["name"] == cm["metadata"]["name"]
    svc = out.get("Service")
    svc_ports = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
    expected_ports = {"http": "http", "http-metrics": "http-metrics"}
    if pool_values.get("create"):  # the pool's endpointPickerRef names the picker's port on this Service
        expected_ports["grpc-ext-proc"] = "grpc-ext-proc"
        ref_port = out.get("InferencePool")["spec"]["extensionRef"]["portNumber"]
        assert next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc") == ref_port
    assert svc_ports == expected_ports
    assert expand_rules(out.get("Role")["rules"]) == expected_calls(leader_election=False)


@pytest.mark.envoy
@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")
def test_standalone_envoy_files_pass_envoy_validate() -> None:
    files = sorted((CHARTS / "standalone" / "files").glob("*.yaml"))
    results = validate(files)
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
