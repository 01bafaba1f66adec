"""The picker's own Prometheus metrics, under the names users' dashboards expect.

Request metrics are updated from the director's lifecycle events (routed / rejected / finished);
pool gauges are recomputed on their own interval from fresh scrapes only. Label children are
cached per (model, target) so a request costs a handful of increments, not label lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from epp import __version__
from epp.datastore import Datastore
from epp.director import Rejected, RequestContext
from epp.scheduling.prefix import PREFIX_HIT_BYTES, PREFIX_HIT_RATIO

log = logging.getLogger("epp.telemetry")

_LATENCY_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45,
                    60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_SIZE_BUCKETS = tuple(float(64 * 4**i) for i in range(12))  # 64 B .. 268 MB
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(18))  # 1 .. 131072
_NTPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
_FAST_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.05, 0.1, 0.2)
MODEL_LABELS = ("model_name", "target_model_name")


@dataclass(slots=True)
class _Children:
    requests: Any
    duration: Any
    req_size: Any
    resp_size: Any
    in_tokens: Any
    out_tokens: Any
    ntpot: Any
    running: Any


class Telemetry:
    """Owns one registry (so several pickers can live in one test process) and its metrics."""

    def __init__(self, registry: CollectorRegistry | None = None, pool_name: str = "") -> None:
        r = self.registry = registry or CollectorRegistry()
        self.pool_name = pool_name
        self.request_total = Counter("inference_objective_request_total", "Requests routed, by model and target.",
                                     MODEL_LABELS, registry=r)
        self.request_error_total = Counter("inference_objective_request_error_total",
                                           "Requests answered with an error.", (*MODEL_LABELS, "error_code"),
                                           registry=r)
        self.request_duration = Histogram("inference_objective_request_duration_seconds",
                                          "First request message to end of the response.", MODEL_LABELS,
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.request_sizes = Histogram("inference_objective_request_sizes", "Request body bytes.", MODEL_LABELS,
                                       buckets=_SIZE_BUCKETS, registry=r)
        self.response_sizes = Histogram("inference_objective_response_sizes", "Response body bytes.", MODEL_LABELS,
                                        buckets=_SIZE_BUCKETS, registry=r)
        self.input_tokens = Histogram("inference_objective_input_tokens", "Prompt tokens (from usage).",
                                      MODEL_LABELS, buckets=_TOKEN_BUCKETS, registry=r)
        self.output_tokens = Histogram("inference_objective_output_tokens", "Completion tokens (from usage).",
                                       MODEL_LABELS, buckets=_TOKEN_BUCKETS, registry=r)
        self.running_requests = Gauge("inference_objective_running_requests", "Requests routed and not finished.",
                                      ("model_name",), registry=r)
        self.ntpot = Histogram("inference_objective_normalized_time_per_output_token_seconds",
                               "Request duration divided by output tokens.", MODEL_LABELS, buckets=_NTPOT_BUCKETS,
                               registry=r)
        self.pool_kv = Gauge("inference_pool_average_kv_cache_utilization", "Mean KV-cache use of fresh pods.",
                             ("name",), registry=r)
        self.pool_queue = Gauge("inference_pool_average_queue_size", "Mean waiting requests of fresh pods.",
                                ("name",), registry=r)
        self.pool_running = Gauge("inference_pool_average_running_requests", "Mean running requests of fresh pods.",
                                  ("name",), registry=r)
        self.pool_ready = Gauge("inference_pool_ready_pods", "Endpoints in the pool.", ("name",), registry=r)
        self.per_pod_queue = Gauge("inference_pool_per_pod_queue_size", "Waiting requests per pod.",
                                   ("name", "model_server_pod"), registry=r)
        self.sched_e2e = Histogram("inference_extension_scheduler_e2e_duration_seconds",
                                   "Time spent choosing endpoints for one request.", buckets=_FAST_BUCKETS,
                                   registry=r)
        self.sched_attempts = Counter("inference_extension_scheduler_attempts_total",
                                      "Scheduling attempts by outcome.", ("status",), registry=r)
        self.plugin_duration = Histogram("inference_extension_plugin_duration_seconds",
                                         "Time per scheduling plugin call.",
                                         ("extension_point", "plugin_type", "plugin_name"), buckets=_FAST_BUCKETS,
                                         registry=r)
        self.rewrite_decisions = Counter("inference_extension_model_rewrite_decisions_total",
                                         "Model rewrites applied.",
                                         ("model_rewrite_name", "model_name", "target_model"), registry=r)
        self.prefix_size = Gauge("inference_extension_prefix_indexer_size", "Entries in the prefix index.",
                                 registry=r)
        self.prefix_hit_ratio = Histogram("inference_extension_prefix_indexer_hit_ratio",
                                          "Share of a prompt's blocks found in the index.",
                                          buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.prefix_hit_bytes = Histogram("inference_extension_prefix_indexer_hit_bytes",
                                          "Prompt bytes matched in the index.", buckets=_SIZE_BUCKETS, registry=r)
        self.info = Gauge("inference_extension_info", "Build information.", ("version", "commit"), registry=r)
        self.info.labels(__version__, "").set(1)
        # beyond the reference: where the latency goes
        self.added_latency = Histogram("inference_extension_picker_added_latency_seconds",
                                       "Picker's own time per request: first request message to routed reply.",
                                       buckets=_FAST_BUCKETS, registry=r)
        self.first_byte = Histogram("inference_extension_response_first_byte_seconds",
                                    "Routed reply to the response headers reaching the picker (queue + prefill).",
                                    MODEL_LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self._children: dict[tuple[str, str], _Children] = {}
        self._plugin_children: dict[tuple[str, str, str], Any] = {}
        self._served_pods: set[str] = set()
        self._sched_ok = self.sched_attempts.labels("success")
        self._sched_fail = self.sched_attempts.labels("failure")
        self._http: Any = None
        self._task: asyncio.Task[None] | None = None

    def _for(self, model: str, target: str) -> _Children:
        key = (model, target)
        c = self._children.get(key)
        if c is None:
            if len(self._children) > 10_000:  # unbounded client model names must not grow memory forever
                self._children.clear()
            c = _Children(
                requests=self.request_total.labels(model, target),
                duration=self.request_duration.labels(model, target),
                req_size=self.request_sizes.labels(model, target),
                resp_size=self.response_sizes.labels(model, target),
                in_tokens=self.input_tokens.labels(model, target),
                out_tokens=self.output_tokens.labels(model, target),
                ntpot=self.ntpot.labels(model, target),
                running=self.running_requests.labels(model),
            )
            self._children[key] = c
        return c

    # ---- the director's lifecycle events ----------------------------------------------------
    def routed(self, ctx: RequestContext) -> None:
        c = self._for(ctx.client_model, ctx.target_model)
        c.requests.inc()
        c.running.inc()
        if ctx.request_size:
            c.req_size.observe(ctx.request_size)
        self._sched_ok.inc()
        self.sched_e2e.observe(ctx.sched_seconds)
        scratch = ctx.sched.scratch
        if scratch:
            ratio = scratch.get(PREFIX_HIT_RATIO)
            if ratio is not None:
                self.prefix_hit_ratio.observe(ratio)
                self.prefix_hit_bytes.observe(scratch.get(PREFIX_HIT_BYTES, 0))
        if ctx.rewrite_source != "none" and ctx.client_model != ctx.target_model:
            self.rewrite_decisions.labels(ctx.rewrite_rule, ctx.client_model, ctx.target_model).inc()

    def plugin_observed(self, point: str, plugin_type: str, plugin_name: str, seconds: float) -> None:
        """One timed plugin call (the scheduler samples one request in N)."""
        key = (point, plugin_type, plugin_name)
        child = self._plugin_children.get(key)
        if child is None:
            child = self._plugin_children[key] = self.plugin_duration.labels(*key)
        child.observe(seconds)

    def rejected(self, ctx: RequestContext | None, model: str, target: str, error: Rejected) -> None:
        self.request_error_total.labels(model, target, error.code).inc()
        if error.status == 429 and error.code == "ResourceExhausted":
            self._sched_fail.inc()

    def finished(self, ctx: RequestContext) -> None:
        c = self._for(ctx.client_model, ctx.target_model)
        c.running.dec()
        now = time.perf_counter()
        if ctx.routed_at:
            # time from the first request message until the routed reply left: the picker's share
            self.added_latency.observe(ctx.routed_at - ctx.started)
        if ctx.first_byte_at:
            self.first_byte.labels(ctx.client_model, ctx.target_model).observe(ctx.first_byte_at - ctx.routed_at)
        if not ctx.status or ctx.status.startswith("2"):
            duration = now - ctx.started
            c.duration.observe(duration)
            if ctx.response_size:
                c.resp_size.observe(ctx.response_size)
            if ctx.usage_prompt:
                c.in_tokens.observe(ctx.usage_prompt)
            if ctx.usage_completion:
                c.out_tokens.observe(ctx.usage_completion)
                c.ntpot.observe(duration / ctx.usage_completion)
        elif ctx.status:
            self.request_error_total.labels(ctx.client_model, ctx.target_model, f"upstream_{ctx.status}").inc()

    # ---- pool gauges ------------------------------------------------------------------------
    def refresh_pool(self, ds: Datastore, staleness: float, now: float | None = None,
                     prefix_stats: Callable[[], Mapping[str, float]] | None = None) -> None:
        """Recompute pool averages from scrapes younger than `staleness` seconds."""
        now = time.monotonic() if now is None else now
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

    # ---- HTTP -------------------------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on a daemon thread (scrapes never wait on the event loop); returns the port."""
        server, thread = start_http_server(port, addr, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            if isinstance(thread, threading.Thread):
                thread.join(timeout=2)
            self._http = None
