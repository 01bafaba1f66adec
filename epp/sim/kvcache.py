"""The KV cache: a fixed pool of blocks with reference counts and a prefix cache.

A block holding a full, computed block of prompt tokens is registered under its chained hash. When
no sequence references it any more it stays cached but becomes *free*: it sits in an LRU queue and
is evicted (its hash forgotten) only when a new block is needed. Usage, as vLLM reports it, is the
share of blocks referenced by sequences; cached-but-free blocks count as free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence


class BlockPool:
    """`num_blocks` KV blocks of `block_size` tokens."""

    __slots__ = ("_cached", "_free", "_hash", "_ref", "block_size", "evictions", "num_blocks", "on_clear", "on_evict")

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
        # ref-0 blocks, eviction order first (dict order is the LRU order: cheap and deterministic)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.evictions = 0
        # KV-event hooks (epp.sim.kvevents): a cached hash forgotten, the whole prefix cache reset
        self.on_evict: Callable[[int], None] | None = None
        self.on_clear: Callable[[], None] | None = None

    # ---- queries -------------------------------------------------------------------------
    @property
    def free_count(self) -> int:
        """Blocks not referenced by any sequence (including evictable cached ones)."""
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Referenced blocks / all blocks, 0..1 (vLLM's kv_cache_usage_perc)."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    @property
    def cached_count(self) -> int:
        """Blocks currently registered in the prefix cache (referenced or not)."""
        return len(self._cached)

    def match(self, hashes: Sequence[int], limit: int) -> tuple[list[int], int]:
        """Cached blocks for the longest prefix of `hashes` (at most `limit`), and how many are free.

        Matching stops at the first miss: a block's KV is only valid after all earlier blocks.
        """
        blocks: list[int] = []
        free_hits = 0
        cached = self._cached
        for h in hashes[:limit]:
            b = cached.get(h)
            if b is None:
                break
            blocks.append(b)
            if self._ref[b] == 0:
                free_hits += 1
        return blocks, free_hits

    # ---- mutation ------------------------------------------------------------------------
    def take(self, blocks: Sequence[int]) -> None:
        """Reference cached blocks found by `match` (removing them from the free queue)."""
        ref, free = self._ref, self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks (evicting the least recently freed cached ones); caller checked free_count."""
        if n > len(self._free):
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {len(self._free)} free")
        out = []
        free, ref, hashes = self._free, self._ref, self._hash
        for _ in range(n):
            b, _ = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                hashes[b] = None
                if self._cached.get(h) == b:
                    del self._cached[h]
                    if self.on_evict is not None:
                        self.on_evict(h)
                self.evictions += 1
            ref[b] = 1
            out.append(b)
        return out

    def register(self, block: int, h: int) -> bool:
        """Mark a computed full block as holding the KV for hash `h` (first writer wins); True when
        it was registered (an engine publishes a store event then)."""
        if h not in self._cached and self._hash[block] is None:
            self._cached[h] = block
            self._hash[block] = h
            return True
        return False

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (vLLM's reset_prefix_cache); blocks in use keep their KV but are
        no longer shared. Returns how many hashes were forgotten."""
        n = len(self._cached)
        for b in self._cached.values():
            self._hash[b] = None
        self._cached.clear()
        if self.on_clear is not None:
            self.on_clear()
        return n

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block; unreferenced blocks become free.

        Blocks are released last-first so a sequence's tail is evicted before its shared head.
        Uncached blocks go to the front of the queue: they hold nothing worth keeping.
        """
        ref, free, hashes = self._ref, self._free, self._hash
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
                if hashes[b] is None:
                    free.move_to_end(b, last=False)
