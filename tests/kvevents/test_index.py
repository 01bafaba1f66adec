"""The precise index: keys from token ids, parents, removals, tiers, speculation, bounds."""

from __future__ import annotations

import random

import pytest

from epp.kvevents.index import PreciseIndex
from epp.kvevents.keys import RequestKeys
from epp.kvevents.wire import decode_payload, encode_payload, encode_removed, encode_stored

TOKENS = list(range(1000, 1160))  # 160 tokens


def batch(*events: list) -> object:
    return decode_payload(encode_payload(list(events), 0.0))


def store_chain(idx: PreciseIndex, pod: str, tokens: list[int], bs: int, hashes: list[int], groups: list[int],
                model: str = "m", lora: str | None = None) -> None:
    i, parent = 0, None
    for k in groups:
        idx.apply(pod, model, batch(encode_stored(hashes[i:i + k], parent, tokens[i * bs:(i + k) * bs], bs,
                                                  lora_name=lora)))
        parent = hashes[i + k - 1]
        i += k


@pytest.mark.parametrize(("engine_bs", "picker_bs"), [(16, 16), (64, 16), (16, 64), (24, 16), (5, 16), (1, 16),
                                                     (16, 48)])
@pytest.mark.parametrize("seed", range(8))
def test_any_block_sizes_and_event_splits(engine_bs: int, picker_bs: int, seed: int) -> None:
    """Whatever the engine's block size and however it splits a prompt into events, the picker's
    keys match the request's, and removing any engine block cuts the match where it starts."""
    rng = random.Random(seed)
    n = len(TOKENS) // engine_bs
    hashes = [rng.getrandbits(64) for _ in range(n)]
    groups: list[int] = []
    while sum(groups) < n:
        groups.append(min(rng.randint(1, 4), n - sum(groups)))
    idx = PreciseIndex(block_tokens=picker_bs)
    store_chain(idx, "a:1", TOKENS, engine_bs, hashes, groups)
    full = n * engine_bs // picker_bs
    assert idx.match(RequestKeys(TOKENS, "m", picker_bs), ["a:1", "b:1"]) == [float(full), 0.0]
    cut = rng.randrange(n)
    idx.apply("a:1", "m", batch(encode_removed([hashes[cut]])))
    assert idx.match(RequestKeys(TOKENS, "m", picker_bs), ["a:1"]) == [float(cut * engine_bs // picker_bs)]


def test_keys_do_not_depend_on_engine_hashes_and_name_the_model() -> None:
    a, b = PreciseIndex(), PreciseIndex()
    store_chain(a, "p:1", TOKENS, 16, list(range(10)), [10])
    store_chain(b, "p:1", TOKENS, 16, [h * 7919 + 3 for h in range(10)], [5, 5])
    assert a.match(RequestKeys(TOKENS, "m"), ["p:1"]) == b.match(RequestKeys(TOKENS, "m"), ["p:1"]) == [10.0]
    assert a.match(RequestKeys(TOKENS, "other-model"), ["p:1"]) == [0.0]
    store_chain(a, "q:1", TOKENS, 16, list(range(100, 110)), [10], lora="ad")
    assert a.match(RequestKeys(TOKENS, "ad"), ["p:1", "q:1"]) == [0.0, 10.0]


def test_longest_prefix_per_pod_and_other_prompts() -> None:
    idx = PreciseIndex()
    store_chain(idx, "a:1", TOKENS, 16, list(range(10)), [10])
    store_chain(idx, "b:1", TOKENS[:64], 16, list(range(20, 24)), [4])
    other = TOKENS[:32] + [7] * 128
    assert idx.match(RequestKeys(TOKENS, "m"), ["a:1", "b:1", "c:1"]) == [10.0, 4.0, 0.0]
    assert idx.match(RequestKeys(other, "m"), ["a:1", "b:1"]) == [2.0, 2.0]
    assert idx.match(RequestKeys([5] * 160, "m"), ["a:1", "b:1"]) == [0.0, 0.0]


def test_cache_salt_separates_prefixes() -> None:
    idx = PreciseIndex()
    idx.apply("a:1", "m", batch(encode_stored([1, 2], None, TOKENS[:32], 16, extra_keys=[["s1"], None])))
    assert idx.match(RequestKeys(TOKENS, "m", cache_salt="s1"), ["a:1"]) == [2.0]
    assert idx.match(RequestKeys(TOKENS, "m", cache_salt="s2"), ["a:1"]) == [0.0]
    assert idx.match(RequestKeys(TOKENS, "m"), ["a:1"]) == [0.0]


def test_tier_weights_best_tier_counts() -> None:
    idx = PreciseIndex()
    store_chain(idx, "a:1", TOKENS, 16, list(range(10)), [10])
    idx.apply("b:1", "m", batch(encode_stored(list(range(10)), None, TOKENS, 16, medium="CPU")))
    idx.apply("c:1", "m", batch(encode_stored(list(range(10)), None, TOKENS, 16, medium="CPU")))
    idx.apply("c:1", "m", batch(encode_stored(list(range(5)), None, TOKENS[:80], 16, medium="GPU")))
    got = idx.match(RequestKeys(TOKENS, "m"), ["a:1", "b:1", "c:1"])
    assert got == pytest.approx([10.0, 8.0, 5 + 5 * 0.8])


def test_duplicate_stores_unknown_removals_and_clear() -> None:
    idx = PreciseIndex()
    store_chain(idx, "a:1", TOKENS, 16, list(range(10)), [10])
    store_chain(idx, "a:1", TOKENS, 16, list(range(10)), [10])
    assert idx.stats.duplicate_stores == 10 and idx.entries == 10
    idx.apply("a:1", "m", batch(encode_removed([3, 3, 99])))
    assert idx.stats.unknown_removals == 2
    idx.apply("a:1", "m", batch(["AllBlocksCleared"]))
    assert idx.entries == 0 and idx.keys_held() == 0
    assert idx.match(RequestKeys(TOKENS, "m"), ["a:1"]) == [0.0]


def test_unknown_parent_is_not_guessed() -> None:
    idx = PreciseIndex()
    idx.apply("a:1", "m", batch(encode_stored([5], 424242, TOKENS[:16], 16)))
    assert idx.stats.unknown_parents == 1 and idx.entries == 0


def test_forget_releases_slot_and_speculative_entries() -> None:
    now = [0.0]
    idx = PreciseIndex(clock=lambda: now[0], speculative_ttl=2.0)
    store_chain(idx, "a:1", TOKENS, 16, list(range(10)), [10])
    idx.speculate("b:1", RequestKeys(TOKENS, "m"))
    assert idx.match(RequestKeys(TOKENS, "m"), ["a:1", "b:1"]) == [10.0, 10.0]
    idx.forget("a:1")
    idx.forget("b:1")
    assert idx.entries == 0 and idx.speculative_entries == 0 and idx.addresses() == []


def test_speculative_entries_expire() -> None:
    now = [100.0]
    idx = PreciseIndex(clock=lambda: now[0], speculative_ttl=2.0)
    assert idx.speculate("a:1", RequestKeys(TOKENS, "m")) == 10
    assert idx.match(RequestKeys(TOKENS, "m"), ["a:1"]) == [10.0]
    now[0] += 1.0
    idx.speculate("a:1", RequestKeys(TOKENS[:64], "m"))  # renews the first 4 blocks
    now[0] += 1.5
    assert idx.match(RequestKeys(TOKENS, "m"), ["a:1"]) == [4.0]
    now[0] += 1.0
    assert idx.match(RequestKeys(TOKENS, "m"), ["a:1"]) == [0.0]
    assert idx.speculative_entries == 0


def test_flood_stays_bounded() -> None:
    """A stream of random blocks from many invented endpoints never grows past the bounds."""
    idx = PreciseIndex(max_pods=8, max_entries_per_pod=500, max_entries=2000, max_speculative=100)
    rng = random.Random(1)
    for i in range(400):
        pod = f"10.0.0.{i % 20}:8000"
        hs = [rng.getrandbits(64) for _ in range(16)]
        idx.apply(pod, "m", batch(encode_stored(hs, None, [rng.randrange(50000) for _ in range(256)], 16)))
        idx.speculate(pod, [rng.getrandbits(64) for _ in range(50)])
        assert idx.entries <= 2000
        assert all(idx.size_of(p) <= 500 for p in idx.addresses())
        assert idx.speculative_entries <= 100
    assert len(idx.addresses()) == 8
    assert idx.stats.refused_pods > 0 and idx.stats.evicted > 0
    # what is indexed is still consistent: the global map holds no key no endpoint holds
    held = {k for p in idx._pods.values() for t in p.tiers.values() for v in t.engine.values()
            for k in ((v,) if isinstance(v, int) else v)}
    assert set(idx._where["gpu"]) <= held


def test_other_kv_groups_are_skipped() -> None:
    idx = PreciseIndex()
    ev = encode_stored([1], None, TOKENS[:16], 16)
    ev += [None] * (9 - len(ev)) + [1]  # group_idx 1 (a sliding-window group of a hybrid model)
    idx.apply("a:1", "m", batch(ev))
    assert idx.entries == 0 and idx.stats.skipped_events == 1


def test_held_speculative_entry_outlives_the_ttl_until_its_request_finishes() -> None:
    """A request waiting in the engine's queue longer than the TTL keeps its speculative entry
    (issue 14: with TTL-only entries a long queue wait lost the tenant's home); its TTL starts
    when the request finishes, and a second request holding the same keys keeps them longer."""
    now = [100.0]
    idx = PreciseIndex(clock=lambda: now[0], speculative_ttl=2.0)
    keys = RequestKeys(TOKENS, "m")
    idx.speculate("a:1", keys, hold=True)
    idx.speculate("a:1", keys, hold=True)  # a second request in flight with the same prompt
    now[0] += 30.0  # far past the TTL: both still queued
    assert idx.match(keys, ["a:1"]) == [10.0]
    idx.release("a:1", keys)
    now[0] += 30.0
    assert idx.match(keys, ["a:1"]) == [10.0]  # the other request still holds it
    idx.release("a:1", keys)
    now[0] += 1.5
    assert idx.match(keys, ["a:1"]) == [10.0]  # its TTL runs from the release
    now[0] += 1.0
    assert idx.match(keys, ["a:1"]) == [0.0]
    assert idx.speculative_entries == 0 and not idx._spec_held
    assert idx.stats.speculative_expired == 10 and idx.stats.speculative_expired_unconfirmed == 10


def test_unheld_entries_expire_by_the_ttl_and_count_unconfirmed_expiries() -> None:
    """llm-d's lifetime (no hold): the entry expires speculative_ttl after the pick even though the
    request may still be queued; expiries before the endpoint published are counted as such."""
    now = [0.0]
    idx = PreciseIndex(clock=lambda: now[0], speculative_ttl=2.0)
    keys = RequestKeys(TOKENS, "m")
    idx.speculate("a:1", keys)
    idx.speculate("b:1", keys)
    store_chain(idx, "b:1", TOKENS, 16, list(range(10)), [10])  # b publishes its blocks, a never does
    now[0] += 2.5
    assert idx.match(keys, ["a:1", "b:1"]) == [0.0, 10.0]
    assert idx.stats.speculative_expired == 20 and idx.stats.speculative_expired_unconfirmed == 10


def test_the_endpoints_own_store_starts_a_held_entrys_ttl() -> None:
    """A held entry whose finish is never reported (a profile that does not forward on_finished)
    starts its TTL when the endpoint publishes the block, and lasts at most max_hold otherwise."""
    now = [0.0]
    idx = PreciseIndex(clock=lambda: now[0], speculative_ttl=2.0, max_hold=60.0)
    keys = RequestKeys(TOKENS, "m")
    idx.speculate("a:1", keys, hold=True)
    idx.speculate("b:1", keys, hold=True)
    now[0] += 10.0
    store_chain(idx, "a:1", TOKENS[:64], 16, list(range(4)), [4])  # a stored the first 4 blocks
    assert idx.stats.speculative_confirmed == 4
    now[0] += 2.5
    # a: its 4 published blocks are real, the 6 unpublished ones still held; b: all held
    assert idx.match(keys, ["a:1", "b:1"]) == [10.0, 10.0]
    idx.apply("a:1", "m", batch(encode_removed([0])))  # a evicts block 0: its speculative copy is gone
    assert idx.match(keys, ["a:1", "b:1"]) == [0.0, 10.0]
    now[0] += 60.0  # past max_hold: nothing is pinned for ever
    assert idx.match(keys, ["a:1", "b:1"]) == [0.0, 0.0]
    assert idx.speculative_entries == 0 and not idx._spec_held


def test_held_entries_stay_bounded() -> None:
    """Held entries count against max_speculative like the others (the earliest to expire go first),
    and releases of keys already dropped are harmless."""
    now = [0.0]
    idx = PreciseIndex(clock=lambda: now[0], max_speculative=100, speculative_ttl=2.0)
    rng = random.Random(3)
    made = []
    for i in range(200):
        ks = [rng.getrandbits(64) for _ in range(30)]
        idx.speculate(f"10.0.0.{i % 4}:8000", ks, hold=True)
        made.append((f"10.0.0.{i % 4}:8000", ks))
        now[0] += 0.01
        assert idx.speculative_entries <= 100 and len(idx._spec_held) <= 100
        assert len(idx._spec_q) <= 4 * 1024 + 30
    for pod, ks in made:
        idx.release(pod, ks)
    now[0] += 3.0
    assert idx.match([made[-1][1][0]], ["10.0.0.3:8000"]) == [0.0]
    assert idx.speculative_entries == 0 and not idx._spec_held
