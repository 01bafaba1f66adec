"""/metrics pages shaped like each engine's (names from protocol.md §4), for tests."""

from __future__ import annotations

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def vllm(waiting: float = 2, running: float = 5, kv: float = 0.25, old_kv_name: bool = False,
         lora: bool = True, extra: str = "") -> str:
    kv_name = "vllm:gpu_cache_usage_perc" if old_kv_name else "vllm:kv_cache_usage_perc"
    lab = f'engine="0",model_name="{MODEL}"'
    out = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{lab}}} {running}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{lab}}} {waiting}",
        f"# HELP {kv_name} KV-cache usage. 1 means 100 percent usage.",
        f"# TYPE {kv_name} gauge",
        f"{kv_name}{{{lab}}} {kv}",
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
        'gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="31250"} 1.0',
    ]
    if lora:
        out += [
            "# HELP vllm:lora_requests_info Running stats on lora requests.",
            "# TYPE vllm:lora_requests_info gauge",
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora, food-review",'
            'waiting_lora_adapters="tweet"} 1.7e+09',
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.6e+09',
        ]
    out += [
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{lab}}} 12345.0",
    ]
    return "\n".join(out) + "\n" + extra


def sglang(waiting: float = 3, running: float = 7, usage: float = 0.5) -> str:
    lab = f'model_name="{MODEL}"'
    return "\n".join([
        "# HELP sglang:num_running_reqs The number of running requests.",
        "# TYPE sglang:num_running_reqs gauge",
        f"sglang:num_running_reqs{{{lab}}} {running}",
        "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.",
        "# TYPE sglang:num_queue_reqs gauge",
        f"sglang:num_queue_reqs{{{lab}}} {waiting}",
        "# HELP sglang:token_usage The token usage.",
        "# TYPE sglang:token_usage gauge",
        f"sglang:token_usage{{{lab}}} {usage}",
        "# HELP sglang:cache_config_info Cache configuration.",
        "# TYPE sglang:cache_config_info gauge",
        'sglang:cache_config_info{num_pages="8192",page_size="64"} 1.0',
        "# HELP sglang:gen_throughput The generation throughput (token/s).",
        "# TYPE sglang:gen_throughput gauge",
        f"sglang:gen_throughput{{{lab}}} 812.5",
    ]) + "\n"


def trtllm_serve(waiting: float = 1, running: float = 4, util: float = 0.75) -> str:
    return "\n".join([
        "# HELP trtllm_num_requests_waiting Waiting requests.",
        "# TYPE trtllm_num_requests_waiting gauge",
        f'trtllm_num_requests_waiting{{model_name="{MODEL}"}} {waiting}',
        "# TYPE trtllm_num_requests_running gauge",
        f'trtllm_num_requests_running{{model_name="{MODEL}"}} {running}',
        "# TYPE trtllm_kv_cache_utilization gauge",
        f'trtllm_kv_cache_utilization{{model_name="{MODEL}"}} {util}',
        "# TYPE trtllm_kv_cache_tokens_per_block gauge",
        f'trtllm_kv_cache_tokens_per_block{{model_name="{MODEL}"}} 32',
        "# TYPE trtllm_kv_cache_max_blocks gauge",
        f'trtllm_kv_cache_max_blocks{{model_name="{MODEL}"}} 4096',
    ]) + "\n"


def triton(waiting: float = 6, scheduled: float = 8, fraction: float = 0.125) -> str:
    req = "nv_trt_llm_request_metrics"
    kv = "nv_trt_llm_kv_cache_block_metrics"
    return "\n".join([
        "# HELP nv_inference_request_success Number of successful inference requests",
        "# TYPE nv_inference_request_success counter",
        'nv_inference_request_success{model="ensemble",version="1"} 100',
        f"# HELP {req} TRT LLM request metrics",
        f"# TYPE {req} gauge",
        f'{req}{{model="tensorrt_llm",request_type="context",version="1"}} 1',
        f'{req}{{model="tensorrt_llm",request_type="scheduled",version="1"}} {scheduled}',
        f'{req}{{model="tensorrt_llm",request_type="max",version="1"}} 512',
        f'{req}{{model="tensorrt_llm",request_type="active",version="1"}} 9',
        f'{req}{{model="tensorrt_llm",request_type="waiting",version="1"}} {waiting}',
        f"# HELP {kv} TRT LLM KV cache block metrics",
        f"# TYPE {kv} gauge",
        f'{kv}{{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"}} 64',
        f'{kv}{{kv_cache_block_type="used",model="tensorrt_llm",version="1"}} 100',
        f'{kv}{{kv_cache_block_type="free",model="tensorrt_llm",version="1"}} 700',
        f'{kv}{{kv_cache_block_type="max",model="tensorrt_llm",version="1"}} 800',
        f'{kv}{{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"}} {fraction}',
    ]) + "\n"


def vllm_lora_in_flight() -> str:
    """vLLM as it ships now: an adapter with requests in flight is listed as running AND waiting."""
    return vllm(lora=False) + "\n".join([
        "# HELP vllm:lora_requests_info Running stats on lora requests.",
        "# TYPE vllm:lora_requests_info gauge",
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql-lora",'
        'waiting_lora_adapters="sql-lora"} 1.75e+09',
    ]) + "\n"


def sglang_0511(total_waiting: float = 4, total_running: float = 6, usage: float = 0.375,
                priorities: bool = True) -> str:
    """SGLang >= 0.5.11: page size and page count as gauges (no cache_config_info); with priority
    scheduling each queue/running gauge has a `priority=""` total plus one series per priority."""
    base = f'engine_type="unified",model_name="{MODEL}",pp_rank="0",tp_rank="0"'

    def split(name: str, help_text: str, total: float) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        if priorities:
            out.append(f'{name}{{{base},priority=""}} {total}')
            high = total // 2
            out.append(f'{name}{{{base},priority="0"}} {total - high}')
            out.append(f'{name}{{{base},priority="10"}} {high}')
        else:
            out.append(f"{name}{{{base}}} {total}")
        return out

    return "\n".join([
        *split("sglang:num_running_reqs", "The number of running requests.", total_running),
        *split("sglang:num_queue_reqs", "The number of requests in the waiting queue.", total_waiting),
        "# HELP sglang:token_usage The token usage.",
        "# TYPE sglang:token_usage gauge",
        f"sglang:token_usage{{{base}}} {usage}",
        "# HELP sglang:page_size The page size of the KV cache.",
        "# TYPE sglang:page_size gauge",
        f"sglang:page_size{{{base}}} 32.0",
        "# HELP sglang:num_pages The number of pages of the KV cache.",
        "# TYPE sglang:num_pages gauge",
        f"sglang:num_pages{{{base}}} 16384.0",
        "# HELP sglang:cache_hit_rate The prefix cache hit rate.",
        "# TYPE sglang:cache_hit_rate gauge",
        f"sglang:cache_hit_rate{{{base}}} 0.42",
    ]) + "\n"


PAGES = {"vllm": vllm, "sglang": sglang, "trtllm-serve": trtllm_serve, "triton-tensorrt-llm": triton}
