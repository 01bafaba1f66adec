"""Seeded request streams for the discrete-event cluster.

Poisson arrivals of unrelated prompts, shared-prefix groups, multi-turn chats that grow, a LoRA
adapter mix, a long-context mix and on/off bursts. Each generator yields (arrival time, SimRequest)
lazily in time order, so long runs need no memory for requests not yet arrived; the same arguments
and seed always give the same stream.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator, Sequence
from itertools import accumulate

from epp.sim.des import SimRequest

_LETTERS = bytes(range(ord("a"), ord("z") + 1)) + b" " * 6  # ~1 space per 5 letters: word-like text
_TABLE = bytes(_LETTERS[i % len(_LETTERS)] for i in range(256))


def random_text(rng: random.Random, chars: int) -> str:
    """`chars` characters of seeded pseudo-text (lower-case letters and spaces), ~chars/4 tokens."""
    return rng.randbytes(chars).translate(_TABLE).decode("ascii")


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of ranks 1..n proportional to 1 / rank^s (s = 0: uniform)."""
    return [1.0 / k ** s for k in range(1, n + 1)]


def shared_prefix(n: int, rate: float, *, groups: int = 8, prefix_chars: int = 4096, suffix_chars: int = 256,
                  max_tokens: int = 64, models: Sequence[str] = ("",), zipf: float = 0.0, seed: int = 0
                  ) -> Iterator[tuple[float, SimRequest]]:
    """`n` requests at Poisson `rate`/s; each picks one of `groups` long shared prefixes (a system
    prompt or document) plus a unique suffix, and a model from `models` ("" = base model).
    Groups are equally popular, or Zipf-popular with exponent `zipf` > 0. `data` is the group."""
    rng = random.Random(seed)
    prefixes = [f"group {g}: " + random_text(rng, prefix_chars) for g in range(groups)]
    cum = list(accumulate(zipf_weights(groups, zipf))) if zipf > 0 else None
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        g = rng.randrange(groups) if cum is None else rng.choices(range(groups), cum_weights=cum)[0]
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


def multi_turn(n: int, rate: float, *, systems: int = 8, system_chars: int = 4000, zipf: float = 1.0,
               user_chars: tuple[int, int] = (200, 1200), reply_tokens: tuple[int, int] = (64, 256),
               turns: float = 6.0, think_s: float = 6.0, ms_per_reply_token: float = 25.0,
               max_context_chars: int = 60000, models: Sequence[str] = ("",), seed: int = 0
               ) -> Iterator[tuple[float, SimRequest]]:
    """`n` chat turns arriving at `rate`/s on average, from conversations that grow.

    Conversations start as a Poisson process (`rate / turns` per second), pick one of `systems`
    shared system prompts (Zipf-popular with exponent `zipf`) and last a geometric number of turns
    (mean `turns`, fewer when the context would pass `max_context_chars`). Each turn's prompt is the
    whole conversation so far (system prompt, earlier user messages and assistant replies) plus a
    new user message, so it repeats the previous turn's prompt as its prefix; it asks for a reply of
    uniform `reply_tokens` tokens. The next turn arrives after a response allowance
    (`ms_per_reply_token` per reply token) plus an exponential think time (mean `think_s`): open loop,
    times fixed in advance. The stream starts in steady state: conversations begun before time 0 are
    already under way (their earlier turns are not yielded). `data` is the conversation number.
    """
    rng = random.Random(seed)
    prompts = [f"<|system|>persona {g}: " + random_text(rng, system_chars) for g in range(systems)]
    cum = list(accumulate(zipf_weights(systems, zipf)))
    start_rate = rate / turns
    go_on = 1.0 - 1.0 / turns
    mean_gap = ms_per_reply_token * sum(reply_tokens) / 2000.0 + think_s
    # Begin early enough that almost every conversation alive at t=0 is represented.
    next_start = -8.0 * turns * mean_gap
    heap: list[tuple[float, int, int, str, str]] = []  # (time, conversation, turn, context, model)
    conv = 0
    i = 0
    model_list = list(models)
    while i < n:
        if heap and heap[0][0] <= next_start:
            t, c, turn, context, model = heapq.heappop(heap)
        else:
            t, c, turn, model = next_start, conv, 0, rng.choice(model_list)
            context = prompts[rng.choices(range(systems), cum_weights=cum)[0]]
            conv += 1
            next_start += rng.expovariate(start_rate)
        prompt = context + "\n<|user|>" + random_text(rng, rng.randint(*user_chars)) + "\n<|assistant|>"
        out = rng.randint(*reply_tokens)
        if t >= 0.0:
            yield t, SimRequest(f"req-{i}", prompt, out, model, data=c)
            i += 1
        context = prompt + random_text(rng, out * 4)
        if rng.random() < go_on and len(context) + user_chars[1] + 32 <= max_context_chars:
            gap = ms_per_reply_token * out / 1000.0 + rng.expovariate(1.0 / think_s)
            heapq.heappush(heap, (t + gap, c, turn + 1, context, model))


