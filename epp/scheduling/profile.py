"""A scheduling profile run as a Scheduler: filters in order → weighted scorers → one picker.

Each score is clamped to 0..1 (NaN counts as 0), multiplied by its weight and summed per endpoint;
the picker turns the sums into endpoints in preference order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle
from epp.scheduling.framework import SchedulingRequest, SchedulingResult
from epp.scheduling.registry import Filter, Picker, Scorer, type_name_of

log = logging.getLogger("epp.scheduling")

SWEEP_INTERVAL = 10.0  # seconds between purges of state kept for endpoints no longer offered


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float
    only_with_lora: bool = False  # skipped unless the pool serves LoRA adapters

    @property
    def bounded(self) -> bool:
        """The scorer promises scores in 0..1 (class attribute `BOUNDED`), so no clamping is needed."""
        return bool(getattr(self.scorer, "BOUNDED", False))


def weighted_sum(lists: list[list[float]], weights: list[float], n: int) -> list[float]:
    """Σ weight × score per endpoint, in one pass for up to six scorers (the hot path)."""
    k = len(lists)
    if k == 0:
        return [0.0] * n
    if k == 1:
        w0 = weights[0]
        return [w0 * a for a in lists[0]]
    if k == 2:
        w0, w1 = weights
        return [w0 * a + w1 * b for a, b in zip(*lists, strict=True)]
    if k == 3:
        w0, w1, w2 = weights
        return [w0 * a + w1 * b + w2 * c for a, b, c in zip(*lists, strict=True)]
    if k == 4:
        w0, w1, w2, w3 = weights
        return [w0 * a + w1 * b + w2 * c + w3 * d for a, b, c, d in zip(*lists, strict=True)]
    if k == 5:
        w0, w1, w2, w3, w4 = weights
        return [w0 * a + w1 * b + w2 * c + w3 * d + w4 * e for a, b, c, d, e in zip(*lists, strict=True)]
    if k == 6:  # the default profile without LoRA
        w0, w1, w2, w3, w4, w5 = weights
        return [w0 * a + w1 * b + w2 * c + w3 * d + w4 * e + w5 * f
                for a, b, c, d, e, f in zip(*lists, strict=True)]
    totals = weighted_sum(lists[:6], weights[:6], n)
    for s, w in zip(lists[6:], weights[6:], strict=True):
        totals = [t + w * x for t, x in zip(totals, s, strict=True)]
    return totals


class ProfileScheduler:
    """Runs one profile per request; forwards routing events to the plugins that keep state."""

    def __init__(
        self,
        name: str,
        filters: Sequence[Filter],
        scorers: Sequence[WeightedScorer],
        picker: Picker,
        *,
        stale_after: float,
        has_lora: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.filters = tuple(filters)
        self.scorers = tuple(scorers)
        self.picker = picker
        self.stale_after = stale_after
        self.has_lora = has_lora
        self._clock = clock
        # (score function, weight, only with LoRA, bounded) resolved once, off the hot path
        self._plan = tuple((ws.scorer.score, ws.weight, ws.only_with_lora, ws.bounded) for ws in self.scorers)
        plugins: list[Any] = [*self.filters, *(s.scorer for s in self.scorers), picker]
        self._routed = [p.on_routed for p in plugins if hasattr(p, "on_routed")]
        # active-active peers (epp.peers): what each stateful plugin tells the other replicas
        self._peer = {getattr(p, "name", ""): p for p in plugins if hasattr(p, "peer_note")}
        self._finished = [p.on_finished for p in plugins if hasattr(p, "on_finished")]
        self._forget = [p.forget for p in plugins if hasattr(p, "forget")]
        self._sweepers = [p.sweep for p in plugins if hasattr(p, "sweep")]
        self._stats = [p.stats for p in plugins if hasattr(p, "stats")]
        self._next_sweep = clock() + SWEEP_INTERVAL
        self._widest: Sequence[Endpoint] = ()  # the largest candidate set seen since the last sweep
        # plugin_timer(extension_point, plugin_type, plugin_name, seconds), for the EPP's own metrics
        self.plugin_timer: Callable[[str, str, str, float], None] | None = None
        self.timing_sample = 16
        self._count = 0
        self._type_names: dict[int, str] = {}

    @property
    def max_endpoints(self) -> int:
        return self.picker.max_endpoints

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        now = self._clock()
        if len(candidates) >= len(self._widest):
            self._widest = candidates
        if now >= self._next_sweep:
            self._sweep(now)
        timer = None
        if self.plugin_timer is not None:
            self._count += 1
            if self._count % self.timing_sample == 0:  # time one request in N: the timing costs too
                timer = time.perf_counter
        cycle = Cycle(request, now, self.stale_after)
        endpoints: Sequence[Endpoint] = candidates
        for f in self.filters:
            t0 = timer() if timer else 0.0
            endpoints = f.filter(cycle, list(endpoints))
            if timer:
                self._report("Filter", f, timer() - t0)
            if not endpoints:
                return SchedulingResult([], f"no endpoint passed filter {f.name}")
        if not endpoints:
            return SchedulingResult([], "no candidate endpoints")
        if len(endpoints) == 1:
            return SchedulingResult([endpoints[0]])
        lists: list[list[float]] = []
        weights: list[float] = []
        lora: bool | None = None
        for (score, w, only_with_lora, bounded), ws in zip(self._plan, self.scorers, strict=True):
            if only_with_lora:
                if lora is None:
                    lora = self.has_lora()
                if not lora:
                    continue
            t0 = timer() if timer else 0.0
            s = score(cycle, endpoints)
            if timer:
                self._report("Scorer", ws.scorer, timer() - t0)
            if not bounded:  # clamp to 0..1; NaN fails both comparisons and becomes 0
                s = [x if 0.0 <= x <= 1.0 else (1.0 if x > 1.0 else 0.0) for x in s]
            lists.append(s)
            weights.append(w)
        totals = weighted_sum(lists, weights, len(endpoints))
        t0 = timer() if timer else 0.0
        picked = self.picker.pick(cycle, endpoints, totals)
        if timer:
            self._report("Picker", self.picker, timer() - t0)
        return SchedulingResult(picked)

    def _report(self, point: str, plugin: Any, seconds: float) -> None:
        names = self._type_names.get(id(plugin))
        if names is None:
            names = self._type_names[id(plugin)] = type_name_of(plugin)
        assert self.plugin_timer is not None
        self.plugin_timer(point, names, getattr(plugin, "name", names), seconds)

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        for hook in self._routed:
            hook(request, endpoint)

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        for hook in self._finished:
            hook(request, endpoint)

    def peer_notes(self, request: SchedulingRequest, endpoint: Endpoint) -> dict[str, Any]:
        """What this replica's plugins tell its peers of a request it routed to `endpoint`."""
        out: dict[str, Any] = {}
        for name, plugin in self._peer.items():
            note = plugin.peer_note(request, endpoint)
            if note is not None:
                out[name] = note
        return out

    def apply_peer_notes(self, endpoint: Endpoint, notes: Mapping[str, Any]) -> None:
        """A peer routed a request to `endpoint`: each plugin learns what it noted."""
        for name, note in notes.items():
            plugin = self._peer.get(name)
            if plugin is not None:
                plugin.peer_apply(endpoint, note)

    def forget(self, address: str) -> None:
        """Drop state kept for an endpoint that left the pool."""
        for hook in self._forget:
            hook(address)

    def on_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        """Datastore listener (Datastore.subscribe): forget removed endpoints at once."""
        for ep in removed:
            self.forget(ep.address)

    def stats(self) -> dict[str, float]:
        """Counters from stateful plugins (prefix index size, hit ratio), for telemetry gauges."""
        out: dict[str, float] = {}
        for stats in self._stats:
            out.update(stats())
        return out

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL
        present = [ep.address for ep in self._widest]
        self._widest = ()
        for hook in self._sweepers:
            hook(present, now)
