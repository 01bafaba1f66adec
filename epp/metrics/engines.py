"""Which series on a model server's /metrics page carry each signal, per engine.

Built-in engines (names from protocol.md §4): `vllm`, `sglang`, `trtllm-serve`,
`triton-tensorrt-llm`. An endpoint's engine comes from its pod label
(`inference.networking.k8s.io/engine-type`, else `llm-d.ai/engine-type`, else vllm); common
spellings such as `trtllm`, `TensorRT-LLM` or `triton` are accepted (see `resolve_engine`).

Each signal lists alternatives, tried in order: the first whose series are on the page wins. That
is how vLLM's KV-cache use is found under the current `vllm:kv_cache_usage_perc` or the older
`vllm:gpu_cache_usage_perc`, whichever the server exposes.

Overriding names from the config file (`apply_overrides`): a top-level `engineMetrics` section
maps an engine to the signals to change; signals not named keep the built-in definition::

    engineMetrics:
      vllm:
        waiting: "my:queue"                          # a sample name
        kvUsage: ["my:kv_perc", "vllm:kv_cache_usage_perc"]   # alternatives, first present wins
      triton-tensorrt-llm:
        running:                                     # a name with a label selector
          name: nv_trt_llm_request_metrics
          labels: {request_type: "context"}
      sglang:
        blockSize: {name: "sglang:cache_config_info", label: page_size}  # read a label's value
        lora: null                                   # optional signals can be switched off
      my-engine:                                     # a new engine: starts from `base` (default vllm)
        base: sglang
        waiting: "my_engine_queue"
        lora: {name: "my:lora_info", maxLabel: max_lora,
               runningLabel: running_lora_adapters, waitingLabel: waiting_lora_adapters}

Signal keys: `waiting`, `running`, `kvUsage`, `blockSize`, `numBlocks`, `lora` (snake_case is
accepted too). `waiting`, `running` and `kvUsage` are required: a page without any of their
alternatives is a failed scrape.

Several matching series are combined: queue and running counts are summed (data-parallel ranks
each expose their own), KV use is averaged (ranks have equal caches), block size and count come
from the first series, and for LoRA the newest `lora_requests_info` series (its value is a
timestamp) wins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from epp.datastore import Metrics
from epp.metrics.parse import Sample, scan
from epp.resources import ResourceError

log = logging.getLogger("epp.metrics.engines")


@dataclass(frozen=True, slots=True)
class Source:
    """Series named `name` whose labels include `match`; their value, or with `label` set, the
    value of that label (info metrics such as cache_config_info)."""

    name: str
    match: tuple[tuple[str, str], ...] = ()
    label: str = ""

    def select(self, samples: Sequence[Sample]) -> list[Sample]:
        """The series this source reads; a value source skips NaN/Inf (the server does not know)."""
        match, by_label = self.match, bool(self.label)
        return [
            s
            for s in samples
            if (by_label or _finite(s.value)) and all(s.labels.get(k) == v for k, v in match)
        ]


def _finite(value: float) -> bool:
    return value == value and value not in (_INF, -_INF)


_INF = float("inf")


@dataclass(frozen=True, slots=True)
class LoraSource:
    """vLLM-style LoRA info: one series per state change, value = its timestamp."""

    name: str
    max_label: str = "max_lora"
    running_label: str = "running_lora_adapters"
    waiting_label: str = "waiting_lora_adapters"


@dataclass(frozen=True)
class EngineSpec:
    """Where one engine exposes each signal. Each tuple lists alternatives, first present wins."""

    name: str
    waiting: tuple[Source, ...]
    running: tuple[Source, ...]
    kv_usage: tuple[Source, ...]
    block_size: tuple[Source, ...] = ()
    num_blocks: tuple[Source, ...] = ()
    lora: LoraSource | None = None

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Every sample name the engine may read (for the `?name[]=` filter)."""
        return tuple(dict.fromkeys(s.name for s in self._all_sources()))

    @cached_property
    def primary_names(self) -> tuple[str, ...]:
        """The first alternative of each signal: what one scan of the page looks for."""
        firsts = [alts[0].name for alts in self._signals() if alts]
        if self.lora is not None:
            firsts.append(self.lora.name)
        return tuple(dict.fromkeys(firsts))

    @cached_property
    def required_names(self) -> tuple[frozenset[str], ...]:
        """For each required signal, the names of which at least one must be on the page."""
        return tuple(frozenset(s.name for s in alts) for alts in (self.waiting, self.running, self.kv_usage))

    def _signals(self) -> tuple[tuple[Source, ...], ...]:
        return (self.waiting, self.running, self.kv_usage, self.block_size, self.num_blocks)

    def _all_sources(self) -> Iterable[Source | LoraSource]:
        for alts in self._signals():
            yield from alts
        if self.lora is not None:
            yield self.lora


