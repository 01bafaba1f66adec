"""The precise block index: which endpoint holds which prefix blocks, from the engines' own events.

Keys are the picker's (epp.kvevents.keys), recomputed from each BlockStored event's token ids and
chained from the key state its parent block left; the engine's block hashes are kept per endpoint
only to apply removals and to find a parent. A global map per tier (gpu, cpu, ...) answers "which
endpoints hold key k" as a bitmask of endpoint slots, so a lookup ANDs one integer per block.

Lookups give, per endpoint, the longest run of leading blocks it holds, each block counted with the
best tier's weight (GPU 1.0, CPU 0.8 by default) — llm-d's LongestPrefix scoring. Speculative
entries (after a pick, before the engine's events arrive) count with the GPU weight. An entry made
for a request is *held* while that request is in flight — under load a request can wait in the
engine's queue far longer than the TTL, and an entry that expired then sent the tenant's next
requests elsewhere — and its TTL starts only when the last request holding it finishes
(`release`) or the endpoint's own BlockStored for that key arrives. A held entry still expires
after `max_hold` (a request whose finish is never reported cannot pin it for ever).

Engine and picker block sizes may differ: an engine block maps to the picker blocks it overlaps
(removing it drops them: they are no longer whole), and an engine block that ends inside a picker
block leaves its tail tokens as the chain state for its children. A removal clears the endpoint's
bit for the picker blocks at once (no reference counts): if two engine blocks with different
hashes held the same tokens, the endpoint loses credit early — a miss, never a false hit.

Memory is bounded whatever the stream: at most `max_pods` endpoints, `max_entries_per_pod` engine
blocks each (oldest dropped first) and `max_entries` over all; speculative entries at most
`max_speculative` (the earliest to expire dropped first). All methods take the index's lock:
subscribers write from their threads while the serving loop reads.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice
from operator import and_
from typing import Any

from epp.kvevents.keys import DEFAULT_BLOCK_TOKENS, RequestKeys, chain, model_seed, pack
from epp.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch

DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {"gpu": 1.0, "cpu": 0.8}
DEFAULT_MAX_PODS = 1024
DEFAULT_MAX_ENTRIES_PER_POD = 1_000_000
DEFAULT_MAX_ENTRIES = 8_000_000
DEFAULT_MAX_SPECULATIVE = 1_000_000
DEFAULT_SPECULATIVE_TTL = 2.0
DEFAULT_MAX_HOLD = 300.0  # a held speculative entry's longest life (its request's finish never came)

# Chain state of an engine block that ends inside a picker block: the key before the open picker
# block, the open block's tokens so far (packed) and the engine blocks those tokens came from.
_Partial = tuple[int, bytes, tuple[int, ...]]


class _Tier:
    """One endpoint's blocks in one tier."""

    __slots__ = ("engine", "partial")

    def __init__(self) -> None:
        self.engine: dict[int, int | tuple[int, ...]] = {}  # engine hash -> picker key(s); order = age
        self.partial: dict[int, _Partial] = {}


class _Pod:
    __slots__ = ("address", "bit", "entries", "slot", "tiers")

    def __init__(self, address: str, slot: int) -> None:
        self.address = address
        self.slot = slot
        self.bit = 1 << slot
        self.tiers: dict[str, _Tier] = {}
        self.entries = 0


@dataclass(slots=True)
class IndexStats:
    """Counters since start (the index's metrics read them)."""

    batches: int = 0
    stored_blocks: int = 0  # engine blocks in BlockStored events
    removed_blocks: int = 0
    cleared: int = 0  # AllBlocksCleared events
    duplicate_stores: int = 0  # a block an endpoint already held in that tier
    unknown_removals: int = 0  # removals of blocks the index does not hold (duplicates, or never seen)
    unknown_parents: int = 0  # stores whose parent block is not indexed (cannot be keyed)
    skipped_events: int = 0  # malformed for indexing (token/hash counts disagree, other KV groups)
    evicted: int = 0  # engine blocks dropped by the memory bounds
    refused_pods: int = 0  # events for a new endpoint beyond max_pods
    lookups: int = 0
    lookup_blocks: int = 0  # request blocks looked up
    lookup_hit_blocks: int = 0  # of those, the best endpoint's matched blocks
    speculated: int = 0  # speculative entries made or renewed
    speculative_expired: int = 0  # entries whose TTL ran out
    speculative_expired_unconfirmed: int = 0  # of those, ones the endpoint had not (yet) published
    speculative_confirmed: int = 0  # held entries released by the endpoint's own BlockStored


