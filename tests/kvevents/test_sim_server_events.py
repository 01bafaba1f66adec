"""The HTTP simulator publishes its KV events over ZMQ (`--kv-events-endpoint`)."""

from __future__ import annotations

import asyncio

import aiohttp

from epp.kvevents.index import PreciseIndex
from epp.kvevents.keys import RequestKeys
from epp.kvevents.subscriber import KVEventSubscriber
from epp.sim.__main__ import build_parser, configs_from_args
from epp.sim.server import SimServer, SimServerConfig
from epp.sim.tokens import token_ids

PROMPT = "".join(f"sim server line {i:03d} " for i in range(40))  # 800 chars = 200 tokens = 12 blocks


def test_cli_ranks_on_consecutive_ports() -> None:
    args = build_parser().parse_args(["--count", "2", "--kv-events-endpoint", "tcp://*:5557",
                                      "--kv-events-replay-endpoint", "tcp://*:5567"])
    cfgs = configs_from_args(args)
    assert [(c.kv_events_endpoint, c.kv_events_replay, c.data_parallel_rank) for c in cfgs] == [
        ("tcp://*:5557", "tcp://*:5567", 0), ("tcp://*:5558", "tcp://*:5568", 1)]
    one = configs_from_args(build_parser().parse_args(["--kv-events-endpoint", "tcp://127.0.0.1:7000"]))
    assert one[0].kv_events_endpoint == "tcp://127.0.0.1:7000" and one[0].data_parallel_rank is None


async def test_sim_server_publishes_what_it_caches() -> None:
    index = PreciseIndex()
    sub = KVEventSubscriber(index)
    cfg = SimServerConfig(time_scale=0.002, kv_events_endpoint="tcp://127.0.0.1:0",
                          kv_events_replay="tcp://127.0.0.1:0")
    try:
        async with SimServer(cfg) as sim, aiohttp.ClientSession() as http:
            pub = sim.kv_publisher
            assert pub is not None and pub.endpoint.startswith("tcp://127.0.0.1:")
            sub.add_source(sim.address, pub.endpoint, pub.replay_endpoint)
            model = sim.cfg.engine.model
            # A fresh prompt each try: a SUB socket that is still joining misses what was published before it
            # joined, and a repeated prompt hits the cache and publishes nothing new to show the gap.
            want = len(token_ids(PROMPT)) // 16
            got: list[float] = [0.0]
            for i in range(200):  # bounded: until a request's events arrive
                prompt = f"{i:03d} " + PROMPT  # one more token: the same number of full blocks
                async with http.post(sim.url + "/v1/completions",
                                     json={"model": model, "prompt": prompt, "max_tokens": 2}) as r:
                    assert r.status == 200
                for _ in range(10):  # events reach the index within milliseconds on loopback
                    got = index.match(RequestKeys(token_ids(prompt), model), [sim.address])
                    if got[0] >= want:
                        break
                    await asyncio.sleep(0.01)
                if got[0] >= want:
                    break
            assert got == [float(want)]
            assert sub.stats.malformed == 0
    finally:
        sub.stop()
