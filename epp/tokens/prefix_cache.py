"""Ids of prompt prefixes, kept so a growing conversation is not tokenized again from zero.

A text is cut into segments at newlines, each at least `segment_chars` long (the last one may be
shorter); a segment's ids are those of that segment tokenized alone, and the cache is keyed by the
hash of the whole text up to the segment's end, so reuse never depends on anything but the prefix.
Tokenizing by segments can differ from tokenizing the whole text only where a token would span a
newline at a cut, which BPE pre-tokenizers (split on newlines) do not produce. The cache holds at
most `max_ids` ids (least recently used segments go first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import xxhash

DEFAULT_SEGMENT_CHARS = 2048
DEFAULT_MAX_IDS = 4_000_000  # ~ 32 MB of ids in Python lists (8 bytes a slot + shared small ints)


class PrefixTokenCache:
    """Wraps `tokenize(text) -> ids` (see the module doc)."""

    def __init__(self, tokenize: Callable[[str], list[int]], segment_chars: int = DEFAULT_SEGMENT_CHARS,
                 max_ids: int = DEFAULT_MAX_IDS) -> None:
        self._tokenize = tokenize
        self.segment_chars = max(1, segment_chars)
        self.max_ids = max(0, max_ids)
        self._cache: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._ids = 0
        self.hits = 0  # segments reused
        self.misses = 0  # segments tokenized

    def segments(self, text: str) -> list[str]:
        """The text cut at newlines, each piece at least segment_chars long."""
        out = []
        start, n, step = 0, len(text), self.segment_chars
        while start < n:
            cut = text.find("\n", start + step - 1) if start + step < n else -1
            if cut < 0:
                out.append(text[start:])
                break
            out.append(text[start:cut + 1])
            start = cut + 1
        return out

    def ids(self, text: str) -> list[int]:
        if self.max_ids == 0:
            return self._tokenize(text)
        h = xxhash.xxh64()
        out: list[int] = []
        cache = self._cache
        for seg in self.segments(text):
            h.update(seg.encode("utf-8", "surrogatepass"))
            key = h.intdigest()
            got = cache.get(key)
            if got is not None:
                cache.move_to_end(key)
                self.hits += 1
            else:
                got = tuple(self._tokenize(seg))
                self.misses += 1
                cache[key] = got
                self._ids += len(got)
                while self._ids > self.max_ids and cache:
                    _, old = cache.popitem(last=False)
                    self._ids -= len(old)
            out.extend(got)
        return out

    @property
    def size(self) -> int:
        """Ids held."""
        return self._ids