def lora_mix(n: int, rate: float, *, adapters: Sequence[str], zipf: float = 1.0, base_share: float = 0.0,
             template_chars: int = 2048, prompt_chars: int = 1024, max_tokens: int = 128, seed: int = 0
             ) -> Iterator[tuple[float, SimRequest]]:
    """`n` requests at Poisson `rate`/s for LoRA `adapters` of Zipf popularity (exponent `zipf`; the
    first adapter is the most popular), `base_share` of them for the base model instead. Each
    adapter (and the base model) has its own prompt template (a task's instructions,
    `template_chars`) that its requests share, followed by `prompt_chars` of unique text."""
    if not adapters:
        raise ValueError("lora_mix needs at least one adapter")
    rng = random.Random(seed)
    names = ["", *adapters]
    templates = {m: f"task {m or 'base'}: " + random_text(rng, template_chars) for m in names}
    cum = list(accumulate(zipf_weights(len(adapters), zipf)))
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        model = "" if rng.random() < base_share else rng.choices(adapters, cum_weights=cum)[0]
        prompt = templates[model] + " " + random_text(rng, prompt_chars)
        yield t, SimRequest(f"req-{i}", prompt, max_tokens, model)


def long_context(n: int, rate: float, *, long_share: float = 0.01, long_chars: int = 126976,
                 short_chars: int = 2048, max_tokens: int = 128, long_max_tokens: int = 256, seed: int = 0
                 ) -> Iterator[tuple[float, SimRequest]]:
    """`n` requests at Poisson `rate`/s with unrelated prompts: `long_share` of them are long
    documents of `long_chars` characters (default 31,744 tokens: a 32k context less room to answer),
    the rest `short_chars`. `data` is True for a long one."""
    rng = random.Random(seed)
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        long = rng.random() < long_share
        prompt = random_text(rng, long_chars if long else short_chars)
        yield t, SimRequest(f"req-{i}", prompt, long_max_tokens if long else max_tokens, data=long)


def on_off(times: Iterator[float], *, period: float, on_fraction: float) -> Iterator[float]:
    """Map arrival times of a steady process onto bursts: the first `on_fraction` of every `period`
    seconds receives everything, the rest none (so the mean rate is `on_fraction` times the input's)."""
    on = _on_seconds(period, on_fraction)
    for u in times:
        yield _burst_time(u, period, on)


def _on_seconds(period: float, on_fraction: float) -> float:
    if not 0.0 < on_fraction <= 1.0 or period <= 0:
        raise ValueError("need period > 0 and 0 < on_fraction <= 1")
    return period * on_fraction


def _burst_time(u: float, period: float, on: float) -> float:
    k = math.floor(u / on)
    return k * period + (u - k * on)


def bursty(n: int, rate: float, *, period: float = 4.0, on_fraction: float = 0.25, groups: int = 32,
           zipf: float = 1.0, prefix_chars: int = 4096, suffix_chars: int = 1024, max_tokens: int = 128,
           sheddable: float = 0.0, seed: int = 0) -> Iterator[tuple[float, SimRequest]]:
    """`n` shared-prefix requests (see shared_prefix; Zipf-popular groups) arriving in on/off
    bursts with a mean rate of `rate`/s: Poisson at `rate / on_fraction` during the first
    `on_fraction` of every `period`, nothing in the rest (see on_off). `sheddable` of them, drawn at
    random, have priority −1 (a router may refuse them while the pool is saturated)."""
    on = _on_seconds(period, on_fraction)
    shed_rng = random.Random(seed + 1)
    for u, req in shared_prefix(n, rate / on_fraction, groups=groups, prefix_chars=prefix_chars,
                                suffix_chars=suffix_chars, max_tokens=max_tokens, zipf=zipf, seed=seed):
        if sheddable > 0.0 and shed_rng.random() < sheddable:
            req.priority = -1
        yield _burst_time(u, period, on), req
