"""Prefix affinity: block hashing, the bounded index, rendezvous hashing, the scorer and its load guard."""

from __future__ import annotations

import random
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.prefix import (
    PrefixCacheScorer,
    PrefixIndex,
    PrefixParams,
    PromptBlocks,
    block_hashes,
    rendezvous_home,
)
from epp.scheduling.registry import BuildContext
from epp.scheduling.saturation import SaturationDetector
from tests.scheduling.util import cycle, ep, req


def ctx(guard: LoadGuard | None = None) -> BuildContext:
    return BuildContext(rng=random.Random(0), detector=SaturationDetector(), guard=guard or LoadGuard())


def text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters) for _ in range(n))


# ---- hashing ---------------------------------------------------------------------------------
def test_hashes_chain_and_ignore_partial_block():
    a = text(64 * 3)
    h = block_hashes(a, "m", 64, 256)
    assert len(h) == 3
    assert block_hashes(a + "tail", "m", 64, 256) == h  # a partial last block is not hashed
    longer = block_hashes(a + text(64, 1), "m", 64, 256)
    assert longer[:3] == h and len(longer) == 4
    # a change in block 0 changes every later hash (the chain)
    changed = block_hashes("X" + a[1:], "m", 64, 256)
    assert all(x != y for x, y in zip(changed, h, strict=True))


def test_hashes_seeded_by_model_and_capped():
    a = text(64 * 10)
    assert block_hashes(a, "m1", 64, 256)[0] != block_hashes(a, "m2", 64, 256)[0]
    assert len(block_hashes(a, "m", 64, 4)) == 4
    assert block_hashes("short", "m", 64, 256) == []
    assert block_hashes("", "m", 64, 256) == []


def test_hashes_survive_lone_surrogates_and_multibyte_text():
    s = "\ud800" + "é" * 100 + "日本" * 50
    assert len(block_hashes(s, "m", 16, 256)) == len(s.encode("utf-8", "surrogatepass")) // 16


@given(st.text(max_size=600), st.integers(1, 80), st.integers(1, 64))
def test_lazy_blocks_equal_eager(prompt, size, max_blocks):
    b = PromptBlocks(prompt, "m", size, max_blocks)
    first = list(b.upto(3))
    full = b.all()
    assert full[: len(first)] == first
    assert len(full) == b.count <= max_blocks
    assert full == block_hashes(prompt, "m", size, max_blocks)


# ---- index -----------------------------------------------------------------------------------
def test_index_match_counts_leading_blocks():
    idx = PrefixIndex()
    e1, e2, e3 = ep(1), ep(2), ep(3)
    base = text(64 * 4)
    idx.insert(e1.address, block_hashes(base, "m", 64, 256), 100)
    idx.insert(e2.address, block_hashes(base[:128] + text(128, 5), "m", 64, 256), 100)
    q = block_hashes(base + text(64 * 4, 9), "m", 64, 256)  # 8 blocks, first 4 = base
    assert idx.match(q, [e1, e2, e3]) == [4, 2, 0]
    assert idx.match(q, [e3, e1], 1 / 8) == [0, 0.5]
    assert idx.match(block_hashes(text(256, 3), "m", 64, 256), [e1, e2]) == [0, 0]


def test_index_match_stops_at_first_miss():
    idx = PrefixIndex()
    e1 = ep(1)
    h = block_hashes(text(64 * 4), "m", 64, 256)
    idx.insert(e1.address, [h[0], h[2], h[3]], 100)  # block 1 missing
    assert idx.match(h, [e1]) == [1]


def test_lru_evicts_tails_first():
    idx = PrefixIndex()
    e1 = ep(1)
    old = block_hashes(text(64 * 4, 1), "m", 64, 256)
    idx.insert(e1.address, old, 4)
    new = block_hashes(text(64 * 2, 2), "m", 64, 256)
    idx.insert(e1.address, new, 4)
    assert idx.size_of(e1.address) <= 4
    # the new prompt is whole; the old one lost its deepest blocks but still matches from block 0
    assert idx.match(new, [e1]) == [2]
    assert 1 <= idx.match(old, [e1])[0] < 4


def test_reinserting_refreshes_recency():
    idx = PrefixIndex()
    e1 = ep(1)
    a = block_hashes(text(64, 1), "m", 64, 256)
    idx.insert(e1.address, a, 2)
    idx.insert(e1.address, block_hashes(text(64, 2), "m", 64, 256), 2)
    idx.insert(e1.address, a, 2)  # a is now the most recent
    idx.insert(e1.address, block_hashes(text(64, 3), "m", 64, 256), 2)
    assert idx.match(a, [e1]) == [1]


