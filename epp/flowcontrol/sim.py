"""Flow control in the discrete-event simulator: the same FlowController, in virtual time, in front
of any cluster policy (round-robin, the picker's scheduler, ...).

Every request is held (`choose` returns None) and submitted to the controller; when it is
dispatched, the inner policy chooses its server at that moment (late binding) and the cluster
starts it. Dispatch cycles run on arrivals, completions, first tokens and metric snapshots
landing; TTL expiry runs at the earliest deadline (one pending timer).

A detector that accounts what it lets through (`dispatched(request_id, endpoint, byte_size)` and
`released(request_id)`, as `epp.flowcontrol.prefill.PrefillBudgetDetector`) is told of every
dispatch, and of every first token and completion.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from epp.datastore import Endpoint
from epp.flowcontrol.controller import Detector, FlowController, FlowSettings
from epp.flowcontrol.types import FlowKey, Item, Outcome
from epp.sim.des import Cluster, RequestResult, SimRequest
from epp.sim.engine import SimError


def tenant_of(request: SimRequest) -> str:
    """The fairness id of a simulated request: `data["tenant"]` when data is a mapping, else default."""
    data = request.data
    if isinstance(data, dict):
        return str(data.get("tenant") or "")
    return ""


class FlowControlPolicy:
    """A cluster policy: flow control, then `inner` picks the server when a request is dispatched."""

    def __init__(self, inner: Any, settings: FlowSettings, detector: Detector, *,
                 fairness_of: Callable[[SimRequest], str] = tenant_of,
                 work_of: Callable[[SimRequest, int], int] | None = None) -> None:
        self.inner = inner
        self.settings = settings
        self.detector = detector
        self.fairness_of = fairness_of
        self.work_of = work_of  # (request, server index) -> prefill tokens, for an accounting detector
        self.cluster: Cluster | None = None
        self.fc: FlowController | None = None
        self._choose = getattr(inner, "choose", inner)
        self._inner_complete = getattr(inner, "on_complete", None)
        self._current: SimRequest | None = None
        self._immediate: int | None = None
        self._refused: SimError | None = None
        self._timer_at = math.inf
        self.outcomes: dict[str, int] = {}
        self._accounts = callable(getattr(detector, "dispatched", None)) and callable(getattr(detector, "released",
                                                                                              None))

    def bind(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.fc = FlowController(self.settings, self.detector, lambda: cluster.endpoints, clock=lambda: cluster.now)
        inner_bind = getattr(self.inner, "bind", None)
        if inner_bind is not None:
            inner_bind(cluster)

    # ---- cluster hooks ------------------------------------------------------------------------
    def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int | None:
        fc = self.fc
        if fc is None:
            raise RuntimeError("FlowControlPolicy used before bind(cluster)")
        self._current, self._immediate, self._refused = request, None, None
        fc.submit(FlowKey(request.priority, self.fairness_of(request)), len(request.prompt), self._done,
                  payload=(request, fc.clock()), request_id=request.request_id, model=request.model)
        self._current = None
        if self._refused is not None:
            raise self._refused
        self._arm()
        return self._immediate  # None: held, dispatched later

    def on_complete(self, result: RequestResult) -> None:
        if self._inner_complete is not None:
            self._inner_complete(result)
        if self._accounts:
            self.detector.released(result.request_id)  # type: ignore[attr-defined]
        if self.fc is not None:
            self.fc.dispatch()
            self._arm()

    def on_first_token(self, request: SimRequest, index: int) -> None:
        if self._accounts and self.fc is not None and self.detector.released(request.request_id):  # type: ignore[attr-defined]
            self.fc.dispatch()
            self._arm()

    def on_metrics(self, endpoint: Endpoint) -> None:
        if self.fc is not None and self.fc.live:
            self.fc.dispatch()
            self._arm()

    # ---- controller callbacks -----------------------------------------------------------------
    def _done(self, item: Item) -> None:
        cluster = self.cluster
        assert cluster is not None and item.outcome is not None
        self.outcomes[item.outcome.value] = self.outcomes.get(item.outcome.value, 0) + 1
        request, arrival = item.payload
        now_choosing = request is self._current
        if item.outcome is Outcome.DISPATCHED:
            try:
                idx = self._choose(request, cluster.endpoints)
            except SimError as e:  # the inner policy refused it (its own admission)
                if now_choosing:
                    self._refused = e
                else:
                    cluster.refuse(request, e.status, e.message, arrival)
                return
            if self._accounts and isinstance(idx, int) and 0 <= idx < len(cluster.endpoints):
                work = self.work_of(request, idx) if self.work_of is not None else None
                self.detector.dispatched(request.request_id, cluster.endpoints[idx],  # type: ignore[attr-defined]
                                         item.byte_size, work)
            if now_choosing:
                self._immediate = idx
            else:
                cluster.dispatch(request, idx, arrival)
            return
        drop = item.drop
        assert drop is not None
        if now_choosing:
            self._refused = SimError(drop.status, f"{drop.reason}: {drop.message}")
        else:
            cluster.refuse(request, drop.status, f"{drop.reason}: {drop.message}", arrival)

    def _arm(self) -> None:
        fc, cluster = self.fc, self.cluster
        if fc is None or cluster is None:
            return
        deadline = fc.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            self._timer_at = deadline
            cluster.call_at(deadline, self._expire, deadline)

    def _expire(self, at: float) -> None:
        if at == self._timer_at:
            self._timer_at = math.inf
        assert self.fc is not None
        if self.fc.expire():
            self.fc.dispatch()
        self._arm()
