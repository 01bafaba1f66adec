"""`token-producer`: how many tokens a prompt is, without a tokenizer (the reference's `estimate`
backend: about 4 bytes of UTF-8 a token).

The reference's other backends — `vllm` (engine `/render`, with `modelName`, `vllm.url`,
`vllm.timeout`, `vllm.mmTimeout`) and the deprecated `udsTokenizerConfig` sidecar — give the real
token IDs precise prefix-cache routing needs; they are refused as not yet supported. The `estimate`
section (image/video placeholder estimation) is accepted and kept for when multimodal counting lands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from epp.scheduling.registry import PRODUCER, BuildContext, ConfigError, Params, register

BYTES_PER_TOKEN = 4
_PENDING = "not yet supported (precise prefix-cache routing); this picker estimates tokens (~4 bytes each)"


@dataclass(frozen=True, slots=True)
class TokenParams:
    estimate: Mapping[str, Any] = field(default_factory=dict)


def estimate_tokens(text: str) -> int:
    """Estimated tokens of `text`: its UTF-8 length / 4, rounded up (0 for "")."""
    if not text:
        return 0
    n = len(text.encode("utf-8", "surrogatepass")) if not text.isascii() else len(text)
    return -(-n // BYTES_PER_TOKEN)


@register("token-producer", PRODUCER)
class TokenProducer:
    """Token estimates for prompts (`estimate(text)`)."""

    def __init__(self, name: str, params: TokenParams, ctx: BuildContext) -> None:
        self.name = name
        self.params = params

    @classmethod
    def parse(cls, p: Params) -> TokenParams:
        for key in ("vllm", "modelName", "udsTokenizerConfig"):
            if p.has(key):
                raise ConfigError(p.field(key), f"the {key} tokenizer backend is {_PENDING}")
            p.get(key)
        raw = p.get("estimate")
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(p.field("estimate"), f"expected a mapping, got {type(raw).__name__}")
        p.done()
        return TokenParams(estimate=dict(raw or {}))

    def estimate(self, text: str) -> int:
        return estimate_tokens(text)
