"""The engine model on its own, driven by hand in virtual time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.sim.config import EngineConfig
from epp.sim.engine import DONE, WAITING, Engine, Seq, SimError
from epp.sim.kvcache import BlockPool
from epp.sim.tokens import block_hashes, chat_prompt, completion_prompt, count_tokens, output_text


def drain(engine: Engine, now: float = 0.0, limit: int = 100_000) -> float:
    """Step until idle; return the time the last step ended."""
    for _ in range(limit):
        d = engine.begin_step(now)
        if d is None:
            return now
        now += d
        engine.end_step(now)
    raise AssertionError("engine did not drain")


def run_one(engine: Engine, prompt: str, max_tokens: int, now: float, model: str = "") -> Seq:
    seq = engine.new_seq(f"r{now}", prompt, max_tokens, model, now)
    engine.add(seq)
    drain(engine, now)
    return seq


# ---- tokens ----------------------------------------------------------------------------------
def test_token_counts_and_hash_chain() -> None:
    assert count_tokens("") == 0
    assert count_tokens("abcd") == 1
    assert count_tokens("abcde") == 2
    a = block_hashes("x" * 64 * 3 + "tail", 16, "m")
    b = block_hashes("x" * 64 * 2 + "y" * 64, 16, "m")
    assert len(a) == 3 and len(b) == 3
    assert a[:2] == b[:2] and a[2] != b[2]  # chained: equal prefixes, then diverge
    assert block_hashes("x" * 64, 16, "other")[0] != a[0]  # seeded by model/adapter
    assert block_hashes("x" * 63, 16, "m") == []
    # non-ASCII: block boundaries stay on characters
    assert len(block_hashes("é" * 128, 16, "m")) == 2


def test_prompt_helpers() -> None:
    text = chat_prompt([{"role": "system", "content": "be brief"},
                        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert text == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert completion_prompt(["one"]) == "one"
    assert count_tokens(completion_prompt([1, 2, 3])) == 3
    with pytest.raises(ValueError):
        completion_prompt(["a", "b"])
    assert count_tokens(output_text(7)) == 7


# ---- KV blocks -------------------------------------------------------------------------------
def test_block_pool_lru_eviction() -> None:
    pool = BlockPool(4, 16)
    a = pool.allocate(2)
    pool.register(a[0], 100)
    pool.register(a[1], 101)
    assert pool.usage == 0.5
    pool.release(a)
    assert pool.usage == 0.0 and pool.cached_count == 2
    blocks, free_hits = pool.match([100, 101, 102], 3)
    assert blocks == a and free_hits == 2
    # fresh blocks are used before cached ones; then the tail of the released sequence goes first
    b = pool.allocate(3)
    assert set(b) >= set(range(4)) - set(a)
    assert pool.match([100, 101], 2)[0] == [a[0]]  # a[1] (the tail) was evicted, the head survives
    assert pool.evictions == 1
    with pytest.raises(RuntimeError):
        pool.allocate(2)


# ---- engine ----------------------------------------------------------------------------------
def test_prefix_cache_makes_second_prefill_faster() -> None:
    eng = Engine(EngineConfig())
    prompt = "lorem ipsum " * 400  # 4800 chars, 1200 tokens
    first = run_one(eng, prompt, 4, 0.0)
    second = run_one(eng, prompt, 4, 100.0)
    assert first.cached_tokens == 0
    assert second.cached_tokens == (1200 - 1) // 16 * 16
    assert second.first_token is not None and first.first_token is not None
    assert second.first_token - second.arrival < first.first_token - first.arrival
    assert eng.stats.prefix_hits == second.cached_tokens
    assert eng.stats.prefix_queries == 2400
    # another adapter's KV is not shared with the base model's
    lora = Engine(EngineConfig(loras=("a",)))
    run_one(lora, prompt, 2, 0.0)
    assert run_one(lora, prompt, 2, 10.0, model="a").cached_tokens == 0


def test_batch_limit_queues_requests() -> None:
    eng = Engine(EngineConfig(max_num_seqs=2))
    seqs = [eng.new_seq(f"r{i}", "hello " * 20, 10, "", 0.0) for i in range(5)]
    for s in seqs:
        eng.add(s)
    d = eng.begin_step(0.0)
    assert d is not None
    assert len(eng.running) == 2 and len(eng.waiting) == 3
    eng.end_step(d)
    drain(eng, d)
    assert all(s.state == DONE and s.generated == 10 for s in seqs)
    # FCFS: later requests were admitted no earlier than earlier ones
    sched = [s.scheduled or 0.0 for s in seqs]
    assert sched == sorted(sched) and sched[2] > sched[1]
    assert eng.kv.usage == 0.0


def test_chunked_prefill_spans_steps() -> None:
    eng = Engine(EngineConfig(max_num_batched_tokens=256))
    seq = eng.new_seq("r", "a" * 4000, 1, "", 0.0)  # 1000 tokens: 4 chunks
    eng.add(seq)
    steps = 0
    now = 0.0
    while eng.has_work:
        d = eng.begin_step(now)
        assert d is not None
        now += d
        eng.end_step(now)
        steps += 1
    assert steps == 4 and seq.generated == 1


def test_kv_pressure_stops_admission_and_preempts() -> None:
    # 22 blocks of 16 tokens: 3 prompts of 100 tokens (7 blocks each) fit, their outputs (10 blocks) do not
    eng = Engine(EngineConfig(num_gpu_blocks=22, max_num_seqs=8))
    seqs = [eng.new_seq(f"r{i}", f"{i}" * 400, 60, "", 0.0) for i in range(4)]
    for s in seqs:
        eng.add(s)
    eng.begin_step(0.0)
    assert len(eng.running) < 4 and eng.waiting  # the KV cache, not the batch size, limited admission
    eng.end_step(1.0)
    drain(eng, 1.0)
    assert all(s.state == DONE and s.generated == 60 for s in seqs)
    assert eng.stats.preemptions > 0  # decode growth ran out of blocks at some point
    assert eng.kv.usage == 0.0


def test_lora_slots_and_load_delay() -> None:
    cfg = EngineConfig(loras=("a", "b"), max_loras=1, lora_load_ms=100.0)
    eng = Engine(cfg)
    sa = eng.new_seq("a1", "hello world", 5, "a", 0.0)
    sb = eng.new_seq("b1", "hello world", 5, "b", 0.0)
    base = eng.new_seq("base", "hello world", 5, "", 0.0)
    for s in (sa, sb, base):
        eng.add(s)
    d = eng.begin_step(0.0)
    assert d is not None and d >= 0.1  # first step pays the adapter load
    assert eng.running_adapters() == ["a"] and eng.waiting_adapters() == ["b"]
    assert {s.request_id for s in eng.running} == {"a1", "base"}  # b skipped, base went ahead
    eng.end_step(d)
    drain(eng, d)
    assert sb.scheduled is not None and sa.finished is not None and sb.scheduled >= sa.finished
    assert eng.lora_loads == 2 and eng.resident_adapters() == ["b"]


def test_request_validation() -> None:
    eng = Engine(EngineConfig(max_model_len=100, loras=("a",)))
    with pytest.raises(SimError) as e:
        eng.new_seq("r", "x", 4, "nope", 0.0)
    assert e.value.status == 404
    with pytest.raises(SimError) as e:
        eng.new_seq("r", "x" * 400, 4, "", 0.0)
    assert e.value.status == 400
    with pytest.raises(SimError):
        eng.new_seq("r", "x", 0, "", 0.0)
    assert eng.new_seq("r", "x" * 360, None, "", 0.0).max_output == 10  # default trimmed to fit
    assert eng.new_seq("r", "x", None, "a", 0.0).adapter == "a"


def test_abort_frees_blocks_and_notifies() -> None:
    eng = Engine(EngineConfig())
    seen: list[int] = []
    seq = eng.new_seq("r", "z" * 1000, 50, "", 0.0, notify=lambda s: seen.append(s.state))
    eng.add(seq)
    d = eng.begin_step(0.0)
    assert d is not None
    eng.end_step(d)
    assert eng.kv.usage > 0
    eng.abort(seq, d)
    assert seq.state == DONE and seq.finish_reason == "abort" and eng.kv.usage == 0.0
    assert seen[-1] == DONE and not eng.has_work
    waiting = eng.new_seq("w", "z", 5, "", 0.0)
    eng.add(waiting)
    eng.abort(waiting, 0.0)
    assert waiting.state == DONE and not eng.waiting and waiting.state != WAITING


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 300), st.integers(1, 40), st.booleans()),
                min_size=1, max_size=25),
       st.integers(8, 40), st.integers(1, 4))
def test_engine_invariants(reqs: list[tuple[int, int, int, bool]], blocks: int, max_seqs: int) -> None:
    """Whatever arrives, KV accounting holds, every request ends exactly once, the cache drains."""
    eng = Engine(EngineConfig(num_gpu_blocks=blocks, max_num_seqs=max_seqs, block_size=4,
                              max_num_batched_tokens=64, loras=("a", "b", "c"), max_loras=2))
    finished: list[str] = []
    seqs = []
    now = 0.0
    for i, (group, chars, out, lora) in enumerate(reqs):
        prompt = f"shared prefix {group} " * 4 + "q" * chars
        model = ("a", "b", "c")[group % 3] if lora else ""
        try:
            s = eng.new_seq(f"r{i}", prompt, out, model, now)
        except SimError:
            continue
        eng.add(s)
        seqs.append(s)
        d = eng.begin_step(now)
        if d is not None:
            now += d
            finished += [x.request_id for x in eng.end_step(now)]
        assert len({b for x in eng.running for b in x.blocks}) == eng.kv.used_count
        assert all(not x.blocks for x in eng.waiting)
        assert len(eng.running) <= max_seqs
        assert len(set(eng.running_adapters())) <= 2
    for _ in range(100_000):
        d = eng.begin_step(now)
        if d is None:
            break
        now += d
        finished += [x.request_id for x in eng.end_step(now)]
    assert sorted(finished) == sorted(s.request_id for s in seqs)
    assert all(s.generated == s.max_output for s in seqs)
    assert eng.kv.usage == 0.0 and eng.kv.free_count == eng.kv.num_blocks
