"""gRPC health by rule, through a real grpc health client: any service name without leader election
(the reference's chart probes ask `inference-extension`), the lease with it, and draining."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.sources.apiserver import ApiServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
EXTPROC = "envoy.service.ext_proc.v3.ExternalProcessor"


async def check(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(r.status)


async def wait_status(port: int, service: str, want: int, tries: int = 200) -> int:
    got = -1
    for _ in range(tries):  # bounded: 200 x 50 ms
        got = await check(port, service)
        if got == want:
            return got
        await asyncio.sleep(0.05)
    return got


async def test_without_leader_election_any_service_name_is_serving_once_ready(start_picker):
    app, _ = await start_picker(endpoints=["127.0.0.1:9"])
    for port in (app.grpc_health_port, app.grpc_port):  # the health port and the ext_proc port
        for svc in ("inference-extension", "readiness", "liveness", "", EXTPROC, "some-name-nobody-registered"):
            assert await check(port, svc) == SERVING, (port, svc)


async def test_not_ready_until_the_pool_loads_and_liveness_always_serves(start_picker, tmp_path):
    (tmp_path / "pods.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: x}}\n"
        "status: {podIP: 10.0.0.1, conditions: [{type: Ready, status: 'True'}]}\n")
    app, _ = await start_picker(manifests=[str(tmp_path)])  # pods, but no InferencePool: not loaded
    assert await check(app.grpc_health_port, "inference-extension") == NOT_SERVING
    assert await check(app.grpc_health_port, "anything") == NOT_SERVING
    assert await check(app.grpc_health_port, "liveness") == SERVING
    (tmp_path / "pool.yaml").write_text(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {name: pool}\n"
        "spec: {selector: {matchLabels: {app: x}}, targetPorts: [{number: 8000}]}\n")
    assert await wait_status(app.grpc_health_port, "inference-extension", SERVING) == SERVING


async def test_draining_turns_everything_but_liveness_not_serving(start_picker):
    app, _ = await start_picker(endpoints=["127.0.0.1:9"])
    assert await check(app.grpc_health_port, "inference-extension") == SERVING
    await app.begin_drain()
    for svc in ("inference-extension", "readiness", "", EXTPROC, "x"):
        assert await check(app.grpc_health_port, svc) == NOT_SERVING, svc
    assert await check(app.grpc_health_port, "liveness") == SERVING
    app._ready = None  # the periodic readiness update must not undo the drain
    await app._update_readiness()
    assert await check(app.grpc_health_port, "readiness") == NOT_SERVING


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer() as server:
        yield server


async def test_with_leader_election_readiness_follows_the_lease(start_picker, api: ApiServer, tmp_path: Path):
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    kw = dict(endpoints=["127.0.0.1:9"], ha_enable_leader_election=True, kubeconfig=kubeconfig)
    leader, _ = await start_picker(**kw)
    hp = leader.grpc_health_port
    assert await wait_status(hp, "readiness", SERVING) == SERVING
    assert await check(hp, "inference-extension") == SERVING
    assert await check(hp, "liveness") == SERVING
    assert await check(hp, "some-name-nobody-registered") == UNKNOWN  # as the reference answers

    follower, _ = await start_picker(**kw)
    fp = follower.grpc_health_port
    assert await wait_status(fp, "", SERVING) == SERVING  # loaded: serves the proxy, not the Service
    assert await check(fp, EXTPROC) == SERVING
    for svc in ("readiness", "inference-extension"):
        assert await check(fp, svc) == NOT_SERVING, svc
    assert await check(fp, "liveness") == SERVING

    # the leader drains: it gives up the Lease at once and the follower takes over
    await leader.begin_drain()
    assert await check(hp, "readiness") == NOT_SERVING
    assert await wait_status(fp, "readiness", SERVING) == SERVING
    assert await check(fp, "inference-extension") == SERVING
