"""`core-metrics-extractor`: which series on a model server's page carry each signal, per engine.

Parameters (the reference's): `engineLabelKey` (default `llm-d.ai/engine-type`; this picker also
reads `inference.networking.k8s.io/engine-type`), `defaultEngine` (default vllm), and
`engineConfigs[]`, each `{name, queuedRequestsSpec, runningRequestsSpec, kvUsageSpec, loraSpec,
cacheInfoSpec, cacheBlockSizeLabelName, cacheNumBlocksLabelName, cacheBlockSizeSpec,
cacheNumBlocksSpec, customMetrics[{attributeKey, metricSpec}]}`. A spec is a selector such as
`vllm:num_requests_waiting` or `custom_queue{status="waiting",tier=gold}`.

The engine configs are converted into the `engineMetrics` override format of epp.metrics.engines
(an engine not built in starts from vllm), so one table drives the scraper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from epp.scheduling.registry import EXTRACTOR, BuildContext, ConfigError, Params, register

_SELECTOR = re.compile(r"^\s*([A-Za-z_:][A-Za-z0-9_:.\-]*)\s*(?:\{(.*)\})?\s*$")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,]*?))\s*(?:,|$)')


def parse_selector(text: str, path: str) -> dict[str, Any] | str:
    """`name` or `name{label=value,...}` → the metric name, or {name, labels}. Only `=` matchers."""
    m = _SELECTOR.match(text)
    if m is None:
        raise ConfigError(path, f"expected a metric selector like name or name{{label=\"value\"}}, got {text!r}")
    name, body = m.group(1), m.group(2)
    if body is None or not body.strip():
        return name
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        mm = _MATCHER.match(body, pos)
        if mm is None or mm.end() == pos:
            raise ConfigError(path, f"cannot read the label matchers in {text!r} (only label=value is supported)")
        labels[mm.group(1)] = mm.group(2) if mm.group(2) is not None else (mm.group(3) or "")
        pos = mm.end()
    return {"name": name, "labels": labels}


@dataclass(frozen=True, slots=True)
class ExtractorParams:
    engine_label_key: str = "llm-d.ai/engine-type"
    default_engine: str = "vllm"
    engine_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    custom_metrics: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)


_SIGNALS = (("queuedRequestsSpec", "waiting"), ("runningRequestsSpec", "running"), ("kvUsageSpec", "kvUsage"),
            ("cacheBlockSizeSpec", "blockSize"), ("cacheNumBlocksSpec", "numBlocks"))


def _engine(p: Params) -> tuple[str, dict[str, Any], tuple[tuple[str, str], ...]]:
    name = p.string("name", "")
    if not name:
        raise ConfigError(p.field("name"), "required (the engine-type label value)")
    signals: dict[str, Any] = {}
    for key, signal in _SIGNALS:
        spec = p.string(key, "")
        if spec:
            signals[signal] = parse_selector(spec, p.field(key))
    info = p.string("cacheInfoSpec", "")
    bs_label = p.string("cacheBlockSizeLabelName", "block_size")
    nb_label = p.string("cacheNumBlocksLabelName", "num_gpu_blocks")
    if info:
        sel = parse_selector(info, p.field("cacheInfoSpec"))
        base = sel if isinstance(sel, dict) else {"name": sel}
        signals.setdefault("blockSize", {**base, "label": bs_label})
        signals.setdefault("numBlocks", {**base, "label": nb_label})
    lora = p.string("loraSpec", "")
    if lora:
        sel = parse_selector(lora, p.field("loraSpec"))
        if isinstance(sel, dict):
            raise ConfigError(p.field("loraSpec"), "label matchers on the LoRA info metric are not supported")
        signals["lora"] = sel
    custom: list[tuple[str, str]] = []
    raw = p.get("customMetrics")
    if raw is not None:
        if not isinstance(raw, list):
            raise ConfigError(p.field("customMetrics"), f"expected a list, got {type(raw).__name__}")
        for i, item in enumerate(raw):
            c = Params(item, f"{p.field('customMetrics')}[{i}]")
            key, spec = c.string("attributeKey", ""), c.string("metricSpec", "")
            if not key or not spec:
                raise ConfigError(c.field("attributeKey" if not key else "metricSpec"), "required")
            parse_selector(spec, c.field("metricSpec"))
            c.done()
            custom.append((key, spec))
    p.done()
    return name, signals, tuple(custom)


@register("core-metrics-extractor", EXTRACTOR)
class CoreMetricsExtractor:
    """The engine label, default engine and per-engine metric names (see module doc)."""

    def __init__(self, name: str, params: ExtractorParams, ctx: BuildContext) -> None:
        self.name = name
        self.params = params

    @classmethod
    def parse(cls, p: Params) -> ExtractorParams:
        label = p.string("engineLabelKey", "llm-d.ai/engine-type")
        default = p.string("defaultEngine", "vllm")
        engines: dict[str, dict[str, Any]] = {}
        custom: dict[str, tuple[tuple[str, str], ...]] = {}
        raw = p.get("engineConfigs")
        if raw is not None:
            if not isinstance(raw, list):
                raise ConfigError(p.field("engineConfigs"), f"expected a list, got {type(raw).__name__}")
            for i, item in enumerate(raw):
                name, signals, cm = _engine(Params(item, f"{p.field('engineConfigs')}[{i}]"))
                if name in engines:
                    raise ConfigError(f"{p.field('engineConfigs')}[{i}].name", f"engine {name!r} given twice")
                engines[name] = signals
                if cm:
                    custom[name] = cm
        p.done()
        return ExtractorParams(label, default, engines, custom)
