"""The engine's own tokenizer over HTTP: vLLM's `POST /v1/completions/render` (answer: a list of
`{token_ids}`, one per prompt) and `POST /v1/chat/completions/render` (answer `{token_ids}`), as
llm-d's token-producer calls them, with the request body and `model` set.

A render that fails (timeout, refused, non-200, bad JSON) returns None — the caller falls back to
its estimate — and is counted in `fallbacks`; the first failure is logged, later ones only counted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

log = logging.getLogger("epp.tokens")

DEFAULT_TIMEOUT = 0.5  # s; the engine renders without inference
MAX_RESPONSE_BYTES = 32 << 20


def _ids(v: Any) -> list[int] | None:
    if isinstance(v, Mapping):
        v = v.get("token_ids")
    if isinstance(v, list) and all(type(t) is int and t >= 0 for t in v):
        return v
    return None


class RenderClient:
    """Token ids from an engine's render endpoints at `url` (e.g. http://vllm:8000)."""

    def __init__(self, url: str, model: str = "", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.fallbacks = 0
        self.renders = 0
        self._logged = False
        self._session: aiohttp.ClientSession | None = None

    async def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.post(self.url + path, json=body) as r:
            if r.status != 200:
                raise ValueError(f"{path} answered {r.status}")
            raw = await r.content.read(MAX_RESPONSE_BYTES + 1)
            if len(raw) > MAX_RESPONSE_BYTES:
                raise ValueError(f"{path} answer is too large")
            return json.loads(raw)

    async def ids(self, body: Mapping[str, Any], chat: bool) -> list[int] | None:
        """The prompt's ids (the first prompt's for a batched completion), or None after a failure."""
        req = dict(body)
        if self.model:
            req["model"] = self.model
        req.pop("stream", None)
        try:
            if chat:
                got = _ids(await self._post("/v1/chat/completions/render", req))
            else:
                ans = await self._post("/v1/completions/render", req)
                got = _ids(ans[0]) if isinstance(ans, list) and ans else _ids(ans)
            if got is None:
                raise ValueError("answer has no token_ids")
        except (TimeoutError, aiohttp.ClientError, ValueError, OSError) as e:
            self.fallbacks += 1
            if not self._logged:
                self._logged = True
                log.warning("render at %s failed (%s); falling back to token estimates (counted, logged once)",
                            self.url, e)
            return None
        self.renders += 1
        return got

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