def _src(name: str, label: str = "", **match: str) -> tuple[Source, ...]:
    return (Source(name, tuple(match.items()), label),)


_TRITON_REQ = "nv_trt_llm_request_metrics"
_TRITON_KV = "nv_trt_llm_kv_cache_block_metrics"

ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        name="vllm",
        waiting=_src("vllm:num_requests_waiting"),
        running=_src("vllm:num_requests_running"),
        kv_usage=_src("vllm:kv_cache_usage_perc") + _src("vllm:gpu_cache_usage_perc"),
        block_size=_src("vllm:cache_config_info", label="block_size"),
        num_blocks=_src("vllm:cache_config_info", label="num_gpu_blocks"),
        lora=LoraSource("vllm:lora_requests_info"),
    ),
    "sglang": EngineSpec(
        name="sglang",
        waiting=_src("sglang:num_queue_reqs"),
        running=_src("sglang:num_running_reqs"),
        kv_usage=_src("sglang:token_usage"),
        block_size=_src("sglang:cache_config_info", label="page_size"),
        num_blocks=_src("sglang:cache_config_info", label="num_pages"),
    ),
    "trtllm-serve": EngineSpec(
        name="trtllm-serve",
        waiting=_src("trtllm_num_requests_waiting"),
        running=_src("trtllm_num_requests_running"),
        kv_usage=_src("trtllm_kv_cache_utilization"),
        block_size=_src("trtllm_kv_cache_tokens_per_block"),
        num_blocks=_src("trtllm_kv_cache_max_blocks"),
    ),
    "triton-tensorrt-llm": EngineSpec(
        name="triton-tensorrt-llm",
        waiting=_src(_TRITON_REQ, request_type="waiting"),
        running=_src(_TRITON_REQ, request_type="scheduled"),
        kv_usage=_src(_TRITON_KV, kv_cache_block_type="fraction"),
        block_size=_src(_TRITON_KV, kv_cache_block_type="tokens_per"),
        num_blocks=_src(_TRITON_KV, kv_cache_block_type="max"),
    ),
}

DEFAULT_ENGINE = "vllm"

# Spellings seen in engine-type labels, after lower-casing and '_' -> '-'.
ALIASES: dict[str, str] = {
    "vllm": "vllm",
    "vllm-v1": "vllm",
    "sglang": "sglang",
    "trtllm-serve": "trtllm-serve",
    "trtllm": "trtllm-serve",
    "trt-llm": "trtllm-serve",
    "tensorrt-llm": "trtllm-serve",
    "tensorrtllm": "trtllm-serve",
    "trtllm-server": "trtllm-serve",
    "triton-tensorrt-llm": "triton-tensorrt-llm",
    "triton-trtllm": "triton-tensorrt-llm",
    "triton-trt-llm": "triton-tensorrt-llm",
    "triton-tensorrtllm": "triton-tensorrt-llm",
    "tensorrtllm-backend": "triton-tensorrt-llm",
    "triton": "triton-tensorrt-llm",
}

_warned_unknown: set[str] = set()


def resolve_engine(label: str | None, specs: Mapping[str, EngineSpec] = ENGINES) -> EngineSpec:
    """The spec for an engine-type label value; unknown values fall back to vLLM (logged once)."""
    raw = (label or "").strip()
    if raw in specs:
        return specs[raw]
    key = raw.lower().replace("_", "-").replace(" ", "-")
    key = ALIASES.get(key, key)
    spec = specs.get(key)
    if spec is not None:
        return spec
    if raw and raw not in _warned_unknown:
        _warned_unknown.add(raw)
        log.warning("unknown engine type, reading vLLM metric names", extra={"engine": raw})
    return specs.get(DEFAULT_ENGINE) or ENGINES[DEFAULT_ENGINE]


