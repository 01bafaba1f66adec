"""Flow control behind a real Envoy, with real HTTP simulators: requests wait in the picker and are
routed when the pod frees; a TTL expiry reaches the HTTP client as 429 with the reason header."""

from __future__ import annotations

import asyncio

import pytest

from epp.flowcontrol.types import Outcome
from epp.sim.server import SimServerConfig
from tests.e2e.conftest import MODEL, GatewayFactory, needs_envoy
from tests.flowcontrol.test_extproc_flow import config

pytestmark = [pytest.mark.envoy, needs_envoy]

SLOW = [SimServerConfig(name="slow", time_scale=0.05, seed=0)]  # a 200-token answer takes ~0.2-0.5 s


async def test_requests_queue_in_the_picker_and_all_complete(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=SLOW, config_text=config(), picker_tls=False)
    fc = e2e.picker.flow.controller
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, fc.live)
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    replies = await asyncio.gather(*(e2e.post("/v1/completions", {"model": MODEL, "prompt": f"q{i} " * 20,
                                                                  "max_tokens": 200}, timeout=60,
                                              **{"x-request-id": f"fc-{i}"}) for i in range(4)))
    watcher.cancel()
    assert [r.status for r in replies] == [200] * 4, [r.text for r in replies]
    assert most >= 1  # some waited in the picker: one in flight at a time on the one pod
    assert fc.outcomes[Outcome.DISPATCHED] == 4 and fc.live == 0
    assert (await e2e.inflight_settles()) == {e2e.sims[0].address: 0}


async def test_ttl_expiry_reaches_the_client_as_429_with_the_reason(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=SLOW, config_text=config("defaultRequestTTL: 100ms"), picker_tls=False)
    long = asyncio.ensure_future(e2e.post("/v1/completions", {"model": MODEL, "prompt": "long " * 20,
                                                              "max_tokens": 2000}, timeout=60))
    fc = e2e.picker.flow.controller
    for _ in range(500):  # bounded: until the long request holds the pod
        if fc.outcomes[Outcome.DISPATCHED]:
            break
        await asyncio.sleep(0.01)
    r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": "short", "max_tokens": 2})
    assert r.status == 429, r.text
    assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
    assert r.text.startswith("inference error: ResourceExhausted - request timed out in queue")
    assert (await long).status == 200
