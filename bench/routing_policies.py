"""Routing policies compared by bench/routing_quality.py, as discrete-event cluster policies.

Baselines (what a proxy does without a picker): uniform random (a Kubernetes Service), round-robin,
and Envoy's LEAST_REQUEST with `choice_count: 2` (two hosts drawn at random, the one with fewer
active requests wins; active = routed and not finished, which the proxy knows without scraping).

Picker policies run the picker's own scheduler and admission (epp.scheduling.config) the way the
director does (epp/director.py): admission first (a refusal is a 429), then `schedule()`; the
primary endpoint's `inflight` += 1 and `inflight_tokens` += len(prompt) // 4, then
`scheduler.on_routed`; on finish both are decremented (never below 0) and `scheduler.on_finished`
runs. Each picker replica has its own scheduler state and its *own* Endpoint objects (so its own
in-flight counts), and all replicas read the same polled metrics, as several picker pods behind
one proxy would. The scheduler's staleness clock is the cluster's virtual clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.datastore import Endpoint
from epp.scheduling.config import (
    DEFAULT_CONFIG_TEXT,
    REFERENCE_CONFIG_TEXT,
    PickerConfig,
    build_admission,
    build_scheduler,
    load_config,
)
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.scorers import pool_serves_adapters
from epp.sim.config import DEFAULT_MODEL
from epp.sim.des import Cluster, RequestResult, SimRequest
from epp.sim.engine import SimError
from epp.sim.policies import RandomChoice, RoundRobin


class PowerOfTwo:
    """Envoy LEAST_REQUEST, choice_count 2: draw two hosts at random (independently, as Envoy does),
    keep the one with fewer active requests (the first drawn on a tie)."""

    def __init__(self, seed: int = 0, choices: int = 2) -> None:
        self._rng = random.Random(seed)
        self._choices = choices

    def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int:
        n = len(servers)
        rand = self._rng.randrange
        best = rand(n)
        for _ in range(self._choices - 1):
            i = rand(n)
            if servers[i].inflight < servers[best].inflight:
                best = i
        return best


class VirtualClock:
    """The cluster's virtual time as a clock function; bind the cluster once it exists."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None

    def __call__(self) -> float:
        return self.cluster.now if self.cluster is not None else 0.0


class _Replica:
    """One picker process: its scheduler, admission and its own endpoint objects."""

    def __init__(self, cfg: PickerConfig, servers: Sequence[Endpoint], clock: VirtualClock, seed: int) -> None:
        self.endpoints = tuple(Endpoint(address=e.address, ip=e.ip, port=e.port, pod=e.pod, labels=e.labels,
                                        engine=e.engine, metrics=e.metrics) for e in servers)
        self.slot = {id(e): i for i, e in enumerate(self.endpoints)}
        eps = self.endpoints
        self.scheduler = build_scheduler(cfg, has_lora=lambda: pool_serves_adapters(eps), rng=random.Random(seed),
                                         clock=clock)
        self.admission = build_admission(cfg)

    def sync(self, servers: Sequence[Endpoint]) -> None:
        """Read the shared scrape results (metrics are replaced, never mutated, by the cluster)."""
        for mine, src in zip(self.endpoints, servers, strict=True):
            mine.metrics = src.metrics
            mine.scrape_ok = src.scrape_ok


@dataclass(slots=True)
class _Routed:
    replica: _Replica
    request: SchedulingRequest
    endpoint: Endpoint
    tokens: int


