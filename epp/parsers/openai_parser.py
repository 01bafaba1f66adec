"""`openai-parser` (the default): OpenAI JSON request bodies, validated and read by epp.openai."""

from __future__ import annotations

from collections.abc import Mapping

from epp import openai
from epp.parsers import ParseDispatch, ParsedRequest, ParseError
from epp.scheduling.registry import PARSER, Params, register


@register("openai-parser", PARSER)
class OpenAIParser:
    """Chat, completions, responses, embeddings and conversations bodies; the API comes from the path."""

    parse = ParseDispatch()
    needs_body = True
    # path suffixes, as llm-d's openai-parser claims them (used when several parsers are configured)
    claims = ("chat/completions", "completions", "embeddings", "responses", "conversations",
              "chat/completions/render", "completions/render", "images/generations")

    def __init__(self, name: str = "openai-parser", params: None = None, ctx: object = None) -> None:
        self.name = name

    @classmethod
    def parse_params(cls, p: Params) -> None:
        """No parameters."""
        p.done()

    def parse_request(self, headers: Mapping[str, str], body: bytes | None, path: str) -> ParsedRequest:
        """Validate the body; ParseError (400) carries the one-line reason from epp.openai."""
        try:
            parsed = openai.parse_request(body or b"", path)
        except openai.BadRequest as e:
            raise ParseError(str(e)) from None

        def rewrite(target: str) -> bytes:
            return openai.rewrite_model(parsed, target)

        return ParsedRequest(api=parsed.api, model=parsed.model, stream=parsed.stream,
                             prompt=openai.prompt_text(parsed), body=parsed.body, rewrite=rewrite)
