"""The single owner of the pool's state: the pool, its endpoints, models, rewrites, objectives.

Sources (Kubernetes watches, local files, flags) write here, always on the event loop; the
director and the scraper read. Endpoints are derived from the pool (selector, target ports) and
the pods, plus any static endpoints given on the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from epp.models import ModelTable
from epp.resources import (
    InferenceModel,
    InferenceModelRewrite,
    InferenceObjective,
    InferencePool,
    Pod,
    age_key,
    refers_to_pool,
)

log = logging.getLogger("epp.datastore")


@dataclass(slots=True)
class Metrics:
    """One scrape of a model server: the signals scorers read. Written only by the scraper."""

    waiting: float = 0.0  # requests queued in the engine
    running: float = 0.0  # requests in the running batch
    kv_usage: float = 0.0  # KV-cache use, 0..1
    block_size: int = 0  # tokens per KV block (cache_config_info), 0 = unknown
    num_blocks: int = 0  # KV blocks on the device, 0 = unknown
    lora_max: int = 0  # max adapters at once, 0 = unknown / no LoRA
    lora_running: frozenset[str] = frozenset()
    lora_waiting: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()  # base model(s) served (the `model_name` label), empty = unknown
    updated: float = 0.0  # time.monotonic() when scraped
    # time.monotonic() until which the scraper vouches for this page whatever its age: the endpoint
    # was idle and its page steady, and it is polled again by then, or within an interval of the
    # first request routed there (epp.metrics.scrape, idle_interval); 0: only `updated` counts
    steady_until: float = 0.0
    # custom endpoint attributes (core-metrics-extractor `customMetrics`: attribute key -> value),
    # read by endpoint-attribute-filter/-scorer
    custom: Mapping[str, float] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Endpoint:
    """One routable target: a pod's IP and one of the pool's target ports."""

    address: str  # "ip:port", what goes into x-gateway-destination-endpoint
    ip: str
    port: int
    pod: str  # "namespace/name" of the pod, or the address for static endpoints
    labels: Mapping[str, str] = field(default_factory=dict)
    engine: str = "vllm"
    role: str = ""  # the pod's llm-d.ai/role label (prefill, decode, ...), "" when unlabelled
    metrics: Metrics | None = None  # None until the first good scrape
    scrape_ok: bool = True  # False while the last scrape failed
    inflight: int = 0  # requests this picker routed here and has not seen finish
    inflight_tokens: int = 0  # estimated prompt tokens of those requests
    # the prefill-backlog scorer's clock (time.monotonic()) of when the prefills this worker sent are
    # done, and the other --workers' combined clock as last folded in (epp.workershare); 0: none
    prefill_until: float = 0.0
    others_prefill_until: float = 0.0


EndpointListener = Callable[[list[Endpoint], list[Endpoint]], None]


def tally(counts: dict[str, list[int]], address: str, requests: int, tokens: int) -> list[int]:
    """Add to `address`'s [requests, tokens] in flight in `counts` (never below zero; the entry goes
    when no request is left); the pair as it is now. For pickers that share their counts
    (epp.workershare, epp.peers)."""
    pair = counts.get(address)
    if pair is None:
        pair = counts[address] = [0, 0]
    pair[0] = max(0, pair[0] + requests)
    pair[1] = max(0, pair[1] + tokens) if pair[0] else 0
    if not pair[0]:
        del counts[address]
    return pair


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class Datastore:
    """Pool state for one InferencePool. All mutation happens on the event loop."""

    def __init__(self, pool_name: str, pool_namespace: str = "default") -> None:
        self.pool_name = pool_name
        self.pool_namespace = pool_namespace
        self.pool: InferencePool | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self.candidates: tuple[Endpoint, ...] = ()  # endpoints in a stable order, rebuilt on change
        self.models = ModelTable()
        self.objectives: dict[str, InferenceObjective] = {}
        self._pods: dict[str, Pod] = {}
        self._pod_endpoints: dict[str, list[str]] = {}  # pod key -> addresses it contributes
        self._static: list[str] = []
        self._model_objs: dict[str, InferenceModel] = {}
        self._rewrite_objs: dict[str, InferenceModelRewrite] = {}
        self._listeners: list[EndpointListener] = []
        self.synced = False  # a source has delivered the pool at least once
        self.model_conflicts: dict[str, str] = {}  # InferenceModel key -> why it lost

    # ---- readers -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """The pool has been loaded (an InferencePool object, flags or static endpoints)."""
        return self.synced and (self.pool is not None or bool(self._static))

    def objective_priority(self, name: str) -> int | None:
        obj = self.objectives.get(name)
        return None if obj is None else obj.priority

    def subscribe(self, listener: EndpointListener) -> None:
        """Call `listener(added, removed)` whenever the endpoint set changes."""
        self._listeners.append(listener)

    # ---- writers -------------------------------------------------------------------------
    def set_static_endpoints(self, addresses: Iterable[str]) -> None:
        """Endpoints given on the command line (`--endpoints`); they need no pod."""
        self._static = list(dict.fromkeys(addresses))
        self._rebuild_endpoints()

    def set_pool(self, pool: InferencePool | None) -> None:
        """The pool object (None: deleted). Re-derives every endpoint."""
        self.pool = pool
        self.synced = True
        self._pod_endpoints = {k: self._addresses_for(p) for k, p in self._pods.items()}
        self._rebuild_endpoints()

    def replace_pods(self, pods: Iterable[Pod]) -> None:
        """The complete set of pods (a relist or a file reload)."""
        self._pods = {p.meta.key: p for p in pods}
        self._pod_endpoints = {k: self._addresses_for(p) for k, p in self._pods.items()}
        self._rebuild_endpoints()

    def upsert_pod(self, pod: Pod) -> None:
        key = pod.meta.key
        self._pods[key] = pod
        addrs = self._addresses_for(pod)
        if addrs == self._pod_endpoints.get(key) and all(a in self.endpoints for a in addrs):
            for a in addrs:  # same endpoints: refresh labels/engine in place, keep metrics
                ep = self.endpoints[a]
                ep.labels, ep.engine, ep.role = pod.labels, pod.engine, pod.role
            return
        self._pod_endpoints[key] = addrs
        self._rebuild_endpoints()

    def delete_pod(self, key: str) -> None:
        if self._pods.pop(key, None) is None:
            return
        self._pod_endpoints.pop(key, None)
        self._rebuild_endpoints()

    def replace_models(self, models: Iterable[InferenceModel]) -> None:
        self._model_objs = {m.meta.key: m for m in models if self._mine(m.pool_ref)}
        self._rebuild_models()

    def upsert_model(self, model: InferenceModel) -> None:
        if not self._mine(model.pool_ref):
            self.delete_model(model.meta.key)
            return
        self._model_objs[model.meta.key] = model
        self._rebuild_models()

    def delete_model(self, key: str) -> None:
        if self._model_objs.pop(key, None) is not None:
            self._rebuild_models()

    def replace_rewrites(self, rewrites: Iterable[InferenceModelRewrite]) -> None:
        self._rewrite_objs = {r.meta.key: r for r in rewrites if self._mine(r.pool_ref)}
        self._rebuild_models()

    def upsert_rewrite(self, rewrite: InferenceModelRewrite) -> None:
        if not self._mine(rewrite.pool_ref):
            self.delete_rewrite(rewrite.meta.key)
            return
        self._rewrite_objs[rewrite.meta.key] = rewrite
        self._rebuild_models()

    def delete_rewrite(self, key: str) -> None:
        if self._rewrite_objs.pop(key, None) is not None:
            self._rebuild_models()

    def replace_objectives(self, objectives: Iterable[InferenceObjective]) -> None:
        self.objectives = {}
        for o in sorted(objectives, key=lambda o: age_key(o.meta)):
            if self._mine(o.pool_ref):
                self.objectives.setdefault(o.meta.name, o)

    def upsert_objective(self, objective: InferenceObjective) -> None:
        if self._mine(objective.pool_ref):
            self.objectives[objective.meta.name] = objective
        else:
            self.objectives.pop(objective.meta.name, None)

    def delete_objective(self, name: str) -> None:
        self.objectives.pop(name, None)

    # ---- internals -----------------------------------------------------------------------
    def _mine(self, ref: object) -> bool:
        return refers_to_pool(ref, self.pool_name)  # type: ignore[arg-type]

    def _addresses_for(self, pod: Pod) -> list[str]:
        pool = self.pool
        if pool is None or not pod.routable or pod.meta.namespace != self.pool_namespace:
            return []
        if not _matches(pool.selector, pod.labels):
            return []
        active = pod.active_ports()
        ports = [p for p in pool.target_ports if active is None or p in active]
        return [f"{pod.ip}:{p}" for p in ports]

    def _rebuild_endpoints(self) -> None:
        want: dict[str, tuple[str, Pod | None]] = {}
        for key, addrs in self._pod_endpoints.items():
            for a in addrs:
                want.setdefault(a, (key, self._pods.get(key)))
        for a in self._static:
            want.setdefault(a, (a, None))
        added: list[Endpoint] = []
        removed = [ep for a, ep in self.endpoints.items() if a not in want]
        for a in [ep.address for ep in removed]:
            del self.endpoints[a]
        for a, (owner, pod) in want.items():
            ep = self.endpoints.get(a)
            if ep is None:
                ip, _, port = a.rpartition(":")
                ep = Endpoint(address=a, ip=ip.strip("[]"), port=int(port), pod=owner)
                self.endpoints[a] = ep
                added.append(ep)
            if pod is not None:
                ep.labels, ep.engine, ep.role, ep.pod = pod.labels, pod.engine, pod.role, owner
        self.candidates = tuple(self.endpoints.values())
        if added or removed:
            log.info(
                "endpoints changed",
                extra={"added": [e.address for e in added], "removed": [e.address for e in removed],
                       "total": len(self.endpoints)},
            )
            for listener in self._listeners:
                listener(added, removed)

    def _rebuild_models(self) -> None:
        self.models = ModelTable.build(self._model_objs.values(), self._rewrite_objs.values())
        self.model_conflicts = self.models.conflicts