class PickerPolicy:
    """The picker (one or more replicas, requests split among them round-robin) as a cluster policy.

    Create it, then `bind(cluster)`: replicas copy the cluster's endpoints on first use.
    """

    def __init__(self, cfg: PickerConfig, *, replicas: int = 1, seed: int = 0,
                 peer_delay: float | None = None) -> None:
        """`peer_delay` (seconds; None: off): replicas tell each other of every request they route
        and finish (`--ha-peers`), each hearing the others' after this delay."""
        self.cfg = cfg
        self.peer_delay = peer_delay
        self.clock = VirtualClock()
        self._n = max(1, replicas)
        self._seed = seed
        self._replicas: list[_Replica] = []
        self._next = 0
        self._routed: dict[str, _Routed] = {}
        self.refused = 0

    def bind(self, cluster: Cluster) -> None:
        self.clock.cluster = cluster

    def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int:
        if not self._replicas:
            self._replicas = [_Replica(self.cfg, servers, self.clock, self._seed * 1000 + r) for r in range(self._n)]
        rep = self._replicas[self._next]
        self._next = (self._next + 1) % self._n
        rep.sync(servers)
        eps = rep.endpoints
        sreq = SchedulingRequest(request_id=request.request_id, model=request.model or DEFAULT_MODEL,
                                 client_model=request.model or DEFAULT_MODEL, priority=request.priority,
                                 prompt=request.prompt)
        reason = rep.admission.check(sreq, eps, self.clock())
        if reason:
            self.refused += 1
            raise SimError(429, reason, "RateLimitError")
        result = rep.scheduler.schedule(sreq, eps)
        if not result.endpoints:
            self.refused += 1
            raise SimError(429, result.reason or "no endpoint could be scheduled", "RateLimitError")
        primary = result.endpoints[0]
        tokens = len(sreq.prompt) // 4  # the director's estimate
        primary.inflight += 1
        primary.inflight_tokens += tokens
        rep.scheduler.on_routed(sreq, primary)
        notes = (rep.scheduler.peer_notes(sreq, primary)
                 if self.peer_delay is not None and hasattr(rep.scheduler, "peer_notes") else None)
        self._tell_peers(rep, rep.slot[id(primary)], 1, tokens, notes)
        self._routed[request.request_id] = _Routed(rep, sreq, primary, tokens)
        return rep.slot[id(primary)]

    def on_complete(self, result: RequestResult) -> None:
        routed = self._routed.pop(result.request_id, None)
        if routed is None:
            return
        ep = routed.endpoint
        ep.inflight = max(0, ep.inflight - 1)
        ep.inflight_tokens = max(0, ep.inflight_tokens - routed.tokens)
        self._tell_peers(routed.replica, routed.replica.slot[id(ep)], -1, -routed.tokens)
        routed.replica.scheduler.on_finished(routed.request, ep)

    def _tell_peers(self, rep: _Replica, slot: int, n: int, tokens: int,
                    notes: dict[str, Any] | None = None) -> None:
        """epp.peers in virtual time: the other replicas count the request (and learn the plugins'
        notes) `peer_delay` later."""
        if self.peer_delay is None or self._n < 2 or self.clock.cluster is None:
            return
        others = [r for r in self._replicas if r is not rep]

        def arrive() -> None:
            for r in others:
                ep = r.endpoints[slot]
                ep.inflight = max(0, ep.inflight + n)
                ep.inflight_tokens = max(0, ep.inflight_tokens + tokens)
                if notes:
                    r.scheduler.apply_peer_notes(ep, notes)

        self.clock.cluster.call_at(self.clock.cluster.now + self.peer_delay, arrive)

    @property
    def outstanding(self) -> int:
        """Requests routed and not finished (0 after a complete run)."""
        return len(self._routed)


