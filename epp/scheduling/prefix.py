"""Prefix affinity: send a request where its prompt prefix is likely already in the KV cache.

Two ways, selectable with the prefix-cache-scorer `mode` parameter:

- `index` (default): an approximate index of where requests were *sent*. The prompt (UTF-8) is cut
  into fixed-size blocks (64 bytes = 16 tokens × 4 by default, or the pods' KV block size × 4 when
  auto-tuned), at most 256 of them; block i's hash is xxhash64 of the block seeded with block i−1's
  hash, block 0 seeded by the target model's hash, so one hash names a whole prefix. Each endpoint
  keeps a bounded LRU of the hashes routed to it, and a global map from hash to a bitmask of
  endpoint slots answers "who has this prefix" for all endpoints in one integer AND per block.
  Score = leading blocks matched / blocks in the prompt; matching stops at the first miss.
- `rendezvous`: stateless. The hash of the first K blocks is the prefix's key; every endpoint gets
  the weight xxhash64(address, seed=key) and the highest-weight endpoint whose load is within
  (1+ε) of the mean (consistent hashing with bounded loads) is the prefix's home, scoring 1.0.
  Any number of picker replicas agree on the home without sharing state.

Memory of the index is bounded: each endpoint's LRU holds at most its capacity (31250 by default,
the pod's `num_gpu_blocks` when auto-tuned), the whole index at most `maxIndexEntries`, and the
global map never holds a hash no LRU holds. Endpoints that leave the pool are purged (`forget`,
or a periodic sweep of the candidates seen).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice, repeat
from operator import and_
from typing import Any

import xxhash

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.registry import FILTER, SCORER, BuildContext, ConfigError, Params, register

CHARS_PER_TOKEN = 4
DEFAULT_BLOCK_TOKENS = 16
MIN_AUTO_BLOCK_TOKENS = 16  # engines with tiny pages (SGLang: 1) would make the index huge and short
DEFAULT_MAX_BLOCKS = 256
DEFAULT_LRU_CAPACITY = 31250
# Whole-index cap. Measured ~170 bytes per entry (LRU slot + global map slot + bitmask), so the
# default bounds the index near 170 MB however many pods the pool has; 31250 × 32 pods fit whole.
DEFAULT_MAX_ENTRIES = 1_000_000
DEFAULT_PURGE_AFTER = 60.0  # seconds an endpoint may be missing from the candidates before its entries go
DEFAULT_RENDEZVOUS_BLOCKS = 8
DEFAULT_RENDEZVOUS_EPSILON = 0.25
DEFAULT_MATCH_SCALE_TOKENS = 8192
MAX_BLOCKS = 4096  # matching stops here however the caps are set (prompts are cut at 64K chars anyway)

_xxh64 = xxhash.xxh64_intdigest
_MISSING = object()


PREFIX_HIT_RATIO = "prefix_hit_ratio"  # request.scratch keys set when a routed request was matched
PREFIX_HIT_BYTES = "prefix_hit_bytes"


class PromptBlocks:
    """A prompt's chained block hashes, computed on demand: matching usually stops early, and the
    rest is only needed when the request is routed (index insert)."""

    __slots__ = ("_data", "_hashes", "_seed", "_size", "count")

    def __init__(self, prompt: str, model: str, block_bytes: int, max_blocks: int) -> None:
        # A char is at least one byte: this many chars always yield every block we can use.
        data = prompt[: block_bytes * max_blocks].encode("utf-8", "surrogatepass") if prompt else b""
        self._data = data
        self._size = block_bytes
        self.count = min(len(data) // block_bytes, max_blocks)
        self._seed = _xxh64(model.encode("utf-8", "surrogatepass"))
        self._hashes: list[int] = []

    def upto(self, n: int) -> list[int]:
        """The list of hashes, holding at least min(n, count) of them.

        The same list object grows in place, so a caller may keep it and call upto() again."""
        hs = self._hashes
        have = len(hs)
        if have >= n or have >= self.count:
            return hs
        n = min(self.count, n)
        h = hs[-1] if hs else self._seed
        data, size = self._data, self._size
        append = hs.append
        for start in range(have * size, n * size, size):
            h = _xxh64(data[start : start + size], h)
            append(h)
        return hs

    def all(self) -> list[int]:
        return self.upto(self.count)


def block_hashes(prompt: str, model: str, block_bytes: int, max_blocks: int) -> list[int]:
    """Chained xxhash64 of the prompt's full blocks of `block_bytes` UTF-8 bytes (at most `max_blocks`):
    block 0 seeded by the model's hash, block i by block i−1's."""
    return PromptBlocks(prompt, model, block_bytes, max_blocks).all()


class _Pod:
    """One endpoint's share of the index: its slot bit and its LRU of hashes (oldest first)."""

    __slots__ = ("address", "bit", "lru", "missing_since", "slot")

    def __init__(self, address: str, slot: int) -> None:
        self.address = address
        self.slot = slot
        self.bit = 1 << slot
        self.lru: dict[int, None] = {}
        self.missing_since: float | None = None


