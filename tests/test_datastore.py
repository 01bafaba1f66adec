"""Endpoints derived from pool + pods + static endpoints; listeners see every change."""

from __future__ import annotations

from epp.datastore import Datastore
from epp.resources import parse_object, pool_from_flags


def pod(name, ip, labels=None, ready=True, ann=None, ns="default"):
    return parse_object({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": "x"},
                                      "annotations": ann or {}},
                         "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}})


def test_endpoints_follow_pool_and_pods():
    ds = Datastore("p")
    changes = []
    ds.subscribe(lambda a, r: changes.append(([e.address for e in a], [e.address for e in r])))
    ds.replace_pods([pod("a", "10.0.0.1"), pod("b", "10.0.0.2", ready=False), pod("c", "10.0.0.3", {"app": "y"}),
                     pod("d", "10.0.0.4", ns="other")])
    assert not ds.endpoints and not ds.ready
    ds.set_pool(pool_from_flags("p", "default", {"app": "x"}, [8000, 8001]))
    assert sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.1:8001"] and ds.ready
    ep = ds.endpoints["10.0.0.1:8000"]
    ep.inflight = 3
    ds.upsert_pod(pod("a", "10.0.0.1", {"app": "x", "inference.networking.k8s.io/engine-type": "sglang"}))
    assert ds.endpoints["10.0.0.1:8000"] is ep and ep.engine == "sglang" and ep.inflight == 3
    ds.upsert_pod(pod("a", "10.0.0.1", ann={"inference.networking.k8s.io/active-ports": "8001"}))
    assert list(ds.endpoints) == ["10.0.0.1:8001"]
    ds.upsert_pod(pod("b", "10.0.0.2"))
    assert "10.0.0.2:8000" in ds.endpoints
    ds.delete_pod("default/b")
    ds.set_pool(None)
    assert not ds.endpoints and not ds.ready
    assert changes[0] == (["10.0.0.1:8000", "10.0.0.1:8001"], [])
    assert changes[-1][1] == ["10.0.0.1:8001"]


def test_static_endpoints_and_pool_ref_filter():
    ds = Datastore("p")
    ds.set_static_endpoints(["127.0.0.1:1", "127.0.0.1:1", "[::1]:2"])
    ds.set_pool(None)
    assert list(ds.endpoints) == ["127.0.0.1:1", "[::1]:2"] and ds.ready
    assert ds.endpoints["[::1]:2"].ip == "::1"
    other = parse_object({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
                          "metadata": {"name": "o"}, "spec": {"priority": 5, "poolRef": {"name": "other"}}})
    mine = parse_object({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
                         "metadata": {"name": "m"}, "spec": {"priority": -2, "poolRef": {"name": "p"}}})
    ds.replace_objectives([other, mine])
    assert ds.objective_priority("m") == -2 and ds.objective_priority("o") is None


def test_llmd_role_and_engine_labels_reach_the_endpoint():
    ds = Datastore("p")
    ds.set_pool(pool_from_flags("p", "default", {"app": "x"}, [8000]))
    ds.replace_pods([pod("a", "10.0.0.1", {"app": "x", "llm-d.ai/role": "decode", "llm-d.ai/engine-type": "sglang"}),
                     pod("b", "10.0.0.2")])
    a, b = ds.endpoints["10.0.0.1:8000"], ds.endpoints["10.0.0.2:8000"]
    assert (a.role, a.engine) == ("decode", "sglang") and (b.role, b.engine) == ("", "vllm")
    ds.upsert_pod(pod("a", "10.0.0.1", {"app": "x", "llm-d.ai/role": "prefill"}))  # label change in place
    assert ds.endpoints["10.0.0.1:8000"] is a and a.role == "prefill"