def test_forget_purges_and_slot_reuse_does_not_leak():
    idx = PrefixIndex()
    e1, e2 = ep(1), ep(2)
    h = block_hashes(text(64 * 3), "m", 64, 256)
    idx.insert(e1.address, h, 100)
    idx.forget(e1.address)
    assert idx.entries == 0 and idx.distinct_hashes == 0 and idx.addresses() == []
    idx.insert(e2.address, block_hashes(text(64, 7), "m", 64, 256), 100)  # reuses slot 0
    assert idx.match(h, [e1, e2]) == [0, 0]
    idx.forget("10.9.9.9:1")  # unknown: no-op


def test_sweep_forgets_endpoints_missing_long_enough():
    idx = PrefixIndex(purge_after=30)
    e1, e2 = ep(1), ep(2)
    h = block_hashes(text(64), "m", 64, 256)
    idx.insert(e1.address, h, 10)
    idx.insert(e2.address, h, 10)
    assert idx.sweep([e1.address], now=100.0) == []  # e2 first seen missing
    assert idx.sweep([e1.address], now=120.0) == []
    assert idx.sweep([e1.address], now=131.0) == [e2.address]
    assert idx.addresses() == [e1.address]
    idx.sweep([], now=200.0)
    idx.sweep([e1.address], now=400.0)  # came back before the deadline: kept
    assert idx.addresses() == [e1.address]


def _check_invariants(idx: PrefixIndex, cap: int) -> None:
    total = 0
    for address in idx.addresses():
        pod = idx._pods[address]
        assert len(pod.lru) <= cap
        total += len(pod.lru)
        for h in pod.lru:
            assert idx._where[h] & pod.bit
    assert total == idx.entries <= idx.max_entries
    assert idx.distinct_hashes <= idx.entries
    for h, mask in idx._where.items():  # no hash without an owner, no bit without an entry
        assert mask
        for pod in idx._pods.values():
            assert bool(mask & pod.bit) == (h in pod.lru)


OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "insert", "insert", "forget", "sweep"]),
              st.integers(0, 11), st.integers(0, 40), st.integers(0, 12)),
    max_size=60,
)


PROMPTS = [text(16 * 12, s) for s in range(41)]


@settings(max_examples=120, deadline=None)
@given(ops=OPS, cap=st.integers(1, 20), max_entries=st.integers(1, 60))
def test_index_memory_stays_bounded(ops, cap, max_entries):
    idx = PrefixIndex(max_entries=max_entries, purge_after=5)
    prompts = PROMPTS
    now = 0.0
    for op, pod, prompt, nblocks in ops:
        address = f"10.0.0.{pod}:8000"
        if op == "insert":
            idx.insert(address, block_hashes(prompts[prompt], "m", 16, max(1, nblocks)), cap)
        elif op == "forget":
            idx.forget(address)
        else:
            now += 3
            idx.sweep([f"10.0.0.{p}:8000" for p in range(pod)], now)
        _check_invariants(idx, cap)
        assert len(idx.addresses()) <= idx.entries  # no empty per-endpoint records


def test_index_bound_under_heavy_random_load():
    idx = PrefixIndex(max_entries=5000)
    rng = random.Random(1)
    for i in range(1500):
        prompt = text(64 * rng.randint(1, 40), rng.randint(0, 10**9))
        idx.insert(f"10.0.{i % 37}.1:8000", block_hashes(prompt, "m", 64, 256), 400)
        assert idx.entries <= 5000
    assert idx.distinct_hashes <= idx.entries
    assert all(idx.size_of(a) <= 400 for a in idx.addresses())


# ---- rendezvous ------------------------------------------------------------------------------
def test_rendezvous_replicas_agree_and_spread_keys():
    eps = [ep(i) for i in range(1, 9)]
    loads = [0.0] * 8
    homes = [rendezvous_home(k, eps, loads, 0.25) for k in range(2000)]
    again = [rendezvous_home(k, list(eps), loads, 0.25) for k in range(2000)]
    assert homes == again
    counts = [homes.count(i) for i in range(8)]
    assert min(counts) > 150  # ~250 each


def test_rendezvous_home_moves_only_when_needed():
    eps = [ep(i) for i in range(1, 9)]
    loads = [0.0] * 8
    for k in range(300):
        home = rendezvous_home(k, eps, loads, 0.25)
        other = (home + 1) % 8
        rest = [e for i, e in enumerate(eps) if i != other]
        assert rest[rendezvous_home(k, rest, [0.0] * 7, 0.25)] is eps[home]  # removing a non-home keeps it


