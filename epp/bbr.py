"""Body-based routing: the first of two ext_proc callouts (seed 003's design).

Copies the request body's model into `X-Gateway-Model-Name` and its base model into
`X-Gateway-Base-Model-Name`, and clears the route cache, so HTTPRoute header matches choose the
InferencePool; the pool's own picker is the second callout. It picks no endpoint. Bodies that are
not OpenAI JSON pass through untouched: the route decides what happens to them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from epp.director import MODEL_REWRITE_HEADERS, Rejected, RequestContext, Routed, header_value

log = logging.getLogger("epp.bbr")

# HTTP/2 header names are lower case; HTTPRoute header matches are case-insensitive
MODEL_HEADER = "x-gateway-model-name"
BASE_MODEL_HEADER = "x-gateway-base-model-name"


def parse_base_models(text: str) -> dict[str, str]:
    """`adapter=base,adapter2=base` (the --base-model flag) as a map."""
    out = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        adapter, sep, base = part.partition("=")
        if not sep or not adapter.strip() or not base.strip():
            raise ValueError(f"bad base-model entry {part!r}: expected adapter=base")
        out[adapter.strip()] = base.strip()
    return out


class BodyRouter:
    """The Decider of body-based-routing mode."""

    def __init__(self, base_models: Mapping[str, str] | None = None, max_body_bytes: int = 16 * 1024 * 1024) -> None:
        self.base_models = dict(base_models or {})
        self.max_body_bytes = max_body_bytes

    def decide(self, headers: Mapping[str, str], body: bytes | None, subset_hint: object = None,
               started: float | None = None) -> Routed | Rejected:
        model = header_value(headers, MODEL_REWRITE_HEADERS)
        if not model and body:
            try:
                obj = json.loads(body)
            except ValueError:
                obj = None
            value = obj.get("model") if isinstance(obj, dict) else None
            model = value if isinstance(value, str) else ""
        if not model:
            return Routed(ctx=None, destination="", body=None, set_headers=[])
        base = self.base_models.get(model, model)
        return Routed(ctx=None, destination="", body=None,
                      set_headers=[(MODEL_HEADER, model), (BASE_MODEL_HEADER, base)])

    def served_by(self, ctx: RequestContext, address: str) -> None:
        return None

    def response_headers(self, ctx: RequestContext, served: str | None,
                         lb_metadata: bool = False) -> list[tuple[str, str]]:
        return []

    def response_metadata(self, ctx: RequestContext) -> dict[str, dict[str, float]] | None:
        return None

    def finish(self, ctx: RequestContext | None) -> None:
        return None
