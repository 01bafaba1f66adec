"""The flow controller: bounded per-flow queues, and a dispatch cycle gated by a saturation detector.

Synchronous and clock-injected, so the same object runs under asyncio (`epp.flowcontrol.aio`) and
in the discrete-event simulator (`epp.flowcontrol.sim`). Callers:

- `submit(...)` queues a request (or finalizes it at once: over capacity, shut down) and runs a
  dispatch cycle; the item's `on_done(item)` is called exactly once with its outcome. For a
  dispatched item `on_done` runs inside the cycle, before the next dispatch decision, so a binding
  that accounts the request on an endpoint (late binding: the best pod *now*) is seen by the
  concurrency detector at once.
- `dispatch()` after anything that may have freed room (a request finished, metrics refreshed);
  `expire()` when `next_deadline()` has passed; `cancel(item)` when the client went away;
  `shutdown()` evicts everything still queued.

Dispatch, as the reference: highest priority band first; in a band the fairness policy picks the
flow, the flow's ordering policy the request; only while the detector says the pool has room
(an empty pool has none: the queue waits for endpoints); a blocked cycle stops entirely (head of
line), so lower bands never take room a higher band is waiting for.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from epp.datastore import Endpoint
from epp.flowcontrol.bands import DEFAULT_BAND_MAX_BYTES, DEFAULT_BAND_MAX_REQUESTS, Band
from epp.flowcontrol.edf import EdfOrderingPolicy
from epp.flowcontrol.fcfs import FcfsOrderingPolicy
from epp.flowcontrol.global_strict import GlobalStrictFairnessPolicy
from epp.flowcontrol.policy import FairnessPolicy, OrderingPolicy
from epp.flowcontrol.round_robin import RoundRobinFairnessPolicy
from epp.flowcontrol.shortest_prompt import ShortestPromptFirstOrderingPolicy
from epp.flowcontrol.slo_deadline import SloDeadlineOrderingPolicy
from epp.flowcontrol.types import DEFAULT_FAIRNESS_ID, FlowKey, Item, Outcome
from epp.scheduling.cycle import fresh_metrics

log = logging.getLogger("epp.flowcontrol")

DEFAULT_REQUEST_TTL = 60.0
DEFAULT_FAIRNESS = "global-strict-fairness-policy"
DEFAULT_ORDERING = "fcfs-ordering-policy"
STALENESS_SATURATED, STALENESS_IGNORE = "saturated", "ignore"
MAX_DISPATCH_PER_CYCLE = 256  # then yield to the event loop; the driver runs another cycle at once


class Detector(Protocol):
    """What the controller asks of a saturation detector (epp.scheduling.saturation)."""

    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float: ...

    def pool_saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool: ...


class Metrics(Protocol):
    """The controller's metric hooks (epp.flowcontrol.metrics.FlowControlMetrics)."""

    def queued(self, item: Item, delta: int) -> None: ...

    def finished(self, item: Item, seconds: float) -> None: ...

    def cycle(self, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class BandSettings:
    """One band's limits and policy names ("" = the defaults)."""

    priority: int | None = None  # None: a template for priorities not configured
    max_requests: int = DEFAULT_BAND_MAX_REQUESTS
    max_bytes: int = DEFAULT_BAND_MAX_BYTES
    fairness: str = DEFAULT_FAIRNESS
    ordering: str = DEFAULT_ORDERING


@dataclass(frozen=True, slots=True)
class FlowSettings:
    """The controller's configuration (see epp.flowcontrol.build for the `flowControl` section)."""

    max_requests: int | None = None  # global bounds; None = unlimited
    max_bytes: int | None = None
    default_ttl: float = DEFAULT_REQUEST_TTL  # math.inf = requests wait until dispatch or cancel
    empty_pool_ttl: float | None = None  # while the pool has no endpoints, this TTL instead (None = same)
    bands: tuple[BandSettings, ...] = ()
    default_band: BandSettings = field(default_factory=BandSettings)
    default_negative_band: BandSettings | None = None
    staleness_policy: str = STALENESS_SATURATED
    detector_name: str = "utilization-detector"

    def band_for(self, priority: int) -> BandSettings:
        for b in self.bands:
            if b.priority == priority:
                return b
        if priority < 0 and self.default_negative_band is not None:
            return self.default_negative_band
        return self.default_band


def builtin_policies() -> dict[str, Any]:
    """The policies flow control provides without a declaration, by type name."""
    return {p.name: p for p in (GlobalStrictFairnessPolicy(), RoundRobinFairnessPolicy(), FcfsOrderingPolicy(),
                                EdfOrderingPolicy(), SloDeadlineOrderingPolicy(), ShortestPromptFirstOrderingPolicy())}


class FlowController:
    """Queues per flow in priority bands; dispatches while the detector reports room."""

    def __init__(
        self,
        settings: FlowSettings,
        detector: Detector,
        candidates: Callable[[], Sequence[Endpoint]],
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        policies: Mapping[str, Any] | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.settings = settings
        self.detector = detector
        self.candidates = candidates
        self.clock = clock
        self.metrics = metrics
        self.timer = timer  # wall time for the dispatch-cycle histogram (the clock may be virtual)
        self.policies: dict[str, Any] = builtin_policies()
        self.policies.update(policies or {})
        for b in (*settings.bands, settings.default_band, settings.default_negative_band):
            if b is not None:
                self._policy(b.fairness, "fairness")
                self._policy(b.ordering, "ordering")
        self.bands: dict[int, Band] = {}
        self._order: list[Band] = []  # bands, highest priority first
        self._expiry: list[tuple[float, int, Item]] = []
        self._seq = 0
        self.live = 0
        self.bytes = 0
        self.closed = False
        self.pool_empty = False
        self.last_saturation = 0.0
        self.outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self._stale_after: float | None = getattr(detector, "stale_after", None)

    # ---- configuration ----------------------------------------------------------------------
    def _policy(self, name: str, kind: str) -> Any:
        p = self.policies.get(name)
        if p is None or getattr(p, "kind", "") != kind:
            raise ValueError(f"flow control: {name!r} is not a {kind} policy")
        return p

    def _band(self, priority: int) -> Band:
        band = self.bands.get(priority)
        if band is None:
            s = self.settings.band_for(priority)
            ordering: OrderingPolicy = self._policy(s.ordering, "ordering")
            fairness: FairnessPolicy = self._policy(s.fairness, "fairness")
            band = self.bands[priority] = Band(priority, ordering, fairness, s.max_requests, s.max_bytes)
            self._order = sorted(self.bands.values(), key=lambda b: -b.priority)
        return band

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, key: FlowKey, byte_size: int = 0, on_done: Callable[[Item], Any] | None = None, *,
               payload: Any = None, request_id: str = "", ttl: float | None = None, model: str = "",
               target_model: str = "", slo_ttft: float | None = None) -> Item:
        """Queue a request and run a dispatch cycle; the returned item may already be done.
        `slo_ttft` (seconds) is the request's TTFT objective, read by `slo-deadline-ordering-policy`."""
        now = self.clock()
        self._seq += 1
        item = Item(key=key if key.fairness_id else FlowKey(key.priority, DEFAULT_FAIRNESS_ID),
                    byte_size=max(0, int(byte_size)), enqueued=now, ttl=self._ttl(ttl), on_done=on_done,
                    payload=payload, request_id=request_id, model=model, target_model=target_model, seq=self._seq,
                    slo_ttft=slo_ttft if slo_ttft is not None and slo_ttft >= 0 else math.inf)
        if self.closed:
            self._finalize(item, Outcome.REJECTED_OTHER, now)
            return item
        s = self.settings
        band = self._band(item.key.priority)
        over = ((s.max_requests is not None and self.live + 1 > s.max_requests)
                or (s.max_bytes is not None and self.bytes + item.byte_size > s.max_bytes)
                or not band.fits(item.byte_size))
        if over:
            empty = not self.candidates()
            self._finalize(item, Outcome.REJECTED_NO_ENDPOINTS if empty else Outcome.REJECTED_CAPACITY, now)
            return item
        flow = band.flow(item.key.fairness_id, now)
        band.push(flow, item)
        item.band = band
        self.live += 1
        self.bytes += item.byte_size
        if math.isfinite(item.deadline):
            heapq.heappush(self._expiry, (item.deadline, item.seq, item))
        if self.metrics is not None:
            self.metrics.queued(item, 1)
        self.dispatch()
        return item

    def _ttl(self, ttl: float | None) -> float:
        t = self.settings.default_ttl if ttl is None or ttl <= 0 else ttl
        empty_ttl = self.settings.empty_pool_ttl
        if empty_ttl is not None and not self.candidates():
            t = min(t, empty_ttl)
        return t if t > 0 else math.inf

    def cancel(self, item: Item) -> bool:
        """The client went away: take a queued item out at once. False if it was already done."""
        if item.done:
            return False
        self._remove(item)
        self._finalize(item, Outcome.EVICTED_CONTEXT_CANCELLED, self.clock())
        return True

    def _remove(self, item: Item) -> None:
        band: Band | None = item.band
        flow = band.flows.get(item.key.fairness_id) if band is not None else None
        if band is not None and flow is not None and not item.removed:
            flow.queue.discard(item)
            band.took(item)
            self._left(item)

    def _left(self, item: Item) -> None:
        self.live -= 1
        self.bytes -= item.byte_size
        if self.metrics is not None:
            self.metrics.queued(item, -1)

    def _finalize(self, item: Item, outcome: Outcome, now: float) -> None:
        item.outcome = outcome
        item.finished_at = now
        item.band = None
        if outcome is Outcome.EVICTED_TTL or outcome is Outcome.REJECTED_NO_ENDPOINTS:
            item.pool_empty = not self.candidates()
        self.outcomes[outcome] += 1
        if self.metrics is not None:
            self.metrics.finished(item, max(0.0, now - item.enqueued))
        cb = item.on_done
        item.on_done = None
        if cb is not None:
            try:
                item.result = cb(item)
            except Exception:  # a caller's binding must not break the cycle for everyone else
                log.exception("flow-control completion callback failed", extra={"request_id": item.request_id})

    # ---- dispatch ---------------------------------------------------------------------------
    def _gate(self, now: float) -> Sequence[Endpoint] | None:
        """The endpoints the detector judges (None: an empty pool; [] : every pod stale and ignored)."""
        pool = self.candidates()
        if not pool:
            return None
        if self.settings.staleness_policy == STALENESS_IGNORE and self._stale_after is not None:
            return [ep for ep in pool if fresh_metrics(ep, now, self._stale_after) is not None]
        return pool

    def has_room(self, now: float | None = None) -> bool:
        """Whether the detector reports room now (False for an empty pool)."""
        now = self.clock() if now is None else now
        gate = self._gate(now)
        self.pool_empty = gate is None
        if gate is None:
            self.last_saturation = 1.0
            return False
        if not gate:
            self.last_saturation = 0.0
            return True
        self.last_saturation = self.detector.pool_saturation(gate, now)
        return not self.detector.pool_saturated(gate, now)

    def saturation(self, now: float | None = None) -> float:
        """The pool saturation gating dispatch (1.0 for an empty pool), for gauges."""
        now = self.clock() if now is None else now
        gate = self._gate(now)
        if gate is None:
            return 1.0
        return self.detector.pool_saturation(gate, now) if gate else 0.0

    def dispatch(self, limit: int = MAX_DISPATCH_PER_CYCLE) -> int:
        """One dispatch cycle: dispatch while there is room and work, at most `limit`; the count."""
        if self.live == 0:
            return 0
        t0 = self.timer()
        now = self.clock()
        n = 0
        while n < limit and self.live and self.has_room(now):
            item = self._next()
            if item is None:
                break
            self._left(item)
            self._finalize(item, Outcome.DISPATCHED, now)
            n += 1
        if self.metrics is not None:
            self.metrics.cycle(self.timer() - t0)
        return n

    def _next(self) -> Item | None:
        for band in self._order:
            if band.live == 0:
                continue
            flow = band.fairness.pick(band)
            if flow is None:
                continue
            item = flow.queue.pop()
            if item is not None:
                band.took(item)
                return item
        return None

    def stale_count(self, now: float | None = None) -> int:
        """Candidates whose metrics are missing or stale (0 for a detector blind to metrics)."""
        if self._stale_after is None:
            return 0
        now = self.clock() if now is None else now
        return sum(1 for ep in self.candidates() if fresh_metrics(ep, now, self._stale_after) is None)

    # ---- time -------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest TTL deadline of a queued request (the clock's time), or None."""
        h = self._expiry
        while h and h[0][2].done:
            heapq.heappop(h)
        return h[0][0] if h else None

    def expire(self, now: float | None = None) -> int:
        """Evict every queued request whose TTL has passed; the count."""
        now = self.clock() if now is None else now
        h = self._expiry
        n = 0
        while h and (h[0][2].done or h[0][0] <= now):
            _, _, item = heapq.heappop(h)
            if item.done:
                continue
            self._remove(item)
            self._finalize(item, Outcome.EVICTED_TTL, now)
            n += 1
        return n

    def shutdown(self) -> int:
        """Refuse new requests and evict every queued one (EvictedOther); the count evicted."""
        self.closed = True
        now = self.clock()
        n = 0
        for band in self._order:
            for flow in list(band.flows.values()):
                for item in list(flow.queue.items()):
                    self._remove(item)
                    self._finalize(item, Outcome.EVICTED_OTHER, now)
                    n += 1
        self._expiry.clear()
        return n

    # ---- views ------------------------------------------------------------------------------
    def queued(self, priority: int | None = None, fairness_id: str | None = None) -> int:
        """Requests waiting (in one band, or one flow)."""
        if priority is None:
            return self.live
        band = self.bands.get(priority)
        if band is None:
            return 0
        if fairness_id is None:
            return band.live
        flow = band.flows.get(fairness_id)
        return flow.queue.live if flow is not None else 0
