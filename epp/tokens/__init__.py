"""Token ids for requests, the way the engines will see them (precise prefix-cache routing needs
the engine's own tokens, not a ~4-characters-a-token estimate).

Backends: `render` (the engine's `/v1/completions/render` and `/v1/chat/completions/render`, as
llm-d calls them; async, with a timeout and a counted, logged-once fallback), `local` (HF
`tokenizers` with the model's `tokenizer.json`, chat template rendered by a sandboxed jinja2, from a
mounted directory or the HF cache — never downloaded), `sim` (the simulator's deterministic
tokenizer, for tests and the discrete-event benchmarks). `prefix_cache` keeps the ids of prompt
prefixes so a growing conversation is not re-tokenized from zero.

A request's ids, once known, live in `request.scratch[TOKEN_IDS]`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

TOKEN_IDS = "token_ids"  # SchedulingRequest.scratch key: list[int]
CACHE_SALT = "cache_salt"  # scratch key: the request's cache_salt, when it has one


class Tokenizer(Protocol):
    """Ids of a request's prompt: a chat request's templated messages, else its prompt text."""

    def ids_for(self, prompt: str, messages: Sequence[Mapping[str, Any]] | None) -> list[int] | None: ...


def messages_of(body: Mapping[str, Any] | None) -> list[Mapping[str, Any]] | None:
    """The chat `messages` of a request body, or None (completions, or anything else)."""
    if not isinstance(body, Mapping):
        return None
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, Mapping) for m in msgs):
        return msgs
    return None


def salt_of(body: Mapping[str, Any] | None) -> str | None:
    """vLLM's `cache_salt` request field (it isolates a tenant's prefix cache)."""
    if isinstance(body, Mapping):
        s = body.get("cache_salt")
        if isinstance(s, str) and s:
            return s
    return None


def text_of(messages: Sequence[Mapping[str, Any]]) -> str:
    """A stable text of chat messages (the cache key where no template applies)."""
    return json.dumps(list(messages), sort_keys=True, ensure_ascii=False, default=str)
