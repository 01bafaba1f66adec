"""Opt-in: the Kubernetes source and leader election against a real cluster.

Runs only when EPP_TEST_KUBECONFIG names a kubeconfig (a throw-away cluster such as kind): each test
works in a fresh namespace `epp-test-<random>` that is deleted afterwards. Needs the InferencePool
CRD (inference.networking.k8s.io/v1); the InferenceModel test also needs inference.networking.x-k8s.io
v1alpha2 InferenceModel. Pods run `registry.k8s.io/pause:3.10` with a readiness gate
(`epp.test/ready`), so a test flips readiness by patching that pod condition, as a controller would.
What a real server cannot be made to do on demand (drop a stream, compact history) is covered by the
emulator suite (test_kube.py) only.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from epp.datastore import Datastore
from epp.resources import GROUP_V1, GROUP_X
from epp.sources.kube import CONDITION_TYPE, REASON_CONFLICT, KubeSource
from epp.sources.kube_client import make_api_client
from epp.sources.leader import LeaderElector, LeaseTiming
from tests.sources.apiserver import inference_model, pool_v1
from tests.sources.kube_helpers import wait_for

KUBECONFIG = os.environ.get("EPP_TEST_KUBECONFIG", "")
pytestmark = [
    pytest.mark.kube,
    pytest.mark.skipif(not KUBECONFIG, reason="EPP_TEST_KUBECONFIG is not set: no real cluster to test against"),
]

POOL = "pool"
SEL = {"app": "epp-test"}
GATE = "epp.test/ready"
POD_TIMEOUT = 180.0  # image pull + scheduling on a fresh cluster


@pytest.fixture
def k8s() -> Iterator[tuple[Any, str]]:
    from kubernetes import client

    api = make_api_client(KUBECONFIG)
    core = client.CoreV1Api(api)
    ns = f"epp-test-{secrets.token_hex(3)}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    try:
        yield api, ns
    finally:
        core.delete_namespace(ns)


def _require(api: Any, group: str, version: str, plural: str, ns: str) -> None:
    from kubernetes import client

    try:
        client.CustomObjectsApi(api).list_namespaced_custom_object(group, version, ns, plural, limit=1)
    except client.ApiException as e:
        if e.status == 404:
            pytest.skip(f"{plural}.{group}/{version} is not installed in the cluster")
        raise


class Cluster:
    """Small helpers over the real API for the tests below."""

    def __init__(self, api: Any, ns: str) -> None:
        from kubernetes import client

        self.ns = ns
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def pod(self, name: str, labels: dict[str, str]) -> None:
        self.core.create_namespaced_pod(
            self.ns,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}],
                    "readinessGates": [{"conditionType": GATE}],
                    "terminationGracePeriodSeconds": 0,
                },
            },
        )

    def pod_ip(self, name: str) -> str:
        deadline = time.monotonic() + POD_TIMEOUT
        while time.monotonic() < deadline:
            ip = self.core.read_namespaced_pod(name, self.ns).status.pod_ip
            if ip:
                return str(ip)
            time.sleep(0.5)
        raise AssertionError(f"pod {name} got no IP in {POD_TIMEOUT} s")

    def set_ready(self, name: str, ready: bool) -> None:
        # strategic merge: conditions merge by type, the kubelet's own stay
        body = {"status": {"conditions": [{"type": GATE, "status": "True" if ready else "False"}]}}
        self.core.patch_namespaced_pod_status(
            name, self.ns, body, _content_type="application/strategic-merge-patch+json"
        )

    def relabel(self, name: str, labels: dict[str, str]) -> None:
        self.core.patch_namespaced_pod(
            name, self.ns, {"metadata": {"labels": labels}}, _content_type="application/merge-patch+json"
        )

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, self.ns, grace_period_seconds=0)

    def create(self, obj: dict[str, Any]) -> None:
        group, _, version = obj["apiVersion"].rpartition("/")
        plural = obj["kind"].lower() + "s"
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": self.ns}}
        self.custom.create_namespaced_custom_object(group, version, self.ns, plural, obj)

    def patch(self, api_version: str, kind: str, name: str, body: dict[str, Any]) -> None:
        group, _, version = api_version.rpartition("/")
        self.custom.patch_namespaced_custom_object(group, version, self.ns, kind.lower() + "s", name, body)

    def delete(self, api_version: str, kind: str, name: str) -> None:
        group, _, version = api_version.rpartition("/")
        self.custom.delete_namespaced_custom_object(group, version, self.ns, kind.lower() + "s", name)

    def get(self, api_version: str, kind: str, name: str) -> dict[str, Any]:
        group, _, version = api_version.rpartition("/")
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            group, version, self.ns, kind.lower() + "s", name
        )
        return obj


@pytest.fixture
async def cluster(k8s: tuple[Any, str]) -> AsyncIterator[tuple[Cluster, Any, str]]:
    api, ns = k8s
    _require(api, GROUP_V1, "v1", "inferencepools", ns)
    yield Cluster(api, ns), api, ns


async def _source(api: Any, ns: str) -> tuple[KubeSource, Datastore]:
    ds = Datastore(POOL, ns)
    src = KubeSource(ds, pool_name=POOL, namespace=ns, api_client=api)
    await src.start()
    assert await src.wait_synced(60)
    return src, ds


async def test_pods_and_pool_lifecycle(cluster: tuple[Cluster, Any, str]) -> None:
    c, api, ns = cluster
    c.create(pool_v1(POOL, SEL, [8000]))
    c.pod("a", SEL)
    c.pod("b", SEL)
    ip_a, ip_b = await asyncio.to_thread(c.pod_ip, "a"), await asyncio.to_thread(c.pod_ip, "b")
    src, ds = await _source(api, ns)
    try:
        assert not ds.endpoints  # running but the readiness gate is not set
        c.set_ready("a", True)
        c.set_ready("b", True)
        await wait_for(lambda: set(ds.endpoints) == {f"{ip_a}:8000", f"{ip_b}:8000"}, 30, "pods ready")
        c.set_ready("a", False)
        await wait_for(lambda: set(ds.endpoints) == {f"{ip_b}:8000"}, 30, "a not ready")
        c.relabel("b", {"app": "elsewhere"})
        await wait_for(lambda: not ds.endpoints, 30, "b relabelled out")
        c.relabel("b", SEL)
        await wait_for(lambda: set(ds.endpoints) == {f"{ip_b}:8000"}, 30, "b relabelled in")

        c.patch(f"{GROUP_V1}/v1", "InferencePool", POOL, {"spec": {"selector": {"matchLabels": {"app": "elsewhere"}}}})
        await wait_for(lambda: not ds.endpoints, 30, "selector changed away")
        c.relabel("a", {"app": "elsewhere"})
        c.set_ready("a", True)
        await wait_for(lambda: set(ds.endpoints) == {f"{ip_a}:8000"}, 30, "pod under the new selector")

        c.delete(f"{GROUP_V1}/v1", "InferencePool", POOL)
        await wait_for(lambda: not ds.ready and not ds.endpoints, 30, "pool deleted")
        c.create(pool_v1(POOL, SEL, [8000, 8001]))
        await wait_for(lambda: ds.ready and set(ds.endpoints) == {f"{ip_b}:8000", f"{ip_b}:8001"}, 30, "recreated")

        c.delete_pod("b")
        await wait_for(lambda: not ds.endpoints, 60, "pod deleted")
    finally:
        await src.stop()


async def test_model_name_conflict_condition(cluster: tuple[Cluster, Any, str]) -> None:
    c, api, ns = cluster
    _require(api, GROUP_X, "v1alpha2", "inferencemodels", ns)
    c.create(pool_v1(POOL, SEL, [8000]))
    c.create(inference_model("first", "llama", POOL))
    await asyncio.sleep(1.1)  # creationTimestamp has one-second resolution
    c.create(inference_model("second", "llama", POOL))
    src, ds = await _source(api, ns)

    def accepted(name: str) -> dict[str, Any] | None:
        obj = c.get(f"{GROUP_X}/v1alpha2", "InferenceModel", name)
        conds = (obj.get("status") or {}).get("conditions") or []
        return next((x for x in conds if x["type"] == CONDITION_TYPE), None)

    try:
        await wait_for(lambda: (accepted("second") or {}).get("reason") == REASON_CONFLICT, 30, "loser marked")
        assert ds.models.models["llama"].meta.name == "first"
        c.delete(f"{GROUP_X}/v1alpha2", "InferenceModel", "first")
        await wait_for(lambda: (accepted("second") or {}).get("status") == "True", 30, "conflict cleared")
    finally:
        await src.stop()


async def test_leader_election(k8s: tuple[Any, str]) -> None:
    api, ns = k8s
    timing = LeaseTiming(lease_duration=3, renew_deadline=2, retry_period=0.5)
    changes: dict[str, list[bool]] = {"a": [], "b": []}
    a = LeaderElector(
        namespace=ns, name="epp-test", identity="a", api_client=api, timing=timing, on_change=changes["a"].append
    )
    b = LeaderElector(
        namespace=ns, name="epp-test", identity="b", api_client=api, timing=timing, on_change=changes["b"].append
    )
    await a.start()
    await wait_for(lambda: a.is_leader, 30, "a leads")
    await b.start()
    try:
        await asyncio.sleep(2 * timing.retry_period)
        assert not b.is_leader
        await a.stop(release=False)  # a "crashes"
        await wait_for(lambda: b.is_leader, 30, "b takes over after the lease expires")
        assert changes["b"] == [True]
    finally:
        await b.stop()
        await a.stop()
