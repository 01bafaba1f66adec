"""Engine-rendered token ids, kept so a conversation is rendered once a turn.

Each request is rendered by a task of its own (at most `max_inflight` at once) and its ids kept
under a chained hash of its messages; a later request whose messages *begin with* a rendered
request's messages (the next turn of a conversation: the earlier messages, then the assistant's
reply and a new user message) reuses those ids as its prefix. Completions reuse ids for an
identical prompt only.

Two ways in: `lookup` (synchronous: what is known now, this request's render started in the
background) and `render` (awaited before scheduling, epp.producers.token's `prepare`: joins the
request's render, in flight or new, for at most a timeout; the render itself goes on after a
timeout and serves the conversation's next turn).

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
        self._pending: dict[int, asyncio.Task[None]] = {}  # key -> its render in flight
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

    def known(self, model: str, body: Mapping[str, Any], messages: Sequence[Any] | None) -> bool:
        """Whether `lookup` would give ids now (this request's, or an earlier turn's); counts nothing."""
        key, chain = self._key(model, body, messages)
        return key in self._cache or any(h in self._cache for h in chain[1:-1])

    async def render(self, model: str, body: Mapping[str, Any], messages: Sequence[Any] | None,
                     wait: float) -> list[int] | None:
        """This request's own ids: cached, or its render (joined when one is in flight) awaited for
        at most `wait` seconds. None: not rendered in time, failed, or too many renders in flight."""
        key, _ = self._key(model, body, messages)
        got = self._cache.get(key)
        if got is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return got
        task = self._start(key, body, bool(messages))
        if task is None:
            self.misses += 1
            return None
        try:
            await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            pass  # the render goes on (bounded by the client's timeout) and serves the next turn
        got = self._cache.get(key)
        if got is None:
            self.misses += 1
        else:
            self.hits += 1
        return got

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

    def _start(self, key: int, body: Mapping[str, Any], chat: bool) -> asyncio.Task[None] | None:
        """The render of `key`: the one in flight, else a new one (None: too many, or no loop)."""
        task = self._pending.get(key)
        if task is not None:
            return task
        if len(self._pending) >= self.max_inflight:
            self.dropped += 1
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.dropped += 1
            return None
        task = loop.create_task(self._render(key, dict(body), chat))
        self._pending[key] = task
        return task

    async def _render(self, key: int, body: dict[str, Any], chat: bool) -> None:
        try:
            ids = await self.client.ids(body, chat)
        finally:
            self._pending.pop(key, None)
        if ids is None:
            return
        self._cache[key] = ids
        self._ids += len(ids)
        while self._cache and (len(self._cache) > self.max_entries or self._ids > self.max_ids):
            _, old = self._cache.popitem(last=False)
            self._ids -= len(old)

    async def drain(self) -> None:
        """Wait for the renders in flight (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending.values()), return_exceptions=True)

    @property
    def size(self) -> int:
        return len(self._cache)