class PreciseIndex:
    """Per-endpoint prefix blocks from KV events (see the module doc)."""

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS, hash_seed: str = "",
                 tier_weights: Mapping[str, float] | None = None, *, max_pods: int = DEFAULT_MAX_PODS,
                 max_entries_per_pod: int = DEFAULT_MAX_ENTRIES_PER_POD, max_entries: int = DEFAULT_MAX_ENTRIES,
                 speculative_ttl: float = DEFAULT_SPECULATIVE_TTL, max_speculative: int = DEFAULT_MAX_SPECULATIVE,
                 max_hold: float = DEFAULT_MAX_HOLD, clock: Callable[[], float] = time.monotonic) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.block_tokens = block_tokens
        self.hash_seed = hash_seed
        self.weights = {k.lower(): float(v) for k, v in (tier_weights or DEFAULT_TIER_WEIGHTS).items()}
        self.max_pods = max(1, max_pods)
        self.max_entries_per_pod = max(1, max_entries_per_pod)
        self.max_entries = max(1, max_entries)
        self.speculative_ttl = speculative_ttl
        self.max_speculative = max(0, max_speculative)
        self.max_hold = max(max_hold, speculative_ttl)
        self.release_on_store = True  # the endpoint's BlockStored for a held key starts its TTL
        self.clock = clock
        self.lock = threading.Lock()
        self.stats = IndexStats()
        self._pods: dict[str, _Pod] = {}
        self._where: dict[str, dict[int, int]] = {}  # tier -> picker key -> bitmask of slots
        self._free: list[int] = []
        self._next_slot = 0
        self._total = 0
        self._seeds: dict[str, int] = {}
        # speculative entries: key -> mask, (key, slot) -> expiry, a heap of (expiry, key, slot)
        # (stale heap items are skipped), (key, slot) -> requests in flight holding it
        self._spec: dict[int, int] = {}
        self._spec_exp: dict[tuple[int, int], float] = {}
        self._spec_q: list[tuple[float, int, int]] = []
        self._spec_held: dict[tuple[int, int], int] = {}

    # ---- reading -------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        """Engine blocks held over all endpoints and tiers."""
        return self._total

    def keys_held(self, tier: str = "gpu") -> int:
        """Distinct picker keys some endpoint holds in `tier`."""
        return len(self._where.get(tier, ()))

    @property
    def speculative_entries(self) -> int:
        return len(self._spec_exp)

    def addresses(self) -> list[str]:
        """Endpoints that have published events (and not been forgotten)."""
        with self.lock:
            return list(self._pods)

    def publishes(self, address: str) -> bool:
        return address in self._pods

    def size_of(self, address: str) -> int:
        pod = self._pods.get(address)
        return 0 if pod is None else pod.entries

    def request_keys(self, token_ids: Sequence[Any], model: str, max_blocks: int = 1 << 16,
                     cache_salt: str | None = None) -> RequestKeys:
        """A request's keys as this index computes them (same block size and seed)."""
        return RequestKeys(token_ids, model, self.block_tokens, max_blocks, self.hash_seed, cache_salt)

    def match(self, keys: RequestKeys | Sequence[int], addresses: Sequence[str]) -> list[float]:
        """Per address: leading blocks held, each weighted by its best tier (speculative = GPU)."""
        with self.lock:
            out = self._match(keys, addresses)
            st = self.stats
            st.lookups += 1
            total = keys.count if isinstance(keys, RequestKeys) else len(keys)
            st.lookup_blocks += total
            st.lookup_hit_blocks += round(max(out, default=0.0) / self.weights.get("gpu", 1.0)) if out else 0
            return out

    def _match(self, keys: RequestKeys | Sequence[int], addresses: Sequence[str]) -> list[float]:
        n = len(addresses)
        self._expire(self.clock())
        maps = [m for m in self._where.values() if m]
        if self._spec:
            maps.append(self._spec)
        if not maps:
            return [0.0] * n
        lazy: RequestKeys | None = None
        if isinstance(keys, RequestKeys):
            lazy, total = keys, keys.count
            ks = keys.upto(4)
        else:
            ks, total = list(keys), len(keys)
        if not total:
            return [0.0] * n
        if len(maps) == 1:
            get0 = maps[0].get

            def get(k: int) -> int:
                return get0(k, 0)
        else:
            gets = [m.get for m in maps]

            def get(k: int) -> int:
                v = 0
                for g in gets:
                    v |= g(k, 0)
                return v
        acc = list(accumulate(map(get, ks), and_))
        while acc and acc[-1] and len(acc) < total and lazy is not None:
            have = len(acc)
            ks = lazy.upto(2 * have)
            acc.extend(islice(accumulate(map(get, islice(ks, have, None)), and_, initial=acc[-1]), 1, None))
        if not acc or not acc[0]:
            return [0.0] * n
        # matched blocks per slot. Masks only lose bits as i grows: each distinct value's successor
        # first appears where its dropped slots stopped matching (acc.index runs in C).
        matched: dict[int, int] = {}
        distinct = list(dict.fromkeys(acc))
        for j, mask in enumerate(distinct):
            if not mask:
                break
            if j + 1 < len(distinct):
                nxt = distinct[j + 1]
                gone, count = mask & ~nxt, acc.index(nxt)
            else:
                gone, count = mask, len(acc)
            while gone:
                low = gone & -gone
                matched[low.bit_length() - 1] = count
                gone ^= low
        weighted = self._weighted(ks, matched)
        out = [0.0] * n
        pods = self._pods
        for i, a in enumerate(addresses):
            pod = pods.get(a)
            if pod is not None:
                out[i] = weighted.get(pod.slot, 0.0)
        return out

    def _weighted(self, ks: Sequence[int], matched: dict[int, int]) -> dict[int, float]:
        """Matched blocks × tier weight; the per-block loop only when a lower-weight tier holds data."""
        gpu_w = self.weights.get("gpu", 1.0)
        others = [(self.weights.get(t, 1.0), m) for t, m in self._where.items() if m]
        if all(w == gpu_w for w, _ in others):
            return {s: c * gpu_w for s, c in matched.items()}
        tiers = sorted([*others, (gpu_w, self._spec)], key=lambda x: -x[0])
        out: dict[int, float] = {}
        for slot, count in matched.items():
            bit = 1 << slot
            total = 0.0
            for k in islice(ks, count):
                for w, m in tiers:
                    if m.get(k, 0) & bit:
                        total += w
                        break
            out[slot] = total
        return out

    # ---- speculative entries -------------------------------------------------------------
    def speculate(self, address: str, keys: RequestKeys | Sequence[int], ttl: float | None = None,
                  hold: bool = False) -> int:
        """Count `keys` as held by `address` until now + ttl (default speculative_ttl); with `hold`,
        until `release` (or `max_hold`) and then the ttl. Returns how many keys."""
        if self.max_speculative == 0:
            return 0
        ks = keys.all() if isinstance(keys, RequestKeys) else list(keys)
        ks = ks[: self.max_speculative]
        now = self.clock()
        life = self.max_hold if hold else (self.speculative_ttl if ttl is None else ttl)
        exp = now + life
        with self.lock:
            self._expire(now)
            pod = self._pod(address)
            if pod is None:
                return 0
            spec, spec_exp, q, held = self._spec, self._spec_exp, self._spec_q, self._spec_held
            bit, slot = pod.bit, pod.slot
            push = heapq.heappush
            for k in ks:
                spec[k] = spec.get(k, 0) | bit
                ks_ = (k, slot)
                cur = spec_exp.get(ks_)
                if hold:
                    held[ks_] = held.get(ks_, 0) + 1
                if cur is None or cur < exp:
                    spec_exp[ks_] = exp
                    push(q, (exp, k, slot))
            self.stats.speculated += len(ks)
            while len(spec_exp) > self.max_speculative and q:  # over the cap: the earliest to expire go
                self._spec_drop(*heapq.heappop(q), evict=True)
            if len(q) > 4 * max(len(spec_exp), 1024):  # stale heap items: rebuild (bounded memory)
                self._spec_q = [(e, k, s) for (k, s), e in spec_exp.items()]
                heapq.heapify(self._spec_q)
            return len(ks)

    def release(self, address: str, keys: RequestKeys | Sequence[int]) -> None:
        """A request that held `keys` on `address` (speculate(hold=True)) finished: the entries no
        other request in flight holds start their TTL now."""
        ks = keys.all() if isinstance(keys, RequestKeys) else list(keys)
        with self.lock:
            pod = self._pods.get(address)
            if pod is None or not self._spec_held:
                return
            slot, exp = pod.slot, self.clock() + self.speculative_ttl
            for k in ks[: self.max_speculative]:
                self._unhold((k, slot), exp, 1)

    def _unhold(self, ks: tuple[int, int], exp: float, n: int) -> None:
        held = self._spec_held
        c = held.get(ks)
        if c is None:
            return
        if c > n:
            held[ks] = c - n
            return
        del held[ks]
        cur = self._spec_exp.get(ks)
        if cur is not None and cur > exp:
            self._spec_exp[ks] = exp
            heapq.heappush(self._spec_q, (exp, *ks))

    def _expire(self, now: float) -> None:
        q = self._spec_q
        while q and q[0][0] <= now:
            self._spec_drop(*heapq.heappop(q))

    def _spec_drop(self, exp: float, key: int, slot: int, force: bool = False, evict: bool = False) -> None:
        ks = (key, slot)
        cur = self._spec_exp.get(ks)
        if cur is None or (cur != exp and not force):
            return  # renewed or shortened since: another heap item expires it
        del self._spec_exp[ks]
        self._spec_held.pop(ks, None)
        bit = 1 << slot
        if not (force or evict):
            st = self.stats
            st.speculative_expired += 1
            gpu = self._where.get("gpu")
            if gpu is None or not gpu.get(key, 0) & bit:
                st.speculative_expired_unconfirmed += 1
        m = self._spec.get(key, 0) & ~bit
        if m:
            self._spec[key] = m
        else:
            self._spec.pop(key, None)

    # ---- writing -------------------------------------------------------------------------
    def _pod(self, address: str) -> _Pod | None:
        pod = self._pods.get(address)
        if pod is not None:
            return pod
        if len(self._pods) >= self.max_pods:
            self.stats.refused_pods += 1
            return None
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            slot = self._next_slot
            self._next_slot += 1
        pod = self._pods[address] = _Pod(address, slot)
        return pod

    def _seed(self, model: str) -> int:
        s = self._seeds.get(model)
        if s is None:
            if len(self._seeds) > 4096:
                self._seeds.clear()
            s = self._seeds[model] = model_seed(model, self.hash_seed)
        return s

    def apply(self, address: str, model: str, batch: EventBatch | Iterable[Any]) -> None:
        """Apply one message's events from endpoint `address` serving `model`, in order."""
        events = batch.events if isinstance(batch, EventBatch) else batch
        with self.lock:
            self.stats.batches += 1
            pod = self._pod(address)
            if pod is None:
                return
            for ev in events:
                if isinstance(ev, BlockStored):
                    self._store(pod, model, ev)
                elif isinstance(ev, BlockRemoved):
                    self._remove(pod, ev)
                elif isinstance(ev, AllBlocksCleared):
                    self.stats.cleared += 1
                    self._clear(pod)

    def _tier(self, pod: _Pod, name: str) -> _Tier:
        t = pod.tiers.get(name)
        if t is None:
            t = pod.tiers[name] = _Tier()
            self._where.setdefault(name, {})
        return t

    def _state(self, pod: _Pod, tier: _Tier, parent: int) -> tuple[int, bytes, tuple[int, ...]] | None:
        """The chain state a parent engine block left: (key before the open block, open tokens, their blocks)."""
        for t in (tier, *pod.tiers.values()):
            p = t.partial.get(parent)
            if p is not None:
                return p
            v = t.engine.get(parent)
            if v is not None:
                return (v if isinstance(v, int) else v[-1]), b"", ()
        return None

    def _store(self, pod: _Pod, model: str, ev: BlockStored) -> None:
        st = self.stats
        hashes = ev.block_hashes
        st.stored_blocks += len(hashes)
        if ev.group_idx not in (None, 0):  # hybrid models: only the first (full-attention) group
            st.skipped_events += 1
            return
        tier = self._tier(pod, ev.tier)
        bs = ev.block_size
        tokens = ev.token_ids
        if not len(tokens):
            self._tier_copy(pod, tier, ev)
            return
        if len(tokens) != len(hashes) * bs:
            st.skipped_events += 1
            return
        eff = ev.lora_name or model
        tail_blocks: tuple[int, ...] = ()
        if ev.parent_hash is None:
            base, tail = self._seed(eff), b""
        else:
            state = self._state(pod, tier, ev.parent_hash)
            if state is None:
                st.unknown_parents += 1
                return
            base, tail, tail_blocks = state
        B = self.block_tokens
        off = len(tail) // 4  # tokens carried over from the parent's open block
        data = tail + pack(tokens)
        extras = self._extras(ev, off, len(data) // 4, eff)
        keys = chain(base, data, B, extras)
        m = len(keys)
        where = self._where[ev.tier]
        bit = pod.bit
        engine = tier.engine
        if tail_blocks and m:  # the parent's tail blocks now complete picker block 0
            for h in tail_blocks:
                v = engine.get(h)
                if v is not None:
                    engine[h] = (*((v,) if isinstance(v, int) else v), keys[0])
                    self._hold(where, keys[0], bit)
        for i, h in enumerate(hashes):
            if h in engine:
                st.duplicate_stores += 1
                engine[h] = engine.pop(h)  # refresh its age
                continue
            start, end = off + i * bs, off + (i + 1) * bs
            lo, hi = start // B, min(m, -(-end // B))
            if hi - lo == 1:
                k = keys[lo]
                engine[h] = k
                self._hold(where, k, bit)
            else:
                ks = tuple(keys[lo:hi])
                engine[h] = ks
                for k in ks:
                    self._hold(where, k, bit)
            if end % B:
                j = end // B
                if j * B >= off:  # engine blocks holding the open picker block's tokens so far
                    open_blocks = tuple(hashes[(j * B - off) // bs:i + 1])
                else:  # the open block started in the parent's tail
                    open_blocks = tail_blocks + tuple(hashes[:i + 1])
                tier.partial[h] = (keys[j - 1] if j else base, data[j * B * 4:end * 4], open_blocks)
            pod.entries += 1
            self._total += 1
        if self._spec_held and self.release_on_store:  # the engine holds these now: held entries start their TTL
            exp, slot, held = self.clock() + self.speculative_ttl, pod.slot, self._spec_held
            for k in keys:
                c = held.get((k, slot))
                if c is not None:
                    self.stats.speculative_confirmed += 1
                    self._unhold((k, slot), exp, c)
        self._bound(pod, tier)

    def _extras(self, ev: BlockStored, off: int, ntokens: int, lora: str) -> list[Any] | None:
        """The event's per-engine-block extra keys, moved to the picker blocks they start in; the
        adapter's name (already the model of the chain) is left out."""
        if not ev.extra_keys:
            return None
        B, bs = self.block_tokens, ev.block_size
        out: list[Any] = [None] * (ntokens // B)
        for i, e in enumerate(ev.extra_keys):
            if not e:
                continue
            items = [x for x in e if x != lora]
            j = (off + i * bs) // B
            if items and j < len(out):
                out[j] = (*(out[j] or ()), *items)
        return out if any(out) else None

    def _tier_copy(self, pod: _Pod, tier: _Tier, ev: BlockStored) -> None:
        """A store without tokens: blocks moving tier (offload); copy their keys from another tier."""
        where = self._where[ev.tier]
        for h in ev.block_hashes:
            for other in pod.tiers.values():
                v = other.engine.get(h) if other is not tier else None
                if v is not None and h not in tier.engine:
                    tier.engine[h] = v
                    for k in (v,) if isinstance(v, int) else v:
                        self._hold(where, k, pod.bit)
                    pod.entries += 1
                    self._total += 1
                    break
            else:
                self.stats.unknown_parents += 1
        self._bound(pod, tier)

    @staticmethod
    def _hold(where: dict[int, int], k: int, bit: int) -> None:
        where[k] = where.get(k, 0) | bit

    @staticmethod
    def _release(where: dict[int, int], k: int, bit: int) -> None:
        m = where.get(k, 0) & ~bit
        if m:
            where[k] = m
        else:
            where.pop(k, None)

    def _drop(self, pod: _Pod, tier_name: str, tier: _Tier, h: int) -> bool:
        v = tier.engine.pop(h, None)
        tier.partial.pop(h, None)
        if v is None:
            return False
        where = self._where[tier_name]
        for k in (v,) if isinstance(v, int) else v:
            self._release(where, k, pod.bit)
        pod.entries -= 1
        self._total -= 1
        return True

    def _remove(self, pod: _Pod, ev: BlockRemoved) -> None:
        st = self.stats
        st.removed_blocks += len(ev.block_hashes)
        if ev.group_idx not in (None, 0):
            st.skipped_events += 1
            return
        tier = pod.tiers.get(ev.tier)
        for h in ev.block_hashes:
            if tier is None or not self._drop(pod, ev.tier, tier, h):
                st.unknown_removals += 1

    def _bound(self, pod: _Pod, tier: _Tier) -> None:
        """Drop this endpoint's oldest blocks in `tier` while over a memory bound."""
        name = next(n for n, t in pod.tiers.items() if t is tier)
        while tier.engine and (pod.entries > self.max_entries_per_pod or self._total > self.max_entries):
            self._drop(pod, name, tier, next(iter(tier.engine)))
            self.stats.evicted += 1

    def _clear(self, pod: _Pod) -> None:
        for name, tier in pod.tiers.items():
            where = self._where[name]
            bit = pod.bit
            for v in tier.engine.values():
                for k in (v,) if isinstance(v, int) else v:
                    m = where.get(k, 0) & ~bit
                    if m:
                        where[k] = m
                    else:
                        where.pop(k, None)
        self._total -= pod.entries
        pod.entries = 0
        pod.tiers.clear()

    def clear(self, address: str) -> None:
        """Forget every block `address` holds (AllBlocksCleared, or its event stream restarted)."""
        with self.lock:
            pod = self._pods.get(address)
            if pod is not None:
                self._clear(pod)

    def forget(self, address: str) -> None:
        """The endpoint left the pool: drop its blocks, speculative entries and slot."""
        with self.lock:
            pod = self._pods.pop(address, None)
            if pod is None:
                return
            self._clear(pod)
            slot = pod.slot
            for (k, s) in [ks for ks in self._spec_exp if ks[1] == slot]:
                self._spec_drop(0.0, k, s, force=True)
            heapq.heappush(self._free, slot)

