"""`passthrough-parser`: route on headers alone; the body is forwarded untouched and never read.

Any payload works (not only OpenAI JSON), at a price: no model name (no rewrite, no InferenceModel
priority) and no prompt, so prefix-aware scoring has nothing to match.
"""

from __future__ import annotations

from collections.abc import Mapping

from epp.parsers import ParseDispatch, ParsedRequest
from epp.scheduling.registry import PARSER, Params, register


@register("passthrough-parser", PARSER)
class PassthroughParser:
    """Every request parses; the body is opaque."""

    parse = ParseDispatch()
    needs_body = False
    claims: tuple[str, ...] = ()  # every path: with several parsers configured, the fallback

    def __init__(self, name: str = "passthrough-parser", params: None = None, ctx: object = None) -> None:
        self.name = name

    @classmethod
    def parse_params(cls, p: Params) -> None:
        """No parameters."""
        p.done()

    def parse_request(self, headers: Mapping[str, str], body: bytes | None, path: str) -> ParsedRequest:
        """A request with no model and no prompt."""
        return ParsedRequest(api="passthrough", model="")
