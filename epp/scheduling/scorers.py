"""Load scorers: waiting queue, running batch, KV-cache use, LoRA adapter affinity, own in-flight load,
and llm-d's distribution scorers (load-aware, active-request, no-hit LRU).

Each returns one score per endpoint in 0..1 (higher is better). A pod whose metrics are stale or
missing scores 0 on every metric-based scorer: it is treated as the worst pod.
(Prefix and session affinity live in prefix.py and session.py.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.registry import SCORER, BuildContext, NoParams, Params, register

_BIG = 1e300  # bigger counts are garbage; with NaN and negatives they are treated like stale values


def low_is_better(values: list[float | None]) -> list[float]:
    """Min-max normalisation (max − v) / (max − min) over valid values; 1 when all equal.

    None (stale), NaN, negative and infinite values score 0, so the result is always in 0..1."""
    known = [v for v in values if v is not None and 0.0 <= v < _BIG]
    if not known:
        return [0.0] * len(values)
    lo, hi = min(known), max(known)
    if len(known) == len(values):  # the usual case: every pod fresh and sane
        if hi == lo:
            return [1.0] * len(values)
        span = hi - lo
        return [(hi - v) / span for v in known]
    if hi == lo:
        return [1.0 if v is not None and 0.0 <= v < _BIG else 0.0 for v in values]
    span = hi - lo
    return [(hi - v) / span if v is not None and 0.0 <= v < _BIG else 0.0 for v in values]


@dataclass(frozen=True, slots=True)
class QueueParams:
    min_spread: float = 0.0  # ours: queue differences smaller than this never swing the full weight
    count_inflight: bool = False  # ours: the page's queue raised by what this picker sent since


@register("queue-scorer", SCORER)
class QueueScorer:
    """Shorter waiting queue is better: (maxQ − q) / (maxQ − minQ) over the candidates (the reference's).

    Two parameters of ours, both off by default (the reference's formula):
    - `minSpread`: score = 1 − (q − minQ) / max(maxQ − minQ, minSpread), so 0 against 2 waiting with
      minSpread 8 separates the pods by 1/4 of the weight instead of all of it: small, transient
      queues stop outvoting a cached prefix, long ones still do.
    - `countInflight`: q = max(waiting, inflight − running): the requests this picker routed to the
      pod beyond what its page shows running count as queued until the next scrape, so a burst
      between two scrapes does not pile onto the pod that looked idle. With several picker replicas
      each sees a part of the in-flight load and the page's own queue dominates (never lower)."""

    BOUNDED = True  # scores are clamped to 0..1

    def __init__(self, name: str, params: QueueParams | None, ctx: BuildContext) -> None:
        self.name = name
        self.p = params or QueueParams()

    @classmethod
    def parse(cls, p: Params) -> QueueParams:
        out = QueueParams(min_spread=p.number("minSpread", 0.0, lo=0),
                          count_inflight=p.boolean("countInflight", False))
        p.done()
        return out

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        fresh = cycle.fresh(endpoints)
        if self.p.count_inflight:
            values: list[float | None] = [
                None if m is None else max(m.waiting, ep.inflight - m.running)
                for m, ep in zip(fresh, endpoints, strict=True)]
        else:
            values = [None if m is None else m.waiting for m in fresh]
        spread = self.p.min_spread
        if spread <= 0.0:
            return low_is_better(values)
        known = [v for v in values if v is not None and 0.0 <= v < _BIG]
        if not known:
            return [0.0] * len(values)
        lo = min(known)
        span = max(max(known) - lo, spread)
        return [1.0 - (v - lo) / span if v is not None and 0.0 <= v < _BIG else 0.0 for v in values]


@register("running-requests-scorer", SCORER)
class RunningRequestsScorer(NoParams):
    """Smaller running batch is better: min-max over the candidates like the queue scorer."""

    BOUNDED = True  # low_is_better() always returns 0..1

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        return low_is_better([None if m is None else m.running for m in cycle.fresh(endpoints)])


@register("running-requests-size-scorer", SCORER)
class RunningRequestsSizeScorer(RunningRequestsScorer):
    """llm-d's name for the running-requests scorer (same min-max formula, no parameters)."""


@register("kv-cache-utilization-scorer", SCORER)
class KVCacheUtilizationScorer(NoParams):
    """Free KV cache is better: 1 − kv use (kv outside 0..1 or NaN is clamped; NaN counts as full)."""

    BOUNDED = True

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        out: list[float] = []
        append = out.append
        for m in cycle.fresh(endpoints):
            if m is None:
                append(0.0)
            else:
                k = m.kv_usage
                append(1.0 - k if 0.0 <= k <= 1.0 else (1.0 if k < 0.0 else 0.0))
        return out


LORA_RUNNING, LORA_FREE_SLOT, LORA_WAITING = 1.0, 0.8, 0.6


@register("lora-affinity-scorer", SCORER)
class LoraAffinityScorer(NoParams):
    """1.0 adapter loaded; 0.8 a free adapter slot (running + waiting < max); 0.6 adapter queued; else 0.

    A request for a pod's base model (its metrics' `model_name` label) is not an adapter request:
    pods serving that base model score 1.0, others 0, whatever their adapter slots."""

    BOUNDED = True  # scores are constants or ratios in 0..1 by construction

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        model = cycle.request.model
        out: list[float] = []
        fresh = cycle.fresh(endpoints)
        if any(m is not None and model in m.models for m in fresh):
            # a base-model request, not an adapter: adapter slots say nothing about it (scoring free
            # slots here herded base-model traffic onto the pods with the fewest adapters loaded)
            return [1.0 if m is not None and model in m.models else 0.0 for m in fresh]
        for m in fresh:
            if m is None:
                out.append(0.0)
            elif model in m.lora_running:
                out.append(LORA_RUNNING)
            elif len(m.lora_running) + len(m.lora_waiting) < m.lora_max:
                out.append(LORA_FREE_SLOT)
            elif model in m.lora_waiting:
                out.append(LORA_WAITING)
            else:
                out.append(0.0)
        return out


def pool_serves_adapters(endpoints: Sequence[Endpoint]) -> bool:
    """Some endpoint reports LoRA support (lora_max > 0): the default profile then adds LoRA affinity."""
    for ep in endpoints:
        m = ep.metrics
        if m is not None and m.lora_max > 0:
            return True
    return False


@dataclass(frozen=True, slots=True)
class InflightParams:
    tokens_per_request: float = 1024.0
    replicas: int = 1  # ours: picker replicas in active-active mode (each sees only its own in-flight)


@register("inflight-load-scorer", SCORER)
class InflightLoadScorer:
    """Fewer requests (and estimated prompt tokens) routed here and not yet finished is better.

    load = inflight + inflight_tokens / tokensPerRequest; score = (min load + 1) / (load + 1).
    The ratio form decides firmly between 0 and 1 in flight (a burst between two scrapes spreads)
    yet barely separates 20 from 21 (steady streaming load is left to the engine signals).
    `replicas` (ours, default 1): with N active-active picker replicas each counts only the requests
    it routed itself, about 1/N of the pool's, so its loads are scaled by N to stand for the pool's
    (in the discrete-event benchmark this recovers part of what replicas lose; docs/precise-prefix.md).
    """

    BOUNDED = True  # scores are constants or ratios in 0..1 by construction

    def __init__(self, name: str, params: float | InflightParams, ctx: BuildContext) -> None:
        self.name = name
        p = params if isinstance(params, InflightParams) else InflightParams(float(params))
        self.per_token = 1.0 / p.tokens_per_request if p.tokens_per_request > 0 else 0.0
        self.scale = float(p.replicas)

    @classmethod
    def parse(cls, p: Params) -> InflightParams:
        v = p.number("tokensPerRequest", 1024.0, lo=0)
        n = p.integer("replicas", 1, lo=1, hi=1024)
        p.done()
        return InflightParams(v, n)

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        k = self.per_token
        loads = [ep.inflight + ep.inflight_tokens * k for ep in endpoints]
        lo = min(loads)
        if lo < 0:  # never expected (the director clamps at 0), but keep the ratio in 0..1
            loads = [x if x > 0 else 0.0 for x in loads]
            lo = min(loads)
        if self.scale != 1.0:
            loads = [x * self.scale for x in loads]
            lo *= self.scale
        base = lo + 1.0
        return [base / (x + 1.0) for x in loads]


@register("load-aware-scorer", SCORER)
class LoadAwareScorer:
    """0.5 for an empty waiting queue, falling linearly to 0 at `threshold` waiting (default 128);
    a pod with stale or missing metrics scores 0. The 0.5 ceiling is the reference's."""

    BOUNDED = True

    def __init__(self, name: str, params: int, ctx: BuildContext) -> None:
        self.name = name
        self.threshold = float(params)

    @classmethod
    def parse(cls, p: Params) -> int:
        v = p.integer("threshold", 128, lo=1)
        p.done()
        return v

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        t = self.threshold
        out: list[float] = []
        for m in cycle.fresh(endpoints):
            if m is None or not m.waiting >= 0.0:  # stale, missing or NaN
                out.append(0.0)
            elif m.waiting >= t:
                out.append(0.0)
            else:
                out.append(0.5 * (1.0 - m.waiting / t))
        return out


@dataclass(frozen=True, slots=True)
class ActiveRequestParams:
    idle_threshold: int = 0
    max_busy_score: float = 1.0


@register("active-request-scorer", SCORER)
class ActiveRequestScorer:
    """Requests this picker has in flight per pod: at most `idleThreshold` scores 1.0; busier pods
    score (max − n) / max × `maxBusyScore`, the busiest 0."""

    BOUNDED = True

    def __init__(self, name: str, params: ActiveRequestParams, ctx: BuildContext) -> None:
        self.name = name
        self.p = params

    @classmethod
    def parse(cls, p: Params) -> ActiveRequestParams:
        out = ActiveRequestParams(
            idle_threshold=p.integer("idleThreshold", 0, lo=0),
            max_busy_score=p.number("maxBusyScore", 1.0, lo=0, hi=1),
        )
        p.duration("requestTimeout", 1.0)  # deprecated in the reference and ignored there too
        p.done()
        return out

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        counts = [max(0, ep.inflight) for ep in endpoints]
        top = max(counts, default=0)
        idle, busy = self.p.idle_threshold, self.p.max_busy_score
        return [1.0 if n <= idle else (top - n) / top * busy for n in counts]


@dataclass(frozen=True, slots=True)
class NoHitParams:
    prefix_name: str = "prefix-cache-scorer"
    prefix_type: str = "prefix-cache-scorer"
    lru_size: int = 1024


@register("no-hit-lru-scorer", SCORER)
class NoHitLRUScorer:
    """Spreads cold requests (no prefix hit on any candidate) over the pods least recently given a
    cold request: never-used pods first, then from least to most recent, scores falling linearly
    from 1 to 0 over the ranks. Warm requests score 0.5 everywhere (the prefix scorer decides).
    Reads the prefix scorer named by `prefixPluginName`, which must run earlier in the profile."""

    BOUNDED = True

    def __init__(self, name: str, params: NoHitParams, ctx: BuildContext) -> None:
        self.name = name
        self.p = params
        self._lru: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._scores_key = f"prefix-scores:{params.prefix_name}"
        self._cold_key = f"no-hit-cold:{name}"

    @classmethod
    def parse(cls, p: Params) -> NoHitParams:
        out = NoHitParams(
            prefix_name=p.string("prefixPluginName", "prefix-cache-scorer"),
            prefix_type=p.string("prefixPluginType", "prefix-cache-scorer"),
            lru_size=p.integer("lruSize", 1024, lo=1),
        )
        p.done()
        return out

    @staticmethod
    def refs(params: NoHitParams) -> list[tuple[str, str, tuple[str, ...]]]:
        """Plugins this one names: (parameter, plugin name, acceptable types)."""
        return [("prefixPluginName", params.prefix_name, (params.prefix_type,))]

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        seen = cycle.request.scratch.get(self._scores_key)
        cold = seen is None or not any(x > 0.0 for x in seen[1])
        cycle.request.scratch[self._cold_key] = cold
        n = len(endpoints)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        lru = self._lru
        positions = {a: i for i, a in enumerate(lru)} if lru else {}
        never = [i for i, ep in enumerate(endpoints) if ep.address not in positions]
        out = [0.0] * n
        span = float(n - 1)
        for rank, i in enumerate(never):
            out[i] = 1.0 - rank / span
        base = len(never)
        for i, ep in enumerate(endpoints):
            pos = positions.get(ep.address)
            if pos is not None:
                out[i] = max(0.0, 1.0 - (base + pos) / span)
        return out

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        if not request.scratch.get(self._cold_key):
            return
        lru = self._lru
        lru.pop(endpoint.address, None)
        lru[endpoint.address] = None
        while len(lru) > self.p.lru_size:
            lru.popitem(last=False)

    def forget(self, address: str) -> None:
        self._lru.pop(address, None)


@dataclass(frozen=True, slots=True)
class PrefillBacklogParams:
    tokens_per_second: float = 20000.0
    step_seconds: float = 0.006
    scale_seconds: float = 0.02
    prefix_name: str = "prefix-cache-scorer"
    prefix_type: str = "prefix-cache-scorer"
    own_share: float = 0.0
    min_hit: float = 0.0
    move_every: float = 0.0
    move_to_idle: bool = False
    cold_prompts: bool = False


_CHARS_PER_TOKEN = 4.0  # the datastore's prompt-token estimate
_MAX_NOTE_SECONDS = 3600.0  # a peer's prefill note is capped at this (moveEverySeconds' own limit)
_MAX_QUEUE = 1e6  # a scraped queue counts at most this many requests (a garbage page cannot overflow a wait)


def _ratio_of(eps: Sequence[Endpoint], ratios: Sequence[float], endpoint: Endpoint) -> float:
    """The prefix scorer's share for `endpoint` among the `eps` it scored (0 if it was not among them)."""
    for e, r in zip(eps, ratios, strict=False):
        if e is endpoint:
            return float(r)
    return 0.0


@register("prefill-backlog-scorer", SCORER)
class PrefillBacklogScorer:
    """Ours: a pod still computing the prefills this picker sent it scores lower.

    Per endpoint the picker keeps a clock of when those prefills should be done, as if the engine
    took them one after another: each request routed there adds `stepSeconds` plus its uncached
    prompt tokens (estimated tokens x (1 - the prefix scorer's share for that pod)) divided by
    `tokensPerSecond`; the clock restarts when the pod has nothing of ours in flight. The wait is
    that clock minus now, plus `ownShare` (0-1, default 0) of this request's own prefill there (1: a
    predicted time to first token); score = (min wait + scaleSeconds) / (wait + scaleSeconds), flat for a
    prompt no pod holds `minHit` (0-1, default 0) of by the prefix scorer's share, unless it is one no
    pod holds any of and `coldPrompts` is set; such a cold prompt also counts each request waiting
    on a pod's fresh page as one more prefill its size (the clocks see only ours). A scrape is 50 ms
    old and counts a queue only once it forms; this sees a prefill the moment it is sent, so a warm
    request is not put behind another pod-mate's cold prompt. The default profile runs it with
    minHit 0.5, moveEverySeconds 4, moveToIdleOnly and coldPrompts (docs/scheduling.md, Presets); the bare
    scorer's parameter defaults spread more and cost bursty and long-context traffic. Reads the
    prefix scorer named by `prefixPluginName`, which must run earlier.
    """

    BOUNDED = True

    def __init__(self, name: str, params: PrefillBacklogParams, ctx: BuildContext) -> None:
        self.name = name
        self.p = params
        self._until: dict[str, float] = {}  # address -> when its prefills should be done
        self._moved: dict[str, float] = {}  # moveEverySeconds: address -> last move away from it
        self._scores_key = f"prefix-scores:{params.prefix_name}"
        self._now_key = f"prefill-backlog-now:{name}"
        self._done_key = f"prefill-backlog-done:{name}"  # when the clock has this request's prefill done
        self._cost_key = f"prefill-backlog-cost:{name}"  # the seconds it added (the siblings' note)
        self._clock = ctx.clock

    @classmethod
    def parse(cls, p: Params) -> PrefillBacklogParams:
        out = PrefillBacklogParams(
            tokens_per_second=p.number("tokensPerSecond", 20000.0, lo=1.0),
            step_seconds=p.number("stepSeconds", 0.006, lo=0.0, hi=10.0),
            scale_seconds=p.number("scaleSeconds", 0.02, lo=0.001, hi=60.0),
            prefix_name=p.string("prefixPluginName", "prefix-cache-scorer"),
            prefix_type=p.string("prefixPluginType", "prefix-cache-scorer"),
            own_share=p.number("ownShare", 0.0, lo=0.0, hi=1.0),
            min_hit=p.number("minHit", 0.0, lo=0.0, hi=1.0),
            move_every=p.number("moveEverySeconds", 0.0, lo=0.0, hi=3600.0),
            move_to_idle=p.boolean("moveToIdleOnly", False),
            cold_prompts=p.boolean("coldPrompts", False),
        )
        p.done()
        return out

    @staticmethod
    def refs(params: PrefillBacklogParams) -> list[tuple[str, str, tuple[str, ...]]]:
        """Plugins this one names: (parameter, plugin name, acceptable types)."""
        return [("prefixPluginName", params.prefix_name, (params.prefix_type,))]

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        now = cycle.now
        cycle.request.scratch[self._now_key] = now
        until = self._until
        share = self.p.own_share
        cold = False
        if self.p.min_hit > 0.0 or self.p.cold_prompts:
            seen = cycle.request.scratch.get(self._scores_key)
            top = max(seen[1]) if seen is not None and seen[1] else 0.0
            # coldPrompts: a prompt no pod holds any of costs its whole prefill anywhere, so it is scored too
            cold = self.p.cold_prompts and top <= 0.0
            if top < self.p.min_hit and not cold:  # only prompts some pod holds enough of (a hot prefix)
                return [1.0] * len(endpoints)
        if not cold and not until and not share and not any(ep.others_prefill_until for ep in endpoints):
            return [1.0] * len(endpoints)
        get = until.get
        # this picker's clock plus the other workers' (folded in by epp.workershare; 0 without them)
        pending = waits = [(u - now if (u := get(ep.address, 0.0)) > now else 0.0)
                           + (o - now if (o := ep.others_prefill_until) > now else 0.0) for ep in endpoints]
        if cold:  # the clocks see only our prefills: a queue on a pod's fresh page waits ahead too
            waits = self._queued(cycle, endpoints, waits)
        if not share and not any(waits):  # nothing pending on these pods: every score is 1 (holds too)
            return [1.0] * len(endpoints)
        if share:
            costs = self._costs(cycle.request, endpoints)
            waits = [w + share * cost for w, cost in zip(waits, costs, strict=True)]
        c = self.p.scale_seconds
        base = min(waits) + c
        scores = [base / (w + c) for w in waits]
        if self.p.move_every > 0.0 or self.p.move_to_idle:
            scores = self._hold_moves(cycle.request, endpoints, scores, now, pending)
        return scores

    def _queued(self, cycle: Cycle, endpoints: Sequence[Endpoint], waits: list[float]) -> list[float]:
        """`waits` plus each pod's scraped waiting requests, each as long as this prompt's whole prefill
        (what a cold prompt is known to cost; the queue's own prompts are not known). A stale page adds
        nothing: the clock is all that is known there."""
        each = self._seconds(cycle.request, 0.0)
        # `not q > 0` also skips NaN from a garbage page
        return [w if m is None or not (q := m.waiting) > 0.0 else w + min(q, _MAX_QUEUE) * each
                for w, m in zip(waits, cycle.fresh(endpoints), strict=True)]

    def _hold_moves(self, request: SchedulingRequest, endpoints: Sequence[Endpoint], scores: list[float],
                    now: float, pending: list[float]) -> list[float]:
        """Pods holding less than minHit of this prompt score no better than the worst pod that holds it
        within moveEverySeconds of the last move away from the pod holding most of it (one copy of a
        hot prefix per period; a burst does not scatter it), and, with moveToIdleOnly, while they
        still have prefills of ours pending (a copy costs a cold prefill: only an idle pod gains)."""
        ratios = self._ratios(request, endpoints)
        warm = self._warm(ratios)
        if not any(warm):  # no pod holds it: nothing to copy, nothing to hold back
            return scores
        held = False
        if self.p.move_every > 0.0:
            best = max(range(len(endpoints)), key=ratios.__getitem__)
            last = self._moved.get(endpoints[best].address)
            held = last is not None and now - last < self.p.move_every
        if not held and not self.p.move_to_idle:
            return scores
        floor = min(sc for sc, w in zip(scores, warm, strict=True) if w)
        return [sc if w or (not held and left <= 0.0) else min(sc, floor)
                for sc, w, left in zip(scores, warm, pending, strict=True)]

    def _warm(self, ratios: list[float]) -> list[bool]:
        cut = self.p.min_hit or 0.5
        return [r >= cut for r in ratios]

    def _ratios(self, request: SchedulingRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        """The prefix scorer's share for each endpoint (0 where it gave none)."""
        seen = request.scratch.get(self._scores_key)
        if seen is None:
            return [0.0] * len(endpoints)
        eps, ratios = seen
        if eps is endpoints:
            return [float(r) for r in ratios]
        hits = {id(e): r for e, r in zip(eps, ratios, strict=False)}
        return [float(hits.get(id(ep), 0.0)) for ep in endpoints]

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        now = request.scratch.get(self._now_key)
        if now is None:  # not scored by this profile (e.g. another profile chose)
            return
        cost = self._cost_on(request, endpoint)
        addr = endpoint.address
        done = self._until[addr] = endpoint.prefill_until = max(now, self._until.get(addr, 0.0)) + cost
        request.scratch[self._done_key] = done
        request.scratch[self._cost_key] = cost
        if self.p.move_every > 0.0:
            self._note_move(request, endpoint, now)

    def peer_note(self, request: SchedulingRequest, endpoint: Endpoint) -> float | None:
        """For active-active peers (epp.peers): the seconds of prefill this request added to
        `endpoint`'s clock, so every replica's clock counts what all of them sent (`--workers` share
        theirs through shared memory instead, epp.workershare: the siblings' notes drop this)."""
        cost = request.scratch.get(self._cost_key)
        return round(cost, 6) if cost is not None else None

    def peer_apply(self, endpoint: Endpoint, note: Any) -> None:
        """A peer sent `endpoint` a prefill of `note` seconds: this clock runs that much longer
        (anything but a positive finite number is ignored; a longer one than ours could be is capped)."""
        if type(note) not in (float, int) or not 0.0 < note < math.inf:
            return
        addr = endpoint.address
        self._until[addr] = max(self._clock(), self._until.get(addr, 0.0)) + min(note, _MAX_NOTE_SECONDS)

    def _note_move(self, request: SchedulingRequest, endpoint: Endpoint, now: float) -> None:
        seen = request.scratch.get(self._scores_key)
        if seen is None or not seen[1]:
            return
        eps, ratios = seen
        top = max(ratios)
        if top < (self.p.min_hit or 0.5):  # no pod holds it: nothing was moved
            return
        if _ratio_of(eps, ratios, endpoint) < (self.p.min_hit or 0.5):
            # sent to a pod without the prefix: a move away from the one that has most
            self._moved[eps[ratios.index(top)].address] = now

    def _cost_on(self, request: SchedulingRequest, endpoint: Endpoint) -> float:
        """Seconds of prefill `request` adds on `endpoint` (the routed one: no list to build)."""
        seen = request.scratch.get(self._scores_key)
        return self._seconds(request, 0.0 if seen is None else _ratio_of(seen[0], seen[1], endpoint))

    def _costs(self, request: SchedulingRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        """Seconds of prefill `request` adds on each endpoint."""
        return [self._seconds(request, r) for r in self._ratios(request, endpoints)]

    def _seconds(self, request: SchedulingRequest, cached: float) -> float:
        """A step plus the prompt's uncached tokens (`cached`: the prefix scorer's share, 0-1) at the rate."""
        tokens = len(request.prompt) / _CHARS_PER_TOKEN
        return self.p.step_seconds + tokens * (1.0 - min(1.0, max(0.0, cached))) / self.p.tokens_per_second

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        addr = endpoint.address
        if endpoint.inflight <= 0:  # nothing of ours left there: its prefills are done
            self._until.pop(addr, None)
            endpoint.prefill_until = 0.0
            return
        done = request.scratch.get(self._done_key)
        until = self._until.get(addr)
        if done is None or until is None:
            return
        now = self._clock()
        if done > now:  # finished before the clock had its prefill done: what queued behind starts earlier
            self._until[addr] = endpoint.prefill_until = max(now, until - (done - now))

    def sweep(self, present: Sequence[str], now: float) -> None:
        """Drop clocks that have run out (the map holds only pods with work pending)."""
        for addr in [a for a, t in self._until.items() if t <= now]:
            del self._until[addr]
        for addr in [a for a, t in self._moved.items() if now - t >= self.p.move_every]:
            del self._moved[addr]

    def forget(self, address: str) -> None:
        self._until.pop(address, None)
        self._moved.pop(address, None)
