"""The whole picker (epp.server.App) fed from the API-server emulator: readiness and leader election."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.sources.leader import lease_name
from tests.sources.apiserver import GROUP_V1, ApiServer, pod, pool_v1
from tests.sources.kube_helpers import wait_for

SEL = {"app": "vllm"}
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer() as server:
        server.create(pool_v1("pool", SEL, [8000]))
        server.create(pod("a", "10.0.0.1", SEL))
        yield server


async def health(app: Any, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_health_port}") as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(r.status)


async def test_picker_becomes_ready_from_the_cluster_and_follows_the_pool(
    api: ApiServer, tmp_path: Path, start_picker: Callable[..., Any]
) -> None:
    kc = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    app, _ = await start_picker(kubeconfig=kc)
    await wait_for(lambda: set(app.datastore.endpoints) == {"10.0.0.1:8000"}, 15, "endpoints from the cluster")
    await _until_health(app, "readiness", SERVING)
    api.delete(f"{GROUP_V1}/v1", "InferencePool", "pool")
    await wait_for(lambda: not app.datastore.ready, 10, "pool deleted")
    await _until_health(app, "readiness", health_pb2.HealthCheckResponse.NOT_SERVING)


async def test_only_the_leader_is_ready_and_a_follower_takes_over(
    api: ApiServer, tmp_path: Path, start_picker: Callable[..., Any]
) -> None:
    kc = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    a, _ = await start_picker(kubeconfig=kc, ha_enable_leader_election=True)
    await wait_for(lambda: a.is_leader, 15, "first replica leads")
    b, _ = await start_picker(kubeconfig=kc, ha_enable_leader_election=True)
    await wait_for(lambda: set(b.datastore.endpoints) == {"10.0.0.1:8000"}, 15, "follower watches too")
    assert not b.is_leader
    await _until_health(a, "readiness", SERVING)
    await _until_health(b, "readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
    # the follower still serves ext_proc: its gRPC service reports SERVING
    await _until_health(b, "envoy.service.ext_proc.v3.ExternalProcessor", SERVING)
    lease = api.get("coordination.k8s.io/v1", "Lease", lease_name("pool", "default"))
    assert lease is not None and lease["spec"]["holderIdentity"]

    await a.stop(0.2)  # releases the lease: b takes over within about one retry period
    await wait_for(lambda: b.is_leader, 15, "follower takes over")
    await _until_health(b, "readiness", SERVING)


async def _until_health(app: Any, service: str, want: int, tries: int = 100) -> None:
    got = -1
    for _ in range(tries):
        got = await health(app, service)
        if got == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{service} health is {got}, wanted {want}")
