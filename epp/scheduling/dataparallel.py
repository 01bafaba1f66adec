"""`data-parallel-profile-handler` (deprecated in the reference): data-parallel ranks as pool ports.

The pool lists one target port per data-parallel rank, so each rank is an endpoint `ip:port`. The
single profile picks one; the request is sent to the pod's `primaryPort` (default 8000, where the
decode sidecar listens) with request header `x-data-parallel-host-port: ip:rankport`, and the
sidecar forwards it to that rank's engine. Exactly one scheduling profile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from epp.datastore import Endpoint
from epp.scheduling.framework import SchedulingRequest, SchedulingResult
from epp.scheduling.profile import ProfileScheduler, WeightedScorer
from epp.scheduling.registry import HANDLER, BuildContext, ConfigError, Params, register

DP_HEADER = "x-data-parallel-host-port"


@dataclass(frozen=True, slots=True)
class DataParallelParams:
    primary_port: int = 8000


def join_host_port(ip: str, port: int) -> str:
    """`ip:port`, brackets around an IPv6 address."""
    return f"[{ip}]:{port}" if ":" in ip and not ip.startswith("[") else f"{ip}:{port}"


@register("data-parallel-profile-handler", HANDLER)
class DataParallelProfileHandler:
    """Runs the one profile; the destination is the pod's primary port, the rank in a header."""

    def __init__(self, name: str, params: DataParallelParams, ctx: BuildContext | None) -> None:
        self.name = name
        self.p = params

    @classmethod
    def parse(cls, p: Params) -> DataParallelParams:
        port = p.integer("primaryPort", 8000, lo=0, hi=65535)
        p.done()
        return DataParallelParams(primary_port=port or 8000)

    @staticmethod
    def validate_profiles(params: DataParallelParams, profiles: Sequence[str], path: str) -> None:
        if len(profiles) != 1:
            raise ConfigError(path, "data-parallel-profile-handler runs exactly one scheduling profile; got "
                                    f"{len(profiles)} ({', '.join(profiles)})")


class DataParallelScheduler:
    """One profile; rewrites the destination to the primary port and adds the rank header."""

    def __init__(self, params: DataParallelParams, profile: ProfileScheduler) -> None:
        self.p = params
        self.profile = profile
        self.name = profile.name

    @property
    def scorers(self) -> tuple[WeightedScorer, ...]:
        """The profile's scorers (what the server inspects, e.g. for a session-affinity scorer)."""
        return self.profile.scorers

    @property
    def max_endpoints(self) -> int:
        return self.profile.max_endpoints

    @property
    def plugin_timer(self) -> Callable[[str, str, str, float], None] | None:
        return self.profile.plugin_timer

    @plugin_timer.setter
    def plugin_timer(self, fn: Callable[[str, str, str, float], None] | None) -> None:
        self.profile.plugin_timer = fn

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        res = self.profile.schedule(request, candidates)
        if not res.endpoints:
            return res
        port = self.p.primary_port
        first = res.endpoints[0]
        res.headers = [(DP_HEADER, first.address)]
        res.destination = ",".join(join_host_port(e.ip, port) for e in res.endpoints)
        return res

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        self.profile.on_routed(request, endpoint)

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        self.profile.on_finished(request, endpoint)

    def peer_notes(self, request: SchedulingRequest, endpoint: Endpoint) -> dict[str, Any]:
        return self.profile.peer_notes(request, endpoint)

    def apply_peer_notes(self, endpoint: Endpoint, notes: Mapping[str, Any]) -> None:
        self.profile.apply_peer_notes(endpoint, notes)

    def forget(self, address: str) -> None:
        self.profile.forget(address)

    def on_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        self.profile.on_endpoints_changed(added, removed)

    def stats(self) -> dict[str, float]:
        return self.profile.stats()
