"""From a picker configuration to a flow controller: `featureGates: [flowControl]` switches it on,
the `flowControl` section (epp.scheduling.config.FlowControlConfig) gives bounds, TTL and bands,
the saturation detector is the one admission uses (utilization with the reference's thresholds
when none is named)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from epp.datastore import Endpoint
from epp.flowcontrol.bands import DEFAULT_BAND_MAX_BYTES, DEFAULT_BAND_MAX_REQUESTS
from epp.flowcontrol.controller import (
    DEFAULT_FAIRNESS,
    DEFAULT_ORDERING,
    DEFAULT_REQUEST_TTL,
    STALENESS_SATURATED,
    BandSettings,
    FlowController,
    FlowSettings,
    Metrics,
)
from epp.scheduling.config import PickerConfig, PriorityBand, gate_enabled
from epp.scheduling.registry import FLOW_POLICY, plugin_type

GATE = "flowControl"


def enabled(cfg: PickerConfig) -> bool:
    """Whether the configuration switches flow control on."""
    return gate_enabled(cfg.feature_gates, GATE)


def _band(b: PriorityBand | None, priority: int | None = None) -> BandSettings:
    if b is None:
        return BandSettings(priority=priority)
    return BandSettings(priority=b.priority if priority is None else priority,
                        max_requests=b.max_requests or DEFAULT_BAND_MAX_REQUESTS,
                        max_bytes=b.max_bytes or DEFAULT_BAND_MAX_BYTES,
                        fairness=b.fairness_policy or DEFAULT_FAIRNESS,
                        ordering=b.ordering_policy or DEFAULT_ORDERING)


def settings(cfg: PickerConfig, *, empty_pool_ttl: float | None = None) -> FlowSettings:
    """The controller settings a configuration gives (defaults when it has no `flowControl` section)."""
    fc = cfg.flow_control
    det = cfg.admission_detector
    staleness = getattr(det, "staleness_policy", STALENESS_SATURATED)
    name = cfg.detector_plugin or ("concurrency-detector" if cfg.detector is not None and
                                   not hasattr(cfg.detector, "kv_threshold") else "utilization-detector")
    if fc is None:
        return FlowSettings(staleness_policy=staleness, detector_name=name, empty_pool_ttl=empty_pool_ttl)
    ttl = fc.default_request_ttl if fc.default_request_ttl is not None else DEFAULT_REQUEST_TTL
    return FlowSettings(
        max_requests=fc.max_requests or None,
        max_bytes=fc.max_bytes or None,
        default_ttl=ttl if ttl > 0 else math.inf,
        empty_pool_ttl=empty_pool_ttl,
        bands=tuple(_band(b) for b in fc.bands),
        default_band=_band(fc.default_band, None) if fc.default_band is not None else BandSettings(),
        default_negative_band=_band(fc.default_negative_band) if fc.default_negative_band is not None else None,
        staleness_policy=staleness,
        detector_name=name,
    )


def declared_policies(cfg: PickerConfig) -> dict[str, Any]:
    """The flow-control policy plugins the configuration declares, built, by name."""
    out: dict[str, Any] = {}
    for spec in cfg.plugins:
        if spec.kind != FLOW_POLICY:
            continue
        pt = plugin_type(spec.type)
        if pt is not None and getattr(pt.cls, "kind", "") in ("fairness", "ordering"):
            out[spec.name] = pt.cls(spec.name, spec.params, None)
    return out


def build(cfg: PickerConfig, candidates: Callable[[], Sequence[Endpoint]], *,
          clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None,
          empty_pool_ttl: float | None = None) -> FlowController | None:
    """The flow controller of a configuration, or None when the gate is off."""
    if not enabled(cfg):
        return None
    return FlowController(settings(cfg, empty_pool_ttl=empty_pool_ttl), cfg.admission_detector, candidates,
                          clock=clock, metrics=metrics, policies=declared_policies(cfg))
