"""`--ha-mode active-active`: every replica ready and serving; a Lease, when on, only picks the
InferenceModel status writer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from epp.cli import parse_args
from tests.integration.test_health import EXTPROC, SERVING, check, wait_status
from tests.sources.apiserver import ApiServer


def test_cli_flag() -> None:
    assert parse_args(["--pool-name", "p"]).ha_mode == "leader"
    assert parse_args(["--pool-name", "p", "--ha-mode", "active-active"]).ha_mode == "active-active"
    with pytest.raises(SystemExit):
        parse_args(["--pool-name", "p", "--ha-mode", "both"])


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer() as server:
        yield server


async def test_every_replica_is_ready_and_one_writes_status(start_picker, api: ApiServer, tmp_path: Path) -> None:
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    kw = dict(endpoints=["127.0.0.1:9"], ha_enable_leader_election=True, ha_mode="active-active",
              kubeconfig=kubeconfig)
    a, _ = await start_picker(**kw)
    b, _ = await start_picker(**kw)
    for app in (a, b):
        for svc in ("readiness", "inference-extension", "", EXTPROC):
            assert await wait_status(app.grpc_health_port, svc, SERVING) == SERVING, svc
    # the Lease still elects exactly one leader (the status writer)
    for _ in range(200):
        if a.is_leader != b.is_leader:
            break
        await asyncio.sleep(0.05)
    assert a.is_leader != b.is_leader
    # the leader drains: the other stays ready (it always was) and takes the Lease
    leader, other = (a, b) if a.is_leader else (b, a)
    await leader.begin_drain()
    assert await check(other.grpc_health_port, "readiness") == SERVING
    for _ in range(200):
        if other.is_leader:
            break
        await asyncio.sleep(0.05)
    assert other.is_leader
