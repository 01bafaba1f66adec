"""`approx-prefix-cache-producer`: the approximate prefix index (epp.scheduling.prefix) as a named
producer, so several scorers and filters can share one index and its parameters.

Parameters as the reference: `autoTune`, `blockSizeTokens`, `maxPrefixBlocksToMatch`,
`maxPrefixTokensToMatch` (wins when > 0), `lruCapacityPerServer`, the deprecated `blockSize`
(characters); plus ours: `maxIndexEntries`, `purgeAfter`. The prefix-cache-scorer that reads it
matches prompts against the index and records where each request was routed.
"""

from __future__ import annotations

from epp.scheduling.prefix import PrefixIndex, PrefixParams, parse_index_params
from epp.scheduling.registry import PRODUCER, BuildContext, Params, register


@register("approx-prefix-cache-producer", PRODUCER)
class ApproxPrefixCacheProducer:
    """Holds one PrefixIndex and the parameters its blocks are cut with."""

    def __init__(self, name: str, params: PrefixParams, ctx: BuildContext) -> None:
        self.name = name
        self.params = params
        self.index = PrefixIndex(params.max_entries, params.purge_after)

    @classmethod
    def parse(cls, p: Params) -> PrefixParams:
        out = parse_index_params(p, scorer=False)
        p.done()
        return out