# ---- configurations --------------------------------------------------------------------------
def _doc(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def _plugin(doc: dict[str, Any], type_name: str) -> dict[str, Any]:
    for p in doc["plugins"]:
        if p["type"] == type_name:
            return p  # type: ignore[no-any-return]
    raise KeyError(type_name)


def _variant(change: Callable[[dict[str, Any]], None]) -> Callable[[], PickerConfig]:
    """Our default preset with one change applied to its YAML document (so it tracks the preset)."""
    def build() -> PickerConfig:
        doc = _doc(DEFAULT_CONFIG_TEXT)
        change(doc)
        return load_config(yaml.safe_dump(doc, sort_keys=False))
    return build


def _rendezvous(doc: dict[str, Any]) -> None:
    _plugin(doc, "prefix-cache-scorer").setdefault("parameters", {})["mode"] = "rendezvous"


def _index(doc: dict[str, Any]) -> None:
    _plugin(doc, "prefix-cache-scorer").setdefault("parameters", {})["mode"] = "index"


def _other_prefix_mode(doc: dict[str, Any]) -> None:
    params = _plugin(doc, "prefix-cache-scorer").setdefault("parameters", {})
    params["mode"] = "index" if params.get("mode", "index") == "rendezvous" else "rendezvous"


def _guard_toggled(doc: dict[str, Any]) -> None:
    guard = doc.setdefault("loadGuard", {})
    guard["enabled"] = not guard.get("enabled", True)


def _inflight_off(doc: dict[str, Any]) -> None:
    doc["plugins"] = [p for p in doc["plugins"] if p["type"] != "inflight-load-scorer"]
    prof = doc["schedulingProfiles"][0]
    prof["plugins"] = [e for e in prof["plugins"] if e["pluginRef"] != "inflight-load-scorer"]


def default_prefix_mode() -> str:
    """The prefix-cache-scorer mode of our default preset."""
    params = _plugin(_doc(DEFAULT_CONFIG_TEXT), "prefix-cache-scorer").get("parameters") or {}
    return str(params.get("mode", "index"))


def default_guard_enabled() -> bool:
    return bool((_doc(DEFAULT_CONFIG_TEXT).get("loadGuard") or {}).get("enabled", True))


def _reference() -> PickerConfig:
    return load_config(REFERENCE_CONFIG_TEXT)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A named policy: `make(seed, replicas)` builds a fresh policy for one run."""

    name: str
    make: Callable[[int, int], Any]
    picker: bool = False  # runs the picker's scheduler (replicas apply)
    note: str = ""
    config: Callable[[], PickerConfig] | None = field(default=None, repr=False)


def picker_spec(name: str, config: Callable[[], PickerConfig], note: str) -> PolicySpec:
    return PolicySpec(name, lambda seed, replicas: PickerPolicy(config(), replicas=replicas, seed=seed),
                      picker=True, note=note, config=config)


_OTHER_MODE = "rendezvous" if default_prefix_mode() == "index" else "index"
_GUARD = "load guard off" if default_guard_enabled() else "load guard on"

POLICIES: tuple[PolicySpec, ...] = (
    PolicySpec("random", lambda seed, _r: RandomChoice(seed), note="uniform random (a Kubernetes Service)"),
    PolicySpec("round-robin", lambda seed, _r: RoundRobin(), note="servers in turn"),
    PolicySpec("least-request-p2c", lambda seed, _r: PowerOfTwo(seed),
               note="Envoy LEAST_REQUEST, choice_count 2, on active requests"),
    picker_spec("reference", _reference, "the reference default profile (queue 2, KV 2, prefix 3, max-score)"),
    picker_spec("default", _variant(lambda d: None), "our default preset"),
    picker_spec(f"default, {_OTHER_MODE}", _variant(_other_prefix_mode),
                f"our default with prefix mode {_OTHER_MODE}"),
    picker_spec(f"default, {_GUARD}", _variant(_guard_toggled), f"our default with the {_GUARD}"),
    picker_spec("default, no in-flight", _variant(_inflight_off), "our default without the in-flight load scorer"),
)

# For the replica study: both prefix strategies (and the reference) whatever the default's mode is.
REPLICA_POLICIES: tuple[PolicySpec, ...] = (
    picker_spec("reference", _reference, "the reference default profile"),
    picker_spec("default (index)", _variant(_index), "our default, prefix mode index"),
    picker_spec("default (rendezvous)", _variant(_rendezvous), "our default, prefix mode rendezvous"),
)


def policy(name: str) -> PolicySpec:
    for p in (*POLICIES, *REPLICA_POLICIES):
        if p.name == name:
            return p
    raise KeyError(name)
