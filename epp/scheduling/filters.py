"""Filters: keep the endpoints that may serve a request. Order of the input is preserved.

(The proxy's subset hint is applied by the director before scheduling, so it is not a plugin.)
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle, fresh_metrics
from epp.scheduling.registry import FILTER, BuildContext, ConfigError, NoParams, Params, register
from epp.scheduling.saturation import SaturationDetector


@register("label-selector-filter", FILTER)
class LabelSelectorFilter:
    """Endpoints whose pod labels include every `matchLabels` pair (may leave none)."""

    def __init__(self, name: str, params: dict[str, str], ctx: BuildContext) -> None:
        self.name = name
        self.match = tuple(params.items())

    @classmethod
    def parse(cls, p: Params) -> dict[str, str]:
        labels = p.string_map("matchLabels")
        if not labels:
            raise ConfigError(p.field("matchLabels"), "required (a non-empty mapping of label to value)")
        p.done()
        return labels

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        match = self.match
        return [ep for ep in endpoints if all(ep.labels.get(k) == v for k, v in match)]


@dataclass(frozen=True, slots=True)
class _SatParams:
    queue: float | None
    kv: float | None
    stale: float | None


@register("saturation-filter", FILTER)
class SaturationFilter:
    """Drops saturated or stale pods, unless that would drop all of them (then keeps all)."""

    def __init__(self, name: str, params: _SatParams, ctx: BuildContext) -> None:
        self.name = name
        d = ctx.detector
        self.detector = SaturationDetector(
            queue_threshold=params.queue if params.queue is not None else d.queue_threshold,
            kv_threshold=params.kv if params.kv is not None else d.kv_threshold,
            stale_after=params.stale if params.stale is not None else d.stale_after,
        )

    @classmethod
    def parse(cls, p: Params) -> _SatParams:
        out = _SatParams(
            queue=p.number("queueDepthThreshold", 0, lo=0, lo_open=True) if p.has("queueDepthThreshold") else None,
            kv=p.number("kvCacheUtilThreshold", 0, lo=0, hi=1, lo_open=True)
            if p.has("kvCacheUtilThreshold") else None,
            stale=p.duration("metricsStalenessThreshold", 0) if p.has("metricsStalenessThreshold") else None,
        )
        for k in ("queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold"):
            p.get(k)
        p.done()
        return out

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        d = self.detector
        now, stale_after = cycle.now, d.stale_after
        qt, kvt = d.queue_threshold, d.kv_threshold
        kept = []
        for ep in endpoints:
            m = fresh_metrics(ep, now, stale_after)  # the detector's own threshold, the shared rule
            if m is not None and m.waiting < qt and m.kv_usage < kvt:
                kept.append(ep)
        return kept or endpoints


def can_serve_adapter(ep: Endpoint, model: str) -> bool:
    """The pod has the adapter loaded or queued, or a free adapter slot (by its last metrics)."""
    m = ep.metrics
    if m is None or m.lora_max <= 0:
        return False
    if model in m.lora_running or model in m.lora_waiting:
        return True
    return len(m.lora_running) + len(m.lora_waiting) < m.lora_max


@register("lora-affinity-filter", FILTER)
class LoraAffinityFilter(NoParams):
    """Pods that can serve the request's adapter: have it loaded/queued, else have a free slot.

    Passes everything through when no candidate reports LoRA support (not a LoRA pool) or when no
    pod qualifies (an engine can still queue the adapter; refusing would be worse).
    """

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        model = cycle.request.model
        affine: list[Endpoint] = []
        free: list[Endpoint] = []
        for ep in endpoints:
            m = ep.metrics
            if m is None or m.lora_max <= 0:
                continue
            if model in m.lora_running or model in m.lora_waiting:
                affine.append(ep)
            elif len(m.lora_running) + len(m.lora_waiting) < m.lora_max:
                free.append(ep)
        return affine or free or endpoints
