"""The picker's own Prometheus metrics, under the reference's names, labels and buckets.

Request metrics are updated from the director's lifecycle events (routed / rejected / finished);
pool gauges are recomputed on their own interval from fresh scrapes only. Label children are
cached per label values so a request costs a handful of increments, not label lookups.

Every family GIE v1.5 exports is here under its `inference_objective_*`, `inference_pool_*` or
`inference_extension_*` name; llm-d v0.10 renames them `llm_d_epp_*` and still exports both, so
a collector renders the same values again under the llm-d names at scrape time (no second update
per request). Families the reference does not have are marked "ours" in docs/metrics.md.

Label values a client chooses (the model name in the body) are bounded (`LabelBound`): the names
the pool knows (InferenceModel names and targets, InferenceModelRewrite matches and targets,
models and LoRA adapters the pods report) keep their value; any other name becomes `other` once
the pool knows at least one name, and while it knows none, at most 1000 distinct names are kept
(llm-d's cap) before the rest become `other`. Values longer than 128 characters become `other`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.values import MutexValue

from epp import __version__
from epp.datastore import Datastore, Endpoint
from epp.director import Rejected, RequestContext
from epp.scheduling.disagg import DISAGG_DECISION
from epp.scheduling.prefix import PREFIX_HIT_BYTES, PREFIX_HIT_RATIO

log = logging.getLogger("epp.telemetry")

# The reference (Go client) has no `_created` series: one line less per series, as the reference renders.
disable_created_metrics()

# Buckets as the reference declares them (pkg/epp/metrics/metrics.go, GIE v1.5.0)
_LATENCY_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45,
                    60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_TPOT_BUCKETS = (0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6,
                 0.8, 1, 1.5, 2, 3, 4.5, 6, 12, 18, 24, 30, 36, 48, 60, 90, 120, 180, 270, 360)
_REQUEST_SIZE_BUCKETS = (*(float(64 << i) for i in range(11)), *(float(131072 << i) for i in range(14)))  # 64 B..1 GiB
_RESPONSE_SIZE_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536)
_INPUT_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072,
                        262144, 524288, 1048576)
_OUTPUT_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_NTPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_SCHED_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_HIT_BYTES_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
# ours: the picker's own added latency needs finer steps than the scheduler's
_FAST_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.05, 0.1, 0.2)

MODEL_LABELS = ("model_name", "target_model_name")
OTHER = "other"
MAX_LABEL_VALUES = 1000  # llm-d's cap on distinct model names
MAX_LABEL_LENGTH = 128

# SLO headers (llm-d names first, then the older ones), milliseconds
_SLO_TTFT_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
_SLO_TPOT_HEADERS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")


class LabelBound:
    """Bounds the values one client-influenced label takes.

    Pinned values (names the pool knows) always keep their value and never count against the
    cap. Other values: with `strict` set they are `other`; otherwise the first `cap` distinct
    ones keep their value. A value once kept stays kept, so paired updates (a running gauge's
    inc and dec) land on the same series. Values over `max_length` characters are `other`
    unless pinned (then cut to `max_length`).
    """

    __slots__ = ("_full_logged", "cap", "max_length", "pinned", "seen", "strict")

    def __init__(self, cap: int = MAX_LABEL_VALUES, max_length: int = MAX_LABEL_LENGTH) -> None:
        self.cap = cap
        self.max_length = max_length
        self.pinned: set[str] = set()
        self.seen: set[str] = set()
        self.strict = False
        self._full_logged = False

    def pin(self, values: Iterable[str]) -> None:
        """Values that always keep their label, in order of trust, up to `cap` of them (pods report
        adapter names too, and a broken server must not grow the page); a non-empty pin set makes
        unknown values `other`."""
        pinned = self.pinned
        for v in values:
            if v and v not in pinned:
                if len(pinned) >= self.cap:
                    if not self._full_logged:
                        self._full_logged = True
                        log.warning("more known model names than the label cap; the rest are 'other'",
                                    extra={"cap": self.cap})
                    break
                pinned.add(v)
        self.strict = bool(pinned)

    def __call__(self, value: str) -> str:
        if not value or value in self.seen:
            return value
        if value in self.pinned:
            if len(value) > self.max_length:
                return value[: self.max_length]
            return value
        if self.strict or len(self.seen) >= self.cap or len(value) > self.max_length:
            return OTHER
        self.seen.add(value)
        return value


def known_models(ds: Datastore) -> list[str]:
    """Every model name the pool knows, the operator's first: InferenceModel names and targets,
    InferenceModelRewrite matches and targets, then the base models and LoRA adapters its pods
    report. In a stable order (so a cap keeps the same names from one refresh to the next)."""
    table = ds.models
    names: dict[str, None] = dict.fromkeys(table.models)
    for m in table.models.values():
        names.update(dict.fromkeys(t.name for t in m.targets))
    for match, (_, targets) in table.exact.items():
        names[match] = None
        names.update(dict.fromkeys(t.name for t in targets))
    if table.generic is not None:
        names.update(dict.fromkeys(t.name for t in table.generic[1]))
    reported: set[str] = set()
    for ep in ds.endpoints.values():
        scraped = ep.metrics
        if scraped is not None:
            reported |= scraped.models | scraped.lora_running | scraped.lora_waiting
    names.update(dict.fromkeys(sorted(reported - names.keys())))
    return list(names)


def _slo_ms(headers: Mapping[str, str], names: tuple[str, ...]) -> float | None:
    for name in names:
        raw = headers.get(name)
        if raw:
            try:
                value = float(raw)
            except ValueError:
                return None
            return value / 1000 if value > 0 and value == value and value != float("inf") else None
    return None


def _pod_labels(ep: Endpoint) -> tuple[str, str, str]:
    """pod_name, namespace, port of an endpoint (a static endpoint has no namespace)."""
    namespace, sep, name = ep.pod.rpartition("/")
    return (name, namespace, str(ep.port)) if sep else (ep.pod, "", str(ep.port))


Observe = Callable[[float], None]
Add = Callable[[float], None]


def _plain(*values: Any) -> bool:
    """Whether these are prometheus_client's in-process values (a float beside a lock), which the
    fast paths below may add to without the lock. Why that is safe: request metrics have one
    writer, the serving loop (each --workers process has its own), and a reader on the /metrics
    thread sees a whole float either way. The lock's `with` costs ~3,000 instructions an update,
    and a routed request makes ~17 updates: 8% of the picker's instructions a request
    (bench/picker_instructions.py). Any other value class (the multiprocess mode's files) keeps
    its own `inc`."""
    return all(type(v) is MutexValue for v in values)


def fast_inc(child: Any) -> Add:
    """`child.inc` of a Counter or Gauge child without its per-call checks and lock (see `_plain`);
    a Counter's amount must be non-negative, as `inc` would insist."""
    value: Any = getattr(child, "_value", None)
    if not _plain(value):
        return child.inc  # type: ignore[no-any-return]

    def inc(amount: float = 1.0) -> None:
        value._value += amount

    return inc


def fast_observe(child: Any) -> Observe:
    """`child.observe` without its per-call checks, lock (see `_plain`) and linear walk over up to
    36 buckets: a bisect into the child's bucket values (prometheus_client's Histogram layout:
    `_upper_bounds`, `_buckets`, `_sum`). Falls back to `observe` when the layout is not that one."""
    try:
        bounds, buckets, total = list(child._upper_bounds), child._buckets, child._sum
    except AttributeError:
        return child.observe  # type: ignore[no-any-return]
    if len(bounds) != len(buckets):
        return child.observe  # type: ignore[no-any-return]
    if _plain(total, *buckets):
        def observe_plain(value: float) -> None:
            total._value += value
            i = bisect_left(bounds, value)
            if i < len(buckets):  # NaN matches no bucket, as in observe()
                buckets[i]._value += 1.0

        return observe_plain

    def observe(value: float) -> None:
        total.inc(value)
        i = bisect_left(bounds, value)
        if i < len(buckets):
            buckets[i].inc(1)

    return observe


@dataclass(slots=True)
class _Children:
    duration: Observe
    req_size: Observe
    resp_size: Observe
    in_tokens: Observe
    out_tokens: Observe
    cached_tokens: Observe
    ntpot: Observe
    ttft: Observe
    tpot: Observe
    first_byte: Observe
    ttft_last: Any  # gauge children of inference_request_metric
    tpot_last: Any
    running: Add  # the running-requests gauge child's inc (-1 to decrement)


# llm-d v0.10 names for the same values: family -> (llm-d family, label renames)
LLMD_NAMES: dict[str, tuple[str, Mapping[str, str]]] = {
    "inference_objective_request": ("llm_d_epp_request", {}),
    "inference_objective_request_error": ("llm_d_epp_request_error", {}),
    "inference_objective_request_duration_seconds": ("llm_d_epp_request_duration_seconds", {}),
    "inference_objective_request_sizes": ("llm_d_epp_request_size_bytes", {}),
    "inference_objective_response_sizes": ("llm_d_epp_response_size_bytes", {}),
    "inference_objective_input_tokens": ("llm_d_epp_request_input_tokens", {}),
    "inference_objective_output_tokens": ("llm_d_epp_request_output_tokens", {}),
    "inference_objective_prompt_cached_tokens": ("llm_d_epp_request_cached_tokens", {}),
    "inference_objective_running_requests": ("llm_d_epp_request_running", {}),
    "inference_objective_normalized_time_per_output_token_seconds": ("llm_d_epp_request_ntpot_seconds", {}),
    "inference_objective_request_ttft_seconds": ("llm_d_epp_request_ttft_seconds", {}),
    "inference_objective_request_tpot_seconds": ("llm_d_epp_request_streaming_tpot_seconds", {}),
    "inference_pool_average_kv_cache_utilization": ("llm_d_epp_average_kv_cache_utilization", {}),
    "inference_pool_average_queue_size": ("llm_d_epp_average_queue_size", {}),
    "inference_pool_average_running_requests": ("llm_d_epp_average_running_requests", {}),
    "inference_pool_ready_pods": ("llm_d_epp_ready_endpoints", {}),
    "inference_pool_per_pod_queue_size": ("llm_d_epp_per_endpoint_queue_size",
                                          {"model_server_pod": "model_server_endpoint"}),
    "inference_extension_scheduler_e2e_duration_seconds": ("llm_d_epp_scheduler_e2e_duration_seconds", {}),
    "inference_extension_scheduler_attempts": ("llm_d_epp_scheduler_attempts", {"pod_name": "endpoint_name"}),
    "inference_extension_plugin_duration_seconds": ("llm_d_epp_plugin_duration_seconds", {}),
    "inference_extension_info": ("llm_d_epp_info", {}),
    "inference_extension_model_rewrite_decisions": ("llm_d_epp_model_rewrite_decisions", {}),
}


class LlmdCopies:
    """A collector that renders chosen families again under llm-d's names, at scrape time only."""

    def __init__(self, sources: Iterable[Any], names: Mapping[str, tuple[str, Mapping[str, str]]] = LLMD_NAMES):
        self.sources = list(sources)
        self.names = names

    def describe(self) -> list[Metric]:
        # names only (the registry checks them for clashes); no samples are rendered here
        return [Metric(new, "", "untyped") for new, _ in self.names.values()]

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            for fam in source.collect():
                target = self.names.get(fam.name)
                if target is None:
                    continue
                new, renames = target
                copy = Metric(new, fam.documentation, fam.type, fam.unit)
                cut = len(fam.name)
                for smp in fam.samples:
                    labels = {renames.get(k, k): v for k, v in smp.labels.items()} if renames else smp.labels
                    copy.samples.append(smp._replace(name=new + smp.name[cut:], labels=labels))
                yield copy


class Telemetry:
    """Owns one registry (so several pickers can live in one test process) and its metrics."""

    def __init__(self, registry: CollectorRegistry | None = None, pool_name: str = "", *,
                 llmd_names: bool = True, max_label_values: int = MAX_LABEL_VALUES,
                 max_label_length: int = MAX_LABEL_LENGTH, commit: str = "") -> None:
        r = self.registry = registry or CollectorRegistry()
        self.pool_name = pool_name
        self.models = LabelBound(max_label_values, max_label_length)
        self.priorities = LabelBound(100, 16)  # ints from InferenceObjectives; bounded all the same
        self.request_total = Counter(
            "inference_objective_request_total",
            "Counter of inference objective requests broken out for each model and target model.",
            (*MODEL_LABELS, "priority"), registry=r)
        self.request_error_total = Counter(
            "inference_objective_request_error_total",
            "Counter of inference objective requests errors broken out for each model and target model.",
            (*MODEL_LABELS, "error_code"), registry=r)
        self.request_metric = Gauge(
            "inference_objective_inference_request_metric",
            "Consolidated gauge for various inference request metrics including TTFT, TPOT, SLOs, and prediction "
            "durations.", (*MODEL_LABELS, "type"), registry=r)
        self.request_ttft = Histogram(
            "inference_objective_request_ttft_seconds",
            "Inference model TTFT distribution in seconds for each model and target model.", MODEL_LABELS,
            buckets=_LATENCY_BUCKETS, registry=r)
        self.request_tpot = Histogram(
            "inference_objective_request_tpot_seconds",
            "Inference model TPOT distribution in seconds for each model and target model.", MODEL_LABELS,
            buckets=_TPOT_BUCKETS, registry=r)
        self.slo_violations = Counter(
            "inference_objective_request_slo_violation_total",
            "Counter of SLO violations for each model, target model, and violation type.",
            (*MODEL_LABELS, "type"), registry=r)
        self.request_duration = Histogram(
            "inference_objective_request_duration_seconds",
            "Inference objective response latency distribution in seconds for each model and target model.",
            MODEL_LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.request_sizes = Histogram(
            "inference_objective_request_sizes",
            "Inference objective requests size distribution in bytes for each model and target model.",
            MODEL_LABELS, buckets=_REQUEST_SIZE_BUCKETS, registry=r)
        self.response_sizes = Histogram(
            "inference_objective_response_sizes",
            "Inference objective responses size distribution in bytes for each model and target model.",
            MODEL_LABELS, buckets=_RESPONSE_SIZE_BUCKETS, registry=r)
        self.input_tokens = Histogram(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution for requests in each model.",
            MODEL_LABELS, buckets=_INPUT_TOKEN_BUCKETS, registry=r)
        self.output_tokens = Histogram(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution for requests in each model.",
            MODEL_LABELS, buckets=_OUTPUT_TOKEN_BUCKETS, registry=r)
        self.cached_tokens = Histogram(
            "inference_objective_prompt_cached_tokens",
            "Inference objective prompt cached token count distribution for requests in each model.",
            MODEL_LABELS, buckets=_INPUT_TOKEN_BUCKETS, registry=r)
        self.running_requests = Gauge(
            "inference_objective_running_requests", "Inference objective number of running requests in each model.",
            ("model_name",), registry=r)
        self.ntpot = Histogram(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Inference objective latency divided by number of output tokens in seconds for each model and target "
            "model.", MODEL_LABELS, buckets=_NTPOT_BUCKETS, registry=r)
        self.pool_kv = Gauge("inference_pool_average_kv_cache_utilization",
                             "The average kv cache utilization for an inference server pool.", ("name",), registry=r)
        self.pool_queue = Gauge("inference_pool_average_queue_size",
                                "The average number of requests pending in the model server queue.", ("name",),
                                registry=r)
        self.pool_running = Gauge("inference_pool_average_running_requests",
                                  "The average number of running requests across model servers in the pool.",
                                  ("name",), registry=r)
        self.pool_ready = Gauge("inference_pool_ready_pods", "The number of ready pods in the inference server pool.",
                                ("name",), registry=r)
        self.per_pod_queue = Gauge("inference_pool_per_pod_queue_size",
                                   "The total number of requests pending in the model server queue for each "
                                   "underlying pod.", ("name", "model_server_pod"), registry=r)
        self.sched_e2e = Histogram("inference_extension_scheduler_e2e_duration_seconds",
                                   "End-to-end scheduling latency distribution in seconds.", buckets=_SCHED_BUCKETS,
                                   registry=r)
        self.sched_attempts = Counter("inference_extension_scheduler_attempts_total",
                                      "Total number of scheduling attempts.",
                                      ("status", "target_model_name", "pod_name", "namespace", "port"), registry=r)
        self.plugin_duration = Histogram("inference_extension_plugin_duration_seconds",
                                         "Plugin processing latency distribution in seconds for each extension "
                                         "point, plugin type and plugin name.",
                                         ("extension_point", "plugin_type", "plugin_name"), buckets=_SCHED_BUCKETS,
                                         registry=r)
        self.rewrite_decisions = Counter("inference_extension_model_rewrite_decisions_total",
                                         "Total number of inference model rewrite decisions.",
                                         ("model_rewrite_name", "model_name", "target_model"), registry=r)
        # P/D: one per routed request under disagg-profile-handler (llm-d's names, both generations)
        self.disagg_decisions = Counter("llm_d_inference_scheduler_disagg_decision_total",
                                        "Total number of disaggregation routing decisions made.",
                                        ("model_name", "decision_type"), registry=r)
        self.disagg_decisions_llmd = Counter("llm_d_epp_disagg_decision_total",
                                             "Total number of disaggregation routing decisions made.",
                                             ("plugin_name", "plugin_type", "model_name", "decision_type"), registry=r)
        self.prefix_size = Gauge("inference_extension_prefix_indexer_size", "Size of the prefix indexer.",
                                 registry=r)
        self.prefix_hit_ratio = Histogram("inference_extension_prefix_indexer_hit_ratio",
                                          "Ratio of prefix length matched to total prefix length in the cache lookup.",
                                          buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.prefix_hit_bytes = Histogram("inference_extension_prefix_indexer_hit_bytes",
                                          "Length of the prefix match in number of bytes in the cache lookup.",
                                          buckets=_HIT_BYTES_BUCKETS, registry=r)
        self.info = Gauge("inference_extension_info",
                          "General information of the current build of Inference Extension.",
                          ("commit", "build_ref"), registry=r)
        self.info.labels(commit, __version__).set(1)
        # ours, beyond the reference: where the latency goes
        self.added_latency = Histogram("inference_extension_picker_added_latency_seconds",
                                       "Picker's own time per request: first request message to routed reply.",
                                       buckets=_FAST_BUCKETS, registry=r)
        self.first_byte = Histogram("inference_extension_response_first_byte_seconds",
                                    "Routed reply to the response headers reaching the picker (queue + prefill).",
                                    MODEL_LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        if llmd_names:
            r.register(LlmdCopies(self._families()))
        self._sched_e2e = fast_observe(self.sched_e2e)
        self._added_latency = fast_observe(self.added_latency)
        self._prefix_hit_ratio = fast_observe(self.prefix_hit_ratio)
        self._prefix_hit_bytes = fast_observe(self.prefix_hit_bytes)
        self._children: dict[tuple[str, str], _Children] = {}
        # (family, label values) -> child; values are bounded (LabelBound, config names, error codes)
        self._labelled: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._incs: dict[tuple[Any, tuple[str, ...]], Add] = {}
        self._attempts: dict[tuple[str, str], tuple[Add, tuple[str, ...]]] = {}
        self._served_pods: set[str] = set()
        self._ds: Datastore | None = None
        self._model_table: Any = None

    def _families(self) -> list[Any]:
        return [self.request_total, self.request_error_total, self.request_duration, self.request_sizes,
                self.response_sizes, self.input_tokens, self.output_tokens, self.cached_tokens,
                self.running_requests, self.ntpot, self.request_ttft, self.request_tpot, self.pool_kv,
                self.pool_queue, self.pool_running, self.pool_ready, self.per_pod_queue, self.sched_e2e,
                self.sched_attempts, self.plugin_duration, self.info, self.rewrite_decisions]

    # ---- label bounds -------------------------------------------------------------------------
    def learn_models(self, ds: Datastore) -> None:
        """Pin every model name the pool knows (see known_models)."""
        self._ds = ds
        self._model_table = ds.models
        self.models.pin(known_models(ds))

    def _labels(self, model: str, target: str) -> tuple[str, str]:
        ds = self._ds
        if ds is not None and ds.models is not self._model_table:  # the model objects changed
            self.learn_models(ds)
        bound = self.models
        return bound(model), bound(target)

    def _for(self, model: str, target: str) -> _Children:
        key = (model, target)  # already bounded
        c = self._children.get(key)
        if c is None:
            c = _Children(
                duration=fast_observe(self.request_duration.labels(model, target)),
                req_size=fast_observe(self.request_sizes.labels(model, target)),
                resp_size=fast_observe(self.response_sizes.labels(model, target)),
                in_tokens=fast_observe(self.input_tokens.labels(model, target)),
                out_tokens=fast_observe(self.output_tokens.labels(model, target)),
                cached_tokens=fast_observe(self.cached_tokens.labels(model, target)),
                ntpot=fast_observe(self.ntpot.labels(model, target)),
                ttft=fast_observe(self.request_ttft.labels(model, target)),
                tpot=fast_observe(self.request_tpot.labels(model, target)),
                first_byte=fast_observe(self.first_byte.labels(model, target)),
                ttft_last=self.request_metric.labels(model, target, "ttft"),
                tpot_last=self.request_metric.labels(model, target, "tpot"),
                running=fast_inc(self.running_requests.labels(model)),
            )
            self._children[key] = c
        return c

    # ---- the director's lifecycle events ----------------------------------------------------
    def routed(self, ctx: RequestContext) -> None:
        model, target = self._labels(ctx.client_model, ctx.target_model)
        c = self._for(model, target)
        self._inc(self.request_total, model, target, self.priorities(str(ctx.sched.priority)))
        c.running(1.0)
        if ctx.request_size:
            c.req_size(ctx.request_size)
        self._attempt(target, ctx.endpoints[0] if ctx.endpoints else None)(1.0)
        self._sched_e2e(ctx.sched_seconds)
        scratch = ctx.sched.scratch
        if scratch:
            ratio = scratch.get(PREFIX_HIT_RATIO)
            if ratio is not None:
                self._prefix_hit_ratio(ratio)
                self._prefix_hit_bytes(scratch.get(PREFIX_HIT_BYTES, 0))
            disagg = scratch.get(DISAGG_DECISION)
            if disagg is not None:
                name, kind, decision = disagg
                self._child(self.disagg_decisions, target or "unknown", decision).inc()
                self._child(self.disagg_decisions_llmd, name, kind, target or "unknown", decision).inc()
        if ctx.rewrite_source != "none" and ctx.client_model != ctx.target_model:
            self._child(self.rewrite_decisions, ctx.rewrite_rule, model, target).inc()

    def _inc(self, family: Any, *values: str) -> None:
        """`family.labels(*values).inc()` through a kept `fast_inc` (request counters)."""
        key = (family, values)
        inc = self._incs.get(key)
        if inc is None:
            inc = self._incs[key] = fast_inc(self._child(family, *values))
        inc(1.0)

    def _child(self, family: Any, *values: str) -> Any:
        """`family.labels(*values)`, kept: label values here are bounded, and the lookup
        prometheus_client does per call (a lock, a dict) would otherwise repeat per request."""
        key = (family, values)
        child = self._labelled.get(key)
        if child is None:
            child = self._labelled[key] = family.labels(*values)
        return child

    def _attempt(self, target: str, ep: Endpoint | None) -> Add:
        """The scheduler-attempts counter's inc for this target and endpoint (None: a failure)."""
        key = (target, ep.address if ep is not None else "")
        hit = self._attempts.get(key)
        if hit is None:
            labels = ("success", target, *_pod_labels(ep)) if ep is not None else ("failure", target, "", "", "")
            hit = self._attempts[key] = (fast_inc(self.sched_attempts.labels(*labels)), labels)
        return hit[0]

    def plugin_observed(self, point: str, plugin_type: str, plugin_name: str, seconds: float) -> None:
        """One timed plugin call (the scheduler samples one request in N)."""
        self._child(self.plugin_duration, point, plugin_type, plugin_name).observe(seconds)

    def rejected(self, ctx: RequestContext | None, model: str, target: str, error: Rejected) -> None:
        model, target = self._labels(model, target)
        self._child(self.request_error_total, model, target, error.code).inc()
        if error.status == 429 and error.code == "ResourceExhausted":
            self._attempt(target, None)(1.0)

    def finished(self, ctx: RequestContext) -> None:
        model, target = self._labels(ctx.client_model, ctx.target_model)
        c = self._for(model, target)
        c.running(-1.0)
        now = time.perf_counter()
        if ctx.routed_at:
            # time from the first request message until the routed reply left: the picker's share
            self._added_latency(ctx.routed_at - ctx.started)
        if ctx.first_byte_at:
            c.first_byte(ctx.first_byte_at - ctx.routed_at)
        status = ctx.status
        if not status or status.startswith("2"):
            duration = now - ctx.started
            c.duration(duration)
            if ctx.response_size:
                c.resp_size(ctx.response_size)
            if ctx.usage_prompt:
                c.in_tokens(ctx.usage_prompt)
                c.cached_tokens(ctx.usage_cached)
            if ctx.usage_completion:
                c.out_tokens(ctx.usage_completion)
                c.ntpot(duration / ctx.usage_completion)
            if ctx.first_byte_at:
                self._latency(ctx, model, target, c, now)
        else:
            code = f"upstream_{status}" if len(status) == 3 and status.isdigit() else "upstream_other"
            self._child(self.request_error_total, model, target, code).inc()

    def _latency(self, ctx: RequestContext, model: str, target: str, c: _Children, now: float) -> None:
        """TTFT = first response byte - request start; TPOT = (end - first byte) / (output tokens - 1);
        each checked against the request's SLO headers when it sent any."""
        headers = ctx.sched.headers
        ttft = ctx.first_byte_at - ctx.started
        if ttft >= 0:
            c.ttft(ttft)
            c.ttft_last.set(ttft)
            self._slo(headers, _SLO_TTFT_HEADERS, ttft, model, target, "ttft")
        if ctx.usage_completion > 1:
            tpot = (now - ctx.first_byte_at) / (ctx.usage_completion - 1)
            if tpot >= 0:
                c.tpot(tpot)
                c.tpot_last.set(tpot)
                self._slo(headers, _SLO_TPOT_HEADERS, tpot, model, target, "tpot")

    def _slo(self, headers: Mapping[str, str], names: tuple[str, ...], value: float, model: str, target: str,
             kind: str) -> None:
        if not headers:
            return
        limit = _slo_ms(headers, names)
        if limit is None:
            return
        violated = value > limit
        self._child(self.request_metric, model, target, f"{kind}_slo_violation").set(1 if violated else 0)
        if violated:
            self._child(self.slo_violations, model, target, kind).inc()

    # ---- pool gauges ------------------------------------------------------------------------
    def refresh_pool(self, ds: Datastore, staleness: float, now: float | None = None,
                     prefix_stats: Callable[[], Mapping[str, float]] | None = None) -> None:
        """Recompute pool averages from scrapes younger than `staleness` seconds; learn the pool's
        model names; drop per-endpoint series of endpoints that left."""
        now = time.monotonic() if now is None else now
        self.learn_models(ds)
        name = self.pool_name or ds.pool_name
        fresh = [(e.address, m) for e in ds.endpoints.values()
                 if (m := e.metrics) is not None and now - m.updated <= staleness]
        self.pool_ready.labels(name).set(len(ds.endpoints))
        if fresh:
            n = len(fresh)
            self.pool_kv.labels(name).set(sum(m.kv_usage for _, m in fresh) / n)
            self.pool_queue.labels(name).set(sum(m.waiting for _, m in fresh) / n)
            self.pool_running.labels(name).set(sum(m.running for _, m in fresh) / n)
        for addr, m in fresh:
            self.per_pod_queue.labels(name, addr).set(m.waiting)
        pods = {addr for addr, _ in fresh}
        for gone in self._served_pods - pods:
            with contextlib.suppress(KeyError):
                self.per_pod_queue.remove(name, gone)
        self._served_pods = pods
        for key in [k for k in self._attempts if k[1] and k[1] not in ds.endpoints]:
            _, labels = self._attempts.pop(key)
            with contextlib.suppress(KeyError):
                self.sched_attempts.remove(*labels)
        if prefix_stats is not None:
            self.prefix_size.set(prefix_stats().get("prefix_index_entries", 0.0))

    async def run_pool_refresh(self, ds: Datastore, interval: float, staleness: float,
                               prefix_stats: Callable[[], Mapping[str, float]] | None = None) -> None:
        while True:
            try:
                self.refresh_pool(ds, staleness, prefix_stats=prefix_stats)
            except Exception:
                log.exception("pool gauge refresh failed")
            await asyncio.sleep(interval)