class MissingMetrics(ValueError):
    """The page lacks a required signal (or is not a metrics page at all)."""

    def __init__(self, engine: str, missing: list[str]) -> None:
        super().__init__(f"{engine}: no series for {', '.join(missing)}")
        self.engine = engine
        self.missing = missing


class _Page:
    """A page scanned for the primary names; alternatives are scanned only when needed."""

    __slots__ = ("found", "scanned", "text")

    def __init__(self, text: str, names: Iterable[str]) -> None:
        self.text = text
        self.scanned = set(names)
        self.found = scan(text, self.scanned)

    def pick(self, alternatives: Sequence[Source]) -> tuple[Source, list[Sample]] | None:
        for src in alternatives:
            if src.name not in self.scanned:
                self.scanned.add(src.name)
                self.found.update(scan(self.text, (src.name,)))
            samples = self.found.get(src.name)
            if samples:
                chosen = src.select(samples)
                if chosen:
                    return src, chosen
        return None


def _number(text: str | None) -> int:
    """An integer from a label value; 0 (unknown) for '', 'None' and other non-numbers."""
    if not text:
        return 0
    try:
        value = float(text)
    except ValueError:
        return 0
    return int(value) if _finite(value) and value > 0 else 0


def _count(page: _Page, alternatives: Sequence[Source]) -> int:
    hit = page.pick(alternatives)
    if hit is None:
        return 0
    src, samples = hit
    if src.label:
        return _number(samples[0].labels.get(src.label))
    value = samples[0].value  # finite (select skipped the rest)
    return int(value) if value > 0 else 0


def _csv(text: str | None) -> frozenset[str]:
    if not text:
        return frozenset()
    return frozenset(p for p in (x.strip() for x in text.split(",")) if p)


def read_metrics(spec: EngineSpec, page: str | bytes, now: float) -> Metrics:
    """The signals on one /metrics page, stamped `updated=now`. Raises MissingMetrics when a
    required signal (waiting, running, KV use) has no series."""
    text = page if isinstance(page, str) else bytes(page).decode("utf-8", "replace")
    p = _Page(text, spec.primary_names)
    waiting = p.pick(spec.waiting)
    running = p.pick(spec.running)
    kv = p.pick(spec.kv_usage)
    if waiting is None or running is None or kv is None:
        hits = (("waiting", waiting), ("running", running), ("kv_usage", kv))
        missing = [n for n, hit in hits if hit is None]
        raise MissingMetrics(spec.name, missing)
    kv_values = [s.value for s in kv[1]]
    metrics = Metrics(
        waiting=sum(s.value for s in waiting[1]),
        running=sum(s.value for s in running[1]),
        kv_usage=sum(kv_values) / len(kv_values),
        block_size=_count(p, spec.block_size),
        num_blocks=_count(p, spec.num_blocks),
        models=frozenset(m for s in waiting[1] if (m := s.labels.get("model_name"))),
        updated=now,
    )
    if spec.lora is not None:
        lora = p.found.get(spec.lora.name)
        if lora:
            # The newest state wins: its value is when it was recorded (later on the page breaks ties).
            newest = max(reversed(lora), key=lambda s: s.value if s.value == s.value else float("-inf"))
            metrics.lora_max = _number(newest.labels.get(spec.lora.max_label))
            metrics.lora_running = _csv(newest.labels.get(spec.lora.running_label))
            metrics.lora_waiting = _csv(newest.labels.get(spec.lora.waiting_label))
    return metrics


# ---- overrides from the config file ----------------------------------------------------------

_SIGNAL_KEYS = {
    "waiting": "waiting",
    "running": "running",
    "kvUsage": "kv_usage",
    "kv_usage": "kv_usage",
    "blockSize": "block_size",
    "block_size": "block_size",
    "numBlocks": "num_blocks",
    "num_blocks": "num_blocks",
}
_REQUIRED = ("waiting", "running", "kv_usage")
_LORA_KEYS = {
    "maxLabel": "max_label",
    "max_label": "max_label",
    "runningLabel": "running_label",
    "running_label": "running_label",
    "waitingLabel": "waiting_label",
    "waiting_label": "waiting_label",
}


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ResourceError(path, "must be a non-empty string")
    return value.strip()


