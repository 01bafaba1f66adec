"""The simulator's tokenizer as a backend: the ids `epp.sim` computes for the same prompt (its
engines hash and publish those), so a picker in front of simulators sees the engine's own tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from epp.sim.tokens import chat_prompt, token_ids


class SimTokenizer:
    """Ids of the sim's chat template / completion prompt."""

    def ids_for(self, prompt: str, messages: Sequence[Mapping[str, Any]] | None) -> list[int] | None:
        text = chat_prompt(messages) if messages else prompt
        return token_ids(text) if text else None
