"""The scheduler interface the director calls, and the request view it schedules on.

Nothing here sees protobuf: a SchedulingRequest is built by the director from the parsed request.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from epp.datastore import Endpoint


@dataclass(slots=True)
class SchedulingRequest:
    """What a scheduler may know of one request."""

    request_id: str
    model: str  # the target model (after rewrite); adapters are matched on this
    client_model: str = ""
    priority: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    prompt: str = ""  # text for prefix matching ("" for header-only requests)
    body: Mapping[str, Any] | None = None
    # Per-request values the scheduler computes once and reuses between schedule() and on_routed()
    # (e.g. prefix block hashes). Callers leave it alone.
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SchedulingResult:
    """Endpoints in preference order (primary first); empty with a reason when none fits."""

    endpoints: list[Endpoint]
    reason: str = ""
    # Request headers the decision adds (a profile handler's: `x-prefiller-host-port` for P/D), set
    # in the same header mutation as the destination.
    headers: list[tuple[str, str]] = field(default_factory=list)
    # The destination to send to when it is not the endpoints' own addresses ("" = theirs):
    # data-parallel-profile-handler sends to the pod's primary port and names the rank in a header.
    destination: str = ""
    # What each profile that ran chose, by profile name (empty for a single profile).
    profiles: dict[str, list[Endpoint]] = field(default_factory=dict)


class Scheduler(Protocol):
    """Chooses endpoints for one request among candidates (never empty when called)."""

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> SchedulingResult: ...

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        """The request was sent to `endpoint` (learn affinity, account load)."""

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        """The request finished (or was abandoned) on `endpoint`."""


class LeastInflightScheduler:
    """Fewest requests this picker has routed and not seen finish; ties broken at random.

    The interim policy until metric-driven profiles are configured; also a useful baseline.
    """

    def __init__(self, max_endpoints: int = 1, rng: random.Random | None = None) -> None:
        self.max_endpoints = max(1, max_endpoints)
        self._rng = rng or random.Random()

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        shuffled = list(candidates)
        self._rng.shuffle(shuffled)
        shuffled.sort(key=lambda e: e.inflight)  # stable: the shuffle breaks ties
        return SchedulingResult(shuffled[: self.max_endpoints])

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        return None

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        return None
