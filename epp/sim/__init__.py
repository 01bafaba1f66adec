"""A simulated LLM model server (vLLM- or SGLang-shaped), live over HTTP or in virtual time.

One engine model (`epp.sim.engine.Engine`) is shared by both modes: continuous batching (max
`max_num_seqs`, a per-step token budget with chunked prefill), a KV cache of `num_gpu_blocks` blocks of
`block_size` tokens with prefix caching (chained block hashes, LRU eviction of unreferenced blocks,
preemption by recompute when blocks run out), LoRA adapters limited to `max_loras` per batch with a
load delay, and a step time that grows with prefill tokens, batch size and context. Tokens are
characters / 4 (no tokenizer). Defaults look like Llama-3.1-8B on one H100; `epp.sim.config` says why.
All reported times are *simulated* seconds.

Live server (used by end-to-end tests and `make demo`)
------------------------------------------------------
Command line::

    python -m epp.sim --port 8000 [--count N] [--name NAME] [--model M] [--lora a,b] [--max-loras 4]
        [--time-scale 0.01] [--engine vllm|sglang] [--max-num-seqs 256] [--num-gpu-blocks 31250]
        [--block-size 16] [--prefill-ms-per-token 0.05] [--step-base-ms 6] [--decode-ms-per-seq 0.05]
        [--error-rate 0.1] [--extra-latency-ms 50] [--die-after-chunks 3] [--unhealthy] [--seed 0]

prints ``SIM READY name=<name> url=http://host:port`` per server once listening (port 0: the OS picks;
with ``--count N`` the servers use consecutive ports and are named ``<name or sim>-<i>``).

In process::

    from epp.sim import SimServer, SimServerConfig, EngineConfig, Faults
    async with SimServer(SimServerConfig(name="pod-a", time_scale=0.01,
                                         engine=EngineConfig(loras=("sql-lora",)))) as sim:
        sim.url, sim.address          # "http://127.0.0.1:PORT", "127.0.0.1:PORT"
        sim.served                    # deque[ServedRecord]: request_id, model, time, status, outcome,
                                      #   prompt/cached/completion tokens, ttft/e2e/queue (simulated s)
        sim.served_ids()              # request ids in arrival order
        sim.faults.error_rate = 0.5   # knobs apply to the next request (see Faults)
        await sim.refuse_connections(True)   # stop listening (connection refused) ... False: resume
        sim.engine                    # the Engine (waiting, running, kv, stats)

`serve_many([cfg, ...])` starts several. HTTP surface (vLLM's): ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream``, ``stream_options.include_usage``, ``max_tokens`` /
``max_completion_tokens``; usage includes ``prompt_tokens_details.cached_tokens``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (``?name[]=`` filter as prometheus_client applies it: by sample name),
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` ``{"lora_name": ...}``. Simulator extras:
``GET /sim/served[?since=N]`` (JSON ``{server, total, served: [record...]}``), ``DELETE /sim/served``,
``GET /sim/state``, ``GET|POST /sim/faults`` (JSON of `Faults` fields), ``POST /sim/refuse
{"seconds": S}``. Every response has header ``x-sim-server: <name>`` and echoes ``x-request-id``; the
``id`` of a completion is ``cmpl-<x-request-id>`` (chat: ``chatcmpl-``). Unknown models get 404,
over-long prompts 400, as vLLM answers.

Metrics (vLLM names): ``vllm:num_requests_waiting``, ``vllm:num_requests_running``,
``vllm:kv_cache_usage_perc``, ``vllm:cache_config_info{block_size,num_gpu_blocks,...}`` (1),
``vllm:lora_requests_info{max_lora,running_lora_adapters,waiting_lora_adapters}`` (value: Unix time;
present when the server has adapters), ``vllm:prefix_cache_{queries,hits}_total``,
``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:num_preemptions_total``,
``vllm:request_success_total{finished_reason}``, histograms ``vllm:time_to_first_token_seconds``,
``vllm:e2e_request_latency_seconds``, ``vllm:request_queue_time_seconds``. With ``--engine sglang``:
``sglang:num_queue_reqs``, ``sglang:num_running_reqs``, ``sglang:token_usage``,
``sglang:cache_config_info{page_size,num_pages}``, token counters and the two latency histograms.

Time scale: wall seconds = simulated seconds x ``time_scale`` (0.01 runs 100x faster). The live
driver advances its simulated clock by exact step durations, so reported timings are the model's,
never wall-clock jitter.

Discrete-event mode (used by the routing-quality benchmark)
------------------------------------------------------------
::

    from epp.sim import Cluster, SimRequest, summarize, RoundRobin, RandomChoice, LeastRequest
    from epp.sim.workload import shared_prefix

    class MyPolicy:
        def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int: ...
        def on_complete(self, result: RequestResult) -> None: ...   # optional

    cluster = Cluster(8, MyPolicy(), engine=EngineConfig(), seed=1, poll_interval=0.05, poll_delay=0.0)
    cluster.submit(SimRequest("r1", "prompt text", max_tokens=64, model=""), at=0.0)
    results = cluster.run(shared_prefix(10_000, rate=200.0, seed=2))   # lazily read (time, request)
    summarize(results)   # ttft/e2e/queue mean & percentiles, prefix_hit_ratio, per_server, ...

`servers` is a count or a list of `EngineConfig` (heterogeneous pools). The policy (an object with
``choose``, or a bare callable) sees one `epp.datastore.Endpoint` per server: ``metrics`` is the last
polled `epp.datastore.Metrics` snapshot (waiting, running, kv_usage, block_size, num_blocks, lora_max,
lora_running, lora_waiting; ``updated`` in virtual seconds), polled every ``poll_interval`` at a seeded
per-server phase and visible ``poll_delay`` later (``poll_interval=None``: fresh at every decision);
``inflight``/``inflight_tokens`` are the router's own counts. Each `RequestResult` has server index and
name, arrival, scheduled, first_token, finished, ttft, e2e, queue_time, prompt/cached/output tokens,
preemptions, and ``error``/``status`` when the server refused the request. Every submitted request yields
exactly one result; a run is deterministic for a given seed, workload and policy. `SchedulerPolicy`
wraps one of the picker's `Scheduler`s.
"""

from epp.sim.config import DEFAULT_MODEL, EngineConfig, Faults
from epp.sim.des import Cluster, Policy, RequestResult, SimRequest, VirtualServer, summarize
from epp.sim.engine import Engine, EngineStats, Seq, SimError
from epp.sim.policies import LeastRequest, RandomChoice, RoundRobin, SchedulerPolicy
from epp.sim.server import ServedRecord, SimServer, SimServerConfig, serve_many

__all__ = [
    "DEFAULT_MODEL",
    "Cluster",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Faults",
    "LeastRequest",
    "Policy",
    "RandomChoice",
    "RequestResult",
    "RoundRobin",
    "SchedulerPolicy",
    "Seq",
    "ServedRecord",
    "SimError",
    "SimRequest",
    "SimServer",
    "SimServerConfig",
    "VirtualServer",
    "serve_many",
    "summarize",
]
