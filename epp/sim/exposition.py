"""An engine's state as a Prometheus /metrics page with vLLM's (or SGLang's) metric names.

Rendering goes through prometheus_client, the library vLLM and SGLang serve their pages with, so the
text format and the `?name[]=` filter behave the same: the filter keeps only *samples* whose name is
listed (a gauge's sample name is the family name; a counter's is `<name>_total`; a histogram's are
`<name>_bucket`, `_sum`, `_count`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from epp.sim.engine import Engine, Histogram

ENGINE_KINDS = ("vllm", "sglang")


def _histogram(name: str, doc: str, labels: dict[str, str], h: Histogram | None) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    if h is not None:
        fam.add_metric(list(labels.values()), [(le, float(c)) for le, c in h.cumulative()], h.total)
    return fam


def _gauge(name: str, doc: str, labels: dict[str, str], value: float | None) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=list(labels))
    if value is not None:
        fam.add_metric(list(labels.values()), value)
    return fam


def _counter(name: str, doc: str, labels: dict[str, str], value: float | None) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=list(labels))
    if value is not None:
        fam.add_metric(list(labels.values()), value)
    return fam


def vllm_families(engine: Engine, now: float, full: bool = True) -> list[Metric]:
    """vLLM v1 metric families for `engine`; `now` stamps lora_requests_info. full=False: no samples."""
    cfg, st = engine.cfg, engine.stats
    lab = {"engine": "0", "model_name": cfg.model}

    def v(x: float) -> float | None:
        return x if full else None

    cache_labels = {"block_size": str(cfg.block_size), "cache_dtype": "auto", "enable_prefix_caching": "True",
                    "gpu_memory_utilization": "0.9", "num_cpu_blocks": "None",
                    "num_gpu_blocks": str(cfg.num_gpu_blocks)}
    fams: list[Metric] = [
        _gauge("vllm:num_requests_running", "Number of requests in model execution batches.", lab,
               v(len(engine.running))),
        _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lab,
               v(len(engine.waiting))),
        _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lab,
               v(engine.kv.usage)),
        _gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", cache_labels, v(1.0)),
    ]
    if cfg.loras or engine.adapters:
        lora_labels = {"max_lora": str(cfg.max_loras),
                       "running_lora_adapters": ",".join(engine.running_adapters()),
                       "waiting_lora_adapters": ",".join(engine.waiting_adapters())}
        fams.append(_gauge("vllm:lora_requests_info", "Running stats on lora requests.", lora_labels, v(now)))
    fams += [
        _counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                 lab, v(st.prefix_queries)),
        _counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                 lab, v(st.prefix_hits)),
        _counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab, v(st.prompt_tokens)),
        _counter("vllm:generation_tokens", "Number of generation tokens processed.", lab,
                 v(st.generation_tokens)),
        _counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", lab,
                 v(st.preemptions)),
    ]
    success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                  labels=[*lab, "finished_reason"])
    if full:
        for reason in ("stop", "length", "abort"):
            success.add_metric([*lab.values(), reason], st.finished.get(reason, 0))
    fams.append(success)
    fams += [
        _histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", lab,
                   st.ttft if full else None),
        _histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", lab,
                   st.e2e if full else None),
        _histogram("vllm:request_queue_time_seconds",
                   "Histogram of time spent in WAITING phase for request.", lab, st.queue if full else None),
    ]
    return fams


def sglang_families(engine: Engine, now: float, full: bool = True) -> list[Metric]:
    """SGLang-named metric families for `engine` (no LoRA info: SGLang exports none)."""
    cfg, st = engine.cfg, engine.stats
    lab = {"model_name": cfg.model}

    def v(x: float) -> float | None:
        return x if full else None

    hit_rate = st.prefix_hits / st.prefix_queries if st.prefix_queries else 0.0
    used_tokens = engine.kv.used_count * cfg.block_size
    return [
        _gauge("sglang:num_running_reqs", "The number of running requests.", lab, v(len(engine.running))),
        _gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", lab,
               v(len(engine.waiting))),
        _gauge("sglang:token_usage", "The token usage.", lab, v(engine.kv.usage)),
        _gauge("sglang:num_used_tokens", "The number of used tokens.", lab, v(used_tokens)),
        _gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", lab, v(hit_rate)),
        _gauge("sglang:cache_config_info", "Information of the KV cache configuration.",
               {"page_size": str(cfg.block_size), "num_pages": str(cfg.num_gpu_blocks)}, v(1.0)),
        _counter("sglang:prompt_tokens", "Number of prefill tokens processed.", lab, v(st.prompt_tokens)),
        _counter("sglang:generation_tokens", "Number of generation tokens processed.", lab,
                 v(st.generation_tokens)),
        _histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", lab,
                   st.ttft if full else None),
        _histogram("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
                   lab, st.e2e if full else None),
    ]


class EngineCollector:
    """A prometheus_client collector reading an engine at scrape time."""

    def __init__(self, engine: Engine, kind: str = "vllm", clock: Callable[[], float] | None = None) -> None:
        if kind not in ENGINE_KINDS:
            raise ValueError(f"engine kind must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
        self.engine = engine
        self._families = vllm_families if kind == "vllm" else sglang_families
        self._clock = clock or (lambda: 0.0)

    def describe(self) -> Iterator[Metric]:
        # lets the registry index sample names, which the ?name[]= filter relies on
        return iter(self._families(self.engine, 0.0, full=False))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.engine, self._clock(), full=True))


def make_registry(engine: Engine, kind: str = "vllm", clock: Callable[[], float] | None = None
                  ) -> CollectorRegistry:
    """A registry holding only the engine's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, kind, clock))
    return registry


def render(registry: CollectorRegistry, names: Sequence[str] | Iterable[str] | None = None) -> bytes:
    """The text page; with `names`, only samples with those names (prometheus_client's `name[]`)."""
    if names is not None:
        return generate_latest(registry.restricted_registry(list(names)))
    return generate_latest(registry)
