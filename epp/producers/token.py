"""`token-producer`: a prompt's tokens. Backends as llm-d configures them:

- `estimate` (no backend given): about 4 bytes of UTF-8 a token, no ids (the `estimate` section,
  image/video placeholder estimation, is accepted and kept for when multimodal counting lands);
- `vllm` / `modelName`: the engine's tokens. The ids come from the model's own tokenizer files
  when the picker has them (`vllm.tokenizerPath`, ours: a mounted directory; else `modelName` in
  the HF cache — never downloaded), rendered with the model's chat template (epp.tokens.local).
  Without the files, the engine's `/render` endpoints (`vllm.url`, `vllm.timeout`) give them
  (epp.tokens.render_cache): a request for which nothing is rendered yet (a conversation's first
  turn) awaits its render before it is scheduled (`prepare`, the Director's pre-scheduling step),
  for at most `vllm.timeout`; after a timeout or failure it is scheduled on the estimate (counted in
  `fallbacks`, logged once). A later turn uses the ids rendered for the earlier turn as its prefix
  at once (its own render runs in the background, for the turn after);
- `udsTokenizerConfig` (llm-d's deprecated sidecar): refused, use `vllm`.

A precise-prefix-cache-producer without a tokenizer of its own reads ids from here (`ids_for`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.registry import PRODUCER, BuildContext, ConfigError, Params, register
from epp.tokens import TOKEN_IDS, messages_of

log = logging.getLogger("epp.producers.token")

BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class TokenParams:
    estimate: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "estimate"  # estimate | vllm
    model_name: str = ""
    url: str = "http://localhost:8000"
    timeout: float = 5.0
    tokenizer_path: str = ""


def estimate_tokens(text: str) -> int:
    """Estimated tokens of `text`: its UTF-8 length / 4, rounded up (0 for "")."""
    if not text:
        return 0
    n = len(text.encode("utf-8", "surrogatepass")) if not text.isascii() else len(text)
    return -(-n // BYTES_PER_TOKEN)


@register("token-producer", PRODUCER)
class TokenProducer:
    """Token estimates for prompts (`estimate(text)`) and, with the `vllm` backend, ids (`ids_for`)."""

    def __init__(self, name: str, params: TokenParams, ctx: BuildContext) -> None:
        self.name = name
        self.params = params
        self.fallbacks = 0  # requests that got no ids (the estimate instead)
        self.tokenizer: Any = None
        self.render: Any = None
        self.rendered: Any = None  # RenderCache: engine renders, when no tokenizer files
        self.render_waits = 0  # requests that awaited a render before scheduling
        self.render_timeouts = 0  # ... and were scheduled without it (timeout, failure)
        if params.backend == "vllm":
            from epp.tokens.local import LocalTokenizer, TokenizerError
            from epp.tokens.render import RenderClient
            from epp.tokens.render_cache import RenderCache

            self.render = RenderClient(params.url, params.model_name, params.timeout)
            try:
                self.tokenizer = LocalTokenizer(params.tokenizer_path or params.model_name)
            except TokenizerError as e:
                if params.tokenizer_path:  # named explicitly: a config error
                    raise ConfigError("vllm.tokenizerPath", str(e)) from None
                self.rendered = RenderCache(self.render)
                log.warning("token-producer %s: %s; the engine renders the prompts (a request with nothing "
                            "rendered yet waits for it, at most %.3gs)", name, e, params.timeout)

    @classmethod
    def parse(cls, p: Params) -> TokenParams:
        if p.has("udsTokenizerConfig"):
            raise ConfigError(p.field("udsTokenizerConfig"), "the deprecated tokenizer sidecar is not supported; "
                              "configure `vllm` (with `modelName`)")
        p.get("udsTokenizerConfig")
        raw = p.get("estimate")
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(p.field("estimate"), f"expected a mapping, got {type(raw).__name__}")
        model = p.string("modelName", "")
        out = TokenParams(estimate=dict(raw or {}), model_name=model)
        if p.has("vllm") or model:
            v = p.sub("vllm")
            out = TokenParams(estimate=out.estimate, backend="vllm", model_name=model,
                              url=v.string("url", "http://localhost:8000").rstrip("/"),
                              timeout=v.duration("timeout", 5.0), tokenizer_path=v.string("tokenizerPath", ""))
            v.duration("mmTimeout", 30.0)
            v.done()
            if not model and not out.tokenizer_path:
                raise ConfigError(p.field("modelName"), "the vllm backend needs modelName")
        p.done()
        return out

    @property
    def renders(self) -> bool:
        """Whether ids come from the engine's render endpoints (requests may await them)."""
        return self.tokenizer is None and self.rendered is not None

    def needs_prepare(self, request: SchedulingRequest) -> bool:
        """Whether `request` must await the engine's render: no ids yet, and none rendered for it
        or for an earlier turn of its conversation."""
        if not self.renders or TOKEN_IDS in request.scratch or not isinstance(request.body, Mapping):
            return False
        return not self.rendered.known(self.params.model_name or request.model, request.body,
                                       messages_of(request.body))

    async def prepare(self, request: SchedulingRequest) -> None:
        """Await the engine's render of `request` (at most `vllm.timeout`) and set its ids in
        `request.scratch`. Not in time or failed: the ids are set empty (the scheduler uses the
        estimate and does not ask the engine again for this request), counted and logged once."""
        body = request.body
        if not self.renders or not isinstance(body, Mapping):
            return
        self.render_waits += 1
        ids = await self.rendered.render(self.params.model_name or request.model, body, messages_of(body),
                                         self.params.timeout)
        if ids is None:
            self.fallbacks += 1
            self.render_timeouts += 1
            if self.render_timeouts == 1:
                log.warning("token-producer %s: the engine's render did not answer within %.3gs; scheduling on "
                            "the estimate (counted, logged once)", self.name, self.params.timeout)
            ids = []
        request.scratch[TOKEN_IDS] = ids

    def estimate(self, text: str) -> int:
        return estimate_tokens(text)

    def ids_for_request(self, model: str, body: Mapping[str, Any] | None, prompt: str,
                        messages: Sequence[Mapping[str, Any]] | None) -> tuple[list[int] | None, bool]:
        """(ids, whole): the prompt's ids from the tokenizer files (whole), or the ids of the longest
        earlier request this one begins with, rendered by the engine in the background (a prefix)."""
        if self.tokenizer is None and self.rendered is not None and isinstance(body, Mapping):
            ids = self.rendered.lookup(self.params.model_name or model, body, messages)
            if ids is None:
                self.fallbacks += 1
            return ids, False
        return self.ids_for(prompt, messages), True

    def ids_for(self, prompt: str, messages: Sequence[Mapping[str, Any]] | None) -> list[int] | None:
        """The prompt's token ids (chat messages through the model's template), or None: estimate."""
        if self.tokenizer is None:
            if self.params.backend == "vllm":
                self.fallbacks += 1
            return None
        try:
            return self.tokenizer.ids_for(prompt, messages)  # type: ignore[no-any-return]
        except ValueError as e:
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("token-producer %s: %s; falling back to estimates (counted, logged once)", self.name, e)
            return None
