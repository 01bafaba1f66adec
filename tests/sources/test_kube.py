"""KubeSource against the API-server emulator, through the real `kubernetes` client over HTTP."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from epp.datastore import Datastore
from epp.resources import GROUP_V1, GROUP_X, pool_from_flags
from epp.sources.kube import CONDITION_TYPE, REASON_ACCEPTED, REASON_CONFLICT, KubeSource
from tests.sources.apiserver import (
    DEFAULT_TYPES,
    ApiServer,
    inference_model,
    objective,
    pod,
    pool_v1,
    pool_v1alpha2,
    rewrite,
)
from tests.sources.kube_helpers import FAST_WATCH, stays, wait_for

POOL = "pool"
SEL = {"app": "vllm"}
PODS_PATH = "/api/v1/namespaces/default/pods"
Make = Callable[..., Awaitable[tuple[KubeSource, Datastore]]]


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer() as server:
        yield server


@pytest.fixture
async def make_source(api: ApiServer, tmp_path: Path) -> AsyncIterator[Make]:
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    made: list[KubeSource] = []

    async def make(synced: bool = True, **kw: Any) -> tuple[KubeSource, Datastore]:
        ds = Datastore(POOL, "default")
        kw.setdefault("pool_name", POOL)
        kw.setdefault("namespace", "default")
        kw.setdefault("timing", FAST_WATCH)
        kw.setdefault("models_grace", 3.0)
        src = KubeSource(ds, kubeconfig=kubeconfig, **kw)
        made.append(src)
        await src.start()
        if synced:
            assert await src.wait_synced(10), "source did not sync"
        return src, ds

    yield make
    for src in made:
        await src.stop()


def addrs(ds: Datastore) -> set[str]:
    return set(ds.endpoints)


# ---- pool and pods -------------------------------------------------------------------------------
async def test_initial_sync_derives_endpoints(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000, 8001]))
    api.create(pod("a", "10.0.0.1", SEL))
    api.create(pod("b", "10.0.0.2", {**SEL, "inference.networking.k8s.io/engine-type": "sglang"}))
    api.create(pod("c", "10.0.0.3", {"app": "other"}))
    api.create(pod("d", "10.0.0.4", SEL, ready=False))
    api.create(pod("e", None, SEL))
    api.create(pod("f", "10.0.0.6", SEL, annotations={"inference.networking.k8s.io/active-ports": "8001"}))
    _, ds = await make_source()
    assert ds.ready
    assert addrs(ds) == {"10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000", "10.0.0.2:8001", "10.0.0.6:8001"}
    assert ds.endpoints["10.0.0.2:8000"].engine == "sglang"
    assert ds.pool is not None and ds.pool.picker is not None and ds.pool.picker.port == 9002
    # the server did the selecting: pods by label selector, the pool by name
    assert api.requests_to(PODS_PATH, watch=False)[0]["labelSelector"] == ["app=vllm"]
    pool_q = api.requests_to("/inferencepools", watch=False)[0]
    assert pool_q["fieldSelector"] == [f"metadata.name={POOL}"]


async def test_pod_ready_notready_terminating_deleted(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL, ready=False))
    api.create(pod("b", "10.0.0.2", SEL))
    _, ds = await make_source()
    assert addrs(ds) == {"10.0.0.2:8000"}

    api.set_pod_ready("a", True)
    await wait_for(lambda: "10.0.0.1:8000" in ds.endpoints, what="pod a ready")
    api.set_pod_ready("a", False)
    await wait_for(lambda: "10.0.0.1:8000" not in ds.endpoints, what="pod a not ready")

    api.patch("v1", "Pod", "b", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}, raw=True)
    await wait_for(lambda: not ds.endpoints, what="terminating pod b removed")

    api.set_pod_ready("a", True)
    await wait_for(lambda: addrs(ds) == {"10.0.0.1:8000"}, what="pod a back")
    api.delete("v1", "Pod", "a")
    await wait_for(lambda: not ds.endpoints, what="pod a deleted")
    api.create(pod("c", "10.0.0.3", SEL))
    await wait_for(lambda: addrs(ds) == {"10.0.0.3:8000"}, what="new pod c")


async def test_pod_relabelled_out_of_and_into_selector(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    api.create(pod("b", "10.0.0.2", {"app": "other"}))
    _, ds = await make_source()
    assert addrs(ds) == {"10.0.0.1:8000"}
    api.patch("v1", "Pod", "a", {"metadata": {"labels": {"app": "other"}}})
    await wait_for(lambda: not ds.endpoints, what="a relabelled out")
    api.patch(
        "v1", "Pod", "b", {"metadata": {"labels": {"app": "vllm", "inference.networking.k8s.io/engine-type": "trtllm"}}}
    )
    await wait_for(lambda: addrs(ds) == {"10.0.0.2:8000"}, what="b relabelled in")
    assert ds.endpoints["10.0.0.2:8000"].engine == "trtllm"
    # a label change that keeps the pod in the pool updates the endpoint in place
    api.patch("v1", "Pod", "b", {"metadata": {"labels": {"inference.networking.k8s.io/engine-type": "sglang"}}})
    await wait_for(lambda: ds.endpoints["10.0.0.2:8000"].engine == "sglang", what="engine label update")


async def test_pool_selector_and_ports_change(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    api.create(pod("b", "10.0.0.2", {"app": "new"}))
    api.create(pod("c", "10.0.0.3", {"app": "vllm", "tier": "x"}))
    _, ds = await make_source()
    assert addrs(ds) == {"10.0.0.1:8000", "10.0.0.3:8000"}

    api.patch(f"{GROUP_V1}/v1", "InferencePool", POOL, {"spec": {"selector": {"matchLabels": {"app": "new"}}}})
    await wait_for(lambda: addrs(ds) == {"10.0.0.2:8000"}, what="endpoints follow the new selector")
    # the new watch starts after its list has been applied, so wait for it rather than assert it
    await wait_for(
        lambda: any(q.get("labelSelector") == ["app=new"] for q in api.requests_to(PODS_PATH, watch=True)),
        what="pod watch with the new selector",
    )
    await wait_for(lambda: api.watch_count("/pods") == 1, what="old pod watch closed")
    # pods of the new selector keep flowing on the new watch
    api.create(pod("d", "10.0.0.4", {"app": "new"}))
    await wait_for(lambda: "10.0.0.4:8000" in ds.endpoints, what="pod on the new watch")
    api.patch("v1", "Pod", "a", {"metadata": {"labels": {"app": "new"}}})
    await wait_for(lambda: "10.0.0.1:8000" in ds.endpoints, what="a moved into the new selector")

    api.patch(f"{GROUP_V1}/v1", "InferencePool", POOL, {"spec": {"targetPorts": [{"number": 9000}, {"number": 9001}]}})
    await wait_for(
        lambda: addrs(ds) == {f"10.0.0.{i}:{p}" for i in (1, 2, 4) for p in (9000, 9001)}, what="target ports change"
    )


async def test_pool_deleted_and_recreated(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    _, ds = await make_source()
    assert ds.ready and addrs(ds) == {"10.0.0.1:8000"}
    api.delete(f"{GROUP_V1}/v1", "InferencePool", POOL)
    await wait_for(lambda: not ds.ready and not ds.endpoints, what="pool deleted: not ready, no endpoints")
    api.create(pool_v1(POOL, SEL, [8000]))
    await wait_for(lambda: ds.ready and addrs(ds) == {"10.0.0.1:8000"}, what="pool recreated")
    api.delete(f"{GROUP_V1}/v1", "InferencePool", POOL)
    await wait_for(lambda: not ds.ready, what="deleted again")
    api.create(pool_v1(POOL, {"app": "other"}, [7000]))
    api.create(pod("b", "10.0.0.2", {"app": "other"}))
    await wait_for(lambda: ds.ready and addrs(ds) == {"10.0.0.2:7000"}, what="recreated with another selector")


async def test_pool_missing_at_start_then_created(api: ApiServer, make_source: Make) -> None:
    api.create(pod("a", "10.0.0.1", SEL))
    src, ds = await make_source()
    assert src.synced and not ds.ready and not ds.endpoints
    api.create(pool_v1(POOL, SEL, [8000]))
    await wait_for(lambda: ds.ready and addrs(ds) == {"10.0.0.1:8000"}, what="pool created later")


async def test_other_pools_are_ignored(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pool_v1("other", {"app": "x"}, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    _, ds = await make_source()
    api.delete(f"{GROUP_V1}/v1", "InferencePool", "other")
    assert await stays(lambda: ds.ready and addrs(ds) == {"10.0.0.1:8000"})


async def test_v1alpha2_pool_group(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1alpha2(POOL, SEL, 8000))
    api.create(pool_v1(POOL, SEL, [9999]))  # same name in the other group: not ours
    api.create(pod("a", "10.0.0.1", SEL))
    _, ds = await make_source(pool_group=GROUP_X)
    assert addrs(ds) == {"10.0.0.1:8000"}
    assert ds.pool is not None and ds.pool.picker is not None and ds.pool.picker.failure_mode == "FailOpen"


async def test_pool_from_flags_watches_no_pool(api: ApiServer, make_source: Make) -> None:
    api.create(pod("a", "10.0.0.1", {"role": "llm"}))
    api.create(pod("b", "10.0.0.2", SEL))
    override = pool_from_flags(POOL, "default", {"role": "llm"}, [8000, 8002])
    _, ds = await make_source(pool_override=override)
    assert addrs(ds) == {"10.0.0.1:8000", "10.0.0.1:8002"}
    assert not api.requests_to("/inferencepools")


async def test_events_flow_without_chunked_encoding(api: ApiServer, make_source: Make) -> None:
    # a proxy may relay the watch body unchunked: events must still arrive one by one, not at the end
    api.chunked_watch = False
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    src, ds = await make_source()
    api.set_pod_ready("a", False)
    await wait_for(lambda: not ds.endpoints, timeout=3, what="event seen before the stream ends")
    threads = [*src._reflectors]
    await src.stop()  # the socket is found and shut down here too, so the threads end at once
    assert all(r.join(0) for r in threads)


# ---- watch robustness ----------------------------------------------------------------------------
async def test_watch_dropped_mid_stream_resumes_without_losing_events(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    api.create(pod("b", "10.0.0.2", SEL))
    _, ds = await make_source()
    await wait_for(lambda: api.watch_count("/pods") == 1, what="pod watch open")
    lists_before = len(api.requests_to(PODS_PATH, watch=False))

    api.hold_watches()  # reconnects wait: the changes below happen while the client is disconnected
    api.drop_watches()
    await wait_for(lambda: api.watch_count() == 0, what="all watches dropped")
    api.set_pod_ready("a", False)
    api.create(pod("c", "10.0.0.3", SEL))
    api.create(inference_model("m1", "llama", POOL))
    api.release_watches()

    await wait_for(lambda: addrs(ds) == {"10.0.0.2:8000", "10.0.0.3:8000"}, what="missed pod events replayed")
    await wait_for(lambda: "llama" in ds.models.models, what="missed model event replayed")
    # it resumed from its resourceVersion instead of listing again
    assert len(api.requests_to(PODS_PATH, watch=False)) == lists_before
    resumed = api.requests_to(PODS_PATH, watch=True)[-1]
    assert resumed["resourceVersion"][0] not in ("", "0")


async def test_server_timeout_and_bookmarks_resume_from_newest_version(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    src, ds = await make_source()
    await wait_for(lambda: api.watch_count("/pods") == 1, what="pod watch open")
    lists_before = len(api.requests_to(PODS_PATH, watch=False))
    # unrelated writes move the global resourceVersion on; a bookmark tells the pod watch about it
    for i in range(3):
        api.create(objective(f"o{i}", POOL, i))
    api.bookmark()
    want_rv = str(api.rv)
    pods = src._pods
    assert pods is not None
    await wait_for(lambda: pods.resource_version == want_rv, what="bookmark advanced the resourceVersion")
    # history before now is gone: only a watch resumed from the bookmark's version avoids a 410
    api.compact()
    api.end_watches()  # as when timeoutSeconds runs out
    await wait_for(lambda: len(api.requests_to(PODS_PATH, watch=True)) >= 2, what="watch re-opened")
    api.set_pod_ready("a", False)
    await wait_for(lambda: not ds.endpoints, what="event after the resumed watch")
    assert len(api.requests_to(PODS_PATH, watch=False)) == lists_before
    assert api.requests_to(PODS_PATH, watch=True)[-1]["resourceVersion"] == [want_rv]


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_410_gone_relists_and_removes_what_vanished(api: ApiServer, make_source: Make, as_http: bool) -> None:
    api.watch_410_as_http = as_http
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    api.create(pod("b", "10.0.0.2", SEL))
    api.create(inference_model("m1", "llama", POOL))
    api.create(rewrite("r1", POOL, "alias", "llama", group=GROUP_V1))
    api.create(objective("o1", POOL, 5))
    _, ds = await make_source()
    assert "llama" in ds.models.models and "alias" in ds.models.exact and "o1" in ds.objectives
    lists_before = len(api.requests_to(PODS_PATH, watch=False))

    api.hold_watches()
    api.drop_watches()
    await wait_for(lambda: api.watch_count() == 0, what="watches dropped")
    api.delete("v1", "Pod", "a")
    api.create(pod("c", "10.0.0.3", SEL))
    api.delete(f"{GROUP_X}/v1alpha2", "InferenceModel", "m1")
    api.delete(f"{GROUP_V1}/v1alpha2", "InferenceModelRewrite", "r1")
    api.delete(f"{GROUP_X}/v1alpha2", "InferenceObjective", "o1")
    api.compact()  # the client's resourceVersion is now too old
    api.release_watches()

    await wait_for(lambda: addrs(ds) == {"10.0.0.2:8000", "10.0.0.3:8000"}, what="relist reconciled pods")
    await wait_for(
        lambda: not ds.models.models and not ds.models.exact and not ds.objectives,
        what="vanished model objects removed",
    )
    assert len(api.requests_to(PODS_PATH, watch=False)) > lists_before


async def test_410_error_event_on_an_open_stream(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    _, ds = await make_source()
    await wait_for(lambda: api.watch_count("/pods") == 1, what="pod watch open")
    lists_before = len(api.requests_to(PODS_PATH, watch=False))
    api.hold_watches()
    api.expire_watches()
    await wait_for(lambda: api.watch_count() == 0, what="streams ended")
    api.delete("v1", "Pod", "a")
    api.release_watches()
    await wait_for(lambda: not ds.endpoints, what="relist after ERROR 410")
    assert len(api.requests_to(PODS_PATH, watch=False)) > lists_before


async def test_api_errors_back_off_and_recover(
    api: ApiServer, make_source: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="epp.sources")
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    api.inject("GET", "/pods$", 500, times=4)
    api.inject("GET", "/inferencepools$", 403, times=2, reason="Forbidden")
    _, ds = await make_source()
    assert addrs(ds) == {"10.0.0.1:8000"}
    failing = [r for r in caplog.records if r.getMessage() == "watch API error, backing off"]
    # logged once per state change, not per retry
    assert len([r for r in failing if r.__dict__.get("watch") == "pods"]) == 1
    # errors on a resumed watch: backs off, then resumes
    api.inject("GET", "/pods$", 503, times=3)
    api.end_watches()
    api.set_pod_ready("a", False)
    await wait_for(lambda: not ds.endpoints, what="recovered after watch errors")


async def test_resource_not_installed_is_tolerated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="epp.sources")
    types = tuple(t for t in DEFAULT_TYPES if t.plural not in ("inferenceobjectives", "inferencemodelrewrites"))
    types = tuple(
        t if t.plural != "inferencemodels" else type(t)(t.group, t.plural, t.kind, ("v1alpha2",), True) for t in types
    )
    with ApiServer(types=types) as api:
        api.create(pool_v1(POOL, SEL, [8000]))
        api.create(pod("a", "10.0.0.1", SEL))
        api.create(inference_model("m1", "llama", POOL))
        ds = Datastore(POOL, "default")
        src = KubeSource(
            ds,
            pool_name=POOL,
            namespace="default",
            kubeconfig=str(api.write_kubeconfig(tmp_path / "kc")),
            timing=FAST_WATCH,
        )
        await src.start()
        try:
            assert await src.wait_synced(10)
            assert addrs(ds) == {"10.0.0.1:8000"} and "llama" in ds.models.models
            # retries happen (slowly) but the absence is logged once per resource
            await wait_for(lambda: len(api.requests_to("/inferenceobjectives")) >= 4, what="absent retries")
        finally:
            await src.stop()
    absent = [r for r in caplog.records if r.getMessage().startswith("resource not served")]
    assert sorted(r.__dict__["watch"] for r in absent) == sorted(
        [
            f"inferencemodels.{GROUP_X}/v1alpha1",
            f"inferencemodelrewrites.{GROUP_V1}/v1alpha2",
            f"inferencemodelrewrites.{GROUP_X}/v1alpha2",
            f"inferenceobjectives.{GROUP_V1}/v1alpha2",
            f"inferenceobjectives.{GROUP_X}/v1alpha2",
            "inferencemodelrewrites.llm-d.ai/v1alpha2",
            "inferenceobjectives.llm-d.ai/v1alpha2",
        ]
    )


async def test_stop_ends_threads_and_deliveries(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    src, ds = await make_source()
    await wait_for(lambda: api.watch_count() >= 8, what="all watches open")
    threads = [*src._reflectors]
    await src.stop()
    assert all(r.join(0) for r in threads)
    api.set_pod_ready("a", False)
    assert await stays(lambda: addrs(ds) == {"10.0.0.1:8000"})
    await wait_for(lambda: api.watch_count() == 0, what="server saw the watches close")


# ---- models, rewrites, objectives ----------------------------------------------------------------
async def test_model_objects_of_every_version_and_group(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(inference_model("m1", "llama", POOL, version="v1alpha1", criticality="Critical"))
    api.create(inference_model("m-other", "mistral", "another-pool"))
    api.create(rewrite("r-x", POOL, "alias-x", "llama", group=GROUP_X))
    api.create(rewrite("r-v1", POOL, "alias-v1", "llama", group=GROUP_V1))
    api.create(objective("gold", POOL, 10, group=GROUP_V1))
    api.create(objective("bronze", POOL, -1, group=GROUP_X))
    _, ds = await make_source()
    assert set(ds.models.models) == {"llama"}
    assert ds.models.models["llama"].priority == 100
    assert set(ds.models.exact) == {"alias-x", "alias-v1"}
    assert ds.objective_priority("gold") == 10 and ds.objective_priority("bronze") == -1

    # one storage served at two versions: an update seen through both watches, a delete through both
    api.patch(f"{GROUP_X}/v1alpha2", "InferenceModel", "m1", {"spec": {"modelName": "llama-2"}})
    await wait_for(lambda: set(ds.models.models) == {"llama-2"}, what="model renamed")
    api.delete(f"{GROUP_X}/v1alpha2", "InferenceModel", "m1")
    await wait_for(lambda: not ds.models.models, what="model deleted")
    api.delete(f"{GROUP_V1}/v1alpha2", "InferenceObjective", "gold")
    await wait_for(lambda: ds.objective_priority("gold") is None, what="objective deleted")
    api.patch(f"{GROUP_X}/v1alpha2", "InferenceModelRewrite", "r-x", {"spec": {"poolRef": {"name": "another-pool"}}})
    await wait_for(lambda: set(ds.models.exact) == {"alias-v1"}, what="rewrite moved to another pool")


async def test_invalid_objects_are_logged_with_the_field_and_skipped(
    api: ApiServer, make_source: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="epp.sources.kube")
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(pod("a", "10.0.0.1", SEL))
    bad = inference_model("bad", "llama", POOL)
    bad["spec"]["criticality"] = "Urgent"
    api.create(bad)
    api.create(inference_model("good", "mistral", POOL))
    _, ds = await make_source()
    assert set(ds.models.models) == {"mistral"}
    logged = [r for r in caplog.records if r.getMessage() == "invalid object skipped"]
    assert [(r.__dict__["object"], r.__dict__["field"]) for r in logged] == [("default/bad", "spec.criticality")]

    # a valid model turned invalid disappears; fixed, it comes back
    api.patch(
        f"{GROUP_X}/v1alpha2", "InferenceModel", "good", {"spec": {"targetModels": [{"name": "x", "weight": -1}]}}
    )
    await wait_for(lambda: not ds.models.models, what="invalid update removes the model")
    api.patch(f"{GROUP_X}/v1alpha2", "InferenceModel", "good", {"spec": {"targetModels": None}})
    await wait_for(lambda: set(ds.models.models) == {"mistral"}, what="fixed model back")

    # an invalid pool update is logged and the last valid pool stays in force
    api.patch(f"{GROUP_V1}/v1", "InferencePool", POOL, {"spec": {"targetPorts": [{"number": 70000}]}})
    await wait_for(
        lambda: any(r.__dict__.get("field") == "spec.targetPorts[0].number" for r in caplog.records),
        what="invalid pool logged",
    )
    assert ds.ready and addrs(ds) == {"10.0.0.1:8000"}


def _accepted(api: ApiServer, name: str) -> dict[str, Any] | None:
    obj = api.get(f"{GROUP_X}/v1alpha2", "InferenceModel", name)
    assert obj is not None
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == CONDITION_TYPE), None)


async def test_model_name_conflict_sets_and_clears_the_losers_condition(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(inference_model("old", "llama", POOL, created="2025-01-01T00:00:00Z"))
    api.create(inference_model("new", "llama", POOL, created="2025-06-01T00:00:00Z"))
    api.create(inference_model("alone", "mistral", POOL))
    _, ds = await make_source()
    assert ds.models.models["llama"].meta.name == "old"
    await wait_for(lambda: _accepted(api, "new") is not None, what="loser's condition written")
    cond = _accepted(api, "new")
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", REASON_CONFLICT)
    assert "default/old" in cond["message"] and cond["lastTransitionTime"]
    assert _accepted(api, "old") is None and _accepted(api, "alone") is None  # nothing else is written
    patches = lambda: [q for m, p, q in api.requests if m == "PATCH"]  # noqa: E731
    assert await stays(lambda: len(patches()) == 1)  # written once, not on every event

    api.delete(f"{GROUP_X}/v1alpha2", "InferenceModel", "old")
    await wait_for(lambda: (_accepted(api, "new") or {}).get("status") == "True", what="condition cleared")
    cond = _accepted(api, "new")
    assert cond is not None and cond["reason"] == REASON_ACCEPTED
    assert ds.models.models["llama"].meta.name == "new"
    assert await stays(lambda: len(patches()) == 2)


async def test_status_is_written_only_by_the_writer(api: ApiServer, make_source: Make) -> None:
    api.create(pool_v1(POOL, SEL, [8000]))
    api.create(inference_model("old", "llama", POOL, created="2025-01-01T00:00:00Z"))
    api.create(inference_model("new", "llama", POOL, created="2025-06-01T00:00:00Z"))
    src, _ = await make_source(write_status=False)
    assert await stays(lambda: _accepted(api, "new") is None)
    src.set_status_writer(True)
    await wait_for(lambda: _accepted(api, "new") is not None, what="written once leading")
