"""Baseline routing policies for the discrete-event cluster, and an adapter for the picker's schedulers.

A policy is anything with `choose(request, endpoints) -> index`; `on_complete(result)` is optional.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.scheduling.framework import Scheduler, SchedulingRequest
from epp.sim.des import RequestResult, SimRequest


class RandomChoice:
    """Uniformly random server (seeded)."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int:
        return self._rng.randrange(len(servers))


class RoundRobin:
    """Servers in turn."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int:
        i = self._next % len(servers)
        self._next = i + 1
        return i


class LeastRequest:
    """Fewest requests routed and not finished (the router's own count); seeded random tie-break."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int:
        low = min(e.inflight for e in servers)
        ties = [i for i, e in enumerate(servers) if e.inflight == low]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)


class SchedulerPolicy:
    """Runs one of the picker's `Scheduler`s as a cluster policy.

    Note: the cluster's `metrics.updated` is virtual time; a scheduler that compares it with
    `time.monotonic()` (staleness) needs its clock injected before it can run here.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._routed: dict[str, tuple[SchedulingRequest, Endpoint]] = {}
        self._index: dict[int, int] = {}

    def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int:
        sreq = SchedulingRequest(request_id=request.request_id, model=request.model, client_model=request.model,
                                 prompt=request.prompt)
        result = self.scheduler.schedule(sreq, servers)
        if not result.endpoints:
            raise RuntimeError(f"scheduler picked no endpoint: {result.reason}")
        chosen = result.endpoints[0]
        index = next(i for i, e in enumerate(servers) if e is chosen)
        self.scheduler.on_routed(sreq, chosen)
        self._routed[request.request_id] = (sreq, chosen)
        return index

    def on_complete(self, result: RequestResult) -> None:
        routed = self._routed.pop(result.request_id, None)
        if routed is not None:
            self.scheduler.on_finished(*routed)
