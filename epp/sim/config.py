"""Knobs of the simulated model server: the engine's performance model and the fault injectors.

Default performance figures are shaped like Llama-3.1-8B-Instruct (bf16) served by vLLM on one
H100-80GB, derived from public hardware and model facts (orders of magnitude, not measurements):

- Weights are ~16 GB; reading them once per step at ~3.35 TB/s HBM bandwidth costs ~4.8 ms, plus
  kernel-launch/scheduler overhead: `step_base_ms` = 6 ms for any non-empty step.
- A token's KV for this model is 2 (K,V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB;
  decode attention reads it once per step: 128 KiB / 3.35 TB/s ~ 40 ns per context token
  (`attn_ms_per_kv_token` = 0.00004).
- Per running sequence a decode step adds sampling/bookkeeping and small GEMM growth:
  `decode_ms_per_seq` = 0.05 ms (a 64-request batch at 2k context steps in ~14 ms).
- Prefill is compute bound: ~2 x 8e9 FLOP per token at ~330 TFLOP/s effective is ~0.05 ms/token
  (~20k prompt tokens/s): `prefill_ms_per_token` = 0.05.
- KV cache: `block_size` 16 tokens, `num_gpu_blocks` 31250 (500k tokens; what the public vLLM
  pages and the reference picker's default prefix-LRU size assume for this setup).
- vLLM scheduler limits: `max_num_seqs` 256, `max_num_batched_tokens` 8192 (chunked prefill).
- LoRA: `max_loras` 4 adapters in one batch; loading an adapter not resident on the GPU costs
  `lora_load_ms` 25 ms (CPU -> GPU copy of a rank-16 adapter plus bookkeeping).

All durations are *simulated* seconds/milliseconds. A live server maps them to wall time with its
time scale (wall = simulated x time_scale); the discrete-event mode never sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass(slots=True)
class EngineConfig:
    """The engine's capacity and speed. See the module docstring for where the defaults come from."""

    model: str = DEFAULT_MODEL  # base model name served
    loras: tuple[str, ...] = ()  # adapter names this server can serve (its /v1/models list)
    max_loras: int = 4  # distinct adapters allowed in one batch (GPU LoRA slots)
    lora_load_ms: float = 25.0  # added to the step that first runs a non-resident adapter
    block_size: int = 16  # tokens per KV block
    num_gpu_blocks: int = 31250  # KV blocks on the device
    max_num_seqs: int = 256  # running batch size limit
    max_num_batched_tokens: int = 8192  # tokens computed per step (prefill chunks + decodes)
    max_model_len: int = 32768  # prompt + output limit; longer prompts are rejected (400)
    step_base_ms: float = 6.0  # fixed cost of a non-empty step
    decode_ms_per_seq: float = 0.05  # per decoding sequence in the step
    attn_ms_per_kv_token: float = 0.00004  # per context token of decoding sequences
    prefill_ms_per_token: float = 0.05  # per prompt token computed (cache misses only)
    default_max_tokens: int = 64  # output length when the request gives no max_tokens
    max_tokens_cap: int = 4096  # output length never exceeds this
    chars_per_token: int = 4  # tokens = ceil(characters / 4); no tokenizer needed

    def validate(self) -> None:
        """Raise ValueError on a configuration the engine cannot run."""
        positive = ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens",
                    "max_model_len", "chars_per_token", "max_tokens_cap", "default_max_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_loras < 0:
            raise ValueError("max_loras must be >= 0")
        for name in ("lora_load_ms", "step_base_ms", "decode_ms_per_seq", "attn_ms_per_kv_token",
                     "prefill_ms_per_token"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.step_base_ms + self.decode_ms_per_seq + self.prefill_ms_per_token <= 0:
            raise ValueError("a step must take some time (step_base_ms, decode or prefill cost > 0)")


@dataclass(slots=True)
class Faults:
    """Failure injection for a live server; mutable at run time (in-process or POST /sim/faults)."""

    error_rate: float = 0.0  # fraction of inference requests answered with `error_status`
    error_status: int = 500
    extra_latency_ms: float = 0.0  # simulated ms added before an inference request is queued
    die_after_chunks: int = -1  # >= 0: drop the connection after that many SSE chunks (non-stream: at once)
    unhealthy: bool = False  # /health answers 503
    fail_models: tuple[str, ...] = field(default=())  # models whose requests always fail
    render_delay_ms: float = 0.0  # wall-clock ms before a /render endpoint answers (a slow tokenizer)

    def update(self, changes: dict[str, object]) -> None:
        """Apply a JSON object of changes atomically; a bad key or value raises ValueError."""
        values: dict[str, object] = {}
        for key, value in changes.items():
            if key not in Faults.__dataclass_fields__:
                raise ValueError(f"unknown fault knob {key!r}")
            current = getattr(self, key)
            if isinstance(current, tuple):
                if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{key} must be a list of strings")
                value = tuple(value)
            elif isinstance(current, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be a boolean")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number")
            else:
                value = type(current)(value)
            values[key] = value
        rate = values.get("error_rate", self.error_rate)
        if not isinstance(rate, float) or not 0.0 <= rate <= 1.0:
            raise ValueError("error_rate must be within 0..1")
        for key, value in values.items():
            setattr(self, key, value)
