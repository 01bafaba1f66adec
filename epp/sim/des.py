"""Discrete-event mode: many engines in virtual time, with a routing policy choosing a server per request.

Nothing sleeps: an event queue orders arrivals, engine step ends and metric polls, so a run is as
fast as the engine model's bookkeeping and fully deterministic for a given workload, seed and policy.

The policy sees one `epp.datastore.Endpoint` per server, the same type the picker's schedulers score:
- `endpoint.metrics` is the last *polled* snapshot (every `poll_interval` virtual seconds, each
  server at its own seeded phase, visible `poll_delay` later; `poll_interval=None` refreshes all
  snapshots right before every decision). `metrics.updated` is in virtual seconds.
- `endpoint.inflight` / `inflight_tokens` count requests routed there and not finished (what a
  router knows without scraping).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from epp.datastore import Endpoint, Metrics
from epp.sim.config import EngineConfig
from epp.sim.engine import Engine, Seq, SimError

# Event kinds, in the order they are handled when they fall on the same instant.
_STEP, _PUBLISH, _POLL, _ARRIVAL = 0, 1, 2, 3
_CALL = -1  # call_at(): callbacks (e.g. KV-event deliveries) run before anything else at their instant


@dataclass(slots=True)
class SimRequest:
    """A request to route: `model` is the base model ("" also means base) or an adapter name."""

    request_id: str
    prompt: str
    max_tokens: int | None = None
    model: str = ""
    data: Any = None  # anything the caller wants back in the result
    priority: int = 0  # < 0: sheddable (a router's admission check may refuse it)
    remote_tokens: int = 0  # P/D: prompt tokens whose KV arrives from a prefill server (epp.sim.pd)


@dataclass(slots=True)
class RequestResult:
    """What happened to one request (virtual seconds). `error` is set when the server refused it."""

    request_id: str
    server: int  # index into Cluster.servers; -1 when the policy refused the request
    server_name: str
    model: str
    arrival: float
    scheduled: float | None = None  # first admitted into a batch
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prefix-cache hit tokens at admission
    output_tokens: int = 0
    preemptions: int = 0
    status: int = 200
    error: str = ""
    request: SimRequest | None = None

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def ttft(self) -> float:
        return (self.first_token if self.first_token is not None else self.arrival) - self.arrival

    @property
    def e2e(self) -> float:
        return (self.finished if self.finished is not None else self.arrival) - self.arrival

    @property
    def queue_time(self) -> float:
        return (self.scheduled if self.scheduled is not None else self.arrival) - self.arrival


class Policy(Protocol):
    """Chooses a server for each request. `on_complete(result)` is optional (looked up by name)."""

    def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int | None: ...


ChooseFn = Callable[[SimRequest, Sequence[Endpoint]], int | None]  # None: held (see Cluster)


class VirtualServer:
    """One engine in the cluster and the endpoint the policy sees for it."""

    __slots__ = ("busy", "endpoint", "engine", "index", "name", "phase")

    def __init__(self, index: int, name: str, cfg: EngineConfig, engine_kind: str, phase: float) -> None:
        self.index = index
        self.name = name
        self.engine = Engine(cfg)
        a, b = divmod(index, 250)
        address = f"10.0.{a}.{b + 1}:8000"
        self.endpoint = Endpoint(address=address, ip=address.rsplit(":", 1)[0], port=8000, pod=f"sim/{name}",
                                 labels={"app": "sim", "sim/name": name}, engine=engine_kind)
        self.busy = False
        self.phase = phase

    def snapshot(self, now: float) -> Metrics:
        """The metrics a scrape would read now."""
        e = self.engine
        cfg = e.cfg
        has_lora = bool(e.adapters)
        return Metrics(waiting=float(len(e.waiting)), running=float(len(e.running)), kv_usage=e.kv.usage,
                       block_size=cfg.block_size, num_blocks=cfg.num_gpu_blocks,
                       lora_max=cfg.max_loras if has_lora else 0,
                       lora_running=frozenset(e.running_adapters()) if has_lora else frozenset(),
                       lora_waiting=frozenset(e.waiting_adapters()) if has_lora else frozenset(),
                       models=frozenset((cfg.model,)), updated=now)


class Cluster:
    """Servers plus a policy, run in virtual time.

    `servers` is a count (all with `engine`) or one EngineConfig per server. `policy` is an object with
    `choose(request, endpoints) -> index` (and optionally `on_complete(result)`), or a bare callable;
    default round-robin. A policy may refuse a request by raising SimError (e.g. a router's 429): the
    request then completes at once with that status and `server` -1.

    A policy may also hold a request (flow control): `choose` returns None, and the policy later
    calls `dispatch(request, index, arrival)` or `refuse(request, status, message, arrival)`. Optional
    policy hooks, looked up by name: `bind(cluster)` once at construction, `on_metrics(endpoint)`
    when a polled snapshot becomes visible, `on_first_token(request, index)` when a request's first
    token is sampled (what a router streaming the response sees: its prefill is done).
    """

    def __init__(self, servers: int | Sequence[EngineConfig] = 1, policy: Policy | ChooseFn | None = None, *,
                 engine: EngineConfig | None = None, seed: int = 0, poll_interval: float | None = 0.05,
                 poll_delay: float = 0.0, engine_kind: str = "vllm") -> None:
        configs = [engine or EngineConfig()] * servers if isinstance(servers, int) else list(servers)
        if not configs:
            raise ValueError("a cluster needs at least one server")
        if poll_interval is not None and poll_interval <= 0:
            raise ValueError("poll_interval must be > 0 (or None for always-fresh metrics)")
        if poll_delay < 0:
            raise ValueError("poll_delay must be >= 0")
        self.rng = random.Random(seed)
        self.poll_interval = poll_interval
        self.poll_delay = poll_delay
        self.servers = [VirtualServer(i, f"sim-{i}", cfg, engine_kind,
                                      self.rng.random() * (poll_interval or 0.0))
                        for i, cfg in enumerate(configs)]
        self.endpoints: list[Endpoint] = [s.endpoint for s in self.servers]
        if policy is None:
            from epp.sim.policies import RoundRobin
            policy = RoundRobin()
        choose = getattr(policy, "choose", None)
        self._choose: ChooseFn = choose if choose is not None else policy  # type: ignore[assignment]
        self._on_complete: Callable[[RequestResult], Any] | None = getattr(policy, "on_complete", None)
        self._on_metrics: Callable[[Endpoint], Any] | None = getattr(policy, "on_metrics", None)
        self._on_first_token: Callable[[SimRequest, int], Any] | None = getattr(policy, "on_first_token", None)
        self.policy = policy
        self.now = 0.0
        self.results: list[RequestResult] = []
        self.submitted = 0
        self._events: list[tuple[float, int, int, Any]] = []
        self._counter = 0
        self._in_system = 0  # arrivals queued or requests inside engines
        self._polling = False
        self._calls = 0  # call_at() callbacks not yet run
        self._arrivals: Iterator[tuple[float, SimRequest]] = iter(())
        self._pending: tuple[float, SimRequest] | None = None
        for s in self.servers:  # a first snapshot so policies never see None
            s.endpoint.metrics = s.snapshot(0.0)
        bind = getattr(policy, "bind", None)
        if bind is not None:
            bind(self)

    # ---- input ---------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: Any) -> None:
        self._counter += 1
        heapq.heappush(self._events, (t, kind, self._counter, payload))

    def call_at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` at virtual time `t` (not earlier than now), e.g. a KV event reaching a router."""
        self._calls += 1
        self._push(max(t, self.now), _CALL, (fn, args))

    def submit(self, request: SimRequest, at: float) -> None:
        """Schedule a request's arrival at virtual time `at` (not earlier than now)."""
        if at < self.now:
            raise ValueError(f"arrival {at} is in the past (now {self.now})")
        self.submitted += 1
        self._in_system += 1
        self._push(at, _ARRIVAL, request)

    # ---- the loop ------------------------------------------------------------------------
    def run(self, workload: Iterable[tuple[float, SimRequest]] | None = None, until: float | None = None
            ) -> list[RequestResult]:
        """Process events until every request finished (or virtual time `until`); return all results.

        `workload` yields (arrival time, request) in non-decreasing time; it is read lazily, so a
        generator of millions of requests needs no memory up front. After a run stopped by `until`,
        call `run(until=...)` again (without a workload) to continue.
        """
        if workload is not None:
            if self._pending is not None:
                raise ValueError("the previous workload is not finished; call run() without one first")
            self._arrivals = iter(workload)
            self._pending = next(self._arrivals, None)
        arrivals, pending = self._arrivals, self._pending
        if self.poll_interval is not None and not self._polling:
            self._polling = True
            for s in self.servers:
                self._push(self.now + s.phase, _POLL, s)
        events = self._events
        while True:
            if pending is not None and (not events or pending[0] < events[0][0]
                                        or (pending[0] == events[0][0] and events[0][1] >= _ARRIVAL)):
                at, req = pending
                if until is not None and at > until:
                    self.now = max(self.now, until)
                    break
                if at < self.now:
                    raise ValueError(f"workload is not sorted by time: {at} after {self.now}")
                self.submitted += 1
                self.now = at
                self._arrive(req)
                pending = next(arrivals, None)
                continue
            if self._in_system == 0 and pending is None and not self._calls:
                break  # only polls left
            if not events:
                break
            t, kind, _, payload = heapq.heappop(events)
            if until is not None and t > until:
                heapq.heappush(events, (t, kind, self._counter, payload))
                self.now = max(self.now, until)
                break
            self.now = t
            if kind == _CALL:
                self._calls -= 1
                fn, args = payload
                fn(*args)
            elif kind == _STEP:
                self._step_end(payload)
            elif kind == _POLL:
                self._push(t + self.poll_delay, _PUBLISH, (payload, payload.snapshot(t)))
                self._push(t + self.poll_interval, _POLL, payload)  # type: ignore[operator]
            elif kind == _PUBLISH:
                server, metrics = payload
                server.endpoint.metrics = metrics
                if self._on_metrics is not None:
                    self._on_metrics(server.endpoint)
            else:
                self._in_system -= 1
                self._arrive(payload)
        self._pending = pending
        return self.results

    def _arrive(self, req: SimRequest) -> None:
        now = self.now
        if self.poll_interval is None:
            for s in self.servers:
                s.endpoint.metrics = s.snapshot(now)
        try:
            idx = self._choose(req, self.endpoints)
        except SimError as e:  # the router refused it (admission): never reaches a server
            self._complete(RequestResult(req.request_id, -1, "", req.model, now, status=e.status,
                                         error=e.message, request=req))
            return
        if idx is None:  # held by the policy (flow control): it calls dispatch() or refuse() later
            self._in_system += 1
            return
        self._place(req, idx, now)

    def dispatch(self, req: SimRequest, idx: int, arrival: float) -> None:
        """Send a request the policy held since `arrival` to server `idx` now."""
        self._in_system -= 1
        self._place(req, idx, arrival)

    def hold(self) -> None:
        """Count a request the policy will dispatch() later without choose() holding it (e.g. the
        decode leg of a P/D request, placed after its KV transfer: epp.sim.pd)."""
        self._in_system += 1

    def refuse(self, req: SimRequest, status: int, message: str, arrival: float) -> None:
        """Answer a held request with an error now (e.g. its queue TTL expired)."""
        self._in_system -= 1
        self._complete(RequestResult(req.request_id, -1, "", req.model, arrival, finished=self.now, status=status,
                                     error=message, request=req))

    def _place(self, req: SimRequest, idx: int, arrival: float) -> None:
        now = arrival
        if not isinstance(idx, int) or not 0 <= idx < len(self.servers):
            raise ValueError(f"policy chose {idx!r}, not a server index (0..{len(self.servers) - 1})")
        server = self.servers[idx]
        try:
            seq = server.engine.new_seq(req.request_id, req.prompt, req.max_tokens, req.model, now, tag=req)
        except SimError as e:
            res = RequestResult(req.request_id, idx, server.name, req.model, now, status=e.status,
                                error=e.message, request=req)
            self._complete(res)
            return
        seq.remote_tokens = req.remote_tokens
        if self._on_first_token is not None:
            seq.notify = self._first_token_notifier(idx)
        self._in_system += 1
        ep = server.endpoint
        ep.inflight += 1
        ep.inflight_tokens += seq.prompt_tokens
        server.engine.add(seq)
        if not server.busy:
            self._start_step(server)

    def _first_token_notifier(self, idx: int) -> Callable[[Seq], None]:
        hook = self._on_first_token
        assert hook is not None

        def notify(seq: Seq) -> None:  # called after every sampled token: act on the first only
            if seq.generated == 1 and seq.finish_reason != "abort":
                hook(seq.tag, idx)

        return notify

    def _start_step(self, server: VirtualServer) -> None:
        duration = server.engine.begin_step(self.now)
        if duration is None:
            server.busy = False
            return
        server.busy = True
        self._push(self.now + duration, _STEP, server)

    def _step_end(self, server: VirtualServer) -> None:
        done: list[Seq] = server.engine.end_step(self.now)
        ep = server.endpoint
        for seq in done:
            self._in_system -= 1
            ep.inflight -= 1
            ep.inflight_tokens -= seq.prompt_tokens
            req: SimRequest = seq.tag
            self._complete(RequestResult(
                seq.request_id, server.index, server.name, req.model, seq.arrival, seq.scheduled,
                seq.first_token, seq.finished, seq.prompt_tokens, seq.cached_tokens, seq.generated,
                seq.preemptions, request=req))
        self._start_step(server)

    def _complete(self, res: RequestResult) -> None:
        self.results.append(res)
        if self._on_complete is not None:
            self._on_complete(res)


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def summarize(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Aggregates of a run: counts, TTFT/e2e/queue percentiles (s), prefix hit ratio, throughput."""
    ok = [r for r in results if r.ok]
    ttft = sorted(r.ttft for r in ok)
    e2e = sorted(r.e2e for r in ok)
    queue = sorted(r.queue_time for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    span = (max((r.finished or 0.0) for r in ok) - min(r.arrival for r in ok)) if ok else 0.0
    per_server: dict[str, int] = {}
    for r in results:
        if r.server >= 0:  # (refused by the policy: no server)
            per_server[r.server_name] = per_server.get(r.server_name, 0) + 1
    out: dict[str, Any] = {"requests": len(results), "errors": len(results) - len(ok)}
    for name, vals in (("ttft", ttft), ("e2e", e2e), ("queue", queue)):
        out[f"{name}_mean"] = sum(vals) / len(vals) if vals else 0.0
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{round(q * 100)}"] = _pct(vals, q)
    out["prefix_hit_ratio"] = sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0
    out["output_tokens_per_s"] = sum(r.output_tokens for r in ok) / span if span > 0 else 0.0
    out["preemptions"] = sum(r.preemptions for r in ok)
    out["makespan"] = span
    out["per_server"] = dict(sorted(per_server.items()))
    return out