class PrefixIndex:
    """Approximate, bounded map of which endpoints were sent which prompt prefixes."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, purge_after: float = DEFAULT_PURGE_AFTER) -> None:
        self.max_entries = max(1, max_entries)
        self.purge_after = purge_after
        self._pods: dict[str, _Pod] = {}
        self._where: dict[int, int] = {}  # block hash -> bitmask of pod slots holding it
        self._free: list[int] = []  # heap of released slots (reuse low slots: masks stay small)
        self._next_slot = 0
        self._total = 0  # entries over all LRUs
        self._version = 0  # bumped when slots are assigned or released
        self._bits_cache: tuple[Sequence[Endpoint], int, list[int]] | None = None

    # ---- reading -------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        """Entries over all endpoints' LRUs (the memory bound applies to this)."""
        return self._total

    @property
    def distinct_hashes(self) -> int:
        return len(self._where)

    def addresses(self) -> list[str]:
        return list(self._pods)

    def size_of(self, address: str) -> int:
        pod = self._pods.get(address)
        return 0 if pod is None else len(pod.lru)

    def match(self, blocks: PromptBlocks | Sequence[int], endpoints: Sequence[Endpoint],
              scale: float = 1.0) -> list[float]:
        """Leading blocks each endpoint holds, times `scale` (aligned with `endpoints`)."""
        n = len(endpoints)
        where = self._where
        if not where:
            return [0.0] * n
        get = where.get
        lazy: PromptBlocks | None = None
        if isinstance(blocks, PromptBlocks):
            lazy, total = blocks, blocks.count
            hs = blocks.upto(64)  # a cold long prompt stops here: the rest is hashed on demand (or at insert)
        else:
            hs = list(blocks)
            total = len(hs)
        if not total or not get(hs[0], 0):
            return [0.0] * n
        # acc[i] = slots holding blocks 0..i (the AND of the masks); the loops run in C.
        acc = list(accumulate(map(get, hs, repeat(0)), and_))
        while acc[-1] and len(acc) < total and lazy is not None:
            have = len(acc)
            hs = lazy.upto(2 * have)
            acc.extend(islice(accumulate(map(get, islice(hs, have, None), repeat(0)), and_, initial=acc[-1]), 1, None))
        # Masks only lose bits as i grows: each distinct value's successor first appears where its
        # dropped slots stopped matching.
        distinct = list(dict.fromkeys(acc))
        steps: list[tuple[int, float]] = []  # (slots that matched exactly `count` blocks, count × scale)
        for j, mask in enumerate(distinct):
            if not mask:
                break
            if j + 1 < len(distinct):
                nxt = distinct[j + 1]
                steps.append((mask & ~nxt, acc.index(nxt) * scale))
            else:
                steps.append((mask, len(acc) * scale))
        bits = self._bits(endpoints)
        if len(steps) == 1:
            d, v = steps[0]
            return [v if b & d else 0.0 for b in bits]
        out = [0.0] * n
        for d, v in steps:  # a few steps; each pass is a comprehension rather than a nested loop
            out = [v if b & d else o for b, o in zip(bits, out, strict=True)]
        return out

    def _bits(self, endpoints: Sequence[Endpoint]) -> list[int]:
        """Each endpoint's slot bit (0 when not indexed), cached while the same sequence comes back."""
        cached = self._bits_cache
        if cached is not None and cached[0] is endpoints and cached[1] == self._version:
            return cached[2]
        pods = self._pods
        bits = []
        for ep in endpoints:
            pod = pods.get(ep.address)
            bits.append(0 if pod is None else pod.bit)
        self._bits_cache = (endpoints, self._version, bits)
        return bits

    # ---- writing -------------------------------------------------------------------------
    def insert(self, address: str, hashes: PromptBlocks | Sequence[int], capacity: int) -> None:
        """Record that a prompt with these block hashes was sent to `address`."""
        if isinstance(hashes, PromptBlocks):
            hashes = hashes.all()
        if not hashes:
            return
        pod = self._pods.get(address)
        if pod is None:
            pod = self._add(address)
        pod.missing_since = None
        lru, bit, where = pod.lru, pod.bit, self._where
        added = 0
        # Deepest block first, so block 0 is the most recent: eviction trims prefixes from their
        # tails and a shortened prefix still matches from the start.
        for h in reversed(hashes):
            if lru.pop(h, _MISSING) is _MISSING:
                where[h] = where.get(h, 0) | bit
                added += 1
            lru[h] = None
        self._total += added
        capacity = max(1, min(capacity, self.max_entries))
        if len(lru) > capacity:
            self._evict(pod, len(lru) - capacity)
        if self._total > self.max_entries:
            self._enforce_total()

    def forget(self, address: str) -> None:
        """Drop every entry of an endpoint (it left the pool)."""
        pod = self._pods.pop(address, None)
        if pod is None:
            return
        where, clear = self._where, ~pod.bit
        for h in pod.lru:
            m = where.get(h, 0) & clear
            if m:
                where[h] = m
            else:
                where.pop(h, None)
        self._total -= len(pod.lru)
        pod.lru.clear()
        heapq.heappush(self._free, pod.slot)
        self._version += 1

    def sweep(self, present: Iterable[str], now: float) -> list[str]:
        """Note which indexed endpoints are still candidates; forget those missing for `purge_after` s."""
        present_set = set(present)
        gone = []
        for address, pod in self._pods.items():
            if address in present_set:
                pod.missing_since = None
            elif pod.missing_since is None:
                pod.missing_since = now
            elif now - pod.missing_since >= self.purge_after:
                gone.append(address)
        for address in gone:
            self.forget(address)
        return gone

    def _add(self, address: str) -> _Pod:
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            slot = self._next_slot
            self._next_slot += 1
        pod = _Pod(address, slot)
        self._pods[address] = pod
        self._version += 1
        return pod

    def _evict(self, pod: _Pod, count: int) -> None:
        # Evict a little more than needed: iterating a dict from its front after many front
        # deletions is slow, so batching keeps eviction amortised O(1) per entry.
        lru = pod.lru
        count = min(len(lru), count + len(lru) // 64)
        it = iter(lru)
        victims = [next(it) for _ in range(count)]
        where, clear = self._where, ~pod.bit
        for h in victims:
            del lru[h]
            m = where.get(h, 0) & clear
            if m:
                where[h] = m
            else:
                where.pop(h, None)
        self._total -= count
        if not lru:  # no empty records: the number of endpoints tracked stays ≤ entries
            self.forget(pod.address)

    def _enforce_total(self) -> None:
        while self._total > self.max_entries:
            biggest = max(self._pods.values(), key=lambda p: len(p.lru))
            self._evict(biggest, min(len(biggest.lru), self._total - self.max_entries))


def rendezvous_home(key: int, endpoints: Sequence[Endpoint], loads: Sequence[float], epsilon: float) -> int:
    """Index of the prefix key's home: highest xxhash64(address, key) among endpoints whose load + 1
    fits within ceil((1 + ε) × (total load + 1) / n); -1 when none fits."""
    n = len(endpoints)
    if n == 0:
        return -1
    cap = math.ceil((1.0 + epsilon) * (sum(loads) + 1.0) / n)
    weights = [_xxh64(ep.address.encode(), key) for ep in endpoints]
    best = max(range(n), key=weights.__getitem__)
    if loads[best] + 1.0 <= cap:  # the usual case: the home has room, no sort needed
        return best
    order = sorted(range(n), key=weights.__getitem__, reverse=True)
    for i in order[1:]:
        if loads[i] + 1.0 <= cap:
            return i
    return -1


@dataclass(frozen=True, slots=True)
class PrefixParams:
    mode: str = "index"
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    block_bytes: int = 0  # legacy `blockSize` in characters; 0 = from block_tokens
    auto_tune: bool = True
    max_blocks: int = DEFAULT_MAX_BLOCKS
    lru_capacity: int = DEFAULT_LRU_CAPACITY
    max_entries: int = DEFAULT_MAX_ENTRIES
    purge_after: float = DEFAULT_PURGE_AFTER
    rendezvous_blocks: int = DEFAULT_RENDEZVOUS_BLOCKS
    rendezvous_epsilon: float = DEFAULT_RENDEZVOUS_EPSILON
    load_guard: bool = True
    producer: str = ""  # prefixMatchInfoProducerName: the producer whose index and blocks this scorer uses
    match_length_weight: float = 0.0  # share of the score from the matched length (reference formula)
    match_length_scale_tokens: int = DEFAULT_MATCH_SCALE_TOKENS


# prefix-cache-scorer parameters that describe the index (given on the producer when one is named)
INDEX_KEYS = ("mode", "blockSize", "blockSizeTokens", "autoTune", "maxPrefixBlocksToMatch",
              "maxPrefixTokensToMatch", "lruCapacityPerServer", "maxIndexEntries", "purgeAfter",
              "rendezvousBlocks", "rendezvousEpsilon")
# producers whose match info a prefix-cache-scorer can read: the approximate one (its index), or
# any producer answering ratios(request, endpoints) and on_routed(request, endpoint) (precise, burst)
PREFIX_PRODUCER_TYPES = ("approx-prefix-cache-producer", "precise-prefix-cache-producer", "burst-prefix-cache-producer")
DEFAULT_PRODUCER = "approx-prefix-cache-producer"


def parse_index_params(p: Params, *, scorer: bool) -> PrefixParams:
    """The index parameters shared by prefix-cache-scorer and approx-prefix-cache-producer.

    `maxPrefixTokensToMatch` (the producer's cap in tokens) wins over `maxPrefixBlocksToMatch` when
    > 0; either is bounded by MAX_BLOCKS. `mode: rendezvous` is the scorer's only (stateless)."""
    legacy = p.integer("blockSize", 0, lo=1) if p.has("blockSize") else 0
    p.get("blockSize")
    block_tokens = p.integer("blockSizeTokens", DEFAULT_BLOCK_TOKENS, lo=1, hi=4096)
    max_blocks = p.integer("maxPrefixBlocksToMatch", DEFAULT_MAX_BLOCKS, lo=0 if not scorer else 1)
    max_tokens = p.integer("maxPrefixTokensToMatch", 0, lo=0)
    if max_tokens > 0:
        max_blocks = max(1, max_tokens // (legacy // CHARS_PER_TOKEN if legacy else block_tokens))
    if max_blocks == 0:  # the reference's "both caps 0": the whole prompt, here up to the bound
        max_blocks = MAX_BLOCKS
    out = PrefixParams(
        mode=p.string("mode", "index", choices=("index", "rendezvous")) if scorer else "index",
        block_tokens=block_tokens,
        block_bytes=legacy,
        auto_tune=p.boolean("autoTune", True),
        max_blocks=min(max_blocks, MAX_BLOCKS),
        lru_capacity=p.integer("lruCapacityPerServer", DEFAULT_LRU_CAPACITY, lo=1),
        max_entries=p.integer("maxIndexEntries", DEFAULT_MAX_ENTRIES, lo=1),
        purge_after=p.duration("purgeAfter", DEFAULT_PURGE_AFTER),
        rendezvous_blocks=p.integer("rendezvousBlocks", DEFAULT_RENDEZVOUS_BLOCKS, lo=1, hi=4096)
        if scorer else DEFAULT_RENDEZVOUS_BLOCKS,
        rendezvous_epsilon=p.number("rendezvousEpsilon", DEFAULT_RENDEZVOUS_EPSILON, lo=0, lo_open=True)
        if scorer else DEFAULT_RENDEZVOUS_EPSILON,
    )
    if legacy and p.has("blockSizeTokens"):
        raise ConfigError(p.field("blockSize"), "give either blockSize (characters) or blockSizeTokens")
    return out


@register("prefix-cache-scorer", SCORER)
class PrefixCacheScorer:
    """Score = share of the prompt's leading blocks likely cached on the endpoint (see module doc)."""

    BOUNDED = True  # scores are constants or ratios in 0..1 by construction

    def __init__(self, name: str, params: PrefixParams, ctx: BuildContext) -> None:
        self.name = name
        producer = ctx.plugins.get(params.producer or DEFAULT_PRODUCER)
        # a producer of match info that is not an approximate index (precise, burst): scores come from it
        self.match_source: Any = None
        if producer is not None and not hasattr(producer, "index") and hasattr(producer, "ratios"):
            self.match_source = producer
        if producer is not None and hasattr(producer, "index"):
            # the producer owns the index: this scorer matches and records into it
            params = dataclasses.replace(producer.params, producer=producer.name,
                                         match_length_weight=params.match_length_weight,
                                         match_length_scale_tokens=params.match_length_scale_tokens,
                                         load_guard=params.load_guard)
            self.index: PrefixIndex = producer.index
        else:
            self.index = PrefixIndex(params.max_entries, params.purge_after)
        self.p = params
        self.guard: LoadGuard | None = ctx.guard if params.load_guard and ctx.guard.enabled else None
        self._key = f"prefix:{name}"
        self._scores_key = f"prefix-scores:{name}"
        # Totals for telemetry: requests routed with a prompt, their blocks, blocks the chosen
        # endpoint already held (rendezvous: all blocks when sent to the prefix's home).
        self.routed_requests = 0
        self.routed_blocks = 0
        self.hit_blocks = 0

    @classmethod
    def parse(cls, p: Params) -> PrefixParams:
        producer = p.string("prefixMatchInfoProducerName", "")
        weight = p.number("matchLengthWeight", 0.0, lo=0, hi=1)
        scale = p.integer("matchLengthScaleTokens", DEFAULT_MATCH_SCALE_TOKENS, lo=1)
        guard = p.boolean("loadGuard", True)
        if producer:
            own = [k for k in p.raw if k in INDEX_KEYS]
            if own:
                raise ConfigError(p.field(own[0]), f"the index is producer \"{producer}\"'s: give its "
                                  "parameters on that producer")
            for k in INDEX_KEYS:
                p.get(k)
            p.done()
            return PrefixParams(producer=producer, match_length_weight=weight, match_length_scale_tokens=scale,
                                load_guard=guard)
        out = parse_index_params(p, scorer=True)
        p.done()
        return dataclasses.replace(out, match_length_weight=weight, match_length_scale_tokens=scale,
                                   load_guard=guard)

    @staticmethod
    def refs(params: PrefixParams) -> list[tuple[str, str, tuple[str, ...]]]:
        """Plugins this one names: (parameter, plugin name, acceptable types)."""
        if params.producer:
            return [("prefixMatchInfoProducerName", params.producer, PREFIX_PRODUCER_TYPES)]
        return []

    # ---- hashing -------------------------------------------------------------------------
    def block_bytes_for(self, endpoints: Sequence[Endpoint]) -> int:
        """Block size in bytes: configured, or the first pod's reported KV block size × 4 when auto-tuned."""
        p = self.p
        if p.block_bytes:
            return p.block_bytes
        if p.auto_tune:
            for ep in endpoints:
                m = ep.metrics
                if m is not None and m.block_size > 0:
                    return max(m.block_size, MIN_AUTO_BLOCK_TOKENS) * CHARS_PER_TOKEN
        return p.block_tokens * CHARS_PER_TOKEN

    def blocks(self, request: SchedulingRequest, endpoints: Sequence[Endpoint]) -> PromptBlocks:
        """The request's prompt blocks, made once and kept in request.scratch."""
        got = request.scratch.get(self._key)
        if got is None:
            got = PromptBlocks(request.prompt, request.model, self.block_bytes_for(endpoints), self.p.max_blocks)
            request.scratch[self._key] = got
        return got  # type: ignore[no-any-return]

    # ---- plugin hooks --------------------------------------------------------------------
    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        if self.match_source is not None:
            got = self.match_source.ratios(cycle.request, endpoints)
            out = [0.0] * len(endpoints) if got is None else [min(1.0, max(0.0, x)) for x in got]
            cycle.request.scratch[self._scores_key] = (endpoints, out)
            return out if self.guard is None else self.guard.apply(cycle, endpoints, out)
        blocks = self.blocks(cycle.request, endpoints)
        n = len(endpoints)
        if not blocks.count:
            return [0.0] * n
        if self.p.mode == "rendezvous":
            out = [0.0] * n
            k = min(self.p.rendezvous_blocks, blocks.count)
            key = blocks.upto(k)[k - 1]
            fresh = cycle.fresh(endpoints)
            loads = [ep.inflight if m is None else max(m.waiting + m.running, ep.inflight)
                     for ep, m in zip(endpoints, fresh, strict=True)]
            home = rendezvous_home(key, endpoints, loads, self.p.rendezvous_epsilon)
            if home >= 0:
                out[home] = 1.0
        elif self.p.match_length_weight > 0.0:
            out = self._with_length(blocks, self.index.match(blocks, endpoints))
        else:
            out = self.index.match(blocks, endpoints, 1.0 / blocks.count)
        cycle.request.scratch[self._scores_key] = (endpoints, out)  # before the guard: for hit stats
        if self.guard is not None:
            out = self.guard.apply(cycle, endpoints, out)
        return out

    def _with_length(self, blocks: PromptBlocks, matched: list[float]) -> list[float]:
        """The reference's w × min(1, matched tokens / scale)² + (1 − w) × matched / total blocks."""
        w = self.p.match_length_weight
        tokens_per_block = blocks._size / CHARS_PER_TOKEN
        scale = float(self.p.match_length_scale_tokens)
        total = float(blocks.count)
        return [w * min(1.0, b * tokens_per_block / scale) ** 2 + (1.0 - w) * (b / total) for b in matched]

    def ratios(self, request: SchedulingRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        """Share of the prompt's leading blocks each endpoint holds (index mode; 0s otherwise)."""
        blocks = self.blocks(request, endpoints)
        if not blocks.count or self.p.mode != "index":
            return [0.0] * len(endpoints)
        return self.index.match(blocks, endpoints, 1.0 / blocks.count)

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        if self.match_source is not None:
            hook = getattr(self.match_source, "on_routed", None)
            if hook is not None:
                hook(request, endpoint)
            return
        blocks = self.blocks(request, (endpoint,))
        if not blocks.count:
            return
        self.routed_requests += 1
        self.routed_blocks += blocks.count
        seen = request.scratch.get(self._scores_key)
        if seen is not None:
            eps, ratios = seen
            for i, e in enumerate(eps):
                if e is endpoint:
                    hit = round(ratios[i] * blocks.count)
                    self.hit_blocks += hit
                    # per-request figures for the picker's own metrics (telemetry reads them)
                    request.scratch[PREFIX_HIT_RATIO] = ratios[i]
                    request.scratch[PREFIX_HIT_BYTES] = hit * blocks._size
                    break
        if self.p.mode == "index":
            self.index.insert(endpoint.address, blocks, self.capacity_for(endpoint))

    def peer_note(self, request: SchedulingRequest, endpoint: Endpoint) -> Any:
        """For active-active peers (epp.peers): the block hashes this replica just indexed (a match
        source's own note when it has one)."""
        if self.match_source is not None:
            hook = getattr(self.match_source, "peer_note", None)
            return hook(request, endpoint) if hook is not None else None
        if self.p.mode != "index":
            return None  # rendezvous is stateless: every replica computes the same homes
        blocks = self.blocks(request, (endpoint,))
        return blocks.all() if blocks.count else None

    def peer_apply(self, endpoint: Endpoint, note: Any) -> None:
        """A peer routed a prompt with these block hashes to `endpoint`: index them as if this replica had."""
        if self.match_source is not None:
            hook = getattr(self.match_source, "peer_apply", None)
            if hook is not None:
                hook(endpoint, note)
            return
        if self.p.mode == "index" and isinstance(note, list) and note:
            self.index.insert(endpoint.address, [int(h) for h in note[:self.p.max_blocks]],
                              self.capacity_for(endpoint))

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        # a match source that holds state per request in flight (precise speculation) hears the end too
        if self.match_source is not None:
            hook = getattr(self.match_source, "on_finished", None)
            if hook is not None:
                hook(request, endpoint)

    def stats(self) -> dict[str, float]:
        """Index size and hit ratio since start, for the EPP's own metrics."""
        return {
            "prefix_index_entries": float(self.index.entries),
            "prefix_routed_requests": float(self.routed_requests),
            "prefix_hit_ratio": self.hit_blocks / self.routed_blocks if self.routed_blocks else 0.0,
        }

    def capacity_for(self, endpoint: Endpoint) -> int:
        m = endpoint.metrics
        if self.p.auto_tune and m is not None and m.num_blocks > 0:
            return m.num_blocks
        return self.p.lru_capacity

    def forget(self, address: str) -> None:
        self.index.forget(address)

    def sweep(self, present: Iterable[str], now: float) -> None:
        self.index.sweep(present, now)


@dataclass(frozen=True, slots=True)
class AffinityParams:
    threshold: float = 0.80
    exploration: float = 0.0
    max_ttft_penalty_ms: float = 18000.0
    peak_prefill_throughput: float = 15928.0
    scorer: str = ""  # the prefix-cache-scorer whose index to read ("" = the first one declared)


@register("prefix-cache-affinity-filter", FILTER)
class PrefixCacheAffinityFilter:
    """Keeps the "sticky" endpoints, whose share of the prompt's cached prefix is at least
    `affinityThreshold`; keeps all when none is. With probability `explorationProbability` the gate
    is skipped. TTFT load gate: when the best sticky endpoint's estimated TTFT (in-flight prompt
    tokens / `peakPrefillThroughput`) exceeds the best other's by more than `maxTTFTPenaltyMs`
    (0 = never), stickiness is broken and all are kept. Reads the index of a prefix-cache-scorer
    (`prefixScorerName`, default the first declared) or of the approx-prefix-cache-producer."""

    def __init__(self, name: str, params: AffinityParams, ctx: BuildContext) -> None:
        self.name = name
        self.p = params
        self.rng: random.Random = ctx.rng
        # the source may be declared after this filter: looked up again once, on first use (the
        # whole config is built by then), then never (a profile without one costs nothing per request)
        self._plugins: Mapping[str, object] | None = ctx.plugins
        self.source: PrefixCacheScorer | None = self._find()

    def _find(self) -> PrefixCacheScorer | None:
        for pname, plugin in (self._plugins or {}).items():
            if isinstance(plugin, PrefixCacheScorer) and (not self.p.scorer or pname == self.p.scorer):
                self.source = plugin
                return plugin
        return None

    @classmethod
    def parse(cls, p: Params) -> AffinityParams:
        source = p.string("ttftSource", "prefillThroughput", choices=("prefillThroughput", "latencyPredictor"))
        if source == "latencyPredictor":
            raise ConfigError(p.field("ttftSource"), "latencyPredictor is not yet supported "
                              "(latency prediction and SLO routing); use prefillThroughput")
        out = AffinityParams(
            threshold=p.number("affinityThreshold", 0.80, lo=0, hi=1),
            exploration=p.number("explorationProbability", 0.0, lo=0, hi=1),
            max_ttft_penalty_ms=p.number("maxTTFTPenaltyMs", 18000.0, lo=0),
            peak_prefill_throughput=p.number("peakPrefillThroughput", 15928.0, lo=0, lo_open=True),
            scorer=p.string("prefixScorerName", ""),
        )
        p.done()
        return out

    @staticmethod
    def refs(params: AffinityParams) -> list[tuple[str, str, tuple[str, ...]]]:
        if params.scorer:
            return [("prefixScorerName", params.scorer, ("prefix-cache-scorer",))]
        return []

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        source = self.source
        if source is None and self._plugins is not None:
            source = self._find()
            self._plugins = None
        if source is None or len(endpoints) < 2:
            return endpoints
        if self.p.exploration > 0.0 and self.rng.random() < self.p.exploration:
            return endpoints
        ratios = source.ratios(cycle.request, endpoints)
        t = self.p.threshold
        sticky = [ep for ep, r in zip(endpoints, ratios, strict=True) if r > 0.0 and r >= t]
        if not sticky or len(sticky) == len(endpoints):
            return endpoints
        penalty = self.p.max_ttft_penalty_ms
        if penalty > 0.0:
            per_ms = 1000.0 / self.p.peak_prefill_throughput
            sticky_set = {id(ep) for ep in sticky}
            best_sticky = min(ep.inflight_tokens for ep in sticky) * per_ms
            best_other = min(ep.inflight_tokens for ep in endpoints if id(ep) not in sticky_set) * per_ms
            if best_sticky - best_other > penalty:
                return endpoints
        return sticky
