"""Filter and scorer on one numeric endpoint attribute (llm-d's `endpoint-attribute-filter` and
`endpoint-attribute-scorer`).

An attribute is a custom metric the core-metrics-extractor maps onto the endpoint
(`customMetrics[].attributeKey`, kept in `Metrics.custom`) or one of the standard keys
`WaitingQueueSize`, `RunningRequestsSize`, `KVCacheUsagePercent`. A pod whose metrics are stale
or missing has no attribute.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from epp.datastore import Endpoint, Metrics
from epp.scheduling.cycle import Cycle
from epp.scheduling.registry import FILTER, SCORER, BuildContext, ConfigError, Params, register

_STANDARD: dict[str, Callable[[Metrics], float]] = {
    "WaitingQueueSize": lambda m: m.waiting,
    "RunningRequestsSize": lambda m: m.running,
    "KVCacheUsagePercent": lambda m: m.kv_usage,
}

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "LessThan": operator.lt,
    "LessThanOrEqual": operator.le,
    "GreaterThan": operator.gt,
    "GreaterThanOrEqual": operator.ge,
    "Equal": operator.eq,
    "NotEqual": operator.ne,
}


def attribute(m: Metrics | None, key: str) -> float | None:
    """The attribute's value on fresh metrics `m`, or None when absent (or not a finite number)."""
    if m is None:
        return None
    std = _STANDARD.get(key)
    v = std(m) if std is not None else m.custom.get(key)
    if v is None or not math.isfinite(v):
        return None
    return float(v)


@dataclass(frozen=True, slots=True)
class AttributeFilterParams:
    attribute: str
    op: str
    value: float
    keep_missing: bool = True
    fallback_on_empty: bool = False


@register("endpoint-attribute-filter", FILTER)
class EndpointAttributeFilter:
    """Keeps endpoints whose attribute satisfies `algorithm.threshold` (operator, value); endpoints
    without it pass when `onMissing: Pass` (the default). With `fallbackOnEmpty: true` an empty
    result gives back the candidates unfiltered."""

    def __init__(self, name: str, params: AttributeFilterParams, ctx: BuildContext) -> None:
        self.name = name
        self.p = params
        self._op = OPERATORS[params.op]

    @classmethod
    def parse(cls, p: Params) -> AttributeFilterParams:
        key = p.string("attribute", "")
        if not key:
            raise ConfigError(p.field("attribute"), "required (the endpoint attribute to read)")
        on_missing = p.string("onMissing", "Pass", choices=("Pass", "Fail"))
        fallback = p.boolean("fallbackOnEmpty", False)
        algo = p.sub("algorithm")
        kind = algo.string("type", "")
        if kind != "threshold":
            raise ConfigError(algo.field("type"), "required: only \"threshold\" is supported "
                              "(the reference's percentile/topK/range are not built there either)"
                              if not kind else f"only \"threshold\" is supported, got {kind!r}")
        th = algo.sub("threshold")
        op = th.string("operator", "", choices=tuple(OPERATORS))
        if not op:
            raise ConfigError(th.field("operator"), f"required: one of {', '.join(OPERATORS)}")
        if not th.has("value"):
            raise ConfigError(th.field("value"), "required")
        value = th.number("value", 0.0)
        th.done()
        algo.done()
        p.done()
        return AttributeFilterParams(key, op, value, on_missing == "Pass", fallback)

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        key, op, value, keep_missing = self.p.attribute, self._op, self.p.value, self.p.keep_missing
        kept = []
        for ep, m in zip(endpoints, cycle.fresh(endpoints), strict=True):
            v = attribute(m, key)
            if (keep_missing if v is None else op(v, value)):
                kept.append(ep)
        if not kept and self.p.fallback_on_empty:
            return endpoints
        return kept


@dataclass(frozen=True, slots=True)
class AttributeScorerParams:
    attribute: str
    lower_is_better: bool
    fixed: tuple[float, float] | None = None  # fixedRange (min, max); None = adaptive


@register("endpoint-attribute-scorer", SCORER)
class EndpointAttributeScorer:
    """(v − min) / (max − min) of the attribute, inverted for `linear_lower_is_better`; the range is
    the candidates' own (`adaptiveRange`, default; all equal → 1.0) or `fixedRange` (values clamped).
    An endpoint without the attribute scores 0."""

    BOUNDED = True

    def __init__(self, name: str, params: AttributeScorerParams, ctx: BuildContext) -> None:
        self.name = name
        self.p = params

    @classmethod
    def parse(cls, p: Params) -> AttributeScorerParams:
        key = p.string("attributeKey", "")
        if not key:
            raise ConfigError(p.field("attributeKey"), "required (the endpoint attribute to read)")
        algo = p.sub("algorithm")
        kinds = ("linear_lower_is_better", "linear_higher_is_better")
        kind = algo.string("type", "", choices=kinds)
        if not kind:
            raise ConfigError(algo.field("type"), f"required: one of {', '.join(kinds)}")
        norm = algo.sub("normalization")
        fixed: tuple[float, float] | None = None
        if norm.has("fixedRange") and norm.has("adaptiveRange"):
            raise ConfigError(norm.path, "give at most one of fixedRange and adaptiveRange")
        if norm.has("fixedRange"):
            fr = norm.sub("fixedRange")
            lo, hi = fr.number("min", 0.0), fr.number("max", 1.0)
            fr.done()
            if not lo < hi:
                raise ConfigError(fr.path, f"min must be less than max, got {lo:g} and {hi:g}")
            fixed = (lo, hi)
        else:
            norm.sub("fixedRange")
        norm.sub("adaptiveRange").done()
        norm.done()
        algo.done()
        p.done()
        return AttributeScorerParams(key, kind == "linear_lower_is_better", fixed)

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        values = [attribute(m, self.p.attribute) for m in cycle.fresh(endpoints)]
        known = [v for v in values if v is not None]
        if not known:
            return [0.0] * len(values)
        if self.p.fixed is not None:
            lo, hi = self.p.fixed
        else:
            lo, hi = min(known), max(known)
        out = []
        for v in values:
            if v is None:
                out.append(0.0)
                continue
            if hi == lo:
                out.append(1.0)
                continue
            x = (min(max(v, lo), hi) - lo) / (hi - lo)
            out.append(1.0 - x if self.p.lower_is_better else x)
        return out
