"""The engine model: continuous batching over a prefix-cached KV pool, in caller-supplied time.

One `Engine` is one model server. It never reads a clock and never sleeps: a driver calls
`begin_step(now)`, which picks the batch and returns how long the step takes, then calls
`end_step(now + duration)`, which applies the step (tokens computed, one sampled per sequence that
caught up, finished sequences released). The live server drives it with asyncio sleeps scaled by its
time scale; the discrete-event cluster drives it from an event queue. Both see identical behaviour.

Scheduling follows vLLM's v1 scheduler in outline:
- running sequences first, in admission order: each gets its remaining tokens (prefill chunk or one
  decode token) within the step's token budget; when KV blocks run out the most recently admitted
  running sequence is preempted (blocks freed, recomputed later; cached prefix blocks survive);
- then waiting sequences in arrival order while the batch has room, the token budget lasts and KV
  blocks fit; a sequence whose adapter would exceed `max_loras` distinct adapters is skipped (later
  ones may go first); a sequence that does not fit in KV stops admission (first come, first served);
  no admission in a step that preempted;
- prefix caching: a new sequence reuses cached full blocks of its prompt (matching stops at the first
  miss and leaves at least one token to compute); its own full prompt blocks are registered as they
  are computed.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from epp.sim.config import EngineConfig
from epp.sim.kvcache import BlockPool
from epp.sim.tokens import block_hashes, count_tokens, token_ids

WAITING, RUNNING, DONE = 0, 1, 2

# Bucket bounds of vLLM's latency histograms (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


class SimError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error type to answer with."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


@dataclass(slots=True)
class Histogram:
    """Cumulative-bucket histogram (counts per upper bound, plus +Inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le label, cumulative count) pairs, ending with +Inf."""
        out, acc = [], 0
        for bound, c in zip((*self.bounds, math.inf), self.counts, strict=True):
            acc += c
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), acc))
        return out


@dataclass(slots=True)
class EngineStats:
    """Counters and histograms exported on /metrics (simulated seconds)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    steps: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