def _source(value: Any, path: str) -> Source:
    if isinstance(value, str):
        return Source(_string(value, path))
    if not isinstance(value, Mapping):
        raise ResourceError(path, "must be a metric name or a mapping with name, labels, label")
    unknown = set(value) - {"name", "labels", "match", "label"}
    if unknown:
        raise ResourceError(path, f"unknown keys {sorted(unknown)}")
    labels = value.get("labels", value.get("match")) or {}
    if not isinstance(labels, Mapping):
        raise ResourceError(f"{path}.labels", "must be a mapping of label name to value")
    match = tuple((str(k), str(v)) for k, v in labels.items())
    label = value.get("label") or ""
    if label:
        label = _string(label, f"{path}.label")
    return Source(_string(value.get("name"), f"{path}.name"), match, label)


def _sources(value: Any, path: str, required: bool) -> tuple[Source, ...]:
    if value is None or value == []:
        if required:
            raise ResourceError(path, "is required and cannot be removed")
        return ()
    if isinstance(value, list):
        return tuple(_source(v, f"{path}[{i}]") for i, v in enumerate(value))
    return (_source(value, path),)


def _lora(value: Any, path: str) -> LoraSource | None:
    if value is None:
        return None
    if isinstance(value, str):
        return LoraSource(_string(value, path))
    if not isinstance(value, Mapping):
        raise ResourceError(path, "must be a metric name, a mapping, or null")
    unknown = set(value) - {"name", *_LORA_KEYS}
    if unknown:
        raise ResourceError(path, f"unknown keys {sorted(unknown)}")
    kwargs = {_LORA_KEYS[k]: _string(v, f"{path}.{k}") for k, v in value.items() if k != "name"}
    return LoraSource(_string(value.get("name"), f"{path}.name"), **kwargs)


def apply_overrides(
    overrides: Mapping[str, Any] | None,
    base: Mapping[str, EngineSpec] = ENGINES,
    path: str = "engineMetrics",
) -> dict[str, EngineSpec]:
    """Engine specs with the config file's `engineMetrics` section applied (see module doc).

    Engines keep every signal the section does not name; a new engine name starts from its
    `base` engine (default vllm). Raises ResourceError naming the offending field.
    """
    specs = dict(base)
    if not overrides:
        return specs
    if not isinstance(overrides, Mapping):
        raise ResourceError(path, "must be a mapping of engine name to signals")
    for raw_name, signals in overrides.items():
        epath = f"{path}.{raw_name}"
        name = _string(raw_name, epath)
        if signals is None:
            signals = {}
        if not isinstance(signals, Mapping):
            raise ResourceError(epath, "must be a mapping of signal to metric")
        key = ALIASES.get(name.lower().replace("_", "-"), name)
        current = specs.get(name) or specs.get(key)
        if current is None:
            base_name = signals.get("base", DEFAULT_ENGINE)
            base_spec = specs.get(ALIASES.get(str(base_name).lower(), str(base_name)))
            if base_spec is None:
                raise ResourceError(f"{epath}.base", f"unknown engine {base_name!r}")
            current = replace(base_spec, name=name)
        elif "base" in signals:
            raise ResourceError(f"{epath}.base", "only a new engine takes a base")
        changes: dict[str, Any] = {}
        for k, v in signals.items():
            if k == "base":
                continue
            if k == "lora":
                changes["lora"] = _lora(v, f"{epath}.lora")
            elif k in _SIGNAL_KEYS:
                attr = _SIGNAL_KEYS[k]
                changes[attr] = _sources(v, f"{epath}.{k}", attr in _REQUIRED)
            else:
                raise ResourceError(f"{epath}.{k}", f"unknown signal; expected one of {sorted(_SIGNAL_KEYS)}")
        specs[current.name] = replace(current, **changes)
    return specs


__all__ = [
    "ALIASES",
    "DEFAULT_ENGINE",
    "ENGINES",
    "EngineSpec",
    "LoraSource",
    "MissingMetrics",
    "Source",
    "apply_overrides",
    "read_metrics",
    "resolve_engine",
]
