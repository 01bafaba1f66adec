"""Role filters on the pod label `llm-d.ai/role` (kept on Endpoint.role): `decode-filter`,
`prefill-filter`, `encode-filter`, with the reference's role sets.

`decode-filter` also keeps pods without the label (an unlabelled pool serves prefill and decode
alike), so llm-d's single-profile configs, which all list it, route over a plain pool too. Under
disagg-profile-handler (disagg.py) they separate the prefill and decode profiles' candidates.
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle
from epp.scheduling.registry import FILTER, BuildContext, NoParams, register

DECODE_ROLES = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
PREFILL_ROLES = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})
ENCODE_ROLES = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


class _RoleFilter(NoParams):
    ROLES: frozenset[str] = frozenset()
    KEEP_UNLABELLED = False

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        roles, unlabelled = self.ROLES, self.KEEP_UNLABELLED
        return [ep for ep in endpoints if ep.role in roles or (unlabelled and not ep.role)]


@register("decode-filter", FILTER)
class DecodeFilter(_RoleFilter):
    """Pods that decode: role decode, prefill-decode, both or encode-prefill-decode, or no role label."""

    ROLES = DECODE_ROLES
    KEEP_UNLABELLED = True


@register("prefill-filter", FILTER)
class PrefillFilter(_RoleFilter):
    """Pods labelled for prefill: prefill, encode-prefill, prefill-decode, both, encode-prefill-decode."""

    ROLES = PREFILL_ROLES


@register("encode-filter", FILTER)
class EncodeFilter(_RoleFilter):
    """Pods labelled for encode: encode, encode-prefill, encode-prefill-decode."""

    ROLES = ENCODE_ROLES
