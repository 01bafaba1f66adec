"""The picker's own KV block keys, computed from token ids (never the engine's hashes).

Key of block j = xxhash64(the block's token ids as little-endian uint32 bytes [+ its extra keys],
seeded with key j−1); block 0 is seeded by xxhash64(hash seed, NUL, model), where the model is the
LoRA adapter's name when there is one: an adapter's KV differs from the base model's. So one key
names a whole prefix of one model, and the engine's block size, hash algorithm and seed need not
match ours. Extra keys (vLLM puts the request's `cache_salt` in block 0's; multimodal hashes in the
blocks they cover) are mixed into the block they belong to.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import Any

import xxhash

DEFAULT_BLOCK_TOKENS = 16
_xxh64 = xxhash.xxh64_intdigest
_BIG_ENDIAN = sys.byteorder == "big"


def model_seed(model: str, hash_seed: str = "") -> int:
    """Block 0's seed for `model` (an adapter's name for LoRA requests)."""
    return _xxh64(f"{hash_seed}\0{model}".encode("utf-8", "surrogatepass"))


def pack(token_ids: Sequence[int] | array[int]) -> bytes:
    """Token ids as little-endian uint32 bytes (ValueError for ids outside 0..2^32−1)."""
    try:
        a = token_ids if isinstance(token_ids, array) and token_ids.typecode == "I" else array("I", token_ids)
    except (TypeError, OverflowError):
        raise ValueError("token ids must be integers in 0..2^32-1") from None
    if _BIG_ENDIAN:
        a = array("I", a)
        a.byteswap()
    return a.tobytes()


def extra_bytes(extra: Any) -> bytes:
    """A block's extra keys as stable bytes (their repr: ints, strings and tuples of them)."""
    return repr(tuple(extra)).encode("utf-8", "surrogatepass")


def chain(seed: int, data: bytes, block_tokens: int, extras: Sequence[Any] | None = None,
          start: int = 0, count: int | None = None) -> list[int]:
    """Keys of the full blocks of `data` (packed ids), from block `start`, chained from `seed`
    (the key of the block before `start`). `extras[j]`, when given and not None, is mixed into block j."""
    size = block_tokens * 4
    full = len(data) // size
    end = full if count is None else min(full, start + count)
    out: list[int] = []
    h = seed
    if not extras:
        for off in range(start * size, end * size, size):
            h = _xxh64(data[off:off + size], h)
            out.append(h)
        return out
    for j in range(start, end):
        h = _xxh64(data[j * size:(j + 1) * size], h)
        e = extras[j] if j < len(extras) else None
        if e:
            h = _xxh64(extra_bytes(e), h)
        out.append(h)
    return out


class RequestKeys:
    """A request's block keys, computed on demand (matching usually stops early; the rest is needed
    only for speculative entries after the pick). `count` = full blocks, capped at `max_blocks`.
    Token ids are packed only for the blocks asked for, so a cold 128 K-token prompt costs little."""

    __slots__ = ("_extras", "_ids", "_keys", "block_tokens", "count", "seed")

    def __init__(self, token_ids: Sequence[int] | array[int], model: str, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 max_blocks: int = 1 << 16, hash_seed: str = "", cache_salt: str | None = None) -> None:
        self.block_tokens = block_tokens
        self._ids = token_ids
        self.count = min(len(token_ids) // block_tokens, max_blocks)
        self.seed = model_seed(model, hash_seed)
        self._extras: list[Any] | None = [(cache_salt,)] if cache_salt else None
        self._keys: list[int] = []

    def upto(self, n: int) -> list[int]:
        """The key list (one list object, grown in place) holding at least min(n, count) keys."""
        ks = self._keys
        have = len(ks)
        if have >= n or have >= self.count:
            return ks
        n = min(n, self.count)
        bt = self.block_tokens
        data = pack(self._ids[have * bt:n * bt])
        extras = self._extras[have:] if self._extras is not None and have < len(self._extras) else None
        ks.extend(chain(ks[-1] if ks else self.seed, data, bt, extras))
        return ks

    def all(self) -> list[int]:
        return self.upto(self.count)
