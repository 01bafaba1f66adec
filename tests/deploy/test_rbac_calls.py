"""The charts' RBAC against the API calls the picker really makes.

The picker's Kubernetes source and leader election run against the API-server emulator through
the real `kubernetes` client; every request the emulator receives is turned into the RBAC
(group, resource, verb) it needs, and must be granted by deploy/rbac_calls.yaml (which the charts'
Roles equal, see test_charts.py). The world is arranged so every kind of call happens: lists and
watches of every kind, a modelName clash (status patch), and a Lease created, renewed and released.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.deploy.charts import Rule, expected_calls

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("epp.sources.kube") is None or importlib.util.find_spec("epp.sources.leader") is None,
    reason="the picker's Kubernetes code is not present",
)

_CORE = re.compile(r"^/api/v1/namespaces/[^/]+/(?P<res>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")
_GROUP = re.compile(
    r"^/apis/(?P<group>[^/]+)/[^/]+/namespaces/[^/]+/(?P<res>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_TRUE = {"true", "True", "1", "t", "T", "TRUE"}


def rbac_call(method: str, path: str, query: dict[str, list[str]]) -> Rule:
    """The (group, resource[/subresource], verb) one API request needs, as the API server authorizes it."""
    m = _CORE.match(path)
    group = ""
    if m is None:
        m = _GROUP.match(path)
        assert m is not None, f"unexpected API path {path}"
        group = m.group("group")
    resource = m.group("res") + (f"/{m.group('sub')}" if m.group("sub") else "")
    if method == "GET":
        if m.group("name"):
            verb = "get"
        else:
            verb = "watch" if query.get("watch", ["false"])[0] in _TRUE else "list"
    else:
        verb = _VERBS[method]
    return (group, resource, verb)


def test_rbac_call_mapping() -> None:
    assert rbac_call("GET", "/api/v1/namespaces/ns/pods", {"watch": ["true"]}) == ("", "pods", "watch")
    assert rbac_call("GET", "/api/v1/namespaces/ns/pods", {}) == ("", "pods", "list")
    assert rbac_call("PATCH", "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/ns/inferencemodels/m/status",
                     {}) == ("inference.networking.x-k8s.io", "inferencemodels/status", "patch")  # fmt: skip
    assert rbac_call("PUT", "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l", {}) == (
        "coordination.k8s.io", "leases", "update")  # fmt: skip


async def test_every_api_call_is_granted_and_every_grant_is_used(tmp_path: Path) -> None:
    from epp.datastore import Datastore
    from epp.sources.kube import KubeSource
    from epp.sources.leader import LeaderElector, lease_name
    from tests.sources.apiserver import (
        DEFAULT_TYPES,
        ApiServer,
        ResourceType,
        inference_model,
        objective,
        pod,
        pool_v1,
        rewrite,
    )
    from tests.sources.kube_helpers import FAST_LEASE, FAST_WATCH, wait_for

    sel = {"app": "vllm"}
    # llm-d's API group served too, so the picker watches those kinds as it would in a cluster with them
    llmd = tuple(ResourceType("llm-d.ai", plural, kind, ("v1alpha2",))
                 for plural, kind in (("inferenceobjectives", "InferenceObjective"),
                                      ("inferencemodelrewrites", "InferenceModelRewrite")))  # fmt: skip
    with ApiServer(types=DEFAULT_TYPES + llmd) as api:
        kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
        api.create(pool_v1("pool", sel, [8000]))
        api.create(pod("a", "10.0.0.1", sel))
        api.create(inference_model("old", "llama", "pool", created="2025-01-01T00:00:00Z"))
        api.create(inference_model("new", "llama", "pool", created="2025-06-01T00:00:00Z"))
        api.create(rewrite("rw", "pool", "chat", "llama"))
        api.create(objective("premium", "pool", 10))
        ds = Datastore("pool", "default")
        src = KubeSource(ds, pool_name="pool", namespace="default", kubeconfig=kubeconfig, timing=FAST_WATCH,
                         models_grace=1.0)  # fmt: skip
        elector = LeaderElector(namespace="default", name=lease_name("pool", "default"), kubeconfig=kubeconfig,
                                timing=FAST_LEASE)  # fmt: skip
        try:
            await src.start()
            assert await src.wait_synced(10)
            await elector.start()
            await wait_for(lambda: elector.is_leader, what="leadership")
            await wait_for(lambda: any(m == "PATCH" for m, _, _ in api.requests), what="status patch")
            api.set_pod_ready("a", False)  # an event on the open watches
            await wait_for(lambda: not ds.endpoints, what="pod removed")
        finally:
            await elector.stop()
            await src.stop()
        requests = list(api.requests)

    used = {rbac_call(m, p, q) for m, p, q in requests}
    granted = expected_calls(leader_election=True)
    assert used - granted == set(), "the picker makes calls its Role does not grant"

    # Every grant is used, except the reads the Role grants for symmetry (get on pods and on the
    # inference objects, and kinds that exist in only one of the two API groups).
    for group, resource, verb in sorted(granted - used):
        if verb == "get" or (group, resource) in _ONE_GROUP_ONLY:
            continue
        if (group, resource) == ("inference.networking.x-k8s.io", "inferencepools") and verb in ("list", "watch"):
            continue  # the pool is read in the group --pool-group names (v1 here)
        if (group, resource) == ("inference.networking.x-k8s.io", "inferencemodels/status") and verb == "update":
            continue  # status is written with PATCH; update is the verb a PUT would need
        pytest.fail(f"granted but never used: {group or 'core'} {resource} {verb}")


_ONE_GROUP_ONLY = {("inference.networking.k8s.io", "inferencemodels")}  # InferenceModel is x-k8s.io only
