"""Seeded request streams for the discrete-event cluster: Poisson arrivals, shared-prefix groups.

Each generator yields (arrival time, SimRequest) lazily in time order, so long runs need no memory
for requests not yet arrived.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from epp.sim.des import SimRequest

_LETTERS = bytes(range(ord("a"), ord("z") + 1)) + b" " * 6  # ~1 space per 5 letters: word-like text
_TABLE = bytes(_LETTERS[i % len(_LETTERS)] for i in range(256))


def random_text(rng: random.Random, chars: int) -> str:
    """`chars` characters of seeded pseudo-text (lower-case letters and spaces), ~chars/4 tokens."""
    return rng.randbytes(chars).translate(_TABLE).decode("ascii")


def shared_prefix(n: int, rate: float, *, groups: int = 8, prefix_chars: int = 4096, suffix_chars: int = 256,
                  max_tokens: int = 64, models: Sequence[str] = ("",), seed: int = 0
                  ) -> Iterator[tuple[float, SimRequest]]:
    """`n` requests at Poisson `rate`/s; each picks one of `groups` long shared prefixes (a system
    prompt or document) plus a unique suffix, and a model from `models` ("" = base model)."""
    rng = random.Random(seed)
    prefixes = [f"group {g}: " + random_text(rng, prefix_chars) for g in range(groups)]
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        g = rng.randrange(groups)
        prompt = prefixes[g] + " " + random_text(rng, suffix_chars)
        yield t, SimRequest(f"req-{i}", prompt, max_tokens, rng.choice(list(models)), data=g)


def poisson(n: int, rate: float, *, prompt_chars: int = 1024, max_tokens: int = 64, models: Sequence[str] = ("",),
            seed: int = 0) -> Iterator[tuple[float, SimRequest]]:
    """`n` requests with unrelated prompts at Poisson `rate`/s."""
    rng = random.Random(seed)
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        yield t, SimRequest(f"req-{i}", random_text(rng, prompt_chars), max_tokens, rng.choice(list(models)))
