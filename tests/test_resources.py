"""Parsing every accepted API version, and errors that name the field."""

from __future__ import annotations

import pytest

from epp.resources import InferencePool, ResourceError, parse_object, parse_selector


def pool_v1(**spec):
    base = {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}]}
    base.update(spec)
    return {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "p", "namespace": "ns"}, "spec": base}


def test_pool_v1_fields():
    p = parse_object(pool_v1(targetPorts=[{"number": 8000}, {"number": 8001}], appProtocol="kubernetes.io/h2c",
                             endpointPickerRef={"name": "epp", "port": {"number": 9002}, "failureMode": "FailOpen"}))
    assert isinstance(p, InferencePool)
    assert p.target_ports == (8000, 8001) and p.selector == {"app": "x"} and p.app_protocol == "kubernetes.io/h2c"
    assert p.picker is not None and (p.picker.name, p.picker.port, p.picker.failure_mode) == ("epp", 9002, "FailOpen")
    assert p.meta.key == "ns/p"


def test_pool_v1alpha2_fields():
    p = parse_object({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
                      "metadata": {"name": "p"},
                      "spec": {"selector": {"app": "x"}, "targetPortNumber": 8000,
                               "extensionRef": {"name": "epp", "portNumber": 9100}}})
    assert p.target_ports == (8000,) and p.picker.port == 9100 and p.picker.failure_mode == "FailClose"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"targetPorts": []}, "spec.targetPorts"),
        ({"targetPorts": [{"number": 0}]}, "spec.targetPorts[0].number"),
        ({"targetPorts": [{"number": 1}] * 9}, "spec.targetPorts"),
        ({"selector": {"matchLabels": {}}}, "spec.selector"),
        ({"appProtocol": "grpc"}, "spec.appProtocol"),
        ({"endpointPickerRef": {"name": "e", "failureMode": "Maybe"}}, "spec.endpointPickerRef.failureMode"),
    ],
)
def test_pool_errors_name_the_field(spec, field):
    with pytest.raises(ResourceError) as e:
        parse_object(pool_v1(**spec))
    assert e.value.field == field


def test_model_errors():
    base = {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModel", "metadata": {"name": "m"}}
    with pytest.raises(ResourceError, match="spec.poolRef"):
        parse_object({**base, "spec": {"modelName": "a"}})
    with pytest.raises(ResourceError, match=r"spec.targetModels: at most 10"):
        parse_object({**base, "spec": {"modelName": "a", "poolRef": {"name": "p"},
                                       "targetModels": [{"name": f"t{i}"} for i in range(11)]}})
    with pytest.raises(ResourceError, match=r"spec.targetModels\[0\].weight"):
        parse_object({**base, "spec": {"modelName": "a", "poolRef": {"name": "p"},
                                       "targetModels": [{"name": "t", "weight": 1_000_001}]}})
    with pytest.raises(ResourceError, match="all targets or on none"):
        parse_object({**base, "spec": {"modelName": "a", "poolRef": {"name": "p"},
                                       "targetModels": [{"name": "t", "weight": 1}, {"name": "u"}]}})
    with pytest.raises(ResourceError, match="spec.criticality"):
        parse_object({**base, "spec": {"modelName": "a", "poolRef": {"name": "p"}, "criticality": "Default"}})
    with pytest.raises(ResourceError, match="apiVersion"):
        parse_object({**base, "apiVersion": "inference.networking.k8s.io/v1", "spec": {}})


def test_pod_readiness_and_ports():
    pod = parse_object({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "p", "labels": {"llm-d.ai/engine-type": "sglang"},
                                     "annotations": {"inference.networking.k8s.io/active-ports": "8000, 8002"}},
                        "status": {"podIP": "10.1.1.1", "conditions": [{"type": "Ready", "status": "True"}]}})
    assert pod.routable and pod.engine == "sglang" and pod.active_ports() == {8000, 8002}
    gone = parse_object({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": "p", "deletionTimestamp": "2025-01-01T00:00:00Z"},
                         "status": {"podIP": "10.1.1.1", "conditions": [{"type": "Ready", "status": "True"}]}})
    assert not gone.routable


def test_selector_flag():
    assert parse_selector("app=x, tier = gpu") == {"app": "x", "tier": "gpu"}
    with pytest.raises(ValueError, match="key=value"):
        parse_selector("app")


@pytest.mark.parametrize("kind", ["InferenceObjective", "InferenceModelRewrite"])
def test_llmd_group_objects(kind):
    spec = ({"poolRef": {"name": "p"}, "priority": -1} if kind == "InferenceObjective"
            else {"poolRef": {"name": "p"}, "rules": [{"targets": [{"modelRewrite": "m2"}]}]})
    obj = parse_object({"apiVersion": "llm-d.ai/v1alpha2", "kind": kind, "metadata": {"name": "o"}, "spec": spec})
    assert type(obj).__name__ == kind and obj.meta.api_version == "llm-d.ai/v1alpha2"
    if kind == "InferenceObjective":
        assert obj.priority == -1
    with pytest.raises(ResourceError, match="apiVersion"):
        parse_object({"apiVersion": "llm-d.ai/v1", "kind": kind, "metadata": {"name": "o"}, "spec": spec})


def test_pod_role_label():
    p = parse_object({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": "a", "labels": {"llm-d.ai/role": "decode"}},
                      "status": {"podIP": "10.0.0.1"}})
    assert p.role == "decode"
