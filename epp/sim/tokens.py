"""Deterministic stand-ins for a tokenizer: token counts, KV block hashes, chat templating, output text.

A token is `chars_per_token` (4) characters, so no tokenizer is downloaded and every count is
reproducible. KV blocks are hashed over the characters they cover, chained (each hash seeds the
next), with the first block seeded by the model or adapter name, because an adapter's KV differs
from the base model's.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import xxhash

# Output tokens cycle through these 4-character pieces, so generated text is also chars/4 tokens.
_OUTPUT_PIECES = (" the", " sim", " ran", " one", " red", " sky", " sea", " sun", " map", " key")


def count_tokens(text: str, chars_per_token: int = 4) -> int:
    """Tokens in `text`: ceil(characters / chars_per_token), at least 1 for a non-empty text."""
    return -(-len(text) // chars_per_token)


def block_hashes(text: str, block_size: int, seed_name: str, chars_per_token: int = 4) -> list[int]:
    """Chained hashes of the full KV blocks of `text` (a trailing partial block is not hashed)."""
    step = block_size * chars_per_token
    full = len(text) // step
    if full == 0:
        return []
    if text.isascii():  # the common case: one encode, byte slices are character slices
        data = text.encode()
        chunks = [data[i * step:(i + 1) * step] for i in range(full)]
    else:  # block boundaries are on characters, so slice first, then encode
        chunks = [text[i * step:(i + 1) * step].encode("utf-8", "surrogatepass") for i in range(full)]
    h = xxhash.xxh3_64_intdigest(seed_name.encode())
    out = []
    for chunk in chunks:
        h = xxhash.xxh3_64_intdigest(chunk, seed=h)
        out.append(h)
    return out


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts, in order
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return "" if content is None else str(content)


def chat_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """A fixed chat template: `<|role|>content` lines then `<|assistant|>`, so turns share prefixes."""
    parts = [f"<|{m.get('role', 'user')}|>{_content_text(m.get('content'))}\n" for m in messages]
    parts.append("<|assistant|>")
    return "".join(parts)


def completion_prompt(prompt: Any) -> str:
    """The text of a completions `prompt`: a string, a one-element list, or token ids.

    Raises ValueError for batched prompts (several strings), which the simulator does not serve.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            # token ids: each id becomes one 4-character token, so counts match len(prompt)
            return "".join(f"{t & 0xFFFF:04x}" for t in prompt)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        raise ValueError("batched prompts are not supported by the simulator")
    raise ValueError("prompt must be a string, a list with one string, or a list of token ids")


def output_piece(index: int) -> str:
    """The text of output token number `index` (0-based)."""
    return _OUTPUT_PIECES[index % len(_OUTPUT_PIECES)]


def output_text(n: int) -> str:
    """The full text of `n` output tokens."""
    return "".join(output_piece(i) for i in range(n))


# ---- token ids (the /tokenize and /render endpoints routers call) ------------------------------------
VOCAB_SIZE = 128256  # Llama-3's vocabulary: ids are in 0..VOCAB_SIZE-1, as a real tokenizer's would be


def _ascii_id(word: int) -> int:
    return (word * 2654435761 & 0xFFFFFFFF) % VOCAB_SIZE  # Knuth's multiplicative mix, into the vocabulary


def token_ids(text: str, chars_per_token: int = 4) -> list[int]:
    """The ids of `text`'s tokens: one per 4 characters (the last one may be shorter), each a function
    of its own characters only, so equal prefixes give equal leading ids (what a router's token-prefix
    tree relies on) and `len(token_ids(t)) == count_tokens(t)`. An ASCII piece's id mixes its bytes
    read as one little-endian 32-bit word (fast: no per-token hashing); any other piece's is a hash."""
    if chars_per_token != 4:
        raise ValueError("token ids are defined for 4 characters per token")
    if text.isascii():
        data = text.encode()
        words = array.array("I", data + b"\0" * (-len(data) % 4))
        if sys.byteorder != "little":
            words.byteswap()
        return [_ascii_id(w) for w in words]
    out = []
    for i in range(0, len(text), 4):
        piece = text[i:i + 4]
        raw = piece.encode("utf-8", "surrogatepass")
        if piece.isascii():
            out.append(_ascii_id(int.from_bytes(raw.ljust(4, b"\0"), "little")))
        else:
            out.append(xxhash.xxh32_intdigest(raw) % VOCAB_SIZE)
    return out


def detokenize(ids: Sequence[int]) -> str:
    """Text for token ids, as the simulator reads a prompt given as ids (see completion_prompt): the
    hash in token_ids cannot be undone, so each id becomes 4 hex characters (one token again)."""
    return "".join(f"{t & 0xFFFF:04x}" for t in ids)