def test_rendezvous_bounded_load_skips_a_hot_home():
    eps = [ep(i) for i in range(1, 5)]
    key = 12345
    home = rendezvous_home(key, eps, [0.0] * 4, 0.25)
    loads = [2.0] * 4
    loads[home] = 20.0
    second = rendezvous_home(key, eps, loads, 0.25)
    assert second != home and second >= 0


# ---- scorer ----------------------------------------------------------------------------------
def test_scorer_routes_shared_prefix_back():
    s = PrefixCacheScorer("p", PrefixParams(), ctx())
    eps = [ep(1), ep(2), ep(3)]
    system = text(64 * 6)
    r1 = req(system + text(64 * 2, 1))
    assert s.score(cycle(r1), eps) == [0.0, 0.0, 0.0]
    s.on_routed(r1, eps[1])
    r2 = req(system + text(64 * 2, 2))
    assert s.score(cycle(r2), eps) == [0.0, 0.75, 0.0]
    r3 = req(system + text(64 * 2, 1))
    assert s.score(cycle(r3), eps) == [0.0, 1.0, 0.0]


def test_scorer_load_guard_drops_bonus_of_hot_pod():
    s = PrefixCacheScorer("p", PrefixParams(), ctx(LoadGuard(queue_gap=5, inflight_gap=4, inflight_ratio=1.5)))
    prompt = text(64 * 4)
    hot_q, hot_i, ok = ep(1, waiting=9, inflight=4), ep(2, inflight=10), ep(3, waiting=4, inflight=6)
    cool = ep(4, waiting=0, inflight=4)
    for e in (hot_q, hot_i, ok):
        s.on_routed(req(prompt), e)
    assert s.score(cycle(req(prompt)), [hot_q, hot_i, ok, cool]) == [0.0, 0.0, 1.0, 0.0]


def test_scorer_without_guard_keeps_bonus():
    s = PrefixCacheScorer("p", PrefixParams(load_guard=False), ctx())
    prompt = text(64 * 4)
    hot = ep(1, waiting=50)
    s.on_routed(req(prompt), hot)
    assert s.score(cycle(req(prompt)), [hot, ep(2)]) == [1.0, 0.0]


def test_scorer_auto_tunes_block_size_and_capacity():
    s = PrefixCacheScorer("p", PrefixParams(), ctx())
    e = ep(1, block_size=32, num_blocks=3)
    assert s.block_bytes_for([ep(2), e]) == 128
    assert s.block_bytes_for([ep(2, block_size=1)]) == 64  # floor of 16 tokens
    assert s.capacity_for(e) == 3
    s.on_routed(req(text(128 * 10)), e)
    assert s.index.size_of(e.address) == 3
    fixed = PrefixCacheScorer("p", PrefixParams(auto_tune=False, block_tokens=8, lru_capacity=5), ctx())
    assert fixed.block_bytes_for([e]) == 32 and fixed.capacity_for(e) == 5
    legacy = PrefixCacheScorer("p", PrefixParams(block_bytes=10), ctx())
    assert legacy.block_bytes_for([e]) == 10


def test_scorer_forget_and_sweep_hooks():
    s = PrefixCacheScorer("p", PrefixParams(purge_after=1), ctx())
    e1, e2 = ep(1), ep(2)
    s.on_routed(req(text(64)), e1)
    s.on_routed(req(text(64)), e2)
    s.forget(e1.address)
    s.sweep([], 10.0)
    s.sweep([], 12.0)
    assert s.index.entries == 0


def test_rendezvous_mode_scores_one_home_and_replicas_agree():
    a = PrefixCacheScorer("p", PrefixParams(mode="rendezvous"), ctx())
    b = PrefixCacheScorer("p", PrefixParams(mode="rendezvous"), ctx())
    eps = [ep(i) for i in range(1, 7)]
    for seed in range(30):
        prompt = text(64 * 10, seed)
        sa = a.score(cycle(req(prompt)), eps)
        assert sorted(sa) == [0.0] * 5 + [1.0]
        assert b.score(cycle(req(prompt)), eps) == sa
        # only the first rendezvousBlocks (8) blocks matter
        assert a.score(cycle(req(prompt[: 64 * 8] + text(64 * 5, 99))), eps) == sa
    a.on_routed(req(text(640)), eps[0])  # stateless: nothing is recorded
    assert a.index.entries == 0
    assert a.score(cycle(req("too short")), eps) == [0.0] * 6
