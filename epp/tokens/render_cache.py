"""Engine-rendered token ids without blocking the request path.

The request path schedules synchronously, so the engine's `/render` cannot be awaited per request.
Instead each chat request is rendered in the background (at most `max_inflight` at once) and its
ids kept under a chained hash of its messages; a later request whose messages *begin with* a
rendered request's messages (the next turn of a conversation: the earlier messages, then the
assistant's reply and a new user message) reuses those ids as its prefix. The first turn of a
conversation gets no ids (the caller falls back to its estimate); from the second on, the leading
blocks are the engine's own tokens. Completions reuse ids for an identical prompt only.

Bounded: at most `max_entries` rendered requests and `max_ids` ids (oldest dropped first).
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import xxhash

from epp.tokens.render import RenderClient

DEFAULT_MAX_ENTRIES = 8192
DEFAULT_MAX_IDS = 8_000_000
DEFAULT_MAX_INFLIGHT = 64


def _chain(model: str, body: Mapping[str, Any], messages: Sequence[Any]) -> list[int]:
    """h[j] = hash of the first j messages (h[0]: the model and the request's tools/template)."""
    head = json.dumps([model, body.get("tools"), body.get("chat_template")], sort_keys=True, default=str)
    h = xxhash.xxh64_intdigest(head.encode("utf-8", "surrogatepass"))
    out = [h]
    for m in messages:
        h = xxhash.xxh64_intdigest(json.dumps(m, sort_keys=True, default=str).encode("utf-8", "surrogatepass"), h)
        out.append(h)
    return out


class RenderCache:
    """Background renders through `client`, looked up by message prefix (see the module doc)."""

    def __init__(self, client: RenderClient, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_ids: int = DEFAULT_MAX_IDS, max_inflight: int = DEFAULT_MAX_INFLIGHT) -> None:
        self.client = client
        self.max_entries = max(1, max_entries)
        self.max_ids = max(1, max_ids)
        self.max_inflight = max(1, max_inflight)
        self._cache: OrderedDict[int, list[int]] = OrderedDict()
        self._ids = 0
        self._pending: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # renders not started: too many in flight, or no running loop

    def _key(self, model: str, body: Mapping[str, Any], messages: Sequence[Any] | None) -> tuple[int, list[int]]:
        if messages:
            chain = _chain(model, body, messages)
            return chain[-1], chain
        prompt = body.get("prompt")
        text = json.dumps([model, prompt], default=str)
        return xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass")), []

    def lookup(self, model: str, body: Mapping[str, Any], messages: Sequence[Any] | None) -> list[int] | None:
        """Ids of the longest rendered request this one begins with (None: none yet); starts this
        request's own render in the background."""
        key, chain = self._key(model, body, messages)
        got = self._cache.get(key)
        if got is None:
            for h in reversed(chain[1:-1]):  # earlier turns: the longest prefix first
                got = self._cache.get(h)
                if got is not None:
                    self._cache.move_to_end(h)
                    break
        else:
            self._cache.move_to_end(key)
        if key not in self._cache:
            self._start(key, body, messages is not None and bool(messages))
        if got is None:
            self.misses += 1
        else:
            self.hits += 1
        return got

    def _start(self, key: int, body: Mapping[str, Any], chat: bool) -> None:
        if key in self._pending:
            return
        if len(self._pending) >= self.max_inflight:
            self.dropped += 1
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.dropped += 1
            return
        self._pending.add(key)
        task = loop.create_task(self._render(key, dict(body), chat))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _render(self, key: int, body: dict[str, Any], chat: bool) -> None:
        try:
            ids = await self.client.ids(body, chat)
        finally:
            self._pending.discard(key)
        if ids is None:
            return
        self._cache[key] = ids
        self._ids += len(ids)
        while self._cache and (len(self._cache) > self.max_entries or self._ids > self.max_ids):
            _, old = self._cache.popitem(last=False)
            self._ids -= len(old)

    async def drain(self) -> None:
        """Wait for the renders in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @property
    def size(self) -> int:
        return len(self._cache)
