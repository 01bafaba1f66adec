"""Two active-active picker replicas with `--ha-peers` behind one real Envoy (`envoy-config --picker
A,B`), as `epp.demo.Stack(replicas=2, peers=True)` starts them: Envoy spreads the streams over both,
every request is served, and each replica hears the other's routes."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from epp.demo import Stack
from epp.sim.config import DEFAULT_MODEL
from tests.e2e.conftest import needs_envoy

pytestmark = [pytest.mark.envoy, needs_envoy]


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_two_replicas_with_peers_behind_one_envoy() -> None:
    stack = Stack(replicas=2, peers=True, pods=3, time_scale=0.01)
    try:
        await stack.start()
        assert len(stack.replica_metrics) == 2
        async with aiohttp.ClientSession() as session:
            async def one(i: int) -> int:
                body = {"model": DEFAULT_MODEL, "max_tokens": 4,
                        "messages": [{"role": "user", "content": f"question {i} about routing"}]}
                async with session.post(f"{stack.url}/v1/chat/completions", json=body) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one(i) for i in range(40)))
            assert statuses == [200] * 40
            await asyncio.sleep(1.5)  # the last peer messages land, and a heartbeat each way
            pages = []
            for url in stack.replica_metrics:
                async with session.get(url) as r:
                    pages.append(await r.text())
        decided = [sum(float(v) for v in re.findall(r"^inference_extension_scheduler_attempts_total\{[^}]*\} (\S+)$",
                                                       page, re.M)) for page in pages]
        assert all(d > 0 for d in decided) and sum(decided) >= 40, decided  # Envoy used both replicas
        for page in pages:
            assert metric(page, "inference_extension_peers_known") == 1.0
            assert metric(page, "inference_extension_peer_messages_total", '{outcome="received"}') > 0
            assert metric(page, "inference_extension_peer_messages_total", '{outcome="dropped"}') == 0
    finally:
        await stack.close()
