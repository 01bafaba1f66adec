"""End to end through a real Envoy: simulators publish their KV events (vLLM's wire format, over ZMQ
on loopback) to the picker's centralized endpoint; the picker routes each request to the pod that
holds its prefix, and follows the engines when they drop it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from epp.kvevents.keys import RequestKeys
from epp.sim.kvevents import KVEventRecorder, ZmqPublisher, topic_for
from epp.sim.tokens import token_ids
from tests.e2e.conftest import MODEL, gateway, needs_envoy  # noqa: F401  (gateway: a fixture)
from tests.procs import free_port

pytestmark = [pytest.mark.envoy, needs_envoy]


def config(port: int) -> str:
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{backend: sim}}
    kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:{port}"}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
"""


async def until(cond: Any, tries: int = 300) -> bool:
    for _ in range(tries):
        if cond():
            return True
        await asyncio.sleep(0.02)
    return bool(cond())


PREFIX = "".join(f"shared context line {i:03d} about the tenant's documents. " for i in range(60))  # ~2.9K chars


async def test_routed_pod_holds_the_prefix(gateway: Any) -> None:  # noqa: F811
    port = free_port()
    e2e = await gateway(sims=3, config_text=config(port), picker_tls=False)
    prod = e2e.picker.kv_producers[0]
    assert prod.subscriber is not None and prod.subscriber.bound
    index = prod.kv_index
    pubs: list[ZmqPublisher] = []
    recs: list[KVEventRecorder] = []
    try:
        for s in e2e.sims:
            pub = ZmqPublisher(f"tcp://127.0.0.1:{port}", topic_for(s.address, MODEL))
            pubs.append(pub)
            recs.append(KVEventRecorder(s.engine, pub.sink))
        for pub, s in zip(pubs, e2e.sims, strict=True):  # the engines' sockets are connected
            def probe(pub: ZmqPublisher = pub, addr: str = s.address) -> bool:
                pub.publish([["BlockStored", [1], None, [0] * 16, 16]])
                return index.size_of(addr) > 0
            assert await until(probe)
            pub.publish([["AllBlocksCleared"]])
        assert await until(lambda: index.entries == 0)

        keys = lambda: RequestKeys(token_ids(PREFIX), MODEL)  # noqa: E731
        first = await e2e.post("/v1/completions", {"model": MODEL, "prompt": PREFIX + "question zero",
                                                   "max_tokens": 4}, **{"x-request-id": "q0"})
        assert first.status == 200
        home = e2e.served_on("q0")[0]
        home_addr = next(s.address for s in e2e.sims if s.name == home)
        blocks = len(token_ids(PREFIX)) // 16
        # the engine's events reach the picker: it knows the home holds the prefix
        assert await until(lambda: index.match(keys(), [home_addr])[0] >= blocks)
        for i in range(1, 7):
            r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": PREFIX + f"question {i}",
                                                   "max_tokens": 4}, **{"x-request-id": f"q{i}"})
            assert r.status == 200
            assert e2e.served_on(f"q{i}") == [home]
        sim = e2e.sim_at(home_addr)
        seq = sim.engine.new_seq("probe", PREFIX, 1, "", 0.0)
        assert len(sim.engine.kv.match(seq.hashes, 10**6)[0]) >= blocks  # the routed pod holds it

        # the home drops its cache: the picker hears it and no longer prefers that pod
        sim.engine.kv.reset_prefix_cache()
        recs[[s.name for s in e2e.sims].index(home)].flush(0.0)
        assert await until(lambda: index.match(keys(), [home_addr])[0] == 0)
        r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": PREFIX + "question again",
                                               "max_tokens": 4}, **{"x-request-id": "qa"})
        new_home = e2e.served_on("qa")[0]
        new_addr = next(s.address for s in e2e.sims if s.name == new_home)
        assert await until(lambda: index.match(keys(), [new_addr])[0] >= blocks)
        r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": PREFIX + "question after",
                                               "max_tokens": 4}, **{"x-request-id": "qb"})
        assert r.status == 200 and e2e.served_on("qb") == [new_home]
        metrics = e2e.picker.telemetry.registry
        from prometheus_client import generate_latest
        text = generate_latest(metrics).decode()
        assert "llm_d_router_epp_kv_cache_index_admissions_total" in text
    finally:
        for r in recs:
            r.detach()
        for p in pubs:
            p.close()
