"""The simulator's cache model publishes what it really holds: stores, evictions, clears, LoRA."""

from __future__ import annotations

from epp.kvevents.index import PreciseIndex
from epp.kvevents.keys import RequestKeys
from epp.kvevents.wire import BlockRemoved, BlockStored, decode_payload, encode_payload
from epp.sim.config import EngineConfig
from epp.sim.des import Cluster, SimRequest
from epp.sim.engine import Engine
from epp.sim.kvevents import KVEventRecorder, attach_des
from epp.sim.tokens import token_ids

PROMPT = "".join(f"word{i:04d} " for i in range(200))  # 1800 chars = 450 tokens = 28 full blocks
BLOCKS = 28


def run(engine: Engine, prompts: list[str], model: str = "") -> None:
    now = 0.0
    for i, p in enumerate(prompts):
        engine.add(engine.new_seq(f"r{i}", p, 4, model, now))
    while engine.has_work:
        d = engine.begin_step(now)
        assert d is not None
        now += d
        engine.end_step(now)


def test_events_mirror_the_cache_model() -> None:
    cfg = EngineConfig(num_gpu_blocks=40, block_size=16)
    engine = Engine(cfg)
    got: list[list] = []
    KVEventRecorder(engine, lambda evs, now: got.append(evs))
    run(engine, [PROMPT])
    idx = PreciseIndex()
    for evs in got:
        idx.apply("p:1", cfg.model, decode_payload(encode_payload(evs, 0.0)))
    cached = engine.kv.cached_count
    assert cached == len(token_ids(PROMPT)) // 16 == BLOCKS
    assert idx.match(RequestKeys(token_ids(PROMPT), cfg.model), ["p:1"]) == [float(cached)]
    # a second, unrelated prompt that needs the whole cache evicts the first: removals arrive
    other = "".join(f"zzzz{i:04d} " for i in range(230))
    got.clear()
    run(engine, [other])
    batches = [decode_payload(encode_payload(evs, 0.0)) for evs in got]
    assert any(isinstance(e, BlockRemoved) for b in batches for e in b.events)
    assert any(isinstance(e, BlockStored) for b in batches for e in b.events)
    for b in batches:
        idx.apply("p:1", cfg.model, b)
    held = engine.kv.match(engine.new_seq("x", PROMPT, 1, "", 0.0).hashes, 10**6)[0]
    assert idx.match(RequestKeys(token_ids(PROMPT), cfg.model), ["p:1"]) == [float(len(held))]
    # a reset of the prefix cache is an AllBlocksCleared
    got.clear()
    engine.kv.reset_prefix_cache()
    engine.kv_events.flush(1.0)
    assert got == [[["AllBlocksCleared"]]]


def test_lora_blocks_are_keyed_by_adapter() -> None:
    cfg = EngineConfig(num_gpu_blocks=256, loras=("ad1",), max_loras=1)
    engine = Engine(cfg)
    got: list[list] = []
    KVEventRecorder(engine, lambda evs, now: got.append(evs))
    run(engine, [PROMPT], model="ad1")
    stores = [e for evs in got for e in evs if e[0] == "BlockStored"]
    assert stores and all(e[7] == "ad1" and e[5] == 1 for e in stores)


def test_des_delivers_after_the_delay() -> None:
    cluster = Cluster(2, engine=EngineConfig(), seed=1)
    seen: list[tuple[float, str]] = []
    idx = PreciseIndex()

    def deliver(address: str, model: str, payload: bytes) -> None:
        seen.append((cluster.now, address))
        idx.apply(address, model, decode_payload(payload))
    recs = attach_des(cluster, deliver, delay=0.25)
    cluster.run([(0.0, SimRequest("a", PROMPT, 4))])
    assert seen and all(r.published_events for r in recs[:1])
    first_step_end = min(t for t, _ in seen) - 0.25
    assert first_step_end > 0
    # the server that served it holds the prompt
    served = cluster.results[0].server
    addr = cluster.servers[served].endpoint.address
    assert idx.match(RequestKeys(token_ids(PROMPT), EngineConfig().model), [addr]) == [float(BLOCKS)]