@dataclass(slots=True, eq=False)
class Seq:
    """One request inside the engine. Times are in the driver's (simulated) seconds."""

    request_id: str
    adapter: str | None  # None: the base model
    prompt_tokens: int
    max_output: int
    hashes: list[int]  # chained hashes of the prompt's full blocks
    arrival: float
    notify: Callable[[Seq], None] | None = None  # called after each sampled token and on abort
    tag: Any = None  # the driver's own data
    state: int = WAITING
    num_computed: int = 0  # tokens whose KV is computed
    generated: int = 0
    blocks: list[int] = field(default_factory=list)
    hashed: int = 0  # prompt blocks already registered in the prefix cache
    cached_tokens: int = 0  # prefix-cache hit tokens at first admission
    scheduled: float | None = None  # first admission into the batch
    first_token: float | None = None
    finished: float | None = None
    finish_reason: str = ""  # "length" or "abort"
    preemptions: int = 0
    token_ids: list[int] | None = None  # the prompt's ids, kept only while KV events are published
    remote_tokens: int = 0  # P/D decode: prompt tokens whose KV came from a prefill pod (epp.sim.pd)

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV the next sampled token needs: prompt plus output so far."""
        return self.prompt_tokens + self.generated


class Engine:
    """One simulated model server's engine (see module docstring)."""

    def __init__(self, cfg: EngineConfig | None = None) -> None:
        self.cfg = cfg = cfg or EngineConfig()
        cfg.validate()
        self.kv = BlockPool(cfg.num_gpu_blocks, cfg.block_size)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.stats = EngineStats()
        self.adapters: dict[str, None] = dict.fromkeys(cfg.loras)  # servable adapters, in order
        self._resident: OrderedDict[str, None] = OrderedDict()  # adapters on the GPU, LRU first
        self._run_adapters: dict[str, int] = {}  # adapter -> running sequences
        self._wait_adapters: dict[str, int] = {}  # adapter -> waiting sequences
        self._plan: list[tuple[Seq, int]] | None = None
        self.lora_loads = 0
        # KV-event recorder (epp.sim.kvevents.KVEventRecorder), None unless events are published
        self.kv_events: Any = None

    # ---- requests ------------------------------------------------------------------------
    def resolve_model(self, model: str) -> str | None:
        """The adapter for a request's `model` (None = base model); SimError 404 if not served."""
        if model == self.cfg.model or model == "":
            return None
        if model in self.adapters:
            return model
        raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError")

    def new_seq(self, request_id: str, prompt: str, max_tokens: int | None, model: str, now: float,
                notify: Callable[[Seq], None] | None = None, tag: Any = None) -> Seq:
        """Build a sequence for `prompt` (not yet queued); SimError when it cannot be served."""
        cfg = self.cfg
        adapter = self.resolve_model(model)
        if adapter is not None and cfg.max_loras < 1:
            raise SimError(400, "LoRA is not enabled on this server (max_loras = 0)")
        n_prompt = count_tokens(prompt, cfg.chars_per_token)
        if n_prompt < 1:
            raise SimError(400, "prompt must not be empty")
        if max_tokens is None:
            n_out = min(cfg.default_max_tokens, cfg.max_tokens_cap, cfg.max_model_len - n_prompt)
        else:
            if max_tokens < 1:
                raise SimError(400, f"max_tokens must be at least 1, got {max_tokens}.")
            n_out = min(max_tokens, cfg.max_tokens_cap)
        if n_out < 1 or n_prompt + n_out > cfg.max_model_len:
            raise SimError(400, f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
                                f"you requested {n_prompt + max(n_out, 1)} tokens ({n_prompt} in the messages, "
                                f"{max(n_out, 1)} in the completion).")
        if -(-(n_prompt + n_out) // cfg.block_size) > cfg.num_gpu_blocks:
            raise SimError(400, f"request needs more KV blocks than the server has ({cfg.num_gpu_blocks})")
        hashes = block_hashes(prompt, cfg.block_size, model or cfg.model, cfg.chars_per_token)
        seq = Seq(request_id, adapter, n_prompt, n_out, hashes, now, notify, tag)
        if self.kv_events is not None:
            seq.token_ids = token_ids(prompt)
        return seq

    def add(self, seq: Seq) -> None:
        """Queue a sequence; it is considered from the next step on."""
        seq.state = WAITING
        self.waiting.append(seq)
        if seq.adapter is not None:
            self._wait_adapters[seq.adapter] = self._wait_adapters.get(seq.adapter, 0) + 1

    def abort(self, seq: Seq, now: float) -> None:
        """Drop a sequence (client went away); frees its KV. No-op when already done."""
        if seq.state == DONE:
            return
        if seq.state == WAITING:
            self.waiting.remove(seq)
            _dec(self._wait_adapters, seq.adapter)
        else:
            self.running.remove(seq)
            _dec(self._run_adapters, seq.adapter)
            self.kv.release(seq.blocks)
            seq.blocks = []
        seq.state = DONE
        seq.finished = now
        seq.finish_reason = "abort"
        self.stats.finished["abort"] = self.stats.finished.get("abort", 0) + 1
        if seq.notify is not None:
            seq.notify(seq)

    # ---- state ---------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def stepping(self) -> bool:
        """A step has begun and not ended."""
        return self._plan is not None

    def running_adapters(self) -> list[str]:
        return sorted(self._run_adapters)

    def waiting_adapters(self) -> list[str]:
        return sorted(self._wait_adapters)

    def resident_adapters(self) -> list[str]:
        return list(self._resident)

    # ---- the step ------------------------------------------------------------------------
    def begin_step(self, now: float) -> float | None:
        """Choose this step's batch at `now`; return its duration in seconds (None: nothing to do)."""
        if self._plan is not None:
            raise RuntimeError("begin_step called twice without end_step")
        cfg = self.cfg
        bs = cfg.block_size
        kv = self.kv
        running = self.running
        plan: list[tuple[Seq, int]] = []
        budget = cfg.max_num_batched_tokens
        prefill = decodes = context = loads = 0
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            computed = seq.num_computed
            n = seq.prompt_tokens + seq.generated - computed
            if n > budget:
                n = budget
            if computed + n > len(seq.blocks) * bs:  # this step spills into new blocks
                need = -(-(computed + n) // bs) - len(seq.blocks)
                while need > kv.free_count:
                    victim = running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if seq.state != RUNNING:
                    break  # it preempted itself: it was the last one
                seq.blocks.extend(kv.allocate(need))
            plan.append((seq, n))
            budget -= n
            if n == 1 and seq.generated > 0:
                decodes += 1
                context += computed
            else:
                prefill += n
            i += 1
        if not preempted or not plan:  # (an empty batch must admit, or the engine would stall)
            skipped: list[Seq] = []
            waiting = self.waiting
            max_loras = cfg.max_loras
            while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
                seq = waiting.popleft()
                adapter = seq.adapter
                if adapter is not None and adapter not in self._run_adapters \
                        and len(self._run_adapters) >= max_loras:
                    skipped.append(seq)
                    continue
                limit = (seq.num_tokens - 1) // bs
                hits, free_hits = kv.match(seq.hashes, limit) if limit else ([], 0)
                hit_tokens = len(hits) * bs
                # P/D: blocks transferred from a prefill pod are present without computing them
                # (the first admission only; a preempted sequence recomputes, as vLLM does)
                present = hit_tokens
                if seq.remote_tokens and seq.scheduled is None:
                    present = max(hit_tokens, min(seq.remote_tokens // bs, limit) * bs)
                n = min(seq.num_tokens - present, budget)
                need = -(-(present + n) // bs) - len(hits)
                if need > kv.free_count - free_hits:
                    waiting.appendleft(seq)
                    break
                kv.take(hits)
                seq.hashed = len(hits)
                hits.extend(kv.allocate(need))
                seq.blocks = hits
                seq.num_computed = present
                seq.state = RUNNING
                self.stats.prefix_queries += seq.num_tokens
                self.stats.prefix_hits += hit_tokens
                if seq.scheduled is None:
                    seq.scheduled = now
                    seq.cached_tokens = hit_tokens
                    self.stats.queue.observe(now - seq.arrival)
                if adapter is not None:
                    _dec(self._wait_adapters, adapter)
                    self._run_adapters[adapter] = self._run_adapters.get(adapter, 0) + 1
                    if adapter in self._resident:
                        self._resident.move_to_end(adapter)
                    else:
                        loads += 1
                        self.lora_loads += 1
                        self._resident[adapter] = None
                        while len(self._resident) > max_loras:
                            # evict the least recently used adapter not in the batch
                            old = next((a for a in self._resident if a not in self._run_adapters), None)
                            if old is None:
                                break
                            del self._resident[old]
                running.append(seq)
                plan.append((seq, n))
                budget -= n
                prefill += n
            for seq in reversed(skipped):
                waiting.appendleft(seq)
        if not plan:
            return None
        self._plan = plan
        self.stats.steps += 1
        ms = (cfg.step_base_ms + cfg.decode_ms_per_seq * decodes + cfg.attn_ms_per_kv_token * context
              + cfg.prefill_ms_per_token * prefill + cfg.lora_load_ms * loads)
        return ms / 1000.0

    def end_step(self, now: float) -> list[Seq]:
        """Apply the step that ends at `now`; return the sequences that finished in it."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("end_step without begin_step")
        self._plan = None
        bs = self.cfg.block_size
        kv = self.kv
        stats = self.stats
        done: list[Seq] = []
        for seq, n in plan:
            if seq.state != RUNNING:
                continue  # aborted during the step
            computed = seq.num_computed = seq.num_computed + n
            if seq.hashed < len(seq.hashes):  # prompt blocks left to register once computed
                hashes, blocks = seq.hashes, seq.blocks
                full = min(computed // bs, len(hashes))
                rec = self.kv_events
                for k in range(seq.hashed, full):
                    if kv.register(blocks[k], hashes[k]) and rec is not None:
                        rec.stored(seq, k)
                if full > seq.hashed:
                    seq.hashed = full
            if computed < seq.prompt_tokens + seq.generated:
                continue  # a prefill chunk: no token sampled yet
            seq.generated += 1
            stats.generation_tokens += 1
            if seq.first_token is None:
                seq.first_token = now
                stats.ttft.observe(now - seq.arrival)
                stats.prompt_tokens += seq.prompt_tokens
            if seq.generated >= seq.max_output:
                seq.state = DONE
                seq.finished = now
                seq.finish_reason = "length"
                kv.release(seq.blocks)
                seq.blocks = []
                _dec(self._run_adapters, seq.adapter)
                stats.e2e.observe(now - seq.arrival)
                stats.finished["length"] = stats.finished.get("length", 0) + 1
                done.append(seq)
            if seq.notify is not None:
                seq.notify(seq)
        if done:
            self.running = [s for s in self.running if s.state == RUNNING]
        if self.kv_events is not None:  # one message per step, as vLLM publishes
            self.kv_events.flush(now)
        return done

    def _preempt(self, seq: Seq) -> None:
        """Free a running sequence's KV and put it back at the head of the queue (recompute)."""
        self.running.remove(seq)
        self.kv.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.hashed = 0
        seq.state = WAITING
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)
        if seq.adapter is not None:
            _dec(self._run_adapters, seq.adapter)
            self._wait_adapters[seq.adapter] = self._wait_adapters.get(seq.adapter, 0) + 1


def _dec(counts: dict[str, int], key: str | None) -> None:
    if key is None:
        return
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]

