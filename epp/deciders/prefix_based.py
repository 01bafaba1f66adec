"""`prefix-based-pd-decider`: disaggregate only when the uncached part of the prompt is long enough.

Parameters as the reference: `nonCachedTokens` (default 0 = the decider is off and says no to
every request) and `promptTokens` (default 0 = no gate): a request is sent through a prefill pod
when its prompt has at least `promptTokens` and at least `nonCachedTokens` tokens, and the tokens not
already cached on the chosen decode pod are at least `nonCachedTokens`.

The cached part is read from the config's prefix matching, found when the scheduler is built: the
first `prefix-cache-scorer` (whose index is an `approx-prefix-cache-producer`'s or its own, or whose
match source is a `precise-prefix-cache-producer`), else the first such producer. Prompt tokens are
the real ids when a tokenizer produced them (precise mode), else the ~4-bytes-a-token estimate over
the prompt text the parser kept (64 KiB: prompts beyond ~16k tokens count as 16k). With no prefix
matching configured the decider says no, as the reference does without prefix match info.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from epp.datastore import Endpoint
from epp.producers.token import estimate_tokens
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.registry import DECIDER, BuildContext, Params, register

log = logging.getLogger("epp.deciders.prefix_based")

TOKEN_IDS = "token_ids"  # epp.tokens.TOKEN_IDS (not imported: that package pulls tokenizer code)
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class PrefixDeciderParams:
    non_cached_tokens: int = 0
    prompt_tokens: int = 0


class _Source:
    """Cached tokens of a request's prompt on one endpoint. `kind`: "scorer" (a prefix-cache-scorer
    over an approximate index), "ratios" (anything answering ratios(request, endpoints): a precise
    producer, or a scorer's precise match source), "index" (an approximate producer's index)."""

    def __init__(self, kind: str, plugin: Any) -> None:
        self.kind = kind
        self.plugin = plugin

    def cached_tokens(self, request: SchedulingRequest, endpoint: Endpoint, prompt_tokens: int) -> float:
        p = self.plugin
        if self.kind == "ratios":
            got = p.ratios(request, [endpoint])
            return float(got[0]) * prompt_tokens if got else 0.0
        if self.kind == "scorer":
            blocks = p.blocks(request, [endpoint])
            if not blocks.count:
                return 0.0
            ratio = p.ratios(request, [endpoint])[0]
            return round(ratio * blocks.count) * p.block_bytes_for([endpoint]) / CHARS_PER_TOKEN
        return _producer_match(p, request, endpoint)


def _producer_match(producer: Any, request: SchedulingRequest, endpoint: Endpoint) -> float:
    """Tokens of the prompt's leading blocks an approximate producer's index holds for `endpoint`."""
    from epp.scheduling.prefix import PromptBlocks

    params = producer.params
    block_bytes = params.block_bytes or params.block_tokens * CHARS_PER_TOKEN
    blocks = PromptBlocks(request.prompt, request.model, block_bytes, params.max_blocks)
    if not blocks.count:
        return 0.0
    matched = producer.index.match(blocks, [endpoint])
    return float(matched[0]) * block_bytes / CHARS_PER_TOKEN


def find_source(plugins: dict[str, Any]) -> _Source | None:
    """The prefix matching a decider reads: the first prefix-cache-scorer, else the first producer of
    prefix match info (approximate index or precise `ratios`)."""
    from epp.scheduling.prefix import PrefixCacheScorer

    for plugin in plugins.values():
        if isinstance(plugin, PrefixCacheScorer):
            if plugin.match_source is not None:
                return _Source("ratios", plugin.match_source)
            if plugin.p.mode == "index":
                return _Source("scorer", plugin)
    for plugin in plugins.values():
        if hasattr(plugin, "ratios") and hasattr(plugin, "keys"):  # precise-prefix-cache-producer
            return _Source("ratios", plugin)
        if hasattr(plugin, "index") and hasattr(getattr(plugin, "params", None), "block_bytes"):
            return _Source("index", plugin)  # approx-prefix-cache-producer
    return None


def prompt_tokens(request: SchedulingRequest) -> int:
    """The request's prompt length in tokens: real ids when present, else the estimate."""
    ids = request.scratch.get(TOKEN_IDS)
    if isinstance(ids, Sequence):
        return len(ids)
    return estimate_tokens(request.prompt)


@register("prefix-based-pd-decider", DECIDER)
class PrefixBasedPDDecider:
    """Yes when prompt ≥ promptTokens, prompt ≥ nonCachedTokens and uncached ≥ nonCachedTokens."""

    def __init__(self, name: str, params: PrefixDeciderParams, ctx: BuildContext) -> None:
        self.name = name
        self.p = params
        self.source = find_source(ctx.plugins)
        if self.source is None and params.non_cached_tokens > 0:
            log.warning("prefix-based-pd-decider %s: no prefix matching is configured "
                        "(prefix-cache-scorer or approx-prefix-cache-producer): it never disaggregates", name)
        # decisions since start, for tests and logs
        self.yes = 0
        self.no = 0

    @classmethod
    def parse(cls, p: Params) -> PrefixDeciderParams:
        out = PrefixDeciderParams(non_cached_tokens=p.integer("nonCachedTokens", 0, lo=0),
                                  prompt_tokens=p.integer("promptTokens", 0, lo=0))
        p.done()
        return out

    def disaggregate(self, request: SchedulingRequest, endpoint: Endpoint | None) -> bool:
        decided = self._decide(request, endpoint)
        if decided:
            self.yes += 1
        else:
            self.no += 1
        return decided

    def _decide(self, request: SchedulingRequest, endpoint: Endpoint | None) -> bool:
        threshold = self.p.non_cached_tokens
        if threshold == 0 or endpoint is None or self.source is None:
            return False
        n = prompt_tokens(request)
        if (self.p.prompt_tokens > 0 and n < self.p.prompt_tokens) or n < threshold:
            return False
        cached = self.source.cached_tokens(request, endpoint, n)
        return n - cached >= threshold
