"""Leader election on a Lease, against the API-server emulator through the real client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from epp.sources.leader import LeaderElector, LeaseTiming, lease_name
from tests.sources.apiserver import ApiServer
from tests.sources.kube_helpers import FAST_LEASE, stays, wait_for

LEASE = lease_name("pool", "default")
Make = Callable[..., Awaitable[tuple[LeaderElector, list[bool]]]]


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer() as server:
        yield server


@pytest.fixture
async def make_elector(api: ApiServer, tmp_path: Path) -> AsyncIterator[Make]:
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    made: list[LeaderElector] = []

    async def make(identity: str, timing: LeaseTiming = FAST_LEASE) -> tuple[LeaderElector, list[bool]]:
        changes: list[bool] = []
        e = LeaderElector(
            namespace="default",
            name=LEASE,
            identity=identity,
            kubeconfig=kubeconfig,
            on_change=changes.append,
            timing=timing,
        )
        made.append(e)
        await e.start()
        return e, changes

    yield make
    for e in made:
        await e.stop()


def lease(api: ApiServer) -> dict[str, Any]:
    obj = api.get("coordination.k8s.io/v1", "Lease", LEASE)
    assert obj is not None
    return obj


def holder(api: ApiServer) -> str | None:
    obj = api.get("coordination.k8s.io/v1", "Lease", LEASE)
    return None if obj is None else obj["spec"].get("holderIdentity")


def test_lease_name_is_derived_from_namespace_and_pool() -> None:
    assert lease_name("my-pool", "ns1") == "epp-ns1-my-pool"
    assert len(lease_name("p" * 300, "ns")) <= 253
    with pytest.raises(ValueError):
        LeaseTiming(lease_duration=5, renew_deadline=6, retry_period=1)


async def test_single_replica_acquires_and_renews(api: ApiServer, make_elector: Make) -> None:
    e, changes = await make_elector("a")
    await wait_for(lambda: e.is_leader, what="leader")
    assert changes == [True]
    spec = lease(api)["spec"]
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == FAST_LEASE.lease_duration
    first = spec["renewTime"]
    await wait_for(lambda: lease(api)["spec"]["renewTime"] != first, what="renewal")
    await e.stop()
    assert changes == [True, False]
    assert holder(api) is None  # released


async def test_one_leader_among_replicas_and_clean_failover(api: ApiServer, make_elector: Make) -> None:
    a, ca = await make_elector("a")
    b, cb = await make_elector("b")
    await wait_for(lambda: a.is_leader or b.is_leader, what="a leader")
    assert await stays(lambda: a.is_leader != b.is_leader, 0.5)  # never two, never none
    leader, follower, fchanges = (a, b, cb) if a.is_leader else (b, a, ca)
    assert holder(api) == leader.identity
    transitions = lease(api)["spec"]["leaseTransitions"]
    await leader.stop()  # releases the lease: the follower takes over within a retry period or so
    await wait_for(lambda: follower.is_leader, what="follower takes over")
    assert fchanges == [True] and holder(api) == follower.identity
    assert lease(api)["spec"]["leaseTransitions"] == transitions + 1


async def test_crashed_leader_is_replaced_after_the_lease_expires(api: ApiServer, make_elector: Make) -> None:
    a, _ = await make_elector("a")
    await wait_for(lambda: a.is_leader, what="a leads")
    b, cb = await make_elector("b")
    await stays(lambda: not b.is_leader, 0.3)
    await a.stop(release=False)  # as if the process died: the lease stays with "a" until it expires
    assert holder(api) == "a"
    await wait_for(lambda: b.is_leader, timeout=10, what="b takes over after expiry")
    assert cb == [True] and holder(api) == "b"


async def test_lease_taken_by_another_holder_then_regained(api: ApiServer, make_elector: Make) -> None:
    e, changes = await make_elector("a")
    await wait_for(lambda: e.is_leader, what="leader")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    api.patch("coordination.k8s.io/v1", "Lease", LEASE, {"spec": {"holderIdentity": "intruder", "renewTime": now}})
    await wait_for(lambda: not e.is_leader, what="steps down for the other holder")
    assert changes == [True, False]
    # the intruder never renews: once its lease has expired (by our own clock) we take it back
    await wait_for(lambda: e.is_leader, timeout=10, what="regained")
    assert changes == [True, False, True] and holder(api) == "a"


async def test_renew_failures_past_the_deadline_step_down_then_recover(api: ApiServer, make_elector: Make) -> None:
    e, changes = await make_elector("a")
    await wait_for(lambda: e.is_leader, what="leader")
    api.inject("*", "/leases", 500, times=1000)  # every lease call fails
    await wait_for(lambda: not e.is_leader, what="stepped down after the renew deadline")
    assert changes == [True, False]
    api.clear_injected()
    await wait_for(lambda: e.is_leader, timeout=10, what="leader again")
    assert changes == [True, False, True]


async def test_stale_write_is_refused_with_409(api: ApiServer, make_elector: Make) -> None:
    # the contract the election relies on: a PUT with an old resourceVersion loses
    e, _ = await make_elector("a")
    await wait_for(lambda: e.is_leader, what="leader")
    stale = lease(api)
    api.patch("coordination.k8s.io/v1", "Lease", LEASE, {"metadata": {"labels": {"touched": "yes"}}})
    cfg = client.Configuration()
    cfg.host = api.url
    cfg.api_key = {"authorization": f"Bearer {api.token}"}
    leases = client.CoordinationV1Api(client.ApiClient(cfg))
    with pytest.raises(client.ApiException) as info:
        leases.replace_namespaced_lease(LEASE, "default", stale)
    assert info.value.status == 409
